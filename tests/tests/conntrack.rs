//! The set-associative connection table on the loaded program, through
//! BPF_PROG_TEST_RUN: flows that share a set (found with the agent's own seed
//! and the shared hash) evict closed entries first, then the oldest; IPv4
//! and IPv6; writers on both CPUs at once against the same sets never send a
//! flow to another flow's backend; with `--conntrack-size` live flows in the
//! kernel's table, at most 1 % lose their entry; the census counts what the
//! datapath wrote. Needs root.

use aya::programs::{TestRun, TestRunOptions};
use lb_common::{ct::ct_hash, ct::ct_sets, hash::flow_hash, Algo, FlowKey, Stat, PROG_XLB};
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};
use xlb::{agent::Agent, config::Mac, config::Vip};
use xlb_tests::{
    frames::{eth, ipv4, ipv6, tcp, tcp_flags::*, ETH_IP, ETH_IPV6},
    xdp::{self, assert_one_verdict, test_agent, XDP_TX},
};

const VIP4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 60);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x60);

/// A client flow: IPv4 or IPv6 source number `n`, source port `sport`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Flow {
    v6: bool,
    n: u32,
    sport: u16,
}

impl Flow {
    fn src4(&self) -> Ipv4Addr {
        Ipv4Addr::from(0x6400_0000 | (self.n & 0x00ff_ffff)) // 100.x.x.x
    }
    fn src6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0, 0, 9, 0, 0, (self.n >> 16) as u16, self.n as u16)
    }
    fn vip(&self) -> Vip {
        (if self.v6 { "[fd00::60]:80/tcp" } else { "10.0.0.60:80/tcp" }).parse().expect("vip")
    }
    fn key(&self) -> FlowKey {
        let k = self.vip().key();
        if self.v6 {
            FlowKey::v6(self.src6().octets(), self.sport.to_be(), k.addr, k.port_be, k.proto)
        } else {
            FlowKey::v4(self.src4().octets(), self.sport.to_be(), VIP4.octets(), k.port_be, k.proto)
        }
    }
    fn frame(&self, flags: u8) -> Vec<u8> {
        let seg = tcp(self.sport, 80, flags, b"data");
        if self.v6 {
            eth(ETH_IPV6, &[], &ipv6(self.src6(), VIP6, 6, &seg))
        } else {
            eth(ETH_IP, &[], &ipv4(self.src4(), VIP4, 6, &[], 0, &seg))
        }
    }
}

/// An agent with Maglev VIPs 10.0.0.60:80/tcp and [fd00::60]:80/tcp, each
/// with `n` backends (MACs 02:00:00:03:hi:lo).
fn lb(n: u16) -> Agent {
    let mut agent = test_agent();
    for (v, six) in [("10.0.0.60:80/tcp", false), ("[fd00::60]:80/tcp", true)] {
        let vip: Vip = v.parse().expect("vip");
        agent.add_vip(vip, Algo::Maglev, 0).expect("vip");
        let list: Vec<(IpAddr, Option<Mac>, u32)> = (0..n)
            .map(|i| {
                let ip = if six {
                    IpAddr::V6(Ipv6Addr::new(0xfd00, 3, 0, 0, 0, 0, 0, i + 1))
                } else {
                    IpAddr::V4(Ipv4Addr::new(10, 3, (i >> 8) as u8, i as u8 + 1))
                };
                (ip, Some(Mac([2, 0, 0, 3 + six as u8, (i >> 8) as u8, i as u8])), 1)
            })
            .collect();
        agent.add_backends(&vip, &list).expect("backends");
    }
    agent
}

/// The set a flow's entry lives in.
fn set_of(agent: &Agent, f: &Flow) -> u32 {
    ct_hash(&f.key(), &agent.dp.conntrack_seed(), ct_sets(agent.dp.opts.conntrack_size)).set
}

