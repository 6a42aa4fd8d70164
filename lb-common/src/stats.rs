//! Global verdict and event counters (`XLB_STATS`, per CPU, indexed by `Stat`).
//!
//! Every frame the program sees increments exactly one *verdict* counter
//! (the first block below), so their sum is the number of frames processed.
//! The remaining counters record events on the way.

/// Index into `XLB_STATS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// XDP_TX: a VIP packet rewritten and sent to its backend.
    Forwarded = 0,
    /// XDP_PASS: not IPv4/IPv6 (ARP, LLDP, more than two VLAN tags, …).
    PassNotIp = 1,
    /// XDP_PASS: IP, but not addressed to a configured VIP (including ICMP
    /// errors whose embedded packet is not a VIP flow).
    PassNotVip = 2,
    /// XDP_PASS: a header is cut short (the kernel drops or handles it).
    PassTruncated = 3,
    /// XDP_PASS: a malformed IP header (IHL < 5, bad version, lengths).
    PassBadHeader = 4,
    /// XDP_PASS: a protocol xlb does not balance (ICMP other than the
    /// errors it steers, SCTP, …).
    PassOtherL4 = 5,
    /// XDP_PASS: more IPv6 extension headers than `MAX_IPV6_EXT_HEADERS`.
    PassExtHeaders = 6,
    /// XDP_DROP: a VIP packet whose service has no usable backend.
    DropNoBackend = 7,
    /// XDP_DROP: the selected backend entry was unusable (agent race).
    DropBadBackend = 8,
    /// XDP_ABORTED: the frame could not be rewritten (should never happen).
    Aborted = 9,
    /// XDP_PASS: VIP traffic in a frame addressed to another MAC (flooded
    /// unknown unicast, broadcast, multicast): only frames for this
    /// interface's MAC or an `--accept-mac` are balanced, so balancers
    /// sharing a segment never forward the same frame twice.
    PassOtherMac = 10,
    /// Event: connection-table hit that was used.
    CtHit = 11,
    /// Event: connection-table miss (a new flow was scheduled).
    CtMiss = 12,
    /// Event: a table entry pointed at a dead or replaced backend; re-scheduled.
    CtStale = 13,
    /// Event: inserting into the connection table failed.
    CtInsertFail = 14,
    /// Event: a TCP SYN reused the 5-tuple of a table entry; re-scheduled.
    CtSynReuse = 15,
    /// Event: a FIN or RST closed a table entry (no longer active).
    CtClosed = 16,
    /// Event: an ICMP error about a VIP flow was sent to the flow's backend.
    IcmpSteered = 17,
    /// Event: an IP fragment to a VIP address was forwarded (3-tuple hash).
    FragForwarded = 18,
    /// Event: source-hash persistence kept a client on its backend.
    PersistHit = 19,
    /// Event: a new flow took the way of an open entry (its set was full of
    /// open flows): that flow lost its entry before it ended.
    CtEvicted = 20,
    /// XDP_REDIRECT: a VIP packet encapsulated for a routed backend whose
    /// next hop (the kernel FIB's answer) is on another interface.
    Redirected = 21,
    /// XDP_DROP: a VIP packet for a routed backend the kernel FIB has no
    /// usable answer for (no route, no neighbour entry for the next hop yet,
    /// forwarding disabled on the interface), or no encapsulation source
    /// address of the backend's family, or a VLAN-tagged frame.
    DropNoRoute = 22,
    /// XDP_TX: a VIP packet too big for the path once encapsulated; an ICMP
    /// fragmentation-needed / ICMPv6 packet-too-big went back to the client.
    TooBig = 23,
    /// XDP_PASS (`xlb_decap`): an xlb-encapsulated packet for a local VIP,
    /// handed to the stack without its outer headers.
    Decapsulated = 24,
    /// XDP_PASS (`xlb_decap`): not a tunnel packet xlb's decap handles
    /// (left untouched).
    DecapNotTunnel = 25,
    /// XDP_PASS (`xlb_decap`): a tunnel packet whose inner destination is
    /// not one of the host's VIPs (`--vip`; left untouched).
    DecapNotLocal = 26,
    /// XDP_TX: an ICMP/ICMPv6 echo request to a VIP address with
    /// `--answer-ping`, answered by the datapath itself.
    EchoReplied = 27,
    /// Event (`--quic` VIPs, connection-table misses): the destination
    /// connection ID's server ID named a live backend of the VIP: sent there.
    QuicRouted = 28,
    /// Event: a server ID that no backend of the VIP has: scheduled by the
    /// VIP's algorithm.
    QuicUnknownId = 29,
    /// Event: a server ID whose backend cannot take traffic (down): scheduled
    /// by the VIP's algorithm.
    QuicFallback = 30,
    /// Event: a QUIC packet without a routable server ID (Initial or 0-RTT
    /// packet, unknown version, server ID 0, another config rotation,
    /// shorter than its connection ID): scheduled by the VIP's algorithm.
    QuicNoId = 31,
}

/// Number of `Stat` counters (the size of `StatBlock`).
pub const STAT_COUNT: u32 = 32;

