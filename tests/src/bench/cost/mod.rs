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
//! New-flow cases need a new 5-tuple per packet. Main method ("warm"): the
//! floors object's `new_flows` program adds one to the frame's source
//! address and tail-calls the program under test; with repeat N every run
//! sees the frame the previous run left, so every run is a new flow, with
//! caches as warm as a NIC's batches keep them. The same wrapper in front of
//! `floor_stateless_dsr` is the floor, so the wrapper cancels out; the
//! kernel's per-run average is used (1 ns resolution at ~300 ns). Second
//! method ("cold", kept for comparison): repeat 1 over a list of frames, one
//! syscall per frame, the per-call overhead calibrated out with the same loop
//! on `floor_pass`; each frame then meets caches the syscall path has just
//! disturbed. The counters prove every frame was a table miss and an insert
//! (and every one was forwarded). There is no flood guard.

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{Array, MapData, ProgramArray},
    programs::{ProgramFd, TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};
use lb_common::{Algo, FlowKey, Stat, DEFAULT_RING_SIZE, PROG_XLB};
use serde::Serialize;
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};
use xlb::{
    agent::{Agent, AgentOptions},
    config::{CheckKind, HealthConfig, Mac, Vip},
    maps::{Datapath, LoadOptions},
};

use crate::frames::{eth, ipv4, ipv6, tcp, tcp_flags::*, udp, ETH_IP, ETH_IPV6, LB_MAC};

const N: u32 = 4_000_000;
const RUNS: usize = 5;
const NEW_FLOWS: u32 = 50_000;
/// Runs per call of the warm new-flow method (RUNS calls: 500 000 inserts,
/// half the default table, so "empty" stays below capacity).
pub(crate) const NEW_FLOW_REPEAT: u32 = 100_000;
/// Runs per call against the 64 Ki-entry table (RUNS calls stay below its capacity).
const SMALL_TABLE_REPEAT: u32 = 10_000;
/// Capacity of the table for `*_new_flow_1k_table` (its sets stay in the
/// first cache levels: a new flow's own work, with its line nearly free).
const TINY_TABLE: u32 = 1024;
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const VIP4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 2, 0, 0, 0, 7);

mod forms;
mod harness;
mod profile;

pub use forms::vip_forms;
pub(crate) use harness::{median, median_spread, timed};
pub use harness::{Case, Floors};
pub use profile::profile;
use harness::{loop_cost, paired_cost, repeat_cost};

fn v4_tcp(sport: u16, flags: u8) -> Vec<u8> {
    eth(ETH_IP, &[], &ipv4(CLIENT, VIP4, 6, &[], 0, &tcp(sport, 80, flags, b"0123456789")))
}

fn v6_tcp(sport: u16, flags: u8) -> Vec<u8> {
    eth(ETH_IPV6, &[], &ipv6(CLIENT6, VIP6, 6, &tcp(sport, 80, flags, b"0123456789")))
}

