//! The command line: `xlb agent …` runs the agent; every other command is a
//! client of its API. Values are parsed by their types (the config
//! module's `Vip`, `Mac`, `AlgoName`, … through `FromStr`), so a typo fails
//! before anything is sent; the rules across values are checked once, by
//! the agent, and come back as its one-line error.
//!
//! - [`agent`]: `xlb agent`, `xdp-pass`, `decap`, `detach` (this host's datapath);
//! - [`service`]: `vip`, `backend`, `config` (requests that change the agent);
//! - [`diag`]: `status`, `explain`, `flows`, `trace`, `ha` (requests that read it);
//! - [`output`]: how answers are printed.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

use crate::{api, config::Vip, pin::{DEFAULT_PIN_ROOT, DEFAULT_STATE_DIR}};

pub mod agent;
pub mod diag;
pub mod output;
pub mod service;

pub use agent::{AgentArgs, DecapCmd, ModeArg};
pub use diag::HaCmd;
pub use service::{BackendCmd, CheckArgs, ConfigCmd, VipCmd};

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

/// Commands. Each command's arguments are defined when it is the one run
/// (`defer`): building all of them costs every CLI call a good part of a
/// millisecond.
#[derive(Subcommand, Debug)]
#[command(defer = true)]
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
        /// Root of the pins, where `xlb decap`'s counters are read when no
        /// agent answers (a backend host).
        #[arg(long, value_name = "PATH", default_value = DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
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
        /// The flow's destination ADDR:PORT/PROTO: a VIP, or an address
        /// and port that an any-port or prefix VIP serves (the VIP is found
        /// as the datapath finds it: exact, any-port, most specific prefix).
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
        /// Only frames for this VIP (ADDR:PORT/PROTO; an any-port or prefix
        /// VIP: every destination its form covers).
        #[arg(long)]
        vip: Option<Vip>,
        /// Only frames sent to this backend address.
        #[arg(long)]
        backend: Option<std::net::IpAddr>,
        /// Only frames with this verdict: tx (sent on, routed frames out
        /// another interface too), pass or drop.
        #[arg(long)]
        verdict: Option<crate::diag::trace::TraceVerdict>,
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

/// Run a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    let socket = api::socket_path(cli.socket);
    match cli.command {
        Command::Agent(a) => agent::run(a, socket),
        Command::XdpPass { iface } => agent::xdp_pass(&iface),
        Command::Decap(cmd) => agent::decap(cmd),
        Command::Detach { iface, pin_root, state_dir } => agent::detach(&socket, iface.as_deref(), &pin_root, &state_dir),
        Command::Vip(cmd) => service::vip(&socket, cmd),
        Command::Backend(cmd) => service::backend(&socket, cmd),
        Command::Config(cmd) => service::config(&socket, cmd),
        Command::Status { json } => diag::status(&socket, json),
        Command::Stats { json, watch, pin_root } => crate::stats::run(&socket, &pin_root, json, watch),
        Command::Explain { vip, client, json } => diag::explain(&socket, &vip, &client, json),
        Command::Flows { vip, backend, limit, json } => diag::flows(&socket, vip, backend, limit, json),
        Command::Trace { vip, backend, verdict, count, pcap, rate, json } => {
            diag::trace(&socket, vip, backend, verdict, count, pcap, rate, json)
        }
        Command::Ha(cmd) => diag::ha(&socket, cmd),
    }
}
