//! `cargo xtask bench`: every figure in one run, written to
//! `target/bench/results.json`, `REPORT.md` and `ns_per_packet.png`.

pub mod compare;
pub mod control;
pub mod cost;
pub mod encap;
pub mod fill_ratio;
pub mod live;
pub mod report;
pub mod scale;

use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;

use crate::scenario::Deployment;

/// A target from the issue, checked in this run.
#[derive(Serialize, Debug, Clone)]
pub struct Target {
    /// What is compared.
    pub name: String,
    /// Measured ratio.
    pub ratio: f64,
    /// Largest (or, for `at_least`, smallest) allowed.
    pub limit: f64,
    /// True when the ratio must be ≥ limit.
    pub at_least: bool,
    /// Met in this run.
    pub met: bool,
}

/// Everything measured.
#[derive(Serialize, Debug, Clone)]
pub struct Results {
    /// Machine, kernel, date.
    pub machine: serde_json::Value,
    /// Floors and xlb cases.
    pub cases: Vec<cost::Case>,
    /// Targets.
    pub targets: Vec<Target>,
    /// Live traffic.
    pub live: Vec<live::Live>,
    /// nftables / HAProxy comparison.
    pub compare: Vec<compare::Mode>,
    /// Control plane.
    pub control: control::Control,
    /// Control plane at scale.
    pub scale: Option<scale::Scale>,
    /// Sections that failed, with the reason.
    pub errors: Vec<String>,
}

fn machine() -> serde_json::Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo").lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).unwrap_or("?").trim().to_string();
    let mem_kb: u64 = read("/proc/meminfo").lines().next().and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0);
    let uname = std::process::Command::new("uname").arg("-r").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    let date = std::process::Command::new("date").arg("-u").arg("+%Y-%m-%d %H:%M UTC").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    serde_json::json!({
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_gib": (mem_kb as f64 / 1048576.0 * 10.0).round() / 10.0,
        "kernel": uname,
        "date": date,
    })
}

