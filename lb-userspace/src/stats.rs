//! `xlb stats`: traffic counters from the agent's status, as a table, JSON,
//! or a view that refreshes in place every second with rates.
//!
//! `xlb decap` counters come with them: the agent reads them from its pin
//! root into its status; on a backend host, where `xlb decap` runs without
//! any agent, `xlb stats` reads them from the pins itself.

use anyhow::{Context, Result};
use serde::Serialize;
use std::{
    io::Write,
    path::Path,
    time::{Duration, Instant},
};

use crate::{
    agent::Status,
    api::{self, Request},
    encap::DecapStats,
};

/// Connection-table figures derived from the counters.
#[derive(Serialize, Debug, Default, Clone, Copy)]
pub struct Conntrack {
    /// Lookups that found a usable entry.
    pub hits: u64,
    /// Lookups that found nothing (new flows).
    pub misses: u64,
    /// Entries at the last census (walk of the table), if one ran.
    pub entries: Option<u64>,
    /// Capacity (live flows).
    pub capacity: u32,
    /// Memory, bytes.
    pub bytes: u64,
    /// Open entries a new flow took the place of (their flows lost their
    /// entry before they ended: the table is too small when this grows).
    pub evicted: u64,
}

/// Compute connection-table figures from a status.
pub fn conntrack(s: &Status) -> Conntrack {
    let c = |k: &str| s.counters.get(k).copied().unwrap_or(0);
    Conntrack {
        hits: c("conntrack_hit"),
        misses: c("conntrack_miss"),
        entries: s.conntrack_entries,
        capacity: s.conntrack_capacity,
        bytes: s.conntrack_bytes,
        evicted: c("conntrack_evicted"),
    }
}

fn fetch(socket: &Path) -> Result<Status> {
    let v = api::call(socket, &Request::Status)?;
    serde_json::from_value(v).context("malformed status from the agent")
}

fn rate(now: u64, before: Option<u64>, dt: f64) -> String {
    match before {
        Some(b) if dt > 0.0 => format!("{:>10.0}/s", now.saturating_sub(b) as f64 / dt),
        _ => format!("{:>12}", "-"),
    }
}

/// The traffic figures of one table row (a VIP or a backend).
struct Row {
    packets: u64,
    bytes: u64,
    new_flows: u64,
    active: u64,
}

/// One row: label, totals, and rates against the previous refresh.
fn row(label: &str, now: &Row, before: Option<&Row>, dt: f64) -> String {
    format!(
        "{label:<44} {:>12} {} {:>14} {:>10} {:>8} {}\n",
        now.packets,
        rate(now.packets, before.map(|p| p.packets), dt),
        now.bytes,
        now.new_flows,
        now.active,
        rate(now.new_flows, before.map(|p| p.new_flows), dt)
    )
}

fn render(s: &Status, prev: Option<&Status>, dt: f64) -> String {
    let mut out = String::new();
    let line = |o: &mut String, t: String| {
        o.push_str(&t);
        o.push('\n');
    };
    line(&mut out, format!("{:<44} {:>12} {:>12} {:>14} {:>10} {:>8} {:>12}", "VIP / backend", "packets", "pkt rate", "bytes", "new flows", "active", "flow rate"));
    let vip_row = |v: &crate::agent::VipStatus| Row { packets: v.packets, bytes: v.bytes, new_flows: v.new_flows, active: v.active_flows };
    let be_row = |b: &crate::agent::BackendStatus| Row { packets: b.packets, bytes: b.bytes, new_flows: b.new_flows, active: b.active_flows };
    for v in &s.vips {
        let pv = prev.and_then(|p| p.vips.iter().find(|x| x.vip == v.vip));
        out.push_str(&row(&format!("{} ({})", v.vip, v.algo), &vip_row(v), pv.map(vip_row).as_ref(), dt));
        for b in &v.backends {
            let pb = pv.and_then(|p| p.backends.iter().find(|x| x.ip == b.ip));
            out.push_str(&row(&format!("  {} [{}]", b.ip, b.state), &be_row(b), pb.map(be_row).as_ref(), dt));
        }
    }
    line(&mut out, String::new());
    for (k, v) in &s.counters {
        let r = rate(*v, prev.and_then(|p| p.counters.get(k).copied()), dt);
        line(&mut out, format!("{k:<24} {v:>14} {r}"));
    }
    let ct = conntrack(s);
    line(
        &mut out,
        format!(
            "\nconnection table: {} hits, {} misses, {} entries for {} flows ({:.1} MiB), {} open entries evicted{}",
            ct.hits,
            ct.misses,
            ct.entries.map(|e| e.to_string()).unwrap_or_else(|| "?".into()),
            ct.capacity,
            ct.bytes as f64 / (1 << 20) as f64,
            ct.evicted,
            s.conntrack_census_age_ms.map(|a| format!(" (census {:.0} s ago)", a as f64 / 1000.0)).unwrap_or_default()
        ),
    );
    if let Some(sync) = &s.sync {
        line(&mut out, sync.line());
    }
    out += &render_decap(&s.decap, prev.map(|p| &p.decap[..]), dt);
    out
}

