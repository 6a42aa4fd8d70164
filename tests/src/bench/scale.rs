//! Control plane at scale (issue 10): how a table is written (one system
//! call per entry into an existing array, or a new table created and filled
//! with one batch update or with stores through a memory mapping of the
//! `BPF_F_MMAPABLE` array, as the agent publishes one: 65 537 entries, in
//! this run), one table change from request to published, and
//! many VIPs sharing backends (`scale::shared`): 512 VIPs × 3 backend hosts
//! configured from a file and through the CLI one by one, and 64 VIPs × 100
//! backends from a file and through the CLI one by one.

use anyhow::{Context, Result};
use aya::maps::{Array, MapData};
use serde::Serialize;
use std::{
    path::Path,
    time::{Duration, Instant},
};
use xlb::{
    api::{self, Request},
    maps::tables::{create_table, fill_table, Fill},
};

use crate::{
    lab::{backend_ip, TempDir, VIP},
    scale::{self, Checks, Shared},
    scenario::Deployment,
};

/// Everything this section measured.
#[derive(Serialize, Debug, Clone, Default)]
pub struct Scale {
    /// Writing 65 537 table entries, ms (median of 5): one `bpf_map_update_elem` each.
    pub write_per_entry_ms: f64,
    /// A new table created and filled with one `BPF_MAP_UPDATE_BATCH`, ms (median of 21).
    pub write_batch_ms: f64,
    /// A new table created and filled through a memory mapping (median of
    /// 21; what the agent does).
    pub write_mmap_ms: f64,
    /// `backend set --weight` on a 3-backend VIP, request sent → table
    /// published (the VIP entry's update, timed by the agent), ms: median
    /// and max of 21, every weight a new one (no cached Maglev layout).
    pub table_change_ms: [f64; 2],
    /// The same, request sent → answer (once published; the agent writes
    /// the state file right after answering).
    pub table_change_answer_ms: [f64; 2],
    /// 512 VIPs × 3 shared backends.
    pub shared_512: Option<Shared>,
    /// The same 512 × 3 through the CLI (`vip add`, 3 × `backend add` each), s.
    pub cli_512_s: Option<f64>,
    /// Where a CLI command's time goes, ms (medians of 50, after the 512 ×
    /// 3): `xlb --version` (process start); `xlb vip list` (start, connect
    /// and a request that changes nothing); `xlb backend set --weight` on
    /// one of the 512 VIPs (a plan, a publication, a state-file save).
    pub cli_split_ms: Option<[f64; 3]>,
    /// Load average (1 min) when the CLI run started: the machine is shared.
    pub cli_load: Option<f64>,
    /// 64 VIPs × 100 backends (configured MACs, no checks: no 100
    /// namespaces), `config reload`, ms.
    pub reload_64x100_ms: Option<f64>,
    /// The same 64 × 100 through the CLI one command at a time (`vip add`,
    /// 100 × `backend add` each: 6 464 commands), s.
    pub cli_64x100_s: Option<f64>,
    /// What 6 464 process starts alone cost here: `xlb --version` as many
    /// times, s (the floor of any one-command-at-a-time run).
    pub cli_64x100_floor_s: Option<f64>,
    /// Load average (1 min) when the 64 × 100 CLI run started.
    pub cli_64x100_load: Option<f64>,
    /// The same 6 464 commands with `--no-wait` on the backend adds, s: the
    /// agent answers once the change is recorded and publishes each VIP's
    /// table once per tick; until every VIP's table is published (checked
    /// to be the table the waiting run published, by fingerprint).
    pub cli_64x100_no_wait_s: Option<f64>,
    /// Table memory with 512 VIPs, MiB (`XLB_TABLES` in `xlb status`: the
    /// tables allocated for the VIPs configured).
    pub tables_mib_512: Option<f64>,
    /// The same with one VIP (a fresh agent, `--max-vips 512`).
    pub tables_mib_1: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// The ways to write a table: per entry into an existing array; a new
/// table created and filled in one batch, or through a memory mapping.
pub fn table_writes() -> Result<(f64, f64, f64)> {
    const N: u32 = lb_common::DEFAULT_RING_SIZE;
    let table: Vec<u32> = (0..N).map(|i| i % 3).collect();
    let mut plain: Array<MapData, u32> = Array::create(N, 0).context("array")?;
    let mut per_entry = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        for (i, v) in table.iter().enumerate() {
            plain.set(i as u32, v, 0)?;
        }
        per_entry.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let new_table = |how: Fill| -> Result<f64> {
        let t = Instant::now();
        let map = create_table(N)?;
        fill_table(&map, &table, how)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        // The kernel sees what was written.
        for i in [0u32, 1, 777, N - 1] {
            let line = map.get(&lb_common::TableLine::element(i), 0)?;
            anyhow::ensure!(line.entry(i) == table[i as usize], "{how:?} fill not seen by the kernel at {i}");
        }
        Ok(ms)
    };
    let (mut batch, mut mm) = (Vec::new(), Vec::new());
    for _ in 0..21 {
        batch.push(new_table(Fill::Batch)?);
        mm.push(new_table(Fill::Mmap)?);
    }
    Ok((median(per_entry), median(batch), median(mm)))
}

/// Run the section.
pub fn run(xlb: &Path, lab_bin: &Path) -> Result<Scale> {
    let mut r = Scale::default();
    (r.write_per_entry_ms, r.write_batch_ms, r.write_mmap_ms) = table_writes()?;
    let dir = TempDir::new("bench-scale")?;
    // 512 VIPs × 3 from a file; steady state; a killed backend; then table
    // changes on a VIP whose (two remaining) backends are up.
    {
        let mut d = Deployment::start(xlb, lab_bin, 3, &["--max-vips", "512", "--max-tables", "512"])?;
        let c = Checks { interval_ms: 100, fast_interval_ms: 100, fall: 3 };
        r.shared_512 = Some(scale::shared(&mut d, &dir.0, 512, c, Duration::from_secs(60), true)?);
        // Table memory once the removal's burst is over: the tables it
        // replaced stay ready for 2 s (a burst that follows takes them).
        let live = 512 * lb_common::TableLine::bytes(lb_common::DEFAULT_RING_SIZE);
        let t = Instant::now();
        let mut st = scale::status(&d)?;
        while st["datapath_memory"]["XLB_TABLES"].as_u64().unwrap_or(0) > live + live / 4 && t.elapsed() < Duration::from_secs(6) {
            std::thread::sleep(Duration::from_millis(200));
            st = scale::status(&d)?;
        }
        r.tables_mib_512 = st["datapath_memory"]["XLB_TABLES"].as_u64().map(|b| b as f64 / 1048576.0);
        let vip = format!("{VIP}:1000/tcp");
        let b2 = backend_ip(2).to_string();
        let (mut published, mut answered) = (Vec::new(), Vec::new());
        let now_us = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0);
        for i in 0..21u32 {
            let req = Request::BackendSet { vip: vip.parse()?, ip: b2.parse()?, weight: Some(2 + i), state: None, dry_run: false };
            let (t, sent) = (Instant::now(), now_us());
            let v = api::call(&d.socket, &req)?;
            answered.push(t.elapsed().as_secs_f64() * 1e3);
            anyhow::ensure!(v["moved"].as_u64().unwrap_or(0) > 0, "weight {} changed no table entry: {v}", 2 + i);
            let st = scale::status(&d)?;
            let at = st["vips"].as_array().into_iter().flatten().find(|x| x["vip"] == vip.as_str()).and_then(|x| x["published_at_us"].as_u64());
            published.push(at.context("publication time")?.saturating_sub(sent) as f64 / 1e3);
        }
        let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        r.table_change_ms = [median(published.clone()), max(&published)];
        r.table_change_answer_ms = [median(answered.clone()), max(&answered)];
    }
    // 512 × 3 through the CLI, checked on port 80 like the file's.
    {
        let d = Deployment::start(xlb, lab_bin, 3, &["--max-vips", "512", "--max-tables", "512"])?;
        let ips: Vec<String> = (1..=3).map(|i| backend_ip(i).to_string()).collect();
        r.cli_load = std::fs::read_to_string("/proc/loadavg").ok().and_then(|l| l.split_whitespace().next()?.parse().ok());
        let t = Instant::now();
        let mut aside = Duration::ZERO;
        for p in 0..512 {
            d.configure_vip(&format!("{VIP}:{}/tcp", 1000 + p), &["--check-port", "80"], &ips)?;
            if p == 0 {
                // Memory with one VIP (not part of the timed figure).
                let t1 = Instant::now();
                let st = scale::status(&d)?;
                r.tables_mib_1 = st["datapath_memory"]["XLB_TABLES"].as_u64().map(|b| b as f64 / 1048576.0);
                aside += t1.elapsed();
            }
        }
        r.cli_512_s = Some((t.elapsed() - aside).as_secs_f64());
        let timed = |args: &[&str]| -> Result<f64> {
            let t = Instant::now();
            d.cli_ok(args)?;
            Ok(t.elapsed().as_secs_f64() * 1e3)
        };
        let (mut start, mut noop, mut set) = (Vec::new(), Vec::new(), Vec::new());
        let vip = format!("{VIP}:1200/tcp");
        for i in 0..50u32 {
            start.push(timed(&["--version"])?);
            noop.push(timed(&["vip", "list"])?);
            set.push(timed(&["backend", "set", &vip, &ips[1], "--weight", &(2 + i).to_string()])?);
        }
        r.cli_split_ms = Some([median(start), median(noop), median(set)]);
    }
    // 64 × 100, configured MACs and no checks.
    {
        let d = Deployment::start(xlb, lab_bin, 1, &["--max-vips", "64"])?;
        let backends: Vec<(String, Option<String>)> = (0..100u32)
            .map(|i| (format!("10.200.{}.{}", 1 + i / 200, 1 + i % 200), Some(format!("02:00:00:00:{:02x}:{:02x}", i / 256, i % 256 + 1))))
            .collect();
        let text = scale::config(64, &backends, Checks { interval_ms: 300, fast_interval_ms: 100, fall: 3 }).replace("kind = \"tcp\"", "kind = \"none\"");
        r.reload_64x100_ms = Some(scale::reload(&d, &dir.0, &text)?);
        let st = scale::status(&d)?;
        let up = st["vips"].as_array().into_iter().flatten().flat_map(|v| v["backends"].as_array().into_iter().flatten()).filter(|b| b["state"] == "up").count();
        anyhow::ensure!(up == 6400, "64 × 100: {up} of 6400 backends up");
    }
    // The same 64 × 100 through the CLI, one command per VIP and per
    // backend: waiting for each table, then with `--no-wait`.
    let fingerprints = |d: &Deployment| -> Result<Vec<(String, String, bool, usize)>> {
        let st = scale::status(d)?;
        Ok(st["vips"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| {
                let n = v["backends"].as_array().map_or(0, Vec::len);
                (v["vip"].as_str().unwrap_or_default().to_string(), v["table_fingerprint"].as_str().unwrap_or_default().to_string(), v["pending"] == true, n)
            })
            .collect())
    };
    let mut waited = Vec::new();
    for no_wait in [false, true] {
        let d = Deployment::start(xlb, lab_bin, 1, &["--max-vips", "64"])?;
        let backends: Vec<(String, String)> =
            (0..100u32).map(|i| (format!("10.200.{}.{}", 1 + i / 200, 1 + i % 200), format!("02:00:00:00:{:02x}:{:02x}", i / 256, i % 256 + 1))).collect();
        if !no_wait {
            r.cli_64x100_load = std::fs::read_to_string("/proc/loadavg").ok().and_then(|l| l.split_whitespace().next()?.parse().ok());
        }
        let t = Instant::now();
        for p in 0..64 {
            let vip = format!("{VIP}:{}/tcp", 1000 + p);
            d.cli_ok(&["vip", "add", &vip, "--check", "none"])?;
            for (ip, mac) in &backends {
                let mut args = vec!["backend", "add", &vip, ip, "--mac", mac];
                if no_wait {
                    args.push("--no-wait");
                }
                d.cli_ok(&args)?;
            }
        }
        let tables = if no_wait {
            // Until the last table is published (bounded: a tick is 20 ms).
            let mut tables = fingerprints(&d)?;
            for _ in 0..100 {
                if tables.iter().all(|t| !t.2) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
                tables = fingerprints(&d)?;
            }
            r.cli_64x100_no_wait_s = Some(t.elapsed().as_secs_f64());
            tables
        } else {
            r.cli_64x100_s = Some(t.elapsed().as_secs_f64());
            let t = Instant::now();
            for _ in 0..64 * 101 {
                d.cli_ok(&["--version"])?;
            }
            r.cli_64x100_floor_s = Some(t.elapsed().as_secs_f64());
            fingerprints(&d)?
        };
        let n: usize = tables.iter().map(|t| t.3).sum();
        anyhow::ensure!(n == 6400, "64 × 100 through the CLI: {n} of 6400 backends configured");
        anyhow::ensure!(tables.iter().all(|t| !t.2), "64 × 100 with --no-wait: tables still pending 0.5 s after the last command");
        if no_wait {
            anyhow::ensure!(tables == waited, "64 × 100: the tables published after --no-wait differ from those published waiting");
        }
        waited = tables;
    }
    Ok(r)
}
