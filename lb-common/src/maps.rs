//! Keys and values of every map. Layouts are fixed-size `#[repr(C)]` with
//! explicit padding fields, so keys compare byte for byte on both sides.

use crate::FAMILY_V6;

/// An IP address as stored in keys: IPv4 in the first four bytes (network
/// order) and zeros after, IPv6 in all sixteen.
pub type Addr = [u8; 16];

/// Build an `Addr` from an IPv4 address in network byte order.
#[inline(always)]
pub const fn addr_v4(octets: [u8; 4]) -> Addr {
    // Two 8-byte words rather than a zeroed byte array: LLVM's BPF backend
    // zeroes the latter with a call to a `memset` subprogram (a BPF-to-BPF
    // call and return on every IPv4 packet).
    let lo = u64::from_ne_bytes([octets[0], octets[1], octets[2], octets[3], 0, 0, 0, 0]);
    // SAFETY: [u64; 2] and [u8; 16] have the same size, and every bit
    // pattern is a valid [u8; 16].
    unsafe { core::mem::transmute::<[u64; 2], Addr>([lo, 0]) }
}

/// Key of the VIP map: the virtual service (address, port, protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct VipKey {
    /// Virtual IP address (see `Addr`).
    pub addr: Addr,
    /// Destination port in network byte order.
    pub port_be: u16,
    /// IP protocol (`PROTO_TCP` or `PROTO_UDP`).
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
}

/// Key data of the prefix-VIP trie (`XLB_VIP_PREFIX`, an LPM trie): the
/// first `PREFIX_KEY_FIXED_BITS` bits (family, protocol, port) always
/// match exactly, then the address's first bits up to the VIP's prefix
/// length. The same keys as `VipKey` (any-port, fragment alias, echo
/// entries) with the address last, as a trie needs it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PrefixKey {
    /// `VipKey::family` (with `KEY_ANY_PORT` for any-port VIPs).
    pub family: u8,
    /// `VipKey::proto`.
    pub proto: u8,
    /// `VipKey::port_be`.
    pub port_be: u16,
    /// The address (a VIP's network address in entries).
    pub addr: Addr,
}

/// Bits of a `PrefixKey` before its address (matched by every entry).
pub const PREFIX_KEY_FIXED_BITS: u32 = 32;

impl PrefixKey {
    /// The trie key data of a `VipKey`.
    #[inline(always)]
    pub const fn of(k: &VipKey) -> PrefixKey {
        PrefixKey { family: k.family, proto: k.proto, port_be: k.port_be, addr: k.addr }
    }

    /// Trie prefix length of an entry whose address has `addr_bits` bits
    /// of prefix (a lookup uses the family's full length).
    #[inline(always)]
    pub const fn bits(addr_bits: u32) -> u32 {
        PREFIX_KEY_FIXED_BITS + addr_bits
    }

    /// The `VipKey` this trie key data came from.
    #[inline(always)]
    pub const fn vip_key(&self) -> VipKey {
        VipKey { addr: self.addr, port_be: self.port_be, proto: self.proto, family: self.family }
    }
}

/// Scheduling algorithm of a VIP, as stored in `VipInfo::algo`. It picks
/// the backend of a *new* flow; the connection table keeps it there.
///
/// What the VIP's ring slot holds depends on the algorithm: a weighted Maglev
/// table (`Maglev`, `Random`, `SourceHash`) or a sequence of backend ids
/// (`RoundRobin`, `WeightedRoundRobin`, `LeastConn`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Algo {
    /// Weighted Maglev consistent hashing over the 5-tuple (the default).
    Maglev = 0,
    /// Rotation; a backend of weight w takes w consecutive turns per cycle.
    RoundRobin = 1,
    /// Smooth weighted rotation (turns interleaved, as nginx does).
    WeightedRoundRobin = 2,
    /// Uniform random index into the weighted Maglev table.
    Random = 3,
    /// Maglev over the client address only (optionally with persistence).
    SourceHash = 4,
    /// Fewest active flows relative to weight.
    LeastConn = 5,
}

impl core::fmt::Display for Algo {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

impl Algo {
    /// Every algorithm.
    pub const ALL: [Algo; 6] = [
        Algo::Maglev,
        Algo::RoundRobin,
        Algo::WeightedRoundRobin,
        Algo::Random,
        Algo::SourceHash,
        Algo::LeastConn,
    ];

