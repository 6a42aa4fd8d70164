//! `xlb agent`: load and attach the datapath, apply the config file, then
//! serve the API and run health checks until SIGINT/SIGTERM, and detach.

use anyhow::{bail, Context, Result};
use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    agent::{Agent, AgentOptions},
    api,
    config::{Desired, HealthConfig, Mac},
    health,
    maps::{AttachMode, Datapath, LoadOptions},
    neigh,
};

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

/// How often the connection table is walked to correct active-flow counts.
const CENSUS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Every `CENSUS_INTERVAL`, walk the connection table (on a blocking thread,
/// through a second map handle, without holding the agent) and set every
/// backend's active-flow count from it. Between censuses the datapath counts
/// opens and FIN/RST closes itself; the census corrects flows that ended
/// otherwise (idle UDP, evicted entries). Opens and closes that happen during
/// the walk can be off by their number until the next census.
async fn census_loop(agent: Arc<Mutex<Agent>>) {
    let reader = match agent.lock().map(|a| a.dp.conntrack_reader()) {
        Ok(Ok(r)) => Arc::new(r),
        Ok(Err(e)) => {
            log::warn!("no connection-table census: {e:#}");
            return;
        }
        Err(_) => return,
    };
    let mut tick = tokio::time::interval(CENSUS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let r = reader.clone();
        let Ok(census) = tokio::task::spawn_blocking(move || r.census()).await else { return };
        let Ok(mut a) = agent.lock() else { return };
        if let Err(e) = a.apply_census(&census) {
            log::warn!("applying the connection-table census failed: {e:#}");
        }
    }
}

/// Run the agent until a termination signal.
pub async fn run(opts: DaemonOptions) -> Result<()> {
    check_privileges()?;
    let desired = match &opts.config {
        Some(p) => Desired::load(p)?,
        None => Desired { health: HealthConfig::default(), vips: Vec::new() },
    };
    let handle = neigh::connect()?;
    let (ifindex, iface_mac) = neigh::link(&handle, &opts.iface).await?;
    let listener = api::bind(&opts.socket)?;
    let started = start(&opts, desired, ifindex, iface_mac, handle).await;
    let (agent, resolver) = match started {
        Ok(x) => x,
        Err(e) => {
            // Leave nothing behind: the next start must not find a stale socket.
            let _ = std::fs::remove_file(&opts.socket);
            return Err(e);
        }
    };
    serve(opts, listener, agent, resolver).await
}

async fn start(
    opts: &DaemonOptions,
    desired: Desired,
    ifindex: u32,
    iface_mac: Mac,
    handle: rtnetlink::Handle,
) -> Result<(Agent, neigh::Resolver)> {
    let mut dp = Datapath::load(opts.load)?;
    let mode = dp.attach(&opts.iface, opts.mode)?;
    log::info!(
        "xlb attached to {} (ifindex {ifindex}, {iface_mac}) in {mode} mode; API on {}",
        opts.iface,
        opts.socket.display()
    );
    if opts.load.debug {
        if let Err(e) = aya_log::EbpfLogger::init(&mut dp.ebpf) {
            log::warn!("datapath logging unavailable: {e}");
        }
    }
    let mut agent = Agent::new(dp, AgentOptions { iface_mac, health: desired.health.clone() })?;
    agent.config_path = opts.config.clone();
    agent.apply_desired(&desired)?;
    Ok((agent, neigh::Resolver::new(handle, ifindex)))
}

async fn serve(opts: DaemonOptions, listener: tokio::net::UnixListener, agent: Agent, resolver: neigh::Resolver) -> Result<()> {
    let agent = Arc::new(Mutex::new(agent));
    let ifindex = resolver.ifindex();
    let health = tokio::spawn(health::run(agent.clone(), Some(resolver)));
    let census = tokio::spawn(census_loop(agent.clone()));
    let neigh_agent = agent.clone();
    let neighbours = tokio::spawn(async move {
        let r = neigh::watch(ifindex, |e| {
            if let Ok(mut a) = neigh_agent.lock() {
                if let Err(err) = a.neighbour_changed(e.ip, e.mac) {
                    log::error!("following the MAC of {}: {err:#}", e.ip);
                }
            }
        })
        .await;
        if let Err(e) = r {
            log::warn!("neighbour changes are not followed live (checks still re-resolve MACs): {e:#}");
        }
    });
    let metrics = opts.metrics.map(|addr| {
        let a = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr, a).await {
                log::error!("{e:#}");
            }
        })
    });
    let server = tokio::spawn(api::serve(listener, agent.clone()));
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    loop {
        tokio::select! {
            _ = term.recv() => { log::info!("SIGTERM: detaching"); break; }
            _ = int.recv() => { log::info!("SIGINT: detaching"); break; }
            _ = hup.recv() => {
                let Ok(mut a) = agent.lock() else { break };
                match api::reload(&mut a, None) {
                    Ok(c) => log::info!("SIGHUP: config reloaded ({} change(s))", c.len()),
                    Err(e) => log::error!("SIGHUP: config not reloaded, nothing changed: {e:#}"),
                }
            }
        }
    }
    server.abort();
    health.abort();
    census.abort();
    let _ = census.await;
    neighbours.abort();
    let _ = neighbours.await;
    if let Some(m) = metrics {
        m.abort();
        let _ = m.await;
    }
    let _ = server.await;
    let _ = health.await;
    let _ = std::fs::remove_file(&opts.socket);
    // Dropping the agent drops the datapath, which detaches the program.
    match Arc::try_unwrap(agent) {
        Ok(m) => drop(m),
        Err(_) => log::warn!("agent still referenced at exit; the kernel detaches XDP when the process ends"),
    }
    log::info!("detached from {}", opts.iface);
    Ok(())
}
