//! `xlb agent`: load the datapath (adopting pinned maps left by an earlier
//! agent), apply the config file, attach (atomically replacing a pinned
//! program), then serve the API and run health checks until a signal.
//!
//! Exit: with pins (the default), SIGTERM/SIGINT end the agent and leave
//! forwarding running with the last state, for the next agent to adopt
//! (restarts and upgrades drop nothing); `xlb detach` detaches and removes
//! the pins. Without pins (`--no-pin`), any exit detaches.

use anyhow::{bail, Context, Result};
use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    agent::{Agent, AgentOptions, Persist},
    api,
    config::{Desired, Mac},
    health,
    maps::{AttachMode, Datapath, LoadOptions, PinnedScan},
    neigh,
    pin::{identity, layout_name, mountns, Pins, DEFAULT_PIN_ROOT},
    state::Snapshot,
};

mod loops;
use loops::{census_loop, ha_loop};

/// Everything `xlb agent` is told.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// Interface to attach to.
    pub iface: String,
    /// Forced mode, or `None` for native with a fallback to generic.
    pub mode: Option<AttachMode>,
    /// Config file.
    pub config: Option<PathBuf>,
    /// API socket.
    pub socket: PathBuf,
    /// Map sizes.
    pub load: LoadOptions,
    /// Prometheus listener, if asked for.
    pub metrics: Option<std::net::SocketAddr>,
    /// Root of the pins (`None`: no pinning).
    pub pin_root: Option<PathBuf>,
    /// Directory of the state file.
    pub state_dir: PathBuf,
    /// Destination MACs to act on besides the interface's (`--accept-mac`).
    pub accept_macs: Vec<Mac>,
    /// Kernel routing table for announcements (`--announce-table`).
    pub announce_table: Option<u32>,
    /// Encapsulation settings (routed backends).
    pub encap: lb_common::EncapConfig,
    /// Connection-table sync from the flags (`--sync-peer`, `--sync-key`);
    /// without them, the config file's `[sync]`.
    pub sync: Option<crate::ctsync::SyncSettings>,
}

/// Routed backends need forwarding enabled on the interface: without it
/// the kernel's FIB gives the datapath no next hop (`drop_no_route`).
fn warn_if_not_forwarding(iface: &str, encap: &lb_common::EncapConfig) {
    let off = |path: String| std::fs::read_to_string(path).map(|v| v.trim() == "0").unwrap_or(false);
    if encap.flags & lb_common::ENCAP_F_SRC4 != 0 && off(format!("/proc/sys/net/ipv4/conf/{iface}/forwarding")) {
        log::warn!("IPv4 forwarding is off on {iface}: routed (ipip/gue) IPv4 backends get no next hop (sysctl net.ipv4.conf.{iface}.forwarding=1)");
    }
    if encap.flags & lb_common::ENCAP_F_SRC6 != 0 && off(format!("/proc/sys/net/ipv6/conf/{iface}/forwarding")) {
        log::warn!("IPv6 forwarding is off on {iface}: routed (ipip/gue) IPv6 backends get no next hop (sysctl net.ipv6.conf.{iface}.forwarding=1)");
    }
}

impl DaemonOptions {
    /// This node is one of several balancers (announcements or sync): warn
    /// about algorithms whose choice other nodes cannot repeat.
    fn ha_options(&self) -> bool {
        self.announce_table.is_some() || self.sync.is_some()
    }
}

/// Fail early, with one clear line, when the process cannot load BPF or
/// attach XDP: it needs CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN.
fn check_privileges() -> Result<()> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    let status = std::fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |c: u32| eff & (1u64 << c) != 0;
    if !(has(CAP_BPF) || has(CAP_SYS_ADMIN)) || !has(CAP_NET_ADMIN) {
        bail!("xlb agent needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON) to load and attach XDP");
    }
    Ok(())
}

