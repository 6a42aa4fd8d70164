//! Table slots and the pool of ready tables.
//!
//! Putting a map into (or taking one out of) an array of maps by system
//! call waits for an RCU grace period (the kernel's `maybe_wait_bpf_programs`):
//! measured 8–20 ms a call on this 2-CPU machine, far more than writing a
//! table. So no such call sits between a request and its publication:
//! - ready tables (fresh maps of ring-size entries, already in a slot no
//!   entry names, mapped into the agent) wait in a small pool; publishing
//!   fills one through its mapping and switches the VIP entry to its slot;
//! - a replaced table's slot is retired; a janitor thread empties retired
//!   slots and refills the pool in batches (one grace period per batch),
//!   off the agent's lock; when publications drain the pool faster than
//!   that (commands one after another), it keeps `POOL_BURST` ready for a
//!   while (a batch costs one grace period whatever its size);
//! - a burst (a reload) reserves the tables it needs first, in one batch.
//!
//! A slot is reused only after it was emptied, and an emptied slot's table
//! is never written again, so no reader can see a table change under it.

use anyhow::{bail, Context, Result};
use aya::maps::{IterableMap, MapData};
use std::{
    collections::{BTreeSet, HashMap},
    os::fd::{AsFd, AsRawFd},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use super::tables::{batch, create_placeholder, create_table, memlock, TableMem};

/// Ready tables the janitor keeps (each `ring size × 8` bytes).
pub const POOL_READY: usize = 4;

/// Ready tables the janitor keeps while publications come faster than it
/// refills `POOL_READY` (commands one after another: a table each every few
/// ms, while a refill of any size waits for one grace period, and emptying
/// replaced tables for another): one batch of this many lasts as long.
pub const POOL_BURST: usize = 16;

/// How long tables reserved beyond `POOL_READY` for a burst stay ready.
const RESERVE_HOLD: Duration = Duration::from_secs(2);

/// A fresh table in a slot no entry names, mapped writable.
struct Ready {
    slot: u32,
    mem: TableMem,
    entries: u32,
}

#[derive(Default)]
struct State {
    /// Slots with no table.
    free: BTreeSet<u32>,
    ready: Vec<Ready>,
    /// Slots no entry names any more, still holding their table.
    retired: Vec<u32>,
    /// Mappings of the tables in use, kept until they are retired: an
    /// unmapping costs a TLB shootdown on every CPU the agent runs on
    /// (milliseconds on a loaded VM), so the janitor does it, not a request.
    mapped: HashMap<u32, TableMem>,
    /// Mappings of retired tables, dropped by the janitor.
    unmapped: Vec<TableMem>,
    /// Bytes of the table in every occupied slot.
    bytes: HashMap<u32, u64>,
    /// Reserved tables above `POOL_READY` are kept until then.
    hold_until: Option<Instant>,
    /// The janitor keeps `POOL_BURST` tables ready until then (the pool ran
    /// low); reserved tables above `POOL_READY` are kept too.
    burst_until: Option<Instant>,
    /// The janitor's last error, reported once by the agent's next call.
    error: Option<String>,
    stop: bool,
}

/// The state, its condition variable, the placeholder of emptied slots, and
/// a lock that serializes emptyings (one that returns has seen every slot
/// retired before it emptied, including those another thread had taken).
type Shared = Arc<(Mutex<State>, Condvar, aya::maps::Array<MapData, u32>, Mutex<()>)>;

fn lock(s: &Shared) -> MutexGuard<'_, State> {
    // A janitor that panicked leaves consistent state (every change is a
    // single push or pop under the lock).
    s.0.lock().unwrap_or_else(|p| p.into_inner())
}

/// The slots of `XLB_TABLES`, the ready tables and the janitor.
pub struct Pool {
    shared: Shared,
    ring_size: u32,
    outer_id: u32,
    janitor: Option<std::thread::JoinHandle<()>>,
}

impl Pool {
    /// A pool over the outer array `outer` of `slots` slots, some already
    /// holding tables (`occupied`: slot → bytes; an adopted deployment's).
    pub fn new(outer: &MapData, slots: u32, ring_size: u32, occupied: HashMap<u32, u64>) -> Result<Pool> {
        let outer_id = outer.info().context("table array info")?.id();
        let free = (0..slots).filter(|s| !occupied.contains_key(s)).collect();
        let state = State { free, bytes: occupied, ..Default::default() };
        let empty = create_placeholder().context("cannot create the placeholder table")?;
        Ok(Pool { shared: Arc::new((Mutex::new(state), Condvar::new(), empty, Mutex::new(()))), ring_size, outer_id, janitor: None })
    }

