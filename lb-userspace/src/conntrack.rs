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

    /// Record the seed in the table's last element.
    pub fn write_seed(&mut self, seed: &CtSeed) {
        self.store(self.sets, &CtSet::seed_record(seed));
    }

    /// Insert a flow as the datapath would (same set, same victim choice);
    /// returns whether an open entry was evicted.
    pub fn insert(&mut self, seed: &CtSeed, key: &FlowKey, backend_id: u32, gen: u16) -> bool {
        let h = ct_hash(key, seed, self.sets);
        let mut s = self.set(h.set);
        let now = ct_now(monotonic_coarse_ns());
        let tags = s.ways.map(|w| w.tag);
        let vals = s.ways.map(|w| w.val);
        let (way, evicted) = match (0..CT_WAYS).find(|&i| CtWay::matches(tags[i], vals[i], &h)) {
            Some(i) => (i, false),
            None => ct_victim(&tags, &vals, now),
        };
        s.ways[way] = CtWay::new(&h, backend_id, gen, false, now);
        self.store(h.set, &s);
        evicted
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

/// The clock the datapath stamps entries with (`bpf_ktime_get_coarse_ns`).
pub(crate) fn monotonic_coarse_ns() -> u64 {
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
}
