//! Per-packet cost of the real program via BPF_PROG_TEST_RUN, against floors
//! measured by the same harness in the same run.
//!
//! Method. Cases whose every packet takes the same path (established flows,
//! non-VIP traffic, ICMP errors) run one frame with repeat N and 2N; the cost
//! is (wall time of the 2N call − wall time of the N call) / N, which removes
//! the syscall's fixed cost and is not limited to the kernel's 1 ns
//! resolution; the kernel's own average is reported too. Five runs: median and
//! spread. The program's counters prove every run took the intended path
//! (N × XDP_TX, N table hits). Repeat > 1 lets each run see the frame as the
//! previous one left it: xlb only rewrites MACs it never reads, so the path
//! is the same, which the counters confirm.
//!
//! New-flow cases need a new 5-tuple per packet: repeat 1 over a list of
//! frames; the per-call overhead is calibrated out by running the same loop on
//! `floor_pass` and adding back `floor_pass`'s own cost. The counters prove
//! every frame was a table miss and an insert. There is no flood guard.

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::Array,
    programs::{TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};
use lb_common::{Algo, FlowKey, FlowValue, Stat, DEFAULT_RING_SIZE, PROG_XLB};
use serde::Serialize;
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};
use xlb::{
    agent::{Agent, AgentOptions},
    config::{CheckKind, HealthConfig, Mac, Vip},
    maps::{Datapath, LoadOptions},
};

use crate::frames::{eth, ipv4, ipv6, tcp, tcp_flags::*, udp, ETH_IP, ETH_IPV6, LB_MAC};

const N: u32 = 1_000_000;
const RUNS: usize = 5;
const NEW_FLOWS: u32 = 50_000;
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const VIP4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 2, 0, 0, 0, 7);

/// One measured case.
#[derive(Serialize, Debug, Clone)]
pub struct Case {
    /// Case name.
    pub case: String,
    /// Backends of the VIP (0 for floors).
    pub backends: u32,
    /// Connection table state: "empty" or "full" (≈ 1M entries), "-" for floors.
    pub conntrack: String,
    /// Cost per packet, ns (median of runs).
    pub ns_per_pkt: f64,
    /// Fastest and slowest run, ns.
    pub spread_ns: [f64; 2],
    /// The kernel's own per-run average (1 ns resolution), median.
    pub kernel_avg_ns: f64,
    /// The floor it is compared to.
    pub floor: String,
    /// ns_per_pkt ÷ the floor's.
    pub ratio: f64,
    /// What the counters proved.
    pub verified: String,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// Time `repeat` runs of a frame: (wall ns, kernel average ns, return value).
fn timed(prog: &Xdp, frame: &[u8], repeat: u32) -> Result<(f64, f64, u32)> {
    let mut out = vec![0u8; frame.len() + 256];
    let t = Instant::now();
    let r = prog.test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), repeat, ..Default::default() })?;
    Ok((t.elapsed().as_nanos() as f64, r.duration.as_nanos() as f64, r.return_value))
}

/// The N/2N method; returns (median, [min, max], kernel median).
fn repeat_cost(prog: &Xdp, frame: &[u8], want: u32) -> Result<(f64, [f64; 2], f64)> {
    let mut per = Vec::new();
    let mut kern = Vec::new();
    for _ in 0..RUNS {
        let (t1, _, r1) = timed(prog, frame, N)?;
        let (t2, k2, r2) = timed(prog, frame, 2 * N)?;
        if r1 != want || r2 != want {
            bail!("verdict {r1}/{r2}, expected {want}");
        }
        per.push(((t2 - t1) / N as f64).max(0.0));
        kern.push(k2);
    }
    let (lo, hi) = per.iter().fold((f64::MAX, 0f64), |(a, b), &x| (a.min(x), b.max(x)));
    Ok((median(&mut per), [lo, hi], median(&mut kern)))
}