/// Run the benchmark's `sections` (any of cost, live, compare, scale; all
/// when empty; `encap` only when named).
pub fn run(xlb: &Path, floors: &str, out: &Path, sections: &[String]) -> Result<()> {
    let want = |s: &str| sections.is_empty() || sections.iter().any(|x| x == s);
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let lab_bin = std::env::current_exe()?;
    let mut errors = Vec::new();
    let mut cases = Vec::new();
    let mut targets = Vec::new();
    // Not part of a full run's default sections: `cargo xtask bench vipforms`.
    if sections.iter().any(|x| x == "vipforms") {
        eprintln!("bench: VIP forms (BPF_PROG_TEST_RUN)…");
        let mut fl = cost::Floors::load(floors)?;
        cases = cost::floors(&mut fl)?;
        let floor: std::collections::HashMap<String, f64> = cases.iter().map(|c| (c.case.clone(), c.ns_per_pkt)).collect();
        let floor_ns = |n: &str| floor.get(n).copied().unwrap_or(f64::NAN);
        cases.extend(cost::vip_forms(&mut fl, &floor_ns)?);
        for c in &cases {
            eprintln!("bench:   {:<45} {:>8.1} ns  ×{:.2} {}  ({})", c.case, c.ns_per_pkt, c.ratio, c.floor, c.verified);
        }
        // Same run: each configuration against none of the #13 features
        // (the interleaved pair is the one to trust on a loaded machine).
        let ns = |n: &str| cases.iter().find(|c| c.case == n).map(|c| c.ns_per_pkt).unwrap_or(f64::NAN);
        for base in ["nonvip_pass", "v4_tcp_established"] {
            let none = ns(&format!("{base} (no VIP forms)"));
            for w in ["VIP forms elsewhere", "prefix VIPs configured"] {
                if ns(&format!("{base} ({w})")).is_finite() {
                    eprintln!("bench:   {base}: {w} / none configured = {:.3}", ns(&format!("{base} ({w})")) / none);
                }
            }
            let none = ns(&format!("{base} (none configured, interleaved)"));
            for w in ["every #13 feature but prefix VIPs", "every #13 feature"] {
                eprintln!("bench:   {base}: {w} / none configured, interleaved medians = {:.3}", ns(&format!("{base} ({w}, interleaved)")) / none);
            }
        }
    }
    if want("cost") {
        eprintln!("bench: per-packet cost (BPF_PROG_TEST_RUN)…");
        let mut fl = cost::Floors::load(floors)?;
        cases = cost::floors(&mut fl)?;
        let floor: std::collections::HashMap<String, f64> = cases.iter().map(|c| (c.case.clone(), c.ns_per_pkt)).collect();
        let floor_ns = |n: &str| floor.get(n).copied().unwrap_or(f64::NAN);
        // XLB_BENCH_QUICK=1 (development): only 3 backends, the table
        // empty, 50 % and 100 % full; XLB_BENCH_QUICK=full: 3 backends, full.
        let (sizes, tables): (&[u32], &[u32]) = match std::env::var("XLB_BENCH_QUICK").as_deref() {
            Ok("full") => (&[3], &[100]),
            Ok(_) => (&[3], &[0, 50, 100]),
            Err(_) => (&[3, 100, 10_000], &[0, 50, 100]),
        };
        for &backends in sizes {
            for &fill in tables {
                eprintln!("bench:   {backends} backends, connection table {fill} % full");
                cases.extend(cost::cases(&mut fl, &floor_ns, backends, fill)?);
            }
        }
        let v4 = fill_ratio::alternated(&mut fl, &floor_ns, false)?;
        let v6 = fill_ratio::alternated(&mut fl, &floor_ns, true)?;
        cases.extend(v4.cases);
        cases.extend(v6.cases);
        let worst = |name: &str| cases.iter().filter(|c| c.case == name).map(|c| c.ratio).fold(0.0, f64::max);
        targets = vec![
            Target { name: "nonvip_pass / floor_pass (worst case)".into(), ratio: worst("nonvip_pass"), limit: 3.0, at_least: false, met: false },
            Target { name: "v4_tcp_established / floor_stateless_dsr (worst case)".into(), ratio: worst("v4_tcp_established"), limit: 2.5, at_least: false, met: false },
            Target { name: "v6_tcp_established / floor_stateless_dsr (worst case)".into(), ratio: worst("v6_tcp_established"), limit: 2.5, at_least: false, met: false },
            Target { name: "v4_tcp_new_flow / floor_one_line (worst case)".into(), ratio: worst("v4_tcp_new_flow"), limit: 1.5, at_least: false, met: false },
            Target { name: "v6_tcp_new_flow / floor_one_line (worst case)".into(), ratio: worst("v6_tcp_new_flow"), limit: 1.5, at_least: false, met: false },
            Target { name: "v4_tcp_new_flow, table full / table empty (3 backends, median of alternated rounds)".into(), ratio: v4.ratio, limit: 1.15, at_least: false, met: false },
            Target { name: "v6_tcp_new_flow, table full / table empty (3 backends, median of alternated rounds)".into(), ratio: v6.ratio, limit: 1.15, at_least: false, met: false },
            Target {
                name: "v4_tcp_new_flow / floor_stateless_dsr_new_flows (worst case)".into(),
                ratio: worst("v4_tcp_new_flow") * floor_ns("floor_one_line") / floor_ns("floor_stateless_dsr_new_flows"),
                limit: 5.0,
                at_least: false,
                met: false,
            },
            Target {
                name: "v4_tcp_new_flow / floor_stateless_dsr on one repeated frame (worst case)".into(),
                ratio: cases.iter().filter(|c| c.case == "v4_tcp_new_flow").map(|c| c.ns_per_pkt).fold(0.0, f64::max) / floor_ns("floor_stateless_dsr"),
                limit: 5.0,
                at_least: false,
                met: false,
            },
        ];
    }
    // Only on request: `cargo xtask bench profile` (needs perf).
    if sections.iter().any(|x| x == "profile") {
        let mut fl = cost::Floors::load(floors)?;
        cost::profile(&mut fl, out)?;
        return Ok(());
    }
    let mut live = Vec::new();
    // Only on request (`cargo xtask bench encap`): routed backends' cost
    // beside the L2 path's, measured the same way in the same run.
    if sections.iter().any(|x| x == "encap") {
        eprintln!("bench: routed backends (IPIP, GUE) beside L2, repeat-1 runs…");
        match encap::cases() {
            Ok(c) => cases.extend(c),
            Err(e) => errors.push(format!("encap: {e:#}")),
        }
    }
    if want("live") {
        // 1024 established flows, then every frame a new flow (0).
        for flows in [1024, 0] {
            let mix = if flows == 0 { "100 % new flows".to_string() } else { format!("{flows} established flows") };
            eprintln!("bench: live traffic (live frames over a veth), {mix}…");
            match live::run(xlb, &lab_bin, floors, 64, flows) {
                Ok(l) => {
                    let name = format!("live drop-free rate, xlb / reflector, {mix}");
                    targets.push(Target { name, ratio: l.ratio_drop_free, limit: 0.8, at_least: true, met: false });
                    live.push(l);
                }
                Err(e) => errors.push(format!("live traffic ({mix}): {e:#}")),
            }
        }
    }
    let mut control = control::Control { maglev_build_ms: control::maglev_builds(), ..Default::default() };
    let mut compare = Vec::new();
    if want("compare") {
        eprintln!("bench: control plane and nftables/HAProxy comparison (namespaces)…");
        let r = (|| -> Result<()> {
            let mut d = Deployment::start(xlb, &lab_bin, 3, &[])?;
            control.api_rtt_us = control::api_rtt(&d)?;
            d.configure()?;
            d.wait_states(&[1, 2, 3], std::time::Duration::from_secs(10))?;
            control.death_to_removal_ms = control::death_to_removal(&mut d, &lab_bin, 3)?;
            d.wait_states(&[1, 2, 3], std::time::Duration::from_secs(10))?;
            compare = compare::run(&mut d, floors)?;
            Ok(())
        })();
        if let Err(e) = r {
            errors.push(format!("comparison: {e:#}"));
        }
        if let Some((conns, iperf)) = compare::ratios(&compare) {
            targets.push(Target { name: "ab connections/s, xlb / stateless forwarder".into(), ratio: conns, limit: 0.93, at_least: true, met: false });
            targets.push(Target { name: "iperf3 throughput, xlb / stateless forwarder".into(), ratio: iperf, limit: 0.9, at_least: true, met: false });
        }
    }
    for t in &mut targets {
        t.met = if t.at_least { t.ratio >= t.limit } else { t.ratio <= t.limit };
    }
    let mut scale = None;
    if want("scale") {
        eprintln!("bench: control plane at scale (512 VIPs, namespaces)…");
        match scale::run(xlb, &lab_bin) {
            Ok(s) => scale = Some(s),
            Err(e) => errors.push(format!("scale: {e:#}")),
        }
    }
    for e in &errors {
        eprintln!("bench: FAILED {e}");
    }
    let results = Results { machine: machine(), cases, targets, live, compare, control, scale, errors };
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&results)?)?;
    let md = report::markdown(&results);
    std::fs::write(out.join("REPORT.md"), &md)?;
    if !results.cases.is_empty() {
        report::plot(&results, &out.join("ns_per_packet.png"))?;
    }
    println!("{md}");
    eprintln!("bench: wrote {}/results.json, REPORT.md, ns_per_packet.png", out.display());
    if !results.errors.is_empty() {
        anyhow::bail!("{} bench section(s) failed", results.errors.len());
    }
    Ok(())
}
