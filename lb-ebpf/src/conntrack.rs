//! The connection table and what its entries mean: a flow's entry keeps it
//! on its backend while the VIP's backends change. Layout, matching and the
//! argument that concurrent writers never produce a misroute are in
//! `lb_common::ct`; here are the semantics:
//!
//! - hit: the entry names a live backend of its generation → use it;
//! - stale: the backend died or its id was given to another → schedule again;
//! - SYN reuse: a pure SYN on a known 5-tuple is a new connection → schedule;
//! - close: the first FIN or RST marks the entry closed (one store);
//! - active flows per backend: +1 for a new open entry, −1 when it closes,
//!   is re-scheduled, or is evicted while open.
//!
//! A flow's lookup and its insert touch one cache line: its set.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use core::intrinsics::{atomic_xadd, AtomicOrdering};
use lb_common::{
    ct::{ct_hash, ct_now, ct_victim},
    BackendInfo, CtEntry, CtHash, CtSeed, CtSet, CtWay, FlowKey, Stat, StatBlock, VipInfo, CT_WAYS,
};

use crate::{
    maps::{BACKENDS, BACKEND_CONNS, CONNTRACK},
    stats,
    steer::Choice,
};

/// Number of sets (set by the agent at load time: `ct_sets(--conntrack-size)`).
#[no_mangle]
static XLB_CT_SETS: u32 = 1;

/// The table's hash seed (set by the agent at load time; kept in the
/// table's seed record for the next agent).
#[no_mangle]
static XLB_CT_SEED: [u64; 2] = [0; 2];

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// A flow's set, read once (one word at a time: see `lb_common::ct` for why
/// a mix of two writes is harmless).
struct Probe {
    set: *mut CtSet,
    h: CtHash,
    now: u64,
    tags: [u64; CT_WAYS],
    vals: [u64; CT_WAYS],
}

impl Probe {
    #[inline(always)]
    fn read(key: &FlowKey) -> Option<Probe> {
        // SAFETY: plain reads of load-time constants; volatile so they are
        // not folded at build time (the verifier knows their values).
        let (sets, seed) =
            unsafe { (core::ptr::read_volatile(&XLB_CT_SETS), CtSeed { k: core::ptr::read_volatile(&XLB_CT_SEED) }) };
        let h = ct_hash(key, &seed, sets);
        let set = CONNTRACK.get_ptr_mut(h.set)?;
        // SAFETY: helper without preconditions.
        let now = ct_now(unsafe { bpf_ktime_get_coarse_ns() });
        let mut p = Probe { set, h, now, tags: [0; CT_WAYS], vals: [0; CT_WAYS] };
        for i in 0..CT_WAYS {
            // SAFETY: `set` is a valid map value; each aligned 8-byte load is
            // atomic, and the pair is checked by `CtWay::matches`.
            unsafe {
                p.tags[i] = core::ptr::read_volatile(&(*set).ways[i].tag);
                p.vals[i] = core::ptr::read_volatile(&(*set).ways[i].val);
            }
        }
        Some(p)
    }

    /// The way holding this flow, and its entry.
    #[inline(always)]
    fn find(&self) -> Option<(usize, CtEntry)> {
        for i in 0..CT_WAYS {
            if CtWay::matches(self.tags[i], self.vals[i], &self.h) {
                return Some((i, CtWay::entry(self.tags[i], self.vals[i])));
            }
        }
        None
    }

    #[inline(always)]
    fn way(&self, i: usize) -> *mut CtWay {
        // SAFETY: `i < CT_WAYS` (callers index `tags`/`vals` with it first),
        // inside the set's map value.
        unsafe { &mut (*self.set).ways[i & (CT_WAYS - 1)] as *mut CtWay }
    }

    /// Store a new tag word (refresh, close): one 8-byte store.
    #[inline(always)]
    fn store_tag(&self, i: usize, tag: u64) {
        // SAFETY: valid, aligned map value word.
        unsafe { core::ptr::write_volatile(&mut (*self.way(i)).tag, tag) };
    }

    /// Write a whole entry into way `i`.
    #[inline(always)]
    fn store(&self, i: usize, e: &CtWay) {
        let w = self.way(i);
        // SAFETY: valid, aligned map value words; readers check the pair.
        unsafe {
            core::ptr::write_volatile(&mut (*w).val, e.val);
            core::ptr::write_volatile(&mut (*w).tag, e.tag);
        }
    }
}

/// Result of looking a flow up.
pub enum Track<'a> {
    /// The entry names a live backend: forward there.
    Hit(Choice<'a>),
    /// The flow needs a backend: look the VIP up, then `Pending::settle`,
    /// schedule, and `Pending::commit`.
    New(Pending),
}

