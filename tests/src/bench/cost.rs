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

/// One measured case.
#[derive(Serialize, Debug, Clone)]
pub struct Case {
    /// Case name.
    pub case: String,
    /// Backends of the VIP (0 for floors).
    pub backends: u32,
    /// Connection table state: "empty", "50 % (N entries)" or "full (N
    /// entries)" of its capacity, "-" for floors.
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

impl Case {
    /// A floor: its own reference (ratio 1).
    fn floor(name: &str, ns: f64, spread: [f64; 2], kernel: f64, verified: String) -> Case {
        Case {
            case: name.into(),
            backends: 0,
            conntrack: "-".into(),
            ns_per_pkt: ns,
            spread_ns: spread,
            kernel_avg_ns: kernel,
            floor: name.into(),
            ratio: 1.0,
            verified,
        }
    }

    /// A case of `backends` backends compared to `floor` (whose cost `floor_ns` gives).
    pub(crate) fn new(case: &str, backends: u32, ct: &str, (ns, spread, k): (f64, [f64; 2], f64), floor: &str, floor_ns: &dyn Fn(&str) -> f64, verified: String) -> Case {
        Case {
            case: case.into(),
            backends,
            conntrack: ct.into(),
            ns_per_pkt: ns,
            spread_ns: spread,
            kernel_avg_ns: k,
            floor: floor.into(),
            ratio: ns / floor_ns(floor),
            verified,
        }
    }
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// Time `repeat` runs of a frame: (wall ns, kernel average ns, return value).
pub(crate) fn timed(prog: &Xdp, frame: &[u8], repeat: u32) -> Result<(f64, f64, u32)> {
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
    next: ProgramArray<MapData>,
}

impl Floors {
    /// Load the floors object and fill its stateless table.
    pub fn load(path: &str) -> Result<Floors> {
        let obj = std::fs::read(path).with_context(|| format!("cannot read {path}"))?;
        let mut ebpf = EbpfLoader::new().load(&obj).context("loading the floors object")?;
        for name in
            ["floor_pass", "floor_macswap_tx", "floor_stateless_dsr", "floor_one_line", "floor_one_line_ct", "floor_work", "floor_one_line_nudge", "floor_one_line_work", "floor_lru_insert", "bench_gen", "bench_sink", "new_flows"]
        {
            let p: &mut Xdp = ebpf.program_mut(name).ok_or_else(|| anyhow!("no {name}"))?.try_into()?;
            p.load().with_context(|| format!("verifier rejected {name}"))?;
        }
        let mut ring: Array<_, [u8; 8]> = Array::try_from(ebpf.map_mut("FLOOR_RING").ok_or_else(|| anyhow!("no ring"))?)?;
        for i in 0..DEFAULT_RING_SIZE {
            ring.set(i, [2, 0, 0, 0, 1, (i % 3) as u8 + 1, 0, 0], 0)?;
        }
        let next = ProgramArray::try_from(ebpf.take_map("FLOOR_NEXT").ok_or_else(|| anyhow!("no FLOOR_NEXT"))?)?;
        Ok(Floors { ebpf, next })
    }

    /// Warm new flows into `target` (see the module doc): kernel average
    /// per run, median and [min, max] over RUNS calls; `frame(run)` must give
    /// each call its own source range.
    fn warm_new_flows(&mut self, target: &ProgramFd, frame: &dyn Fn(u8) -> Vec<u8>, repeat: u32, want: u32) -> Result<(f64, [f64; 2])> {
        self.next.set(0, target, 0).context("FLOOR_NEXT")?;
        let wrapper = self.prog("new_flows")?;
        let mut per = Vec::new();
        for run in 0..RUNS {
            let (_, k, r) = timed(wrapper, &frame(run as u8), repeat)?;
            if r != want {
                bail!("new flows: verdict {r}, expected {want}");
            }
            per.push(k);
        }
        let (lo, hi) = per.iter().fold((f64::MAX, 0f64), |(a, b), &x| (a.min(x), b.max(x)));
        Ok((median(&mut per), [lo, hi]))
    }