/// The `xlb decap` counters of each interface, with rates.
fn render_decap(decap: &[DecapStats], prev: Option<&[DecapStats]>, dt: f64) -> String {
    let mut out = String::new();
    for d in decap {
        out += &format!("\nxlb decap on {}:\n", d.iface);
        let before = prev.and_then(|p| p.iter().find(|x| x.iface == d.iface));
        for (k, v) in &d.counters {
            out += &format!("{k:<24} {v:>14} {}\n", rate(*v, before.and_then(|b| b.counters.get(k).copied()), dt));
        }
    }
    out
}

/// What `xlb stats` shows: the agent's status, or on a host with no agent
/// answering, the `xlb decap` counters pinned under `pin_root`.
enum Shown {
    Agent(Box<Status>),
    DecapOnly(Vec<DecapStats>),
}

fn fetch_shown(socket: &Path, pin_root: &Path) -> Result<Shown> {
    match fetch(socket) {
        Ok(s) => Ok(Shown::Agent(Box::new(s))),
        Err(e) => {
            let decap = crate::encap::decap_all(pin_root)?;
            if decap.is_empty() {
                return Err(e.context(format!("and no xlb decap is pinned under {}", pin_root.display())));
            }
            Ok(Shown::DecapOnly(decap))
        }
    }
}

impl Shown {
    fn json(&self) -> serde_json::Value {
        match self {
            Shown::Agent(s) => serde_json::json!({ "status": s, "conntrack": conntrack(s) }),
            Shown::DecapOnly(d) => serde_json::json!({ "decap": d }),
        }
    }

    fn text(&self, prev: Option<&Shown>, dt: f64) -> String {
        match (self, prev) {
            (Shown::Agent(s), Some(Shown::Agent(p))) => render(s, Some(p), dt),
            (Shown::Agent(s), _) => render(s, None, dt),
            (Shown::DecapOnly(d), Some(Shown::DecapOnly(p))) => format!("no agent answers: xlb decap only\n{}", render_decap(d, Some(p), dt)),
            (Shown::DecapOnly(d), _) => format!("no agent answers: xlb decap only\n{}", render_decap(d, None, dt)),
        }
    }
}

/// Run `xlb stats` (`pin_root`: where to find `xlb decap` pins when no
/// agent answers).
pub fn run(socket: &Path, pin_root: &Path, json: bool, watch: bool) -> Result<()> {
    if json && !watch {
        println!("{}", serde_json::to_string_pretty(&fetch_shown(socket, pin_root)?.json())?);
        return Ok(());
    }
    if !watch {
        print!("{}", fetch_shown(socket, pin_root)?.text(None, 0.0));
        return Ok(());
    }
    let mut prev: Option<(Shown, Instant)> = None;
    loop {
        let s = fetch_shown(socket, pin_root)?;
        let now = Instant::now();
        let dt = prev.as_ref().map(|(_, t)| now.duration_since(*t).as_secs_f64()).unwrap_or(0.0);
        let text = if json {
            serde_json::to_string(&s.json())? + "\n"
        } else {
            // Home the cursor and clear the screen: refresh in place.
            format!("\x1b[H\x1b[2J{}", s.text(prev.as_ref().map(|(p, _)| p), dt))
        };
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())?;
        out.flush()?;
        prev = Some((s, now));
        std::thread::sleep(Duration::from_secs(1));
    }
}