/// A flow being scheduled: its set and the way its entry goes to.
pub struct Pending {
    probe: Option<Probe>,
    way: usize,
    old: Option<CtEntry>,
    closing: bool,
}

#[inline(always)]
fn flags(tcp_flags: u8) -> (bool, bool) {
    (tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN, tcp_flags & (TCP_FIN | TCP_RST) != 0)
}

/// Look a TCP/UDP flow up. A hit on a live backend of the right generation
/// needs nothing else (not even the VIP: a deleted VIP's backends are
/// cleared, and a reused id has a new generation).
#[inline(always)]
pub fn track<'a>(key: &FlowKey, tcp_flags: u8, stats: &mut StatBlock) -> Track<'a> {
    let (syn, closing) = flags(tcp_flags);
    let Some(probe) = Probe::read(key) else {
        return Track::New(Pending { probe: None, way: 0, old: None, closing });
    };
    if let Some((i, e)) = probe.find() {
        if let Some(be) = BACKENDS.get(e.backend_id) {
            if be.is_gen(e.gen) && be.is_alive() && !syn {
                stats::count(stats, Stat::CtHit);
                if closing && !e.closed {
                    probe.store_tag(i, CtWay::touched(probe.tags[i], probe.now, true));
                    conns_add(e.backend_id, -1);
                    stats::count(stats, Stat::CtClosed);
                } else if !CtWay::is_fresh(probe.tags[i], probe.now) {
                    probe.store_tag(i, CtWay::touched(probe.tags[i], probe.now, e.closed));
                }
                return Track::Hit(Choice { id: e.backend_id, backend: be, new_flow: false });
            }
        }
        return Track::New(Pending { probe: Some(probe), way: i, old: Some(e), closing });
    }
    let (way, evicts_open) = ct_victim(&probe.tags, &probe.vals, probe.now);
    if evicts_open {
        // Its flow loses its entry while open: no longer counted here.
        let e = CtWay::entry(probe.tags[way & (CT_WAYS - 1)], probe.vals[way & (CT_WAYS - 1)]);
        if BACKENDS.get(e.backend_id).is_some_and(|b| b.is_gen(e.gen)) {
            conns_add(e.backend_id, -1);
        }
        stats::count(stats, Stat::CtEvicted);
    }
    Track::New(Pending { probe: Some(probe), way, old: None, closing })
}

impl Pending {
    /// Account for the entry being replaced, now that the VIP is known: a
    /// SYN on a live entry is a reused 5-tuple (or a retransmitted SYN, which
    /// the same table schedules alike); otherwise its backend died or the id
    /// was reused.
    #[inline(always)]
    pub fn settle(&self, vip: &VipInfo, stats: &mut StatBlock) {
        let Some(e) = self.old else {
            stats::count(stats, Stat::CtMiss);
            return;
        };
        let be = BACKENDS.get(e.backend_id);
        let live = be.is_some_and(|b| b.keeps(e.gen, vip.vip_id));
        stats::count(stats, if live { Stat::CtSynReuse } else { Stat::CtStale });
        if !e.closed && be.is_some_and(|b| b.is_gen(e.gen)) {
            conns_add(e.backend_id, -1);
        }
    }

    /// Pin the flow to the backend it was given (one set, one line).
    #[inline(always)]
    pub fn commit(&self, id: u32, be: &BackendInfo, stats: &mut StatBlock) {
        let Some(p) = &self.probe else {
            stats::count(stats, Stat::CtInsertFail);
            return;
        };
        p.store(self.way, &CtWay::new(&p.h, id, be.gen, self.closing, p.now));
        if !self.closing {
            conns_add(id, 1);
        }
    }
}

/// The backend of a flow's entry if it may still carry the flow (ICMP
/// errors: nothing is changed).
#[inline(always)]
pub fn peek<'a>(key: &FlowKey, vip: &VipInfo) -> Option<Choice<'a>> {
    let (_, e) = Probe::read(key)?.find()?;
    let be = BACKENDS.get(e.backend_id)?;
    be.keeps(e.gen, vip.vip_id).then_some(Choice { id: e.backend_id, backend: be, new_flow: false })
}

#[inline(always)]
fn conns_add(id: u32, delta: i64) {
    if let Some(p) = BACKEND_CONNS.get_ptr_mut(id) {
        // SAFETY: a valid, aligned map value shared by all CPUs; an atomic
        // add whose result is unused compiles to BPF's `lock xadd`.
        unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(p, delta) };
    }
}

/// Active flows of a backend id (least-conn).
#[inline(always)]
pub fn active(id: u32) -> u64 {
    match BACKEND_CONNS.get_ptr(id) {
        // SAFETY: as above; an aligned 8-byte load is atomic on BPF.
        Some(p) => unsafe { core::ptr::read_volatile(p) }.max(0) as u64,
        None => 0,
    }
}
