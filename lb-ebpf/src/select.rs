//! Backend selection: the connection table first, then the VIP's algorithm
//! for new flows; separate, side-effect-free paths for IP fragments and ICMP
//! errors. Also keeps each backend's active-flow count (opened by a new table
//! entry, closed by the first FIN or RST).

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_loop};
use core::intrinsics::{atomic_xadd, AtomicOrdering};

use crate::{
    conntrack,
    maps::{BACKENDS, BACKEND_CONNS, PERSIST, RINGS, RR, VIPS},
    parse::Packet,
    stats,
};
use lb_common::{
    hash::{flow_hash, src_hash},
    Algo, BackendInfo, FlowKey, FlowValue, PersistKey, PersistValue, Stat, StatBlock, VipInfo,
    BACKEND_F_ALIVE, FLOW_F_CLOSED, MAX_LEAST_CONN_BACKENDS,
};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const NS_PER_SEC: u64 = 1_000_000_000;

/// The chosen backend of a packet.
pub struct Choice<'a> {
    /// Backend id (index into `XLB_BACKENDS`).
    pub id: u32,
    /// Its forwarding entry.
    pub backend: &'a BackendInfo,
    /// True when the packet started a new table entry.
    pub new_flow: bool,
}

/// `h % n` without a division-by-zero panic path (the verifier rejects
/// those); callers have checked `n > 0`, this makes it provable.
#[inline(always)]
fn slot(h: u32, n: u32) -> u32 {
    if n == 0 {
        0
    } else {
        h % n
    }
}

/// May this entry's flow keep using the backend?
#[inline(always)]
fn valid(be: &BackendInfo, gen: u16, vip: &VipInfo) -> bool {
    be.gen == gen && be.flags & BACKEND_F_ALIVE != 0 && be.vip_id == vip.vip_id
}

#[inline(always)]
fn conns_add(id: u32, delta: i64) {
    if let Some(p) = BACKEND_CONNS.get_ptr_mut(id) {
        // SAFETY: a valid, aligned map value shared by all CPUs; an atomic
        // add whose result is unused compiles to BPF's `lock xadd`.
        unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(p, delta) };
    }
}

#[inline(always)]
fn conns(id: u32) -> u64 {
    match BACKEND_CONNS.get_ptr(id) {
        // SAFETY: as above; an aligned 8-byte load is atomic on BPF.
        Some(p) => unsafe { core::ptr::read_volatile(p) }.max(0) as u64,
        None => 0,
    }
}

/// Backend of a TCP/UDP packet. The connection table comes first: a hit
/// on a live backend of the right generation needs nothing else (not even the
/// VIP: a deleted VIP's backends are cleared, and a reused id has a new
/// generation). Misses, stale entries and SYNs look the VIP up and schedule;
/// `PassNotVip` when the destination is not a VIP after all.
#[inline(always)]
pub fn flow<'a>(pkt: &Packet, block: *mut StatBlock) -> Result<Choice<'a>, Stat> {
    let syn = pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let closing = pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0;
    let entry = conntrack::lookup(&pkt.key);
    let mut old: Option<(FlowValue, Option<&BackendInfo>)> = None;
    if let Some(entry) = entry {
        let be = BACKENDS.get(entry.backend_id);
        if let Some(b) = be {
            if b.gen == entry.gen && b.flags & BACKEND_F_ALIVE != 0 && !syn {
                stats::count(block, Stat::CtHit);
                if closing && entry.flags & FLOW_F_CLOSED == 0 {
                    let closed = FlowValue { flags: entry.flags | FLOW_F_CLOSED, ..entry };
                    conntrack::insert(&pkt.key, &closed);
                    conns_add(entry.backend_id, -1);
                    stats::count(block, Stat::CtClosed);
                }
                return Ok(Choice { id: entry.backend_id, backend: b, new_flow: false });
            }
        }
        old = Some((entry, be));
    }
    // SAFETY: map values are only read; the agent replaces entries whole.
    let vip = unsafe { VIPS.get(&pkt.key.vip) }.ok_or(Stat::PassNotVip)?;
    match old {
        Some((entry, be)) => {
            let live = matches!(be, Some(b) if valid(b, entry.gen, vip));
            // A SYN on a known 5-tuple is a new connection (port reuse, or a
            // retransmitted SYN, which the same table re-schedules alike);
            // otherwise its backend died or the id was reused.
            stats::count(block, if live { Stat::CtSynReuse } else { Stat::CtStale });
            if entry.flags & FLOW_F_CLOSED == 0 {
                if let Some(b) = be {
                    if b.gen == entry.gen {
                        conns_add(entry.backend_id, -1);
                    }
                }
            }
        }
        None => stats::count(block, Stat::CtMiss),
    }
    let (id, be) = schedule(&pkt.key, vip, block)?;
    let entry = FlowValue { backend_id: id, gen: be.gen, flags: if closing { FLOW_F_CLOSED } else { 0 } };
    if !conntrack::insert(&pkt.key, &entry) {
        stats::count(block, Stat::CtInsertFail);
    } else if !closing {
        conns_add(id, 1);
    }
    Ok(Choice { id, backend: be, new_flow: true })
}