/// Sum of the kernel-reported durations of repeat-1 runs over `frames`.
fn loop_cost(prog: &Xdp, frames: &[Vec<u8>], want: u32) -> Result<f64> {
    let mut total = 0f64;
    for f in frames {
        let (_, k, r) = timed(prog, f, 1)?;
        if r != want {
            bail!("verdict {r}, expected {want}");
        }
        total += k;
    }
    Ok(total)
}

/// The floors object's programs and its table.
pub struct Floors {
    ebpf: Ebpf,
}

impl Floors {
    /// Load the floors object and fill its stateless table.
    pub fn load(path: &str) -> Result<Floors> {
        let obj = std::fs::read(path).with_context(|| format!("cannot read {path}"))?;
        let mut ebpf = EbpfLoader::new().load(&obj).context("loading the floors object")?;
        for name in ["floor_pass", "floor_macswap_tx", "floor_stateless_dsr", "bench_gen", "bench_sink"] {
            let p: &mut Xdp = ebpf.program_mut(name).ok_or_else(|| anyhow!("no {name}"))?.try_into()?;
            p.load().with_context(|| format!("verifier rejected {name}"))?;
        }
        let mut ring: Array<_, [u8; 8]> = Array::try_from(ebpf.map_mut("FLOOR_RING").ok_or_else(|| anyhow!("no ring"))?)?;
        for i in 0..DEFAULT_RING_SIZE {
            ring.set(i, [2, 0, 0, 0, 1, (i % 3) as u8 + 1, 0, 0], 0)?;
        }
        Ok(Floors { ebpf })
    }

    /// A floor program.
    pub fn prog(&self, name: &str) -> Result<&Xdp> {
        Ok(self.ebpf.program(name).ok_or_else(|| anyhow!("no {name}"))?.try_into()?)
    }
}

fn v4_tcp(sport: u16, flags: u8) -> Vec<u8> {
    eth(ETH_IP, &[], &ipv4(CLIENT, VIP4, 6, &[], 0, &tcp(sport, 80, flags, b"0123456789")))
}

fn v6_tcp(sport: u16, flags: u8) -> Vec<u8> {
    eth(ETH_IPV6, &[], &ipv6(CLIENT6, VIP6, 6, &tcp(sport, 80, flags, b"0123456789")))
}

fn new_flow_frames(v6: bool) -> Vec<Vec<u8>> {
    (0..NEW_FLOWS)
        .map(|i| {
            let sport = 1024 + (i % 60000) as u16;
            let hi = (i / 60000) as u8;
            if v6 {
                // fd00:0:0:3::xx: disjoint from every other flow in the bench.
                let mut src = CLIENT6.octets();
                src[7] = 3;
                src[14] = hi;
                eth(ETH_IPV6, &[], &ipv6(Ipv6Addr::from(src), VIP6, 6, &tcp(sport, 80, SYN, b"")))
            } else {
                eth(ETH_IP, &[], &ipv4(Ipv4Addr::new(198, 18, hi, 1), VIP4, 6, &[], 0, &tcp(sport, 80, SYN, b"")))
            }
        })
        .collect()
}

fn icmp_ptb(sport: u16) -> Vec<u8> {
    let inner = ipv4(VIP4, CLIENT, 6, &[], 0, &tcp(80, sport, ACK, b"")[..8]);
    let mut icmp = vec![3, 4, 0, 0, 0, 0, 0x05, 0xdc];
    icmp.extend_from_slice(&inner);
    eth(ETH_IP, &[], &ipv4(Ipv4Addr::new(198, 51, 100, 1), VIP4, 1, &[], 0, &icmp))
}

/// An agent with one bench VIP and `n` backends, connection table 1 Mi.
fn agent(vip: &str, n: u32) -> Result<Agent> {
    let dp = Datapath::load(LoadOptions { max_vips: 8, ..Default::default() })?;
    let health = HealthConfig { kind: CheckKind::None, ..Default::default() };
    let mut agent = Agent::new(dp, AgentOptions { iface_mac: Mac(LB_MAC), health })?;
    let v: Vip = vip.parse()?;
    agent.add_vip(v, Algo::Maglev, 0)?;
    let list: Vec<(IpAddr, Option<Mac>, u32)> = (0..n)
        .map(|i| {
            let ip = if v.addr.is_ipv6() {
                IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, (i >> 16) as u16, i as u16))
            } else {
                IpAddr::V4(Ipv4Addr::new(10, 1, (i >> 8) as u8, i as u8))
            };
            (ip, Some(Mac([2, 0, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8])), 1)
        })
        .collect();
    agent.add_backends(&v, &list)?;
    Ok(agent)
}

