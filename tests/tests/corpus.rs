//! The hostile-packet corpus and scheduling semantics, through
//! BPF_PROG_TEST_RUN on the loaded program: IP fragments, IPv6 extension
//! headers, ICMP errors about VIP flows, TCP flag sequences, and every
//! algorithm. Each case asserts the verdict, the rewritten bytes and the
//! counters. Needs root.

use lb_common::{
    hash::{flow_hash, src_hash},
    Algo, FlowKey, Stat,
};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use xlb::{
    agent::Agent,
    config::{Mac, Vip},
};
use xlb_tests::{
    frames::{eth, ipv4, ipv6, tcp, tcp_flags::*, udp, ETH_IP, ETH_IPV6, LB_MAC},
    xdp::{assert_one_verdict, test_agent, XDP_PASS, XDP_TX},
};
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const VIP4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 50);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x50);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 2, 0, 0, 0, 7);
const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

/// Run every BPF_PROG_TEST_RUN of this process on one CPU: rotation state
/// (rr, wrr) is per CPU.
fn pin_to_cpu0() {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity on this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn mac(i: u8) -> Mac {
    Mac([0x02, 0, 0, 0, 2, i])
}

fn v4(i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 2, i))
}

struct Lb {
    agent: Agent,
}

impl Lb {
    /// One VIP 10.0.0.50:80/tcp (and 10.0.0.50:53/udp, [fd00::50]:80/tcp)
    /// with `algo`, backends 10.0.2.1.. with `weights`.
    fn new(algo: Algo, weights: &[u32], persist: u16) -> Lb {
        pin_to_cpu0();
        let mut agent = test_agent();
        let v: Vip = "10.0.0.50:80/tcp".parse().expect("vip");
        agent.add_vip(v, algo, persist).expect("vip");
        for (i, w) in weights.iter().enumerate() {
            agent.add_backend(&v, v4(i as u8 + 1), Some(mac(i as u8 + 1)), *w).expect("backend");
        }
        let u: Vip = "10.0.0.50:53/udp".parse().expect("vip");
        agent.add_vip(u, Algo::Maglev, 0).expect("vip");
        agent.add_backend(&u, v4(1), Some(mac(1)), 1).expect("backend");
        agent.add_backend(&u, v4(2), Some(mac(2)), 1).expect("backend");
        let v6: Vip = "[fd00::50]:80/tcp".parse().expect("vip");
        agent.add_vip(v6, Algo::Maglev, 0).expect("vip");
        for i in 1..=2u8 {
            let ip: IpAddr = format!("fd00::2:{i}").parse().expect("ip");
            agent.add_backend(&v6, ip, Some(mac(20 + i)), 1).expect("backend");
        }
        Lb { agent }
    }

    fn vip(&self) -> Vip {
        "10.0.0.50:80/tcp".parse().expect("vip")
    }

    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>, Vec<i64>) {
        xlb_tests::xdp::run(&mut self.agent.dp, frame)
    }

    /// Forward a frame; returns the backend index (1-based) it went to.
    fn to(&mut self, frame: &[u8]) -> u8 {
        let (a, out, _) = self.run(frame);
        assert_eq!(a, XDP_TX, "frame should be forwarded");
        assert_eq!(&out[6..12], &LB_MAC);
        assert_eq!(&out[12..], &frame[12..]);
        assert_eq!(&out[0..5], &[2, 0, 0, 0, 2], "destination is one of our backends");
        out[5]
    }

    /// Index of the backend the published table gives to a ring position.
    fn table_backend(&self, vip: &Vip, pos: u32) -> u8 {
        let st = &self.agent.vips()[vip];
        let id = st.table[pos as usize % st.table.len()];
        let b = st.backends.values().find(|b| b.id == id).expect("member");
        b.mac.expect("mac").0[5]
    }

    fn conns(&self, i: u8) -> i64 {
        let v = self.vip();
        let b = &self.agent.vips()[&v].backends[&v4(i)];
        self.agent.dp.backend_conns(b.id).expect("conns")
    }
}

fn key(src: Ipv4Addr, sport: u16, vip: &Vip) -> FlowKey {
    let mut k = FlowKey { src: [0; 16], sport_be: sport.to_be(), _pad: 0, vip: vip.key() };
    k.src[..4].copy_from_slice(&src.octets());
    k
}

