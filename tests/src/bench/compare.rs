//! Real clients and servers, same topology, same run: nginx on every backend
//! (port 8080), ApacheBench (`ab -n 20000 -c 16`, a new connection per
//! request) and iperf3 (one TCP stream, 4 s) from the client namespace, all
//! from Debian. Modes:
//! - `direct`: client to one backend, no balancer (the ceiling);
//! - `xlb`: the agent on the balancer (L2 DSR, Maglev over 3 backends);
//! - `stateless`: `floor_forward` attached in xlb's place: a ~20-line XDP
//!   program that hashes the 5-tuple into a table of backend MACs and
//!   rewrites the frame — the least any L2-DSR balancer does; xlb is
//!   reported against it (the extra hop through the balancer's namespace
//!   costs the same in both, and not xlb);
//! - `nftables`: `numgen` DNAT map, L3 NAT (replies return through it);
//! - `haproxy`: TCP mode (a proxy: two connections per client connection).
//!
//! iperf3 runs its control and data connections to one address and port:
//! its VIP (port 5201) has one backend, and the stateless ring holds only
//! that backend's MAC for it. CPU per connection: busy CPU time from
//! /proc/stat over each ab run, divided by connections, minus the same for
//! the direct baseline (client and server work is the same in every mode).
//! Three runs per mode, medians.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::{path::Path, time::Duration};

use crate::{
    lab::{backend_ip, sh, CLIENT_IP, LB_IP, VIP},
    scenario::Deployment,
};

/// ab requests (one connection each) per run, and in parallel.
const AB_REQUESTS: usize = 20_000;
const AB_PARALLEL: usize = 16;
/// iperf3 seconds per run.
const IPERF_SECS: u32 = 4;
const RUNS: usize = 3;
/// nginx's port on the backends, and the VIP's.
const HTTP_PORT: u16 = 8080;
const IPERF_PORT: u16 = 5201;

/// One mode's figures.
#[derive(Serialize, Debug, Clone)]
pub struct Mode {
    /// "direct", "xlb", "stateless", "nftables" or "haproxy".
    pub mode: String,
    /// ab: connections (requests) per second (median).
    pub conns_per_sec: f64,
    /// Busy CPU µs per connection, whole machine (median).
    pub cpu_us_per_conn: f64,
    /// Minus the direct baseline: the balancer's cost per connection.
    pub lb_cpu_us_per_conn: f64,
    /// ab's failed requests (and failed runs) over all runs.
    pub failed: usize,
    /// iperf3 throughput, Gbit/s (median), where measured.
    pub iperf_gbps: Option<f64>,
}

/// Busy jiffies (all CPUs) from /proc/stat.
fn busy_jiffies() -> Result<u64> {
    let s = std::fs::read_to_string("/proc/stat")?;
    let line = s.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    if v.len() < 7 {
        bail!("unexpected /proc/stat: {line}");
    }
    // user nice system idle iowait irq softirq steal
    Ok(v[0] + v[1] + v[2] + v[5] + v[6] + v.get(7).copied().unwrap_or(0))
}

const TICKS_PER_SEC: f64 = 100.0;

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// A number after `label` in ab's report.
fn ab_field(out: &str, label: &str) -> Option<f64> {
    out.lines().find(|l| l.trim_start().starts_with(label))?.split(':').nth(1)?.split_whitespace().next()?.parse().ok()
}

