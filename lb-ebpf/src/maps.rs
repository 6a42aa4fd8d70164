//! The maps, declared once here with the layouts and names from `lb_common`.
//! Sizes given here are placeholders where the agent sets the real size at
//! load time (`EbpfLoader::set_max_entries`).

use aya_ebpf::{
    btf_maps::{self, ArrayOfMaps},
    macros::{btf_map, map},
    maps::{lpm_trie::LpmTrie, Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use aya_ebpf::bindings::BPF_F_MMAPABLE;
use lb_common::{
    ct::ct_elements, BackendInfo, Counters, CtSet, DecapKey, EncapConfig, PersistKey, PersistValue, PrefixKey, StatBlock, VipInfo,
    VipKey,
    DEFAULT_CONNTRACK_SIZE, DEFAULT_MAX_VIPS, DEFAULT_PERSIST_SIZE, MAX_BACKENDS,
    MAX_ACCEPT_MACS, VIP_FILTER_SIZE,
};

/// Virtual services: (address, port, protocol) → how to balance them.
#[map(name = "XLB_VIPS")]
pub static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// Prefix VIPs (`PREFIX/LEN:PORT/PROTO`): longest prefix wins. Read only
/// after an exact miss and only while `PREFIX_ON` says there are any.
#[map(name = "XLB_VIP_PREFIX")]
pub static VIP_PREFIX: LpmTrie<PrefixKey, VipInfo> = LpmTrie::with_max_entries(DEFAULT_MAX_VIPS * 3, 0);

/// Number of prefix VIPs (one entry): the gate of every trie lookup.
#[map(name = "XLB_PREFIX_ON")]
pub static PREFIX_ON: Array<u32> = Array::with_max_entries(1, 0);

/// Server IDs of `--quic` VIPs' backends: (VIP id, server ID) → backend id.
#[map(name = "XLB_QUIC_IDS")]
pub static QUIC_IDS: HashMap<lb_common::QuicIdKey, u32> = HashMap::with_max_entries(MAX_BACKENDS, 0);

/// Backends by id: where to send a flow.
#[map(name = "XLB_BACKENDS")]
pub static BACKENDS: Array<BackendInfo> = Array::with_max_entries(MAX_BACKENDS, 0);

/// One VIP's lookup table (Maglev, or the id sequence of the other
/// algorithms): entry → backend id, 16 entries per element (`TableLine`).
/// Only the inner-map template: each table is created by the agent with
/// its own size (`BPF_F_INNER_MAP`).
pub type Table = btf_maps::Array<lb_common::TableLine, 1, { lb_common::TABLE_MAP_FLAGS as usize }>;

/// Table slot (`VipInfo::table_slot`) → that VIP's table. A BTF-defined
/// map: the loader reads the inner template from the object's BTF. Its
/// size is set at load time (`--max-tables` plus spares).
#[btf_map(name = "XLB_TABLES")]
pub static TABLES: ArrayOfMaps<Table, 1> = ArrayOfMaps::new();

/// Entry `idx` of the table in slot `slot`. Both lookups share one key on
/// the stack (`ArrayOfMaps::get_value` takes two, and the tracing
/// program's frame plus a subprogram's sits at the 512-byte limit).
#[inline(always)]
pub fn table_entry(slot: u32, idx: u32) -> Option<u32> {
    use aya_ebpf::helpers::bpf_map_lookup_elem;
    let mut key = slot;
    let outer: *mut core::ffi::c_void = core::ptr::from_ref(&TABLES).cast_mut().cast();
    // SAFETY: a lookup in a map of this object with a key of its key size
    // (u32); the result is checked for null before use.
    let inner = unsafe { bpf_map_lookup_elem(outer, core::ptr::from_ref(&key).cast()) };
    if inner.is_null() {
        return None;
    }
    key = lb_common::TableLine::element(idx);
    // SAFETY: `inner` is the table map the outer lookup returned; u32 key;
    // the value pointer is checked for null and read at once.
    let v = unsafe { bpf_map_lookup_elem(inner, core::ptr::from_ref(&key).cast()) } as *const lb_common::TableLine;
    if v.is_null() {
        None
    } else {
        // SAFETY: non-null pointer to a `TableLine` value of the table.
        Some(unsafe { &*v }.entry(idx))
    }
}

/// The connection table: `ct_elements(--conntrack-size)` one-line sets
/// (layout in `lb_common::ct`), shared by all CPUs. Mmapable, so that its
/// values start page-aligned (each set is exactly one cache line) and the
/// agent can read it without a syscall per set.
#[map(name = "XLB_CONNTRACK")]
pub static CONNTRACK: Array<CtSet> =
    Array::with_max_entries(ct_elements(DEFAULT_CONNTRACK_SIZE), BPF_F_MMAPABLE);

/// Global verdict and event counters: one `StatBlock` per CPU.
#[map(name = "XLB_STATS")]
pub static STATS: PerCpuArray<StatBlock> = PerCpuArray::with_max_entries(1, 0);

/// VIP pre-filter: non-zero where some VIP's address folds
/// (`lb_common::vip_filter_index`); lets non-VIP traffic skip the hash lookup.
#[map(name = "XLB_VIP_FILTER")]
pub static VIP_FILTER: Array<u32> = Array::with_max_entries(VIP_FILTER_SIZE, 0);

/// Per-backend traffic counters, indexed by backend id.
#[map(name = "XLB_BE_STATS")]
pub static BACKEND_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Active flows per backend id: shared by all CPUs, changed with atomic adds
/// (opened on a new table entry, closed on FIN/RST); least-conn reads it.
/// Signed: a close racing with an agent recount may dip below zero briefly.
#[map(name = "XLB_BE_CONNS")]
pub static BACKEND_CONNS: Array<i64> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Rotation position per VIP id, per CPU (rr, wrr; least-conn tie breaking).
#[map(name = "XLB_RR")]
pub static RR: PerCpuArray<u32> = PerCpuArray::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// Source-hash persistence: (client, VIP) → backend until a deadline.
#[map(name = "XLB_PERSIST")]
pub static PERSIST: LruHashMap<PersistKey, PersistValue> =
    LruHashMap::with_max_entries(DEFAULT_PERSIST_SIZE, 0);

/// Destination MACs to act on (`lb_common::mac_key`; 0 ends the list).
#[map(name = "XLB_MACS")]
pub static MACS: Array<u64> = Array::with_max_entries(MAX_ACCEPT_MACS, 0);

/// Trace records (`lb_common::trace`): written by the tracing program only.
#[map(name = "XLB_TRACE")]
pub static TRACE: RingBuf = RingBuf::with_byte_size(lb_common::trace::TRACE_RING_BYTES, 0);

/// What the tracing program records (one entry, set by the agent).
#[map(name = "XLB_TRACE_CFG")]
pub static TRACE_CFG: Array<lb_common::trace::TraceConfig> = Array::with_max_entries(1, 0);

/// The tracing program's notes on the frame it is processing (per CPU:
/// kept off its stack, see `records::Seen`).
#[map(name = "XLB_TRACE_SEEN")]
pub static TRACE_SEEN: PerCpuArray<crate::records::Seen> = PerCpuArray::with_max_entries(1, 0);

/// The tracing program's rate limit, per CPU.
#[map(name = "XLB_TRACE_TB")]
pub static TRACE_TB: PerCpuArray<lb_common::trace::TraceBucket> = PerCpuArray::with_max_entries(1, 0);

/// `xlb flows` (`--flow-keys` only): the key of the flow last inserted in
/// each way of the connection table (set × `CT_WAYS` + way), written on
/// inserts and never read by the program. One element unless enabled.
#[map(name = "XLB_CT_KEYS")]
pub static FLOW_KEYS: Array<lb_common::FlowKey> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Encapsulation settings (one entry, written by the agent or `xlb decap`).
#[map(name = "XLB_ENCAP")]
pub static ENCAP: Array<EncapConfig> = Array::with_max_entries(1, 0);

/// `xlb decap`: inner destinations (the host's VIPs) it hands to the stack.
#[map(name = "XLB_DECAP_VIPS")]
pub static DECAP_VIPS: HashMap<DecapKey, u32> = HashMap::with_max_entries(lb_common::MAX_DECAP_VIPS, 0);

/// Per-CPU scratch space of the routed path (`encap`): the FIB lookup's
/// parameters live here rather than on the 512-byte BPF stack.
#[map(name = "XLB_SCRATCH")]
pub static SCRATCH: PerCpuArray<crate::records::FibParams> = PerCpuArray::with_max_entries(1, 0);

/// The balancer's choice for a frame to a routed backend, handed to
/// `xlb_encap` (per CPU: the tail call runs on the same CPU, next).
#[map(name = "XLB_HANDOFF")]
pub static HANDOFF: PerCpuArray<crate::records::Handoff> = PerCpuArray::with_max_entries(1, 0);

/// Tail-call targets (`lb_common::TAIL_ENCAP`: `xlb_encap`), set by the agent.
#[map(name = "XLB_PROGS")]
pub static PROGS: ProgramArray = ProgramArray::with_max_entries(1, 0);
