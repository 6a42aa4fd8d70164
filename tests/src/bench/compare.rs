//! What a user would pick instead, same topology, same client load, same
//! run: L4 balancing with nftables (`numgen` DNAT map, L3 NAT: replies return
//! through the balancer) and HAProxy in TCP mode (a proxy: two TCP
//! connections per client connection), against xlb (L2 DSR) and a direct
//! baseline (client to one backend, no balancer).
//!
//! Connections per second: `CONNS` (20 000) HTTP connections, 16 in parallel, from the
//! client namespace. CPU per connection: all namespaces share this machine's
//! CPUs, so the balancer's CPU cannot be read alone; busy CPU time from
//! /proc/stat over the run, divided by connections, minus the same for the
//! direct baseline, is the balancer's extra cost (client and server work is
//! the same in every mode). Three runs per mode, medians.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::{path::Path, time::Instant};

use crate::{
    lab::{backend_ip, sh, CLIENT_IP, LB_IP, VIP},
    scenario::Deployment,
};

const CONNS: usize = 20_000;
const RUNS: usize = 3;

/// One mode's figures.
#[derive(Serialize, Debug, Clone)]
pub struct Mode {
    /// "direct", "xlb", "nftables" or "haproxy".
    pub mode: String,
    /// Connections per second (median).
    pub conns_per_sec: f64,
    /// Busy CPU µs per connection, whole machine (median).
    pub cpu_us_per_conn: f64,
    /// Minus the direct baseline: the balancer's cost per connection.
    pub lb_cpu_us_per_conn: f64,
    /// Failed connections over all runs.
    pub failed: usize,
}

/// Busy jiffies (all CPUs) from /proc/stat.
fn busy_jiffies() -> Result<u64> {
    let s = std::fs::read_to_string("/proc/stat")?;
    let line = s.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal
    Ok(v[0] + v[1] + v[2] + v[5] + v[6] + v.get(7).copied().unwrap_or(0))
}

fn ticks_per_sec() -> f64 {
    100.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

fn measure(d: &Deployment, target: &str) -> Result<(f64, f64, usize)> {
    let (mut cps, mut cpu, mut failed) = (Vec::new(), Vec::new(), 0);
    for _ in 0..RUNS {
        let j0 = busy_jiffies()?;
        let t = Instant::now();
        let s = d.connect_to(target, CONNS)?;
        let el = t.elapsed().as_secs_f64();
        let busy = (busy_jiffies()? - j0) as f64 / ticks_per_sec();
        failed += s.failed;
        cps.push(s.ok as f64 / el);
        cpu.push(busy * 1e6 / CONNS as f64);
    }
    Ok((median(cps), median(cpu), failed))
}

/// Run all modes. `d` is a started deployment with the lab VIP configured
/// and its 3 backends up; the agent is stopped on the way.
pub fn run(d: &mut Deployment) -> Result<Vec<Mode>> {
    // 3 × 20 000 connections per mode to the same VIP: let the client reuse
    // TIME_WAIT ports and use the whole port range.
    let client = d.lab.ns("client");
    for (k, v) in [("net.ipv4.tcp_tw_reuse", "1"), ("net.ipv4.ip_local_port_range", "1024 65535")] {
        sh("ip", &["netns", "exec", &client, "sysctl", "-qw", &format!("{k}={v}")])?;
    }
    let mut rows: Vec<(String, f64, f64, usize)> = Vec::new();
    let direct = format!("{}:80", backend_ip(1));
    let (c, u, f) = measure(d, &direct)?;
    rows.push(("direct".into(), c, u, f));

    let (c, u, f) = measure(d, &format!("{VIP}:80"))?;
    rows.push(("xlb".into(), c, u, f));
    // Detach (a stopped agent would leave the pinned program forwarding).
    d.cli_ok(&["detach"])?;

    // nftables: DNAT on the balancer, replies routed back through it.
    let lbns = d.lab.ns("lb");
    for (k, v) in [("net.ipv4.ip_forward", "1"), ("net.ipv4.conf.all.rp_filter", "0"), ("net.ipv4.conf.eth0.rp_filter", "0"), ("net.ipv4.conf.all.send_redirects", "0"), ("net.ipv4.conf.eth0.send_redirects", "0")] {
        sh("ip", &["netns", "exec", &lbns, "sysctl", "-qw", &format!("{k}={v}")])?;
    }
    let backends: Vec<String> = (1..=3).map(|i| backend_ip(i).to_string()).collect();
    let map: Vec<String> = backends.iter().enumerate().map(|(i, b)| format!("{i} : {b}")).collect();
    let rules = format!(
        "table ip xlbbench {{\n chain pre {{\n  type nat hook prerouting priority -100;\n  ip daddr {VIP} tcp dport 80 dnat to numgen inc mod {} map {{ {} }}\n }}\n}}\n",
        backends.len(),
        map.join(", ")
    );
    let rules_file = d.lab.dir.join("nft.conf");
    std::fs::write(&rules_file, rules)?;
    sh("ip", &["netns", "exec", &lbns, "nft", "-f", &rules_file.to_string_lossy()])?;
    // NAT: the replies must come back through the balancer.
    let routes = |op: &str| -> Result<()> {
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
    routes("add")?;
    let (c, u, f) = measure(d, &format!("{VIP}:80"))?;
    rows.push(("nftables".into(), c, u, f));
    sh("ip", &["netns", "exec", &lbns, "nft", "delete", "table", "ip", "xlbbench"])?;
    routes("del")?;

    // HAProxy in TCP mode, listening on the VIP on the balancer.
    sh("ip", &["-n", &lbns, "addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
    let servers: String = backends.iter().enumerate().map(|(i, b)| format!(" server b{} {b}:80\n", i + 1)).collect();
    let cfg = format!(
        "global\n maxconn 4000\ndefaults\n mode tcp\n timeout connect 3s\n timeout client 10s\n timeout server 10s\nfrontend f\n bind {VIP}:80\n default_backend b\nbackend b\n balance roundrobin\n{servers}"
    );
    let cfg_file = d.lab.dir.join("haproxy.cfg");
    std::fs::write(&cfg_file, cfg)?;
    let haproxy = Path::new("/usr/sbin/haproxy");
    d.lab.spawn("haproxy", "lb", haproxy, &["-f", &cfg_file.to_string_lossy(), "-db"])?;
    let up = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        sh("ip", &["netns", "exec", &lbns, "ss", "-ltn"]).map(|s| s.contains(&format!("{VIP}:80"))).unwrap_or(false)
    });
    if !up {
        bail!("haproxy did not start: {}", d.lab.log("haproxy"));
    }
    let (c, u, f) = measure(d, &format!("{VIP}:80"))?;
    rows.push(("haproxy".into(), c, u, f));
    d.lab.stop("haproxy")?;

    let base = rows[0].2;
    Ok(rows
        .into_iter()
        .map(|(mode, c, u, f)| Mode { lb_cpu_us_per_conn: if mode == "direct" { 0.0 } else { u - base }, mode, conns_per_sec: c, cpu_us_per_conn: u, failed: f })
        .collect())
}
