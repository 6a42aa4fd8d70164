//! The requests that change the agent: `xlb vip …`, `xlb backend …`,
//! `xlb config …`.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};

use super::output::{print_lines, print_moved};
use crate::{
    api::{self, Request},
    config::{parse_backend_ip, Admin, AlgoName, AllDown, CheckKind, ForwardName, HashMode, HealthConfig, Mac, Vip},
};

/// Health-check options of `xlb vip add` (any of them replaces the agent's
/// settings for this VIP; unset ones take the defaults).
#[derive(Args, Debug, Default)]
pub struct CheckArgs {
    /// Check: tcp, http, udp or none.
    #[arg(long = "check", value_name = "KIND")]
    pub kind: Option<CheckKind>,
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
        if let Some(k) = self.kind {
            h.kind = k;
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
#[command(defer = true)]
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
#[command(defer = true)]
pub enum VipCmd {
    /// Add a VIP, e.g. `xlb vip add 10.0.0.100:80/tcp`.
    Add {
        /// ADDR:PORT/PROTO
        vip: Vip,
        /// Scheduling algorithm: maglev, rr, wrr, random, source-hash, least-conn.
        #[arg(long, default_value = "maglev")]
        algo: AlgoName,
        /// With source-hash: seconds a client stays on its backend after its
        /// last new flow, even across backend changes.
        #[arg(long, value_name = "SECS")]
        persist_timeout: Option<u32>,
        /// Health checks of this VIP's backends (default: the agent's).
        #[command(flatten)]
        check: CheckArgs,
        /// When every backend is down: drop (default) or fail-open.
        #[arg(long, value_name = "MODE")]
        all_down: Option<AllDown>,
        /// Ramp a backend that comes up to its full weight over this long.
        #[arg(long, value_name = "MS")]
        slow_start_ms: Option<u64>,
        /// What maglev hashes: 5-tuple (default) or dst-port (every client
        /// of one destination port gets the same backend).
        #[arg(long, value_name = "FIELDS")]
        hash: Option<HashMode>,
        /// Answer ICMP/ICMPv6 echo requests to the VIP's address in the
        /// datapath (default: the kernel's as before).
        #[arg(long)]
        answer_ping: bool,
        /// How its backends are reached: l2 (MAC rewrite, same segment;
        /// the default), ipip (IP-in-IP, routed) or gue (GUE over UDP, routed).
        #[arg(long, value_name = "MODE")]
        forward: Option<ForwardName>,
        /// QUIC (UDP VIPs): packets whose destination connection ID
        /// carries a backend's `--server-id` go to that backend (README:
        /// "QUIC connection-ID routing").
        #[arg(long)]
        quic: bool,
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
#[command(defer = true)]
pub enum BackendCmd {
    /// Add a backend to a VIP.
    Add {
        /// ADDR:PORT/PROTO
        vip: Vip,
        /// Backend IP address (same family as the VIP unless routed).
        #[arg(value_parser = parse_backend_ip)]
        ip: std::net::IpAddr,
        /// Backend MAC; resolved from the neighbour table when omitted.
        #[arg(long)]
        mac: Option<Mac>,
        /// Weight, 0..=10000 (0 = no new flows).
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// How to reach it, replacing the VIP's --forward: l2, ipip or gue.
        #[arg(long, value_name = "MODE")]
        forward: Option<ForwardName>,
        /// QUIC server ID, 1..=65535, unique in the VIP (a `--quic` VIP
        /// sends connection IDs carrying it to this backend).
        #[arg(long, value_name = "N")]
        server_id: Option<crate::quic::ServerId>,
        /// `--no-wait`.
        #[command(flatten)]
        wait: NoWait,
    },
    /// Change a backend's weight or state; prints how many table entries
    /// change.
    Set {
        /// ADDR:PORT/PROTO
        vip: Vip,
        /// Backend IP address.
        #[arg(value_parser = parse_backend_ip)]
        ip: std::net::IpAddr,
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
        /// `--no-wait`.
        #[command(flatten)]
        wait: NoWait,
    },
    /// Remove a backend from a VIP.
    Del {
        /// ADDR:PORT/PROTO
        vip: Vip,
        /// Backend IP address.
        #[arg(value_parser = parse_backend_ip)]
        ip: std::net::IpAddr,
    },
}

/// `--no-wait` of the table changes that scripts repeat.
#[derive(clap::Args, Debug)]
pub struct NoWait {
    /// Return once the agent has checked and recorded the change; its
    /// table is published within the agent's next tick (20 ms), once for
    /// all the changes that arrived meanwhile (for scripts adding many
    /// backends one command at a time; `xlb status` shows a VIP still
    /// publishing as pending).
    #[arg(long)]
    no_wait: bool,
}

/// `xlb vip …`.
pub fn vip(socket: &Path, cmd: VipCmd) -> Result<()> {
    match cmd {
        VipCmd::Add { vip, algo, persist_timeout, check, all_down, slow_start_ms, hash, answer_ping, forward, quic } => {
            // Values are parsed by their types; the rules across them
            // (persistence, hash and algorithm, checks of an any-port VIP)
            // are the agent's.
            let health = check.to_config()?;
            let (answer_ping, quic) = (answer_ping.then_some(true), quic.then_some(true));
            let r = api::call(
                socket,
                &Request::VipAdd { vip, algo: Some(algo), persist_timeout, health, all_down, slow_start_ms, hash, answer_ping, forward, quic },
            )?;
            if let Some(w) = r["warning"].as_str() {
                eprintln!("xlb: warning: {w}");
            }
            Ok(())
        }
        VipCmd::Del { vip } => {
            api::call(socket, &Request::VipDel { vip })?;
            Ok(())
        }
        VipCmd::List => {
            let v = api::call(socket, &Request::VipList)?;
            print_lines(v.as_array().into_iter().flatten().map(|vip| vip.as_str().unwrap_or_default()));
            Ok(())
        }
    }
}

/// `xlb backend …`.
pub fn backend(socket: &Path, cmd: BackendCmd) -> Result<()> {
    match cmd {
        BackendCmd::Add { vip, ip, mac, weight, forward, server_id, wait } => {
            // The address's family, the weight's range: the agent checks
            // them (a routed backend may be of the other family).
            let r = api::call_with(
                socket,
                &Request::BackendAdd { vip, ip, mac, weight: Some(weight), health: None, forward, server_id },
                wait.no_wait,
            )?;
            print_moved(&r, false);
            Ok(())
        }
        BackendCmd::Set { vip, ip, weight, drain, maint, up, dry_run, wait } => {
            let state = [(drain, Admin::Drain), (maint, Admin::Maint), (up, Admin::Ready)].iter().find(|(f, _)| *f).map(|(_, s)| *s);
            let r = api::call_with(socket, &Request::BackendSet { vip, ip, weight, state, dry_run }, wait.no_wait)?;
            print_moved(&r, dry_run);
            Ok(())
        }
        BackendCmd::Del { vip, ip } => {
            let r = api::call(socket, &Request::BackendDel { vip, ip })?;
            print_moved(&r, false);
            Ok(())
        }
    }
}

/// `xlb config …`.
pub fn config(socket: &Path, cmd: ConfigCmd) -> Result<()> {
    match cmd {
        ConfigCmd::Dump => {
            let v = api::call(socket, &Request::ConfigDump)?;
            print!("{}", v["toml"].as_str().unwrap_or(""));
            Ok(())
        }
        ConfigCmd::Reload { file } => {
            let file = file.map(|f| std::fs::canonicalize(&f).with_context(|| format!("cannot read {}", f.display()))).transpose()?;
            let v = api::call(socket, &Request::ConfigReload { path: file.map(|f| f.to_string_lossy().into_owned()) })?;
            let changes: Vec<&str> = v["changes"].as_array().into_iter().flatten().filter_map(|c| c.as_str()).collect();
            if changes.is_empty() {
                println!("config: no change");
            }
            print_lines(changes.iter().map(|c| format!("config: {c}")));
            Ok(())
        }
    }
}
