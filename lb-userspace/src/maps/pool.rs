//! Table slots and the pool of ready tables.
//!
//! Putting a map into (or taking one out of) an array of maps by system
//! call waits for an RCU grace period (the kernel's `maybe_wait_bpf_programs`):
//! measured 8–20 ms a call on this 2-CPU machine, far more than writing a
//! table. So no such call sits between a request and its publication:
//! - ready tables (maps of ring-size entries in a slot no entry names,
//!   mapped into the agent) wait in a small pool; publishing fills one
//!   through its mapping and switches the VIP entry to its slot;
//! - a replaced table cools: it stays in its slot, untouched, until a grace
//!   period that began after the VIP entry stopped naming it has ended (no
//!   program can still be reading it), then it is ready again. Steady
//!   publications thus create, map, zero and free no map at all (those cost
//!   more than the table write: vmalloc, page clearing, a TLB shootdown per
//!   unmapping);
//! - a janitor thread, off the agent's lock, waits the grace periods (one
//!   per round, whatever the number of tables), creates tables when the pool
//!   runs low (in batches), and frees the tables beyond what it keeps;
//! - when publications drain the pool faster than that (commands one after
//!   another), it keeps `POOL_BURST` ready for a while; a burst (a reload)
//!   reserves the tables it needs first, in one batch; a check that fails
//!   once asks for as many as its backend's VIPs (`prepare`), so the burst
//!   its backend's removal would be finds them ready.
//!
//! A table is written only while ready: fresh, or cooled as above. A slot
//! is reused for another table only after it was emptied.

