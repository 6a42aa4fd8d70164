//! The command line: `xlb agent …` runs the agent; every other command is a
//! client of its API. Arguments are validated here too, so a typo fails
//! before anything is sent.

use anyhow::{bail, Context, Result};
use crate::config::Admin;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

use crate::{
    agent::Status,
    api::{self, Request},
    config::{check_weight, parse_backend_ip, HealthConfig, Mac, Vip},
    daemon::{self, DaemonOptions},
    maps::{AttachMode, Datapath, LoadOptions},
};
use crate::pin::{DEFAULT_PIN_ROOT, DEFAULT_STATE_DIR};
use lb_common::{DEFAULT_CONNTRACK_SIZE, DEFAULT_MAX_TABLES, DEFAULT_MAX_VIPS, DEFAULT_PERSIST_SIZE, DEFAULT_RING_SIZE, PROG_PASS};

/// xlb: an XDP L4 load balancer (L2 direct server return).
#[derive(Parser, Debug)]
#[command(name = "xlb", version, about, propagate_version = true)]
pub struct Cli {
    /// The agent's API socket.
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent: load and attach the XDP program, serve the API.
    Agent(AgentArgs),
    /// Manage virtual services.
    #[command(subcommand)]
    Vip(VipCmd),
    /// Manage backends of a virtual service.
    #[command(subcommand)]
    Backend(BackendCmd),
    /// The declarative config: dump the running state, or reload the file.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Show services, backends, health and counters.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Traffic counters: per VIP and backend, verdicts, connection table.
    Stats {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Refresh in place every second with rates, like `top` (Ctrl-C to stop).
        #[arg(long)]
        watch: bool,
    },
    /// On a backend of routed VIPs (`--forward ipip|gue`): strip xlb's
    /// encapsulation in XDP and hand the inner packets to the stack, for
    /// hosts without ipip/ip6tnl/fou tunnel devices.
    #[command(subcommand)]
    Decap(DecapCmd),
    /// Detach xlb from its interface and remove its pinned maps and state:
    /// asks the running agent to do it and exit; with no agent running,
    /// removes the pins of `--iface` directly (which detaches the program).
    Detach {
        /// Interface, when no agent is running.
        #[arg(long)]
        iface: Option<String>,
        /// Root of the pins (as given to the agent).
        #[arg(long, value_name = "PATH", default_value = DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
        /// Directory of the state files (as given to the agent).
        #[arg(long, value_name = "PATH", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Where one flow goes now and why, read from the running maps: its
    /// hash, table entry, connection-table and persistence entries, which
    /// one wins, and when that may change.
    Explain {
        /// ADDR:PORT/PROTO of the VIP.
        vip: Vip,
        /// The client: ADDR:PORT ([ADDR]:PORT for IPv6); ADDR alone for
        /// source-hash VIPs.
        client: crate::diag::explain::Client,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Live connection-table entries, most recently seen first (needs the
    /// agent's --flow-keys; without it, open entries per backend only).
    Flows {
        /// Only this VIP's flows.
        #[arg(long)]
        vip: Option<Vip>,
        /// Only flows on this backend address.
        #[arg(long)]
        backend: Option<std::net::IpAddr>,
        /// At most N flows.
        #[arg(long, value_name = "N", default_value_t = crate::diag::flows::DEFAULT_LIMIT)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Frames sampled live from the datapath, one line each (time,
    /// interface, 5-tuple, verdict, backend); `--pcap` also writes them as
    /// they arrived to a pcap file. Stops after --count frames or Ctrl-C;
    /// the balancer runs untraced again as soon as it stops.
    Trace {
        /// Only frames for this VIP (ADDR:PORT/PROTO).
        #[arg(long)]
        vip: Option<Vip>,
        /// Only frames sent to this backend address.
        #[arg(long)]
        backend: Option<std::net::IpAddr>,
        /// Only frames with this verdict: tx, pass or drop.
        #[arg(long, value_parser = ["tx", "pass", "drop"])]
        verdict: Option<String>,
        /// Stop after N frames.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Write the frames to this pcap file (tcpdump -r, Wireshark).
        #[arg(long, value_name = "FILE")]
        pcap: Option<PathBuf>,
        /// Frames per second per CPU at most.
        #[arg(long, default_value_t = crate::diag::trace::DEFAULT_RATE)]
        rate: u32,
        /// One JSON object per frame.
        #[arg(long)]
        json: bool,
    },
    /// High availability beside keepalived or a routing daemon: readiness,
    /// drain.
    #[command(subcommand)]
    Ha(HaCmd),
    /// Attach a pass-through XDP program to IFACE and hold it until
    /// SIGINT/SIGTERM. On a veth, XDP_TX frames are only delivered when the
    /// peer device has an XDP program: run this on the peer.
    XdpPass {
        /// Interface.
        #[arg(long)]
        iface: String,
    },
}

/// `xlb ha …`.
#[derive(Subcommand, Debug)]
pub enum HaCmd {
    /// Exit 0 when this node is ready to be master or announced, 1 when not
    /// (one line: why), 2 on error: for keepalived's `track_script` and
    /// routing-daemon hooks.
    Check {
        /// While no agent answers, its last verdict counts this long (pinned
        /// forwarding outlives the agent: restarting both nodes' agents at
        /// once must not fail both over).
        #[arg(long, default_value = "10s", value_parser = crate::ha::parse_duration)]
        grace: std::time::Duration,
    },
    /// Withdraw this node (announcements removed, `ha check` fails) while it
    /// keeps forwarding what still arrives.
    Drain,
    /// Undo `drain`.
    Undrain,
}

/// `xlb decap …`.
#[derive(Subcommand, Debug)]
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

/// `xlb agent` options.
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
    /// entries, 0.5 MiB at the default) is allocated when it gets backends.
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
    pub sync_peers: Vec<crate::ctsync::SyncPeer>,
    /// File with the key the sync peers share (HMAC-SHA256; at least 16
    /// bytes; mode 600).
    #[arg(long, value_name = "FILE")]
    pub sync_key: Option<PathBuf>,
    /// Where to receive sync datagrams (default: every address, port 7470).
    #[arg(long, value_name = "ADDR:PORT")]
    pub sync_listen: Option<std::net::SocketAddr>,
}

/// Health-check options of `xlb vip add` (any of them replaces the agent's
/// settings for this VIP; unset ones take the defaults).
#[derive(Args, Debug, Default)]
pub struct CheckArgs {
    /// Check: tcp, http, udp or none.
    #[arg(long = "check", value_name = "KIND")]
    pub kind: Option<String>,
    /// Port to check (default: the VIP's).
    #[arg(long = "check-port")]
    pub port: Option<u16>,
    /// HTTP path to GET.
    #[arg(long = "check-path")]
    pub path: Option<String>,
    /// Accepted HTTP status, CODE or LOW-HIGH.
    #[arg(long = "check-status")]
    pub status: Option<String>,
    /// HTTP Host header.
    #[arg(long = "check-host")]
    pub host: Option<String>,
    /// UDP payload.
    #[arg(long = "check-payload")]
    pub payload: Option<String>,
    /// Text a UDP reply must contain.
    #[arg(long = "check-expect")]
    pub expect: Option<String>,
    /// Milliseconds between checks.
    #[arg(long = "check-interval-ms")]
    pub interval_ms: Option<u64>,
    /// Milliseconds a check may take.
    #[arg(long = "check-timeout-ms")]
    pub timeout_ms: Option<u64>,
    /// Agent-check port on the backends (answers `75%`, `drain`, …).
    #[arg(long = "check-agent-port")]
    pub agent_port: Option<u16>,
    /// Passing checks to come up.
    #[arg(long = "check-rise")]
    pub rise: Option<u32>,
    /// Failing checks to go down.
    #[arg(long = "check-fall")]
    pub fall: Option<u32>,
}

impl CheckArgs {
    /// The settings these options describe, if any option was given.
    pub fn to_config(&self) -> Result<Option<HealthConfig>> {
        let given = self.kind.is_some()
            || self.port.is_some()
            || self.path.is_some()
            || self.status.is_some()
            || self.host.is_some()
            || self.payload.is_some()
            || self.expect.is_some()
            || self.interval_ms.is_some()
            || self.timeout_ms.is_some()
            || self.rise.is_some()
            || self.fall.is_some()
            || self.agent_port.is_some();
        if !given {
            return Ok(None);
        }
        let mut h = HealthConfig::default();
        if let Some(k) = &self.kind {
            h.kind = k.parse()?;
        }
        h.port = self.port;
        h.agent_port = self.agent_port;
        h.http_host = self.host.clone();
        h.udp_expect = self.expect.clone();
        if let Some(p) = &self.path {
            h.http_path = p.clone();
        }
        if let Some(s) = &self.status {
            h.http_status = s.clone();
        }
        if let Some(p) = &self.payload {
            h.udp_payload = p.clone();
        }
        h.interval_ms = self.interval_ms.unwrap_or(h.interval_ms);
        h.timeout_ms = self.timeout_ms.unwrap_or(h.timeout_ms);
        h.rise = self.rise.unwrap_or(h.rise);
        h.fall = self.fall.unwrap_or(h.fall);
        h.validate()?;
        Ok(Some(h))
    }
}

/// `xlb config …`.
#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Print the running state as a config file that reproduces it.
    Dump,
    /// Re-read the agent's config file (or FILE) and apply exactly what
    /// changed; a file with any error changes nothing (also on SIGHUP).
    Reload {
        /// Another file to apply.
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

/// `xlb vip …`.
// Parsed once per command line: the size of the `Add` variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum VipCmd {
    /// Add a VIP, e.g. `xlb vip add 10.0.0.100:80/tcp`.
    Add {
        /// ADDR:PORT/PROTO
        vip: Vip,
        /// Scheduling algorithm: maglev, rr, wrr, random, source-hash, least-conn.
        #[arg(long, default_value = "maglev")]
        algo: String,
        /// With source-hash: seconds a client stays on its backend after its
        /// last new flow, even across backend changes.
        #[arg(long, value_name = "SECS")]
        persist_timeout: Option<u32>,
        /// Health checks of this VIP's backends (default: the agent's).
        #[command(flatten)]
        check: CheckArgs,
        /// When every backend is down: drop (default) or fail-open.
        #[arg(long, value_name = "MODE")]
        all_down: Option<String>,
        /// Ramp a backend that comes up to its full weight over this long.
        #[arg(long, value_name = "MS")]
        slow_start_ms: Option<u64>,
        /// What maglev hashes: 5-tuple (default) or dst-port (every client
        /// of one destination port gets the same backend).
        #[arg(long, value_name = "FIELDS")]
        hash: Option<crate::config::HashMode>,
        /// Answer ICMP/ICMPv6 echo requests to the VIP's address in the
        /// datapath (default: the kernel's as before).
        #[arg(long)]
        answer_ping: bool,
        /// How its backends are reached: l2 (MAC rewrite, same segment;
        /// the default), ipip (IP-in-IP, routed) or gue (GUE over UDP, routed).
        #[arg(long, value_name = "MODE")]
        forward: Option<crate::config::ForwardName>,
    },
    /// Remove a VIP and its backends.
    Del {
        /// ADDR:PORT/PROTO
        vip: Vip,
    },
    /// List VIPs.
    List,
}

/// `xlb backend …`.
#[derive(Subcommand, Debug)]
pub enum BackendCmd {
    /// Add a backend to a VIP.
    Add {
        /// ADDR:PORT/PROTO
        vip: Vip,
        /// Backend IP address (same family as the VIP unless routed).
        ip: String,
        /// Backend MAC; resolved from the neighbour table when omitted.
        #[arg(long)]
        mac: Option<Mac>,
        /// Weight, 0..=10000 (0 = no new flows).
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// How to reach it, replacing the VIP's --forward: l2, ipip or gue.
        #[arg(long, value_name = "MODE")]
        forward: Option<crate::config::ForwardName>,
    },
    /// Change a backend's weight or state; prints how many table entries
    /// change.
    Set {
        /// ADDR:PORT/PROTO
        vip: Vip,
        /// Backend IP address.
        ip: String,
        /// New weight, 0..=10000 (0 = no new flows).
        #[arg(long)]
        weight: Option<u32>,
        /// Keep its flows, send it no new ones.
        #[arg(long, conflicts_with_all = ["maint", "up"])]
        drain: bool,
        /// Take it out of service: no traffic, its flows move, no checks.
        #[arg(long, conflicts_with_all = ["drain", "up"])]
        maint: bool,
        /// Back in service (after --drain or --maint).
        #[arg(long, conflicts_with_all = ["drain", "maint"])]
        up: bool,
        /// Only report what would change.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove a backend from a VIP.
    Del {
        /// ADDR:PORT/PROTO
        vip: Vip,
        /// Backend IP address.
        ip: String,
    },
}

/// The sync settings of `xlb agent`'s flags (none given: none, or the
/// config file's).
fn sync_settings(
    peers: Vec<crate::ctsync::SyncPeer>,
    key: Option<PathBuf>,
    listen: Option<std::net::SocketAddr>,
) -> Result<Option<crate::ctsync::SyncSettings>> {
    match (peers.is_empty(), key) {
        (true, None) if listen.is_none() => Ok(None),
        (false, Some(key_file)) => {
            let s = crate::ctsync::SyncSettings { peers, key_file, listen };
            s.validate()?;
            Ok(Some(s))
        }
        _ => bail!("--sync-peer and --sync-key go together (--sync-listen needs them)"),
    }
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    let socket = api::socket_path(cli.socket);
    match cli.command {
        Command::Agent(a) => {
            let load = LoadOptions {
                max_vips: a.max_vips,
                max_tables: a.max_tables,
                ring_size: a.ring_size,
                conntrack_size: a.conntrack_size,
                persist_size: a.persist_size,
                debug: a.debug_datapath,
                flow_keys: a.flow_keys,
            };
            load.validate()?;
            let opts = DaemonOptions {
                iface: a.iface,
                mode: a.xdp_mode.map(|m| match m {
                    ModeArg::Native => AttachMode::Native,
                    ModeArg::Generic => AttachMode::Generic,
                }),
                config: a.config,
                socket,
                load,
                metrics: a.metrics,
                pin_root: (!a.no_pin).then_some(a.pin_root),
                state_dir: a.state_dir,
                accept_macs: a.accept_macs,
                announce_table: a.announce_table,
                encap: crate::encap::encap_config(&a.encap_sources, a.gue_port)?,
                sync: sync_settings(a.sync_peers, a.sync_key, a.sync_listen)?,
            };
            runtime()?.block_on(daemon::run(opts))
        }
        Command::XdpPass { iface } => xdp_pass(&iface),
        Command::Decap(DecapCmd::Attach { iface, vips, gue_port, pin_root, xdp_mode }) => {
            let mode = xdp_mode.map(|m| match m {
                ModeArg::Native => AttachMode::Native,
                ModeArg::Generic => AttachMode::Generic,
            });
            crate::encap::attach(&iface, &vips, gue_port, &pin_root, mode)?;
            println!("xlb decap attached to {iface} for {} VIP address(es)", vips.len());
            Ok(())
        }
        Command::Decap(DecapCmd::Detach { iface, pin_root }) => crate::encap::detach(&iface, &pin_root),
        Command::Decap(DecapCmd::Stats { iface, pin_root, json }) => {
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
        Command::Detach { iface, pin_root, state_dir } => detach(&socket, iface.as_deref(), &pin_root, &state_dir),
        Command::Vip(VipCmd::Add { vip, algo, persist_timeout, check, all_down, slow_start_ms, hash, answer_ping, forward }) => {
            let algo: crate::config::AlgoName = algo.parse()?;
            crate::agent::check_persist(algo.0, persist_timeout.unwrap_or(0))?;
            crate::config::VipOpts::from_fields(hash, Some(answer_ping)).validate(algo.0)?;
            let health = check.to_config()?;
            let all_down = all_down.map(|m| m.parse::<crate::config::AllDown>()).transpose()?;
            let answer_ping = answer_ping.then_some(true);
            let r = api::call(
                &socket,
                &Request::VipAdd { vip, algo: Some(algo), persist_timeout, health, all_down, slow_start_ms, hash, answer_ping, forward },
            )?;
            if let Some(w) = r["warning"].as_str() {
                eprintln!("xlb: warning: {w}");
            }
            Ok(())
        }
        Command::Vip(VipCmd::Del { vip }) => {
            api::call(&socket, &Request::VipDel { vip })?;
            Ok(())
        }
        Command::Vip(VipCmd::List) => {
            let v = api::call(&socket, &Request::VipList)?;
            for vip in v.as_array().into_iter().flatten() {
                println!("{}", vip.as_str().unwrap_or_default());
            }
            Ok(())
        }
        Command::Backend(BackendCmd::Add { vip, ip, mac, weight, forward }) => {
            // A routed backend may be of the other family: the agent knows
            // the VIP's mode and checks.
            let ip: std::net::IpAddr = ip.parse().map_err(|_| anyhow::anyhow!("invalid backend IP '{ip}'"))?;
            crate::config::check_unicast(ip).with_context(|| format!("invalid backend IP '{ip}'"))?;
            check_weight(weight)?;
            let r = api::call(
                &socket,
                &Request::BackendAdd { vip, ip, mac, weight: Some(weight), health: None, forward },
            )?;
            print_moved(&r, false);
            Ok(())
        }
        Command::Backend(BackendCmd::Set { vip, ip, weight, drain, maint, up, dry_run }) => {
            let ip = parse_backend_ip(&vip, &ip)?;
            if let Some(w) = weight {
                check_weight(w)?;
            }
            let state = [(drain, Admin::Drain), (maint, Admin::Maint), (up, Admin::Ready)].iter().find(|(f, _)| *f).map(|(_, s)| *s);
            if weight.is_none() && state.is_none() {
                anyhow::bail!("nothing to change: give --weight, --drain, --maint or --up");
            }
            let r = api::call(&socket, &Request::BackendSet { vip, ip, weight, state, dry_run })?;
            print_moved(&r, dry_run);
            Ok(())
        }
        Command::Backend(BackendCmd::Del { vip, ip }) => {
            let ip = parse_backend_ip(&vip, &ip)?;
            let r = api::call(&socket, &Request::BackendDel { vip, ip })?;
            print_moved(&r, false);
            Ok(())
        }
        Command::Config(ConfigCmd::Dump) => {
            let v = api::call(&socket, &Request::ConfigDump)?;
            print!("{}", v["toml"].as_str().unwrap_or(""));
            Ok(())
        }
        Command::Config(ConfigCmd::Reload { file }) => {
            let file = file.map(|f| std::fs::canonicalize(&f).with_context(|| format!("cannot read {}", f.display()))).transpose()?;
            let v = api::call(&socket, &Request::ConfigReload { path: file.map(|f| f.to_string_lossy().into_owned()) })?;
            let changes: Vec<&str> = v["changes"].as_array().into_iter().flatten().filter_map(|c| c.as_str()).collect();
            if changes.is_empty() {
                println!("config: no change");
            }
            for c in changes {
                println!("config: {c}");
            }
            Ok(())
        }
        Command::Explain { vip, client, json } => {
            let v = api::call(&socket, &Request::Explain { vip: vip.to_string(), client: client.to_string() })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let e: crate::diag::explain::Explanation = serde_json::from_value(v).context("malformed explanation from the agent")?;
                print!("{}", crate::diag::explain::render(&e));
            }
            Ok(())
        }
        Command::Flows { vip, backend, limit, json } => {
            let req = Request::Flows { vip: vip.map(|v| v.to_string()), backend: backend.map(|b| b.to_string()), limit: Some(limit) };
            let v = api::call(&socket, &req)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let r: crate::diag::flows::FlowsReport = serde_json::from_value(v).context("malformed flows from the agent")?;
                print!("{}", crate::diag::flows::render(&r));
            }
            Ok(())
        }
        Command::Trace { vip, backend, verdict, count, pcap, rate, json } => {
            if count == Some(0) {
                anyhow::bail!("--count must be at least 1");
            }
            let req = Request::Trace { vip: vip.map(|v| v.to_string()), backend: backend.map(|b| b.to_string()), verdict, count, rate: Some(rate) };
            crate::diag::trace::run(&socket, &req, pcap.as_deref(), json)
        }
        Command::Stats { json, watch } => crate::stats::run(&socket, json, watch),
        Command::Ha(HaCmd::Check { grace }) => {
            let (ready, line) = match ha_check(&socket, grace) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("xlb: error: {}", format!("{e:#}").replace('\n', " "));
                    std::process::exit(2)
                }
            };
            println!("{line}");
            std::process::exit(if ready { 0 } else { 1 })
        }
        Command::Ha(cmd) => {
            let v = api::call(&socket, &if matches!(cmd, HaCmd::Drain) { Request::HaDrain } else { Request::HaUndrain })?;
            let v: crate::ha::Verdict = serde_json::from_value(v).context("malformed answer from the agent")?;
            println!("{}", if v.drained { "drained: announcements withdrawn, forwarding goes on" } else { "undrained" });
            Ok(())
        }
        Command::Status { json } => {
            let v = api::call(&socket, &Request::Status)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let s: Status = serde_json::from_value(v).context("malformed status from the agent")?;
                print_status(&s);
            }
            Ok(())
        }
    }
}