/// Run the agent until a termination signal.
pub async fn run(mut opts: DaemonOptions) -> Result<()> {
    crate::maps::xdp_object()?;
    check_privileges()?;
    let desired = match &opts.config {
        Some(p) => Some(Desired::load(p)?),
        None => None,
    };
    // Sync: the flags, else the config file's [sync]; read at start only.
    let sync_settings = opts.sync.clone().or_else(|| desired.as_ref().and_then(|d| d.sync.clone()));
    let syncer = match &sync_settings {
        Some(s) => Some(Arc::new(crate::ctsync::Syncer::new(s)?)),
        None => None,
    };
    if syncer.is_some() && !opts.load.flow_keys {
        opts.load.flow_keys = true;
        log::info!("connection-table sync: --flow-keys turned on (the sync reads each entry's 5-tuple beside it)");
    }
    let sync_sock = match &sync_settings {
        Some(s) => Some(crate::ctsync::bind(s.listen).await?),
        None => None,
    };
    opts.sync = sync_settings;
    let handle = neigh::connect()?;
    let (ifindex, iface_mac) = neigh::link(&handle, &opts.iface).await?;
    let me = identity::Identity::here(ifindex)?;
    // Held for the agent's life: the root may be reached through its descriptor.
    let root = match &opts.pin_root {
        Some(r) => Some(mountns::resolve(r, std::path::Path::new(DEFAULT_PIN_ROOT), true)?),
        None => None,
    };
    let lost_on_exit = root.as_ref().and_then(|r| r.lost_on_exit.clone());
    if let Some(why) = &lost_on_exit {
        log::warn!("pins do not outlive this agent: {why}");
    }
    let pins = root.as_ref().map(|r| Pins::new(r, &opts.state_dir, &opts.iface, &opts.load));
    let _lock = match &pins {
        Some(p) => {
            p.prepare()?;
            Some(p.lock()?)
        }
        None => None,
    };
    let listener = api::bind(&opts.socket)?;
    let started = start(&opts, pins.as_ref(), desired, me, iface_mac, handle).await;
    let (agent, mut host, ifindex) = match started {
        Ok(x) => x,
        Err(e) => {
            // Leave nothing behind: the next start must not find a stale
            // socket, nor pins of a deployment that never ran (with a pinned
            // link, a deployment is running: its pins stay).
            let _ = std::fs::remove_file(&opts.socket);
            if let Some(p) = pins.filter(|p| !p.link.exists()) {
                let _ = p.remove_all();
            }
            return Err(e);
        }
    };
    host.pins_lost_on_exit = lost_on_exit;
    host.sync = syncer;
    serve(opts, pins, listener, agent, host, ifindex, sync_sock).await
}

/// Set a dead deployment's leftovers aside (its state file) and remove its
/// pins, when what is found under this interface's name is not ours.
fn check_leftovers(pins: &Pins, me: identity::Identity) -> Result<()> {
    let snapshot = Snapshot::load(&pins.state).ok().flatten();
    let has_state = pins.state.exists();
    let link = identity::link_ifindex(&pins.link).unwrap_or_else(|e| {
        log::warn!("{e:#}");
        None
    });
    match identity::judge(me, has_state, snapshot.and_then(|s| s.identity), link) {
        identity::Found::Ours => Ok(()),
        identity::Found::Foreign(why) => bail!(
            "{why}: refusing to touch {}; remove it with `xlb detach --iface {}` where it runs, or use another --state-dir/--pin-root",
            pins.shown.display(),
            pins.shown.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        ),
        identity::Found::Stale(why) => {
            let aside = if has_state { Some(pins.set_state_aside()?) } else { None };
            pins.remove_pins()?;
            pins.prepare()?;
            log::warn!(
                "{why}: {}its pins removed; starting clean",
                aside.map(|a| format!("state file kept aside as {}, ", a.display())).unwrap_or_default()
            );
            Ok(())
        }
    }
}