/// `count` flows (of the family) that share one set, searched from `start`.
fn same_set(agent: &Agent, v6: bool, start: u32, count: usize) -> Vec<Flow> {
    let first = Flow { v6, n: start, sport: 1000 };
    let target = set_of(agent, &first);
    let mut out = vec![first];
    let mut n = start;
    while out.len() < count {
        n += 1;
        let f = Flow { v6, n, sport: 1000 };
        if set_of(agent, &f) == target {
            out.push(f);
        }
    }
    out
}

/// The backend MAC the agent's Maglev table predicts for a flow.
fn predicted(agent: &Agent, f: &Flow) -> [u8; 6] {
    let st = &agent.vips()[&f.vip()];
    let id = st.table[(flow_hash(&f.key()) % st.table.len() as u32) as usize];
    st.backends.values().find(|b| b.id == id).expect("member").mac.expect("mac").0
}

/// Run a frame; (action, destination MAC, counter deltas).
fn send(agent: &mut Agent, f: &Flow, flags: u8) -> (u32, [u8; 6], Vec<i64>) {
    let (a, out, d) = xdp::run(&mut agent.dp, &f.frame(flags));
    (a, out[0..6].try_into().expect("mac"), d)
}

/// Entry age resolution is 2²⁴ ns (16.8 ms); this is three of them.
const TICK: Duration = Duration::from_millis(50);

#[test]
fn a_full_set_gives_way_closed_entries_first_then_the_oldest() {
    let mut agent = lb(3);
    for v6 in [false, true] {
        let f = same_set(&agent, v6, 1, 6);
        for g in &f[..4] {
            let (a, mac, d) = send(&mut agent, g, SYN);
            assert_eq!((a, mac), (XDP_TX, predicted(&agent, g)));
            assert_eq!((d[Stat::CtMiss as usize], d[Stat::CtEvicted as usize]), (1, 0), "{g:?}: a free way");
            std::thread::sleep(TICK);
        }
        // f1 closes; the set is full (4 ways).
        let (_, _, d) = send(&mut agent, &f[1], FIN | ACK);
        assert_eq!((d[Stat::CtHit as usize], d[Stat::CtClosed as usize]), (1, 1));
        std::thread::sleep(TICK);
        // f4 takes the closed entry's way, not the oldest open one (f0).
        let (_, _, d) = send(&mut agent, &f[4], SYN);
        assert_eq!((d[Stat::CtMiss as usize], d[Stat::CtEvicted as usize]), (1, 0), "v6 {v6}: the closed way");
        std::thread::sleep(TICK);
        // f5 finds only open entries: the oldest (f0) gives way.
        let (_, _, d) = send(&mut agent, &f[5], SYN);
        assert_eq!((d[Stat::CtMiss as usize], d[Stat::CtEvicted as usize]), (1, 1), "v6 {v6}: an open entry evicted");
        for g in [&f[2], &f[3], &f[4], &f[5]] {
            let (a, mac, d) = send(&mut agent, g, ACK);
            assert_eq!((a, mac), (XDP_TX, predicted(&agent, g)));
            assert_eq!(d[Stat::CtHit as usize], 1, "v6 {v6}: {g:?} kept its entry");
        }
        let (_, _, d) = send(&mut agent, &f[0], ACK);
        assert_eq!(d[Stat::CtMiss as usize], 1, "v6 {v6}: the oldest flow lost its entry");
    }
}

#[test]
fn hits_refresh_an_entry_so_the_idle_one_gives_way() {
    let mut agent = lb(3);
    let f = same_set(&agent, false, 500, 5);
    for g in &f[..4] {
        send(&mut agent, g, SYN);
        std::thread::sleep(TICK);
    }
    // f0 is the oldest insert but keeps sending; f1 goes idle.
    send(&mut agent, &f[0], ACK);
    std::thread::sleep(TICK);
    let (_, _, d) = send(&mut agent, &f[4], SYN);
    assert_eq!(d[Stat::CtEvicted as usize], 1);
    let (_, _, d) = send(&mut agent, &f[0], ACK);
    assert_eq!(d[Stat::CtHit as usize], 1, "the busy flow kept its entry");
    let (_, _, d) = send(&mut agent, &f[1], ACK);
    assert_eq!(d[Stat::CtMiss as usize], 1, "the idle one gave way");
}