/// The ring entry `idx` of a VIP, if it names a live backend.
#[inline(always)]
fn ring_backend<'a>(vip: &VipInfo, idx: u32) -> Result<(u32, &'a BackendInfo), Stat> {
    let id = *RINGS.get(vip.ring_off + idx).ok_or(Stat::DropBadBackend)?;
    let be = BACKENDS.get(id).ok_or(Stat::DropBadBackend)?;
    if be.flags & BACKEND_F_ALIVE == 0 {
        return Err(Stat::DropBadBackend);
    }
    Ok((id, be))
}

/// Next position of the VIP's rotation on this CPU, in `0..size`.
#[inline(always)]
fn rotate(vip: &VipInfo) -> u32 {
    let Some(p) = RR.get_ptr_mut(vip.vip_id) else { return 0 };
    // SAFETY: per-CPU value; this program is its only writer on this CPU.
    unsafe {
        let mut i = *p;
        if i >= vip.ring_size {
            i = 0;
        }
        *p = i + 1;
        i
    }
}

/// Pick the backend of a new flow with the VIP's algorithm.
#[inline(always)]
fn schedule<'a>(key: &FlowKey, vip: &VipInfo, block: *mut StatBlock) -> Result<(u32, &'a BackendInfo), Stat> {
    if vip.ring_size == 0 {
        return Err(Stat::DropNoBackend);
    }
    let algo = Algo::from_u8(vip.algo).ok_or(Stat::DropBadBackend)?;
    let idx = match algo {
        Algo::Maglev => slot(flow_hash(key), vip.ring_size),
        // SAFETY: helper without preconditions.
        Algo::Random => slot(unsafe { bpf_get_prandom_u32() }, vip.ring_size),
        Algo::RoundRobin | Algo::WeightedRoundRobin => rotate(vip),
        Algo::LeastConn => return least_conn(vip),
        Algo::SourceHash => {
            if vip.persist_secs == 0 {
                slot(src_hash(key), vip.ring_size)
            } else {
                return persistent(key, vip, block);
            }
        }
    };
    ring_backend(vip, idx)
}

/// Source hash with persistence: a client stays on the backend it was given
/// for `persist_secs` after its last new flow, even if the table changes.
#[inline(always)]
fn persistent<'a>(key: &FlowKey, vip: &VipInfo, block: *mut StatBlock) -> Result<(u32, &'a BackendInfo), Stat> {
    let pkey = PersistKey { src: key.src, vip_id: vip.vip_id };
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let expires_ns = now + vip.persist_secs as u64 * NS_PER_SEC;
    // SAFETY: the value is copied out at once.
    if let Some(p) = unsafe { PERSIST.get(&pkey) }.copied() {
        if p.expires_ns > now {
            if let Some(be) = BACKENDS.get(p.backend_id) {
                if valid(be, p.gen, vip) {
                    stats::count(block, Stat::PersistHit);
                    let _ = PERSIST.insert(&pkey, &PersistValue { expires_ns, ..p }, 0);
                    return Ok((p.backend_id, be));
                }
            }
        }
    }
    let (id, be) = ring_backend(vip, slot(src_hash(key), vip.ring_size))?;
    let _ = PERSIST.insert(&pkey, &PersistValue { backend_id: id, gen: be.gen, _pad: 0, expires_ns }, 0);
    Ok((id, be))
}

