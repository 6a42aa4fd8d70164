//! `xlb stats`: traffic counters from the agent's status, as a table, JSON,
//! or a view that refreshes in place every second with rates.

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
    out
}

/// Run `xlb stats`.
pub fn run(socket: &Path, json: bool, watch: bool) -> Result<()> {
    if json && !watch {
        let s = fetch(socket)?;
        let v = serde_json::json!({ "status": &s, "conntrack": conntrack(&s) });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if !watch {
        print!("{}", render(&fetch(socket)?, None, 0.0));
        return Ok(());
    }
    let mut prev: Option<(Status, Instant)> = None;
    loop {
        let s = fetch(socket)?;
        let now = Instant::now();
        let dt = prev.as_ref().map(|(_, t)| now.duration_since(*t).as_secs_f64()).unwrap_or(0.0);
        let text = if json {
            serde_json::to_string(&serde_json::json!({ "status": &s, "conntrack": conntrack(&s) }))? + "\n"
        } else {
            // Home the cursor and clear the screen: refresh in place.
            format!("\x1b[H\x1b[2J{}", render(&s, prev.as_ref().map(|(p, _)| p), dt))
        };
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())?;
        out.flush()?;
        prev = Some((s, now));
        std::thread::sleep(Duration::from_secs(1));
    }
}