#[test]
fn ipv4_and_ipv6_flows_keep_their_backends_and_the_census_counts_them() {
    let mut agent = lb(5);
    let flows: Vec<Flow> = (0..400).map(|i| Flow { v6: i % 2 == 1, n: 7000 + i, sport: 2000 + i as u16 }).collect();
    for f in &flows {
        let (a, mac, d) = send(&mut agent, f, SYN);
        assert_eq!((a, mac), (XDP_TX, predicted(&agent, f)));
        assert_one_verdict(&d, Stat::Forwarded, "SYN");
    }
    // Change the tables (a sixth backend on each VIP): entries keep flows.
    for (v, ip) in [("10.0.0.60:80/tcp", "10.3.9.9"), ("[fd00::60]:80/tcp", "fd00:3::99")] {
        agent.add_backend(&v.parse().expect("vip"), ip.parse().expect("ip"), Some(Mac([2, 0, 0, 9, 9, 9])), 5).expect("add");
    }
    let mut evicted = 0;
    for f in &flows {
        let (a, mac, d) = send(&mut agent, f, ACK);
        assert_eq!(a, XDP_TX);
        if d[Stat::CtHit as usize] == 1 {
            assert_ne!(mac, [2, 0, 0, 9, 9, 9], "{f:?}: an established flow moved to the new backend");
        } else {
            evicted += 1;
        }
    }
    assert_eq!(evicted, 0, "400 flows in a 65 536-flow table all keep their entries");
    let census = agent.dp.conntrack_reader().expect("reader").census();
    assert_eq!(census.entries, 400);
    assert_eq!(census.open.values().sum::<i64>(), 400);
    for f in &flows[..100] {
        send(&mut agent, f, RST);
    }
    let census = agent.dp.conntrack_reader().expect("reader").census();
    assert_eq!((census.entries, census.open.values().sum::<i64>()), (400, 300), "closed entries stay, not open");
}

#[test]
fn port_zero_frames_to_a_vip_address_pass_untouched() {
    let mut agent = lb(3);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("TCP SYN to port 0", eth(ETH_IP, &[], &ipv4(Ipv4Addr::new(192, 0, 2, 1), VIP4, 6, &[], 0, &tcp(1234, 0, SYN, b"")))),
        ("UDP to port 0", eth(ETH_IP, &[], &ipv4(Ipv4Addr::new(192, 0, 2, 1), VIP4, 17, &[], 0, &xlb_tests::frames::udp(1234, 0, b"x")))),
        ("IPv6 TCP SYN to port 0", eth(ETH_IPV6, &[], &ipv6("fd00::9".parse().expect("ip"), VIP6, 6, &tcp(1234, 0, SYN, b"")))),
    ];
    // The UDP case needs a UDP VIP on the address for a fragment alias.
    agent.add_vip("10.0.0.60:53/udp".parse().expect("vip"), Algo::Maglev, 0).expect("udp vip");
    agent
        .add_backend(&"10.0.0.60:53/udp".parse().expect("vip"), "10.3.0.1".parse().expect("ip"), Some(Mac([2, 0, 0, 3, 0, 0])), 1)
        .expect("backend");
    for (what, frame) in cases {
        let (a, out, d) = xdp::run(&mut agent.dp, &frame);
        assert_eq!(a, xdp::XDP_PASS, "{what}");
        assert_eq!(out, frame, "{what}: untouched");
        assert_one_verdict(&d, Stat::PassNotVip, what);
        assert_eq!(d[Stat::CtMiss as usize], 0, "{what}: no table entry");
    }
    // Fragments to the address keep their own lookup (port 0 alias).
    let frag = eth(ETH_IP, &[], &ipv4(Ipv4Addr::new(192, 0, 2, 1), VIP4, 6, &[], 0x0005, &[7u8; 40]));
    let (a, _, d) = xdp::run(&mut agent.dp, &frag);
    assert_eq!(a, XDP_TX);
    assert_eq!(d[Stat::FragForwarded as usize], 1);
    assert_eq!(agent.dp.conntrack_reader().expect("reader").census().entries, 0, "nothing was inserted");
}

