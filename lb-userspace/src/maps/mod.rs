//! The loaded XDP object and typed handles on every map (layouts from
//! `lb_common`). The agent writes the datapath only through this module; the
//! tests use it too, so they drive the maps exactly as the agent does.
//!
//! Here: loading (maps created or adopted from pins) and the VIP, backend
//! and filter entries. `tables`: the per-VIP lookup table maps; `pool`:
//! slots and ready tables; `slots`: publishing and reading tables; `attach`: the
//! XDP link and the tracing swap; `read`: counters, memory and what
//! diagnosis reads back; `options`: the sizes fixed at load time.

mod attach;
mod options;
mod pool;
mod read;
mod slots;
pub mod tables;

pub use options::{vip_map_entries, AttachMode, LoadOptions};
pub use pool::{POOL_BURST, POOL_READY};
pub use tables::{update_batch, Fill, TableMem};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, ProgramArray},
    programs::Xdp,
    Ebpf, EbpfLoader,
};
use lb_common::{
    ct::{ct_elements, ct_sets},
    map_names, BackendInfo, Counters, CtSeed, CtSet, DecapKey, EncapConfig, PrefixKey, StatBlock, VipInfo, VipKey, MAX_ACCEPT_MACS,
    MAX_BACKENDS, PROG_CLOCK, PROG_DECAP, PROG_ENCAP, PROG_PASS, PROG_TRACE, PROG_XLB, TAIL_ENCAP,
};

use lb_common::trace::{TraceBucket, TraceConfig};

use crate::conntrack::{self, CtView};

/// The XDP object, built by `cargo xtask build` and embedded in the binary.
/// Empty when the binary was built without it (a stand-in: see build.rs).
pub static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb.bpf.o"));

/// The embedded XDP object, or the one-line reason this binary has none.
pub fn xdp_object() -> Result<&'static [u8]> {
    if XDP_OBJECT.is_empty() {
        bail!("this xlb binary was built without its XDP program (an empty stand-in is embedded): build it with `cargo xtask build`");
    }
    Ok(XDP_OBJECT)
}

/// The loaded program and its maps.
pub struct Datapath {
    /// The object (programs; maps were taken out into the fields below).
    pub ebpf: Ebpf,
    /// Sizes it was loaded with.
    pub opts: LoadOptions,
    vips: HashMap<MapData, VipKey, VipInfo>,
    vip_prefix: aya::maps::lpm_trie::LpmTrie<MapData, PrefixKey, VipInfo>,
    prefix_on: Array<MapData, u32>,
    quic_ids: HashMap<MapData, lb_common::QuicIdKey, u32>,
    backends: Array<MapData, BackendInfo>,
    tables: tables::Tables,
    /// Its slots, ready tables and janitor.
    pool: pool::Pool,
    conntrack: Array<MapData, CtSet>,
    ct_seed: CtSeed,
    stats: PerCpuArray<MapData, StatBlock>,
    vip_filter: Array<MapData, u32>,
    backend_stats: PerCpuArray<MapData, Counters>,
    backend_conns: Array<MapData, i64>,
    macs: Array<MapData, u64>,
    encap: Array<MapData, EncapConfig>,
    encap_cfg: EncapConfig,
    /// Held open: the kernel empties a program array nobody holds.
    _progs: ProgramArray<MapData>,
    decap_vips: HashMap<MapData, DecapKey, u32>,
    conntrack_id: u32,
    ncpus: usize,
    last_link: Option<aya::programs::xdp::XdpLinkId>,
    /// Where the interface's link is pinned (set by `attach_pinned`).
    link_pin: Option<std::path::PathBuf>,
    /// Which program the link runs (`PROG_XLB`, or `PROG_TRACE` while tracing).
    running: &'static str,
    flow_keys: Array<MapData, lb_common::FlowKey>,
    trace_ring: aya::maps::RingBuf<MapData>,
    trace_cfg: Array<MapData, TraceConfig>,
    trace_tb: PerCpuArray<MapData, TraceBucket>,
}

