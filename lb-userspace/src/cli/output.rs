//! How the CLI prints the agent's answers.

use crate::agent::Status;
use std::fmt::Write as _;

/// "table: N of M entries changed" from an API answer.
pub fn print_moved(r: &serde_json::Value, dry_run: bool) {
    if let (Some(m), Some(e)) = (r["moved"].as_u64(), r["entries"].as_u64()) {
        let verb = if dry_run { "would change (dry run, nothing applied)" } else { "changed" };
        println!("table: {m} of {e} entries {verb}");
    } else if r["published"] == false {
        println!("table: published with the agent's next tick (--no-wait)");
    }
}

/// Print lines at once: stdout writes each line as it comes (line
/// buffered), so 512 lines one by one are 512 system calls.
pub fn print_lines<T: std::fmt::Display>(lines: impl IntoIterator<Item = T>) {
    let mut out = String::new();
    for l in lines {
        let _ = writeln!(out, "{l}");
    }
    print!("{out}");
}

/// `xlb status` as text, written at once (one line per write would be
/// thousands of system calls at hundreds of VIPs).
pub fn print_status(s: &Status) {
    let mut out = String::new();
    if s.vips.is_empty() {
        let _ = writeln!(out, "no VIPs");
    }
    for v in &s.vips {
        let mut persist = if v.persist_timeout > 0 { format!(" persist={}s", v.persist_timeout) } else { String::new() };
        if v.hash == "dst-port" {
            persist.push_str(" hash=dst-port");
        }
        if v.answer_ping {
            persist.push_str(" answer-ping");
        }
        if v.quic {
            persist.push_str(" quic");
        }
        if v.pending {
            persist.push_str(" (table pending)");
        }
        let _ = writeln!(
        out,
            "{}  algo={}{persist}  check={}  packets={} bytes={} new_flows={} active={}",
            v.vip, v.algo, v.health_check, v.packets, v.bytes, v.new_flows, v.active_flows
        );
        for b in &v.backends {
            let _ = writeln!(
        out,
                "  {:<39} {:<17} w={:<5} {:<4} share={:>5.1}%  packets={} new_flows={} active={} check={}{}{}{}",
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
                b.server_id.map(|i| format!(" server-id={i}")).unwrap_or_default(),
                b.reason.as_deref().map(|r| format!("  ({r})")).unwrap_or_default()
            );
        }
    }
    let _ = writeln!(
        out,
        "datapath: {} mode, program id {}, {}",
        s.attach_mode,
        s.program_id.map(|i| i.to_string()).unwrap_or_else(|| "?".into()),
        s.pinned.as_deref().map(|p| format!("maps pinned under {p}")).unwrap_or_else(|| "not pinned".into())
    );
    let _ = writeln!(
        out,
        "connection table: {} flows, {:.1} MiB, {} entries at the last census",
        s.conntrack_capacity,
        s.conntrack_bytes as f64 / (1 << 20) as f64,
        s.conntrack_entries.map(|e| e.to_string()).unwrap_or_else(|| "no".into())
    );
    if let Some(why) = &s.pins_lost_on_exit {
        let _ = writeln!(out, "warning: forwarding stops when the agent exits: {why}");
    }
    let mib = |b: u64| b as f64 / 1048576.0;
    let total: u64 = s.datapath_memory.values().sum();
    let parts: Vec<String> = s.datapath_memory.iter().filter(|(_, b)| **b >= 1 << 20).map(|(k, b)| format!("{k} {:.1}", mib(*b))).collect();
    let _ = writeln!(
        out,
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
    let _ = writeln!(out, "counters: {}", if nonzero.is_empty() { "all zero".into() } else { nonzero.join(" ") });
    print!("{out}");
}