    /// Decode a stored algorithm byte.
    pub const fn from_u8(v: u8) -> Option<Algo> {
        match v {
            0 => Some(Algo::Maglev),
            1 => Some(Algo::RoundRobin),
            2 => Some(Algo::WeightedRoundRobin),
            3 => Some(Algo::Random),
            4 => Some(Algo::SourceHash),
            5 => Some(Algo::LeastConn),
            _ => None,
        }
    }

    /// Whether the ring holds a Maglev table (else a sequence of ids).
    pub const fn uses_maglev_table(self) -> bool {
        matches!(self, Algo::Maglev | Algo::Random | Algo::SourceHash)
    }

    /// Whether the choice for a given flow is a pure function of the flow
    /// and the table (so it can be recomputed, e.g. for ICMP errors).
    pub const fn is_hash(self) -> bool {
        matches!(self, Algo::Maglev | Algo::SourceHash)
    }

    /// The algorithm an operator names (`name`'s inverse), if any.
    pub fn from_name(s: &str) -> Option<Algo> {
        let mut i = 0;
        while i < Algo::ALL.len() {
            if Algo::ALL[i].name().as_bytes() == s.as_bytes() {
                return Some(Algo::ALL[i]);
            }
            i += 1;
        }
        None
    }

    /// Name used on the command line, in config and state files and in status.
    pub const fn name(self) -> &'static str {
        match self {
            Algo::Maglev => "maglev",
            Algo::RoundRobin => "rr",
            Algo::WeightedRoundRobin => "wrr",
            Algo::Random => "random",
            Algo::SourceHash => "source-hash",
            Algo::LeastConn => "least-conn",
        }
    }
}

/// Most backends a least-conn VIP may have (the datapath scans them all).
pub const MAX_LEAST_CONN_BACKENDS: u32 = 256;

/// Value of the VIP map: where this service's lookup table is and how to use it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipInfo {
    /// The VIP's id: index into `XLB_RR`, and the `vip_id` of its backends.
    pub vip_id: u32,
    /// Slot of this VIP's table in `XLB_TABLES` (meaningful when
    /// `ring_size` > 0).
    pub table_slot: u32,
    /// Number of entries of the table (a prime); 0 means no usable backend.
    pub ring_size: u32,
    /// `Algo` as a byte.
    pub algo: u8,
    /// `VIP_F_*` flags.
    pub flags: u8,
    /// Source-hash persistence in seconds (0 = none).
    pub persist_secs: u16,
}

/// `VipInfo::flags`: Maglev hashes the destination port only
/// (`hash::dst_port_hash`): every client of one port gets one backend.
pub const VIP_F_HASH_DST_PORT: u8 = 1;
/// `VipInfo::flags`: ICMP/ICMPv6 echo requests to the VIP's address are
/// answered by the datapath (only on the address's echo entry,
/// `VipKey::echo`).
pub const VIP_F_ANSWER_PING: u8 = 2;
/// `VipInfo::flags`: a QUIC service (UDP): packets whose destination
/// connection ID carries a server ID go to its backend (`quic`).
pub const VIP_F_QUIC: u8 = 4;

/// `VipKey::family` bit of an any-port VIP's entry (`ADDR:*/PROTO`): its
/// key has port 0 and this bit, so it differs from the fragment alias
/// (port 0, plain family).
pub const KEY_ANY_PORT: u8 = 0x80;

/// IP protocol number of ICMP (the protocol of a VIP address's echo entry).
pub const PROTO_ICMP: u8 = 1;
/// IP protocol number of ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;
/// How frames reach a backend (`BackendInfo::forward`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Forward {
    /// L2 direct server return: only the MACs change (same segment).
    #[default]
    L2 = 0,
    /// IP-in-IP: IPv4 or IPv6 outer header (the backend's family) around the
    /// client's packet (IPv4-in-IPv4 proto 4, IPv6-in-IPv6 and IPv4-in-IPv6
    /// next header 41/4, IPv6-in-IPv4 proto 41); next hop from the kernel FIB.
    Ipip = 1,
    /// GUE variant 1 (the inner IP packet directly after a UDP header, to
    /// the GUE port): as `Ipip`, with the UDP source port varying per flow.
    Gue = 2,
}

