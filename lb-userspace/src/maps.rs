//! The loaded XDP object and typed handles on every map (layouts from
//! `lb_common`). The agent writes the datapath only through this module; the
//! tests use it too, so they drive the maps exactly as the agent does.

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues, ProgramArray},
    programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
        Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::{
    ct::{ct_bytes, ct_elements, ct_sets},
    map_names, BackendInfo, Counters, CtSeed, CtSet, DecapKey, EncapConfig, PrefixKey, Stat, StatBlock, VipInfo, VipKey,
    DEFAULT_CONNTRACK_SIZE, DEFAULT_MAX_TABLES, DEFAULT_MAX_VIPS, DEFAULT_PERSIST_SIZE, DEFAULT_RING_SIZE, MAX_ACCEPT_MACS, MAX_BACKENDS, MAX_RING_SIZE,
    PROG_DECAP, PROG_ENCAP, PROG_PASS, PROG_TRACE, PROG_XLB, SPARE_RING_SLOTS, TAIL_ENCAP,
};

use lb_common::trace::{TraceBucket, TraceConfig, TraceRecord};

use crate::{
    conntrack::{self, ConntrackReader, CtView},
    maglev::is_prime,
};

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

/// Sizes fixed at load time.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Number of VIPs (ids; the VIP map holds them and their aliases).
    pub max_vips: u32,
    /// Number of VIPs that may have backends (a table each; ring slots).
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
        let slots = self.ring_slots() as u64 * self.ring_size as u64;
        if slots > u32::MAX as u64 / 2 {
            bail!("max tables × ring size is too large ({slots} ring entries)");
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

    /// Number of ring slots (tables) in `XLB_RINGS`: one per VIP that may
    /// have backends, plus spares to write a new table beside the old one.
    pub fn ring_slots(&self) -> u32 {
        self.max_tables.min(self.max_vips) + SPARE_RING_SLOTS
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

/// The loaded program and its maps.
pub struct Datapath {
    /// The object (programs; maps were taken out into the fields below).
    pub ebpf: Ebpf,
    /// Sizes it was loaded with.
    pub opts: LoadOptions,
    vips: HashMap<MapData, VipKey, VipInfo>,
    vip_prefix: aya::maps::lpm_trie::LpmTrie<MapData, PrefixKey, VipInfo>,
    prefix_on: Array<MapData, u32>,
    backends: Array<MapData, BackendInfo>,
    rings: Array<MapData, u32>,
    /// The ring array mapped into memory (`BPF_F_MMAPABLE`), when possible.
    ring_mem: Option<RingMem>,
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
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(ebpf: &mut Ebpf, name: &str) -> Result<T> {
    let map = ebpf.take_map(name).ok_or_else(|| anyhow!("map {name} missing from the XDP object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// `BPF_MAP_UPDATE_BATCH` (kernel ≥ 5.6): write `keys[i] → values[i]` of
/// an array of `u32` in one system call (aya 0.14 has no batch operations).
/// A table of 65 537 entries written one `bpf_map_update_elem` at a time
/// costs ~75 ms; in one batch, a few milliseconds. Not atomic for readers:
/// the agent writes only slots the datapath does not read.
pub fn update_batch(map: &MapData, keys: &[u32], values: &[u32]) -> Result<()> {
    use std::os::fd::{AsFd, AsRawFd};
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

/// The ring array (`BPF_F_MMAPABLE`) mapped read-write into the agent: a
/// table of 65 537 entries is then written with plain stores instead of a
/// system call per entry (~75 ms) or one batch update. Only slots the
/// datapath does not read are written (see `Agent`), and a VIP-entry update
/// (a system call, after a fence) publishes them.
pub struct RingMem {
    mem: crate::mmap::MapMem,
    entries: u32,
}

/// Bytes per element of a BPF array: the value size rounded up to 8.
const RING_ELEM: usize = 8;

impl RingMem {
    /// Map `entries` elements of `rings`, or `None` when the map is not
    /// mmapable (e.g. created by an older build).
    pub fn map(rings: &Array<MapData, u32>, entries: u32) -> Option<RingMem> {
        use aya::maps::IterableMap;
        match crate::mmap::MapMem::new(rings.map(), entries as usize * RING_ELEM, true) {
            Ok(mem) => Some(RingMem { mem, entries }),
            Err(e) => {
                log::debug!("mmap of the ring map failed: {e}");
                None
            }
        }
    }

    /// Write `table` at entry `base`.
    pub fn write(&self, base: u32, table: &[u32]) {
        assert!(base as usize + table.len() <= self.entries as usize, "ring write out of bounds");
        for (i, id) in table.iter().enumerate() {
            // SAFETY: in bounds (asserted above); element k's value is the
            // first 4 bytes at k × 8 of the mapping, 8-byte aligned; the
            // datapath reads these bytes only after a later VIP-entry update
            // points it at this slot, so no reader races this store.
            unsafe { std::ptr::write_volatile(self.mem.base::<u8>().add((base as usize + i) * RING_ELEM) as *mut u32, *id) };
        }
        // The stores are complete before the publishing system call.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    /// Read `len` entries from `base`.
    pub fn read(&self, base: u32, len: u32) -> Result<Vec<u32>> {
        if base as usize + len as usize > self.entries as usize {
            bail!("ring read {base}+{len} out of bounds");
        }
        Ok((0..len as usize)
            .map(|i| {
                // SAFETY: in bounds (checked above), aligned as in `write`.
                unsafe { std::ptr::read_volatile(self.mem.base::<u8>().add((base as usize + i) * RING_ELEM) as *const u32) }
            })
            .collect())
    }
}

/// The decap map's key for an inner destination.
pub fn decap_key(ip: std::net::IpAddr) -> DecapKey {
    match ip {
        std::net::IpAddr::V4(a) => DecapKey { addr: lb_common::addr_v4(a.octets()), family: lb_common::FAMILY_V4, _pad: [0; 3] },
        std::net::IpAddr::V6(a) => DecapKey { addr: a.octets(), family: lb_common::FAMILY_V6, _pad: [0; 3] },
    }
}

/// Entries of the VIP map (and of the prefix-VIP trie): one per VIP plus
/// at most one fragment alias (port 0 of its address and protocol) and one
/// echo entry (`--answer-ping`) per VIP, so `--max-vips N` always means N
/// services.
pub fn vip_map_entries(opts: &LoadOptions) -> u32 {
    opts.max_vips * 3
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
            .map_max_entries(map_names::RINGS, opts.ring_slots() * opts.ring_size)
            .map_max_entries(map_names::CONNTRACK, ct_elements(opts.conntrack_size))
            .map_max_entries(map_names::PERSIST, opts.persist_size)
            .map_max_entries(map_names::RR, opts.max_vips)
            .map_max_entries(map_names::FLOW_KEYS, opts.flow_key_slots())
            .override_global("XLB_FLOW_KEYS", &(opts.flow_keys as u8), true)
            .override_global("XLB_DEBUG", &debug, true)
            .override_global("XLB_CT_SETS", &sets, true)
            .override_global("XLB_CT_SEED", &ct_seed.k, true)
            .load(xdp_object()?)
            .context("cannot load the XDP object (creating its maps)")?;
        for name in [PROG_XLB, PROG_TRACE, PROG_PASS, PROG_DECAP, PROG_ENCAP] {
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
        let mut dp = Datapath {
            vips: take(&mut ebpf, map_names::VIPS)?,
            vip_prefix: take(&mut ebpf, map_names::VIP_PREFIX)?,
            prefix_on: take(&mut ebpf, map_names::PREFIX_ON)?,
            backends: take(&mut ebpf, map_names::BACKENDS)?,
            ring_mem: None,
            rings: take(&mut ebpf, map_names::RINGS)?,
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
        dp.ring_mem = RingMem::map(&dp.rings, opts.ring_slots() * opts.ring_size);
        if dp.ring_mem.is_none() {
            log::debug!("the ring map is not mmapable; tables are written with batch updates");
        }
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

    /// Attach the balancer through the XDP link pinned at `link`: when one
    /// is pinned and still attached, replace its program atomically
    /// (bpf_link_update: no frame sees no program); otherwise attach anew
    /// and pin the link. Returns the mode (`None` when an existing link was
    /// taken over: its mode is kept) and whether a link was taken over.
    pub fn attach_pinned(&mut self, iface: &str, mode: Option<AttachMode>, link: &std::path::Path) -> Result<(Option<AttachMode>, bool)> {
        self.link_pin = Some(link.to_path_buf());
        if link.exists() {
            match self.replace_link(link) {
                Ok(()) => return Ok((None, true)),
                Err(e) => {
                    log::warn!("the pinned XDP link {} is unusable ({e:#}); attaching anew", link.display());
                    std::fs::remove_file(link).with_context(|| format!("cannot remove the stale link pin {}", link.display()))?;
                }
            }
        }
        let got = self.attach(iface, mode)?;
        let link_id = self.last_link.take().ok_or_else(|| anyhow!("no XDP link to pin"))?;
        let owned = self.program(PROG_XLB)?.take_link(link_id).context("cannot take the XDP link")?;
        // Kernels with bpf_loop (≥ 5.17, required) all attach XDP through a
        // BPF link, which is what can be pinned.
        let fd = FdLink::try_from(owned).with_context(|| format!("XDP on {iface} is not attached through a BPF link; run with --no-pin"))?;
        fd.pin(link).with_context(|| format!("cannot pin the XDP link at {}", link.display()))?;
        Ok((Some(got), false))
    }

    fn replace_link(&mut self, link: &std::path::Path) -> Result<()> {
        let pinned = PinnedLink::from_pin(link).context("cannot open the pinned link")?;
        let fd: FdLink = pinned.into();
        let xdp = XdpLink::try_from(fd).context("the pinned link is not an XDP link")?;
        let prog = self.program(PROG_XLB)?;
        // The link stays pinned; the program's copy of it closes on drop.
        prog.attach_to_link(xdp).context("bpf_link_update failed (the link is detached from its device?)")?;
        Ok(())
    }

    /// Make the interface's link run program `to` (`PROG_TRACE` while a
    /// trace runs, `PROG_XLB` otherwise): one bpf_link_update, as upgrades
    /// do; the maps are shared, so no flow notices.
    pub fn switch_program(&mut self, to: &'static str) -> Result<()> {
        if self.running == to {
            return Ok(());
        }
        let link = match (&self.link_pin, self.last_link.take()) {
            (Some(pin), _) => {
                let pinned = PinnedLink::from_pin(pin).context("cannot open the pinned link")?;
                XdpLink::try_from(FdLink::from(pinned)).context("the pinned link is not an XDP link")?
            }
            (None, Some(id)) => {
                let from = self.running;
                self.program(from)?.take_link(id).context("cannot take the XDP link")?
            }
            (None, None) => bail!("the program is not attached to an interface"),
        };
        let id = self.program(to)?.attach_to_link(link).with_context(|| format!("bpf_link_update to {to} failed"))?;
        if self.link_pin.is_some() {
            // The pin keeps the link: close this process's copy now.
            drop(self.program(to)?.take_link(id));
        } else {
            self.last_link = Some(id);
        }
        self.running = to;
        Ok(())
    }

    /// Start tracing: set the filter, fill every CPU's rate-limit bucket,
    /// empty the ring of an earlier trace, then swap the tracing program in.
    pub fn trace_start(&mut self, cfg: &TraceConfig) -> Result<()> {
        if self.running == PROG_TRACE {
            bail!("a trace is already running (one at a time)");
        }
        self.trace_arm(cfg)?;
        self.switch_program(PROG_TRACE)
    }

    /// Set the tracing program's filter and rate limit and empty its ring
    /// (`trace_start` without the swap: tests run `PROG_TRACE` directly).
    pub fn trace_arm(&mut self, cfg: &TraceConfig) -> Result<()> {
        self.trace_cfg.set(0, cfg, 0).context("cannot write the trace filter")?;
        let full = TraceBucket { credit_ns: cfg.burst_ns, last_ns: 0, missed: 0 };
        let v = PerCpuValues::try_from(vec![full; self.ncpus]).context("per-CPU values")?;
        self.trace_tb.set(0, v, 0).context("cannot reset the trace rate limit")?;
        while self.trace_ring.next().is_some() {}
        Ok(())
    }

    /// Up to `max` trace records, oldest first.
    pub fn trace_drain(&mut self, max: usize) -> Vec<TraceRecord> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(item) = self.trace_ring.next() else { break };
            if item.len() >= std::mem::size_of::<TraceRecord>() {
                // SAFETY: the record was written by the tracing program as a
                // `TraceRecord` (repr(C), plain integers and bytes); read
                // unaligned from the ring's bytes.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<TraceRecord>()) });
            }
        }
        out
    }

    /// Stop tracing: swap the balancer back in and turn the filter off.
    /// Returns the matching frames that were not recorded (rate limit or
    /// full ring).
    pub fn trace_stop(&mut self) -> Result<u64> {
        self.switch_program(PROG_XLB)?;
        self.trace_cfg.set(0, TraceConfig::default(), 0).context("cannot clear the trace filter")?;
        self.trace_missed()
    }

    /// Matching frames not recorded since the trace was armed.
    pub fn trace_missed(&self) -> Result<u64> {
        let per_cpu = self.trace_tb.get(&0, 0).context("cannot read the trace rate limit")?;
        Ok(per_cpu.iter().map(|b| b.missed).sum())
    }

    /// The program the interface's link runs.
    pub fn running_program(&self) -> &'static str {
        self.running
    }

    /// Attach the balancer to `iface`: native mode, or generic when `mode`
    /// allows falling back (`None`) and native is impossible.
    pub fn attach(&mut self, iface: &str, mode: Option<AttachMode>) -> Result<AttachMode> {
        let prog = self.program(PROG_XLB)?;
        let (id, got) = match mode {
            Some(AttachMode::Native) | None => match prog.attach(iface, XdpMode::Driver) {
                Ok(id) => (id, AttachMode::Native),
                Err(e) if mode.is_none() => {
                    log::warn!("native XDP is not possible on {iface} ({e}); falling back to generic mode, which is much slower");
                    let id = prog
                        .attach(iface, XdpMode::Skb)
                        .with_context(|| format!("cannot attach XDP to {iface} in generic mode either"))?;
                    (id, AttachMode::Generic)
                }
                Err(e) => return Err(e).with_context(|| format!("cannot attach XDP to {iface} in native mode")),
            },
            Some(AttachMode::Generic) => {
                let id = prog
                    .attach(iface, XdpMode::Skb)
                    .with_context(|| format!("cannot attach XDP to {iface} in generic mode"))?;
                (id, AttachMode::Generic)
            }
        };
        self.last_link = Some(id);
        Ok(got)
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
        Ok(PinnedScan { vips, prefixes, backends, filter })
    }

    /// Read `len` ring entries from `offset` (a published table).
    pub fn read_ring(&self, offset: u32, len: u32) -> Result<Vec<u32>> {
        if let Some(m) = &self.ring_mem {
            return m.read(offset, len);
        }
        (offset..offset + len).map(|i| self.ring_entry(i)).collect()
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

    /// Set the number of prefix VIPs (0 turns every trie lookup off).
    pub fn set_prefix_count(&mut self, n: u32) -> Result<()> {
        self.prefix_on.set(0, n, 0).context("cannot write the prefix-VIP gate")
    }

    /// Write a backend entry.
    pub fn set_backend(&mut self, id: u32, info: &BackendInfo) -> Result<()> {
        self.backends.set(id, info, 0).context("cannot write the backend map")
    }

    /// Write a table (Maglev table or id sequence, at most `ring_size`
    /// entries) into ring slot `slot`.
    pub fn write_ring(&mut self, slot: u32, table: &[u32]) -> Result<()> {
        if table.len() > self.opts.ring_size as usize || slot >= self.opts.ring_slots() {
            bail!("ring slot {slot} or table size {} out of range", table.len());
        }
        let base = slot * self.opts.ring_size;
        if let Some(m) = &self.ring_mem {
            m.write(base, table);
            return Ok(());
        }
        let keys: Vec<u32> = (base..base + table.len() as u32).collect();
        use aya::maps::IterableMap;
        update_batch(self.rings.map(), &keys, table).context("cannot write the ring map")
    }

    /// Whether tables are written through a memory mapping of the ring
    /// array (else with batch updates).
    pub fn rings_mapped(&self) -> bool {
        self.ring_mem.is_some()
    }

    /// Read one ring entry.
    pub fn ring_entry(&self, index: u32) -> Result<u32> {
        self.rings.get(&index, 0).context("cannot read the ring map")
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
    pub fn memory(&self) -> std::collections::BTreeMap<String, u64> {
        use aya::maps::IterableMap;
        use std::os::fd::{AsFd, AsRawFd};
        let fdinfo = |m: &MapData| -> Option<u64> {
            let fd = m.fd().as_fd().as_raw_fd();
            let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
            text.lines().find_map(|l| l.strip_prefix("memlock:")).and_then(|v| v.trim().parse().ok())
        };
        let mut out = std::collections::BTreeMap::new();
        let ours: [(&str, &MapData); 9] = [
            (map_names::VIPS, self.vips.map()),
            (map_names::VIP_PREFIX, self.vip_prefix.map()),
            (map_names::BACKENDS, self.backends.map()),
            (map_names::RINGS, self.rings.map()),
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
