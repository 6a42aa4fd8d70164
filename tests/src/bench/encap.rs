//! Per-packet cost of routed backends (`cargo xtask bench encap`): IPIP
//! (IPv4 and IPv6 outer) and GUE, established flows and new flows, beside
//! the L2 path's established, new-flow and non-VIP cost measured the same
//! way in the same run (so "L2 unchanged" is checked against numbers taken
//! here, and against `cost`'s figures from its own method).
//!
//! Method: repeat-1 BPF_PROG_TEST_RUN calls (an encapsulated frame run
//! again is not VIP traffic any more, so the repeat-N method of `cost`
//! cannot be used), the kernel's per-call duration averaged over `CALLS`
//! calls, median of `RUNS` rounds; frames arrive on the eth0 of a namespace
//! the bench creates (`FibNs`), whose routes answer `bpf_fib_lookup`. The
//! counters prove the path of every call.

use anyhow::{bail, Result};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_common::{Forward, Stat, PROG_XLB};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use xlb::{
    agent::{Agent, AgentOptions, VipSpec},
    config::{CheckKind, HealthConfig, Mac, Vip},
    maps::{Datapath, LoadOptions},
};

use super::cost::{agent_with_opts, median_spread, new_flow_frames, stat, Case};
use crate::{
    frames::{eth, ipv4, ipv6, tcp, tcp_flags::*, udp, ETH_IP, ETH_IPV6, LB_MAC},
    routed::FibNs,
};

const CALLS: usize = 20_000;
const RUNS: usize = 5;
const NEW: usize = 20_000;
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const VIP4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 2, 0, 0, 0, 7);

/// Kernel-measured ns of one repeat-1 run of `frame` arriving on `ifindex`.
fn once(prog: &Xdp, frame: &[u8], ifindex: u32, want: u32) -> Result<f64> {
    let mut out = vec![0u8; frame.len() + 256];
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    let r = prog.test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ctx_in: Some(&ctx), ..Default::default() })?;
    if r.return_value != want {
        bail!("verdict {}, expected {want}", r.return_value);
    }
    Ok(r.duration.as_nanos() as f64)
}

/// Median over RUNS rounds of the mean of CALLS runs of one frame; [min, max].
fn steady(prog: &Xdp, frame: &[u8], ifindex: u32, want: u32) -> Result<(f64, [f64; 2])> {
    let mut per = Vec::new();
    for _ in 0..RUNS {
        let mut t = 0.0;
        for _ in 0..CALLS {
            t += once(prog, frame, ifindex, want)?;
        }
        per.push(t / CALLS as f64);
    }
    Ok(median_spread(per))
}

/// Mean over `frames` (each a new flow), one run each.
fn each(prog: &Xdp, frames: &[Vec<u8>], ifindex: u32, want: u32) -> Result<f64> {
    let mut t = 0.0;
    for f in frames {
        t += once(prog, f, ifindex, want)?;
    }
    Ok(t / frames.len() as f64)
}

fn routed_agent(vip: &str, fwd: Forward, backends: &[IpAddr]) -> Result<Agent> {
    let dp = Datapath::load(LoadOptions { max_vips: 8, ..Default::default() })?;
    let health = HealthConfig { kind: CheckKind::None, ..Default::default() };
    let mut a = Agent::new(dp, AgentOptions { iface_mac: Mac(LB_MAC), accept_macs: Vec::new(), health })?;
    a.dp.set_encap(&xlb::encap::encap_config(&["10.210.0.0/24".into(), "fd00:210::/112".into()], lb_common::DEFAULT_GUE_PORT)?)?;
    let v: Vip = vip.parse()?;
    a.add_vip_spec(v, &VipSpec { forward: fwd, ..Default::default() })?;
    let list: Vec<(IpAddr, Option<Mac>, u32)> = backends.iter().map(|ip| (*ip, None, 1)).collect();
    a.add_backends(&v, &list)?;
    Ok(a)
}

fn udp4_frames(n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| eth(ETH_IP, &[], &ipv4(Ipv4Addr::new(198, 19, (i / 60000) as u8, 1), VIP4, 17, &[], 0, &udp(1024 + (i % 60000) as u16, 53, b"0123456789")))).collect()
}

/// A case family: name, agent, steady frame, new-flow frames.
type Group<'a> = (&'static str, Agent, &'a Vec<u8>, Vec<Vec<u8>>);