impl Forward {
    /// Every mode.
    pub const ALL: [Forward; 3] = [Forward::L2, Forward::Ipip, Forward::Gue];

    /// Decode a stored byte.
    pub const fn from_u8(v: u8) -> Option<Forward> {
        match v {
            0 => Some(Forward::L2),
            1 => Some(Forward::Ipip),
            2 => Some(Forward::Gue),
            _ => None,
        }
    }

    /// Name on the command line, in config and state files and in status.
    pub const fn name(self) -> &'static str {
        match self {
            Forward::L2 => "l2",
            Forward::Ipip => "ipip",
            Forward::Gue => "gue",
        }
    }

    /// The mode an operator names (`name`'s inverse), if any.
    pub fn from_name(s: &str) -> Option<Forward> {
        Forward::ALL.into_iter().find(|f| f.name() == s)
    }

    /// Reaches its backend through a router (an outer IP header).
    pub const fn is_routed(self) -> bool {
        !matches!(self, Forward::L2)
    }
}

impl core::fmt::Display for Forward {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// Default UDP destination port of GUE encapsulation (`--gue-port`).
pub const DEFAULT_GUE_PORT: u16 = 6080;
/// TTL / hop limit of outer headers (RFC 2003 §3.1: the inner TTL is not
/// touched; the outer one is a fresh default).
pub const ENCAP_TTL: u8 = 64;

/// `EncapConfig::flags`: an IPv4 source prefix is configured.
pub const ENCAP_F_SRC4: u8 = 1;
/// `EncapConfig::flags`: an IPv6 source prefix is configured.
pub const ENCAP_F_SRC6: u8 = 2;

/// The one entry of `XLB_ENCAP`: outer source addresses and the GUE port,
/// shared by the balancer (encapsulation) and `xlb decap`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EncapConfig {
    /// IPv6 source prefix (its host bits are replaced by the flow hash).
    pub src6: Addr,
    /// IPv4 source prefix, network order.
    pub src4: [u8; 4],
    /// Bits of the IPv4 source's last 32 bits taken from the flow hash.
    pub vary4: u32,
    /// Bits of the IPv6 source's last 32 bits taken from the flow hash.
    pub vary6: u32,
    /// GUE destination port, network order.
    pub gue_port_be: u16,
    /// `ENCAP_F_*`.
    pub flags: u8,
    /// Outer TTL / hop limit.
    pub ttl: u8,
}

impl EncapConfig {
    /// The outer IPv4 source for a flow hash: the prefix with its host bits
    /// from the hash (so routers' ECMP spreads flows), network order.
    #[inline(always)]
    pub fn source4(&self, hash: u32) -> [u8; 4] {
        let base = u32::from_be_bytes(self.src4);
        ((base & !self.vary4) | (hash & self.vary4)).to_be_bytes()
    }

    /// The outer IPv6 source for a flow hash (host bits in the last 32).
    #[inline(always)]
    pub fn source6(&self, hash: u32) -> Addr {
        let mut a = self.src6;
        let base = u32::from_be_bytes([a[12], a[13], a[14], a[15]]);
        let w = ((base & !self.vary6) | (hash & self.vary6)).to_be_bytes();
        a[12] = w[0];
        a[13] = w[1];
        a[14] = w[2];
        a[15] = w[3];
        a
    }
}

/// The GUE UDP source port for a flow hash: in 49152..=65535, varying per
/// flow (routers hash it for ECMP).
#[inline(always)]
pub const fn gue_source_port(hash: u32) -> u16 {
    0xc000 | (hash & 0x3fff) as u16
}

/// Key of `XLB_DECAP_VIPS`: an inner destination `xlb decap` accepts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct DecapKey {
    /// The VIP address (see `Addr`).
    pub addr: Addr,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// Explicit padding.
    pub _pad: [u8; 3],
}

