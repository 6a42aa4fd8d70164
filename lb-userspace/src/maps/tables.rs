//! Lookup tables: one BPF array per VIP table, created for it and freed when
//! it is replaced or its VIP removed, so memory follows the VIPs actually
//! configured (nothing is preallocated per possible VIP). `XLB_TABLES`, an
//! array of maps, holds each table in a slot; the VIP entry names the slot
//! (`VipInfo::table_slot`), so switching a VIP to a new table is one
//! VIP-entry update, after the table is complete. Slots and ready tables:
//! `pool`; publishing and reading tables back: `slots`.

use anyhow::{bail, Context, Result};
use aya::maps::{Array, ArrayOfMaps, IterableMap, Map, MapData};
use std::os::fd::{AsFd, AsRawFd};

use lb_common::{TableLine, TABLE_MAP_FLAGS};

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

    pub(super) fn data(&self) -> &MapData {
        match &self.0 {
            Map::ArrayOfMaps(d) => d,
            _ => unreachable!("checked in Tables::new"),
        }
    }

    pub(super) fn typed(&self) -> Result<ArrayOfMaps<&MapData, Array<MapData, TableLine>>> {
        ArrayOfMaps::try_from(&self.0).context("the table array has an unexpected type")
    }

}

/// Name of every table map (`bpftool map` shows it; at most 15 bytes).
pub const TABLE_MAP_NAME: &str = "XLB_TABLE";

/// How a new table is filled (both measured by `cargo xtask bench scale`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// Plain stores through a memory mapping of the new (mmapable) array.
    Mmap,
    /// One `BPF_MAP_UPDATE_BATCH`.
    Batch,
}

/// Name of the placeholder table that fills emptied slots.
pub const EMPTY_MAP_NAME: &str = "XLB_EMPTY";

/// A new, empty table of `entries` entries (`TableLine::elements` of them;
/// `TABLE_MAP_FLAGS`: mmapable, and of any size under the one inner-map
/// template).
pub fn create_table(entries: u32) -> Result<Array<MapData, TableLine>> {
    create_named(TableLine::elements(entries), TABLE_MAP_NAME)
}

/// The placeholder put in emptied slots: a slot's table is freed by
/// replacing it, which (unlike a delete) can be batched. One element, naming
/// no backend; a packet racing the emptying of its VIP's old slot finds no
/// entry there and is dropped, never sent to another VIP's backend.
pub fn create_placeholder() -> Result<Array<MapData, TableLine>> {
    let mut m = create_named(1, EMPTY_MAP_NAME)?;
    // Beyond the backend array: the datapath finds no backend there.
    m.set(0, TableLine::filled(u32::MAX), 0).context("cannot write the placeholder table")?;
    Ok(m)
}

fn create_named(elements: u32, name: &str) -> Result<Array<MapData, TableLine>> {
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let obj = aya_obj::Map::new_from_params(BPF_MAP_TYPE_ARRAY, 4, std::mem::size_of::<TableLine>() as u32, elements, TABLE_MAP_FLAGS);
    let data = MapData::create(obj, name, None).with_context(|| format!("cannot create a table of {elements} elements"))?;
    Array::try_from(Map::Array(data)).context("a new table has an unexpected type")
}

/// Write `table` into a new table map (`create_table(table.len())`).
pub fn fill_table(map: &Array<MapData, TableLine>, table: &[u32], how: Fill) -> Result<()> {
    match how {
        Fill::Mmap => {
            let mem = TableMem::map(map.map(), table.len() as u32, true)?;
            mem.write(table);
            Ok(())
        }
        Fill::Batch => {
            let lines: Vec<TableLine> = TableLine::lines(table).collect();
            let keys: Vec<u32> = (0..lines.len() as u32).collect();
            update_batch(map.map(), &keys, &lines)
        }
    }
}

/// A table's values mapped into the agent (`BPF_F_MMAPABLE`).
pub struct TableMem {
    mem: crate::mmap::MapMem,
    entries: u32,
}

impl TableMem {
    /// Map the elements of `map` that hold its first `entries` entries.
    pub fn map(map: &MapData, entries: u32, writable: bool) -> Result<TableMem> {
        let mem = crate::mmap::MapMem::new(map, TableLine::bytes(entries) as usize, writable).context("cannot map a table into memory")?;
        Ok(TableMem { mem, entries })
    }

    /// `map`, writable, its pages faulted in now (a ready table).
    pub fn ready(map: &MapData, entries: u32) -> Result<TableMem> {
        let mem = crate::mmap::MapMem::populated(map, TableLine::bytes(entries) as usize, true).context("cannot map a table into memory")?;
        Ok(TableMem { mem, entries })
    }

