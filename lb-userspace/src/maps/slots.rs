//! The datapath's table slots: publishing a table (a ready one from the
//! `pool`, switched in by a VIP-entry update), freeing it, and reading the
//! published tables back. The maps themselves: `tables`.

use anyhow::{bail, Context, Result};
use aya::maps::{Array, IterableMap, MapData};

use super::{
    pool::Pool,
    tables::{memlock, TableMem, Tables, EMPTY_MAP_NAME},
    Datapath,
};
use lb_common::TableLine;

impl Datapath {
    /// Put `table` in a new table (a ready one from the pool: no system
    /// call that waits) and return its slot. Readers see it only once a
    /// VIP entry is switched to the slot, so it is never seen half written.
    pub fn write_table(&mut self, table: &[u32]) -> Result<u32> {
        let outer = self.tables.data();
        self.pool.take(outer, table)
    }

    /// Have `n` ready tables (a burst of publications: one batch for all).
    pub fn reserve_tables(&mut self, n: usize) -> Result<()> {
        let outer = self.tables.data();
        self.pool.reserve(outer, n)
    }

    /// No entry names `slot` any more: its table is written again only
    /// once running programs are done with it (or freed, by the janitor).
    pub fn free_table(&mut self, slot: u32) {
        self.pool.release(slot)
    }

    /// Have `n` tables ready soon, for `hold` (without waiting).
    pub fn prepare_tables(&mut self, n: usize, hold: std::time::Duration) {
        self.pool.prepare(n, hold)
    }

    /// Free the tables of every occupied slot outside `named` (adoption).
    pub fn release_unnamed(&mut self, named: &std::collections::BTreeSet<u32>) -> usize {
        self.pool.release_unnamed(named)
    }

    /// Leave the tables as the janitor does once no burst is held, now
    /// (tests): replaced tables ready again, tables beyond the pool freed.
    pub fn settle_tables(&self) -> Result<()> {
        self.pool.settle(self.tables.data())
    }

    /// (occupied slots, ready tables, cooling or retired slots, tables
    /// created so far).
    pub fn table_counts(&self) -> (usize, usize, usize, u64) {
        self.pool.counts()
    }

    /// Publications that found no ready table (tests, `POOL_BURST`).
    pub fn pool_dry_takes(&self) -> u64 {
        self.pool.dry_takes()
    }

    /// The table in slot `slot`, if any.
    fn table_map(&self, slot: u32) -> Result<Option<Array<MapData, TableLine>>> {
        table_in(&self.tables, slot)
    }

    /// The first `len` entries of the table in slot `slot` (adoption reads
    /// the published tables back).
    pub fn read_table(&mut self, slot: u32, len: u32) -> Result<Vec<u32>> {
        let map = self.table_map(slot)?.with_context(|| format!("no table in slot {slot}"))?;
        if let Some(b) = memlock(map.map()) {
            self.pool.note(slot, b);
        }
        if TableLine::elements(len) > map.len() {
            bail!("the table in slot {slot} has {} entries, not {len}", map.len() * lb_common::TABLE_LANES);
        }
        TableMem::map(map.map(), len, false)?.read(len)
    }

    /// One entry of the table in slot `slot` (diagnosis).
    pub fn table_entry(&self, slot: u32, index: u32) -> Result<u32> {
        let map = self.table_map(slot)?.with_context(|| format!("no table in slot {slot}"))?;
        let line = map.get(&TableLine::element(index), 0).with_context(|| format!("cannot read entry {index} of the table in slot {slot}"))?;
        Ok(line.entry(index))
    }

    /// Kernel id of the table in slot `slot`, if any (tests tell a new
    /// table from a freed one by it).
    pub fn table_id(&self, slot: u32) -> Result<Option<u32>> {
        Ok(match self.table_map(slot)? {
            Some(m) => Some(m.map().info().context("table info")?.id()),
            None => None,
        })
    }

    /// Slots that hold a table, as the kernel says.
    pub fn occupied_slots(&self) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        for slot in 0..self.opts.table_slots() {
            if self.table_map(slot)?.is_some() {
                out.push(slot);
            }
        }
        Ok(out)
    }

    /// Bytes of the table array and of every table in it, as the kernel
    /// charges them.
    pub fn tables_bytes(&self) -> u64 {
        memlock(self.tables.data()).unwrap_or(0) + self.pool.bytes()
    }
}

/// The table in slot `slot` of `tables`, if any (the placeholder of an
/// emptied slot is none).
fn table_in(tables: &Tables, slot: u32) -> Result<Option<Array<MapData, TableLine>>> {
    match tables.typed()?.get(&slot, 0) {
        Ok(m) => {
            let name = m.map().info().ok().and_then(|i| i.name_as_str().map(str::to_string));
            Ok((name.as_deref() != Some(EMPTY_MAP_NAME)).then_some(m))
        }
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read slot {slot} of {}", lb_common::map_names::TABLES)),
    }
}

/// The pool over the loaded table array, with the tables already in it
/// (pinned maps of an earlier agent).
pub(super) fn pool(tables: &Tables, opts: &super::LoadOptions) -> Result<Pool> {
    let mut occupied = std::collections::HashMap::new();
    for slot in 0..opts.table_slots() {
        if let Some(m) = table_in(tables, slot)? {
            occupied.insert(slot, memlock(m.map()).unwrap_or(m.len() as u64 * std::mem::size_of::<TableLine>() as u64));
        }
    }
    Pool::new(tables.data(), opts.table_slots(), opts.ring_size, occupied)
}
