//! What `xlb status`, `xlb stats` and the metrics read.

use anyhow::Result;
use serde::Serialize;
use std::collections::BTreeMap;

use super::{kind_for, Agent, AgentReport, AgentState, Maps};
use crate::config::{Admin, AllDown};

impl<M: Maps> Agent<M> {
    /// Everything `xlb status` shows that the agent knows (the daemon adds
    /// how and where the program runs: `host::Host::fill`).
    pub fn status(&self) -> Result<Status> {
        let mut vips = Vec::new();
        for (vip, s) in &self.vips {
            let mut backends = Vec::new();
            for b in s.backends.values() {
                let c = self.dp.backend_counters(b.id)?;
                let state = match b.admin {
                    Admin::Maint => "maint",
                    Admin::Drain if b.alive() => "drain",
                    _ if b.alive() && b.agent.state == AgentState::Drain => "drain",
                    _ if b.alive() => "up",
                    _ => "down",
                }
                .to_string();
                let agent_note = (b.agent != AgentReport::default()).then(|| format!("agent: {}% {:?}", b.agent.pct, b.agent.state).to_lowercase());
                let reason = if let Some(a) = agent_note.clone().filter(|_| b.agent.state != AgentState::Up) {
                    Some(a)
                } else if state == "down" && s.failing_open && b.reachable() {
                    Some(format!("fail-open: {}", b.health.last_error.clone().unwrap_or_else(|| "down".into())))
                } else if !b.reachable() {
                    Some("MAC not resolved yet".to_string())
                } else if !b.health.up && !b.health.checked {
                    Some("not checked yet".to_string())
                } else if !b.health.up {
                    b.health.last_error.clone()
                } else if b.weight == 0 {
                    Some("weight 0: no new flows".to_string())
                } else {
                    None
                };
                let slots = s.facts().slots.get(&b.id).copied().unwrap_or(0);
                backends.push(BackendStatus {
                    ip: b.ip.to_string(),
                    mac: b.mac.map(|m| m.to_string()),
                    forward: b.forward.name().to_string(),
                    weight: b.weight,
                    state,
                    reason,
                    table_share: if s.table.is_empty() { 0.0 } else { slots as f64 / s.table.len() as f64 },
                    check: kind_for(vip, b.check.as_ref().unwrap_or(&s.health)).name().to_string(),
                    agent: agent_note,
                    check_latency_ms: b.health.last_latency_ms,
                    server_id: b.server_id.map(|i| i.0),
                    checks: b.health.checks,
                    check_failures: b.health.failures,
                    transitions: b.health.transitions,
                    packets: c.packets,
                    bytes: c.bytes,
                    new_flows: c.new_flows,
                    active_flows: self.dp.backend_conns(b.id)? as u64,
                });
            }
            let mut c = s.retired;
            for b in &backends {
                c.add(&lb_common::Counters { packets: b.packets, bytes: b.bytes, new_flows: b.new_flows });
            }
            vips.push(VipStatus {
                vip: vip.to_string(),
                table_fingerprint: format!("{:016x}", s.facts().fingerprint),
                algo: s.algo.name().to_string(),
                persist_timeout: s.persist_secs,
                active_flows: backends.iter().map(|b| b.active_flows).sum(),
                health_check: kind_for(vip, &s.health).name().to_string(),
                all_down: if s.all_down == AllDown::FailOpen { "fail-open" } else { "drop" }.to_string(),
                failing_open: s.failing_open,
                hash: s.opts.hash.to_string(),
                answer_ping: s.opts.answer_ping,
                quic: s.opts.quic,
                published_at_us: s.published_at.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_micros() as u64),
                pending: self.is_pending(vip) || self.unpublished.contains(vip),
                backends,
                packets: c.packets,
                bytes: c.bytes,
                new_flows: c.new_flows,
            });
        }
        let stats = self.dp.stats()?;
        let counters = lb_common::stats::ALL.iter().map(|s| (s.name().to_string(), stats[*s as usize])).collect();
        Ok(Status {
            vips,
            attach_mode: String::new(),
            program_id: self.dp.program_id(),
            pinned: None,
            pins_lost_on_exit: None,
            counters,
            ring_size: self.dp.opts().ring_size,
            conntrack_capacity: self.dp.opts().conntrack_size,
            conntrack_bytes: self.dp.opts().conntrack_bytes(),
            max_vips: self.dp.opts().max_vips,
            check_jobs: self.checks_running(),
            checks_started: self.checks.started,
            publications: self.publications,
            neighbour_dumps: self.neighbours.dumps,
            neighbour_probes: self.neighbours.probes,
            datapath_memory: self.dp.memory(),
            ha: None,
            sync: None,
            conntrack_entries: self.census.map(|(n, _)| n),
            conntrack_census_age_ms: self.census.map(|(_, t)| t.elapsed().as_millis() as u64),
            decap: Vec::new(),
        })
    }
}

