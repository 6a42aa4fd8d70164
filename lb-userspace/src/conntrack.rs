//! The agent's side of the connection table (layout in `lb_common::ct`): its
//! seed, a read-only view for the census, and direct inserts for benchmarks
//! and tests. The table is mmapable, so it is read and written here as
//! memory, not a syscall per set.

use anyhow::{bail, Context, Result};
use aya::maps::MapData;
use lb_common::{
    ct::{ct_elements, ct_hash, ct_now, ct_sets, ct_victim},
    CtSeed, CtSet, CtWay, FlowKey, CT_WAYS,
};

/// A fresh random seed for a new table.
pub fn random_seed() -> Result<CtSeed> {
    let mut k = [0u64; 2];
    // SAFETY: getrandom(2) fills exactly the 16 bytes of `k`.
    let n = unsafe { libc::getrandom(k.as_mut_ptr().cast(), 16, 0) };
    if n != 16 {
        bail!("getrandom failed: {}", std::io::Error::last_os_error());
    }
    Ok(CtSeed { k })
}

/// The seed recorded in a pinned table of `flows` capacity, if the pin
/// exists and holds one.
pub fn pinned_seed(pin: &std::path::Path, flows: u32) -> Result<Option<CtSeed>> {
    if !pin.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(pin).with_context(|| format!("cannot open the pinned connection table {}", pin.display()))?;
    let view = CtView::map(&data, flows, false)?;
    Ok(view.set(ct_sets(flows)).seed())
}

/// The table mapped into this process (`BPF_F_MMAPABLE`).
pub struct CtView {
    mem: crate::mmap::MapMem,
    sets: u32,
}

impl CtView {
    /// Map the table of a `flows`-capacity layout (`writable` for inserts).
    pub fn map(data: &MapData, flows: u32, writable: bool) -> Result<CtView> {
        let bytes = ct_elements(flows) as usize * std::mem::size_of::<CtSet>();
        let mem = crate::mmap::MapMem::new(data, bytes, writable).context("cannot map the connection table")?;
        Ok(CtView { mem, sets: ct_sets(flows) })
    }

    /// Number of sets (the seed record follows them).
    pub fn sets(&self) -> u32 {
        self.sets
    }

    /// Set `i` (or the seed record at `sets()`), read word by word.
    pub fn set(&self, i: u32) -> CtSet {
        assert!(i <= self.sets, "set {i} out of range");
        let mut s = CtSet::default();
        // SAFETY: `i` is inside the mapping; aligned 8-byte volatile loads of
        // memory the datapath writes concurrently (each load is atomic).
        unsafe {
            let p = self.mem.base::<CtSet>().add(i as usize);
            for (w, way) in s.ways.iter_mut().enumerate() {
                way.tag = std::ptr::read_volatile(&(*p).ways[w].tag);
                way.val = std::ptr::read_volatile(&(*p).ways[w].val);
            }
        }
        s
    }

    fn store(&mut self, i: u32, s: &CtSet) {
        assert!(i <= self.sets, "set {i} out of range");
        // SAFETY: inside the mapping, which is writable (callers mapped it so).
        unsafe {
            let p = self.mem.base::<CtSet>().add(i as usize);
            for (w, way) in s.ways.iter().enumerate() {
                std::ptr::write_volatile(&mut (*p).ways[w].val, way.val);
                std::ptr::write_volatile(&mut (*p).ways[w].tag, way.tag);
            }
        }
    }

    /// Write way `w` of set `i` as the datapath does: the value word, then
    /// the tag word (a reader checks the pair; see `lb_common::ct`). The
    /// set's other ways are not touched, so a flow the datapath inserts
    /// beside it meanwhile keeps its entry.
    fn store_way(&mut self, i: u32, w: usize, way: &CtWay) {
        assert!(i < self.sets && w < CT_WAYS, "way {i}/{w} out of range");
        // SAFETY: inside the mapping, which is writable (callers mapped it so).
        unsafe {
            let p = self.mem.base::<CtSet>().add(i as usize);
            std::ptr::write_volatile(&mut (*p).ways[w].val, way.val);
            std::ptr::write_volatile(&mut (*p).ways[w].tag, way.tag);
        }
    }

    /// Record the seed in the table's last element.
    pub fn write_seed(&mut self, seed: &CtSeed) {
        self.store(self.sets, &CtSet::seed_record(seed));
    }