/// Fill the connection table with `count` unrelated flows to the agent's VIP.
fn fill(agent: &mut Agent, count: u32) -> Result<u64> {
    let (vip, st) = agent.vips().iter().next().ok_or_else(|| anyhow!("no VIP"))?;
    let (vip, b) = (*vip, st.backends.values().next().ok_or_else(|| anyhow!("no backend"))?);
    let value = FlowValue { backend_id: b.id, gen: b.gen, flags: 0 };
    for i in 0..count {
        let mut k = FlowKey { src: [0; 16], sport_be: (i as u16).to_be(), _pad: 0, vip: vip.key() };
        k.src[..4].copy_from_slice(&[100, 64 + ((i >> 24) as u8 & 0x3f), (i >> 16) as u8, (i >> 8) as u8]);
        agent.dp.conntrack_insert(&k, &value)?;
    }
    Ok(agent.dp.conntrack_reader()?.census().entries)
}

fn stat(a: &Agent, s: Stat) -> Result<u64> {
    a.dp.stat(s)
}

/// Floors: pass, macswap, stateless (one frame repeated), and stateless over
/// the new-flow frames (a new 5-tuple per packet, so its table reads miss the
/// cache as a new flow's do: the fair floor for new flows).
pub fn floors(fl: &Floors) -> Result<Vec<Case>> {
    let frame = v4_tcp(1234, ACK);
    let mut out = Vec::new();
    for (name, want) in [("floor_pass", 2), ("floor_macswap_tx", 3), ("floor_stateless_dsr", 3)] {
        let (ns, spread, k) = repeat_cost(fl.prog(name)?, &frame, want)?;
        out.push(Case {
            case: name.into(),
            backends: 0,
            conntrack: "-".into(),
            ns_per_pkt: ns,
            spread_ns: spread,
            kernel_avg_ns: k,
            floor: name.into(),
            ratio: 1.0,
            verified: format!("every run returned {}", if want == 2 { "XDP_PASS" } else { "XDP_TX" }),
        });
    }
    let frames = new_flow_frames(false);
    let dsr = loop_cost(fl.prog("floor_stateless_dsr")?, &frames, 3)?;
    let pass = loop_cost(fl.prog("floor_pass")?, &frames, 2)?;
    let ns = (dsr - pass) / NEW_FLOWS as f64 + out[0].ns_per_pkt;
    out.push(Case {
        case: "floor_stateless_dsr_new_flows".into(),
        backends: 0,
        conntrack: "-".into(),
        ns_per_pkt: ns,
        spread_ns: [ns, ns],
        kernel_avg_ns: dsr / NEW_FLOWS as f64,
        floor: "floor_stateless_dsr_new_flows".into(),
        ratio: 1.0,
        verified: format!("{NEW_FLOWS} distinct 5-tuples, every run returned XDP_TX"),
    });
    Ok(out)
}