async fn start(
    opts: &DaemonOptions,
    pins: Option<&Pins>,
    desired: Option<Desired>,
    me: identity::Identity,
    iface_mac: Mac,
    handle: rtnetlink::Handle,
) -> Result<(Agent, crate::host::Host, u32)> {
    let ifindex = me.ifindex;
    if let Some(p) = pins {
        check_leftovers(p, me)?;
    }
    let had_maps = pins.is_some_and(|p| p.maps_pinned());
    let snapshot = match pins.map(|p| Snapshot::load(&p.state)) {
        Some(Ok(s)) => s,
        Some(Err(e)) => {
            log::warn!("ignoring the state file: {e:#}");
            None
        }
        None => None,
    };
    // A running deployment (a pinned link) that this agent could not manage:
    // refuse rather than replace it with an empty one.
    if let (Some(p), None, None) = (&pins, &snapshot, &desired) {
        if p.link.exists() {
            bail!(
                "{} holds a running deployment but its state file {} is missing or unreadable; start with --config to rebuild it, or remove it with `xlb detach --iface {}`",
                p.shown.display(),
                p.state.display(),
                opts.iface
            );
        }
    }
    let mut dp = Datapath::load_pinned(opts.load, pins.map(|p| p.maps.as_path()))?;
    dp.set_encap(&opts.encap)?;
    warn_if_not_forwarding(&opts.iface, &opts.encap);
    if opts.load.debug {
        if let Err(e) = aya_log::EbpfLogger::init(&mut dp.ebpf) {
            log::warn!("datapath logging unavailable: {e}");
        }
    }
    let health = desired.as_ref().map(|d| d.health.clone()).unwrap_or_default();
    let aopts = AgentOptions { iface_mac, accept_macs: opts.accept_macs.clone(), health };
    // Build the whole state in the maps first, then attach: the program
    // never runs over half-filled tables.
    let scan = if had_maps { dp.scan()? } else { PinnedScan::default() };
    let mut agent = if had_maps || snapshot.is_some() {
        let (a, r) = Agent::adopt(dp, aopts, snapshot.as_ref(), &scan)?;
        if had_maps {
            log::info!(
                "adopted the pinned state: {} VIP(s) and {} backend(s) kept with their flows; {} VIP(s) and {} backend(s) rebuilt",
                r.vips_kept, r.backends_kept, r.vips_new, r.backends_new
            );
        } else {
            log::warn!(
                "pinned maps of this layout are missing (first start with new sizes or version?): state restored from the state file into new tables; flows are rescheduled"
            );
        }
        a
    } else {
        Agent::new(dp, aopts)?
    };
    let mut host = crate::host::Host {
        config_path: opts.config.clone(),
        pinned: pins.map(|p| p.shown.join(layout_name(&opts.load))),
        pin_root: opts.pin_root.clone(),
        ha: Some(Arc::new(crate::ha::Node::new(&opts.socket, opts.ha_options()))),
        ..Default::default()
    };
    agent.persist = pins.map(|p| Persist { path: p.state.clone(), layout: layout_name(&opts.load), identity: me, mode: String::new(), order: Default::default() });
    if let Some(d) = &desired {
        let changes = agent.apply_desired(d)?;
        if opts.ha_options() {
            if let Some(w) = crate::ha::inconsistency_warning(&agent.inconsistent_vips()) {
                log::warn!("{w}");
            }
        }
        if had_maps || snapshot.is_some() {
            log::info!("config file applied over the adopted state: {} change(s)", changes.len());
        }
    }
    agent.collect_garbage(&scan)?;
    let (mode, took_over) = match &pins {
        Some(p) => agent.dp.attach_pinned(&opts.iface, opts.mode, &p.link)?,
        None => (Some(agent.dp.attach(&opts.iface, opts.mode)?), false),
    };
    if let (None, Some(want), Some(s)) = (mode, opts.mode, &snapshot) {
        if want.to_string() != s.mode {
            log::warn!("the pinned link is attached in {} mode and keeps it; `xlb detach` first to change to {want} mode", s.mode);
        }
    }
    host.attach_mode = match (mode, &snapshot) {
        (Some(m), _) => m.to_string(),
        (None, Some(s)) => s.mode.clone(),
        (None, None) => "unknown".to_string(),
    };
    if let Some(p) = agent.persist.as_mut() {
        p.mode = host.attach_mode.clone();
    }
    agent.save_state();
    if let Some(p) = &pins {
        for old in p.other_layouts() {
            log::info!("removing maps of another layout: {}", old.display());
            if let Err(e) = Pins::remove_maps(&old) {
                log::warn!("{e:#}");
            }
        }
    }
    log::info!(
        "xlb {} {} (ifindex {ifindex}, {iface_mac}) in {} mode, program id {}; {}; API on {}",
        if took_over { "replaced the program on" } else { "attached to" },
        opts.iface,
        host.attach_mode,
        agent.dp.program_id().map(|i| i.to_string()).unwrap_or_else(|| "?".into()),
        match &pins {
            Some(p) => format!("pinned under {}", p.shown.display()),
            None => "not pinned: forwarding stops with the agent".to_string(),
        },
        opts.socket.display()
    );
    drop(handle);
    Ok((agent, host, ifindex))
}