/// The routed cases and the L2 ones beside them.
pub fn cases() -> Result<Vec<Case>> {
    let ns = FibNs::enter("bench")?;
    let eth0 = ns.eth0;
    let est4 = eth(ETH_IP, &[], &ipv4(CLIENT, VIP4, 6, &[], 0, &tcp(40000, 80, ACK, b"x")));
    let est6 = eth(ETH_IPV6, &[], &ipv6(CLIENT6, VIP6, 6, &tcp(40002, 80, ACK, b"x")));
    let udp4 = eth(ETH_IP, &[], &ipv4(CLIENT, VIP4, 17, &[], 0, &udp(40001, 53, b"0123456789")));
    let nonvip = eth(ETH_IP, &[], &ipv4(CLIENT, Ipv4Addr::new(10, 0, 0, 99), 6, &[], 0, &tcp(1234, 80, ACK, b"x")));
    let v4b: Vec<IpAddr> = (1..=3).map(|i| IpAddr::V4(Ipv4Addr::new(10, 220, 0, i))).collect();
    let v6b: Vec<IpAddr> = (1..=3).map(|i| IpAddr::V6(Ipv6Addr::new(0xfd00, 0x220, 0, 0, 0, 0, 0, i))).collect();
    let mut out = Vec::new();
    let mut l2_ns = std::collections::HashMap::new();
    // The first is L2, which the others are compared to.
    let groups: Vec<Group> = vec![
        ("l2_v4_tcp", agent_with_opts("10.0.0.100:80/tcp", 3, LoadOptions { max_vips: 8, ..Default::default() })?, &est4, new_flow_frames(false)[..NEW].to_vec()),
        ("ipip_v4_tcp", routed_agent("10.0.0.100:80/tcp", Forward::Ipip, &v4b)?, &est4, new_flow_frames(false)[..NEW].to_vec()),
        ("gue_v4_udp", routed_agent("10.0.0.100:53/udp", Forward::Gue, &v4b)?, &udp4, udp4_frames(NEW)),
        ("ipip_v4_in_v6_tcp", routed_agent("10.0.0.100:80/tcp", Forward::Ipip, &v6b)?, &est4, new_flow_frames(false)[..NEW].to_vec()),
        ("ipip_v6_tcp", routed_agent("[fd00::100]:80/tcp", Forward::Ipip, &v6b)?, &est6, new_flow_frames(true)[..NEW].to_vec()),
    ];
    for (name, mut a, frame, news) in groups {
        let prog = a.dp.program(PROG_XLB)?;
        once(prog, frame, eth0, 3)?;
        let (hit0, fwd0) = (stat(&a, Stat::CtHit)?, stat(&a, Stat::Forwarded)?);
        let prog = a.dp.program(PROG_XLB)?;
        let (est, spread) = steady(prog, frame, eth0, 3)?;
        let (hits, fwd) = (stat(&a, Stat::CtHit)? - hit0, stat(&a, Stat::Forwarded)? - fwd0);
        let calls = (RUNS * CALLS) as u64;
        if hits != calls || fwd != calls {
            bail!("{name}: {hits} table hits, {fwd} forwarded for {calls} calls");
        }
        let miss0 = stat(&a, Stat::CtMiss)?;
        let prog = a.dp.program(PROG_XLB)?;
        let new = each(prog, &news, eth0, 3)?;
        let misses = stat(&a, Stat::CtMiss)? - miss0;
        if misses != NEW as u64 {
            bail!("{name}: {misses} misses for {NEW} new flows");
        }
        if name.starts_with("l2") {
            l2_ns.insert("est", est);
            l2_ns.insert("new", new);
            let prog = a.dp.program(PROG_XLB)?;
            let (pass, pspread) = steady(prog, &nonvip, eth0, 2)?;
            out.push(case("l2_nonvip_pass_loop", pass, pspread, "l2_nonvip_pass_loop", 1.0, format!("pass_not_vip, {RUNS}×{CALLS} calls")));
        }
        let (be, bn) = (l2_ns.get("est").copied().unwrap_or(f64::NAN), l2_ns.get("new").copied().unwrap_or(f64::NAN));
        out.push(case(&format!("{name}_established_loop"), est, spread, "l2_v4_tcp_established_loop", est / be, format!("conntrack_hit +{hits}, forwarded +{fwd}")));
        out.push(case(&format!("{name}_new_flow_loop"), new, [new, new], "l2_v4_tcp_new_flow_loop", new / bn, format!("conntrack_miss +{misses} ({NEW} new flows)")));
    }
    drop(ns);
    Ok(out)
}

fn case(name: &str, ns: f64, spread: [f64; 2], floor: &str, ratio: f64, verified: String) -> Case {
    Case {
        case: name.into(),
        backends: 3,
        conntrack: "empty".into(),
        ns_per_pkt: ns,
        spread_ns: spread,
        kernel_avg_ns: ns,
        floor: floor.into(),
        ratio,
        verified,
    }
}