    /// Start the janitor (at the first publication: a datapath loaded for
    /// anything else creates no table), with the pool filled first.
    fn start_janitor(&mut self) -> Result<()> {
        if self.janitor.is_some() {
            return Ok(());
        }
        let outer = MapData::from_id(self.outer_id).context("cannot reopen the table array")?;
        let missing = POOL_READY.saturating_sub(lock(&self.shared).ready.len());
        refill(&self.shared, &outer, missing, self.ring_size)?;
        let (shared, ring_size) = (self.shared.clone(), self.ring_size);
        let h = std::thread::Builder::new()
            .name("xlb-tables".into())
            .spawn(move || janitor(shared, outer, ring_size))
            .context("cannot start the table janitor")?;
        self.janitor = Some(h);
        Ok(())
    }

    /// Put `table` in a ready table; returns its slot (no entry names it
    /// yet). Reserves one first if the pool is empty.
    pub fn take(&mut self, outer: &MapData, table: &[u32]) -> Result<u32> {
        if table.is_empty() || table.len() > self.ring_size as usize {
            bail!("a table of {} entries (ring size {})", table.len(), self.ring_size);
        }
        self.start_janitor()?;
        for _ in 0..2 {
            let r = {
                let mut st = lock(&self.shared);
                if let Some(e) = st.error.take() {
                    log::warn!("table janitor: {e}");
                }
                let r = st.ready.iter().position(|r| r.entries as usize >= table.len()).map(|i| st.ready.swap_remove(i));
                let now = Instant::now();
                if st.ready.len() < POOL_READY / 2 && st.hold_until.is_none_or(|t| now >= t) {
                    // The pool runs low, not at the end of a reserved
                    // batch: publications outpace the refills.
                    st.burst_until = Some(now + RESERVE_HOLD);
                }
                self.shared.1.notify_one();
                r
            };
            if let Some(r) = r {
                r.mem.write(table);
                lock(&self.shared).mapped.insert(r.slot, r.mem);
                return Ok(r.slot);
            }
            self.reserve(outer, 1)?;
        }
        bail!("no ready table after reserving one")
    }

    /// Make sure `n` ready tables are there (one batch for all missing).
    pub fn reserve(&mut self, outer: &MapData, n: usize) -> Result<()> {
        self.start_janitor()?;
        let missing = {
            let mut st = lock(&self.shared);
            if n > POOL_READY {
                st.hold_until = Some(Instant::now() + RESERVE_HOLD);
            }
            n.saturating_sub(st.ready.len())
        };
        if missing > 0 {
            refill(&self.shared, outer, missing, self.ring_size)?;
        }
        Ok(())
    }

    /// `slot` is named by no entry any more: its table is freed soon.
    pub fn release(&self, slot: u32) {
        let mut st = lock(&self.shared);
        if st.bytes.contains_key(&slot) && !st.retired.contains(&slot) {
            st.retired.push(slot);
            if let Some(m) = st.mapped.remove(&slot) {
                st.unmapped.push(m);
            }
            self.shared.1.notify_one();
        }
    }

    /// Release every occupied slot outside `named` that is not a ready table
    /// (adoption: tables a previous agent left unnamed).
    pub fn release_unnamed(&self, named: &BTreeSet<u32>) -> usize {
        let mut st = lock(&self.shared);
        let ready: BTreeSet<u32> = st.ready.iter().map(|r| r.slot).collect();
        let loose: Vec<u32> =
            st.bytes.keys().copied().filter(|s| !named.contains(s) && !ready.contains(s) && !st.retired.contains(s)).collect();
        st.retired.extend(&loose);
        self.shared.1.notify_one();
        loose.len()
    }

    /// Record a table found in `slot` (adoption reads it back).
    pub fn note(&self, slot: u32, bytes: u64) {
        let mut st = lock(&self.shared);
        st.free.remove(&slot);
        st.bytes.insert(slot, bytes);
    }

    /// Bytes of every table in a slot (named, ready or retired).
    pub fn bytes(&self) -> u64 {
        lock(&self.shared).bytes.values().sum()
    }

    /// (occupied slots, ready tables, retired slots), for tests and status.
    pub fn counts(&self) -> (usize, usize, usize) {
        let st = lock(&self.shared);
        (st.bytes.len(), st.ready.len(), st.retired.len())
    }

