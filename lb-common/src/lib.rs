//! Types shared by the xlb XDP program (`lb-ebpf`) and its agent (`lb-userspace`).
//!
//! This crate is the single source of truth for every BPF map's name, key,
//! value and size limit, for the verdict counters, and for the flow hash
//! (the agent and the tests recompute it to predict the datapath's choices).
//! Everything is `#[repr(C)]`, padding is explicit so that keys hash the same
//! on both sides, and nothing allocates: it builds for `bpfel-unknown-none`.
#![no_std]
#![deny(missing_docs)]

pub mod algo;
pub mod ct;
pub mod encap;
pub mod hash;
pub mod maps;
pub mod quic;
pub mod stats;
pub mod trace;

pub use algo::*;
pub use ct::{CtEntry, CtHash, CtSeed, CtSet, CtWay, CT_WAYS};
pub use encap::*;
pub use maps::*;
pub use quic::QuicIdKey;
pub use stats::Stat;

/// Address family tag carried in keys (`AF_INET`).
pub const FAMILY_V4: u8 = 2;
/// Address family tag carried in keys (`AF_INET6`).
pub const FAMILY_V6: u8 = 10;

/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// Default size of a Maglev lookup table (a prime).
pub const DEFAULT_RING_SIZE: u32 = 65537;
/// Largest Maglev lookup table the agent accepts (a prime, like every ring size).
pub const MAX_RING_SIZE: u32 = 1_000_003;
/// Default number of virtual services (`--max-vips`): VIP ids and VIP-map
/// entries cost a few bytes each, so this is generous.
pub const DEFAULT_MAX_VIPS: u32 = 512;
/// Default number of VIPs that may have a table at once (`--max-tables`).
/// A table is its own map (`table_bytes(ring size)`, 256 KiB at the default
/// ring size), created when the VIP's table is published and reused or
/// freed once replaced: only the outer array (`XLB_TABLES`, 8 bytes a slot)
/// is sized by this when the agent loads.
pub const DEFAULT_MAX_TABLES: u32 = DEFAULT_MAX_VIPS;
/// Table slots beyond one per VIP: a new table is created in a free slot and
/// then published by one VIP-entry update, so no reader ever sees a
/// half-written table.
pub const SPARE_TABLE_SLOTS: u32 = 2;
/// `BPF_F_MMAPABLE`: the agent fills a new table through a memory mapping.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// `BPF_F_INNER_MAP`: tables of any size fit the one inner-map template
/// (round robin's table has one entry per backend, Maglev's `ring size`).
pub const BPF_F_INNER_MAP: u32 = 1 << 12;
/// Flags of every table (`XLB_TABLES`' inner maps; the kernel requires the
/// inner maps' flags to equal the template's).
pub const TABLE_MAP_FLAGS: u32 = BPF_F_MMAPABLE | BPF_F_INNER_MAP;
/// Capacity of the backend array (backend ids are indexes into it).
pub const MAX_BACKENDS: u32 = 16384;
/// Default capacity of the connection table (flows).
pub const DEFAULT_CONNTRACK_SIZE: u32 = 1 << 20;
/// Default capacity of the source-hash persistence table (clients).
pub const DEFAULT_PERSIST_SIZE: u32 = 1 << 16;
/// IPv6 extension headers walked at most before giving up (`PassExtHeaders`).
pub const MAX_IPV6_EXT_HEADERS: usize = 4;

/// Version of the map layouts (every key, value and map type above and in
/// `maps`). Pinned maps are reused by a restarted or upgraded agent only
/// when this and every map size match (the pin directory is named by both),
/// because the kernel does not check a reused pin's layout. Bump it whenever
/// a map's key, value or type changes, or a size the directory name does
/// not spell out (10: `XLB_TABLES` holds slots for the burst pool).
pub const LAYOUT_VERSION: u32 = 10;