    /// Entries mapped.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// Write `table` from entry 0. The map is new, or no program can be
    /// reading it any more (`pool`): the datapath reads it only after a
    /// later VIP-entry update names its slot.
    pub fn write(&self, table: &[u32]) {
        assert!(table.len() <= self.entries as usize, "table write out of bounds");
        // SAFETY: entry i is the u32 at byte i × 4 of the mapping (16 per
        // 64-byte element, no padding: `TableLine`), which is page-aligned
        // and at least `TableLine::bytes(entries)` long, and `table` fits
        // (asserted above); no BPF program reads these values (see above).
        unsafe { std::ptr::copy_nonoverlapping(table.as_ptr(), self.mem.base::<u32>(), table.len()) };
        // The stores are complete before the publishing system calls.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    /// Read the first `len` entries.
    pub fn read(&self, len: u32) -> Result<Vec<u32>> {
        if len > self.entries {
            bail!("table read of {len} entries beyond its {}", self.entries);
        }
        let mut out = vec![0u32; len as usize];
        // SAFETY: in bounds (checked above), laid out as in `write`.
        unsafe { std::ptr::copy_nonoverlapping(self.mem.base::<u32>() as *const u32, out.as_mut_ptr(), len as usize) };
        Ok(out)
    }
}

/// `BPF_MAP_UPDATE_BATCH` (kernel ≥ 5.6): write `keys[i] → values[i]` of
/// a map of `u32` keys and `V` values (a table's lines, or an array of maps'
/// fds) in one system call (aya 0.14 has no batch operations). A table of
/// 65 537 entries written one `bpf_map_update_elem` at a time costs ~75 ms.
pub fn update_batch<V: Copy>(map: &MapData, keys: &[u32], values: &[V]) -> Result<()> {
    let sizes_match = map.info().map(|i| i.value_size() as usize == std::mem::size_of::<V>() && i.key_size() == 4).unwrap_or(false);
    if keys.len() != values.len() || !sizes_match {
        bail!("batch update: {} keys, {} values, or not a u32 → {}-byte map", keys.len(), values.len(), std::mem::size_of::<V>());
    }
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    bpf_batch(map, BPF_MAP_UPDATE_BATCH, keys, Some(values)).context("BPF_MAP_UPDATE_BATCH failed")
}

/// One batch command (`BPF_MAP_{UPDATE,DELETE}_BATCH`) over `u32` keys
/// (and values of the map's value size), resumed where the kernel stopped
/// on EINTR/EAGAIN.
fn bpf_batch<V: Copy>(map: &MapData, cmd: libc::c_long, keys: &[u32], values: Option<&[V]>) -> std::io::Result<()> {
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
    let mut done = 0usize;
    while done < keys.len() {
        let mut attr = BatchAttr {
            in_batch: 0,
            out_batch: 0,
            keys: keys[done..].as_ptr() as u64,
            values: values.map_or(0, |v| v[done..].as_ptr() as u64),
            count: (keys.len() - done) as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `attr` is a valid `bpf_attr.batch` for the kernel to read
        // (and to write `count` back); `keys` (and `values`, as long as
        // `keys`: checked by the callers) point at `count` keys and values
        // that stay borrowed for the whole call; the callers check that the
        // map's key size is 4 and its value size `V`'s.
        let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, &mut attr as *mut BatchAttr, std::mem::size_of::<BatchAttr>()) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // EINTR/EAGAIN: `count` says how many were done; go on from there.
            if attr.count as usize > 0 && matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN)) {
                done += attr.count as usize;
                continue;
            }
            return Err(e);
        }
        done += attr.count as usize;
    }
    Ok(())
}

/// Batch operations on the table array (`XLB_TABLES`): each system call
/// that changes an array of maps waits for an RCU grace period, a batch
/// waits once.
pub(super) mod batch {
    use anyhow::{Context, Result};
    use aya::maps::MapData;
    use std::os::fd::{AsFd, AsRawFd};

    /// Put the maps `fds[i]` in slots `slots[i]` (one system call).
    pub fn update(outer: &MapData, slots: &[u32], fds: &[u32]) -> Result<()> {
        super::update_batch(outer, slots, fds)
    }

    /// Empty `slots`: the placeholder `empty` in each (one system call,
    /// one grace period; the kernel frees the tables replaced after it).
    /// Arrays of maps have no batch delete (ENOTSUPP on 6.18), and one
    /// delete per slot waits for one grace period each (8–20 ms).
    pub fn clear(outer: &MapData, slots: &[u32], empty: &MapData) -> Result<()> {
        let fd = empty.fd().as_fd().as_raw_fd() as u32;
        update(outer, slots, &vec![fd; slots.len()]).context("cannot empty table slots")
    }
}

/// Memory the kernel charges for a map (`memlock` in its fd's fdinfo).
pub(super) fn memlock(m: &MapData) -> Option<u64> {
    let fd = m.fd().as_fd().as_raw_fd();
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("memlock:")).and_then(|v| v.trim().parse().ok())
}
