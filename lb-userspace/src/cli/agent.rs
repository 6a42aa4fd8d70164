//! The commands that act on this host's datapath rather than ask an agent:
//! `xlb agent` (its flags become the daemon's options), `xdp-pass`,
//! `decap`, and `detach` when no agent answers.

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};

use crate::{
    api::{self, Request},
    daemon::{self, DaemonOptions},
    maps::{AttachMode, Datapath, LoadOptions},
    pin::{DEFAULT_PIN_ROOT, DEFAULT_STATE_DIR},
};
use lb_common::{DEFAULT_CONNTRACK_SIZE, DEFAULT_MAX_TABLES, DEFAULT_MAX_VIPS, DEFAULT_PERSIST_SIZE, DEFAULT_RING_SIZE, PROG_PASS};

/// `xlb decap …`.
#[derive(Subcommand, Debug)]
#[command(defer = true)]
pub enum DecapCmd {
    /// Attach the decapsulating program to an interface; it stays attached
    /// (pinned under --pin-root) until `xlb decap detach`.
    Attach {
        /// Interface the tunnel packets arrive on.
        #[arg(long)]
        iface: String,
        /// A VIP this host serves (repeatable): tunnel packets for other
        /// inner destinations pass untouched.
        #[arg(long = "vip", value_name = "ADDR", required = true)]
        vips: Vec<std::net::IpAddr>,
        /// UDP port of GUE encapsulation (the balancer's --gue-port).
        #[arg(long, default_value_t = lb_common::DEFAULT_GUE_PORT)]
        gue_port: u16,
        /// Root of the pins.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
        /// XDP mode (default native).
        #[arg(long, value_enum)]
        xdp_mode: Option<ModeArg>,
    },
    /// Detach it.
    Detach {
        /// Interface.
        #[arg(long)]
        iface: String,
        /// Root of the pins.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
    },
    /// Its counters: decapsulated, pass_decap_not_tunnel, pass_decap_not_local.
    Stats {
        /// Interface.
        #[arg(long)]
        iface: String,
        /// Root of the pins.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// XDP attach mode.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum ModeArg {
    /// Native (driver) mode; fail if impossible.
    Native,
    /// Generic (skb) mode.
    Generic,
}

// `xlb agent`'s options. Its doc line is the command's help (deferred
// arguments bring it with them), the same as the `Agent` variant's.
/// Run the agent: load and attach the XDP program, serve the API.
#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Interface to balance on.
    #[arg(long)]
    pub iface: String,
    /// XDP mode; by default native, falling back to generic with a warning.
    #[arg(long, value_enum)]
    pub xdp_mode: Option<ModeArg>,
    /// TOML config file with VIPs, backends and health settings.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Entries per Maglev table (a prime).
    #[arg(long, default_value_t = DEFAULT_RING_SIZE)]
    pub ring_size: u32,
    /// Maximum number of VIPs (services; fragment aliases do not count).
    #[arg(long, default_value_t = DEFAULT_MAX_VIPS)]
    pub max_vips: u32,
    /// Maximum number of VIPs with a table at once: a VIP's table (ring-size
    /// entries, 256 KiB at the default) is allocated when it gets backends.
    #[arg(long, default_value_t = DEFAULT_MAX_TABLES)]
    pub max_tables: u32,
    /// Connection-table capacity in flows.
    #[arg(long, default_value_t = DEFAULT_CONNTRACK_SIZE)]
    pub conntrack_size: u32,
    /// Persistence-table capacity in clients (source-hash VIPs with a timeout).
    #[arg(long, default_value_t = DEFAULT_PERSIST_SIZE)]
    pub persist_size: u32,
    /// Serve Prometheus metrics (read-only) on this address, e.g. 127.0.0.1:9100.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Log unusual datapath verdicts (aya-log; costs a little per logged packet).
    #[arg(long)]
    pub debug_datapath: bool,
    /// Keep each connection-table entry's 5-tuple beside it, for `xlb
    /// flows` (one 40-byte store per new flow; 40 bytes per table way).
    #[arg(long)]
    pub flow_keys: bool,
    /// Connection-ID length (3..=20) of the short-header QUIC packets of
    /// `--quic` VIPs: short headers do not carry it, so all their servers
    /// issue connection IDs of this length.
    #[arg(long, value_name = "N", default_value_t = crate::quic::CidLen::default())]
    pub quic_cid_len: crate::quic::CidLen,
    /// Root under which the maps and the XDP link are pinned (per interface),
    /// so forwarding survives the agent and a new agent adopts it.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_PIN_ROOT)]
    pub pin_root: PathBuf,
    /// Pin nothing: forwarding stops when the agent exits.
    #[arg(long, conflicts_with = "pin_root")]
    pub no_pin: bool,
    /// Directory of the agent's state file (what a new agent needs to adopt).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Also balance frames addressed to this MAC (repeatable, up to 7), e.g.
    /// keepalived's VRRP MAC 00:00:5e:00:01:NN with `use_vmac`. Frames to
    /// any other MAC (flooded unknown unicast) pass to the kernel.
    #[arg(long = "accept-mac", value_name = "MAC")]
    pub accept_macs: Vec<crate::config::Mac>,
    /// Keep one host route per ready VIP address in this kernel routing
    /// table (protocol 245), for BIRD or FRR to announce.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=0xffff_fffe))]
    pub announce_table: Option<u32>,
    /// Outer source of encapsulated frames (routed backends), one prefix
    /// per family, e.g. 10.0.9.0/24 and fd00:9::/112: the flow hash picks
    /// the address inside it (up to its last 32 bits), so routers' ECMP
    /// spreads flows. A single address (/32, /128) works too.
    #[arg(long = "encap-source", value_name = "PREFIX")]
    pub encap_sources: Vec<String>,
    /// UDP destination port of GUE encapsulation (`--forward gue`).
    #[arg(long, default_value_t = lb_common::DEFAULT_GUE_PORT)]
    pub gue_port: u16,
    /// Send connection-table entries the table no longer gives to this
    /// balancer (ADDR or ADDR:PORT, port 7470 by default; repeatable), and
    /// take its entries. Turns on --flow-keys.
    #[arg(long = "sync-peer", value_name = "ADDR[:PORT]")]
    pub sync_peers: Vec<crate::config::sync::SyncPeer>,
    /// File with the key the sync peers share (HMAC-SHA256; at least 16
    /// bytes; mode 600).
    #[arg(long, value_name = "FILE")]
    pub sync_key: Option<PathBuf>,
    /// Where to receive sync datagrams (default: every address, port 7470).
    #[arg(long, value_name = "ADDR:PORT")]
    pub sync_listen: Option<std::net::SocketAddr>,
}