/// The pinned maps' view of a running deployment.
#[derive(Debug, Default)]
pub struct PinnedScan {
    /// Every VIP entry (fragment aliases on port 0 included).
    pub vips: Vec<(VipKey, VipInfo)>,
    /// Every prefix-VIP entry: (key, address prefix length, value).
    pub prefixes: Vec<(VipKey, u8, VipInfo)>,
    /// Every backend entry, by id (free ids keep their generation).
    pub backends: Vec<BackendInfo>,
    /// Non-zero VIP pre-filter indexes.
    pub filter: Vec<u32>,
    /// Every QUIC server-ID entry.
    pub quic_ids: Vec<(lb_common::QuicIdKey, u32)>,
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(ebpf: &mut Ebpf, name: &str) -> Result<T> {
    let map = ebpf.take_map(name).ok_or_else(|| anyhow!("map {name} missing from the XDP object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// The decap map's key for an inner destination.
pub fn decap_key(ip: std::net::IpAddr) -> DecapKey {
    match ip {
        std::net::IpAddr::V4(a) => DecapKey { addr: lb_common::addr_v4(a.octets()), family: lb_common::FAMILY_V4, _pad: [0; 3] },
        std::net::IpAddr::V6(a) => DecapKey { addr: a.octets(), family: lb_common::FAMILY_V6, _pad: [0; 3] },
    }
}

/// Allow BPF maps to be locked in memory. Kernels ≥ 5.11 charge BPF memory to
/// the cgroup instead, so a refusal (no CAP_SYS_RESOURCE) is only logged.
pub fn raise_memlock() {
    let lim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) } != 0 {
        log::debug!("could not raise RLIMIT_MEMLOCK ({}); relying on cgroup accounting", std::io::Error::last_os_error());
    }
}

/// Lines of the verifier's log shown in an error (its end says why).
const VERIFIER_LOG_TAIL: usize = 60;

/// A load error with the end of the verifier's log; the whole log (it can
/// run to megabytes) goes to a file named in the message.
fn verifier_error(name: &str, e: aya::programs::ProgramError) -> anyhow::Error {
    let aya::programs::ProgramError::LoadError { io_error, verifier_log } = e else {
        return anyhow::Error::new(e).context(format!("cannot load XDP program {name}"));
    };
    let log = verifier_log.to_string();
    let lines: Vec<&str> = log.lines().collect();
    let path = std::env::temp_dir().join(format!("xlb-verifier-{name}.log"));
    let saved = std::fs::write(&path, &log).is_ok();
    let tail = lines[lines.len().saturating_sub(VERIFIER_LOG_TAIL)..].join("\n");
    anyhow!(
        "the kernel's verifier rejected XDP program {name} ({io_error}); last {} of {} log lines{}:\n{tail}",
        lines.len().min(VERIFIER_LOG_TAIL),
        lines.len(),
        if saved { format!(", whole log in {}", path.display()) } else { String::new() }
    )
}

impl Datapath {
    /// Instructions the verifier processed for the balancer (kernel ≥ 5.16).
    pub fn verified_insns(&mut self) -> Option<u32> {
        self.program(PROG_XLB).ok()?.info().ok()?.verified_instruction_count()
    }

    /// Load the embedded object (verifier included) without attaching it.
    pub fn load(opts: LoadOptions) -> Result<Datapath> {
        Self::load_pinned(opts, None)
    }

    /// Load the embedded object; with `pin_dir`, every map is pinned there,
    /// and maps already pinned there are reused as they are (contents
    /// included: that is how a restarted agent keeps the connection table).
    pub fn load_pinned(opts: LoadOptions, pin_dir: Option<&std::path::Path>) -> Result<Datapath> {
        opts.validate()?;
        raise_memlock();
        let debug: u8 = opts.debug as u8;
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&str, std::path::PathBuf)> =
            pin_dir.map(|d| map_names::ALL.iter().map(|n| (*n, d.join(n))).collect()).unwrap_or_default();
        // A pinned table keeps its seed; a new one gets a random seed.
        let pinned_seed = match pin_dir {
            Some(d) => conntrack::pinned_seed(&d.join(map_names::CONNTRACK), opts.conntrack_size)?,
            None => None,
        };
        let ct_seed = match pinned_seed {
            Some(s) => s,
            None => conntrack::random_seed()?,
        };
        let sets = ct_sets(opts.conntrack_size);
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .map_max_entries(map_names::VIPS, vip_map_entries(&opts))
            .map_max_entries(map_names::VIP_PREFIX, vip_map_entries(&opts))
            .map_max_entries(map_names::TABLES, opts.table_slots())
            .map_max_entries(map_names::CONNTRACK, ct_elements(opts.conntrack_size))
            .map_max_entries(map_names::PERSIST, opts.persist_size)
            .map_max_entries(map_names::RR, opts.max_vips)
            .map_max_entries(map_names::FLOW_KEYS, opts.flow_key_slots())
            .override_global("XLB_FLOW_KEYS", &(opts.flow_keys as u8), true)
            .override_global("XLB_DEBUG", &debug, true)
            .override_global("XLB_CT_SETS", &sets, true)
            .override_global("XLB_QUIC_CID_LEN", &opts.quic_cid_len.0, true)
            .override_global("XLB_CT_SEED", &ct_seed.k, true)
            .override_global("XLB_CT_CLOCK", &crate::conntrack::datapath_clock(), true)
            .load(xdp_object()?)
            .context("cannot load the XDP object (creating its maps)")?;
        for name in [PROG_XLB, PROG_TRACE, PROG_PASS, PROG_DECAP, PROG_ENCAP, PROG_CLOCK] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the XDP object"))?
                .try_into()
                .with_context(|| format!("program {name} is not XDP"))?;
            if let Err(e) = prog.load() {
                return Err(verifier_error(name, e));
            }
            if let Ok(Some(n)) = prog.info().map(|i| i.verified_instruction_count()) {
                log::debug!("XDP program {name} verified: {n} instructions processed");
            }
        }
        {
            let clock: &Xdp = ebpf.program(PROG_CLOCK).context("xlb_clock")?.try_into()?;
            crate::conntrack::calibrate_clock(clock)?;
        }
        let mut progs: ProgramArray<MapData> = take(&mut ebpf, map_names::PROGS)?;
        {
            let encap: &mut Xdp = ebpf.program_mut(PROG_ENCAP).context("xlb_encap")?.try_into()?;
            let fd = encap.fd().context("xlb_encap is not loaded")?;
            progs.set(TAIL_ENCAP, fd, 0).context("cannot set the tail-call target xlb_encap")?;
        }
        let ncpus = aya::util::nr_cpus().map_err(|(p, e)| anyhow!("cannot read {p}: {e}"))?;
        let conntrack: Array<MapData, CtSet> = take(&mut ebpf, map_names::CONNTRACK)?;
        let conntrack_id = {
            use aya::maps::IterableMap;
            conntrack.map().info().context("connection table info")?.id()
        };
        if pinned_seed.is_none() {
            use aya::maps::IterableMap;
            CtView::map(conntrack.map(), opts.conntrack_size, true)?.write_seed(&ct_seed);
        }
        let tables = tables::Tables::new(ebpf.take_map(map_names::TABLES).ok_or_else(|| anyhow!("map {} missing from the XDP object", map_names::TABLES))?)?;
        let pool = slots::pool(&tables, &opts)?;
        let dp = Datapath {
            vips: take(&mut ebpf, map_names::VIPS)?,
            vip_prefix: take(&mut ebpf, map_names::VIP_PREFIX)?,
            prefix_on: take(&mut ebpf, map_names::PREFIX_ON)?,
            quic_ids: take(&mut ebpf, map_names::QUIC_IDS)?,
            backends: take(&mut ebpf, map_names::BACKENDS)?,
            pool,
            tables,
            conntrack,
            conntrack_id,
            ct_seed,
            backend_conns: take(&mut ebpf, map_names::BACKEND_CONNS)?,
            macs: take(&mut ebpf, map_names::MACS)?,
            encap: take(&mut ebpf, map_names::ENCAP)?,
            _progs: progs,
            encap_cfg: EncapConfig::default(),
            decap_vips: take(&mut ebpf, map_names::DECAP_VIPS)?,
            stats: take(&mut ebpf, map_names::STATS)?,
            vip_filter: take(&mut ebpf, map_names::VIP_FILTER)?,
            backend_stats: take(&mut ebpf, map_names::BACKEND_STATS)?,
            flow_keys: take(&mut ebpf, map_names::FLOW_KEYS)?,
            trace_ring: take(&mut ebpf, map_names::TRACE)?,
            trace_cfg: take(&mut ebpf, map_names::TRACE_CFG)?,
            trace_tb: take(&mut ebpf, map_names::TRACE_TB)?,
            ebpf,
            opts,
            ncpus,
            last_link: None,
            link_pin: None,
            running: PROG_XLB,
        };
        Ok(dp)
    }

