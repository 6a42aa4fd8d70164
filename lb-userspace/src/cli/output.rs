//! How the CLI prints the agent's answers.

use crate::agent::Status;

/// "table: N of M entries changed" from an API answer.
pub fn print_moved(r: &serde_json::Value, dry_run: bool) {
    if let (Some(m), Some(e)) = (r["moved"].as_u64(), r["entries"].as_u64()) {
        let verb = if dry_run { "would change (dry run, nothing applied)" } else { "changed" };
        println!("table: {m} of {e} entries {verb}");
    }
}

/// `xlb status` as text.
pub fn print_status(s: &Status) {
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