use anyhow::{bail, Context, Result};
use aya::maps::{IterableMap, MapData};
use std::{
    collections::{BTreeSet, HashMap},
    os::fd::{AsFd, AsRawFd},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use super::tables::{batch, create_placeholder, create_table, memlock, TableMem};

/// Ready tables the janitor keeps (each `TableLine::bytes(ring size)`).
pub const POOL_READY: usize = 4;

/// Ready tables the janitor keeps while publications come faster than it
/// refills `POOL_READY` (commands one after another: a table each every few
/// ms, while a refill of any size waits for one grace period, and emptying
/// replaced tables for another): one batch of this many lasts as long.
/// Measured: 16 ran dry with a waiting command every ~1.2 ms (a janitor
/// round takes 10–25 ms here), and the request that found the pool empty
/// inserted a table itself, waiting ~10 ms for the grace period: 2.3 ms a
/// command on average, 1.2 ms with 64 (16 MiB at the default ring size,
/// held while commands keep coming and `RESERVE_HOLD` after).
pub const POOL_BURST: usize = 64;

/// How long tables reserved beyond `POOL_READY` for a burst stay ready.
const RESERVE_HOLD: Duration = Duration::from_secs(2);

/// A table in a slot no entry names, mapped writable.
struct Ready {
    slot: u32,
    mem: TableMem,
}

#[derive(Default)]
struct State {
    /// Slots with no table.
    free: BTreeSet<u32>,
    ready: Vec<Ready>,
    /// Replaced tables waiting for a grace period to be ready again.
    cooling: Vec<Ready>,
    /// Cooling tables taken out of `cooling` while their grace period runs.
    in_grace: usize,
    /// Slots whose table is to be freed (no entry names them).
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
    /// The janitor keeps this many ready until then (`prepare`).
    prepared: Option<(usize, Instant)>,
    /// Tables created since the start (tests: steady publications create none).
    created: u64,
    /// Publications that found no ready table and made one themselves,
    /// waiting a grace period (~10 ms) on the request's path.
    dry: u64,
    /// The janitor's last error, reported once by the agent's next call.
    error: Option<String>,
    stop: bool,
}

/// The state, its condition variable, the placeholder of emptied slots, a
/// lock that serializes emptyings and coolings (one that returns has seen
/// every slot retired, or table replaced, before it began, including those
/// another thread had taken), and the janitor's round (held while it works,
/// so `settle` waits for a round under way).
type Shared = Arc<(Mutex<State>, Condvar, aya::maps::Array<MapData, lb_common::TableLine>, Mutex<()>, Mutex<()>)>;

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
        Ok(Pool { shared: Arc::new((Mutex::new(state), Condvar::new(), empty, Mutex::new(()), Mutex::new(()))), ring_size, outer_id, janitor: None })
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
                let r = st.ready.iter().position(|r| r.mem.entries() as usize >= table.len()).map(|i| st.ready.swap_remove(i));
                let now = Instant::now();
                if st.ready.len() < POOL_READY / 2 && st.hold_until.is_none_or(|t| now >= t) {
                    // The pool runs low, not at the end of a reserved
                    // batch: publications outpace the refills.
                    st.burst_until = Some(now + RESERVE_HOLD);
                    self.shared.1.notify_one();
                }
                // Otherwise the table this one replaces comes back (`release`).
                r
            };
            if let Some(r) = r {
                r.mem.write(table);
                lock(&self.shared).mapped.insert(r.slot, r.mem);
                return Ok(r.slot);
            }
            lock(&self.shared).dry += 1;
            self.reserve(outer, 1)?;
        }
        bail!("no ready table after reserving one")
    }

    /// Make sure `n` ready tables are there (one batch for all missing).
    pub fn reserve(&mut self, outer: &MapData, n: usize) -> Result<()> {
        self.start_janitor()?;
        // A burst waits for the janitor's round under way, if any: it may be
        // making these very tables (`prepare`, on a backend's first failed
        // check), in slots that a refill of its own would find taken (seen
        // on a loaded machine: 6 slots free for 508 tables, and the burst
        // then took its tables one at a time, 780 ms for 512 VIPs).
        let _round = (n > POOL_READY).then(|| self.shared.4.lock().unwrap_or_else(|p| p.into_inner()));
        let (missing, cooling) = {
            let mut st = lock(&self.shared);
            if n > POOL_READY {
                st.hold_until = Some(Instant::now() + RESERVE_HOLD);
            }
            (n.saturating_sub(st.ready.len()), st.cooling.len() + st.in_grace)
        };
        // Replaced tables first: one grace period, and no new slots (a burst
        // after a burst would otherwise need a third set of tables).
        if missing > 0 && cooling > 0 {
            cool(&self.shared, outer)?;
        }
        let missing = n.saturating_sub(lock(&self.shared).ready.len());
        if missing > 0 {
            refill(&self.shared, outer, missing, self.ring_size)?;
        }
        Ok(())
    }

    /// `slot` is named by no entry any more: its table cools (or, if the
    /// agent has no mapping of it, an adopted one, is freed).
    pub fn release(&self, slot: u32) {
        let mut st = lock(&self.shared);
        if !st.bytes.contains_key(&slot) || st.retired.contains(&slot) || st.cooling.iter().any(|r| r.slot == slot) {
            return;
        }
        match st.mapped.remove(&slot) {
            Some(mem) => {
                st.cooling.push(Ready { slot, mem });
            }
            None => st.retired.push(slot),
        }
        self.shared.1.notify_one();
    }

    /// Have `n` tables ready within a moment, for `hold` (a backend failed
    /// a check: its removal would republish `n` VIPs). Returns at once; the
    /// janitor creates what is missing.
    pub fn prepare(&self, n: usize, hold: Duration) {
        let mut st = lock(&self.shared);
        let until = Instant::now() + hold;
        let n = st.prepared.filter(|(_, t)| *t > Instant::now()).map_or(n, |(m, _)| m.max(n));
        st.prepared = Some((n, until));
        if st.ready.len() + st.cooling.len() + st.in_grace < n {
            self.shared.1.notify_one();
        }
    }

    /// Release every occupied slot outside `named` that is not a ready table
    /// (adoption: tables a previous agent left unnamed).
    pub fn release_unnamed(&self, named: &BTreeSet<u32>) -> usize {
        let mut st = lock(&self.shared);
        let ready: BTreeSet<u32> = st.ready.iter().chain(&st.cooling).map(|r| r.slot).collect();
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

    /// (occupied slots, ready tables, cooling or retired slots, tables
    /// created so far), for tests and status.
    pub fn counts(&self) -> (usize, usize, usize, u64) {
        let st = lock(&self.shared);
        (st.bytes.len(), st.ready.len(), st.cooling.len() + st.retired.len(), st.created)
    }

    /// Publications that found the pool empty (see `POOL_BURST`).
    pub fn dry_takes(&self) -> u64 {
        lock(&self.shared).dry
    }

    /// What the janitor does once no burst is held, now (tests): cooled
    /// tables ready after one grace period, tables beyond `POOL_READY` and
    /// retired ones freed.
    pub fn settle(&self, outer: &MapData) -> Result<()> {
        // After the janitor's round under way, if any (a refill it decided
        // before would otherwise land after this returns).
        let _round = self.shared.4.lock().unwrap_or_else(|p| p.into_inner());
        cool(&self.shared, outer)?;
        {
            let mut st = lock(&self.shared);
            (st.hold_until, st.burst_until, st.prepared) = (None, None, None);
            trim(&mut st);
        }
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

/// Make the cooling tables ready after one grace period that begins now,
/// after the VIP entries stopped naming them (any update of the table array
/// waits for one: here a free slot's placeholder put there again). Without
/// a free slot they are freed instead (emptying waits for one too).
fn cool(shared: &Shared, outer: &MapData) -> Result<()> {
    // One at a time: a caller that waited here finds the tables another
    // was cooling ready.
    let _one_at_a_time = shared.3.lock().unwrap_or_else(|p| p.into_inner());
    let (cooled, slot) = {
        let mut st = lock(shared);
        if st.cooling.is_empty() {
            return Ok(());
        }
        let cooled = std::mem::take(&mut st.cooling);
        st.in_grace += cooled.len();
        // Out of `free` during the call: no refill may put a table there.
        (cooled, st.free.pop_first())
    };
    let Some(slot) = slot else {
        let mut st = lock(shared);
        st.in_grace -= cooled.len();
        for r in cooled {
            st.retired.push(r.slot);
            st.unmapped.push(r.mem);
        }
        return Ok(());
    };
    let r = batch::clear(outer, &[slot], shared.2.map());
    let mut st = lock(shared);
    st.free.insert(slot);
    st.in_grace -= cooled.len();
    match r {
        Ok(()) => {
            st.ready.extend(cooled);
            Ok(())
        }
        Err(e) => {
            st.cooling.extend(cooled);
            Err(e)
        }
    }
}

/// Free the ready tables beyond `POOL_READY` (no burst is held).
fn trim(st: &mut State) {
    if st.ready.len() > POOL_READY {
        let extra: Vec<Ready> = st.ready.drain(POOL_READY..).collect();
        for r in extra {
            st.retired.push(r.slot);
            st.unmapped.push(r.mem);
        }
    }
}

/// Create `n` ready tables and put them in free slots (one batch). With
/// fewer slots free, as many as there are (and an error that says so).
fn refill(shared: &Shared, outer: &MapData, n: usize, ring_size: u32) -> Result<()> {
    let short = { lock(shared).free.len() < n };
    if short {
        clear(shared, outer)?;
    }
    let (slots, free): (Vec<u32>, usize) = {
        let mut st = lock(shared);
        let free = st.free.len();
        ((0..n.min(free)).filter_map(|_| st.free.pop_first()).collect(), free)
    };
    if slots.is_empty() && n > 0 {
        bail!("{free} table slots are free, {n} needed");
    }
    let made: Result<Vec<(aya::maps::Array<MapData, lb_common::TableLine>, TableMem)>> = slots
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
            st.created += slots.len() as u64;
            let got = slots.len();
            for (slot, (map, mem)) in slots.into_iter().zip(made) {
                st.bytes.insert(slot, memlock(map.map()).unwrap_or(lb_common::TableLine::bytes(ring_size)));
                st.ready.push(Ready { slot, mem });
                // `map` closes: the array holds the table, `mem` its pages.
            }
            if got < n {
                bail!("{free} table slots were free, {n} needed: {got} tables made");
            }
            Ok(())
        }
        Err(e) => {
            st.free.extend(slots);
            Err(e)
        }
    }
}