/// State of a least-conn scan, shared with the `bpf_loop` callback.
#[repr(C)]
struct LcScan {
    ring_off: u32,
    n: u32,
    start: u32,
    best: u32,
    best_conns: u64,
    best_weight: u64,
}

/// One step of the least-conn scan: list position `start + i` (mod n).
/// Verified once by the kernel however many backends there are.
#[inline(never)]
extern "C" fn least_conn_step(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop passes back the pointer it was given: our stack LcScan.
    let s = unsafe { &mut *(ctx as *mut LcScan) };
    if s.n == 0 || i >= s.n as u64 {
        return 1;
    }
    let mut j = s.start as u64 + i;
    if j >= s.n as u64 {
        j -= s.n as u64;
    }
    let Some(&id) = RINGS.get(s.ring_off.wrapping_add(j as u32)) else { return 1 };
    let w = match BACKENDS.get(id) {
        Some(be) if be.flags & BACKEND_F_ALIVE != 0 => be.weight as u64,
        _ => 0,
    };
    let c = conns(id);
    // Load c/w below the best's, compared without division; weight 0 never
    // wins, and the initial best (weight 0) loses to any live backend.
    if c * s.best_weight < s.best_conns * w {
        s.best = id;
        s.best_conns = c;
        s.best_weight = w;
    }
    0
}

/// The backend with the fewest active flows per unit of weight; ties go
/// round the list (the scan starts at the VIP's rotation position).
#[inline(always)]
fn least_conn<'a>(vip: &VipInfo) -> Result<(u32, &'a BackendInfo), Stat> {
    let n = if vip.ring_size < MAX_LEAST_CONN_BACKENDS { vip.ring_size } else { MAX_LEAST_CONN_BACKENDS };
    let mut scan = LcScan { ring_off: vip.ring_off, n, start: rotate(vip), best: u32::MAX, best_conns: 1, best_weight: 0 };
    // SAFETY: the callback only touches `scan` through the pointer it gets.
    unsafe {
        bpf_loop(n, least_conn_step as *mut core::ffi::c_void, &mut scan as *mut LcScan as *mut core::ffi::c_void, 0);
    }
    let be = BACKENDS.get(scan.best).ok_or(Stat::DropNoBackend)?;
    Ok((scan.best, be))
}

/// Backend of an IP fragment: the 3-tuple (ports 0) hashed over the table
/// of the address's first VIP for the protocol; no connection-table entry.
#[inline(always)]
pub fn fragment<'a>(key: &FlowKey, vip: &VipInfo) -> Result<(u32, &'a BackendInfo), Stat> {
    if vip.ring_size == 0 {
        return Err(Stat::DropNoBackend);
    }
    ring_backend(vip, slot(flow_hash(key), vip.ring_size))
}

/// Backend of an ICMP error about a flow: the flow's table entry, else (for
/// hash algorithms) the backend the flow would get now. Changes nothing.
#[inline(always)]
pub fn icmp<'a>(key: &FlowKey, vip: &VipInfo) -> Result<(u32, &'a BackendInfo), Stat> {
    if let Some(entry) = conntrack::lookup(key) {
        if let Some(be) = BACKENDS.get(entry.backend_id) {
            if valid(be, entry.gen, vip) {
                return Ok((entry.backend_id, be));
            }
        }
    }
    if vip.ring_size == 0 {
        return Err(Stat::DropNoBackend);
    }
    match Algo::from_u8(vip.algo) {
        Some(Algo::Maglev) => ring_backend(vip, slot(flow_hash(key), vip.ring_size)),
        Some(Algo::SourceHash) if vip.persist_secs == 0 => ring_backend(vip, slot(src_hash(key), vip.ring_size)),
        // Not a flow we can place: let the kernel have it.
        _ => Err(Stat::PassNotVip),
    }
}