    /// Empty the retired slots now (tests; the janitor does it otherwise).
    pub fn clear_retired(&self, outer: &MapData) -> Result<()> {
        clear(&self.shared, outer)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        lock(&self.shared).stop = true;
        self.shared.1.notify_all();
        if let Some(h) = self.janitor.take() {
            let _ = h.join();
        }
    }
}

/// Empty every retired slot (one batch: one grace period) and free it.
fn clear(shared: &Shared, outer: &MapData) -> Result<()> {
    let _one_at_a_time = shared.3.lock().unwrap_or_else(|p| p.into_inner());
    let (slots, unmapped) = {
        let mut st = lock(shared);
        (std::mem::take(&mut st.retired), std::mem::take(&mut st.unmapped))
    };
    drop(unmapped);
    if slots.is_empty() {
        return Ok(());
    }
    let r = batch::clear(outer, &slots, shared.2.map());
    let mut st = lock(shared);
    match r {
        Ok(()) => {
            for s in &slots {
                st.bytes.remove(s);
                st.free.insert(*s);
            }
            Ok(())
        }
        Err(e) => {
            st.retired.extend(slots);
            Err(e)
        }
    }
}

/// Create `n` ready tables and put them in free slots (one batch).
fn refill(shared: &Shared, outer: &MapData, n: usize, ring_size: u32) -> Result<()> {
    let short = { lock(shared).free.len() < n };
    if short {
        clear(shared, outer)?;
    }
    let slots: Vec<u32> = {
        let mut st = lock(shared);
        if st.free.len() < n {
            bail!("{} table slots are free, {n} needed", st.free.len());
        }
        (0..n).filter_map(|_| st.free.pop_first()).collect()
    };
    let made: Result<Vec<(aya::maps::Array<MapData, u32>, TableMem)>> = slots
        .iter()
        .map(|_| {
            let map = create_table(ring_size)?;
            let mem = TableMem::ready(map.map(), ring_size)?;
            Ok((map, mem))
        })
        .collect();
    let inserted = made.and_then(|made| {
        let fds: Vec<u32> = made.iter().map(|(m, _)| m.map().fd().as_fd().as_raw_fd() as u32).collect();
        batch::update(outer, &slots, &fds).context("cannot put new tables in the table array")?;
        Ok(made)
    });
    let mut st = lock(shared);
    match inserted {
        Ok(made) => {
            for (slot, (map, mem)) in slots.into_iter().zip(made) {
                st.bytes.insert(slot, memlock(map.map()).unwrap_or(ring_size as u64 * 8));
                st.ready.push(Ready { slot, mem, entries: ring_size });
                // `map` closes: the array holds the table, `mem` its pages.
            }
            Ok(())
        }
        Err(e) => {
            st.free.extend(slots);
            Err(e)
        }
    }
}

/// The janitor: empties retired slots, keeps `POOL_READY` tables ready
/// (`POOL_BURST` while the pool runs low), trims tables reserved for a
/// burst once it is over.
fn janitor(shared: Shared, outer: MapData, ring_size: u32) {
    let mut target;
    loop {
        let want = {
            let mut st = lock(&shared);
            loop {
                if st.stop {
                    return;
                }
                let now = Instant::now();
                let burst = st.burst_until.is_some_and(|t| now < t);
                let held = burst || st.hold_until.is_some_and(|t| now < t);
                target = if burst { POOL_BURST } else { POOL_READY };
                if !held && st.ready.len() > POOL_READY {
                    let extra: Vec<Ready> = st.ready.drain(POOL_READY..).collect();
                    for r in extra {
                        st.retired.push(r.slot);
                        st.unmapped.push(r.mem);
                    }
                }
                if !st.retired.is_empty() || !st.unmapped.is_empty() || st.ready.len() < target {
                    break;
                }
                let wait = if st.ready.len() > POOL_READY { RESERVE_HOLD } else { Duration::from_secs(3600) };
                st = shared.1.wait_timeout(st, wait).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
            }
            // No more than the slots that are free or freed by this round.
            target.saturating_sub(st.ready.len()).min(st.free.len() + st.retired.len())
        };
        let r = clear(&shared, &outer).and_then(|()| if want > 0 { refill(&shared, &outer, want, ring_size) } else { Ok(()) });
        if let Err(e) = r {
            lock(&shared).error = Some(format!("{e:#}"));
            // Do not spin on a persistent failure.
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}
