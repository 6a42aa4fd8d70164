//! `xlb explain DEST CLIENT[:PORT]`: where one flow goes now and why.
//!
//! DEST is the flow's destination `ADDR:PORT/PROTO`; the VIP serving it is
//! found as the datapath finds it (`lb-ebpf` `steer::vip`): the exact entry,
//! else the address's any-port VIP (where the pre-filter says one exists),
//! else the most specific prefix VIP (only while prefix VIPs exist).
//! `observe` reads what the datapath would read for the flow (the VIP entry,
//! the flow's connection-table set, the persistence entry, the ring entry
//! the hash picks, the backends they name); `decide` is the datapath's
//! decision (`lb-ebpf` `steer`/`conntrack`/`select`) redone in pure code
//! over those values, so it is unit-tested without a kernel and checked
//! against the loaded program by `tests/tests/explain.rs`.

use anyhow::{bail, Context, Result};
use lb_common::{
    ct::{ct_hash, ct_now, CT_TIME_SHIFT},
    hash::{flow_hash, maglev_hash, src_hash},
    Algo, BackendInfo, CtEntry, CtWay, FlowKey, PersistKey, PersistValue, Stat, VipInfo, CT_WAYS, VIP_FILTER_ANY_PORT,
};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

use crate::{
    agent::{Admin, Agent, SLOW_START_STEPS},
    config::{AllDown, Vip},
};

/// The client side of a flow: an address and, optionally, a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Client {
    /// Client address.
    pub ip: IpAddr,
    /// Client (source) port, when known.
    pub port: Option<u16>,
}

impl std::str::FromStr for Client {
    type Err = anyhow::Error;
    /// `1.2.3.4`, `1.2.3.4:5555`, `fd00::7`, `[fd00::7]:5555`.
    fn from_str(s: &str) -> Result<Client> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Client { ip, port: None });
        }
        if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
            if sa.port() == 0 {
                bail!("client port 0 is never VIP traffic");
            }
            return Ok(Client { ip: sa.ip(), port: Some(sa.port()) });
        }
        bail!("invalid client '{s}': expected ADDR or ADDR:PORT ([ADDR]:PORT for IPv6)")
    }
}

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.ip, self.port) {
            (ip, None) => write!(f, "{ip}"),
            (IpAddr::V4(a), Some(p)) => write!(f, "{a}:{p}"),
            (IpAddr::V6(a), Some(p)) => write!(f, "[{a}]:{p}"),
        }
    }
}

/// The flow's 5-tuple as the datapath keys it: the destination's own
/// address and port (also when an any-port or prefix VIP serves it).
pub fn flow_key(vip: &Vip, client: &Client) -> Result<FlowKey> {
    if let Some(len) = vip.prefix {
        bail!("{vip} serves a network: give the flow's destination, an address in {}/{len} and a port (ADDR:PORT/PROTO)", vip.addr);
    }
    if vip.is_any_port() {
        bail!("{vip} serves every port: give the flow's destination port (ADDR:PORT/PROTO)");
    }
    let mut k = FlowKey { src: [0; 16], sport_be: client.port.unwrap_or(0).to_be(), _pad: 0, vip: vip.flow_vip_key(vip.port) };
    match (client.ip, vip.addr) {
        (IpAddr::V4(c), IpAddr::V4(_)) => k.src[..4].copy_from_slice(&c.octets()),
        (IpAddr::V6(c), IpAddr::V6(_)) => k.src = c.octets(),
        _ => bail!("client {} and VIP {vip} are of different address families", client.ip),
    }
    Ok(k)
}

mod decide;
mod render;
pub use decide::*;
pub use render::*;


fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime(2) into a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Read what the datapath reads for the flow, now.
pub fn observe(agent: &Agent, vip: &Vip, client: &Client) -> Result<(FlowKey, Observed)> {
    let dp = &agent.dp;
    let key = flow_key(vip, client)?;
    let (info, lookup) = match find_vip(agent, &key)? {
        Some((i, l)) => (Some(i), Some(l)),
        None => (None, None),
    };
    let mut o = Observed { vip: info, lookup, ct_set: None, ct: None, persist: None, ring: None };
    if client.port.is_some() {
        let sets = lb_common::ct::ct_sets(dp.opts.conntrack_size);
        let h = ct_hash(&key, &dp.conntrack_seed(), sets);
        let set = dp.conntrack_set(h.set)?;
        o.ct_set = Some(h.set);
        let now = ct_now(crate::conntrack::datapath_now_ns());
        for (way, w) in set.ways.iter().enumerate().take(CT_WAYS) {
            if CtWay::matches(w.tag, w.val, &h) {
                let entry = CtWay::entry(w.tag, w.val);
                let age_ms = (CtWay::age(w.tag, now) << CT_TIME_SHIFT) / 1_000_000;
                o.ct = Some(CtSeen { way, entry, age_ms, backend: dp.backend_entry(entry.backend_id)? });
                break;
            }
        }
    }
    let Some(info) = info else { return Ok((key, o)) };
    let algo = Algo::from_u8(info.algo);
    if algo == Some(Algo::SourceHash) && info.persist_secs > 0 {
        if let Some(value) = dp.persist_entry(&PersistKey { src: key.src, vip_id: info.vip_id })? {
            let remaining_ms = (value.expires_ns as i128 - monotonic_ns() as i128) / 1_000_000;
            o.persist = Some(PersistSeen { value, remaining_ms: remaining_ms as i64, backend: dp.backend_entry(value.backend_id)? });
        }
    }
    let h = match algo {
        Some(Algo::Maglev) => Some(maglev_hash(&info, &key)),
        Some(Algo::SourceHash) => Some(src_hash(&key)),
        _ => None,
    };
    if let (Some(h), true) = (h, info.has_backends()) {
        let index = h % info.ring_size;
        let id = dp.table_entry(info.table_slot, index)?;
        o.ring = Some(RingSeen { index, id, backend: dp.backend_entry(id)? });
    }
    Ok((key, o))
}

/// The VIP entry the datapath finds for a flow, in its order (`steer::vip`):
/// exact, then any-port where the pre-filter has the address's any-port
/// bit, then the prefix trie (port, then any-port) while prefix VIPs exist.
fn find_vip(agent: &Agent, key: &FlowKey) -> Result<Option<(VipInfo, Lookup)>> {
    let dp = &agent.dp;
    if let Some(v) = dp.vip_entry(&key.vip)? {
        return Ok(Some((v, Lookup::Exact)));
    }
    if dp.filter_entry(&key.vip)? & VIP_FILTER_ANY_PORT != 0 {
        if let Some(v) = dp.vip_entry(&key.vip.any_port())? {
            return Ok(Some((v, Lookup::AnyPort)));
        }
    }
    for k in [key.vip, key.vip.any_port()] {
        if let Some(v) = dp.prefix_entry(&k)? {
            return Ok(Some((v, Lookup::Prefix)));
        }
    }
    Ok(None)
}

fn backend_ref(agent: &Agent, id: u32, b: &BackendInfo) -> BackendRef {
    let ip = agent
        .vips()
        .values()
        .flat_map(|v| v.backends.values())
        .find(|x| x.id == id && x.gen == b.gen)
        .map(|x| x.ip.to_string());
    BackendRef { id, ip, generation: b.gen, alive: b.is_alive() }
}