/// The janitor: makes cooled tables ready, frees retired ones, keeps
/// `POOL_READY` tables ready (`POOL_BURST` while the pool runs low, or what
/// `prepare` asked for), frees the tables reserved for a burst once it is over.
fn janitor(shared: Shared, outer: MapData, ring_size: u32) {
    loop {
        {
            let mut st = lock(&shared);
            while janitor_work(&mut st).is_none() {
                if st.stop {
                    return;
                }
                let wait = if st.ready.len() > POOL_READY { RESERVE_HOLD } else { Duration::from_secs(3600) };
                st = shared.1.wait_timeout(st, wait).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
            }
        }
        // Decided again inside the round: `settle` may have done the work
        // meanwhile.
        let round = shared.4.lock().unwrap_or_else(|p| p.into_inner());
        let Some(want) = janitor_work(&mut lock(&shared)) else { continue };
        let r = cool(&shared, &outer)
            .and_then(|()| clear(&shared, &outer))
            .and_then(|()| if want > 0 { refill(&shared, &outer, want, ring_size) } else { Ok(()) });
        drop(round);
        if let Err(e) = r {
            lock(&shared).error = Some(format!("{e:#}"));
            // Do not spin on a persistent failure.
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// The janitor's next round, if there is work: tables to cool or free, and
/// how many to create (trimming the ready tables beyond what is held).
fn janitor_work(st: &mut State) -> Option<usize> {
    if st.stop {
        return None;
    }
    let now = Instant::now();
    let burst = st.burst_until.is_some_and(|t| now < t);
    let prepared = st.prepared.filter(|(_, t)| now < *t).map_or(0, |(n, _)| n);
    let held = burst || prepared > 0 || st.hold_until.is_some_and(|t| now < t);
    let target = prepared.max(if burst { POOL_BURST } else { POOL_READY });
    if !held {
        trim(st);
    }
    let have = st.ready.len() + st.cooling.len() + st.in_grace;
    // Outside a burst, refill only once the pool runs low: a publication
    // takes a table before it releases the one it replaces, and that one
    // comes back (a refill in between would create a table for nothing).
    let low = if burst || prepared > 0 { target } else { POOL_READY / 2 };
    let want = if have < low { target.saturating_sub(have) } else { 0 };
    // No more than the slots that are free or freed by this round.
    let work = !st.retired.is_empty() || !st.unmapped.is_empty() || !st.cooling.is_empty() || want > 0;
    work.then(|| want.min(st.free.len() + st.retired.len()))
}
