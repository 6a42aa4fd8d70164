//! What the agent, `xlb status` and diagnosis read back from the datapath:
//! counters, active flows, memory, connection-table sets, persistence.

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{HashMap, MapData, PerCpuArray, PerCpuValues};
use lb_common::{ct::ct_sets, map_names, Counters, CtSeed, CtSet, Stat};

use super::Datapath;
use crate::conntrack::{ConntrackReader, CtView};

impl Datapath {
    /// The global counter map (to pin it: `xlb decap stats` reads it).
    pub fn stats_map(&self) -> &MapData {
        use aya::maps::IterableMap;
        self.stats.map()
    }

    /// Sum of the global counters over all CPUs.
    pub fn stats(&self) -> Result<[u64; lb_common::stats::STAT_COUNT as usize]> {
        let per_cpu = self.stats.get(&0, 0).context("cannot read the stats map")?;
        let mut out = [0u64; lb_common::stats::STAT_COUNT as usize];
        for b in per_cpu.iter() {
            for (o, v) in out.iter_mut().zip(b.c.iter()) {
                *o += v;
            }
        }
        Ok(out)
    }

    /// One global counter, summed over CPUs.
    pub fn stat(&self, s: Stat) -> Result<u64> {
        Ok(self.stats()?[s as usize])
    }

    fn sum(map: &PerCpuArray<MapData, Counters>, id: u32) -> Result<Counters> {
        let per_cpu = map.get(&id, 0).context("cannot read a counters map")?;
        let mut c = Counters::default();
        for v in per_cpu.iter() {
            c.add(v);
        }
        Ok(c)
    }

    /// Set a VIP pre-filter entry (number of VIP addresses folding there).
    pub fn set_vip_filter(&mut self, idx: u32, n: u32) -> Result<()> {
        self.vip_filter.set(idx, n, 0).context("cannot write the VIP filter")
    }

    /// Traffic counters of a backend id.
    pub fn backend_counters(&self, id: u32) -> Result<Counters> {
        Self::sum(&self.backend_stats, id)
    }

    fn zeros(&self) -> Result<PerCpuValues<Counters>> {
        PerCpuValues::try_from(vec![Counters::default(); self.ncpus]).context("per-CPU values")
    }

    /// Zero a backend id's counters (when the id is given to a new backend).
    pub fn reset_backend_counters(&mut self, id: u32) -> Result<()> {
        let z = self.zeros()?;
        self.backend_stats.set(id, z, 0).context("cannot reset backend counters")
    }

    /// Active flows of a backend id as the datapath counts them.
    pub fn backend_conns(&self, id: u32) -> Result<i64> {
        Ok(self.backend_conns.get(&id, 0).context("cannot read active flows")?.max(0))
    }

    /// Set a backend id's active-flow count (new id: 0; after a census).
    pub fn set_backend_conns(&mut self, id: u32, n: i64) -> Result<()> {
        self.backend_conns.set(id, n, 0).context("cannot write active flows")
    }

    /// A second handle on the connection table (see `ConntrackReader`).
    pub fn conntrack_reader(&self) -> Result<ConntrackReader> {
        let data = MapData::from_id(self.conntrack_id).context("cannot reopen the connection table")?;
        ConntrackReader::new(data, self.opts.conntrack_size)
    }

    /// The connection table, mapped writable (benchmarks and tests fill it).
    pub fn conntrack_view(&self) -> Result<CtView> {
        use aya::maps::IterableMap;
        CtView::map(self.conntrack.map(), self.opts.conntrack_size, true)
    }

    /// The flow-key array (`--flow-keys`), for mapping it read-only.
    pub fn flow_keys_map(&self) -> &MapData {
        use aya::maps::IterableMap;
        self.flow_keys.map()
    }

    /// The connection table's hash seed (tests predict where flows go).
    pub fn conntrack_seed(&self) -> CtSeed {
        self.ct_seed
    }

    /// Memory of each map as the kernel charges it (`memlock` in the map
    /// fd's fdinfo), by map name.
    /// `XLB_TABLES` counts the array and every table in it (tables are
    /// allocated per VIP, so this grows with the VIPs configured).
    pub fn memory(&self) -> std::collections::BTreeMap<String, u64> {
        use aya::maps::IterableMap;
        let fdinfo = super::tables::memlock;
        let mut out = std::collections::BTreeMap::new();
        out.insert(map_names::TABLES.to_string(), self.tables_bytes());
        let ours: [(&str, &MapData); 8] = [
            (map_names::VIPS, self.vips.map()),
            (map_names::VIP_PREFIX, self.vip_prefix.map()),
            (map_names::BACKENDS, self.backends.map()),
            (map_names::CONNTRACK, self.conntrack.map()),
            (map_names::STATS, self.stats.map()),
            (map_names::VIP_FILTER, self.vip_filter.map()),
            (map_names::BACKEND_STATS, self.backend_stats.map()),
            (map_names::BACKEND_CONNS, self.backend_conns.map()),
        ];
        for (name, m) in ours {
            if let Some(n) = fdinfo(m) {
                out.insert(name.to_string(), n);
            }
        }
        for (name, m) in self.ebpf.maps() {
            let data = match m {
                aya::maps::Map::Array(d) | aya::maps::Map::PerCpuArray(d) | aya::maps::Map::HashMap(d) | aya::maps::Map::LruHashMap(d) | aya::maps::Map::PerCpuHashMap(d) => d,
                _ => continue,
            };
            if let Some(n) = map_names::ALL.iter().find(|n| **n == name).and_then(|_| fdinfo(data)) {
                out.insert(name.to_string(), n);
            }
        }
        out
    }

    /// One set of the connection table as it is now (a copy; its ways are
    /// checked against the flow's signature, so a torn copy only misses).
    pub fn conntrack_set(&self, set: u32) -> Result<CtSet> {
        if set >= ct_sets(self.opts.conntrack_size) {
            bail!("connection-table set {set} out of range");
        }
        self.conntrack.get(&set, 0).context("cannot read the connection table")
    }

    /// The source-hash persistence entry of a client for a VIP id, if any.
    pub fn persist_entry(&self, key: &lb_common::PersistKey) -> Result<Option<lb_common::PersistValue>> {
        let map = self.ebpf.map(map_names::PERSIST).ok_or_else(|| anyhow!("map {} missing", map_names::PERSIST))?;
        let persist: HashMap<&MapData, lb_common::PersistKey, lb_common::PersistValue> =
            HashMap::try_from(map).context("the persistence map has an unexpected type")?;
        match persist.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("cannot read the persistence map"),
        }
    }
}
