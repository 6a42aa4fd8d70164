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

use aya_ebpf::helpers::bpf_jiffies64;
use core::intrinsics::{atomic_xadd, AtomicOrdering};
use lb_common::{
    ct::{ct_hash, ct_now, ct_rank, ct_rank_is_open, CtClock},
    BackendInfo, CtEntry, CtHash, CtSeed, CtSet, CtWay, FlowKey, Stat, StatBlock, VipInfo, CT_WAYS,
};

use crate::{
    maps::{BACKENDS, BACKEND_CONNS, CONNTRACK, FLOW_KEYS},
    stats,
};

/// Number of sets (set by the agent at load time: `ct_sets(--conntrack-size)`).
#[no_mangle]
static XLB_CT_SETS: u32 = 1;

/// The table's hash seed (set by the agent at load time; kept in the
/// table's seed record for the next agent).
#[no_mangle]
static XLB_CT_SEED: [u64; 2] = [0; 2];

/// The kernel's tick and jiffies at boot (set by the agent at load time
/// from `clock_getres(CLOCK_MONOTONIC_COARSE)`: `CtClock::of_tick`).
#[no_mangle]
static XLB_CT_CLOCK: CtClock = CtClock::of_tick(4_000_000);

/// Set to 1 by the agent at load time (`--flow-keys`): every insert also
/// writes the flow's key beside its way in `XLB_CT_KEYS` (read only by
/// `xlb flows`). Read-only data: at 0 the verifier removes the store.
#[no_mangle]
static XLB_FLOW_KEYS: u8 = 0;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// A flow's set and signature. Its ways are read one word at a time (see
/// `lb_common::ct` for why a mix of two writes is harmless), where they are
/// needed rather than copied: the copy would cost stack the tracing
/// program does not have.
struct Probe {
    set: *mut CtSet,
    h: CtHash,
    now: u64,
}

impl Probe {
    #[inline(always)]
    fn read(key: &FlowKey, now: u64) -> Option<Probe> {
        // SAFETY: plain reads of load-time constants; volatile so they are
        // not folded at build time (the verifier knows their values).
        let (sets, seed) =
            unsafe { (core::ptr::read_volatile(&XLB_CT_SETS), CtSeed { k: core::ptr::read_volatile(&XLB_CT_SEED) }) };
        let h = ct_hash(key, &seed, sets);
        let set = CONNTRACK.get_ptr_mut(h.set)?;
        Some(Probe { set, h, now })
    }

    /// Way `i` as (tag, value), each word read once.
    #[inline(always)]
    fn load(&self, i: usize) -> (u64, u64) {
        let w = self.way(i);
        // SAFETY: `set` is a valid map value; each aligned 8-byte load is
        // atomic, and the pair is checked by `CtWay::matches`.
        unsafe { (core::ptr::read_volatile(&(*w).tag), core::ptr::read_volatile(&(*w).val)) }
    }

    /// The way holding this flow, its tag word and its entry.
    #[inline(always)]
    fn find(&self) -> Option<(usize, u64, CtEntry)> {
        for i in 0..CT_WAYS {
            let (tag, val) = self.load(i);
            if CtWay::matches(tag, val, &self.h) {
                return Some((i, tag, CtWay::entry(tag, val)));
            }
        }
        None
    }