/// `xlb ha check`: (ready, the line to print).
fn ha_check(socket: &std::path::Path, grace: std::time::Duration) -> Result<(bool, String)> {
    if std::os::unix::net::UnixStream::connect(socket).is_err() {
        return Ok(crate::ha::offline_check(socket, grace));
    }
    let v: crate::ha::Verdict = serde_json::from_value(api::call(socket, &Request::HaCheck)?).context("malformed answer from the agent")?;
    Ok(match v.why {
        None => (true, format!("ready: {} VIP address(es) announceable", v.announce.len())),
        Some(why) => (false, format!("not ready: {why}")),
    })
}

/// "table: N of M entries changed" from an API answer.
fn print_moved(r: &serde_json::Value, dry_run: bool) {
    if let (Some(m), Some(e)) = (r["moved"].as_u64(), r["entries"].as_u64()) {
        let verb = if dry_run { "would change (dry run, nothing applied)" } else { "changed" };
        println!("table: {m} of {e} entries {verb}");
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
fn detach(socket: &std::path::Path, iface: Option<&str>, pin_root: &std::path::Path, state_dir: &std::path::Path) -> Result<()> {
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

fn print_status(s: &Status) {
    if s.vips.is_empty() {
        println!("no VIPs");
    }
    for v in &s.vips {
        let mut persist = if v.persist_timeout > 0 { format!(" persist={}s", v.persist_timeout) } else { String::new() };
        if v.hash == "dst-port" {
            persist.push_str(" hash=dst-port");
        }
        if v.answer_ping {
            persist.push_str(" answer-ping");
        }
        println!(
            "{}  algo={}{persist}  check={}  packets={} bytes={} new_flows={} active={}",
            v.vip, v.algo, v.health_check, v.packets, v.bytes, v.new_flows, v.active_flows
        );
        for b in &v.backends {
            println!(
                "  {:<39} {:<17} w={:<5} {:<4} share={:>5.1}%  packets={} new_flows={} active={} check={}{}{}",
                b.ip,
                b.mac.as_deref().unwrap_or("?"),
                b.weight,
                b.state,
                b.table_share * 100.0,
                b.packets,
                b.new_flows,
                b.active_flows,
                b.check,
                b.check_latency_ms.map(|l| format!(" ({l:.1} ms)")).unwrap_or_default(),
                b.reason.as_deref().map(|r| format!("  ({r})")).unwrap_or_default()
            );
        }
    }
    println!(
        "datapath: {} mode, program id {}, {}",
        s.attach_mode,
        s.program_id.map(|i| i.to_string()).unwrap_or_else(|| "?".into()),
        s.pinned.as_deref().map(|p| format!("maps pinned under {p}")).unwrap_or_else(|| "not pinned".into())
    );
    println!(
        "connection table: {} flows, {:.1} MiB, {} entries at the last census",
        s.conntrack_capacity,
        s.conntrack_bytes as f64 / (1 << 20) as f64,
        s.conntrack_entries.map(|e| e.to_string()).unwrap_or_else(|| "no".into())
    );
    if let Some(why) = &s.pins_lost_on_exit {
        println!("warning: forwarding stops when the agent exits: {why}");
    }
    let mib = |b: u64| b as f64 / 1048576.0;
    let total: u64 = s.datapath_memory.values().sum();
    let parts: Vec<String> = s.datapath_memory.iter().filter(|(_, b)| **b >= 1 << 20).map(|(k, b)| format!("{k} {:.1}", mib(*b))).collect();
    println!(
        "memory: {:.1} MiB in maps ({}{}); {} of {} VIPs; {} check job(s)",
        mib(total),
        parts.join(", "),
        if parts.is_empty() { "" } else { ", rest under 1 MiB each" },
        s.vips.len(),
        s.max_vips,
        s.check_jobs
    );
    let nonzero: Vec<String> =
        s.counters.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("{k}={v}")).collect();
    println!("counters: {}", if nonzero.is_empty() { "all zero".into() } else { nonzero.join(" ") });
}

fn xdp_pass(iface: &str) -> Result<()> {
    let load = LoadOptions { max_vips: 1, max_tables: 1, ring_size: 2, conntrack_size: 1024, persist_size: 1024, debug: false, flow_keys: false };
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