fn syn(src: Ipv4Addr, sport: u16) -> Vec<u8> {
    eth(ETH_IP, &[], &ipv4(src, VIP4, 6, &[], 0, &tcp(sport, 80, SYN, b"")))
}

fn seg(sport: u16, flags: u8) -> Vec<u8> {
    eth(ETH_IP, &[], &ipv4(CLIENT, VIP4, 6, &[], 0, &tcp(sport, 80, flags, b"data")))
}

fn one_verdict(d: &[i64], want: Stat) {
    assert_one_verdict(d, want, "corpus case");
}

#[test]
fn fragments_of_a_client_stay_on_one_backend() {
    let mut lb = Lb::new(Algo::Maglev, &[1, 1, 1], 0);
    let v = lb.vip();
    for client in 1..=40u8 {
        let src = Ipv4Addr::new(192, 0, 2, client);
        let first = eth(ETH_IP, &[], &ipv4(src, VIP4, 6, &[], 0x2000, &tcp(4000, 80, ACK, &[0; 32])));
        let later = eth(ETH_IP, &[], &ipv4(src, VIP4, 6, &[], 0x0005, &[7u8; 40]));
        let (a1, o1, d1) = lb.run(&first);
        let (a2, o2, d2) = lb.run(&later);
        assert_eq!((a1, a2), (XDP_TX, XDP_TX), "client {client}");
        assert_eq!(&o1[0..6], &o2[0..6], "first and later fragment on one backend");
        one_verdict(&d1, Stat::Forwarded);
        assert_eq!((d1[Stat::FragForwarded as usize], d2[Stat::FragForwarded as usize]), (1, 1));
        assert_eq!(d1[Stat::CtMiss as usize] + d1[Stat::CtHit as usize], 0, "fragments bypass the table");
        // The choice is the 3-tuple hash over the VIP's table.
        let mut k = key(src, 0, &v);
        k.vip.port_be = 0;
        assert_eq!(o1[5], lb.table_backend(&v, flow_hash(&k) % lb.agent.dp.opts.ring_size));
    }
    // IPv6: a fragment header, first and later fragment, same backend.
    let frag = |off_m: u16, payload: &[u8]| {
        let mut p = vec![6, 0];
        p.extend_from_slice(&off_m.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 9]);
        p.extend_from_slice(payload);
        eth(ETH_IPV6, &[], &ipv6(CLIENT6, VIP6, 44, &p))
    };
    let (a1, o1, _) = lb.run(&frag(1, &tcp(5000, 80, SYN, &[0; 16])));
    let (a2, o2, _) = lb.run(&frag(8 << 3, &[1; 24]));
    assert_eq!((a1, a2), (XDP_TX, XDP_TX));
    assert_eq!(&o1[0..6], &o2[0..6]);
}

#[test]
fn ipv6_extension_headers_are_walked_up_to_the_bound() {
    let mut lb = Lb::new(Algo::Maglev, &[1, 1], 0);
    let v6: Vip = "[fd00::50]:80/tcp".parse().expect("vip");
    // Hop-by-hop (8 bytes) → destination options (16 bytes) → TCP.
    let chain = |n: usize, last: u8| {
        let mut p = Vec::new();
        for i in 0..n {
            let next = if i + 1 == n { last } else { 60 };
            p.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
        }
        p.extend_from_slice(&tcp(6000, 80, SYN, b"x"));
        eth(ETH_IPV6, &[], &ipv6(CLIENT6, VIP6, if n == 0 { 6 } else { 0 }, &p))
    };
    for n in 0..=lb_common::MAX_IPV6_EXT_HEADERS {
        let (a, out, d) = lb.run(&chain(n, 6));
        assert_eq!(a, XDP_TX, "{n} extension headers");
        let k = FlowKey { src: CLIENT6.octets(), sport_be: 6000u16.to_be(), _pad: 0, vip: v6.key() };
        assert_eq!(out[5], lb.table_backend(&v6, flow_hash(&k) % lb.agent.dp.opts.ring_size));
        one_verdict(&d, Stat::Forwarded);
    }
    let (a, out, d) = lb.run(&chain(lb_common::MAX_IPV6_EXT_HEADERS + 1, 6));
    assert_eq!(a, XDP_PASS);
    assert_eq!(out, chain(lb_common::MAX_IPV6_EXT_HEADERS + 1, 6));
    one_verdict(&d, Stat::PassExtHeaders);
    // Truncated inside the chain: pass, truncated.
    let full = chain(2, 6);
    for len in 14 + 40..14 + 40 + 16 {
        let (a, _, d) = lb.run(&full[..len]);
        assert_eq!(a, XDP_PASS);
        one_verdict(&d, Stat::PassTruncated);
    }
}