    /// Insert a flow as the datapath would (same set, same victim choice);
    /// returns whether an open entry was evicted.
    pub fn insert(&mut self, seed: &CtSeed, key: &FlowKey, backend_id: u32, gen: u16) -> bool {
        self.insert_keyed(seed, key, backend_id, gen, 0, None) == Inserted::Evicted
    }

    /// Insert a flow last seen `idle` time units ago as the datapath would,
    /// and its key beside its way in `keys` (`--flow-keys`) after the
    /// entry, in the datapath's order. An open entry of the flow already
    /// naming this backend is left as it is (its age untouched, so copies
    /// passed back and forth between nodes do not keep an idle flow
    /// young), and so is one naming another backend that was seen more
    /// recently than `idle` ago (this node's own flow on that 5-tuple).
    pub fn insert_keyed(&mut self, seed: &CtSeed, key: &FlowKey, backend_id: u32, gen: u16, idle: u64, keys: Option<&mut KeysView>) -> Inserted {
        let h = ct_hash(key, seed, self.sets);
        let s = self.set(h.set);
        let now = ct_now(datapath_now_ns());
        let tags = s.ways.map(|w| w.tag);
        let vals = s.ways.map(|w| w.val);
        let (way, outcome) = match (0..CT_WAYS).find(|&i| CtWay::matches(tags[i], vals[i], &h)) {
            Some(i) => {
                let e = CtWay::entry(tags[i], vals[i]);
                if e.backend_id == backend_id & 0xffff && e.gen == gen && !e.closed {
                    return Inserted::Unchanged;
                }
                if !e.closed && CtWay::age(tags[i], now) < idle {
                    return Inserted::KeptNewer;
                }
                (i, Inserted::Replaced)
            }
            None => match ct_victim(&tags, &vals, now) {
                (i, true) => (i, Inserted::Evicted),
                (i, false) => (i, Inserted::New),
            },
        };
        self.store_way(h.set, way, &CtWay::new(&h, backend_id, gen, false, now.wrapping_sub(idle)));
        if let Some(k) = keys {
            k.put(h.set as usize * CT_WAYS + way, key);
        }
        outcome
    }

    /// Walk every set once.
    pub fn census(&self) -> ConntrackCensus {
        let mut c = ConntrackCensus::default();
        for i in 0..self.sets {
            for w in self.set(i).ways {
                if CtWay::is_empty(w.val) {
                    continue;
                }
                c.entries += 1;
                let e = CtWay::entry(w.tag, w.val);
                if !e.closed {
                    *c.open.entry((e.backend_id, e.gen)).or_default() += 1;
                }
            }
        }
        c
    }
}

/// What `CtView::insert_keyed` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inserted {
    /// Took a free or closed way.
    New,
    /// Took the place of another open flow's entry (as the datapath evicts).
    Evicted,
    /// Rewrote the flow's own entry, which named another backend.
    Replaced,
    /// The flow's entry already named this backend: nothing written.
    Unchanged,
    /// The flow's open entry names another backend and was seen more
    /// recently: nothing written.
    KeptNewer,
}

/// The flow-key array (`XLB_CT_KEYS`, `--flow-keys`) mapped into this
/// process: slot `set × CT_WAYS + way` holds the key of that way's flow.
/// Never trusted alone: a key counts only when its signature is its way's.
pub struct KeysView {
    mem: crate::mmap::MapMem,
    slots: usize,
}

impl KeysView {
    /// Map the first `slots` keys (`writable` for `put`).
    pub fn map(data: &MapData, slots: u32, writable: bool) -> Result<KeysView> {
        let bytes = slots as usize * std::mem::size_of::<FlowKey>();
        let mem = crate::mmap::MapMem::new(data, bytes, writable).context("cannot map the flow keys")?;
        Ok(KeysView { mem, slots: slots as usize })
    }

    /// Slot `i`.
    pub fn get(&self, i: usize) -> FlowKey {
        assert!(i < self.slots, "flow key {i} out of range");
        // SAFETY: inside the mapping; a volatile copy of memory the datapath
        // writes concurrently (a torn copy fails the signature check).
        unsafe { std::ptr::read_volatile(self.mem.base::<FlowKey>().add(i)) }
    }

    /// Write slot `i` (the mapping must be writable); ignored past the end.
    pub fn put(&mut self, i: usize, key: &FlowKey) {
        if i < self.slots {
            // SAFETY: inside the writable mapping; readers check the key
            // against its way's signature, so a torn copy is only skipped.
            unsafe { std::ptr::write_volatile(self.mem.base::<FlowKey>().add(i), *key) };
        }
    }
}

