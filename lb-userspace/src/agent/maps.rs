//! The agent's narrow view of the datapath: the writes and reads it needs,
//! nothing else. `Datapath` (the loaded object) implements it for real;
//! `MemMaps` implements it in memory, so planning, coalescing, health state
//! machines, limits and reload are unit-tested without BPF or root.

use anyhow::{bail, Result};
use lb_common::{BackendInfo, Counters, VipInfo, VipKey};
use std::collections::HashMap;

use crate::maps::{Datapath, LoadOptions};

/// Number of global counters.
const STATS: usize = lb_common::stats::STAT_COUNT as usize;

/// What the agent reads and writes in the datapath.
pub trait Maps {
    /// Sizes the maps were created with.
    fn opts(&self) -> LoadOptions;
    /// Capacity of the backend array.
    fn max_backends(&self) -> u32;
    /// Insert or replace a VIP entry (atomic for readers).
    fn set_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<()>;
    /// Remove a VIP entry.
    fn del_vip(&mut self, key: &VipKey) -> Result<()>;
    /// Insert or replace a prefix-VIP entry (network `key`, length `len`).
    fn set_prefix_vip(&mut self, key: &VipKey, len: u8, info: &VipInfo) -> Result<()>;
    /// Remove a prefix-VIP entry.
    fn del_prefix_vip(&mut self, key: &VipKey, len: u8) -> Result<()>;
    /// Set the number of prefix VIPs (0: the datapath never reads the trie).
    fn set_prefix_count(&mut self, n: u32) -> Result<()>;
    /// Map (VIP id, QUIC server ID) to a backend id, or remove the mapping.
    fn set_quic_id(&mut self, vip_id: u32, server_id: u16, backend: Option<u32>) -> Result<()>;
    /// Write a backend entry.
    fn set_backend(&mut self, id: u32, info: &BackendInfo) -> Result<()>;
    /// Put `table` in a new table in a slot no entry names and return the
    /// slot (readers see it once a VIP entry names the slot).
    fn write_table(&mut self, table: &[u32]) -> Result<u32>;
    /// Have `n` new tables ready (before a burst of publications).
    fn reserve_tables(&mut self, n: usize) -> Result<()>;
    /// Free the table in `slot` (no entry names it any more).
    fn free_table(&mut self, slot: u32);
    /// Have `n` tables ready soon and for `hold`, without waiting (a burst
    /// of publications may follow).
    fn prepare_tables(&mut self, n: usize, hold: std::time::Duration);
    /// The first `len` entries of the table in `slot`.
    fn read_table(&mut self, slot: u32, len: u32) -> Result<Vec<u32>>;
    /// Free every table in a slot outside `named` (adoption); how many.
    fn release_unnamed(&mut self, named: &std::collections::BTreeSet<u32>) -> usize;
    /// Set a VIP pre-filter entry.
    fn set_vip_filter(&mut self, idx: u32, n: u32) -> Result<()>;
    /// Traffic counters of a backend id (summed over CPUs).
    fn backend_counters(&self, id: u32) -> Result<Counters>;
    /// Zero a backend id's counters.
    fn reset_backend_counters(&mut self, id: u32) -> Result<()>;
    /// Active flows of a backend id.
    fn backend_conns(&self, id: u32) -> Result<i64>;
    /// Set a backend id's active-flow count.
    fn set_backend_conns(&mut self, id: u32, n: i64) -> Result<()>;
    /// Global counters summed over CPUs.
    fn stats(&self) -> Result<[u64; STATS]>;
    /// Kernel id of the loaded program, if any.
    fn program_id(&self) -> Option<u32>;
    /// Memory of each map, bytes.
    fn memory(&self) -> std::collections::BTreeMap<String, u64>;
    /// The destination MACs the datapath acts on (the interface's first).
    fn set_accepted_macs(&mut self, macs: &[[u8; 6]]) -> Result<()>;
    /// The encapsulation settings (routed backends need a source address
    /// of their family). In memory: both families have one.
    fn encap_config(&self) -> lb_common::EncapConfig {
        lb_common::EncapConfig { flags: lb_common::ENCAP_F_SRC4 | lb_common::ENCAP_F_SRC6, ..Default::default() }
    }
}