/// Run BPF_PROG_TEST_RUN on this thread, pinned to `cpu`.
fn pin_to(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity on this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set), 0, "pin to CPU {cpu}");
    }
}

#[test]
fn writers_on_both_cpus_never_send_a_flow_to_another_flows_backend() {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    assert!(cpus >= 2, "needs two CPUs");
    // 200 backends: flows sharing a set are chosen with pairwise distinct
    // Maglev backends, so a packet on another flow's entry would be counted
    // on a backend that is not its flow's. A torn entry exists for a few
    // instructions only: this catches gross failures (lost or mixed
    // entries, wrong counts) under real concurrency; every torn combination
    // is checked exhaustively by lb-common's
    // `torn_entries_never_name_another_flows_backend` (a layout without the
    // value binding passed 30 s of this test but fails that one).
    let mut agent = lb(200);
    // Repeated runs see the frame the previous run rewrote (addressed to its
    // backend by then): act on any destination MAC here.
    agent.dp.accept_any_mac().expect("accept any MAC");
    let mut flows = Vec::new();
    let mut used = BTreeSet::new();
    for (v6, start) in [(false, 100_000), (false, 200_000), (true, 300_000)] {
        let target = set_of(&agent, &Flow { v6, n: start, sport: 1000 });
        let mut n = start;
        let mut in_set = 0;
        while in_set < 12 {
            let f = Flow { v6, n, sport: 1000 };
            n += 1;
            if set_of(&agent, &f) == target && used.insert(predicted(&agent, &f)) {
                flows.push(f);
                in_set += 1;
            }
        }
    }
    // 36 flows, 12 per set (3 sets of 4 ways): each CPU drives half of every
    // set, so both write the same lines all the time: a call's first run
    // inserts (evicting another flow's entry), every run of a SYN call
    // rewrites the entry (re-scheduled), a FIN call closes it. Calls are
    // few and long (a loaded machine reschedules between syscalls).
    // Per flow: its ACK, SYN and FIN frames.
    type Frames = (Flow, Vec<u8>, Vec<u8>, Vec<u8>);
    let halves: [Vec<Frames>; 2] = [0, 1].map(|h| {
        flows.iter().enumerate().filter(|(i, _)| i % 2 == h).map(|(_, f)| (*f, f.frame(ACK), f.frame(SYN), f.frame(FIN | ACK))).collect()
    });
    const ROUNDS: usize = 120;
    const REPEAT: u32 = 48;
    let before = agent.dp.stats().expect("stats");
    let prog = agent.dp.program(PROG_XLB).expect("program");
    let sent: Vec<BTreeMap<Flow, u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = halves
            .iter()
            .enumerate()
            .map(|(cpu, half)| {
                let prog = &*prog;
                s.spawn(move || {
                    pin_to(cpu);
                    let mut sent = BTreeMap::new();
                    let mut out = vec![0u8; 256];
                    for round in 0..ROUNDS {
                        for (k, (f, ack, syn, fin)) in half.iter().enumerate() {
                            let frame = match (round + k) % 3 {
                                0 => syn,
                                1 => ack,
                                _ => fin,
                            };
                            let r = prog
                                .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), repeat: REPEAT, ..Default::default() })
                                .expect("BPF_PROG_TEST_RUN");
                            assert_eq!(r.return_value, XDP_TX);
                            *sent.entry(*f).or_insert(0) += REPEAT as u64;
                        }
                    }
                    sent
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("writer thread")).collect()
    });
    let after = agent.dp.stats().expect("stats");
    let delta = |s: Stat| after[s as usize] - before[s as usize];
    let total: u64 = sent.iter().flat_map(|m| m.values()).sum();
    assert_eq!(delta(Stat::Forwarded), total);
    let calls = total / REPEAT as u64;
    assert!(delta(Stat::CtEvicted) + delta(Stat::CtMiss) > calls / 10, "the sets were contended: {} evictions", delta(Stat::CtEvicted));
    assert!(delta(Stat::CtSynReuse) > total / 4, "entries were rewritten: {} SYN re-schedules", delta(Stat::CtSynReuse));
    assert!(delta(Stat::CtHit) > total / 2, "and mostly hit");
    // Every backend carried exactly its own flow's packets.
    for m in &sent {
        for (f, n) in m {
            let mac = predicted(&agent, f);
            let st = &agent.vips()[&f.vip()];
            let b = st.backends.values().find(|b| b.mac == Some(Mac(mac))).expect("backend");
            let c = agent.dp.backend_counters(b.id).expect("counters");
            assert_eq!(c.packets, *n, "{f:?}: its backend carried {} packets, the flow sent {n}", c.packets);
        }
    }
    eprintln!("{total} packets, {} evictions, {} hits, {} SYN re-schedules", delta(Stat::CtEvicted), delta(Stat::CtHit), delta(Stat::CtSynReuse));
}

