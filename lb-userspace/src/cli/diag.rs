//! The requests that read the agent: `xlb status`, `explain`, `flows`,
//! `trace`, `ha …`.

use anyhow::{Context, Result};
use clap::Subcommand;
use std::path::{Path, PathBuf};

use super::output::print_status;
use crate::{
    agent::Status,
    api::{self, Request},
    config::Vip,
};

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

/// `xlb status`.
pub fn status(socket: &Path, json: bool) -> Result<()> {
    let v = api::call(socket, &Request::Status)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let s: Status = serde_json::from_value(v).context("malformed status from the agent")?;
        print_status(&s);
    }
    Ok(())
}

/// `xlb explain`.
pub fn explain(socket: &Path, vip: &Vip, client: &crate::diag::explain::Client, json: bool) -> Result<()> {
    let v = api::call(socket, &Request::Explain { vip: vip.to_string(), client: client.to_string() })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let e: crate::diag::explain::Explanation = serde_json::from_value(v).context("malformed explanation from the agent")?;
        print!("{}", crate::diag::explain::render(&e));
    }
    Ok(())
}

/// `xlb flows`.
pub fn flows(socket: &Path, vip: Option<Vip>, backend: Option<std::net::IpAddr>, limit: usize, json: bool) -> Result<()> {
    let req = Request::Flows { vip: vip.map(|v| v.to_string()), backend: backend.map(|b| b.to_string()), limit: Some(limit) };
    let v = api::call(socket, &req)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let r: crate::diag::flows::FlowsReport = serde_json::from_value(v).context("malformed flows from the agent")?;
        print!("{}", crate::diag::flows::render(&r));
    }
    Ok(())
}

/// `xlb trace`.
#[allow(clippy::too_many_arguments)]
pub fn trace(
    socket: &Path,
    vip: Option<Vip>,
    backend: Option<std::net::IpAddr>,
    verdict: Option<String>,
    count: Option<u64>,
    pcap: Option<PathBuf>,
    rate: u32,
    json: bool,
) -> Result<()> {
    if count == Some(0) {
        anyhow::bail!("--count must be at least 1");
    }
    let req = Request::Trace { vip: vip.map(|v| v.to_string()), backend: backend.map(|b| b.to_string()), verdict, count, rate: Some(rate) };
    crate::diag::trace::run(socket, &req, pcap.as_deref(), json)
}

/// `xlb ha …`.
pub fn ha(socket: &Path, cmd: HaCmd) -> Result<()> {
    match cmd {
        HaCmd::Check { grace } => {
            let (ready, line) = match ha_check(socket, grace) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("xlb: error: {}", format!("{e:#}").replace('\n', " "));
                    std::process::exit(2)
                }
            };
            println!("{line}");
            std::process::exit(if ready { 0 } else { 1 })
        }
        cmd => {
            let v = api::call(socket, &if matches!(cmd, HaCmd::Drain) { Request::HaDrain } else { Request::HaUndrain })?;
            let v: crate::ha::Verdict = serde_json::from_value(v).context("malformed answer from the agent")?;
            println!("{}", if v.drained { "drained: announcements withdrawn, forwarding goes on" } else { "undrained" });
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