impl Maps for Datapath {
    fn opts(&self) -> LoadOptions {
        self.opts
    }
    fn encap_config(&self) -> lb_common::EncapConfig {
        Datapath::encap_config(self)
    }
    fn max_backends(&self) -> u32 {
        Datapath::max_backends(self)
    }
    fn set_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<()> {
        Datapath::set_vip(self, key, info)
    }
    fn del_vip(&mut self, key: &VipKey) -> Result<()> {
        Datapath::del_vip(self, key)
    }
    fn set_prefix_vip(&mut self, key: &VipKey, len: u8, info: &VipInfo) -> Result<()> {
        Datapath::set_prefix_vip(self, key, len, info)
    }
    fn del_prefix_vip(&mut self, key: &VipKey, len: u8) -> Result<()> {
        Datapath::del_prefix_vip(self, key, len)
    }
    fn set_prefix_count(&mut self, n: u32) -> Result<()> {
        Datapath::set_prefix_count(self, n)
    }
    fn set_backend(&mut self, id: u32, info: &BackendInfo) -> Result<()> {
        Datapath::set_backend(self, id, info)
    }
    fn set_quic_id(&mut self, vip_id: u32, server_id: u16, backend: Option<u32>) -> Result<()> {
        Datapath::set_quic_id(self, vip_id, server_id, backend)
    }
    fn write_table(&mut self, table: &[u32]) -> Result<u32> {
        Datapath::write_table(self, table)
    }
    fn reserve_tables(&mut self, n: usize) -> Result<()> {
        Datapath::reserve_tables(self, n)
    }
    fn free_table(&mut self, slot: u32) {
        Datapath::free_table(self, slot)
    }
    fn prepare_tables(&mut self, n: usize, hold: std::time::Duration) {
        Datapath::prepare_tables(self, n, hold)
    }
    fn read_table(&mut self, slot: u32, len: u32) -> Result<Vec<u32>> {
        Datapath::read_table(self, slot, len)
    }
    fn release_unnamed(&mut self, named: &std::collections::BTreeSet<u32>) -> usize {
        Datapath::release_unnamed(self, named)
    }
    fn set_vip_filter(&mut self, idx: u32, n: u32) -> Result<()> {
        Datapath::set_vip_filter(self, idx, n)
    }
    fn backend_counters(&self, id: u32) -> Result<Counters> {
        Datapath::backend_counters(self, id)
    }
    fn reset_backend_counters(&mut self, id: u32) -> Result<()> {
        Datapath::reset_backend_counters(self, id)
    }
    fn backend_conns(&self, id: u32) -> Result<i64> {
        Datapath::backend_conns(self, id)
    }
    fn set_backend_conns(&mut self, id: u32, n: i64) -> Result<()> {
        Datapath::set_backend_conns(self, id, n)
    }
    fn stats(&self) -> Result<[u64; STATS]> {
        Datapath::stats(self)
    }
    fn program_id(&self) -> Option<u32> {
        Datapath::program_id(self)
    }
    fn memory(&self) -> std::collections::BTreeMap<String, u64> {
        Datapath::memory(self)
    }
    fn set_accepted_macs(&mut self, macs: &[[u8; 6]]) -> Result<()> {
        Datapath::set_accepted_macs(self, macs)
    }
}

