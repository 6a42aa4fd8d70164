//! Scheduling algorithms: which backend a new flow gets (`schedule`), which
//! one a fragment gets (`fragment`), and which one an ICMP error about a flow
//! the table does not know gets (`rehash`). No connection-table semantics
//! here (see `conntrack`).

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_loop};

use crate::{
    conntrack,
    maps::{table_entry, BACKENDS, PERSIST, RR},
    stats,
};
use lb_common::{
    hash::{flow_hash, maglev_hash, src_hash},
    Algo, BackendInfo, FlowKey, PersistKey, PersistValue, Stat, StatBlock, VipInfo, MAX_LEAST_CONN_BACKENDS,
};

const NS_PER_SEC: u64 = 1_000_000_000;

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

/// The ring entry `idx` of a VIP, if it names a live backend.
#[inline(always)]
fn ring_backend<'a>(vip: &VipInfo, idx: u32) -> Result<(u32, &'a BackendInfo), Stat> {
    let id = table_entry(vip.table_slot, idx).ok_or(Stat::DropBadBackend)?;
    let be = BACKENDS.get(id).ok_or(Stat::DropBadBackend)?;
    if !be.is_alive() {
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
pub fn schedule<'a>(key: &FlowKey, vip: &VipInfo, stats: &mut StatBlock) -> Result<(u32, &'a BackendInfo), Stat> {
    if !vip.has_backends() {
        return Err(Stat::DropNoBackend);
    }
    let algo = Algo::from_u8(vip.algo).ok_or(Stat::DropBadBackend)?;
    let idx = match algo {
        Algo::Maglev => slot(maglev_hash(vip, key), vip.ring_size),
        // SAFETY: helper without preconditions.
        Algo::Random => slot(unsafe { bpf_get_prandom_u32() }, vip.ring_size),
        Algo::RoundRobin | Algo::WeightedRoundRobin => rotate(vip),
        Algo::LeastConn => return least_conn(vip),
        Algo::SourceHash => {
            if vip.persist_secs == 0 {
                slot(src_hash(key), vip.ring_size)
            } else {
                return persistent(key, vip, stats);
            }
        }
    };
    ring_backend(vip, idx)
}

/// Source hash with persistence: a client stays on the backend it was given
/// for `persist_secs` after its last new flow, even if the table changes.
#[inline(always)]
fn persistent<'a>(key: &FlowKey, vip: &VipInfo, stats: &mut StatBlock) -> Result<(u32, &'a BackendInfo), Stat> {
    let pkey = PersistKey { src: key.src, vip_id: vip.vip_id };
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let expires_ns = now + vip.persist_secs as u64 * NS_PER_SEC;
    // SAFETY: the value is copied out at once.
    if let Some(p) = unsafe { PERSIST.get(&pkey) }.copied() {
        if p.expires_ns > now {
            if let Some(be) = BACKENDS.get(p.backend_id) {
                if be.keeps(p.gen, vip.vip_id) {
                    stats::count(stats, Stat::PersistHit);
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
    table_slot: u32,
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
    let Some(id) = table_entry(s.table_slot, j as u32) else { return 1 };
    let w = match BACKENDS.get(id) {
        Some(be) if be.is_alive() => be.weight as u64,
        _ => 0,
    };
    let c = conntrack::active(id);
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
    let mut scan = LcScan { table_slot: vip.table_slot, n, start: rotate(vip), best: u32::MAX, best_conns: 1, best_weight: 0 };
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
    if !vip.has_backends() {
        return Err(Stat::DropNoBackend);
    }
    ring_backend(vip, slot(flow_hash(key), vip.ring_size))
}

/// Backend of an ICMP error about a flow the table does not place: for
/// hash algorithms, the backend the flow would get now. Changes nothing.
#[inline(always)]
pub fn rehash<'a>(key: &FlowKey, vip: &VipInfo) -> Result<(u32, &'a BackendInfo), Stat> {
    if !vip.has_backends() {
        return Err(Stat::DropNoBackend);
    }
    match Algo::from_u8(vip.algo) {
        Some(Algo::Maglev) => ring_backend(vip, slot(maglev_hash(vip, key), vip.ring_size)),
        Some(Algo::SourceHash) if vip.persist_secs == 0 => ring_backend(vip, slot(src_hash(key), vip.ring_size)),
        // Not a flow we can place: let the kernel have it.
        _ => Err(Stat::PassNotVip),
    }
}