/// Names of the maps, as declared in the XDP object (at most 15 bytes each).
pub mod map_names {
    /// `VipKey` → `VipInfo`.
    pub const VIPS: &str = "XLB_VIPS";
    /// Backend id → `BackendInfo`.
    pub const BACKENDS: &str = "XLB_BACKENDS";
    /// Array of maps: table slot → a VIP's lookup table (an array of
    /// backend ids, `TABLE_MAP_FLAGS`), each created by the agent on
    /// publication. Pinned; the tables live as long as the slot names them.
    pub const TABLES: &str = "XLB_TABLES";
    /// Connection table: an array of `CtSet` (set-associative, see `ct`).
    pub const CONNTRACK: &str = "XLB_CONNTRACK";
    /// Per-CPU global counters indexed by `Stat`.
    pub const STATS: &str = "XLB_STATS";
    /// Pre-filter: `vip_filter_index(address)` → number of VIPs whose
    /// address folds there; 0 means "certainly not a VIP", one array read.
    pub const VIP_FILTER: &str = "XLB_VIP_FILTER";
    /// Per-CPU `Counters` indexed by backend id.
    pub const BACKEND_STATS: &str = "XLB_BE_STATS";
    /// Active flows per backend id (shared, atomic; least-conn reads it).
    pub const BACKEND_CONNS: &str = "XLB_BE_CONNS";
    /// Per-CPU rotation position per VIP id (rr, wrr, least-conn ties).
    pub const RR: &str = "XLB_RR";
    /// `PersistKey` → `PersistValue` (LRU, source-hash persistence).
    pub const PERSIST: &str = "XLB_PERSIST";
    /// Destination MACs the balancer acts on (`mac_key`; 0 ends the list):
    /// the interface's, then `--accept-mac`s. Not pinned: every agent
    /// writes it before its program is attached.
    pub const MACS: &str = "XLB_MACS";
    /// `xlb flows` (`--flow-keys`): `FlowKey` per connection-table way (not pinned).
    pub const FLOW_KEYS: &str = "XLB_CT_KEYS";
    /// Ring buffer of `trace::TraceRecord`s (tracing program only; not pinned).
    pub const TRACE: &str = "XLB_TRACE";
    /// One `trace::TraceConfig` (not pinned).
    pub const TRACE_CFG: &str = "XLB_TRACE_CFG";
    /// Per-CPU `trace::TraceBucket` (not pinned).
    pub const TRACE_TB: &str = "XLB_TRACE_TB";
    /// Prefix VIPs: LPM trie of `PrefixKey` → `VipInfo` (looked up only
    /// after an exact miss, and only while `PREFIX_ON` is non-zero).
    pub const VIP_PREFIX: &str = "XLB_VIP_PREFIX";
    /// One `u32`: the number of prefix VIPs (0: the trie is never read).
    pub const PREFIX_ON: &str = "XLB_PREFIX_ON";
    /// The one `EncapConfig` (outer sources, GUE port; not pinned: every
    /// agent and `xlb decap attach` writes it).
    pub const ENCAP: &str = "XLB_ENCAP";
    /// `DecapKey` → 1: inner destinations `xlb decap` hands to the stack.
    pub const DECAP_VIPS: &str = "XLB_DECAP_VIPS";
    /// Tail-call targets: `TAIL_ENCAP` → `xlb_encap`. Pinned: the kernel
    /// empties a program array when no process or pin holds it, and the
    /// pinned balancer outlives its agent; every agent sets it at load.
    pub const PROGS: &str = "XLB_PROGS";
    /// `quic::QuicIdKey` → backend id: the server IDs of `--quic` VIPs'
    /// backends.
    pub const QUIC_IDS: &str = "XLB_QUIC_IDS";
    /// Every map above: all are pinned, and a restarted agent reuses them all.
    pub const ALL: [&str; 14] = [
        VIPS, BACKENDS, TABLES, CONNTRACK, STATS, VIP_FILTER, BACKEND_STATS, BACKEND_CONNS, RR, PERSIST, VIP_PREFIX, PREFIX_ON, PROGS,
        QUIC_IDS,
    ];
}

/// Entries of `XLB_DECAP_VIPS` (`xlb decap --vip`).
pub const MAX_DECAP_VIPS: u32 = 256;

/// Entries of `XLB_MACS`: the interface's MAC and up to seven more.
pub const MAX_ACCEPT_MACS: u32 = 8;

/// A MAC as one `XLB_MACS` value (its six bytes, zero-extended; never 0
/// for a real unicast address, so 0 marks the end of the list).
#[inline(always)]
pub fn mac_key(m: &[u8; 6]) -> u64 {
    u64::from_le_bytes([m[0], m[1], m[2], m[3], m[4], m[5], 0, 0])
}

/// `mac_key` of a frame's first six bytes, from its first two 32-bit
/// words (`u32::from_ne_bytes` of bytes 0..4 and 4..8): what the datapath
/// reads with two loads instead of six byte loads.
#[inline(always)]
pub const fn mac_key_of_words(lo: u32, hi: u32) -> u64 {
    u32::from_le(lo) as u64 | (u32::from_le(hi) as u64 & 0xffff) << 32
}

/// Entries of the VIP pre-filter (`XLB_VIP_FILTER`).
pub const VIP_FILTER_SIZE: u32 = 1 << 16;

/// Bit of a pre-filter value: some VIP folding there is an any-port VIP
/// (`VipKey::any_port`), so an exact miss is looked up once more. The
/// other bits count the VIPs folding there.
pub const VIP_FILTER_ANY_PORT: u32 = 1 << 31;

/// Index of an address in the VIP pre-filter: its 32-bit words folded.
#[inline(always)]
pub fn vip_filter_index(addr: &Addr, family: u8) -> u32 {
    let w = addr_words(addr);
    let mut x = w[0];
    if family == FAMILY_V6 {
        x ^= w[1] ^ w[2] ^ w[3];
    }
    (x ^ (x >> 16)) & (VIP_FILTER_SIZE - 1)
}

/// Name of the load-balancing XDP program in the object.
pub const PROG_XLB: &str = "xlb";
/// Name of the tracing variant of the balancer (`xlb trace` swaps it in).
pub const PROG_TRACE: &str = "xlb_trace";
/// Name of the routed path's program: the balancer tail-calls it for
/// frames to routed backends (its own 512-byte stack).
pub const PROG_ENCAP: &str = "xlb_encap";
/// Index of `xlb_encap` in `XLB_PROGS`.
pub const TAIL_ENCAP: u32 = 0;
/// Name of the decapsulating program (`xlb decap`, on backends).
pub const PROG_DECAP: &str = "xlb_decap";
/// Name of the clock program: writes the datapath's clock into a frame,
/// run by the agent through BPF_PROG_TEST_RUN (never attached) to relate
/// that clock to `CLOCK_MONOTONIC` (`ct::CtClock`).
pub const PROG_CLOCK: &str = "xlb_clock";
/// Name of the XDP_PASS helper program in the object (for veth peers: XDP_TX
/// frames are only delivered when the peer has an XDP program attached).
pub const PROG_PASS: &str = "xlb_pass";