/// An ICMP error from a router about a packet the backend sent from the VIP.
fn icmp4_error(icmp_type: u8, code: u8, inner_src: Ipv4Addr, inner_sport: u16, inner_dst: Ipv4Addr, inner_dport: u16) -> Vec<u8> {
    let inner = ipv4(inner_src, inner_dst, 6, &[], 0, &tcp(inner_sport, inner_dport, ACK, b"")[..8]);
    let mut icmp = vec![icmp_type, code, 0, 0, 0, 0, 0x05, 0xdc];
    icmp.extend_from_slice(&inner);
    eth(ETH_IP, &[], &ipv4(ROUTER, inner_src, 1, &[], 0, &icmp))
}

#[test]
fn icmp_errors_about_vip_flows_reach_the_flows_backend() {
    let mut lb = Lb::new(Algo::Maglev, &[1, 1, 1], 0);
    for sport in 7000..7060u16 {
        let owner = lb.to(&syn(CLIENT, sport));
        for (t, c) in [(3u8, 4u8), (3, 1), (11, 0)] {
            let (a, out, d) = lb.run(&icmp4_error(t, c, VIP4, 80, CLIENT, sport));
            assert_eq!(a, XDP_TX, "ICMP {t}/{c} about flow {sport}");
            assert_eq!(out[5], owner, "to the flow's backend");
            assert_eq!(d[Stat::IcmpSteered as usize], 1);
            assert_eq!(d[Stat::CtMiss as usize], 0, "no table entry is made");
        }
    }
    // About a flow not in the table: Maglev tells where it would be.
    let v = lb.vip();
    let (a, out, _) = lb.run(&icmp4_error(3, 4, VIP4, 80, CLIENT, 9999));
    assert_eq!(a, XDP_TX);
    assert_eq!(out[5], lb.table_backend(&v, flow_hash(&key(CLIENT, 9999, &v)) % lb.agent.dp.opts.ring_size));
    // Unrelated: the embedded packet is not from a VIP, or from a VIP port
    // that is not a service, or the outer destination is not the inner source.
    for frame in [
        icmp4_error(3, 4, Ipv4Addr::new(10, 0, 0, 99), 80, CLIENT, 7000),
        icmp4_error(3, 4, VIP4, 81, CLIENT, 7000),
        {
            let mut f = icmp4_error(3, 4, VIP4, 80, CLIENT, 7000);
            f[14 + 16..14 + 20].copy_from_slice(&[10, 0, 0, 98]);
            f
        },
    ] {
        let (a, out, d) = lb.run(&frame);
        assert_eq!(a, XDP_PASS);
        assert_eq!(out, frame);
        one_verdict(&d, Stat::PassNotVip);
    }
    // ICMPv6 packet too big about an IPv6 VIP flow.
    let v6: Vip = "[fd00::50]:80/tcp".parse().expect("vip");
    let fwd = eth(ETH_IPV6, &[], &ipv6(CLIENT6, VIP6, 6, &tcp(7100, 80, SYN, b"")));
    let (_, o, _) = lb.run(&fwd);
    let mut icmp = vec![2, 0, 0, 0, 0, 0, 0x05, 0x00];
    icmp.extend_from_slice(&ipv6(VIP6, CLIENT6, 6, &tcp(80, 7100, ACK, b"")[..8]));
    let ptb = eth(ETH_IPV6, &[], &ipv6("fd00::1".parse().expect("ip"), VIP6, 58, &icmp));
    let (a, out, d) = lb.run(&ptb);
    assert_eq!(a, XDP_TX);
    assert_eq!(out[0..6], o[0..6]);
    assert_eq!(d[Stat::IcmpSteered as usize], 1);
    let _ = v6;
    // Truncated ICMP errors never abort: they pass until the embedded ports
    // (Ethernet 14 + IP 20 + ICMP 8 + inner IP 20 + 4 bytes = 66) are there.
    let full = icmp4_error(3, 4, VIP4, 80, CLIENT, 7000);
    for len in 14..full.len() {
        let (a, _, d) = lb.run(&full[..len]);
        if len < 66 {
            assert_eq!(a, XDP_PASS, "ICMP cut at {len}");
            one_verdict(&d, Stat::PassTruncated);
        } else {
            assert_eq!(a, XDP_TX, "ICMP cut at {len} still names the flow");
            one_verdict(&d, Stat::Forwarded);
        }
    }
}