/// `RUNS` ab runs against `target`: (connections/s, CPU µs per connection, failed).
fn ab(d: &Deployment, target: &str) -> Result<(f64, f64, usize)> {
    let (mut cps, mut cpu, mut failed) = (Vec::new(), Vec::new(), 0);
    let url = format!("http://{target}/");
    for _ in 0..RUNS {
        let j0 = busy_jiffies()?;
        let out = d.lab.run("client", Path::new("/usr/bin/ab"), &["-q", "-r", "-s", "5", "-n", &AB_REQUESTS.to_string(), "-c", &AB_PARALLEL.to_string(), &url])?;
        let busy = (busy_jiffies()? - j0) as f64 / TICKS_PER_SEC;
        let text = String::from_utf8_lossy(&out.stdout);
        let (Some(rps), Some(done)) = (ab_field(&text, "Requests per second"), ab_field(&text, "Complete requests")) else {
            failed += AB_REQUESTS;
            eprintln!("bench: ab against {target} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
            continue;
        };
        failed += ab_field(&text, "Failed requests").unwrap_or(0.0) as usize + AB_REQUESTS.saturating_sub(done as usize);
        cps.push(rps);
        cpu.push(busy * 1e6 / AB_REQUESTS as f64);
    }
    Ok((median(cps), median(cpu), failed))
}

/// `RUNS` iperf3 runs against `addr`: median Gbit/s received.
fn iperf(d: &Deployment, addr: &str) -> Result<f64> {
    let mut v = Vec::new();
    for _ in 0..RUNS {
        let out = d.lab.run("client", Path::new("/usr/bin/iperf3"), &["-c", addr, "-p", &IPERF_PORT.to_string(), "-t", &IPERF_SECS.to_string(), "-J"])?;
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
        match j["end"]["sum_received"]["bits_per_second"].as_f64() {
            Some(bps) => v.push(bps / 1e9),
            None => bail!("iperf3 to {addr} failed: {}", j["error"].as_str().unwrap_or("no result")),
        }
    }
    Ok(median(v))
}

fn mac_of(d: &Deployment, role: &str) -> Result<String> {
    Ok(sh("ip", &["netns", "exec", &d.lab.ns(role), "cat", "/sys/class/net/eth0/address"])?.trim().to_string())
}

/// Start nginx (1 worker, a fixed answer) on every backend, and iperf3's
/// server on the first.
fn start_servers(d: &mut Deployment) -> Result<()> {
    for i in 1..=d.lab.backends {
        let conf = d.lab.dir.join(format!("nginx-b{i}.conf"));
        let dir = d.lab.dir.to_string_lossy().into_owned();
        std::fs::write(
            &conf,
            format!(
                "worker_processes 1;\ndaemon off;\npid {dir}/nginx-b{i}.pid;\nerror_log {dir}/nginx-b{i}.err warn;\nevents {{ worker_connections 4096; }}\nhttp {{\n access_log off;\n server {{\n  listen {HTTP_PORT} backlog=4096;\n  location / {{ return 200 \"b{i}\\n\"; }}\n }}\n}}\n"
            ),
        )?;
        d.lab.spawn(&format!("nginx{i}"), &format!("b{i}"), Path::new("/usr/sbin/nginx"), &["-c", &conf.to_string_lossy()])?;
    }
    d.lab.spawn("iperf3", "b1", Path::new("/usr/bin/iperf3"), &["-s", "-p", &IPERF_PORT.to_string()])?;
    let listening = |i: usize, port: u16| {
        sh("ip", &["netns", "exec", &d.lab.ns(&format!("b{i}")), "ss", "-ltn"]).map(|s| s.contains(&format!(":{port} "))).unwrap_or(false)
    };
    let up = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        (1..=d.lab.backends).all(|i| listening(i, HTTP_PORT)) && listening(1, IPERF_PORT)
    });
    if !up {
        bail!("nginx/iperf3 did not start: {} {}", d.lab.log("nginx1"), d.lab.log("iperf3"));
    }
    Ok(())
}