/// Where the flow `client` → `vip` goes now, why, and when that may change.
pub fn explain(agent: &Agent, vip: &Vip, client: &Client) -> Result<Explanation> {
    let (key, o) = observe(agent, vip, client)?;
    // The configured VIP behind the entry found (by its datapath id).
    let served = o.vip.and_then(|i| agent.vips().iter().find(|(_, s)| s.id == i.vip_id));
    let state = served.map(|(_, s)| s);
    let algo = o.vip.and_then(|v| Algo::from_u8(v.algo));
    if client.port.is_none() && algo.is_some_and(|a| a != Algo::SourceHash) {
        let by = served.map(|(v, _)| v.to_string()).unwrap_or_else(|| vip.to_string());
        bail!("give the client's port (CLIENT:PORT): VIP {by} balances by the whole 5-tuple");
    }
    let next_packet = decide(&o, false);
    let syn = decide(&o, true);
    let shown = |d: &Decision| -> Result<Option<BackendRef>> {
        d.backend_id.map(|id| Ok(backend_ref(agent, id, &agent.dp.backend_entry(id)?))).transpose()
    };
    let mut may_change = Vec::new();
    if let Some(s) = state {
        if served.is_some_and(|(v, _)| agent.is_pending(v)) || o.vip.is_some_and(|v| v != s.published) {
            may_change.push("a change of this VIP awaits publication (the datapath still reads the previous table)".into());
        }
        if s.failing_open {
            may_change.push("every backend is down and the VIP fails open: it balances over them as if up until one passes its checks".into());
        }
        for b in s.backends.values() {
            if b.admin == Admin::Drain && Some(b.id) == next_packet.backend_id {
                may_change.push(format!("backend {} is draining: this flow stays on it, new flows go elsewhere", b.ip));
            }
            if b.usable() && b.ramp_step < SLOW_START_STEPS && s.slow_start_ms > 0 {
                may_change.push(format!(
                    "backend {} is in slow start (step {} of {SLOW_START_STEPS}): the table is rebuilt as it ramps, so new flows may move",
                    b.ip, b.ramp_step
                ));
            }
            if b.health.up && b.health.fail_streak > 0 {
                may_change.push(format!("backend {} failed its last {} check(s): it goes down after {}", b.ip, b.health.fail_streak, s.health.fall));
            } else if !b.health.up && b.health.ok_streak > 0 {
                may_change.push(format!("backend {} passed {} check(s): it comes up after {}", b.ip, b.health.ok_streak, s.health.rise));
            }
        }
        if o.vip.is_some_and(|v| !v.has_backends()) && s.all_down == AllDown::Drop {
            may_change.push("with all_down = fail-open the VIP would balance over its down backends instead of dropping".into());
        }
    }
    match (&o.ct, next_packet.via) {
        (Some(_), Some(Via::ConnectionTable)) => may_change.push(
            "the entry holds while its backend is alive; it is evicted only when its set (4 ways) needs room for a new flow (closed entries first, then the least recently seen)".into(),
        ),
        (_, Some(_)) => may_change.push("the flow's first packet makes its connection-table entry: later packets stay on that backend while it is alive".into()),
        _ => {}
    }
    if let Some(p) = &o.persist {
        if p.remaining_ms > 0 {
            may_change.push(format!("the client's persistence entry lapses in {} s unless it opens a new flow", p.remaining_ms / 1000));
        }
    }
    let hash = match algo {
        Some(Algo::Maglev) => Some(match o.vip.filter(|v| v.hashes_dst_port()) {
            Some(v) => format!("{:#010x} (destination port)", maglev_hash(&v, &key)),
            None => format!("{:#010x} (5-tuple)", flow_hash(&key)),
        }),
        Some(Algo::SourceHash) => Some(format!("{:#010x} (client address)", src_hash(&key))),
        _ => None,
    };
    Ok(Explanation {
        vip: vip.to_string(),
        served_by: served.map(|(v, _)| v.to_string()),
        lookup: o.lookup,
        client: client.to_string(),
        algo: algo.map(|a| a.name().to_string()),
        hash,
        table_size: o.vip.map(|v| v.ring_size).unwrap_or(0),
        table_index: o.ring.map(|r| r.index),
        table_backend: o.ring.map(|r| backend_ref(agent, r.id, &r.backend)),
        conntrack_set: o.ct_set,
        conntrack_entry: o.ct.map(|c| EntryShown {
            way: c.way,
            backend: backend_ref(agent, c.entry.backend_id, &c.backend),
            generation: c.entry.gen,
            age_ms: c.age_ms,
            closed: c.entry.closed,
        }),
        persistence: o.persist.map(|p| PersistShown {
            backend: backend_ref(agent, p.value.backend_id, &p.backend),
            remaining_s: p.remaining_ms / 1000,
        }),
        next_backend: shown(&next_packet).context("backend of the next packet")?,
        syn_backend: shown(&syn).context("backend of a SYN")?,
        next_packet,
        syn,
        may_change,
    })
}