#[test]
fn tcp_flags_drive_the_connection_state() {
    let mut lb = Lb::new(Algo::Maglev, &[1, 1, 1], 0);
    let b = lb.to(&seg(8000, SYN));
    assert_eq!(lb.conns(b), 1, "SYN opens");
    lb.to(&seg(8000, ACK));
    lb.to(&seg(8000, ACK | 0x08));
    assert_eq!(lb.conns(b), 1, "data does not change the count");
    let (_, _, d) = lb.run(&seg(8000, SYN | ACK));
    assert_eq!(d[Stat::CtHit as usize], 1, "SYN+ACK is not a new connection");
    let (a, out, d) = lb.run(&seg(8000, FIN | ACK));
    assert_eq!((a, out[5]), (XDP_TX, b));
    assert_eq!(d[Stat::CtClosed as usize], 1);
    assert_eq!(lb.conns(b), 0, "FIN closes");
    let (a, out, d) = lb.run(&seg(8000, ACK));
    assert_eq!((a, out[5], d[Stat::CtHit as usize]), (XDP_TX, b, 1), "last ACK still reaches it");
    let (_, _, d) = lb.run(&seg(8000, RST));
    assert_eq!(d[Stat::CtClosed as usize], 0, "closed once");
    assert_eq!(lb.conns(b), 0);
    // The client reuses the 5-tuple: a new connection, scheduled again.
    let (a, _, d) = lb.run(&seg(8000, SYN));
    assert_eq!(a, XDP_TX);
    assert_eq!(d[Stat::CtSynReuse as usize], 1);
    assert_eq!((0..3).map(|i| lb.conns(i + 1)).sum::<i64>(), 1);
    // RST on an open connection closes it; SYN|FIN opens nothing.
    lb.run(&seg(8000, RST));
    assert_eq!((0..3).map(|i| lb.conns(i + 1)).sum::<i64>(), 0);
    let (a, _, _) = lb.run(&seg(8100, SYN | FIN));
    assert_eq!(a, XDP_TX);
    assert_eq!((0..3).map(|i| lb.conns(i + 1)).sum::<i64>(), 0);
    // UDP flows count as open until a census says otherwise.
    let udp_frame = eth(ETH_IP, &[], &ipv4(CLIENT, VIP4, 17, &[], 0, &udp(9000, 53, b"q")));
    let (a, _, d) = lb.run(&udp_frame);
    assert_eq!((a, d[Stat::CtMiss as usize]), (XDP_TX, 1));
}

#[test]
fn rr_and_wrr_rotate_exactly() {
    let mut lb = Lb::new(Algo::RoundRobin, &[1, 1, 1], 0);
    let got: Vec<u8> = (0..9).map(|i| lb.to(&syn(CLIENT, 10000 + i))).collect();
    assert_eq!(got, [1, 2, 3, 1, 2, 3, 1, 2, 3]);
    // Established flows do not advance the rotation.
    lb.to(&seg(10000, ACK));
    assert_eq!(lb.to(&syn(CLIENT, 10100)), 1);

    let mut lb = Lb::new(Algo::RoundRobin, &[2, 1], 0);
    let got: Vec<u8> = (0..6).map(|i| lb.to(&syn(CLIENT, 11000 + i))).collect();
    assert_eq!(got, [1, 1, 2, 1, 1, 2]);

    let mut lb = Lb::new(Algo::WeightedRoundRobin, &[3, 1], 0);
    let got: Vec<u8> = (0..8).map(|i| lb.to(&syn(CLIENT, 12000 + i))).collect();
    assert_eq!(got, [1, 1, 2, 1, 1, 1, 2, 1]);

    // Reweighting changes the rotation for new flows only.
    let mut lb = Lb::new(Algo::WeightedRoundRobin, &[1, 1], 0);
    let first = lb.to(&syn(CLIENT, 13000));
    let v = lb.vip();
    lb.agent.set_weight(&v, v4(2), 0).expect("drain 2");
    let got: Vec<u8> = (1..5).map(|i| lb.to(&syn(CLIENT, 13000 + i))).collect();
    assert_eq!(got, [1, 1, 1, 1], "a drained backend gets no new flows");
    assert_eq!(lb.to(&seg(13000, ACK)), first, "but keeps its flows");
}