    /// One call of warm new flows into `target`: the kernel's average per
    /// run, and the verdict.
    pub(crate) fn warm_once(&mut self, target: &ProgramFd, frame: &[u8], repeat: u32) -> Result<(f64, u32)> {
        self.next.set(0, target, 0).context("FLOOR_NEXT")?;
        let (_, k, r) = timed(self.prog("new_flows")?, frame, repeat)?;
        Ok((k, r))
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
        let mut push = |case: &str, ns: f64, spread: [f64; 2], k: f64, floor: &str, verified: String| {
            out.push(Case::new(case, backends, &ct, (ns, spread, k), floor, floor_ns, verified));
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

/// The QUIC path (part of `vipforms`): a plain UDP VIP's established and
/// new flows before and after a `--quic` VIP is added elsewhere (the same
/// agent, the same run), then the `--quic` VIP's established flows, new
/// flows routed by their connection ID, and Initials (hashed).
fn quic(fl: &mut Floors, a: &mut Agent, backends: &[(IpAddr, Option<Mac>, u32)], floor_ns: &dyn Fn(&str) -> f64) -> Result<Vec<Case>> {
    use lb_common::quic::encode_cid;
    const UDP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 104);
    const QUIC: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 105);
    let short = crate::frames::quic::short(&encode_cid::<8>(2, &[1, 2, 3, 4, 5]));
    let initial = crate::frames::quic::initial(&[0x77; 8]);
    let to = |src: Ipv4Addr, sport: u16, dst: Ipv4Addr, payload: &[u8]| eth(ETH_IP, &[], &ipv4(src, dst, 17, &[], 0, &udp(sport, 443, payload)));
    let mut out = Vec::new();
    let measure = |a: &mut Agent, case: &str, frame: &[u8], proof: Stat| -> Result<Case> {
        crate::xdp::run(&mut a.dp, frame);
        let before = stat(a, proof)?;
        let r = repeat_cost(a.dp.program(PROG_XLB)?, frame, 3)?;
        let moved = stat(a, proof)? - before;
        if moved != RUNS as u64 * 3 * N as u64 {
            bail!("{case}: counter {} moved {moved}", proof.name());
        }
        Ok(Case::new(case, 3, "empty", r, "floor_stateless_dsr", floor_ns, format!("{} +{moved} = {RUNS} runs × 3N", proof.name())))
    };
    let plain: Vip = format!("{UDP}:443/udp").parse()?;
    a.add_vip(plain, Algo::Maglev, 0)?;
    a.add_backends(&plain, backends)?;
    let udp_est = to(CLIENT, 40006, UDP, &short);
    out.push(measure(a, "udp_established (no --quic VIP)", &udp_est, Stat::CtHit)?);
    // Each new-flow case its own sources (102.x, 103.x, …): never a hit.
    let mut first_octet = 101u8;
    let mut new_flows = |a: &mut Agent, case: &str, dst: Ipv4Addr, payload: &[u8], event: Option<Stat>| -> Result<Case> {
        first_octet += 1;
        let src = first_octet;
        let ev0 = event.map(|e| stat(a, e)).transpose()?;
        let (miss0, fwd0) = (stat(a, Stat::CtMiss)?, stat(a, Stat::Forwarded)?);
        let fd = a.dp.program(PROG_XLB)?.fd()?.try_clone()?;
        let frame = |run: u8| to(Ipv4Addr::new(src, 64 + 4 * run, 0, 0), 5555, dst, payload);
        let (ns, spread) = fl.warm_new_flows(&fd, &frame, NEW_FLOW_REPEAT, 3)?;
        let want = RUNS as u64 * NEW_FLOW_REPEAT as u64;
        let (misses, fwd) = (stat(a, Stat::CtMiss)? - miss0, stat(a, Stat::Forwarded)? - fwd0);
        let events = match (event, ev0) {
            (Some(e), Some(b)) => Some((e, stat(a, e)? - b)),
            _ => None,
        };
        if misses != want || fwd != want || events.is_some_and(|(_, n)| n != want) {
            bail!("{case}: {misses} misses, {fwd} forwards, {events:?} for {want} new flows");
        }
        let proof = events.map_or(String::new(), |(e, n)| format!(", {} +{n}", e.name()));
        Ok(Case::new(case, 3, "empty", (ns, spread, ns), "floor_one_line", floor_ns, format!("conntrack_miss +{misses}, forwarded +{fwd}{proof}")))
    };
    out.push(new_flows(a, "udp_new_flow (no --quic VIP)", UDP, &short, None)?);
    // A --quic VIP on another address, backends with server IDs 1..=3.
    let q: Vip = format!("{QUIC}:443/udp").parse()?;
    let quic_opts = xlb::config::VipOpts { quic: true, ..Default::default() };
    a.add_vip_spec(q, &xlb::agent::VipSpec { opts: quic_opts, ..Default::default() })?;
    for (i, (ip, mac, w)) in backends.iter().enumerate() {
        a.add_backend_full(&q, (*ip, *mac, *w), None, None, Some(xlb::quic::ServerId(i as u16 + 1)))?;
    }
    let udp_est2 = to(CLIENT, 40008, UDP, &short);
    out.push(measure(a, "udp_established (a --quic VIP elsewhere)", &udp_est2, Stat::CtHit)?);
    out.push(new_flows(a, "udp_new_flow (a --quic VIP elsewhere)", UDP, &short, None)?);
    let quic_est = to(CLIENT, 40007, QUIC, &short);
    out.push(measure(a, "quic_established", &quic_est, Stat::CtHit)?);
    out.push(new_flows(a, "quic_new_flow_routed (by server ID)", QUIC, &short, Some(Stat::QuicRouted))?);
    out.push(new_flows(a, "quic_new_flow_initial (hashed)", QUIC, &initial, Some(Stat::QuicNoId))?);
    Ok(out)
}

/// Rounds of the interleaved none / every-feature comparison.
const INTERLEAVED_ROUNDS: usize = 5;

/// `cargo xtask bench vipforms`: the VIP forms' paths (any-port VIPs,
/// `--hash dst-port`, `--answer-ping`) and, in the same run, non-VIP and
/// established traffic with none of them configured and with them
/// configured on other addresses (3 backends, table empty).
pub fn vip_forms(fl: &mut Floors, floor_ns: &dyn Fn(&str) -> f64) -> Result<Vec<Case>> {
    const ANY: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 101);
    const DPORT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 102);
    const PING: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 103);
    let nonvip = eth(ETH_IP, &[], &ipv4(CLIENT, Ipv4Addr::new(10, 0, 0, 99), 6, &[], 0, &tcp(1234, 80, ACK, b"x")));
    let est4 = v4_tcp(40000, ACK);
    let any_est = eth(ETH_IP, &[], &ipv4(CLIENT, ANY, 6, &[], 0, &tcp(40003, 8080, ACK, b"0123456789")));
    let dport_est = eth(ETH_IP, &[], &ipv4(CLIENT, DPORT, 6, &[], 0, &tcp(40004, 8443, ACK, b"0123456789")));
    let mut out = Vec::new();
    let mut push = |case: &str, ct: &str, r: (f64, [f64; 2], f64), floor: &str, verified: String| {
        out.push(Case::new(case, 3, ct, r, floor, floor_ns, verified));
    };
    // A steady case: warm once, then N/2N; the counter proves the path.
    /// (median, spread, kernel average) and what the counters proved.
    type Measured = ((f64, [f64; 2], f64), String);
    let steady = |a: &mut Agent, frame: &[u8], want: u32, proof: Stat| -> Result<Measured> {
        crate::xdp::run(&mut a.dp, frame);
        let before = stat(a, proof)?;
        let r = repeat_cost(a.dp.program(PROG_XLB)?, frame, want)?;
        let moved = stat(a, proof)? - before;
        let expect = RUNS as u64 * 3 * N as u64;
        if moved != expect {
            bail!("counter {} moved {moved}, expected {expect}", proof.name());
        }
        Ok((r, format!("{} +{moved} = {RUNS} runs × 3N", proof.name())))
    };
    // 1. Nothing but the exact VIP 10.0.0.100:80/tcp.
    let mut plain = agent("10.0.0.100:80/tcp", 3)?;
    for (case, frame, want, floor, proof) in [
        ("nonvip_pass (no VIP forms)", &nonvip, 2, "floor_pass", Stat::PassNotVip),
        ("v4_tcp_established (no VIP forms)", &est4, 3, "floor_stateless_dsr", Stat::CtHit),
    ] {
        let (r, v) = steady(&mut plain, frame, want, proof).with_context(|| case.to_string())?;
        push(case, "empty", r, floor, v);
    }
    drop(plain);
    // 2. The same plus an any-port VIP, a dst-port VIP and an answering VIP.
    let mut a = agent("10.0.0.100:80/tcp", 3)?;
    let backends: Vec<(IpAddr, Option<Mac>, u32)> = a.vips().values().flat_map(|s| s.backends.values().map(|b| (b.ip, b.mac, 1))).collect();
    for (v, opts) in [
        ("10.0.0.101:*/tcp", xlb::config::VipOpts::default()),
        ("10.0.0.102:*/tcp", xlb::config::VipOpts { hash: xlb::config::HashMode::DstPort, ..Default::default() }),
        ("10.0.0.103:80/tcp", xlb::config::VipOpts { answer_ping: true, ..Default::default() }),
    ] {
        let v: Vip = v.parse()?;
        a.add_vip_spec(v, &xlb::agent::VipSpec { opts, ..Default::default() })?;
        a.add_backends(&v, &backends)?;
    }
    for (case, frame, want, floor, proof) in [
        ("nonvip_pass (VIP forms elsewhere)", &nonvip, 2, "floor_pass", Stat::PassNotVip),
        ("v4_tcp_established (VIP forms elsewhere)", &est4, 3, "floor_stateless_dsr", Stat::CtHit),
        ("any_port_established", &any_est, 3, "floor_stateless_dsr", Stat::CtHit),
        ("dst_port_established", &dport_est, 3, "floor_stateless_dsr", Stat::CtHit),
    ] {
        let (r, v) = steady(&mut a, frame, want, proof).with_context(|| case.to_string())?;
        push(case, "empty", r, floor, v);
    }
    // New flows to the any-port and dst-port VIPs (warm method).
    for (case, dst, port) in [("any_port_new_flow", ANY, 8080u16), ("dst_port_new_flow", DPORT, 8443)] {
        let (miss0, fwd0) = (stat(&a, Stat::CtMiss)?, stat(&a, Stat::Forwarded)?);
        let fd = a.dp.program(PROG_XLB)?.fd()?.try_clone()?;
        let frame = |run: u8| eth(ETH_IP, &[], &ipv4(Ipv4Addr::new(101, 64 + 4 * run, 0, 0), dst, 6, &[], 0, &tcp(5555, port, SYN, b"")));
        let (ns, spread) = fl.warm_new_flows(&fd, &frame, NEW_FLOW_REPEAT, 3)?;
        let want = RUNS as u64 * NEW_FLOW_REPEAT as u64;
        let (misses, fwd) = (stat(&a, Stat::CtMiss)? - miss0, stat(&a, Stat::Forwarded)? - fwd0);
        if misses != want || fwd != want {
            bail!("{case}: {misses} misses, {fwd} forwards for {want} new flows");
        }
        push(case, "empty", (ns, spread, ns), "floor_one_line", format!("conntrack_miss +{misses}, forwarded +{fwd}"));
    }
    // QUIC (before prefix VIPs, which change the non-VIP path).
    let quic_cases = quic(fl, &mut a, &backends, floor_ns)?;
    // 3. Prefix VIPs: the gate opens; non-VIP traffic pays a trie miss.
    let prefix: Vip = "10.5.0.0/16:*/tcp".parse()?;
    a.add_vip(prefix, Algo::Maglev, 0)?;
    a.add_backends(&prefix, &backends)?;
    let prefix_est = eth(ETH_IP, &[], &ipv4(CLIENT, Ipv4Addr::new(10, 5, 1, 2), 6, &[], 0, &tcp(40005, 8080, ACK, b"0123456789")));
    for (case, frame, want, floor, proof) in [
        ("nonvip_pass (prefix VIPs configured)", &nonvip, 2, "floor_pass", Stat::PassNotVip),
        ("prefix_established", &prefix_est, 3, "floor_stateless_dsr", Stat::CtHit),
    ] {
        let (r, v) = steady(&mut a, frame, want, proof).with_context(|| case.to_string())?;
        push(case, "empty", r, floor, v);
    }
    // 4. And a routed VIP (IPIP; no traffic to it): every #13 feature is
    // configured, the L2 VIP's established flows and non-VIP traffic must
    // not notice (non-VIP traffic pays the trie lookup of prefix VIPs).
    let add_routed = |ag: &mut Agent| -> Result<()> {
        ag.dp.set_encap(&xlb::encap::encap_config(&["10.210.0.0/24".into()], lb_common::DEFAULT_GUE_PORT)?)?;
        let routed: Vip = "10.0.0.104:80/tcp".parse()?;
        ag.add_vip_spec(routed, &xlb::agent::VipSpec { forward: lb_common::Forward::Ipip, ..Default::default() })?;
        ag.add_backend(&routed, "10.220.0.1".parse()?, None, 1)?;
        Ok(())
    };
    add_routed(&mut a)?;
    // Same run, interleaved (the machine's load drifts between sections):
    // fresh agents with none of the features, and with all but prefix VIPs
    // (the only one non-VIP traffic may pay for), against this one, round
    // by round; each figure the median of its rounds.
    let mut none = agent("10.0.0.100:80/tcp", 3)?;
    let mut no_prefix = agent("10.0.0.100:80/tcp", 3)?;
    for (v, opts) in [
        ("10.0.0.101:*/tcp", xlb::config::VipOpts::default()),
        ("10.0.0.102:*/tcp", xlb::config::VipOpts { hash: xlb::config::HashMode::DstPort, ..Default::default() }),
        ("10.0.0.103:80/tcp", xlb::config::VipOpts { answer_ping: true, ..Default::default() }),
    ] {
        let v: Vip = v.parse()?;
        no_prefix.add_vip_spec(v, &xlb::agent::VipSpec { opts, ..Default::default() })?;
        no_prefix.add_backends(&v, &backends)?;
    }
    add_routed(&mut no_prefix)?;
    const CONFIGS: [&str; 3] = ["none configured", "every #13 feature but prefix VIPs", "every #13 feature"];
    // rounds[r][2 * config + (0 non-VIP, 1 established)]
    let mut rounds: Vec<[f64; 6]> = Vec::new();
    for _ in 0..INTERLEAVED_ROUNDS {
        let mut r = [0.0; 6];
        for (i, slot) in r.iter_mut().enumerate() {
            let ag = match i / 2 {
                0 => &mut none,
                1 => &mut no_prefix,
                _ => &mut a,
            };
            let (frame, want, proof) = if i % 2 == 0 { (&nonvip, 2, Stat::PassNotVip) } else { (&est4, 3, Stat::CtHit) };
            *slot = steady(ag, frame, want, proof).context("interleaved rounds")?.0 .0;
        }
        rounds.push(r);
    }
    let median = |i: usize| {
        let mut v: Vec<f64> = rounds.iter().map(|r| r[i]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let spread = |i: usize| [rounds.iter().map(|r| r[i]).fold(f64::INFINITY, f64::min), rounds.iter().map(|r| r[i]).fold(0.0, f64::max)];
    let per_round = |i: usize, j: usize| rounds.iter().map(|r| format!("{:.2}", r[j] / r[i])).collect::<Vec<_>>().join(", ");
    for i in 0..6 {
        let (name, floor) = if i % 2 == 0 { ("nonvip_pass", "floor_pass") } else { ("v4_tcp_established", "floor_stateless_dsr") };
        let case = format!("{name} ({}, interleaved)", CONFIGS[i / 2]);
        let proof = if i >= 2 {
            format!("{INTERLEAVED_ROUNDS} rounds; ÷ none configured per round: {}", per_round(i % 2, i))
        } else {
            format!("{INTERLEAVED_ROUNDS} rounds, median")
        };
        push(&case, "empty", (median(i), spread(i), median(i)), floor, proof);
    }
    // Echo replies: the reply is no request, so one syscall per frame (as
    // the cold new-flow method), the call overhead calibrated on floor_pass.
    let echoes: Vec<Vec<u8>> = (0..NEW_FLOWS)
        .map(|i| eth(ETH_IP, &[], &ipv4(CLIENT, PING, 1, &[], 0, &crate::frames::icmp_echo(8, i as u16, 1, &[0x5a; 56]))))
        .collect();
    let before = stat(&a, Stat::EchoReplied)?;
    let total = loop_cost(a.dp.program(PROG_XLB)?, &echoes, 3)?;
    let pass_total = loop_cost(fl.prog("floor_pass")?, &echoes, 2)?;
    let replied = stat(&a, Stat::EchoReplied)? - before;
    if replied != NEW_FLOWS as u64 {
        bail!("echo: {replied} replies for {NEW_FLOWS} requests");
    }
    let ns = (total - pass_total) / NEW_FLOWS as f64 + floor_ns("floor_pass");
    push("echo_reply_cold", "-", (ns, [ns, ns], total / NEW_FLOWS as f64), "floor_stateless_dsr_new_flows_cold", format!("echo_replied +{replied}; one syscall per frame"));
    out.extend(quic_cases);
    Ok(out)
}

/// `cargo xtask bench profile`: where a packet's time goes. Each case runs
/// in a loop for a few seconds under `perf record -p` (this
/// process; kernel symbols: the JITed program, the helpers it calls and their return
/// thunks); the top symbols are printed. A development aid: the figures of
/// record are the cost section's.
pub fn profile(fl: &mut Floors, out: &std::path::Path) -> Result<()> {
    const SECS: u64 = 6;
    let cases: [(&str, bool, bool); 3] = [("v4_tcp_new_flow", false, true), ("v6_tcp_new_flow", true, true), ("v4_tcp_established", false, false)];
    for (name, v6, new) in cases {
        let mut a = agent(if v6 { "[fd00::100]:80/tcp" } else { "10.0.0.100:80/tcp" }, 3)?;
        let fd = a.dp.program(PROG_XLB)?.fd()?.try_clone()?;
        // For `bpftool prog dump jited id N` (perf's offsets are into it).
        if let Ok(info) = a.dp.program(PROG_XLB)?.info() {
            eprintln!("bench: profiling {name}: program id {}", info.id());
            std::thread::sleep(Duration::from_secs(3));
        }
        let data = out.join(format!("perf-{name}.data"));
        let mut perf = std::process::Command::new("perf")
            .args(["record", "-q", "-p", &std::process::id().to_string(), "-o"])
            .arg(&data)
            .args(["--", "sleep", &SECS.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("cannot run perf (apt-get install linux-perf)")?;
        let t = Instant::now();
        let mut run = 0u8;
        let mut per = Vec::new();
        while t.elapsed() < Duration::from_secs(SECS) {
            if new {
                fl.next.set(0, &fd, 0).context("FLOOR_NEXT")?;
                per.push(timed(fl.prog("new_flows")?, &warm_frame(v6, run % 32), 20_000)?.1);
                run = run.wrapping_add(1);
            } else {
                let prog: &Xdp = a.dp.program(PROG_XLB)?;
                per.push(timed(prog, &if v6 { v6_tcp(40000, ACK) } else { v4_tcp(40000, ACK) }, 1_000_000)?.1);
            }
        }
        perf.wait()?;
        let rep = std::process::Command::new("perf")
            .args(["report", "--stdio", "-q", "--no-children", "--sort", "sym", "--percent-limit", "0.7", "-i"])
            .arg(&data)
            .output()
            .context("perf report")?;
        eprintln!("bench: profile of {name} (kernel average {:.1} ns, median of {} calls):\n{}", median(&mut per), per.len(), String::from_utf8_lossy(&rep.stdout));
    }
    Ok(())
}
