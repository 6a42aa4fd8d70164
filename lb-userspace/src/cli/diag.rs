//! The requests that read the agent: `xlb status`, `explain`, `flows`,
//! `trace`, `ha …`.

use anyhow::{bail, Context, Result};
use std::io::Write;
use clap::Subcommand;
use std::path::{Path, PathBuf};

use super::output::print_status;
use crate::{
    agent::Status,
    diag::trace::{frame_bytes, render, PcapWriter, StreamMsg, TraceVerdict},
    api::{self, Request},
    config::Vip,
};

/// `xlb ha …`.
#[derive(Subcommand, Debug)]
#[command(defer = true)]
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
    show(v, json, "status", |s: Status| print_status(&s))
}

/// An answer as pretty JSON, or read as `T` and printed by `text`.
fn show<T: serde::de::DeserializeOwned>(v: serde_json::Value, json: bool, what: &str, text: impl FnOnce(T)) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        text(serde_json::from_value(v).with_context(|| format!("malformed {what} from the agent"))?);
    }
    Ok(())
}

/// `xlb explain`.
pub fn explain(socket: &Path, vip: &Vip, client: &crate::diag::explain::Client, json: bool) -> Result<()> {
    let v = api::call(socket, &Request::Explain { vip: *vip, client: *client })?;
    show(v, json, "explanation", |e| print!("{}", crate::diag::explain::render(&e)))
}

/// `xlb flows`.
pub fn flows(socket: &Path, vip: Option<Vip>, backend: Option<std::net::IpAddr>, limit: usize, json: bool) -> Result<()> {
    let req = Request::Flows { vip, backend, limit: Some(limit) };
    let v = api::call(socket, &req)?;
    show(v, json, "flows", |r| print!("{}", crate::diag::flows::render(&r)))
}

/// `xlb trace`.
#[allow(clippy::too_many_arguments)]
pub fn trace(
    socket: &Path,
    vip: Option<Vip>,
    backend: Option<std::net::IpAddr>,
    verdict: Option<TraceVerdict>,
    count: Option<u64>,
    pcap: Option<PathBuf>,
    rate: u32,
    json: bool,
) -> Result<()> {
    if count == Some(0) {
        anyhow::bail!("--count must be at least 1");
    }
    let req = Request::Trace { vip, backend, verdict, count, rate: Some(rate) };
    stream_trace(socket, &req, pcap.as_deref(), json)
}

/// `xlb trace`: stream from the agent at `socket`, print lines, write the pcap.
fn stream_trace(socket: &Path, req: &Request, pcap: Option<&Path>, json: bool) -> Result<()> {
    let mut pcap = pcap
        .map(|p| std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display())).and_then(|f| PcapWriter::new(std::io::BufWriter::new(f))))
        .transpose()?;
    let stdout = std::io::stdout();
    let mut ended = false;
    let end = api::client::stream(socket, req, |l| {
        match serde_json::from_str::<StreamMsg>(l).context("malformed trace line from the agent")? {
            StreamMsg::Frame(f) => {
                if let Some(p) = &mut pcap {
                    p.frame(f.time_ns, &frame_bytes(&f)?, f.len)?;
                }
                let text = if json { serde_json::to_string(&f)? } else { render(&f) };
                let mut o = stdout.lock();
                // A closed stdout (a pipe into head) ends the trace.
                if writeln!(o, "{text}").and_then(|_| o.flush()).is_err() {
                    ended = true;
                    return Ok(false);
                }
                Ok(true)
            }
            StreamMsg::End { frames, missed } => {
                eprintln!("trace: {frames} frame(s){}", if missed > 0 { format!(", {missed} matching frame(s) not recorded (rate limit)") } else { String::new() });
                ended = true;
                Ok(false)
            }
        }
    })?;
    if end == api::client::StreamEnd::Interrupted {
        // The pcap file is flushed after every record.
        eprintln!("trace: stopped (signal)");
        return Ok(());
    }
    if !ended {
        bail!("the agent ended the trace early");
    }
    Ok(())
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