#[test]
fn conntrack_size_live_flows_keep_99_percent_of_their_entries() {
    // As many live flows as the test agent's --conntrack-size (65 536),
    // IPv4 and IPv6, spread by the hash: one SYN each. Flows whose set was
    // already full take an open entry's way (counted); the census then finds
    // every other flow in the kernel's table.
    //
    // The bound is on the expected share (0.9 % for 4-way sets at this
    // size, `lb_common::ct`); one table's share varies with its random seed
    // by about 0.04 % (sd of ~590 evictions of 65 536), so a single table
    // went over 1 % (1.01 %) about once in 300 runs. Two tables, each with
    // its own seed, are measured and their mean is held to 1 %.
    let (mut evicted_all, mut flows_all) = (0u64, 0u64);
    for _ in 0..2 {
        let mut agent = lb(3);
        let size = agent.dp.opts.conntrack_size;
        let before = agent.dp.stats().expect("stats");
        {
            let prog = agent.dp.program(PROG_XLB).expect("program");
            let mut out = vec![0u8; 256];
            for i in 0..size {
                let f = Flow { v6: i % 4 == 0, n: 1_000_000 + i, sport: 3000 + (i % 7) as u16 };
                let frame = f.frame(SYN);
                let r = prog.test_run(TestRunOptions { data_in: Some(&frame), data_out: Some(&mut out), ..Default::default() }).expect("run");
                assert_eq!(r.return_value, XDP_TX);
            }
        }
        let after = agent.dp.stats().expect("stats");
        let evicted = after[Stat::CtEvicted as usize] - before[Stat::CtEvicted as usize];
        assert_eq!(after[Stat::CtMiss as usize] - before[Stat::CtMiss as usize], size as u64);
        let census = agent.dp.conntrack_reader().expect("reader").census();
        assert_eq!(census.entries, size as u64 - evicted, "every flow not evicted has its entry");
        eprintln!("{evicted} of {size} live flows lost their entry early ({:.2} %)", evicted as f64 * 100.0 / size as f64);
        assert!(evicted > 0, "a table this full does evict a few");
        evicted_all += evicted;
        flows_all += size as u64;
    }
    let share = evicted_all as f64 / flows_all as f64;
    assert!(share <= 0.01, "{:.2} % of live flows evicted early (mean of two tables)", share * 100.0);
}
