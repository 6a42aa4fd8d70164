//! Sizes fixed when the datapath is loaded, and how it ended up attached.

use anyhow::{bail, Result};
use lb_common::{
    ct::{ct_bytes, ct_sets},
    DEFAULT_CONNTRACK_SIZE, DEFAULT_MAX_TABLES, DEFAULT_MAX_VIPS, DEFAULT_PERSIST_SIZE, DEFAULT_RING_SIZE, MAX_RING_SIZE, SPARE_TABLE_SLOTS,
};

use crate::maglev::is_prime;

/// Most table slots (`--max-tables`; each costs 8 bytes until used).
pub const MAX_TABLES: u32 = 1 << 16;

/// Sizes fixed at load time.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Number of VIPs (ids; the VIP map holds them and their aliases).
    pub max_vips: u32,
    /// Number of VIPs that may have a table at once (table slots; a table
    /// is allocated only when published).
    pub max_tables: u32,
    /// Entries of each Maglev table (a prime).
    pub ring_size: u32,
    /// Capacity of the connection table.
    pub conntrack_size: u32,
    /// Capacity of the source-hash persistence table.
    pub persist_size: u32,
    /// Log unusual verdicts from the datapath (aya-log).
    pub debug: bool,
    /// Keep each connection-table entry's key beside it (`xlb flows`):
    /// one 40-byte store per new flow, and 40 bytes per way of memory.
    pub flow_keys: bool,
    /// Short-header DCID length of `--quic` VIPs' servers (`--quic-cid-len`).
    pub quic_cid_len: crate::quic::CidLen,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            max_vips: DEFAULT_MAX_VIPS,
            max_tables: DEFAULT_MAX_TABLES,
            ring_size: DEFAULT_RING_SIZE,
            conntrack_size: DEFAULT_CONNTRACK_SIZE,
            persist_size: DEFAULT_PERSIST_SIZE,
            debug: false,
            flow_keys: false,
            quic_cid_len: Default::default(),
        }
    }
}

impl LoadOptions {
    /// Reject sizes the datapath cannot use.
    pub fn validate(&self) -> Result<()> {
        if !is_prime(self.ring_size) || self.ring_size > MAX_RING_SIZE {
            bail!("ring size {} must be a prime no larger than {MAX_RING_SIZE}", self.ring_size);
        }
        if !(1..=4096).contains(&self.max_vips) {
            bail!("max VIPs {} out of range 1..=4096", self.max_vips);
        }
        if self.max_tables == 0 {
            bail!("max tables must be at least 1");
        }
        if self.max_tables > MAX_TABLES {
            bail!("max tables {} out of range 1..={MAX_TABLES}", self.max_tables);
        }
        if !(1024..=1 << 27).contains(&self.conntrack_size) {
            bail!("connection table size {} out of range 1024..=134217728", self.conntrack_size);
        }
        if self.persist_size < 1024 {
            bail!("persistence table size {} is below 1024", self.persist_size);
        }
        Ok(())
    }

    /// Bytes of the connection table (sized so that `conntrack_size` live
    /// flows lose at most 1 % of their entries early; see `lb_common::ct`).
    pub fn conntrack_bytes(&self) -> u64 {
        ct_bytes(self.conntrack_size)
    }

    /// Elements of `XLB_CT_KEYS`: one per way with `flow_keys`, else 1.
    pub fn flow_key_slots(&self) -> u32 {
        if self.flow_keys {
            ct_sets(self.conntrack_size) * lb_common::CT_WAYS as u32
        } else {
            1
        }
    }

    /// Number of table slots in `XLB_TABLES` (8 bytes each; a table takes
    /// memory only while in a slot): two per VIP that may have a table (its
    /// table, and a replaced one until it is freed, or one reserved for a
    /// burst), the ready pool as it grows for commands one after another
    /// (`POOL_BURST`: with slots for only `POOL_READY`, a VIP changed
    /// every millisecond found the pool empty one time in eleven) and spares.
    pub fn table_slots(&self) -> u32 {
        2 * self.tables() + super::POOL_BURST as u32 + SPARE_TABLE_SLOTS
    }

    /// VIPs that may have backends at once.
    pub fn tables(&self) -> u32 {
        self.max_tables.min(self.max_vips)
    }
}

/// How the program ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// Native (driver) XDP.
    Native,
    /// Generic (skb) XDP.
    Generic,
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
        })
    }
}

/// Entries of the VIP map (and of the prefix-VIP trie): one per VIP plus
/// at most one fragment alias (port 0 of its address and protocol) and one
/// echo entry (`--answer-ping`) per VIP, so `--max-vips N` always means N
/// services.
pub fn vip_map_entries(opts: &LoadOptions) -> u32 {
    opts.max_vips * 3
}