    /// The load balancer program (for attaching or BPF_PROG_TEST_RUN).
    pub fn program(&mut self, name: &str) -> Result<&mut Xdp> {
        self.ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing"))?
            .try_into()
            .with_context(|| format!("program {name} is not XDP"))
    }

    /// Kernel id of the loaded balancer program.
    pub fn program_id(&self) -> Option<u32> {
        match self.ebpf.program(PROG_XLB)? {
            aya::programs::Program::Xdp(p) => p.info().ok().map(|i| i.id()),
            _ => None,
        }
    }


    /// Everything the pinned maps say about the running state (for an agent
    /// adopting them): VIP entries, and every backend entry.
    pub fn scan(&self) -> Result<PinnedScan> {
        let mut vips = Vec::new();
        for kv in self.vips.iter() {
            vips.push(kv.context("cannot read the VIP map")?);
        }
        let mut backends = Vec::with_capacity(MAX_BACKENDS as usize);
        for id in 0..MAX_BACKENDS {
            backends.push(self.backends.get(&id, 0).context("cannot read the backend map")?);
        }
        let mut filter = Vec::new();
        for idx in 0..lb_common::VIP_FILTER_SIZE {
            if self.vip_filter.get(&idx, 0).context("cannot read the VIP filter")? != 0 {
                filter.push(idx);
            }
        }
        let mut prefixes = Vec::new();
        for kv in self.vip_prefix.iter() {
            let (k, v) = kv.context("cannot read the prefix-VIP map")?;
            let len = k.prefix_len().saturating_sub(lb_common::PREFIX_KEY_FIXED_BITS) as u8;
            prefixes.push((k.data().vip_key(), len, v));
        }
        let mut quic_ids = Vec::new();
        for kv in self.quic_ids.iter() {
            quic_ids.push(kv.context("cannot read the QUIC server-ID map")?);
        }
        Ok(PinnedScan { vips, prefixes, backends, filter, quic_ids })
    }


