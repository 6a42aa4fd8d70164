//! The agent's local API: HTTP/JSON on a unix socket (root only, mode
//! 0600), versioned paths (`curl --unix-socket /run/xlb/xlb.sock
//! http://xlb/v1/status`). The CLI is its client. Every request is validated
//! in full before the agent changes anything.
//!
//! - [`Request`]: the one typed request model (CLI, API; its values are the
//!   config file's types);
//! - [`http`]: its HTTP form (routes), read by the server and written by the client;
//! - [`server`]: the hyper server on the agent's runtime; [`client`]: the CLI's side.

pub mod client;
pub mod http;
pub mod server;

pub use client::{call, call_with};
pub use crate::host::Host;
pub use server::{bind, serve};

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use crate::{
    agent::{Admin, Agent, VipSpec},
    config::{check_persist, text, AlgoName, AllDown, ForwardName, HashMode, HealthConfig, Mac, Vip, VipOpts, DEFAULT_WEIGHT},
    quic::ServerId,
};
use crate::diag::{explain::Client, trace::TraceVerdict};
use lb_common::Algo;
use std::net::IpAddr;

/// Default API socket.
pub const DEFAULT_SOCKET: &str = "/run/xlb/xlb.sock";

/// A request to the agent. Fields are the operator's types (`Vip`, `Mac`,
/// `AlgoName`, `Admin`, `AllDown`), read and written through the same
/// `FromStr`/`Display` as the CLI and the config file, so a malformed value
/// is refused by the same rule with the same one-line error.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Add a VIP.
    VipAdd {
        /// `ADDR:PORT/PROTO`.
        #[serde(with = "text")]
        vip: Vip,
        /// Algorithm (default maglev).
        #[serde(default, with = "text::opt")]
        algo: Option<AlgoName>,
        /// Source-hash persistence, seconds.
        #[serde(default)]
        persist_timeout: Option<u32>,
        /// Health checking of its backends (default: the agent's).
        #[serde(default)]
        health: Option<HealthConfig>,
        /// `drop` or `fail-open` when every backend is down.
        #[serde(default, with = "text::opt")]
        all_down: Option<AllDown>,
        /// Slow start, milliseconds.
        #[serde(default)]
        slow_start_ms: Option<u64>,
        /// `5-tuple` (default) or `dst-port`.
        #[serde(default, with = "text::opt")]
        hash: Option<HashMode>,
        /// Answer pings to the VIP's address.
        #[serde(default)]
        answer_ping: Option<bool>,
        /// How its backends are reached: `l2` (default), `ipip` or `gue`.
        #[serde(default, with = "text::opt")]
        forward: Option<ForwardName>,
        /// QUIC connection-ID routing (UDP VIPs).
        #[serde(default)]
        quic: Option<bool>,
    },
    /// Remove a VIP.
    VipDel {
        /// `ADDR:PORT/PROTO`.
        #[serde(with = "text")]
        vip: Vip,
    },
    /// This node's HA readiness (`xlb ha check`).
    HaCheck,
    /// Withdraw this node (`xlb ha drain`).
    HaDrain,
    /// Undo `HaDrain`.
    HaUndrain,
    /// List VIPs.
    VipList,
    /// Add a backend to a VIP.
    BackendAdd {
        /// `ADDR:PORT/PROTO`.
        #[serde(with = "text")]
        vip: Vip,
        /// Backend address.
        ip: IpAddr,
        /// Backend MAC (resolved when absent).
        #[serde(default, with = "text::opt")]
        mac: Option<Mac>,
        /// Weight.
        #[serde(default)]
        weight: Option<u32>,
        /// Health checking of this backend (default: the VIP's).
        #[serde(default)]
        health: Option<HealthConfig>,
        /// Its own forwarding mode (default: the VIP's).
        #[serde(default, with = "text::opt")]
        forward: Option<ForwardName>,
        /// QUIC server ID (1..=65535, unique in the VIP; `--quic` VIPs).
        #[serde(default)]
        server_id: Option<ServerId>,
    },
    /// Change a backend's weight and/or state; report the table change.
    BackendSet {
        /// `ADDR:PORT/PROTO`.
        #[serde(with = "text")]
        vip: Vip,
        /// Backend address.
        ip: IpAddr,
        /// New weight.
        #[serde(default)]
        weight: Option<u32>,
        /// `up`, `drain` or `maint`.
        #[serde(default, with = "text::opt")]
        state: Option<Admin>,
        /// Only report.
        #[serde(default)]
        dry_run: bool,
    },
    /// Remove a backend from a VIP.
    BackendDel {
        /// `ADDR:PORT/PROTO`.
        #[serde(with = "text")]
        vip: Vip,
        /// Backend address.
        ip: IpAddr,
    },
    /// Full status.
    Status,
    /// The running state as a config file.
    ConfigDump,
    /// Apply a config file (default: the agent's `--config`): all or nothing.
    ConfigReload {
        /// File to read instead of the agent's.
        #[serde(default)]
        path: Option<String>,
    },
    /// Detach the program, remove the pins and the state, and exit.
    Detach,
    /// Stream sampled frames (`xlb trace`): the answer is followed by one
    /// line per frame on the same connection, then an end line.
    Trace {
        /// Only frames for this VIP.
        #[serde(default, with = "text::opt")]
        vip: Option<Vip>,
        /// Only frames sent to this backend address.
        #[serde(default, with = "text::opt")]
        backend: Option<IpAddr>,
        /// Only `tx`, `pass` or `drop` frames.
        #[serde(default, with = "text::opt")]
        verdict: Option<TraceVerdict>,
        /// Stop after this many frames.
        #[serde(default)]
        count: Option<u64>,
        /// Frames per second per CPU at most.
        #[serde(default)]
        rate: Option<u32>,
    },
    /// Live connection-table entries (`xlb flows`).
    Flows {
        /// Only this VIP's flows.
        #[serde(default, with = "text::opt")]
        vip: Option<Vip>,
        /// Only flows on this backend address.
        #[serde(default, with = "text::opt")]
        backend: Option<IpAddr>,
        /// At most this many.
        #[serde(default)]
        limit: Option<usize>,
    },
    /// Where one flow goes now and why (`xlb explain`; changes nothing).
    Explain {
        /// The flow's destination `ADDR:PORT/PROTO` (any-port and prefix
        /// VIPs serve it as in the datapath).
        #[serde(with = "text")]
        vip: Vip,
        /// `ADDR[:PORT]` of the client.
        #[serde(with = "text")]
        client: Client,
    },
}