#[test]
fn random_and_maglev_follow_weights() {
    for algo in [Algo::Random, Algo::Maglev] {
        let mut lb = Lb::new(algo, &[1, 3], 0);
        let mut n = [0usize; 3];
        for i in 0..4000u16 {
            n[lb.to(&syn(Ipv4Addr::new(192, 0, 2, (i % 200) as u8), 20000 + i)) as usize] += 1;
        }
        let share = n[2] as f64 / 4000.0;
        assert!((0.70..=0.80).contains(&share), "{algo:?}: weight-3 backend got {share:.3}");
    }
}

#[test]
fn source_hash_keeps_a_client_and_persistence_survives_changes() {
    let mut lb = Lb::new(Algo::SourceHash, &[1, 1, 1], 0);
    let v = lb.vip();
    let mut used = std::collections::BTreeSet::new();
    for c in 1..=60u8 {
        let src = Ipv4Addr::new(192, 0, 2, c);
        let b = lb.to(&syn(src, 1000));
        for p in 1001..1010 {
            assert_eq!(lb.to(&syn(src, p)), b, "client {src} stays on one backend");
        }
        assert_eq!(b, lb.table_backend(&v, src_hash(&key(src, 0, &v)) % lb.agent.dp.opts.ring_size));
        used.insert(b);
    }
    assert_eq!(used.len(), 3, "clients spread over all backends");

    // With persistence, clients stay even when a new backend takes their slot.
    let mut lb = Lb::new(Algo::SourceHash, &[1, 1, 1], 300);
    let clients: Vec<Ipv4Addr> = (1..=120u8).map(|c| Ipv4Addr::new(192, 0, 2, c)).collect();
    let before: Vec<u8> = clients.iter().map(|c| lb.to(&syn(*c, 2000))).collect();
    let v = lb.vip();
    lb.agent.add_backend(&v, v4(4), Some(mac(4)), 3).expect("add");
    let ring = lb.agent.dp.opts.ring_size;
    let mut kept = 0;
    for (c, b) in clients.iter().zip(&before) {
        let now_hash = lb.table_backend(&v, src_hash(&key(*c, 0, &v)) % ring);
        let (a, out, d) = lb.run(&syn(*c, 2001));
        assert_eq!(a, XDP_TX);
        assert_eq!(out[5], *b, "client {c} persists on its backend");
        assert_eq!(d[Stat::PersistHit as usize], 1);
        if now_hash != *b {
            kept += 1;
        }
    }
    assert!(kept > 30, "the new backend would have taken {kept} clients without persistence");
}

#[test]
fn least_conn_sends_new_flows_to_the_least_loaded() {
    let mut lb = Lb::new(Algo::LeastConn, &[1, 1, 1], 0);
    let first: Vec<u8> = (0..3).map(|i| lb.to(&syn(CLIENT, 30000 + i))).collect();
    let mut sorted = first.clone();
    sorted.sort();
    assert_eq!(sorted, [1, 2, 3], "one new flow each while loads tie");
    // Close the flow on the backend that got the second one: it is now the
    // least loaded, so it gets the next flows until it catches up.
    let idle = first[1];
    lb.run(&seg(30001, FIN | ACK));
    assert_eq!(lb.conns(idle), 0);
    assert_eq!(lb.to(&syn(CLIENT, 30100)), idle);
    // Weights: loads follow weight 1 : 2 exactly.
    let mut lb = Lb::new(Algo::LeastConn, &[1, 2], 0);
    for i in 0..30 {
        lb.to(&syn(CLIENT, 31000 + i));
    }
    assert_eq!((lb.conns(1), lb.conns(2)), (10, 20));
    // A census of the table sets the counts from the entries themselves.
    let census = lb.agent.dp.conntrack_reader().expect("reader").census();
    assert_eq!(census.open.values().sum::<i64>(), 30, "30 open entries");
    assert_eq!(census.entries, 30);
    // Applying it keeps the counts (they were exact already).
    lb.agent.apply_census(&census).expect("census");
    assert_eq!((lb.conns(1), lb.conns(2)), (10, 20));

}