    #[inline(always)]
    fn way(&self, i: usize) -> *mut CtWay {
        // SAFETY: masked below `CT_WAYS`: inside the set's map value.
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

/// The datapath's clock in nanoseconds since boot (`CtClock`: jiffies,
/// which the verifier inlines into one load).
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: a plain read of a load-time constant (volatile: not folded at
    // build time), and a helper without preconditions.
    let (clock, jiffies) = unsafe { (core::ptr::read_volatile(&XLB_CT_CLOCK), bpf_jiffies64()) };
    clock.ns(jiffies)
}

/// The time in the entries' unit.
#[inline(always)]
fn now() -> u64 {
    ct_now(now_ns())
}

/// Result of looking a flow up.
pub enum Track<'a> {
    /// The entry names a live backend: forward there (its id and entry).
    Hit(u32, &'a BackendInfo),
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
    /// `way` and `old` are known (false: a pure SYN's set is not read yet).
    placed: bool,
}

#[inline(always)]
fn flags(tcp_flags: u8) -> (bool, bool) {
    (tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN, tcp_flags & (TCP_FIN | TCP_RST) != 0)
}

/// Look a TCP/UDP flow up. A hit on a live backend of the right generation
/// needs nothing else (not even the VIP: a deleted VIP's backends are
/// cleared, and a reused id has a new generation).
///
/// A pure SYN is a new connection whatever the table holds: its set is
/// only located here, and read in `settle`, after the VIP lookup and the
/// algorithm. So no helper call (the VIP lookup is one) waits for the set's
/// load, which overlaps the ring's: 15–20 % off a new flow on this kernel.
#[inline(always)]
pub fn track<'a>(key: &FlowKey, tcp_flags: u8, stats: &mut StatBlock) -> Track<'a> {
    let (syn, closing) = flags(tcp_flags);
    let probe = Probe::read(key, now());
    if syn {
        return Track::New(Pending { probe, way: 0, old: None, closing, placed: false });
    }
    let Some(probe) = probe else {
        return Track::New(Pending { probe: None, way: 0, old: None, closing, placed: true });
    };
    if let Some((i, tag, e)) = probe.find() {
        if let Some(be) = BACKENDS.get(e.backend_id) {
            if be.is_gen(e.gen) && be.is_alive() {
                stats::count(stats, Stat::CtHit);
                if closing && !e.closed {
                    probe.store_tag(i, CtWay::touched(tag, probe.now, true));
                    conns_add(e.backend_id, -1);
                    stats::count(stats, Stat::CtClosed);
                } else if !CtWay::is_fresh(tag, probe.now) {
                    probe.store_tag(i, CtWay::touched(tag, probe.now, e.closed));
                }
                return Track::Hit(e.backend_id, be);
            }
        }
        return Track::New(Pending { probe: Some(probe), way: i, old: Some(e), closing, placed: true });
    }
    Track::New(Pending::take_way(probe, closing, stats))
}

impl Pending {
    /// A flow the set does not hold: the way it takes (see `ct_victim`).
    #[inline(always)]
    fn take_way(probe: Probe, closing: bool, stats: &mut StatBlock) -> Pending {
        // `ct_victim`, one way at a time (no copy of the set on the stack).
        let (mut way, mut rank, mut victim) = (0, 0, (0, 0));
        for i in 0..CT_WAYS {
            let (tag, val) = probe.load(i);
            let r = ct_rank(tag, val, probe.now);
            if r > rank || i == 0 {
                (way, rank, victim) = (i, r, (tag, val));
            }
        }
        if ct_rank_is_open(rank) {
            // Its flow loses its entry while open: no longer counted here.
            let e = CtWay::entry(victim.0, victim.1);
            if BACKENDS.get(e.backend_id).is_some_and(|b| b.is_gen(e.gen)) {
                conns_add(e.backend_id, -1);
            }
            stats::count(stats, Stat::CtEvicted);
        }
        Pending { probe: Some(probe), way, old: None, closing, placed: true }
    }

    /// Read a pure SYN's set: its own way if the 5-tuple has one (reused
    /// or stale), else the way it takes.
    #[inline(always)]
    fn place(&mut self, stats: &mut StatBlock) {
        if self.placed {
            return;
        }
        let Some(probe) = self.probe.take() else { return };
        *self = match probe.find() {
            Some((i, _, e)) => Pending { probe: Some(probe), way: i, old: Some(e), closing: self.closing, placed: true },
            None => Pending::take_way(probe, self.closing, stats),
        };
    }

    /// Account for the entry being replaced, now that the VIP is known and
    /// the flow has its backend: a SYN on a live entry is a reused 5-tuple
    /// (or a retransmitted SYN, which the same table schedules alike);
    /// otherwise its backend died or the id was reused.
    #[inline(always)]
    pub fn settle(&mut self, vip: &VipInfo, stats: &mut StatBlock) {
        self.place(stats);
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
    pub fn commit(&self, key: &FlowKey, id: u32, be: &BackendInfo, stats: &mut StatBlock) {
        let Some(p) = &self.probe else {
            stats::count(stats, Stat::CtInsertFail);
            return;
        };
        p.store(self.way, &CtWay::new(&p.h, id, be.gen, self.closing, p.now));
        // SAFETY: a plain read of a load-time constant (volatile: not folded
        // at build time; the verifier knows its value).
        if unsafe { core::ptr::read_volatile(&XLB_FLOW_KEYS) } != 0 {
            let slot = p.h.set.wrapping_mul(CT_WAYS as u32).wrapping_add((self.way & (CT_WAYS - 1)) as u32);
            if let Some(k) = FLOW_KEYS.get_ptr_mut(slot) {
                // SAFETY: a valid map value; readers check the key against
                // the way's signature, so a torn copy is only skipped.
                unsafe { core::ptr::write_volatile(k, *key) };
            }
        }
        if !self.closing {
            conns_add(id, 1);
        }
    }
}

/// The backend of a flow's entry if it may still carry the flow (ICMP
/// errors: nothing is changed).
#[inline(always)]
pub fn peek<'a>(key: &FlowKey, vip: &VipInfo) -> Option<(u32, &'a BackendInfo)> {
    let (_, _, e) = Probe::read(key, now())?.find()?;
    let be = BACKENDS.get(e.backend_id)?;
    be.keeps(e.gen, vip.vip_id).then_some((e.backend_id, be))
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
