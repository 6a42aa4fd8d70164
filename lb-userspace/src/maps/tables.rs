//! Lookup tables: one BPF array per VIP table, created when the table is
//! published and freed when it is replaced or its VIP removed, so memory
//! follows the VIPs actually configured (nothing is preallocated per
//! possible VIP). `XLB_TABLES`, an array of maps, names each table by slot;
//! the VIP entry names the slot (`VipInfo::table_slot`), so switching a VIP
//! to a new table is one VIP-entry update, after the table is complete.

use anyhow::{bail, Context, Result};
use aya::maps::{Array, ArrayOfMaps, IterableMap, Map, MapData};
use std::os::fd::{AsFd, AsRawFd};

use super::Datapath;
use lb_common::TABLE_MAP_FLAGS;

/// The outer array (`XLB_TABLES`), as taken from the object: typed views
/// of it are made per use (aya 0.14 gives a typed array of maps no access
/// to its descriptor, which deleting an entry needs).
pub struct Tables(Map);

impl Tables {
    /// Wrap the object's `XLB_TABLES`, checking its type.
    pub fn new(map: Map) -> Result<Tables> {
        if !matches!(map, Map::ArrayOfMaps(_)) {
            bail!("map {} is not an array of maps", lb_common::map_names::TABLES);
        }
        Ok(Tables(map))
    }

    fn data(&self) -> &MapData {
        match &self.0 {
            Map::ArrayOfMaps(d) => d,
            _ => unreachable!("checked in Tables::new"),
        }
    }

    fn typed(&self) -> Result<ArrayOfMaps<&MapData, Array<MapData, u32>>> {
        ArrayOfMaps::try_from(&self.0).context("the table array has an unexpected type")
    }

    fn typed_mut(&mut self) -> Result<ArrayOfMaps<&mut MapData, Array<MapData, u32>>> {
        ArrayOfMaps::try_from(&mut self.0).context("the table array has an unexpected type")
    }
}

/// Name of every table map (`bpftool map` shows it; at most 15 bytes).
pub const TABLE_MAP_NAME: &str = "XLB_TABLE";

/// Bytes per element of a BPF array: the value size rounded up to 8.
const ELEM: usize = 8;

/// How a new table is filled (both measured by `cargo xtask bench scale`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// Plain stores through a memory mapping of the new (mmapable) array.
    Mmap,
    /// One `BPF_MAP_UPDATE_BATCH`.
    Batch,
}

/// A new, empty table of `entries` elements (`TABLE_MAP_FLAGS`: mmapable,
/// and of any size under the one inner-map template).
pub fn create_table(entries: u32) -> Result<Array<MapData, u32>> {
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let obj = aya_obj::Map::new_from_params(BPF_MAP_TYPE_ARRAY, 4, 4, entries, TABLE_MAP_FLAGS);
    let data = MapData::create(obj, TABLE_MAP_NAME, None).with_context(|| format!("cannot create a table of {entries} entries"))?;
    Array::try_from(Map::Array(data)).context("a new table has an unexpected type")
}

/// Write `table` into a new table map (`create_table(table.len())`).
pub fn fill_table(map: &Array<MapData, u32>, table: &[u32], how: Fill) -> Result<()> {
    match how {
        Fill::Mmap => {
            let mem = TableMem::map(map.map(), table.len() as u32, true)?;
            mem.write(table);
            Ok(())
        }
        Fill::Batch => {
            let keys: Vec<u32> = (0..table.len() as u32).collect();
            update_batch(map.map(), &keys, table)
        }
    }
}

/// A table's values mapped into the agent (`BPF_F_MMAPABLE`).
pub struct TableMem {
    mem: crate::mmap::MapMem,
    entries: u32,
}

impl TableMem {
    /// Map the `entries` elements of `map`.
    pub fn map(map: &MapData, entries: u32, writable: bool) -> Result<TableMem> {
        let mem = crate::mmap::MapMem::new(map, entries as usize * ELEM, writable).context("cannot map a table into memory")?;
        Ok(TableMem { mem, entries })
    }

    /// Write `table` from entry 0. The map is new: the datapath reads it
    /// only after a later VIP-entry update names its slot.
    pub fn write(&self, table: &[u32]) {
        assert!(table.len() <= self.entries as usize, "table write out of bounds");
        let base = self.mem.base::<u8>();
        for (i, id) in table.iter().enumerate() {
            // SAFETY: in bounds (asserted above); element i's value is the
            // first 4 bytes at i × 8 of the mapping, 8-byte aligned; no BPF
            // program reads this map yet (see above).
            unsafe { std::ptr::write_volatile(base.add(i * ELEM) as *mut u32, *id) };
        }
        // The stores are complete before the publishing system calls.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    /// Read the first `len` entries.
    pub fn read(&self, len: u32) -> Result<Vec<u32>> {
        if len > self.entries {
            bail!("table read of {len} entries beyond its {}", self.entries);
        }
        let base = self.mem.base::<u8>();
        Ok((0..len as usize)
            .map(|i| {
                // SAFETY: in bounds (checked above), aligned as in `write`.
                unsafe { std::ptr::read_volatile(base.add(i * ELEM) as *const u32) }
            })
            .collect())
    }
}

/// `BPF_MAP_UPDATE_BATCH` (kernel ≥ 5.6): write `keys[i] → values[i]` of
/// an array of `u32` in one system call (aya 0.14 has no batch operations).
/// A table of 65 537 entries written one `bpf_map_update_elem` at a time
/// costs ~75 ms; in one batch, about a millisecond.
pub fn update_batch(map: &MapData, keys: &[u32], values: &[u32]) -> Result<()> {
    if keys.len() != values.len() || map.info().map(|i| i.value_size() != 4 || i.key_size() != 4).unwrap_or(true) {
        bail!("batch update: {} keys, {} values, or not a u32 → u32 map", keys.len(), values.len());
    }
    /// The `batch` member of `union bpf_attr`.
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    let mut done = 0usize;
    while done < keys.len() {
        let mut attr = BatchAttr {
            in_batch: 0,
            out_batch: 0,
            keys: keys[done..].as_ptr() as u64,
            values: values[done..].as_ptr() as u64,
            count: (keys.len() - done) as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `attr` is a valid `bpf_attr.batch` for the kernel to read
        // (and to write `count` back); `keys` and `values` point at `count`
        // u32s each that stay borrowed for the whole call; the map's key and
        // value sizes were checked to be 4 above.
        let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_UPDATE_BATCH, &mut attr as *mut BatchAttr, std::mem::size_of::<BatchAttr>()) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // EINTR/EAGAIN: `count` says how many were written; go on from there.
            if attr.count as usize > 0 && matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN)) {
                done += attr.count as usize;
                continue;
            }
            return Err(e).context("BPF_MAP_UPDATE_BATCH failed");
        }
        done += attr.count as usize;
    }
    Ok(())
}

