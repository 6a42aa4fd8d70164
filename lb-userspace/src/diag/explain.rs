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

/// A connection-table entry found for the flow.
#[derive(Clone, Copy, Debug)]
pub struct CtSeen {
    /// Way of its set.
    pub way: usize,
    /// What it says.
    pub entry: CtEntry,
    /// Milliseconds since the datapath last saw the flow (16.8 ms steps).
    pub age_ms: u64,
    /// The backend entry it names, as it is now.
    pub backend: BackendInfo,
}

/// A persistence entry found for the client.
#[derive(Clone, Copy, Debug)]
pub struct PersistSeen {
    /// The entry.
    pub value: PersistValue,
    /// Milliseconds until it lapses (negative: lapsed).
    pub remaining_ms: i64,
    /// The backend entry it names, as it is now.
    pub backend: BackendInfo,
}

/// The ring entry a hash algorithm picks for the flow.
#[derive(Clone, Copy, Debug)]
pub struct RingSeen {
    /// Index in the VIP's table.
    pub index: u32,
    /// Backend id there.
    pub id: u32,
    /// Its entry.
    pub backend: BackendInfo,
}

/// Which of the datapath's VIP lookups found the flow's VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Lookup {
    /// The destination's own `ADDR:PORT/PROTO` entry.
    Exact,
    /// The address's any-port VIP (`ADDR:*/PROTO`): no exact entry.
    AnyPort,
    /// The most specific prefix VIP containing the address (with the port,
    /// else any-port): no exact or any-port entry.
    Prefix,
}

impl Lookup {
    fn why(self) -> &'static str {
        match self {
            Lookup::Exact => "its exact entry",
            Lookup::AnyPort => "no exact entry; the address's any-port VIP",
            Lookup::Prefix => "no exact or any-port entry; the most specific prefix VIP (its port before any-port)",
        }
    }
}

/// What the datapath's maps hold for one flow, read at one moment.
#[derive(Clone, Copy, Debug)]
pub struct Observed {
    /// The VIP entry (None: not a VIP).
    pub vip: Option<VipInfo>,
    /// Which lookup found it.
    pub lookup: Option<Lookup>,
    /// The flow's connection-table set (None: no client port given).
    pub ct_set: Option<u32>,
    /// The entry in that set whose signature matches the flow.
    pub ct: Option<CtSeen>,
    /// Source-hash persistence entry.
    pub persist: Option<PersistSeen>,
    /// The ring entry the VIP's hash picks (hash algorithms).
    pub ring: Option<RingSeen>,
}

/// Which state decided the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Via {
    /// The flow's connection-table entry.
    ConnectionTable,
    /// The client's persistence entry (source-hash with a timeout).
    Persistence,
    /// The VIP's published table at the flow's hash.
    Table,
}

/// What the datapath does with the flow's next packet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The verdict counter it increments (`forwarded`, `drop_no_backend`, …);
    /// None when the algorithm's choice is not a function of the flow.
    pub verdict: Option<String>,
    /// Backend id it goes to (forwarded).
    pub backend_id: Option<u32>,
    /// Which state decided.
    pub via: Option<Via>,
    /// Why, in one sentence.
    pub why: String,
}

impl Decision {
    fn forward(id: u32, via: Via, why: String) -> Decision {
        Decision { verdict: Some(Stat::Forwarded.name().into()), backend_id: Some(id), via: Some(via), why }
    }
    fn verdict(stat: Stat, why: String) -> Decision {
        Decision { verdict: Some(stat.name().into()), backend_id: None, via: None, why }
    }
}

/// Why a connection-table entry is not used, or None when it is.
fn entry_unused(ct: &CtSeen, syn: bool) -> Option<String> {
    let e = &ct.entry;
    if !ct.backend.is_gen(e.gen) {
        Some(format!(
            "its entry names backend id {} of generation {}, which now belongs to another backend (generation {}): re-scheduled (conntrack_stale)",
            e.backend_id, e.gen, ct.backend.gen
        ))
    } else if !ct.backend.is_alive() {
        Some(format!("its entry's backend id {} is not alive (down or in maintenance): re-scheduled (conntrack_stale)", e.backend_id))
    } else if syn {
        Some("a pure SYN on a known 5-tuple is a new connection: scheduled afresh (conntrack_syn_reuse)".into())
    } else {
        None
    }
}

