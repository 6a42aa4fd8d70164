//! Many VIPs sharing backend hosts, as real fleets do (80 and 443 of many
//! tenants on the same servers): configuration time, steady state (no false
//! downs, checks per second = distinct targets / interval), and how fast a
//! killed shared backend leaves every VIP's table. Used by the end-to-end
//! test (64 VIPs) and by `cargo xtask bench` (512 VIPs, and 64 × 100).

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;
use std::{
    path::Path,
    time::{Duration, Instant},
};
use xlb::api::{self, Request};

use crate::{lab::VIP, scenario::Deployment};

/// Health settings of the scenario: every VIP checks its backends on port
/// 80 (one service port per tenant, one check port per host), so all VIPs
/// share one check job per backend host.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Checks {
    /// `interval_ms`.
    pub interval_ms: u64,
    /// `fast_interval_ms`.
    pub fast_interval_ms: u64,
    /// `fall`.
    pub fall: u32,
}

/// A config file: `vips` VIPs on the lab's VIP address (ports 1000…), each
/// with every backend in `backends` (address, configured MAC if any).
pub fn config(vips: usize, backends: &[(String, Option<String>)], c: Checks) -> String {
    let mut t = format!(
        "[health]\nkind = \"tcp\"\nport = 80\ninterval_ms = {}\nfast_interval_ms = {}\nfall = {}\n",
        c.interval_ms, c.fast_interval_ms, c.fall
    );
    for p in 0..vips {
        t.push_str(&format!("\n[[vip]]\naddress = \"{VIP}:{}/tcp\"\n", 1000 + p));
        for (ip, mac) in backends {
            t.push_str(&format!("\n[[vip.backend]]\nip = \"{ip}\"\n"));
            if let Some(m) = mac {
                t.push_str(&format!("mac = \"{m}\"\n"));
            }
        }
    }
    t
}

/// `xlb status --json`, straight from the API (no CLI process per poll).
pub fn status(d: &Deployment) -> Result<Value> {
    api::call(&d.socket, &Request::Status)
}

/// Backends (of all VIPs) in `state`, and the VIPs whose every backend is up.
fn count(st: &Value, pred: &dyn Fn(&Value) -> bool) -> usize {
    st["vips"].as_array().into_iter().flatten().flat_map(|v| v["backends"].as_array().into_iter().flatten()).filter(|b| pred(b)).count()
}

/// Sum of every backend's up/down transitions.
pub fn transitions(st: &Value) -> u64 {
    st["vips"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|v| v["backends"].as_array().into_iter().flatten())
        .map(|b| b["transitions"].as_u64().unwrap_or(0))
        .sum()
}

/// What a run measured.
#[derive(Serialize, Debug, Clone, Default)]
pub struct Shared {
    /// VIPs × backends.
    pub vips: usize,
    /// Backends per VIP.
    pub backends: usize,
    /// `config reload` of the whole file, request to answer, ms.
    pub reload_ms: f64,
    /// From the reload to every backend of every VIP up, ms.
    pub all_up_ms: f64,
    /// Distinct check jobs the agent runs.
    pub check_jobs: u64,
    /// Steady-state period observed, s.
    pub steady_s: f64,
    /// Check jobs started per second during it.
    pub checks_per_s: f64,
    /// What that should be: distinct targets / interval.
    pub expected_checks_per_s: f64,
    /// Up/down transitions during it (every one is a false down or up).
    pub false_transitions: u64,
    /// Tables published during it (nothing changed: should be 0).
    pub steady_publications: u64,
    /// Lines of the agent's log about MAC resolution or netlink failures.
    pub netlink_errors: usize,
    /// A shared backend's server killed → out of every VIP's table, ms
    /// (the last VIP's publication time, from status, minus the kill's).
    pub removal_ms: Option<f64>,
    /// The same as seen by polling status every 20 ms.
    pub removal_seen_ms: Option<f64>,
    /// The bound it should meet: fall × fast interval + 100 ms.
    pub removal_bound_ms: f64,
}