pub(crate) fn new_flow_frames(v6: bool) -> Vec<Vec<u8>> {
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

/// The frame a warm new-flow call starts from: a SYN whose source address
/// `new_flows` increments every run; `run` keeps calls' ranges apart, and
/// 101.x.x.x / fd00:0:0:4:: keep them apart from `fill`'s and every other
/// flow of the bench.
pub(crate) fn warm_frame(v6: bool, run: u8) -> Vec<u8> {
    if v6 {
        let mut src = CLIENT6.octets();
        src[7] = 4;
        src[12] = run;
        eth(ETH_IPV6, &[], &ipv6(Ipv6Addr::from(src), VIP6, 6, &tcp(5555, 80, SYN, b"")))
    } else {
        eth(ETH_IP, &[], &ipv4(Ipv4Addr::new(101, 64 + 4 * run, 0, 0), VIP4, 6, &[], 0, &tcp(5555, 80, SYN, b"")))
    }
}

fn icmp_ptb(sport: u16) -> Vec<u8> {
    let inner = ipv4(VIP4, CLIENT, 6, &[], 0, &tcp(80, sport, ACK, b"")[..8]);
    let mut icmp = vec![3, 4, 0, 0, 0, 0, 0x05, 0xdc];
    icmp.extend_from_slice(&inner);
    eth(ETH_IP, &[], &ipv4(Ipv4Addr::new(198, 51, 100, 1), VIP4, 1, &[], 0, &icmp))
}

/// An agent with one bench VIP and `n` backends, connection table 1 Mi.
pub(crate) fn agent(vip: &str, n: u32) -> Result<Agent> {
    agent_with_table(vip, n, lb_common::DEFAULT_CONNTRACK_SIZE)
}

/// The same with a connection table of `ct` entries.
fn agent_with_table(vip: &str, n: u32, ct: u32) -> Result<Agent> {
    agent_with_opts(vip, n, LoadOptions { max_vips: 8, conntrack_size: ct, ..Default::default() })
}

/// The same with any load options (`--flow-keys`).
pub(crate) fn agent_with_opts(vip: &str, n: u32, opts: LoadOptions) -> Result<Agent> {
    let dp = Datapath::load(opts)?;
    let health = HealthConfig { kind: CheckKind::None, ..Default::default() };
    let mut agent = Agent::new(dp, AgentOptions { iface_mac: Mac(LB_MAC), accept_macs: Vec::new(), health })?;
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
    // Repeated runs see the frame the previous run rewrote, addressed to its
    // backend by then: accept the backends' MACs too, so the MAC check is
    // measured rather than skipped (matching after the interface's own
    // entry: a little dearer than in production).
    if n < lb_common::MAX_ACCEPT_MACS {
        let macs: Vec<[u8; 6]> = std::iter::once(LB_MAC).chain(list.iter().filter_map(|(_, m, _)| m.map(|m| m.0))).collect();
        agent.dp.set_accepted_macs(&macs)?;
    } else {
        agent.dp.accept_any_mac()?;
    }
    Ok(agent)
}

/// Fill the connection table with `count` unrelated flows to the agent's
/// VIP, placed exactly as the datapath places them; returns the entries
/// the census then finds.
pub(crate) fn fill(agent: &mut Agent, count: u32) -> Result<u64> {
    let (vip, st) = agent.vips().iter().next().ok_or_else(|| anyhow!("no VIP"))?;
    let (vip, b) = (*vip, st.backends.values().next().ok_or_else(|| anyhow!("no backend"))?);
    let (id, gen) = (b.id, b.gen);
    let seed = agent.dp.conntrack_seed();
    let mut view = agent.dp.conntrack_view()?;
    for i in 0..count {
        let src = [100, 64 + ((i >> 24) as u8 & 0x3f), (i >> 16) as u8, (i >> 8) as u8];
        let mut k = FlowKey::v4(src, (i as u16).to_be(), [0; 4], vip.key().port_be, vip.key().proto);
        k.vip = vip.key();
        if vip.addr.is_ipv6() {
            k.src = [0xfd, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, src[0], src[1], src[2], src[3]];
        }
        view.insert(&seed, &k, id, gen);
    }
    Ok(agent.dp.conntrack_reader()?.census().entries)
}

pub(crate) fn stat(a: &Agent, s: Stat) -> Result<u64> {
    a.dp.stat(s)
}

/// Floors: pass, macswap, stateless (one frame repeated), and stateless over
/// the new-flow frames (a new 5-tuple per packet, so its table reads miss the
/// cache as a new flow's do: the fair floor for new flows).
pub fn floors(fl: &mut Floors) -> Result<Vec<Case>> {
    let frame = v4_tcp(1234, ACK);
    let mut out = Vec::new();
    for (name, want) in [("floor_pass", 2), ("floor_macswap_tx", 3), ("floor_stateless_dsr", 3)] {
        let (ns, spread, k) = repeat_cost(fl.prog(name)?, &frame, want)?;
        let verified = format!("every run returned {}", if want == 2 { "XDP_PASS" } else { "XDP_TX" });
        out.push(Case::floor(name, ns, spread, k, verified));
    }
    let frames = new_flow_frames(false);
    let dsr = loop_cost(fl.prog("floor_stateless_dsr")?, &frames, 3)?;
    let pass = loop_cost(fl.prog("floor_pass")?, &frames, 2)?;
    let ns = (dsr - pass) / NEW_FLOWS as f64 + out[0].ns_per_pkt;
    let verified = format!("{NEW_FLOWS} distinct 5-tuples, one syscall each, every one returned XDP_TX");
    out.push(Case::floor("floor_stateless_dsr_new_flows_cold", ns, [ns, ns], dsr / NEW_FLOWS as f64, verified));
    // Behind the new-flow wrapper: a new 5-tuple per run.
    for (name, prog, what) in [
        ("floor_stateless_dsr_new_flows", "floor_stateless_dsr", "stateless"),
        ("floor_one_line", "floor_one_line", "each a read-modify-write of one random line of 16 MiB"),
        ("floor_work", "floor_work", "stateless plus 32 rounds of ALU work, no memory"),
        ("floor_one_line_nudge", "floor_one_line_nudge", "floor_one_line plus 4 rounds of ALU work"),
        ("floor_one_line_work", "floor_one_line_work", "floor_one_line plus floor_work's 32 rounds of ALU work"),
        (
            "floor_one_line_ct",
            "floor_one_line_ct",
            "each a read-modify-write of one random line of an array as large as the default connection table (51 MiB)",
        ),
        ("floor_ct_insert", "floor_ct_insert", "each xlb's connection-table lookup and insert (one set) in an array as large as the default table"),
        ("floor_lru_insert", "floor_lru_insert", "each a lookup and an insert in a 1 Mi LRU hash"),
    ] {
        let fd = fl.prog(prog)?.fd()?.try_clone()?;
        let (ns, spread) = fl.warm_new_flows(&fd, &|run| warm_frame(false, run), NEW_FLOW_REPEAT, 3)?;
        let verified = format!("{RUNS} × {NEW_FLOW_REPEAT} new 5-tuples behind new_flows, {what}; every run returned XDP_TX");
        out.push(Case::floor(name, ns, spread, ns, verified));
    }
    Ok(out)
}

/// Warm new flows into an agent's program: (median, spread, proof).
fn warm_new_flow_case(fl: &mut Floors, a: &mut Agent, v6: bool, repeat: u32) -> Result<(f64, [f64; 2], String)> {
    let (miss0, fwd0, fail0, ev0) =
        (stat(a, Stat::CtMiss)?, stat(a, Stat::Forwarded)?, stat(a, Stat::CtInsertFail)?, stat(a, Stat::CtEvicted)?);
    let fd = a.dp.program(PROG_XLB)?.fd()?.try_clone()?;
    let (ns, spread) = fl.warm_new_flows(&fd, &|run| warm_frame(v6, run), repeat, 3)?;
    let want = RUNS as u64 * repeat as u64;
    let (misses, fwd, fails) = (stat(a, Stat::CtMiss)? - miss0, stat(a, Stat::Forwarded)? - fwd0, stat(a, Stat::CtInsertFail)? - fail0);
    if misses != want || fwd != want || fails != 0 {
        bail!("new flows: {misses} misses, {fwd} forwards, {fails} failed inserts for {want} new flows");
    }
    let evicted = stat(a, Stat::CtEvicted)? - ev0;
    Ok((ns, spread, format!("conntrack_miss +{misses}, forwarded +{fwd}, insert failures 0, open entries evicted +{evicted}")))
}

/// All xlb cases for one backend count and table state. Each VIP family
/// gets its own datapath, so every case has `backends` backends.
/// `fill_pct`: how full the connection table is (percent of its capacity,
/// `--conntrack-size`) before the cases run.
pub fn cases(fl: &mut Floors, floor_ns: &dyn Fn(&str) -> f64, backends: u32, fill_pct: u32) -> Result<Vec<Case>> {
    // The floors' frame (as `floors` times them).
    let floor_frame = v4_tcp(1234, ACK);
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
        let capacity = a.dp.opts.conntrack_size;
        let ct = match fill_pct {
            0 => "empty".to_string(),
            100 => format!("full ({} entries)", fill(&mut a, capacity)?),
            p => format!("{p} % ({} entries)", fill(&mut a, (capacity as u64 * p as u64 / 100) as u32)?),
        };
        // The first time round, new flows with a 64 Ki-entry table too: how
        // much of a new flow's cost is the size of the table (cache and TLB
        // misses), everything else equal; and with `--flow-keys` (`xlb
        // flows`): one more 40-byte store per new flow.
        let warm_case = |case: String, conntrack: &str, (ns, spread, proof): (f64, [f64; 2], String)| Case {
            case,
            backends,
            conntrack: conntrack.into(),
            ns_per_pkt: ns,
            spread_ns: spread,
            kernel_avg_ns: ns,
            floor: "floor_stateless_dsr_new_flows".into(),
            ratio: ns / floor_ns("floor_stateless_dsr_new_flows"),
            verified: proof,
        };
        let mut extra = Vec::new();
        if let (Some((name, false)), 3, 0) = (new_flow, backends, fill_pct) {
            let mut small = agent_with_table(vip, backends, 1 << 16)?;
            extra.push(warm_case(format!("{name}_64k_table"), "empty (capacity 65536)", warm_new_flow_case(fl, &mut small, false, SMALL_TABLE_REPEAT)?));
            drop(small);
            let mut tiny = agent_with_table(vip, backends, TINY_TABLE)?;
            let cached = warm_new_flow_case(fl, &mut tiny, false, SMALL_TABLE_REPEAT)?;
            extra.push(warm_case(format!("{name}_1k_table"), &format!("capacity {TINY_TABLE} (cached)"), cached));
            drop(tiny);
            let mut keyed = agent_with_opts(vip, backends, LoadOptions { max_vips: 8, flow_keys: true, ..Default::default() })?;
            extra.push(warm_case(format!("{name}_flow_keys"), "empty, --flow-keys", warm_new_flow_case(fl, &mut keyed, false, NEW_FLOW_REPEAT)?));
        }
        for (name, frame, want, floor, proof) in steady {
            // Warm: the first packet of a flow makes its table entry.
            crate::xdp::run(&mut a.dp, frame);
            let before = stat(&a, proof)?;
            let prog = a.dp.program(PROG_XLB)?;
            // The floor on its own frame (IPv4: the stateless floor parses
            // nothing else), in alternation with the case.
            let floor_want = if floor == "floor_pass" { 2 } else { 3 };
            let (ns, spread, k, ratio) = paired_cost((prog, frame, want), (fl.prog(floor)?, &floor_frame, floor_want))?;
            let moved = stat(&a, proof)? - before;
            let expect = RUNS as u64 * 3 * N as u64;
            if moved != expect {
                bail!("{name}: counter {} moved {moved}, expected {expect}", proof.name());
            }
            out.push(Case {
                ratio,
                ..Case::new(name, backends, &ct, (ns, spread, k), floor, floor_ns, format!("{} +{moved} = {RUNS} runs × 3N; ratio: median of {RUNS} runs paired with {floor}", proof.name()))
            });
        }
        let mut push = |case: &str, ns: f64, spread: [f64; 2], k: f64, floor: &str, verified: String| {
            out.push(Case::new(case, backends, &ct, (ns, spread, k), floor, floor_ns, verified));
        };
        // New flows: warm (the main figure), then cold (one syscall each).
        if let Some((name, v6)) = new_flow {
            let (ns, spread, proof) = warm_new_flow_case(fl, &mut a, v6, NEW_FLOW_REPEAT)?;
            let proof = format!(
                "{proof}; {:.2}× floor_one_line, {:.2}× floor_lru_insert, {:.1}× floor_stateless_dsr",
                ns / floor_ns("floor_one_line"),
                ns / floor_ns("floor_lru_insert"),
                ns / floor_ns("floor_stateless_dsr")
            );
            push(name, ns, spread, ns, "floor_one_line", proof);
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
                &format!("{name}_cold"),
                ns,
                [ns, ns],
                xlb_total / NEW_FLOWS as f64,
                "floor_stateless_dsr_new_flows_cold",
                format!("conntrack_miss +{misses}, forwarded +{fwd}; one syscall per frame"),
            );
        }
        out.extend(extra);
    }
    Ok(out)
}