/// `bpf_map_delete_elem(map, &key)` (aya 0.14 has no delete for an array
/// of maps). `Ok(false)` when the slot was already empty.
fn delete_elem(map: &MapData, key: u32) -> Result<bool> {
    /// The `map_elem` member of `union bpf_attr`.
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    let attr = ElemAttr { map_fd: map.fd().as_fd().as_raw_fd() as u32, _pad: 0, key: &key as *const u32 as u64, value: 0, flags: 0 };
    // SAFETY: `attr` is a valid `bpf_attr.map_elem` the kernel only reads;
    // `key` points at a u32 (the outer array's key size) alive for the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_DELETE_ELEM, &attr as *const ElemAttr, std::mem::size_of::<ElemAttr>()) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOENT) {
            return Ok(false);
        }
        return Err(e).context("bpf_map_delete_elem failed");
    }
    Ok(true)
}

/// Memory the kernel charges for a map (`memlock` in its fd's fdinfo).
pub(super) fn memlock(m: &MapData) -> Option<u64> {
    let fd = m.fd().as_fd().as_raw_fd();
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("memlock:")).and_then(|v| v.trim().parse().ok())
}

impl Datapath {
    /// Create a table holding `table` and put it in slot `slot` (free: no
    /// VIP entry names it). Readers see it only once a VIP entry is
    /// switched to the slot, so it is never seen half written.
    pub fn write_table(&mut self, slot: u32, table: &[u32]) -> Result<()> {
        if table.is_empty() || table.len() > self.opts.ring_size as usize || slot >= self.opts.table_slots() {
            bail!("table slot {slot} or table size {} out of range", table.len());
        }
        let map = create_table(table.len() as u32)?;
        fill_table(&map, table, self.fill).context("cannot fill a new table")?;
        self.tables.typed_mut()?.set(slot, &map, 0).with_context(|| format!("cannot put a table in slot {slot} of {}", lb_common::map_names::TABLES))?;
        let bytes = memlock(map.map()).unwrap_or(table.len() as u64 * ELEM as u64);
        self.table_bytes.insert(slot, bytes);
        // `map` closes here; the outer array holds the table from now on.
        Ok(())
    }

    /// Empty slot `slot` (after no VIP entry names it any more): the kernel
    /// frees the table once running programs are done with it.
    pub fn free_table(&mut self, slot: u32) -> Result<()> {
        self.table_bytes.remove(&slot);
        delete_elem(self.tables.data(), slot).with_context(|| format!("cannot empty slot {slot} of {}", lb_common::map_names::TABLES))?;
        Ok(())
    }

    /// The table in slot `slot`, if any.
    fn table_map(&self, slot: u32) -> Result<Option<Array<MapData, u32>>> {
        match self.tables.typed()?.get(&slot, 0) {
            Ok(m) => Ok(Some(m)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read slot {slot} of {}", lb_common::map_names::TABLES)),
        }
    }

    /// The first `len` entries of the table in slot `slot` (adoption reads
    /// the published tables back); records the table's memory.
    pub fn read_table(&mut self, slot: u32, len: u32) -> Result<Vec<u32>> {
        let map = self.table_map(slot)?.with_context(|| format!("no table in slot {slot}"))?;
        if let Some(b) = memlock(map.map()) {
            self.table_bytes.insert(slot, b);
        }
        if len > map.len() {
            bail!("the table in slot {slot} has {} entries, not {len}", map.len());
        }
        TableMem::map(map.map(), len, false)?.read(len)
    }

    /// One entry of the table in slot `slot` (diagnosis).
    pub fn table_entry(&self, slot: u32, index: u32) -> Result<u32> {
        let map = self.table_map(slot)?.with_context(|| format!("no table in slot {slot}"))?;
        map.get(&index, 0).with_context(|| format!("cannot read entry {index} of the table in slot {slot}"))
    }

    /// Slots that hold a table (adoption frees those no VIP names).
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
        memlock(self.tables.data()).unwrap_or(0) + self.table_bytes.values().sum::<u64>()
    }

    /// How new tables are filled (benchmarks compare both).
    pub fn set_fill(&mut self, how: Fill) {
        self.fill = how;
    }
}