/// Value of the backend array: what the datapath needs to forward to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendInfo {
    /// The backend's MAC: the rewritten destination MAC.
    pub dst_mac: [u8; 6],
    /// The balancer interface's MAC: the rewritten source MAC.
    pub src_mac: [u8; 6],
    /// `BACKEND_F_*` flags.
    pub flags: u16,
    /// Generation of this id: bumped whenever the id is given to another
    /// backend, so connection-table entries of a former owner are ignored.
    pub gen: u16,
    /// Weight (least-conn compares active flows relative to it).
    pub weight: u32,
    /// Id of the VIP this backend serves (checked on connection-table hits).
    pub vip_id: u32,
    /// The backend's address (outer destination when routed; see `Addr`).
    pub addr: Addr,
    /// `Forward` as a byte.
    pub forward: u8,
    /// Family of `addr` (`FAMILY_V4` or `FAMILY_V6`): the outer header's.
    pub family: u8,
    /// Explicit padding.
    pub _pad: u16,
}

/// `BackendInfo::flags`: the backend may carry traffic (healthy, or draining).
/// A connection-table entry pointing at a backend without it is re-balanced.
pub const BACKEND_F_ALIVE: u16 = 1;

impl VipKey {
    /// The VIP map's key for IP fragments to this address and protocol
    /// (they carry no ports): port 0, which no VIP may have.
    #[inline(always)]
    pub const fn fragment_alias(mut self) -> VipKey {
        self.port_be = 0;
        self.family &= !KEY_ANY_PORT;
        self
    }

    /// The key of the any-port VIP (`ADDR:*/PROTO`) of this address and
    /// protocol: looked up after the exact key misses, only where the
    /// pre-filter says the address has one (`VIP_FILTER_ANY_PORT`).
    #[inline(always)]
    pub const fn any_port(mut self) -> VipKey {
        self.port_be = 0;
        self.family |= KEY_ANY_PORT;
        self
    }

    /// Whether this is an any-port VIP's key.
    #[inline(always)]
    pub const fn is_any_port(&self) -> bool {
        self.family & KEY_ANY_PORT != 0
    }

    /// The family without the any-port bit (`FAMILY_V4` or `FAMILY_V6`).
    #[inline(always)]
    pub const fn plain_family(&self) -> u8 {
        self.family & !KEY_ANY_PORT
    }

    /// The echo entry of this VIP's address: port 0, protocol ICMP (IPv4)
    /// or ICMPv6, present while some VIP of the address answers pings.
    /// Its key is what the parser makes of an echo request.
    #[inline(always)]
    pub const fn echo(mut self) -> VipKey {
        self.port_be = 0;
        self.family &= !KEY_ANY_PORT;
        self.proto = if self.family == FAMILY_V6 { PROTO_ICMPV6 } else { PROTO_ICMP };
        self
    }

    /// Whether this is a fragment alias key: a frame with destination port
    /// 0 is never VIP traffic, only fragments are looked up under it.
    #[inline(always)]
    pub const fn is_fragment_alias(&self) -> bool {
        self.port_be == 0
    }
}

impl BackendInfo {
    /// May carry traffic (healthy, or draining).
    #[inline(always)]
    pub const fn is_alive(&self) -> bool {
        self.flags & BACKEND_F_ALIVE != 0
    }

    /// Is still the backend a table entry of generation `gen` was made for.
    #[inline(always)]
    pub const fn is_gen(&self, gen: u16) -> bool {
        self.gen == gen
    }

    /// Reached through a router (encapsulated), not by MAC rewrite.
    #[inline(always)]
    pub const fn is_routed(&self) -> bool {
        self.forward != Forward::L2 as u8
    }

    /// May keep a flow of VIP `vip_id` pinned to it at generation `gen`.
    #[inline(always)]
    pub const fn keeps(&self, gen: u16, vip_id: u32) -> bool {
        self.is_gen(gen) && self.is_alive() && self.vip_id == vip_id
    }
}

impl VipInfo {
    /// Has a table to schedule with (some usable backend).
    #[inline(always)]
    pub const fn has_backends(&self) -> bool {
        self.ring_size != 0
    }

    /// Maglev over the destination port only (`--hash dst-port`).
    #[inline(always)]
    pub const fn hashes_dst_port(&self) -> bool {
        self.flags & VIP_F_HASH_DST_PORT != 0
    }

    /// Echo requests to the address are answered (`--answer-ping`).
    #[inline(always)]
    pub const fn answers_ping(&self) -> bool {
        self.flags & VIP_F_ANSWER_PING != 0
    }