    /// Insert or replace a VIP entry (atomic for readers).
    pub fn set_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<()> {
        self.vips.insert(key, info, 0).context("cannot write the VIP map")
    }

    /// Remove a VIP entry.
    pub fn del_vip(&mut self, key: &VipKey) -> Result<()> {
        self.vips.remove(key).context("cannot remove from the VIP map")
    }

    /// Insert or replace a prefix-VIP entry (`key`'s address is the network,
    /// `len` its prefix length).
    pub fn set_prefix_vip(&mut self, key: &VipKey, len: u8, info: &VipInfo) -> Result<()> {
        let k = aya::maps::lpm_trie::Key::new(PrefixKey::bits(len as u32), PrefixKey::of(key));
        self.vip_prefix.insert(&k, info, 0).context("cannot write the prefix-VIP map")
    }

    /// Remove a prefix-VIP entry.
    pub fn del_prefix_vip(&mut self, key: &VipKey, len: u8) -> Result<()> {
        let k = aya::maps::lpm_trie::Key::new(PrefixKey::bits(len as u32), PrefixKey::of(key));
        self.vip_prefix.remove(&k).context("cannot remove from the prefix-VIP map")
    }

    /// Map (VIP id, QUIC server ID) to a backend id, or remove the mapping.
    pub fn set_quic_id(&mut self, vip_id: u32, server_id: u16, backend: Option<u32>) -> Result<()> {
        let k = lb_common::QuicIdKey::new(vip_id, server_id);
        match backend {
            Some(b) => self.quic_ids.insert(k, b, 0).context("cannot write the QUIC server-ID map"),
            None => match self.quic_ids.remove(&k) {
                Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                r => r.context("cannot remove from the QUIC server-ID map"),
            },
        }
    }

    /// Set the number of prefix VIPs (0 turns every trie lookup off).
    pub fn set_prefix_count(&mut self, n: u32) -> Result<()> {
        self.prefix_on.set(0, n, 0).context("cannot write the prefix-VIP gate")
    }

    /// Write a backend entry.
    pub fn set_backend(&mut self, id: u32, info: &BackendInfo) -> Result<()> {
        self.backends.set(id, info, 0).context("cannot write the backend map")
    }