/// Run all modes. `d` is a started deployment with 3 backends; the agent
/// is detached on the way.
pub fn run(d: &mut Deployment, floors: &str) -> Result<Vec<Mode>> {
    // 3 × 20 000 connections per mode to the same VIP: let the client reuse
    // TIME_WAIT ports and use the whole port range.
    let client = d.lab.ns("client");
    for (k, v) in [("net.ipv4.tcp_tw_reuse", "1"), ("net.ipv4.ip_local_port_range", "1024 65535")] {
        sh("ip", &["netns", "exec", &client, "sysctl", "-qw", &format!("{k}={v}")])?;
    }
    start_servers(d)?;
    let backends: Vec<String> = (1..=d.lab.backends).map(|i| backend_ip(i).to_string()).collect();
    let http_vip = format!("{VIP}:{HTTP_PORT}");
    let mut rows: Vec<Mode> = Vec::new();
    let mut row = |mode: &str, (c, u, f): (f64, f64, usize), iperf_gbps: Option<f64>| {
        rows.push(Mode { mode: mode.into(), conns_per_sec: c, cpu_us_per_conn: u, lb_cpu_us_per_conn: 0.0, failed: f, iperf_gbps });
    };

    row("direct", ab(d, &format!("{}:{HTTP_PORT}", backends[0]))?, Some(iperf(d, &backends[0])?));

    // xlb: the HTTP VIP over every backend, iperf3's VIP on the first only.
    let http_arg = format!("{http_vip}/tcp");
    let iperf_arg = format!("{VIP}:{IPERF_PORT}/tcp");
    d.configure_vip(&http_arg, &[], &backends)?;
    // No health check on iperf3's VIP: iperf3's server serves one test at a
    // time, and a check's connection would make a run fail as "busy".
    d.configure_vip(&iperf_arg, &["--check", "none"], &backends[..1])?;
    let ip = |i: usize| backend_ip(i).to_string();
    let all: Vec<usize> = (1..=backends.len()).collect();
    d.wait_states_of(&http_arg, &ip, &all, Duration::from_secs(15))?;
    d.wait_states_of(&iperf_arg, &ip, &[1], Duration::from_secs(15))?;
    row("xlb", ab(d, &http_vip)?, Some(iperf(d, &VIP.to_string())?));
    // Detach (a stopped agent would leave the pinned program forwarding).
    d.cli_ok(&["detach"])?;

    // The stateless forwarder in xlb's place: over every backend for ab,
    // over the first only for iperf3.
    let macs: Vec<String> = (1..=backends.len()).map(|i| mac_of(d, &format!("b{i}"))).collect::<Result<_>>()?;
    let lb = d.lab.ns("lb");
    let attached = || sh("ip", &["-n", &lb, "link", "show", "eth0"]).map(|s| s.contains("xdp")).unwrap_or(false);
    let forwarder = |d: &mut Deployment, macs: &[String]| -> Result<()> {
        let vip = VIP.to_string();
        let mut args = vec!["attach", "--floors", floors, "--prog", "floor_forward", "--iface", "eth0", "--vip", &vip];
        for m in macs {
            args.extend(["--ring-mac", m.as_str()]);
        }
        let lab_bin = d.lab_bin.clone();
        d.lab.spawn("forwarder", "lb", &lab_bin, &args)?;
        if !(0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            attached()
        }) {
            bail!("the stateless forwarder did not attach: {}", d.lab.log("forwarder"));
        }
        Ok(())
    };
    forwarder(d, &macs)?;
    let ab_stateless = ab(d, &http_vip)?;
    d.lab.stop("forwarder")?;
    forwarder(d, &macs[..1])?;
    let iperf_stateless = iperf(d, &VIP.to_string())?;
    d.lab.stop("forwarder")?;
    row("stateless", ab_stateless, Some(iperf_stateless));

    // nftables: DNAT on the balancer, replies routed back through it.
    for (k, v) in [("net.ipv4.ip_forward", "1"), ("net.ipv4.conf.all.rp_filter", "0"), ("net.ipv4.conf.eth0.rp_filter", "0"), ("net.ipv4.conf.all.send_redirects", "0"), ("net.ipv4.conf.eth0.send_redirects", "0")] {
        sh("ip", &["netns", "exec", &lb, "sysctl", "-qw", &format!("{k}={v}")])?;
    }
    let map: Vec<String> = backends.iter().enumerate().map(|(i, b)| format!("{i} : {b}")).collect();
    let rules = format!(
        "table ip xlbbench {{\n chain pre {{\n  type nat hook prerouting priority -100;\n  ip daddr {VIP} tcp dport {HTTP_PORT} dnat to numgen inc mod {} map {{ {} }}\n }}\n}}\n",
        backends.len(),
        map.join(", ")
    );
    let rules_file = d.lab.dir.join("nft.conf");
    std::fs::write(&rules_file, rules)?;
    sh("ip", &["netns", "exec", &lb, "nft", "-f", &rules_file.to_string_lossy()])?;
    // NAT: the replies must come back through the balancer.
    let routes = |d: &Deployment, op: &str| -> Result<()> {
        for i in 1..=backends.len() {
            let mut args = vec!["-n".to_string(), d.lab.ns(&format!("b{i}")), "route".into(), op.into(), format!("{CLIENT_IP}/32")];
            if op == "add" {
                args.extend(["via".to_string(), LB_IP.to_string()]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            sh("ip", &args)?;
        }
        Ok(())
    };
    routes(d, "add")?;
    row("nftables", ab(d, &http_vip)?, None);
    sh("ip", &["netns", "exec", &lb, "nft", "delete", "table", "ip", "xlbbench"])?;
    routes(d, "del")?;

    // HAProxy in TCP mode, listening on the VIP on the balancer.
    sh("ip", &["-n", &lb, "addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
    let servers: String = backends.iter().enumerate().map(|(i, b)| format!(" server b{} {b}:{HTTP_PORT}\n", i + 1)).collect();
    let cfg = format!(
        "global\n maxconn 4000\ndefaults\n mode tcp\n timeout connect 3s\n timeout client 10s\n timeout server 10s\nfrontend f\n bind {http_vip}\n default_backend b\nbackend b\n balance roundrobin\n{servers}"
    );
    let cfg_file = d.lab.dir.join("haproxy.cfg");
    std::fs::write(&cfg_file, cfg)?;
    d.lab.spawn("haproxy", "lb", Path::new("/usr/sbin/haproxy"), &["-f", &cfg_file.to_string_lossy(), "-db"])?;
    let up = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        sh("ip", &["netns", "exec", &lb, "ss", "-ltn"]).map(|s| s.contains(&http_vip)).unwrap_or(false)
    });
    if !up {
        bail!("haproxy did not start: {}", d.lab.log("haproxy"));
    }
    row("haproxy", ab(d, &http_vip)?, None);
    d.lab.stop("haproxy")?;

    let base = rows[0].cpu_us_per_conn;
    for r in rows.iter_mut().skip(1) {
        r.lb_cpu_us_per_conn = r.cpu_us_per_conn - base;
    }
    Ok(rows)
}

/// xlb ÷ the stateless forwarder: (ab connections/s, iperf3 throughput).
pub fn ratios(rows: &[Mode]) -> Option<(f64, f64)> {
    let get = |m: &str| rows.iter().find(|r| r.mode == m);
    let (x, s) = (get("xlb")?, get("stateless")?);
    Some((x.conns_per_sec / s.conns_per_sec, x.iperf_gbps? / s.iperf_gbps?))
}
