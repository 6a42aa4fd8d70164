//! The datapath's decision for one flow (`lb-ebpf` `steer`, `conntrack`,
//! `select`) redone in pure code over the values `observe` read.

use super::*;

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
    pub(super) fn why(self) -> &'static str {
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
