//! Keys and values of the maps (the algorithm and the routed-forwarding
//! types are in `algo` and `encap`). Layouts are fixed-size `#[repr(C)]` with
//! explicit padding fields, so keys compare byte for byte on both sides.

use crate::{Forward, FAMILY_V6};

/// An IP address as stored in keys: IPv4 in the first four bytes (network
/// order) and zeros after, IPv6 in all sixteen.
pub type Addr = [u8; 16];

/// An address as four 32-bit words (`u32::from_ne_bytes` of each four
/// bytes). A copy by value: in a `FlowKey` (4-aligned) the datapath reads
/// each word with one load; word-by-word `from_ne_bytes` lets LLVM's BPF
/// backend assemble some of them from single bytes.
#[inline(always)]
pub const fn addr_words(a: &Addr) -> [u32; 4] {
    // SAFETY: [u8; 16] and [u32; 4] have the same size, and every bit
    // pattern is a valid [u32; 4]; the value is copied (no alignment needed).
    unsafe { core::mem::transmute::<Addr, [u32; 4]>(*a) }
}

/// The address whose `addr_words` are `w`.
#[inline(always)]
pub const fn addr_of_words(w: [u32; 4]) -> Addr {
    // SAFETY: as in `addr_words`, the other way round.
    unsafe { core::mem::transmute::<[u32; 4], Addr>(w) }
}

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

impl BackendInfo {
    /// The frame's new MACs (`dst_mac` then `src_mac`) as three 32-bit words
    /// in memory order: the datapath writes them with three stores.
    #[inline(always)]
    pub fn mac_words(&self) -> [u32; 3] {
        // SAFETY: `BackendInfo` is repr(C) and 4-aligned (u32 fields); its
        // first 12 bytes are `dst_mac` and `src_mac`, with no padding
        // (`layouts_have_no_implicit_padding`); every bit pattern is a
        // valid [u32; 3].
        unsafe { core::ptr::read(self as *const BackendInfo as *const [u32; 3]) }
    }
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
///
/// Aligned to 4 bytes (the layout is the same as without: every field is
/// at a multiple of 4 or inside one, and the size is 40): both addresses
/// then start on a 4-byte boundary, so the hashes read them as 32-bit
/// words with one load each, where LLVM's BPF backend (which emits no
/// misaligned loads) assembled most words from single bytes.
#[repr(C, align(4))]
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
    unsafe impl aya::Pod for crate::EncapConfig {}
    unsafe impl aya::Pod for crate::DecapKey {}
    unsafe impl aya::Pod for crate::QuicIdKey {}
    unsafe impl aya::Pod for super::TableLine {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn mac_words_and_mac_keys_from_words_are_the_bytes() {
        let b = BackendInfo { dst_mac: [1, 2, 3, 4, 5, 6], src_mac: [7, 8, 9, 10, 11, 12], flags: 0xffff, ..Default::default() };
        let w = b.mac_words();
        let bytes: [u8; 12] = core::array::from_fn(|i| w[i / 4].to_ne_bytes()[i % 4]);
        assert_eq!(bytes, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        // A frame's first eight bytes: destination MAC, two of the source's.
        let frame = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55, 0xaa, 0xbb];
        let word = |i: usize| u32::from_ne_bytes([frame[i], frame[i + 1], frame[i + 2], frame[i + 3]]);
        assert_eq!(crate::mac_key_of_words(word(0), word(4)), crate::mac_key(&[0x02, 0x11, 0x22, 0x33, 0x44, 0x55]));
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
    /// A change here changes the pinned maps' layout: bump `LAYOUT_VERSION`
    /// (a restarted agent then starts fresh tables instead of misreading them).
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<VipKey>(), 20);
        assert_eq!(size_of::<PrefixKey>(), 20);
        assert_eq!(size_of::<VipInfo>(), 16);
        assert_eq!(size_of::<BackendInfo>(), 44);
        // `mac_words` reads the two MACs as the first three aligned words.
        assert_eq!(core::mem::align_of::<BackendInfo>(), 4);
        assert_eq!((core::mem::offset_of!(BackendInfo, src_mac), core::mem::offset_of!(BackendInfo, flags)), (6, 12));
        assert_eq!(size_of::<crate::EncapConfig>(), 32);
        assert_eq!(size_of::<crate::DecapKey>(), 20);
        assert_eq!(size_of::<FlowKey>(), 40);
        // 4-aligned for word loads, the same bytes where they always were.
        assert_eq!(core::mem::align_of::<FlowKey>(), 4);
        assert_eq!((core::mem::offset_of!(FlowKey, sport_be), core::mem::offset_of!(FlowKey, vip)), (16, 20));
        assert_eq!(size_of::<crate::CtSet>(), 64);
        assert_eq!(size_of::<Counters>(), 24);
        assert_eq!(size_of::<PersistKey>(), 20);
        assert_eq!(size_of::<PersistValue>(), 16);
        assert_eq!(size_of::<crate::QuicIdKey>(), 8);
    }
}