/// The datapath's decision for the flow's next packet (a pure SYN when
/// `syn`), from what `observe` read. Mirrors `lb-ebpf`: the connection
/// table first (a live backend of the entry's generation keeps the flow),
/// then the VIP's algorithm.
pub fn decide(o: &Observed, syn: bool) -> Decision {
    let mut replaced = None;
    if let Some(ct) = &o.ct {
        match entry_unused(ct, syn) {
            None => {
                let closed = if ct.entry.closed { " (closed by FIN/RST: its last packets still go there)" } else { "" };
                return Decision::forward(
                    ct.entry.backend_id,
                    Via::ConnectionTable,
                    format!("its connection-table entry names a live backend of the entry's generation{closed}"),
                );
            }
            Some(why) => replaced = Some(why),
        }
    }
    let prefix = replaced.map(|w| format!("{w}; ")).unwrap_or_else(|| {
        if o.ct_set.is_some() { "no connection-table entry (a new flow); ".into() } else { String::new() }
    });
    let Some(vip) = o.vip else {
        return Decision::verdict(Stat::PassNotVip, format!("{prefix}not a VIP in the datapath: passed to the kernel"));
    };
    if !vip.has_backends() {
        return Decision::verdict(Stat::DropNoBackend, format!("{prefix}the VIP has no usable backend: dropped"));
    }
    let Some(algo) = Algo::from_u8(vip.algo) else {
        return Decision::verdict(Stat::DropBadBackend, format!("{prefix}the VIP entry has an unknown algorithm {}", vip.algo));
    };
    if algo == Algo::SourceHash && vip.persist_secs > 0 {
        if let Some(p) = &o.persist {
            if p.remaining_ms > 0 && p.backend.keeps(p.value.gen, vip.vip_id) {
                return Decision::forward(
                    p.value.backend_id,
                    Via::Persistence,
                    format!("{prefix}the client's persistence entry names a live backend ({} s left, renewed by each new flow)", p.remaining_ms / 1000),
                );
            }
        }
    }
    if !algo.is_hash() {
        let how = match algo {
            Algo::Random => "at random over the weighted table",
            Algo::LeastConn => "by fewest active flows per weight",
            _ => "by rotation (per CPU)",
        };
        return Decision {
            verdict: None,
            backend_id: None,
            via: None,
            why: format!("{prefix}the VIP's algorithm ({}) picks a new flow's backend {how}: not a function of the flow", algo.name()),
        };
    }
    match &o.ring {
        Some(r) if r.backend.is_alive() => Decision::forward(
            r.id,
            Via::Table,
            format!("{prefix}the VIP's published table ({}) at index {} names it", algo.name(), r.index),
        ),
        Some(r) => Decision::verdict(Stat::DropBadBackend, format!("{prefix}the table names backend id {}, which is not alive: dropped", r.id)),
        None => Decision::verdict(Stat::DropBadBackend, format!("{prefix}the table could not be read")),
    }
}

/// A backend as shown: its id and, when the agent knows it, address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendRef {
    /// Datapath id.
    pub id: u32,
    /// Address (None: the id belongs to no backend the agent knows).
    pub ip: Option<String>,
    /// Its generation now.
    pub generation: u16,
    /// May carry traffic now.
    pub alive: bool,
}

/// The flow's connection-table entry, as shown.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EntryShown {
    /// Way of the set.
    pub way: usize,
    /// Backend it names.
    pub backend: BackendRef,
    /// Generation recorded in the entry.
    pub generation: u16,
    /// Milliseconds since the flow was last seen.
    pub age_ms: u64,
    /// Closed by FIN/RST.
    pub closed: bool,
}

/// The client's persistence entry, as shown.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PersistShown {
    /// Backend it names.
    pub backend: BackendRef,
    /// Seconds left (negative: lapsed).
    pub remaining_s: i64,
}