/// All xlb cases for one backend count and table state. Each VIP family
/// gets its own datapath, so every case has `backends` backends.
pub fn cases(fl: &Floors, floor_ns: &dyn Fn(&str) -> f64, backends: u32, full: bool) -> Result<Vec<Case>> {
    let nonvip = eth(ETH_IP, &[], &ipv4(CLIENT, Ipv4Addr::new(10, 0, 0, 99), 6, &[], 0, &tcp(1234, 80, ACK, b"x")));
    let est4 = v4_tcp(40000, ACK);
    let udp4 = eth(ETH_IP, &[], &ipv4(CLIENT, VIP4, 17, &[], 0, &udp(40001, 53, b"0123456789")));
    let est6 = v6_tcp(40002, ACK);
    let ptb = icmp_ptb(40000);
    // (case, frame, expected verdict, floor, counter that must move N per run)
    type Steady<'a> = (&'static str, &'a Vec<u8>, u32, &'static str, Stat);
    // (VIP, steady cases, new-flow case and whether it is IPv6)
    type Group<'a> = (&'static str, Vec<Steady<'a>>, Option<(&'static str, bool)>);
    let groups: [Group; 3] = [
        (
            "10.0.0.100:80/tcp",
            vec![
                ("nonvip_pass", &nonvip, 2, "floor_pass", Stat::PassNotVip),
                ("v4_tcp_established", &est4, 3, "floor_stateless_dsr", Stat::CtHit),
                ("icmp_ptb", &ptb, 3, "floor_stateless_dsr", Stat::IcmpSteered),
            ],
            Some(("v4_tcp_new_flow", false)),
        ),
        ("10.0.0.100:53/udp", vec![("v4_udp", &udp4, 3, "floor_stateless_dsr", Stat::CtHit)], None),
        (
            "[fd00::100]:80/tcp",
            vec![("v6_tcp_established", &est6, 3, "floor_stateless_dsr", Stat::CtHit)],
            Some(("v6_tcp_new_flow", true)),
        ),
    ];
    let mut out = Vec::new();
    for (vip, steady, new_flow) in groups {
        let mut a = agent(vip, backends)?;
        let ct = if full { format!("full ({} entries)", fill(&mut a, 1 << 20)?) } else { "empty".into() };
        let mut push = |case: &str, ns: f64, spread: [f64; 2], k: f64, floor: &str, verified: String| {
            out.push(Case {
                case: case.into(),
                backends,
                conntrack: ct.clone(),
                ns_per_pkt: ns,
                spread_ns: spread,
                kernel_avg_ns: k,
                floor: floor.into(),
                ratio: ns / floor_ns(floor),
                verified,
            });
        };
        for (name, frame, want, floor, proof) in steady {
            // Warm: the first packet of a flow makes its table entry.
            crate::xdp::run(&mut a.dp, frame);
            let before = stat(&a, proof)?;
            let prog = a.dp.program(PROG_XLB)?;
            let (ns, spread, k) = repeat_cost(prog, frame, want)?;
            let moved = stat(&a, proof)? - before;
            let expect = RUNS as u64 * 3 * N as u64;
            if moved != expect {
                bail!("{name}: counter {} moved {moved}, expected {expect}", proof.name());
            }
            push(name, ns, spread, k, floor, format!("{} +{moved} = {RUNS} runs × 3N", proof.name()));
        }
        // New flows, calibrated against floor_pass over the same frames.
        if let Some((name, v6)) = new_flow {
            let frames = new_flow_frames(v6);
            let (miss0, fwd0) = (stat(&a, Stat::CtMiss)?, stat(&a, Stat::Forwarded)?);
            let prog = a.dp.program(PROG_XLB)?;
            let xlb_total = loop_cost(prog, &frames, 3)?;
            let pass_total = loop_cost(fl.prog("floor_pass")?, &frames, 2)?;
            let (misses, fwd) = (stat(&a, Stat::CtMiss)? - miss0, stat(&a, Stat::Forwarded)? - fwd0);
            if misses != NEW_FLOWS as u64 || fwd != NEW_FLOWS as u64 {
                bail!("{name}: {misses} misses and {fwd} forwards for {NEW_FLOWS} new flows");
            }
            let ns = (xlb_total - pass_total) / NEW_FLOWS as f64 + floor_ns("floor_pass");
            push(
                name,
                ns,
                [ns, ns],
                xlb_total / NEW_FLOWS as f64,
                "floor_stateless_dsr_new_flows",
                format!("conntrack_miss +{misses}, forwarded +{fwd}; {:.1}× floor_stateless_dsr", ns / floor_ns("floor_stateless_dsr")),
            );
        }
    }
    Ok(out)
}