/// Apply one request (its values were parsed by their types; the agent
/// checks the rules that need its state, before changing anything).
pub fn handle(agent: &mut Agent, host: &Host, req: Request) -> Result<serde_json::Value> {
    match req {
        Request::VipAdd { vip, algo, persist_timeout, health, all_down, slow_start_ms, hash, answer_ping, forward, quic } => {
            let algo = algo.map_or(Algo::Maglev, |a| a.0);
            let spec = VipSpec {
                algo,
                persist: check_persist(algo, persist_timeout.unwrap_or(0))?,
                health,
                all_down: all_down.unwrap_or_default(),
                slow_start_ms: slow_start_ms.unwrap_or(0),
                opts: VipOpts::from_fields(hash, answer_ping, quic),
                forward: forward.map_or(lb_common::Forward::L2, |f| f.0),
            };
            agent.add_vip_spec(vip, &spec)?;
            let ha_active = host.ha.as_ref().is_some_and(|n| n.active);
            let warning = ha_active.then(|| crate::ha::inconsistency_warning(&agent.inconsistent_vips())).flatten();
            Ok(warning.map_or(serde_json::Value::Null, |w| serde_json::json!({ "warning": w })))
        }
        Request::VipDel { vip } => {
            agent.del_vip(&vip)?;
            Ok(serde_json::Value::Null)
        }
        Request::VipList => Ok(serde_json::json!(agent.vips().keys().map(|v| v.to_string()).collect::<Vec<_>>())),
        Request::BackendAdd { vip, ip, mac, weight, health, forward, server_id } => {
            let b = (ip, mac, weight.unwrap_or(DEFAULT_WEIGHT));
            Ok(table_change(agent.add_backend_full(&vip, b, health, forward.map(|f| f.0), server_id)?, None))
        }
        Request::BackendSet { vip, ip, weight, state, dry_run } => {
            if weight.is_none() && state.is_none() {
                bail!("nothing to change: give a weight or a state (--weight, --drain, --maint or --up)");
            }
            Ok(table_change(agent.set_backend(&vip, ip, weight, state, dry_run)?, Some(!dry_run)))
        }
        Request::BackendDel { vip, ip } => {
            let (moved, entries) = agent.del_backend(&vip, ip)?;
            Ok(serde_json::json!({ "moved": moved, "entries": entries }))
        }
        Request::HaCheck | Request::HaDrain | Request::HaUndrain => {
            let node = host.ha.as_ref().ok_or_else(|| anyhow!("this agent has no HA state"))?;
            if !matches!(req, Request::HaCheck) {
                node.set_drained(matches!(req, Request::HaDrain))?;
            }
            Ok(serde_json::to_value(agent.ha_verdict(node.drained()))?)
        }
        Request::Status => {
            Ok(serde_json::to_value(host.status(agent)?)?)
        }
        Request::ConfigDump => {
            let text = toml::to_string(&agent.dump()).map_err(|e| anyhow!("cannot render the config: {e}"))?;
            Ok(serde_json::json!({ "toml": text }))
        }
        Request::ConfigReload { path } => {
            let changes = host.reload(agent, path.map(PathBuf::from))?;
            Ok(serde_json::json!({ "changes": changes }))
        }
        Request::Explain { vip, client } => {
            let e = crate::diag::explain::explain(agent, &vip, &client)?;
            Ok(serde_json::to_value(e)?)
        }
        Request::Flows { vip, backend, limit } => {
            let r = crate::diag::flows::flows(agent, &crate::diag::flows::FlowsRequest { vip, backend, limit })?;
            Ok(serde_json::to_value(r)?)
        }
        Request::Trace { .. } => bail!("trace streams: it is served on its own connection"),
        Request::Detach => {
            let tx = host.detach_tx.as_ref().ok_or_else(|| anyhow!("this agent cannot be detached through the API"))?;
            tx.send(()).map_err(|_| anyhow!("the agent is already exiting"))?;
            Ok(serde_json::Value::Null)
        }
    }
}

/// The answer to a table change: how many entries of how many changed, or
/// `"published": false` when the request did not wait (`Prefer:
/// respond-async`, the CLI's `--no-wait`) and the table follows within a
/// tick.
fn table_change(counts: Option<(usize, usize)>, applied: Option<bool>) -> serde_json::Value {
    let mut v = match counts {
        Some((moved, entries)) => serde_json::json!({ "moved": moved, "entries": entries }),
        None => serde_json::json!({ "published": false }),
    };
    if let Some(a) = applied {
        v["applied"] = a.into();
    }
    v
}

/// The socket path given on the command line or the default.
pub fn socket_path(arg: Option<PathBuf>) -> PathBuf {
    arg.unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}