    /// Routed by QUIC connection ID (`--quic`).
    #[inline(always)]
    pub const fn is_quic(&self) -> bool {
        self.flags & VIP_F_QUIC != 0
    }
}

/// Key of the connection table: the flow's 5-tuple as the client sent it.
/// The destination half is a `VipKey`, so the VIP lookup borrows it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    /// Source (client) address.
    pub src: Addr,
    /// Source port, network byte order (0 for port-less protocols).
    pub sport_be: u16,
    /// Explicit padding.
    pub _pad: u16,
    /// Destination: the VIP's address, port, protocol and family.
    pub vip: VipKey,
}

impl FlowKey {
    /// An IPv4 flow (addresses in network order, ports in network order).
    #[inline(always)]
    pub fn v4(src: [u8; 4], sport_be: u16, dst: [u8; 4], dport_be: u16, proto: u8) -> FlowKey {
        FlowKey {
            src: addr_v4(src),
            sport_be,
            _pad: 0,
            vip: VipKey { addr: addr_v4(dst), port_be: dport_be, proto, family: crate::FAMILY_V4 },
        }
    }

    /// An IPv6 flow.
    #[inline(always)]
    pub fn v6(src: Addr, sport_be: u16, dst: Addr, dport_be: u16, proto: u8) -> FlowKey {
        FlowKey { src, sport_be, _pad: 0, vip: VipKey { addr: dst, port_be: dport_be, proto, family: FAMILY_V6 } }
    }

    /// Whether the addresses are IPv6.
    #[inline(always)]
    pub fn is_v6(&self) -> bool {
        self.vip.family == FAMILY_V6
    }

    /// Number of address bytes that carry information for this family.
    #[inline(always)]
    pub fn addr_len(&self) -> usize {
        if self.is_v6() {
            16
        } else {
            4
        }
    }
}

/// Key of the persistence table (source-hash VIPs with a timeout).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PersistKey {
    /// Client address.
    pub src: Addr,
    /// VIP id.
    pub vip_id: u32,
}

/// Value of the persistence table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PersistValue {
    /// Backend the client is kept on.
    pub backend_id: u32,
    /// Its generation.
    pub gen: u16,
    /// Explicit padding.
    pub _pad: u16,
    /// Monotonic time (ns, `bpf_ktime_get_ns`) after which the entry lapses.
    pub expires_ns: u64,
}

/// Per-VIP and per-backend traffic counters (per CPU; userspace sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counters {
    /// Packets forwarded.
    pub packets: u64,
    /// Bytes forwarded (whole frames).
    pub bytes: u64,
    /// New flows (connection-table misses that chose a backend).
    pub new_flows: u64,
}

/// The global counters of one CPU: `XLB_STATS` has exactly one entry of
/// this type, indexed by `Stat`, so a packet pays one map lookup for all of them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatBlock {
    /// Counter values, indexed by `Stat as usize`.
    pub c: [u64; crate::stats::STAT_COUNT as usize],
}

impl Counters {
    /// Add another CPU's counters to these.
    pub fn add(&mut self, o: &Counters) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.new_flows += o.new_flows;
    }
}

/// Table entries (backend ids) per element of a table map. An array's
/// values are 8-byte aligned, so one `u32` per element took 8 bytes; 16 per
/// element fill one 64-byte line: a table is half the memory, and half the
/// bytes to write when it is published.
pub const TABLE_LANES: u32 = 16;

/// One element of a VIP's table map: entries `16 k … 16 k + 15`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableLine(pub [u32; TABLE_LANES as usize]);

impl TableLine {
    /// Element of the table that holds entry `i`.
    #[inline(always)]
    pub const fn element(i: u32) -> u32 {
        i / TABLE_LANES
    }

    /// Entry `i` of the table, from its element (`element(i)`).
    #[inline(always)]
    pub fn entry(&self, i: u32) -> u32 {
        self.0[(i % TABLE_LANES) as usize]
    }

    /// A line whose every entry is `id`.
    pub const fn filled(id: u32) -> TableLine {
        TableLine([id; TABLE_LANES as usize])
    }

