//! `xlb flows`: the live connection-table entries, like `ipvsadm -Lnc`.
//!
//! The table holds signatures, not keys. With `--flow-keys` the datapath
//! also writes each new flow's key beside its way (`XLB_FLOW_KEYS`, never
//! read by the datapath); here both are read and a key is kept only when its
//! signature is the way's, so a key overwritten or torn since is dropped,
//! never shown with another flow's backend. Without `--flow-keys` only the
//! per-backend counts of open entries can be given.

use anyhow::{bail, Result};
use lb_common::{
    ct::{ct_now, CT_TIME_SHIFT},
    CtWay, FlowKey,
};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

use crate::{agent::Agent, config::Vip, diag::trace::flow_text};

/// Flows listed at most by default.
pub const DEFAULT_LIMIT: usize = 100;
/// Flows listed at most.
pub const MAX_LIMIT: usize = 100_000;

/// What `xlb flows` asks for.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FlowsRequest {
    /// Only this VIP's flows.
    #[serde(default, with = "crate::config::text::opt")]
    pub vip: Option<Vip>,
    /// Only flows on this backend address.
    #[serde(default, with = "crate::config::text::opt")]
    pub backend: Option<IpAddr>,
    /// At most this many (the most recently seen first).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// One flow.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FlowShown {
    /// `tcp CLIENT:PORT > VIP:PORT`.
    pub flow: String,
    /// The VIP (`ADDR:PORT/PROTO`), if the agent knows it.
    pub vip: Option<String>,
    /// Backend address (None: an id the agent does not know).
    pub backend: Option<String>,
    /// Backend id.
    pub backend_id: u32,
    /// Its entry still names the backend's current generation and the
    /// backend is alive (else the next packet re-schedules it).
    pub valid: bool,
    /// Closed by FIN/RST.
    pub closed: bool,
    /// Milliseconds since the flow was last seen (16.8 ms steps).
    pub age_ms: u64,
}

/// Open entries of one backend.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackendCount {
    /// VIP.
    pub vip: String,
    /// Backend address.
    pub backend: String,
    /// Open (not closed) entries of its id and generation.
    pub open: i64,
}

/// The answer of `xlb flows`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FlowsReport {
    /// The agent keeps flow keys (`--flow-keys`).
    pub keys: bool,
    /// Flows matching the filters (before the limit).
    pub matched: u64,
    /// Entries in the table whose key could not be confirmed (inserted
    /// before `--flow-keys`, or overwritten since): not listed.
    pub unkeyed: u64,
    /// The flows, most recently seen first, at most `limit`.
    pub flows: Vec<FlowShown>,
    /// Open entries per backend (always given).
    pub per_backend: Vec<BackendCount>,
}

/// Per-backend open entries from a census (any configuration).
fn per_backend(agent: &Agent, census: &crate::conntrack::ConntrackCensus) -> Vec<BackendCount> {
    let mut out = Vec::new();
    for (v, s) in agent.vips() {
        for b in s.backends.values() {
            out.push(BackendCount { vip: v.to_string(), backend: b.ip.to_string(), open: census.open.get(&(b.id, b.gen)).copied().unwrap_or(0) });
        }
    }
    out
}

/// The live entries, filtered, most recently seen first, bounded.
pub fn flows(agent: &Agent, req: &FlowsRequest) -> Result<FlowsReport> {
    let (vip, backend) = (req.vip, req.backend);
    if let Some(v) = &vip {
        if !agent.vips().contains_key(v) {
            bail!("no VIP {v}");
        }
    }
    let limit = req.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        bail!("--limit {limit} out of range 1..={MAX_LIMIT}");
    }
    let dp = &agent.dp;
    let reader = dp.conntrack_reader()?;
    let census = reader.census();
    let mut report = FlowsReport { keys: dp.opts.flow_keys, matched: 0, unkeyed: 0, flows: Vec::new(), per_backend: per_backend(agent, &census) };
    report.per_backend.retain(|c| vip.is_none_or(|v| c.vip == v.to_string()) && backend.is_none_or(|b| c.backend == b.to_string()));
    if !dp.opts.flow_keys {
        return Ok(report);
    }
    let view = reader.view();
    let keys = crate::conntrack::KeysView::map(dp.flow_keys_map(), dp.opts.flow_key_slots(), false)?;
    let seed = dp.conntrack_seed();
    let now = ct_now(crate::conntrack::datapath_now_ns());
    // (backend id, generation) → (VIP, backend address) as the agent knows them.
    let mut owners = std::collections::HashMap::new();
    for (v, s) in agent.vips() {
        for b in s.backends.values() {
            owners.insert((b.id, b.gen), (*v, b.ip));
        }
    }
    let vip_key = vip.map(|v| v.key());
    let mut found: Vec<(u64, FlowKey, lb_common::CtEntry)> = Vec::new();
    report.unkeyed = crate::conntrack::for_each_keyed(view, &keys, &seed, |key, way| {
        let e = CtWay::entry(way.tag, way.val);
        if vip_key.is_some_and(|k| k != key.vip) {
            return;
        }
        if let Some(b) = backend {
            if owners.get(&(e.backend_id, e.gen)).map(|o| o.1) != Some(b) {
                return;
            }
        }
        found.push((CtWay::age(way.tag, now), key, e));
    });
    report.matched = found.len() as u64;
    found.sort_by_key(|f| f.0);
    found.truncate(limit);
    for (age, key, e) in found {
        let be = dp.backend_entry(e.backend_id)?;
        let owner = owners.get(&(e.backend_id, e.gen));
        report.flows.push(FlowShown {
            flow: flow_text(&key),
            vip: owner.map(|o| o.0.to_string()),
            backend: owner.map(|o| o.1.to_string()),
            backend_id: e.backend_id,
            valid: be.is_gen(e.gen) && be.is_alive(),
            closed: e.closed,
            age_ms: (age << CT_TIME_SHIFT) / 1_000_000,
        });
    }
    Ok(report)
}

/// The report for a terminal.
pub fn render(r: &FlowsReport) -> String {
    let mut out = String::new();
    if !r.keys {
        out += "flows: the agent keeps no flow keys (start it with --flow-keys to list flows); open entries per backend:\n";
    } else {
        out += &format!("{:<52} {:<24} {:>9}  state\n", "flow", "backend", "age ms");
        for f in &r.flows {
            let state = match (f.closed, f.valid) {
                (_, false) => "stale",
                (true, true) => "closed",
                (false, true) => "open",
            };
            out += &format!("{:<52} {:<24} {:>9}  {state}\n", f.flow, f.backend.as_deref().unwrap_or("?"), f.age_ms);
        }
        out += &format!(
            "{} of {} matching flow(s) shown{}; open entries per backend:\n",
            r.flows.len(),
            r.matched,
            if r.unkeyed > 0 { format!(" ({} entries without a confirmed key not listed)", r.unkeyed) } else { String::new() }
        );
    }
    for c in &r.per_backend {
        out += &format!("  {} {} {}\n", c.vip, c.backend, c.open);
    }
    out
}