    /// The destination MACs the datapath acts on: the interface's first,
    /// then the accepted ones (e.g. keepalived's VRRP MAC); frames to any
    /// other MAC pass to the kernel (`pass_other_mac`).
    pub fn set_accepted_macs(&mut self, macs: &[[u8; 6]]) -> Result<()> {
        if macs.is_empty() {
            bail!("the interface's own MAC must be accepted");
        }
        if macs.len() > MAX_ACCEPT_MACS as usize {
            bail!("at most {} --accept-mac addresses besides the interface's own", MAX_ACCEPT_MACS - 1);
        }
        if let Some(m) = macs.iter().find(|m| m[0] & 1 == 1 || **m == [0; 6]) {
            bail!("{} is not a unicast MAC address", crate::config::Mac(*m));
        }
        for i in 0..MAX_ACCEPT_MACS {
            let v = macs.get(i as usize).map(lb_common::mac_key).unwrap_or(0);
            self.macs.set(i, v, 0).context("cannot write the MAC map")?;
        }
        Ok(())
    }

    /// Act on frames to any MAC: for measurement harnesses only, whose
    /// repeated runs see the frame the previous run rewrote (addressed to
    /// the backend by then). The agent never does this.
    pub fn accept_any_mac(&mut self) -> Result<()> {
        for i in 0..MAX_ACCEPT_MACS {
            self.macs.set(i, 0, 0).context("cannot write the MAC map")?;
        }
        Ok(())
    }

    /// Set the encapsulation settings (outer sources, GUE port; routed
    /// backends, and `xlb decap`'s GUE port).
    pub fn set_encap(&mut self, cfg: &EncapConfig) -> Result<()> {
        self.encap.set(0, *cfg, 0).context("cannot write the encapsulation settings")?;
        self.encap_cfg = *cfg;
        Ok(())
    }

    /// The encapsulation settings last set.
    pub fn encap_config(&self) -> EncapConfig {
        self.encap_cfg
    }

    /// `xlb decap`: accept tunnel packets whose inner destination is one of `addrs`.
    pub fn set_decap_vips(&mut self, addrs: &[std::net::IpAddr]) -> Result<()> {
        for ip in addrs {
            self.decap_vips.insert(decap_key(*ip), 1, 0).with_context(|| format!("cannot add {ip} to the decap map"))?;
        }
        Ok(())
    }



    /// Capacity of the backend array.
    pub fn max_backends(&self) -> u32 {
        MAX_BACKENDS
    }

    /// The VIP entry the datapath reads for `key` now, if any (diagnosis).
    pub fn vip_entry(&self, key: &VipKey) -> Result<Option<VipInfo>> {
        match self.vips.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("cannot read the VIP map"),
        }
    }

    /// The prefix VIP the datapath's trie gives `key` now (longest match;
    /// `None` while no prefix VIP exists, the datapath then skips the
    /// trie, or when none matches) (diagnosis).
    pub fn prefix_entry(&self, key: &VipKey) -> Result<Option<VipInfo>> {
        if self.prefix_on.get(&0, 0).context("cannot read the prefix-VIP gate")? == 0 {
            return Ok(None);
        }
        let bits = if key.plain_family() == lb_common::FAMILY_V6 { 128 } else { 32 };
        let k = aya::maps::lpm_trie::Key::new(PrefixKey::bits(bits), PrefixKey::of(key));
        match self.vip_prefix.get(&k, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("cannot read the prefix-VIP map"),
        }
    }

    /// The VIP pre-filter's value for an address (diagnosis).
    pub fn filter_entry(&self, key: &VipKey) -> Result<u32> {
        let idx = lb_common::vip_filter_index(&key.addr, key.plain_family());
        self.vip_filter.get(&idx, 0).context("cannot read the VIP filter")
    }

    /// A backend entry as the datapath reads it now (diagnosis).
    pub fn backend_entry(&self, id: u32) -> Result<BackendInfo> {
        self.backends.get(&id, 0).context("cannot read the backend map")
    }

}

impl Drop for Datapath {
    /// An agent that exits while a trace runs puts the balancer back first.
    fn drop(&mut self) {
        if self.running != PROG_XLB {
            if let Err(e) = self.switch_program(PROG_XLB) {
                log::warn!("could not swap the tracing program out: {e:#}");
            }
        }
    }
}