/// Everything `xlb explain` says about one flow.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Explanation {
    /// The flow's destination, `ADDR:PORT/PROTO`.
    pub vip: String,
    /// The VIP serving it, as configured (`10.0.0.0/24:*/tcp`); None: not
    /// VIP traffic, or an entry the agent does not know.
    #[serde(default)]
    pub served_by: Option<String>,
    /// Which lookup found the VIP.
    #[serde(default)]
    pub lookup: Option<Lookup>,
    /// Client address and port.
    pub client: String,
    /// Algorithm of the VIP (as published), if it is one.
    pub algo: Option<String>,
    /// The 5-tuple hash (Maglev) or source hash (source-hash) used.
    pub hash: Option<String>,
    /// Entries of the VIP's published table (0: no usable backend).
    pub table_size: u32,
    /// What the table gives this flow now (hash algorithms).
    pub table_index: Option<u32>,
    /// The backend at that index.
    pub table_backend: Option<BackendRef>,
    /// The flow's connection-table set (None without a client port).
    pub conntrack_set: Option<u32>,
    /// The flow's entry there, if any.
    pub conntrack_entry: Option<EntryShown>,
    /// The client's persistence entry, if any.
    pub persistence: Option<PersistShown>,
    /// The flow's next packet (not a pure SYN).
    pub next_packet: Decision,
    /// A pure SYN on this 5-tuple (a new connection).
    pub syn: Decision,
    /// The backend of `next_packet`, shown.
    pub next_backend: Option<BackendRef>,
    /// The backend of `syn`, shown.
    pub syn_backend: Option<BackendRef>,
    /// When the answer may change.
    pub may_change: Vec<String>,
}

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

fn shown_backend(b: &Option<BackendRef>) -> String {
    match b {
        Some(b) => format!("{} (id {}{})", b.ip.as_deref().unwrap_or("?"), b.id, if b.alive { "" } else { ", not alive" }),
        None => "-".into(),
    }
}

fn shown_decision(d: &Decision, b: &Option<BackendRef>) -> String {
    let what = match (&d.verdict, b) {
        (Some(v), Some(_)) if v == Stat::Forwarded.name() => format!("→ {}", shown_backend(b)),
        (Some(v), _) => v.clone(),
        (None, _) => "unpredictable".into(),
    };
    format!("{what}: {}", d.why)
}