/// The datapath's maps in memory, with a count of every write (tests check
/// that a change touches the tables once).
#[derive(Debug, Default, Clone)]
pub struct MemMaps {
    /// Sizes, as `Datapath::load` would take them.
    pub load: LoadOptions,
    /// VIP map.
    pub vips: HashMap<VipKey, VipInfo>,
    /// Prefix-VIP trie: (network key, length) → value.
    pub prefixes: HashMap<(VipKey, u8), VipInfo>,
    /// Number of prefix VIPs the datapath is told of.
    pub prefix_count: u32,
    /// QUIC server IDs: (VIP id, server ID) → backend id.
    pub quic_ids: HashMap<(u32, u16), u32>,
    /// Backend array (only written entries).
    pub backends: HashMap<u32, BackendInfo>,
    /// Tables by slot (each its own map in the kernel).
    pub tables: HashMap<u32, Vec<u32>>,
    /// Pre-filter entries (only non-zero ones).
    pub filter: HashMap<u32, u32>,
    /// Active flows per backend id.
    pub conns: HashMap<u32, i64>,
    /// Traffic per backend id (tests set it).
    pub counters: HashMap<u32, Counters>,
    /// Tables written (`write_table` calls).
    pub table_writes: usize,
    /// Tables freed.
    pub table_frees: usize,
    /// Most tables reserved at once (`reserve_tables`).
    pub reserved: usize,
    /// Most tables asked for at once by `prepare_tables`.
    pub prepared: usize,
    /// VIP entries written or removed.
    pub vip_writes: usize,
    /// Backend entries written.
    pub backend_writes: usize,
    /// Accepted destination MACs.
    pub macs: Vec<[u8; 6]>,
    /// Tests set it: VIP-entry writes fail (as a failing map's would).
    pub refuse_vip_writes: bool,
}

impl MemMaps {
    /// Empty maps of the given sizes.
    pub fn new(load: LoadOptions) -> MemMaps {
        MemMaps { load, ..Default::default() }
    }

    /// The table the datapath would read for `key` (empty: no table).
    pub fn table(&self, key: &VipKey) -> Vec<u32> {
        self.vips
            .get(key)
            .filter(|i| i.ring_size > 0)
            .and_then(|i| self.tables.get(&i.table_slot))
            .cloned()
            .unwrap_or_default()
    }
}