/// Apply `text` with `xlb config reload --file` and return the time it took.
pub fn reload(d: &Deployment, dir: &Path, text: &str) -> Result<f64> {
    let file = dir.join("scale.toml");
    std::fs::write(&file, text)?;
    let t0 = Instant::now();
    api::call(&d.socket, &Request::ConfigReload { path: Some(file.to_string_lossy().into_owned()) }).context("config reload")?;
    Ok(t0.elapsed().as_secs_f64() * 1e3)
}

/// Log lines that mean MAC resolution or netlink trouble.
pub fn netlink_errors(log: &str) -> usize {
    log.lines().filter(|l| l.contains("resolving the MAC") || l.contains("buffer full") || l.contains("ENOBUFS") || l.contains("neighbour table dump failed")).count()
}

/// Configure `vips` VIPs sharing the deployment's backends (by address,
/// MACs resolved by the agent), wait for all to be up, watch the steady
/// state for `steady`, then (if `kill`) kill backend 1's server and time
/// its removal from every VIP's table.
pub fn shared(d: &mut Deployment, dir: &Path, vips: usize, c: Checks, steady: Duration, kill: bool) -> Result<Shared> {
    let backends: Vec<(String, Option<String>)> = (1..=d.lab.backends).map(|i| (crate::lab::backend_ip(i).to_string(), None)).collect();
    let n = backends.len();
    let mut r = Shared { vips, backends: n, removal_bound_ms: (c.fall as u64 * c.fast_interval_ms + 100) as f64, ..Default::default() };
    let t0 = Instant::now();
    r.reload_ms = reload(d, dir, &config(vips, &backends, c))?;
    loop {
        let st = status(d)?;
        if st["vips"].as_array().map_or(0, |v| v.len()) == vips && count(&st, &|b| b["state"] == "up") == vips * n {
            break;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("not all {} backends up after 30 s: {} up", vips * n, count(&st, &|b| b["state"] == "up"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    r.all_up_ms = t0.elapsed().as_secs_f64() * 1e3;
    let before = status(d)?;
    let t1 = Instant::now();
    std::thread::sleep(steady);
    let after = status(d)?;
    r.steady_s = t1.elapsed().as_secs_f64();
    r.check_jobs = after["check_jobs"].as_u64().unwrap_or(0);
    let started = after["checks_started"].as_u64().unwrap_or(0) - before["checks_started"].as_u64().unwrap_or(0);
    r.checks_per_s = started as f64 / r.steady_s;
    r.expected_checks_per_s = n as f64 * 1000.0 / c.interval_ms as f64;
    r.false_transitions = transitions(&after) - transitions(&before);
    r.steady_publications = after["publications"].as_u64().unwrap_or(0) - before["publications"].as_u64().unwrap_or(0);
    r.netlink_errors = netlink_errors(&d.lab.log("agent"));
    if kill {
        let dead = crate::lab::backend_ip(1).to_string();
        let t = Instant::now();
        let killed_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros() as u64;
        d.lab.kill("server1")?;
        loop {
            let st = status(d)?;
            // Out of the table: down, and owning no entry of the published table.
            let out = count(&st, &|b| b["ip"] == dead.as_str() && b["state"] == "down" && b["table_share"].as_f64() == Some(0.0));
            if out == vips {
                r.removal_seen_ms = Some(t.elapsed().as_secs_f64() * 1e3);
                let last = st["vips"].as_array().into_iter().flatten().filter_map(|v| v["published_at_us"].as_u64()).max().unwrap_or(0);
                r.removal_ms = Some(last.saturating_sub(killed_us) as f64 / 1e3);
                break;
            }
            if t.elapsed() > Duration::from_secs(10) {
                bail!("backend 1 still in {} of {vips} tables after 10 s", vips - out);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let st = status(d)?;
        let others_up = count(&st, &|b| b["ip"] != dead.as_str() && b["state"] == "up");
        if others_up != vips * (n - 1) {
            bail!("only {others_up} of {} other backends stayed up", vips * (n - 1));
        }
    }
    Ok(r)
}