/// Every counter, in index order.
pub const ALL: [Stat; STAT_COUNT as usize] = [
    Stat::Forwarded,
    Stat::PassNotIp,
    Stat::PassNotVip,
    Stat::PassTruncated,
    Stat::PassBadHeader,
    Stat::PassOtherL4,
    Stat::PassExtHeaders,
    Stat::DropNoBackend,
    Stat::DropBadBackend,
    Stat::Aborted,
    Stat::PassOtherMac,
    Stat::CtHit,
    Stat::CtMiss,
    Stat::CtStale,
    Stat::CtInsertFail,
    Stat::CtSynReuse,
    Stat::CtClosed,
    Stat::IcmpSteered,
    Stat::FragForwarded,
    Stat::PersistHit,
    Stat::CtEvicted,
    Stat::Redirected,
    Stat::DropNoRoute,
    Stat::TooBig,
    Stat::Decapsulated,
    Stat::DecapNotTunnel,
    Stat::DecapNotLocal,
    Stat::EchoReplied,
    Stat::QuicRouted,
    Stat::QuicUnknownId,
    Stat::QuicFallback,
    Stat::QuicNoId,
];

/// Counters that are verdicts (exactly one per frame), in index order.
pub fn verdicts() -> impl Iterator<Item = Stat> {
    ALL.into_iter().filter(|s| s.is_verdict())
}

impl Stat {
    /// A verdict (exactly one per frame), not an event. The match has no
    /// wildcard: a new counter must be classified here.
    pub const fn is_verdict(self) -> bool {
        match self {
            Stat::Forwarded
            | Stat::PassNotIp
            | Stat::PassNotVip
            | Stat::PassTruncated
            | Stat::PassBadHeader
            | Stat::PassOtherL4
            | Stat::PassExtHeaders
            | Stat::DropNoBackend
            | Stat::DropBadBackend
            | Stat::Aborted
            | Stat::PassOtherMac
            | Stat::Redirected
            | Stat::DropNoRoute
            | Stat::TooBig
            | Stat::Decapsulated
            | Stat::DecapNotTunnel
            | Stat::DecapNotLocal
            | Stat::EchoReplied => true,
            Stat::CtHit
            | Stat::CtMiss
            | Stat::CtStale
            | Stat::CtInsertFail
            | Stat::CtSynReuse
            | Stat::CtClosed
            | Stat::IcmpSteered
            | Stat::FragForwarded
            | Stat::PersistHit
            | Stat::CtEvicted
            | Stat::QuicRouted
            | Stat::QuicUnknownId
            | Stat::QuicFallback
            | Stat::QuicNoId => false,
        }
    }

    /// Stable snake_case name used in `xlb stats` and JSON output.
    pub const fn name(self) -> &'static str {
        match self {
            Stat::Forwarded => "forwarded",
            Stat::PassNotIp => "pass_not_ip",
            Stat::PassNotVip => "pass_not_vip",
            Stat::PassTruncated => "pass_truncated",
            Stat::PassBadHeader => "pass_bad_header",
            Stat::PassOtherL4 => "pass_other_l4",
            Stat::PassExtHeaders => "pass_ext_headers",
            Stat::DropNoBackend => "drop_no_backend",
            Stat::DropBadBackend => "drop_bad_backend",
            Stat::Aborted => "aborted",
            Stat::CtHit => "conntrack_hit",
            Stat::CtMiss => "conntrack_miss",
            Stat::CtStale => "conntrack_stale",
            Stat::CtInsertFail => "conntrack_insert_fail",
            Stat::CtSynReuse => "conntrack_syn_reuse",
            Stat::CtClosed => "conntrack_closed",
            Stat::IcmpSteered => "icmp_steered",
            Stat::FragForwarded => "frag_forwarded",
            Stat::PersistHit => "persist_hit",
            Stat::CtEvicted => "conntrack_evicted",
            Stat::PassOtherMac => "pass_other_mac",
            Stat::Redirected => "redirected",
            Stat::DropNoRoute => "drop_no_route",
            Stat::TooBig => "too_big",
            Stat::Decapsulated => "decapsulated",
            Stat::DecapNotTunnel => "pass_decap_not_tunnel",
            Stat::DecapNotLocal => "pass_decap_not_local",
            Stat::EchoReplied => "echo_replied",
            Stat::QuicRouted => "quic_routed",
            Stat::QuicUnknownId => "quic_unknown_id",
            Stat::QuicFallback => "quic_fallback",
            Stat::QuicNoId => "quic_no_id",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_index_order() {
        for (i, s) in ALL.iter().enumerate() {
            assert_eq!(*s as usize, i);
        }
        assert_eq!(verdicts().count(), Stat::PassOtherMac as usize + 1 + 7);
        assert!(verdicts().all(|v| v.name().starts_with("pass_")
            || v.name().starts_with("drop_")
            || matches!(v, Stat::Forwarded | Stat::Aborted | Stat::Redirected | Stat::TooBig | Stat::Decapsulated | Stat::EchoReplied)));
    }
}