impl Maps for MemMaps {
    fn opts(&self) -> LoadOptions {
        self.load
    }
    fn max_backends(&self) -> u32 {
        lb_common::MAX_BACKENDS
    }
    fn set_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<()> {
        if self.refuse_vip_writes {
            bail!("cannot write the VIP map: refused (test)");
        }
        // The kernel's hash map refuses a new key beyond its capacity.
        if !self.vips.contains_key(key) && self.vips.len() >= crate::maps::vip_map_entries(&self.load) as usize {
            bail!("cannot write the VIP map: bpf_map_update_elem failed: Argument list too long (os error 7)");
        }
        self.vip_writes += 1;
        self.vips.insert(*key, *info);
        Ok(())
    }
    fn del_vip(&mut self, key: &VipKey) -> Result<()> {
        self.vip_writes += 1;
        match self.vips.remove(key) {
            Some(_) => Ok(()),
            None => bail!("cannot remove from the VIP map: no such entry"),
        }
    }
    fn set_prefix_vip(&mut self, key: &VipKey, len: u8, info: &VipInfo) -> Result<()> {
        if !self.prefixes.contains_key(&(*key, len)) && self.prefixes.len() >= crate::maps::vip_map_entries(&self.load) as usize {
            bail!("cannot write the prefix-VIP map: bpf_map_update_elem failed: Argument list too long (os error 7)");
        }
        self.vip_writes += 1;
        self.prefixes.insert((*key, len), *info);
        Ok(())
    }
    fn del_prefix_vip(&mut self, key: &VipKey, len: u8) -> Result<()> {
        self.vip_writes += 1;
        match self.prefixes.remove(&(*key, len)) {
            Some(_) => Ok(()),
            None => bail!("cannot remove from the prefix-VIP map: no such entry"),
        }
    }
    fn set_prefix_count(&mut self, n: u32) -> Result<()> {
        self.prefix_count = n;
        Ok(())
    }
    fn set_quic_id(&mut self, vip_id: u32, server_id: u16, backend: Option<u32>) -> Result<()> {
        match backend {
            Some(b) => self.quic_ids.insert((vip_id, server_id), b),
            None => self.quic_ids.remove(&(vip_id, server_id)),
        };
        Ok(())
    }
    fn set_backend(&mut self, id: u32, info: &BackendInfo) -> Result<()> {
        if id >= lb_common::MAX_BACKENDS {
            bail!("backend id {id} out of range");
        }
        self.backend_writes += 1;
        self.backends.insert(id, *info);
        Ok(())
    }
    fn write_table(&mut self, table: &[u32]) -> Result<u32> {
        if table.is_empty() || table.len() > self.load.ring_size as usize {
            bail!("table size {} out of range", table.len());
        }
        // A slot no table is in: the datapath may be reading the others.
        let slot = (0..self.load.table_slots()).find(|s| !self.tables.contains_key(s));
        let slot = slot.ok_or_else(|| anyhow::anyhow!("no free table slot"))?;
        self.tables.insert(slot, table.to_vec());
        self.table_writes += 1;
        Ok(slot)
    }
    fn reserve_tables(&mut self, n: usize) -> Result<()> {
        self.reserved = self.reserved.max(n);
        Ok(())
    }
    fn prepare_tables(&mut self, n: usize, _hold: std::time::Duration) {
        self.prepared = self.prepared.max(n);
    }
    fn free_table(&mut self, slot: u32) {
        if self.tables.remove(&slot).is_some() {
            self.table_frees += 1;
        }
    }
    fn release_unnamed(&mut self, named: &std::collections::BTreeSet<u32>) -> usize {
        let loose: Vec<u32> = self.tables.keys().copied().filter(|s| !named.contains(s)).collect();
        for s in &loose {
            self.free_table(*s);
        }
        loose.len()
    }
    fn read_table(&mut self, slot: u32, len: u32) -> Result<Vec<u32>> {
        match self.tables.get(&slot) {
            Some(t) if t.len() >= len as usize => Ok(t[..len as usize].to_vec()),
            _ => bail!("no table of {len} entries in slot {slot}"),
        }
    }

    fn set_vip_filter(&mut self, idx: u32, n: u32) -> Result<()> {
        if n == 0 {
            self.filter.remove(&idx);
        } else {
            self.filter.insert(idx, n);
        }
        Ok(())
    }
    fn backend_counters(&self, id: u32) -> Result<Counters> {
        Ok(self.counters.get(&id).copied().unwrap_or_default())
    }
    fn reset_backend_counters(&mut self, id: u32) -> Result<()> {
        self.counters.remove(&id);
        Ok(())
    }
    fn backend_conns(&self, id: u32) -> Result<i64> {
        Ok(self.conns.get(&id).copied().unwrap_or(0).max(0))
    }
    fn set_backend_conns(&mut self, id: u32, n: i64) -> Result<()> {
        self.conns.insert(id, n);
        Ok(())
    }
    fn stats(&self) -> Result<[u64; STATS]> {
        Ok([0; STATS])
    }
    fn program_id(&self) -> Option<u32> {
        None
    }
    fn memory(&self) -> std::collections::BTreeMap<String, u64> {
        let bytes = self.tables.values().map(|t| lb_common::TableLine::bytes(t.len() as u32)).sum();
        [(lb_common::map_names::TABLES.to_string(), bytes)].into_iter().collect()
    }
    fn set_accepted_macs(&mut self, macs: &[[u8; 6]]) -> Result<()> {
        if macs.is_empty() || macs.len() > lb_common::MAX_ACCEPT_MACS as usize {
            bail!("between 1 and {} accepted MACs", lb_common::MAX_ACCEPT_MACS);
        }
        self.macs = macs.to_vec();
        Ok(())
    }
}