/// `xlb status` data.
#[derive(Serialize, serde::Deserialize, Debug)]
pub struct Status {
    /// Services.
    pub vips: Vec<VipStatus>,
    /// How the program is attached (`native`, `generic`).
    #[serde(default)]
    pub attach_mode: String,
    /// Kernel id of the running XDP program.
    #[serde(default)]
    pub program_id: Option<u32>,
    /// Where the maps are pinned (none: forwarding ends with the agent).
    #[serde(default)]
    pub pinned: Option<String>,
    /// Set when the pins die with the agent (so does forwarding): why.
    #[serde(default)]
    pub pins_lost_on_exit: Option<String>,
    /// Global datapath counters by name.
    pub counters: BTreeMap<String, u64>,
    /// Entries per Maglev table.
    pub ring_size: u32,
    /// Connection-table capacity: live flows it holds with at most 1 %
    /// evicted early.
    pub conntrack_capacity: u32,
    /// Connection-table memory, bytes.
    #[serde(default)]
    pub conntrack_bytes: u64,
    /// Most VIPs (`--max-vips`).
    #[serde(default)]
    pub max_vips: u32,
    /// Distinct health-check jobs (targets shared by VIPs count once).
    #[serde(default)]
    pub check_jobs: usize,
    /// Check jobs started since the agent started (one per target per interval).
    #[serde(default)]
    pub checks_started: u64,
    /// Tables published since the agent started.
    #[serde(default)]
    pub publications: u64,
    /// Full neighbour-table dumps read (start, and after overruns).
    #[serde(default)]
    pub neighbour_dumps: u64,
    /// Probes sent to make the kernel resolve a backend's MAC.
    #[serde(default)]
    pub neighbour_probes: u64,
    /// Kernel memory of each map (bytes, as the kernel charges it).
    #[serde(default)]
    pub datapath_memory: BTreeMap<String, u64>,
    /// Counters of `xlb decap` programs on this host (pinned under the
    /// agent's pin root, this network namespace), by interface.
    #[serde(default)]
    pub decap: Vec<crate::encap::DecapStats>,
    /// This node's HA readiness (the daemon fills it in).
    #[serde(default)]
    pub ha: Option<crate::ha::Verdict>,
    /// Connection-table sync (`--sync-peer`), when on (the daemon fills it in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<crate::ctsync::SyncStats>,
    /// Connection-table entries at the last census (none yet: null).
    pub conntrack_entries: Option<u64>,
    /// Age of that census, milliseconds.
    pub conntrack_census_age_ms: Option<u64>,
}

/// One service in `xlb status`.
#[derive(Serialize, serde::Deserialize, Debug)]
pub struct VipStatus {
    /// `ADDR:PORT/PROTO`.
    pub vip: String,
    /// Fingerprint of the published table over backend addresses
    /// (`ha::fingerprint`): equal on nodes that choose alike.
    #[serde(default)]
    pub table_fingerprint: String,
    /// Algorithm.
    pub algo: String,
    /// Source-hash persistence, seconds (0 = none).
    pub persist_timeout: u16,
    /// Active flows (sum over backends).
    pub active_flows: u64,
    /// Health check in use.
    pub health_check: String,
    /// `drop` or `fail-open` when every backend is down.
    pub all_down: String,
    /// Failing open right now.
    pub failing_open: bool,
    /// What maglev hashes (`5-tuple` or `dst-port`).
    #[serde(default)]
    pub hash: String,
    /// Echo requests to the address are answered by the datapath.
    #[serde(default)]
    pub answer_ping: bool,
    /// Routed by QUIC connection ID (`--quic`).
    #[serde(default)]
    pub quic: bool,
    /// When its table was last published (Unix time, µs).
    #[serde(default)]
    pub published_at_us: Option<u64>,
    /// Changed since, its table published with the next tick (`--no-wait`,
    /// or a retry after a failed publication).
    #[serde(default)]
    pub pending: bool,
    /// Backends.
    pub backends: Vec<BackendStatus>,
    /// Packets forwarded.
    pub packets: u64,
    /// Bytes forwarded.
    pub bytes: u64,
    /// New flows.
    pub new_flows: u64,
}

/// One backend in `xlb status`.
#[derive(Serialize, serde::Deserialize, Debug)]
pub struct BackendStatus {
    /// Address.
    pub ip: String,
    /// MAC in use.
    pub mac: Option<String>,
    /// How it is reached: `l2`, `ipip` or `gue`.
    pub forward: String,
    /// Weight.
    pub weight: u32,
    /// `up` or `down`.
    pub state: String,
    /// Why it is down (or gets no new flows).
    pub reason: Option<String>,
    /// Share of the Maglev table it owns.
    pub table_share: f64,
    /// Its health check.
    pub check: String,
    /// What its agent check reported, when not plain "100% up".
    #[serde(default)]
    pub agent: Option<String>,
    /// Duration of its last check, milliseconds.
    pub check_latency_ms: Option<f64>,
    /// QUIC server ID (`--server-id`), if any.
    #[serde(default)]
    pub server_id: Option<u16>,
    /// Health checks run.
    pub checks: u64,
    /// Health checks failed.
    pub check_failures: u64,
    /// Up/down transitions.
    pub transitions: u64,
    /// Packets forwarded to it.
    pub packets: u64,
    /// Bytes forwarded to it.
    pub bytes: u64,
    /// New flows sent to it.
    pub new_flows: u64,
    /// Active flows (opened, not yet closed by FIN/RST or ended).
    pub active_flows: u64,
}