async fn serve(
    opts: DaemonOptions,
    pins: Option<Pins>,
    listener: tokio::net::UnixListener,
    mut agent: Agent,
    mut host: crate::host::Host,
    ifindex: u32,
    sync_sock: Option<tokio::net::UdpSocket>,
) -> Result<()> {
    let (detach_tx, mut detach_rx) = tokio::sync::mpsc::unbounded_channel();
    host.detach_tx = Some(detach_tx);
    let host = Arc::new(host);
    agent.neighbours.set_ifindex(ifindex);
    // The API and the health loop write the state file outside the lock.
    agent.defer_saves = true;
    let agent = Arc::new(Mutex::new(agent));
    let health = tokio::spawn(health::run(agent.clone()));
    let saver = tokio::spawn(crate::agent::save_soon_loop(agent.clone(), host.save_soon.clone()));
    let census = tokio::spawn(census_loop(agent.clone()));
    let neigh_agent = agent.clone();
    let neighbours = tokio::spawn(async move {
        let r = neigh::watch(ifindex, |u| {
            if let Ok(mut a) = neigh_agent.lock() {
                let r = match u {
                    neigh::NeighUpdate::Dump(all) => a.neighbours_dumped(&all),
                    neigh::NeighUpdate::Change(e) => a.neighbour_changed(e.ip, e.mac),
                };
                if let Err(err) = r {
                    log::error!("following backend MACs: {err:#}");
                }
            }
        })
        .await;
        if let Err(e) = r {
            log::error!("backend MACs are not followed (only configured MACs work): {e:#}");
        }
    });
    let metrics = opts.metrics.map(|addr| {
        let (a, h) = (agent.clone(), host.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr, a, h).await {
                log::error!("{e:#}");
            }
        })
    });
    let node = host.ha.clone().unwrap_or_else(|| Arc::new(crate::ha::Node::new(&opts.socket, opts.ha_options())));
    let announcer = match opts.announce_table {
        Some(t) => Some(crate::ha::Announcer::new(neigh::connect()?, t, ifindex)),
        None => None,
    };
    let ha = tokio::spawn(ha_loop(agent.clone(), node.clone(), announcer));
    let sync = match (host.sync.clone(), sync_sock) {
        (Some(s), Some(sock)) => {
            let at = sock.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
            log::info!("connection-table sync with {} (listening on {at})", s.peers.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", "));
            Some(tokio::spawn(crate::ctsync::run(agent.clone(), s, sock)))
        }
        _ => None,
    };
    let server = tokio::spawn(api::serve(listener, agent.clone(), host.clone()));
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let mut detach = pins.is_none();
    let mut detach_requested = false;
    let lost_on_exit = host.pins_lost_on_exit.clone();
    loop {
        tokio::select! {
            _ = term.recv() => { log::info!("SIGTERM: exiting"); break; }
            _ = int.recv() => { log::info!("SIGINT: exiting"); break; }
            _ = detach_rx.recv() => { log::info!("detach requested"); detach = true; detach_requested = true; break; }
            _ = hup.recv() => {
                let Ok(mut a) = agent.lock() else { break };
                match host.reload(&mut a, None) {
                    Ok(c) => log::info!("SIGHUP: config reloaded ({} change(s))", c.len()),
                    Err(e) => log::error!("SIGHUP: config not reloaded, nothing changed: {e:#}"),
                }
            }
        }
    }
    server.abort();
    ha.abort();
    let _ = ha.await;
    // Announcements outlive the agent with the forwarding they advertise;
    // when forwarding stops (detach, no pins), they go first.
    if detach || lost_on_exit.is_some() {
        if let Some(t) = opts.announce_table {
            match neigh::connect().map(|h| crate::ha::Announcer::new(h, t, ifindex)) {
                Ok(a) => {
                    if let Err(e) = a.reconcile(&Default::default()).await {
                        log::warn!("HA: withdrawing announcements: {e:#}");
                    }
                }
                Err(e) => log::warn!("HA: withdrawing announcements: {e:#}"),
            }
        }
        node.remove();
    }
    health.abort();
    saver.abort();
    census.abort();
    if let Some(s) = sync {
        s.abort();
        let _ = s.await;
    }
    let _ = census.await;
    neighbours.abort();
    let _ = neighbours.await;
    if let Some(m) = metrics {
        m.abort();
        let _ = m.await;
    }
    let _ = server.await;
    let _ = health.await;
    let _ = saver.await;
    let _ = std::fs::remove_file(&opts.socket);
    if let Ok(mut a) = agent.lock() {
        a.save_state();
    }
    // Dropping the agent drops the datapath: without pins that detaches the
    // program; with pins, forwarding goes on until the pins are removed.
    // API connections still running let go of it within a moment.
    for _ in 0..100 {
        if Arc::strong_count(&agent) == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    match Arc::try_unwrap(agent) {
        Ok(m) => drop(m),
        Err(_) => log::warn!("agent still referenced at exit; the kernel releases it when the process ends"),
    }
    match (&pins, detach) {
        (Some(p), true) => {
            // Hold the link while its pin goes, so that the last reference
            // is this descriptor: closing it detaches at once, whereas the
            // kernel defers a link whose last reference was the pin.
            let held = aya::programs::links::PinnedLink::from_pin(&p.link).ok();
            p.remove_all()?;
            drop(held);
            log::info!("detached from {} (pins under {} removed)", opts.iface, p.shown.display());
        }
        (None, _) => log::info!("detached from {}", opts.iface),
        (Some(_), false) if lost_on_exit.is_some() => log::warn!(
            "exited; XDP detaches from {} now: {}",
            opts.iface,
            lost_on_exit.as_deref().unwrap_or_default()
        ),
        (Some(p), false) => log::info!(
            "exited; XDP stays attached to {} with the last state (pinned under {}); a new agent adopts it, `xlb detach` removes it",
            opts.iface,
            p.shown.display()
        ),
    }
    if detach_requested {
        // `xlb detach` is answered now that it is done.
        host.detached.notify_one();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), host.answered.notified()).await;
    }
    Ok(())
}