    /// `table` cut into lines, the last one padded with entry 0 (never
    /// read: the datapath takes entries below the table's size only).
    pub fn lines(table: &[u32]) -> impl Iterator<Item = TableLine> + '_ {
        table.chunks(TABLE_LANES as usize).map(|c| {
            let mut l = TableLine::filled(0);
            l.0[..c.len()].copy_from_slice(c);
            l
        })
    }

    /// Elements of a table of `entries` entries.
    pub const fn elements(entries: u32) -> u32 {
        entries.div_ceil(TABLE_LANES)
    }

    /// Bytes of the values of a table of `entries` entries.
    pub const fn bytes(entries: u32) -> u64 {
        Self::elements(entries) as u64 * core::mem::size_of::<TableLine>() as u64
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, with explicit padding and no
    // invalid bit patterns, which is what `aya::Pod` requires.
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::PrefixKey {}
    unsafe impl aya::Pod for super::VipInfo {}
    unsafe impl aya::Pod for super::BackendInfo {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::PersistKey {}
    unsafe impl aya::Pod for super::PersistValue {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::StatBlock {}
    unsafe impl aya::Pod for crate::CtSet {}
    unsafe impl aya::Pod for crate::ct::CtClock {}
    unsafe impl aya::Pod for super::EncapConfig {}
    unsafe impl aya::Pod for super::DecapKey {}
    unsafe impl aya::Pod for crate::QuicIdKey {}
    unsafe impl aya::Pod for super::TableLine {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn forward_names_round_trip_and_sources_vary_only_host_bits() {
        for f in Forward::ALL {
            assert_eq!(Forward::from_name(f.name()), Some(f));
            assert_eq!(Forward::from_u8(f as u8), Some(f));
        }
        assert_eq!(Forward::from_name("IPIP"), None);
        let c = EncapConfig { src4: [10, 9, 0, 0], vary4: 0xff, src6: [0xfd; 16], vary6: 0xffff, ..Default::default() };
        assert_eq!(c.source4(0x1234_5678), [10, 9, 0, 0x78]);
        let s6 = c.source6(0x1234_5678);
        assert_eq!(&s6[..14], &[0xfd; 14]);
        assert_eq!(&s6[14..], &[0x56, 0x78]);
        assert!(gue_source_port(0) >= 0xc000 && gue_source_port(u32::MAX) >= 0xc000);
        assert_ne!(gue_source_port(1), gue_source_port(2));
    }

    #[test]
    fn a_table_line_is_one_cache_line_of_sixteen_entries() {
        assert_eq!(size_of::<TableLine>(), 64);
        assert_eq!((TableLine::elements(65537), TableLine::bytes(65537)), (4097, 4097 * 64));
        assert_eq!((TableLine::elements(16), TableLine::elements(17), TableLine::elements(1)), (1, 2, 1));
        let mut l = TableLine([0; 16]);
        l.0[5] = 9;
        assert_eq!((TableLine::element(16 * 3 + 5), l.entry(16 * 3 + 5)), (3, 9));
        let t: [u32; 18] = core::array::from_fn(|i| i as u32 + 1);
        let mut lines = TableLine::lines(&t);
        assert_eq!(lines.next().map(|l| l.entry(15)), Some(16));
        assert_eq!(lines.next().map(|l| (l.entry(16), l.entry(17), l.entry(18))), Some((17, 18, 0)));
        assert!(lines.next().is_none());
    }

    #[test]
    fn algo_names_round_trip() {
        for a in Algo::ALL {
            assert_eq!(Algo::from_name(a.name()), Some(a));
        }
        assert_eq!(Algo::from_name("Maglev"), None);
        assert_eq!(Algo::from_name(""), None);
    }

    #[test]
    /// A change here changes the pinned maps' layout: bump `LAYOUT_VERSION`
    /// (a restarted agent then starts fresh tables instead of misreading them).
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<VipKey>(), 20);
        assert_eq!(size_of::<PrefixKey>(), 20);
        assert_eq!(size_of::<VipInfo>(), 16);
        assert_eq!(size_of::<BackendInfo>(), 44);
        assert_eq!(size_of::<EncapConfig>(), 32);
        assert_eq!(size_of::<DecapKey>(), 20);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<crate::CtSet>(), 64);
        assert_eq!(size_of::<Counters>(), 24);
        assert_eq!(size_of::<PersistKey>(), 20);
        assert_eq!(size_of::<PersistValue>(), 16);
        assert_eq!(size_of::<crate::QuicIdKey>(), 8);
    }
}