/// `CLOCK_MONOTONIC_COARSE` minus the datapath clock (`CtClock`), as
/// measured by `calibrate_clock` (0 until then).
static CLOCK_LEAD_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The clock the datapath stamps entries with, now: jiffies count ticks
/// from the same timekeeping as `CLOCK_MONOTONIC_COARSE`, but started at a
/// different moment during boot (≈250 ms apart on the development VM), so
/// the agent reads that clock minus the difference it measured.
pub(crate) fn datapath_now_ns() -> u64 {
    monotonic_coarse_ns().wrapping_sub(CLOCK_LEAD_NS.load(std::sync::atomic::Ordering::Relaxed))
}

/// Measure how far `CLOCK_MONOTONIC_COARSE` leads the datapath's clock by
/// running `xlb_clock` (it writes its clock into the frame); the sample
/// with the shortest round trip is kept. The same kernel gives every
/// datapath in a process the same answer.
pub(crate) fn calibrate_clock(clock: &aya::programs::Xdp) -> Result<()> {
    use aya::programs::{TestRun, TestRunOptions};
    let frame = [0u8; 64];
    let mut best: Option<(u64, u64)> = None;
    for _ in 0..5 {
        let mut out = [0u8; 64];
        let t0 = monotonic_coarse_ns();
        let r = clock
            .test_run(TestRunOptions { data_in: Some(&frame), data_out: Some(&mut out), ..Default::default() })
            .context("cannot run xlb_clock")?;
        let t1 = monotonic_coarse_ns();
        // XDP_PASS = 2.
        anyhow::ensure!(r.return_value == 2, "xlb_clock returned {}", r.return_value);
        let mut ns = [0u8; 8];
        ns.copy_from_slice(&out[..8]);
        let lead = (t0 / 2 + t1 / 2).wrapping_sub(u64::from_le_bytes(ns));
        if best.is_none_or(|(rt, _)| t1 - t0 < rt) {
            best = Some((t1 - t0, lead));
        }
    }
    if let Some((_, lead)) = best {
        CLOCK_LEAD_NS.store(lead, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(())
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds.
fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime(2) into a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Open flows per (backend id, generation) and occupied entries, from one
/// walk of the connection table.
#[derive(Debug, Default, Clone)]
pub struct ConntrackCensus {
    /// Entries not closed by FIN/RST, by (backend id, generation).
    pub open: std::collections::HashMap<(u32, u16), i64>,
    /// Entries in the table.
    pub entries: u64,
}

/// A second handle on the connection table, for walking it without holding
/// the agent.
pub struct ConntrackReader {
    view: CtView,
    _map: MapData,
}

impl ConntrackReader {
    /// Map a (reopened) table handle read-only.
    pub fn new(map: MapData, flows: u32) -> Result<ConntrackReader> {
        let view = CtView::map(&map, flows, false)?;
        Ok(ConntrackReader { view, _map: map })
    }

    /// Walk the table once.
    pub fn census(&self) -> ConntrackCensus {
        self.view.census()
    }

    /// The mapped table.
    pub fn view(&self) -> &CtView {
        &self.view
    }

    /// The mapped table alone (the mapping outlives the handle).
    pub fn into_view(self) -> CtView {
        self.view
    }
}

/// Call `f` with every entry whose key `keys` holds (`--flow-keys`): a key
/// counts only when its signature is its way's, so a key overwritten or
/// torn since is skipped, never paired with another flow's entry. Returns
/// the number of entries skipped so.
pub fn for_each_keyed(view: &CtView, keys: &KeysView, seed: &CtSeed, mut f: impl FnMut(FlowKey, CtWay)) -> u64 {
    let mut unkeyed = 0;
    for set in 0..view.sets() {
        let s = view.set(set);
        for (w, way) in s.ways.iter().enumerate() {
            if CtWay::is_empty(way.val) {
                continue;
            }
            let key = keys.get(set as usize * CT_WAYS + w);
            let h = ct_hash(&key, seed, view.sets());
            if h.set != set || !CtWay::matches(way.tag, way.val, &h) {
                unkeyed += 1;
                continue;
            }
            f(key, *way);
        }
    }
    unkeyed
}

/// The datapath clock's parameters on this kernel: its tick is the
/// resolution of `CLOCK_MONOTONIC_COARSE`.
pub(crate) fn datapath_clock() -> lb_common::ct::CtClock {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_getres(2) into a valid timespec.
    let ok = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut ts) } == 0;
    let tick = if ok { ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64 } else { 0 };
    lb_common::ct::CtClock::of_tick(tick)
}