/// The explanation as lines for a terminal.
pub fn render(e: &Explanation) -> String {
    let mut out = format!("flow      {} → {} ({})\n", e.client, e.vip, e.algo.as_deref().unwrap_or("not a VIP"));
    if let (Some(v), Some(l)) = (&e.served_by, e.lookup) {
        out += &format!("vip       {v}: {}\n", l.why());
    }
    if let Some(h) = &e.hash {
        out += &format!("hash      {h}\n");
    }
    if let (Some(i), Some(b)) = (e.table_index, &e.table_backend) {
        out += &format!("table     entry {i} of {} → {}\n", e.table_size, shown_backend(&Some(b.clone())));
    } else if e.algo.is_some() && e.table_size == 0 {
        out += "table     empty (no usable backend)\n";
    }
    match (e.conntrack_set, &e.conntrack_entry) {
        (None, _) => out += "conntrack no client port given: not looked up\n",
        (Some(s), None) => out += &format!("conntrack set {s}: no entry for this flow\n"),
        (Some(s), Some(c)) => {
            out += &format!(
                "conntrack set {s} way {}: {} generation {}, seen {} ms ago{}\n",
                c.way,
                shown_backend(&Some(c.backend.clone())),
                c.generation,
                c.age_ms,
                if c.closed { ", closed" } else { "" }
            )
        }
    }
    if let Some(p) = &e.persistence {
        out += &format!("persist   {} for {} s more\n", shown_backend(&Some(p.backend.clone())), p.remaining_s);
    }
    out += &format!("next      {}\n", shown_decision(&e.next_packet, &e.next_backend));
    out += &format!("syn       {}\n", shown_decision(&e.syn, &e.syn_backend));
    for c in &e.may_change {
        out += &format!("may change: {c}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn be(gen: u16, alive: bool, vip_id: u32) -> BackendInfo {
        BackendInfo { flags: alive as u16, gen, vip_id, weight: 1, ..Default::default() }
    }

    fn vip(algo: Algo, ring_size: u32, persist_secs: u16) -> VipInfo {
        VipInfo { vip_id: 3, table_slot: 0, ring_size, algo: algo as u8, flags: 0, persist_secs }
    }

    fn ct(id: u32, gen: u16, b: BackendInfo) -> Option<CtSeen> {
        Some(CtSeen { way: 1, entry: CtEntry { backend_id: id, gen, closed: false }, age_ms: 5, backend: b })
    }

    fn ring(id: u32, b: BackendInfo) -> Option<RingSeen> {
        Some(RingSeen { index: 7, id, backend: b })
    }

    #[test]
    fn clients_parse_with_and_without_ports() {
        assert_eq!("192.0.2.7:4000".parse::<Client>().unwrap(), Client { ip: "192.0.2.7".parse().unwrap(), port: Some(4000) });
        assert_eq!("fd00::7".parse::<Client>().unwrap().port, None);
        assert_eq!("[fd00::7]:80".parse::<Client>().unwrap().to_string(), "[fd00::7]:80");
        assert!("192.0.2.7:0".parse::<Client>().is_err());
        assert!("nope".parse::<Client>().is_err());
        let v: Vip = "10.0.0.100:80/tcp".parse().unwrap();
        assert!(flow_key(&v, &"fd00::7".parse().unwrap()).is_err(), "mixed families");
    }

    #[test]
    fn a_live_entry_wins_over_the_table_except_for_a_syn() {
        let o = Observed { vip: Some(vip(Algo::Maglev, 13, 0)), lookup: Some(Lookup::Exact), ct_set: Some(1), ct: ct(4, 2, be(2, true, 3)), persist: None, ring: ring(5, be(0, true, 3)) };
        let d = decide(&o, false);
        assert_eq!((d.backend_id, d.via), (Some(4), Some(Via::ConnectionTable)));
        let s = decide(&o, true);
        assert_eq!((s.backend_id, s.via), (Some(5), Some(Via::Table)));
        assert!(s.why.contains("conntrack_syn_reuse"), "{}", s.why);
    }

    #[test]
    fn stale_entries_are_rescheduled() {
        for (b, word) in [(be(3, true, 3), "another backend"), (be(2, false, 3), "not alive")] {
            let o = Observed { vip: Some(vip(Algo::Maglev, 13, 0)), lookup: Some(Lookup::Exact), ct_set: Some(1), ct: ct(4, 2, b), persist: None, ring: ring(5, be(0, true, 3)) };
            let d = decide(&o, false);
            assert_eq!((d.backend_id, d.via), (Some(5), Some(Via::Table)));
            assert!(d.why.contains(word) && d.why.contains("conntrack_stale"), "{}", d.why);
        }
    }

    #[test]
    fn no_backend_drops_and_no_vip_passes() {
        let o = Observed { vip: Some(vip(Algo::Maglev, 0, 0)), lookup: Some(Lookup::Exact), ct_set: Some(1), ct: None, persist: None, ring: None };
        assert_eq!(decide(&o, false).verdict.as_deref(), Some("drop_no_backend"));
        let o = Observed { vip: None, ..o };
        assert_eq!(decide(&o, false).verdict.as_deref(), Some("pass_not_vip"));
        // A dead backend in the table (the agent never publishes one).
        let o = Observed { vip: Some(vip(Algo::Maglev, 13, 0)), lookup: Some(Lookup::Exact), ct_set: None, ct: None, persist: None, ring: ring(5, be(0, false, 3)) };
        assert_eq!(decide(&o, false).verdict.as_deref(), Some("drop_bad_backend"));
    }

    #[test]
    fn persistence_wins_while_valid() {
        let p = |ms, b| Some(PersistSeen { value: PersistValue { backend_id: 9, gen: 1, _pad: 0, expires_ns: 0 }, remaining_ms: ms, backend: b });
        let base = Observed { vip: Some(vip(Algo::SourceHash, 13, 60)), lookup: Some(Lookup::Exact), ct_set: None, ct: None, persist: None, ring: ring(5, be(0, true, 3)) };
        let d = decide(&Observed { persist: p(30_000, be(1, true, 3)), ..base }, false);
        assert_eq!((d.backend_id, d.via), (Some(9), Some(Via::Persistence)));
        for persist in [p(-1, be(1, true, 3)), p(30_000, be(2, true, 3)), p(30_000, be(1, true, 4))] {
            assert_eq!(decide(&Observed { persist, ..base }, false).backend_id, Some(5), "lapsed, reused id, other VIP");
        }
    }

    #[test]
    fn non_hash_algorithms_are_not_predicted() {
        for a in [Algo::RoundRobin, Algo::Random, Algo::LeastConn] {
            let o = Observed { vip: Some(vip(a, 3, 0)), lookup: Some(Lookup::Exact), ct_set: Some(1), ct: None, persist: None, ring: None };
            let d = decide(&o, false);
            assert_eq!((d.verdict, d.backend_id), (None, None));
        }
    }
}