impl From<ModeArg> for AttachMode {
    fn from(m: ModeArg) -> AttachMode {
        match m {
            ModeArg::Native => AttachMode::Native,
            ModeArg::Generic => AttachMode::Generic,
        }
    }
}

/// `xlb agent`: run the daemon until it is told to stop.
pub fn run(a: AgentArgs, socket: PathBuf) -> Result<()> {
    let load = LoadOptions {
        max_vips: a.max_vips,
        max_tables: a.max_tables,
        ring_size: a.ring_size,
        conntrack_size: a.conntrack_size,
        persist_size: a.persist_size,
        debug: a.debug_datapath,
        flow_keys: a.flow_keys,
        quic_cid_len: a.quic_cid_len,
    };
    load.validate()?;
    let opts = DaemonOptions {
        iface: a.iface,
        mode: a.xdp_mode.map(AttachMode::from),
        config: a.config,
        socket,
        load,
        metrics: a.metrics,
        pin_root: (!a.no_pin).then_some(a.pin_root),
        state_dir: a.state_dir,
        accept_macs: a.accept_macs,
        announce_table: a.announce_table,
        encap: crate::encap::encap_config(&a.encap_sources, a.gue_port)?,
        sync: crate::config::sync::SyncSettings::from_flags(a.sync_peers, a.sync_key, a.sync_listen)?,
    };
    runtime()?.block_on(daemon::run(opts))
}

/// `xlb decap …`.
pub fn decap(cmd: DecapCmd) -> Result<()> {
    match cmd {
        DecapCmd::Attach { iface, vips, gue_port, pin_root, xdp_mode } => {
        let mode = xdp_mode.map(|m| match m {
            ModeArg::Native => AttachMode::Native,
            ModeArg::Generic => AttachMode::Generic,
        });
        crate::encap::attach(&iface, &vips, gue_port, &pin_root, mode)?;
        println!("xlb decap attached to {iface} for {} VIP address(es)", vips.len());
        Ok(())
        }
        DecapCmd::Detach { iface, pin_root } => crate::encap::detach(&iface, &pin_root),
        DecapCmd::Stats { iface, pin_root, json } => {
        let st = crate::encap::stats(&iface, &pin_root)?;
        if json {
            let m: serde_json::Map<String, serde_json::Value> = st.iter().map(|(k, v)| (k.to_string(), (*v).into())).collect();
            println!("{}", serde_json::Value::Object(m));
        } else {
            for (k, v) in st {
                println!("{k:<24} {v}");
            }
        }
        Ok(())
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// `xlb detach`: through the agent when one answers, else by removing the pins.
pub fn detach(socket: &Path, iface: Option<&str>, pin_root: &Path, state_dir: &Path) -> Result<()> {
    match api::call(socket, &Request::Detach) {
        Ok(_) => {
            // The agent answers first, then detaches: wait for it to finish.
            let t0 = std::time::Instant::now();
            while socket.exists() && t0.elapsed() < std::time::Duration::from_secs(10) {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            println!("detached");
            Ok(())
        }
        Err(e) => {
            let Some(iface) = iface else {
                return Err(e.context("give --iface to remove the pins of an interface with no agent running"));
            };
            let default = std::path::Path::new(crate::pin::DEFAULT_PIN_ROOT);
            let root = crate::pin::mountns::resolve(pin_root, default, false);
            let pins = root.as_ref().ok().map(|r| crate::pin::Pins::new(r, state_dir, iface, &LoadOptions::default()));
            let Some(pins) = pins.filter(|p| p.dir.exists() || p.state.exists()) else {
                anyhow::bail!("nothing pinned for {iface} under {} and no agent answers", pin_root.display());
            };
            pins.remove_all()?;
            println!("removed the pins of {iface} under {} (XDP detached)", pins.shown.display());
            Ok(())
        }
    }
}

/// `xlb xdp-pass`: hold a pass-through program on `iface` until a signal.
pub fn xdp_pass(iface: &str) -> Result<()> {
    let load = LoadOptions { max_vips: 1, max_tables: 1, ring_size: 2, conntrack_size: 1024, persist_size: 1024, debug: false, flow_keys: false, quic_cid_len: Default::default() };
    let mut dp = Datapath::load(load)?;
    dp.program(PROG_PASS)?
        .attach(iface, aya::programs::XdpMode::Driver)
        .with_context(|| format!("cannot attach the pass-through program to {iface}"))?;
    runtime()?.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        Ok::<(), anyhow::Error>(())
    })?;
    drop(dp);
    Ok(())
}
