//! The compiled XDP program, loaded into the kernel (verifier included) and
//! driven with crafted frames through BPF_PROG_TEST_RUN. The maps are
//! populated by the real agent code (health checks off), and every expected
//! backend is predicted from the agent's own Maglev table and the shared
//! flow hash, so the datapath and the control plane are checked against
//! each other. Needs root.

use lb_common::{hash::flow_hash, stats::verdicts, FlowKey, Stat};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use xlb::{
    agent::Agent,
    config::{Mac, Vip},
};
use xlb_tests::{
    frames::{self, eth, ipv4, ipv6, tcp, tcp4, udp4, ETH_8021AD, ETH_8021Q, ETH_ARP, ETH_IP, ETH_IPV6, LB_MAC},
    xdp::{assert_one_verdict, test_agent, XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const VIP4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 2, 0, 0, 0, 7);

fn backend_mac(i: u8) -> Mac {
    Mac([0x02, 0, 0, 0, 1, i])
}

struct Fixture {
    agent: Agent,
}

fn vip(s: &str) -> Vip {
    s.parse().expect("test VIP")
}

impl Fixture {
    /// VIPs: 10.0.0.100:80/tcp and :53/udp with 3 backends each, the IPv6
    /// VIP [fd00::100]:80/tcp with 2, and 10.0.0.200:80/tcp with none.
    fn new() -> Fixture {
        let mut agent = test_agent();
        for v in ["10.0.0.100:80/tcp", "10.0.0.100:53/udp"] {
            agent.add_vip(vip(v), lb_common::Algo::Maglev, 0).expect("add vip");
            for i in 1..=3u8 {
                let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 1, i));
                agent.add_backend(&vip(v), ip, Some(backend_mac(i)), 1).expect("add backend");
            }
        }
        let v6 = vip("[fd00::100]:80/tcp");
        agent.add_vip(v6, lb_common::Algo::Maglev, 0).expect("add vip6");
        for i in 1..=2u8 {
            let ip: IpAddr = format!("fd00::1:{i}").parse().expect("ip");
            agent.add_backend(&v6, ip, Some(backend_mac(10 + i)), 1).expect("add backend6");
        }
        agent.add_vip(vip("10.0.0.200:80/tcp"), lb_common::Algo::Maglev, 0).expect("empty vip");
        Fixture { agent }
    }

    /// Run one frame; returns the action and the frame as the program left it.
    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let (a, out, _) = self.run_counted(frame);
        (a, out)
    }

    /// Run a frame and return (action, output, per-counter deltas).
    fn run_counted(&mut self, frame: &[u8]) -> (u32, Vec<u8>, Vec<i64>) {
        xlb_tests::xdp::run(&mut self.agent.dp, frame)
    }

    /// The MAC the agent's published table predicts for a flow.
    fn predicted_mac(&self, key: &FlowKey, v: &Vip) -> [u8; 6] {
        let state = &self.agent.vips()[v];
        let id = state.table[(flow_hash(key) % state.table.len() as u32) as usize];
        let b = state.backends.values().find(|b| b.id == id).expect("table names a backend of the VIP");
        b.mac.expect("mac").0
    }
}

fn key4(src: Ipv4Addr, sport: u16, v: &Vip) -> FlowKey {
    let mut k = FlowKey { src: [0; 16], sport_be: sport.to_be(), _pad: 0, vip: v.key() };
    k.src[..4].copy_from_slice(&src.octets());
    k
}

#[test]
fn vip_traffic_goes_to_the_maglev_backend_with_both_macs_rewritten() {
    let mut f = Fixture::new();
    for (v, mk) in [
        (vip("10.0.0.100:80/tcp"), tcp4 as fn(Ipv4Addr, u16, Ipv4Addr, u16) -> Vec<u8>),
        (vip("10.0.0.100:53/udp"), udp4),
    ] {
        let mut per_backend = std::collections::BTreeMap::<[u8; 6], usize>::new();
        for sport in 1000..1600u16 {
            let frame = mk(CLIENT, sport, VIP4, v.port);
            let (action, out, d) = f.run_counted(&frame);
            assert_eq!(action, XDP_TX, "{v} sport {sport}");
            let want = f.predicted_mac(&key4(CLIENT, sport, &v), &v);
            assert_eq!(&out[0..6], &want, "{v} sport {sport}: destination MAC");
            assert_eq!(&out[6..12], &LB_MAC, "source MAC is the balancer's");
            assert_eq!(&out[12..], &frame[12..], "nothing after the MACs changes");
            assert_one_verdict(&d, Stat::Forwarded, "VIP hit");
            assert_eq!(d[Stat::CtMiss as usize], 1, "first packet of a flow misses the table");
            *per_backend.entry(want).or_default() += 1;
            // The flow's next packet is a connection-table hit, same backend.
            let (action, out, d) = f.run_counted(&frame);
            assert_eq!((action, &out[0..6]), (XDP_TX, &want[..]));
            assert_eq!(d[Stat::CtHit as usize], 1);
        }
        assert_eq!(per_backend.len(), 3, "{v}: all backends used");
        for (mac, n) in &per_backend {
            assert!((120..=280).contains(n), "{v}: backend {mac:02x?} got {n} of 600 flows");
        }
    }
    // Per-VIP and per-backend counters saw the packets.
    let st = f.agent.status().expect("status");
    let tcp_vip = st.vips.iter().find(|v| v.vip == "10.0.0.100:80/tcp").expect("vip");
    assert_eq!(tcp_vip.packets, 1200);
    assert_eq!(tcp_vip.new_flows, 600);
    assert_eq!(tcp_vip.backends.iter().map(|b| b.packets).sum::<u64>(), 1200);
}

#[test]
fn ipv6_and_vlan_tagged_vip_traffic_is_balanced_and_tags_kept() {
    let mut f = Fixture::new();
    let v6 = vip("[fd00::100]:80/tcp");
    for sport in 2000..2100u16 {
        let frame = eth(ETH_IPV6, &[], &ipv6(CLIENT6, VIP6, 6, &tcp(sport, 80, frames::tcp_flags::SYN, b"x")));
        let (action, out) = f.run(&frame);
        assert_eq!(action, XDP_TX);
        let k = FlowKey { src: CLIENT6.octets(), sport_be: sport.to_be(), _pad: 0, vip: v6.key() };
        assert_eq!(&out[0..6], &f.predicted_mac(&k, &v6));
        assert_eq!(&out[12..], &frame[12..]);
    }
    let v = vip("10.0.0.100:80/tcp");
    for tags in [vec![(ETH_8021Q, 42u16)], vec![(ETH_8021AD, 100), (ETH_8021Q, 42)]] {
        let frame = eth(ETH_IP, &tags, &ipv4(CLIENT, VIP4, 6, &[], 0, &tcp(3333, 80, 0x10, b"y")));
        let (action, out) = f.run(&frame);
        assert_eq!(action, XDP_TX, "tags {tags:?}");
        assert_eq!(&out[0..6], &f.predicted_mac(&key4(CLIENT, 3333, &v), &v));
        assert_eq!(&out[12..], &frame[12..], "tags and packet unchanged");
    }
    // IPv4 options (IHL 8) are skipped to find the ports.
    let frame = eth(ETH_IP, &[], &ipv4(CLIENT, VIP4, 6, &[1; 12], 0, &tcp(4444, 80, 0x10, b"z")));
    let (action, out) = f.run(&frame);
    assert_eq!(action, XDP_TX);
    assert_eq!(&out[0..6], &f.predicted_mac(&key4(CLIENT, 4444, &v), &v));
}

#[test]
fn traffic_not_for_a_vip_passes_byte_identical() {
    let mut f = Fixture::new();
    let cases: Vec<(&str, Vec<u8>, Stat)> = vec![
        ("other address", tcp4(CLIENT, 1000, Ipv4Addr::new(10, 0, 0, 101), 80), Stat::PassNotVip),
        ("other port", tcp4(CLIENT, 1000, VIP4, 8080), Stat::PassNotVip),
        ("UDP to a TCP-only port", udp4(CLIENT, 1000, VIP4, 80), Stat::PassNotVip),
        ("ARP", eth(ETH_ARP, &[], &[0u8; 28]), Stat::PassNotIp),
        ("IPv6 not a VIP", eth(ETH_IPV6, &[], &ipv6(CLIENT6, Ipv6Addr::LOCALHOST, 6, &tcp(1, 80, 2, b""))), Stat::PassNotVip),
        ("3 VLAN tags", eth(ETH_IP, &[(ETH_8021AD, 1), (ETH_8021Q, 2), (ETH_8021Q, 3)], &ipv4(CLIENT, VIP4, 6, &[], 0, &tcp(1, 80, 2, b""))), Stat::PassNotIp),
        ("IPv4 fragment, not a VIP address", eth(ETH_IP, &[], &ipv4(CLIENT, Ipv4Addr::new(10, 0, 0, 9), 6, &[], 0x2000, &tcp(1, 80, 2, b""))), Stat::PassNotVip),
        ("IPv4 UDP fragment to a TCP-only VIP address", eth(ETH_IP, &[], &ipv4(CLIENT, Ipv4Addr::new(10, 0, 0, 200), 17, &[], 0x0010, &[0u8; 24])), Stat::PassNotVip),
        ("IPv6 fragment, not a VIP address", eth(ETH_IPV6, &[], &ipv6(CLIENT6, Ipv6Addr::LOCALHOST, 44, &[6, 0, 0, 1, 0, 0, 0, 1, 0, 80, 0, 80])), Stat::PassNotVip),
        ("ICMP echo to the VIP", eth(ETH_IP, &[], &ipv4(CLIENT, VIP4, 1, &[], 0, &[8, 0, 0, 0, 0, 1, 0, 1])), Stat::PassOtherL4),
    ];
    for (what, frame, stat) in cases {
        let (action, out, d) = f.run_counted(&frame);
        assert_eq!(action, XDP_PASS, "{what}");
        assert_eq!(out, frame, "{what}: frame untouched");
        assert_one_verdict(&d, stat, what);
    }
}

#[test]
fn malformed_headers_pass_with_a_reason() {
    let mut f = Fixture::new();
    let good = ipv4(CLIENT, VIP4, 6, &[], 0, &tcp(5555, 80, 2, b"hi"));
    let mut cases = Vec::new();
    let mut ihl4 = good.clone();
    ihl4[0] = 0x44;
    cases.push(("IHL 4", ihl4));
    let mut v5 = good.clone();
    v5[0] = 0x55;
    cases.push(("IP version 5", v5));
    let mut short_total = good.clone();
    short_total[2..4].copy_from_slice(&30u16.to_be_bytes());
    cases.push(("total length below headers", short_total));
    let mut ihl15 = good.clone();
    ihl15[0] = 0x4f; // claims 60 bytes of header: the ports are then past the frame's end
    cases.push(("IHL 15 beyond the frame", ihl15));
    for (what, l3) in cases {
        let frame = eth(ETH_IP, &[], &l3);
        let (action, out, d) = f.run_counted(&frame);
        assert_eq!(action, XDP_PASS, "{what}");
        assert_eq!(out, frame);
        let moved: Vec<&str> = verdicts().filter(|s| d[*s as usize] == 1).map(|s| s.name()).collect();
        assert!(
            moved == ["pass_bad_header"] || moved == ["pass_truncated"],
            "{what}: counted as {moved:?}"
        );
    }
}

#[test]
fn frames_truncated_at_every_offset_never_abort() {
    let mut f = Fixture::new();
    let frames: Vec<(&str, Vec<u8>, usize)> = vec![
        // (name, full frame, bytes needed before xlb can forward it)
        ("tcp4", tcp4(CLIENT, 7000, VIP4, 80), 14 + 20 + 20),
        ("udp4", udp4(CLIENT, 7000, VIP4, 53), 14 + 20 + 8),
        ("vlan tcp4", eth(ETH_IP, &[(ETH_8021Q, 7)], &ipv4(CLIENT, VIP4, 6, &[], 0, &tcp(7000, 80, 2, b"abc"))), 18 + 20 + 20),
        ("qinq tcp4", eth(ETH_IP, &[(ETH_8021AD, 1), (ETH_8021Q, 7)], &ipv4(CLIENT, VIP4, 6, &[], 0, &tcp(7000, 80, 2, b"abc"))), 22 + 20 + 20),
        ("tcp4 with options", eth(ETH_IP, &[], &ipv4(CLIENT, VIP4, 6, &[7; 8], 0, &tcp(7000, 80, 2, b"abc"))), 14 + 28 + 20),
        ("tcp6", eth(ETH_IPV6, &[], &ipv6(CLIENT6, VIP6, 6, &tcp(7000, 80, 2, b"abc"))), 14 + 40 + 20),
    ];
    for (name, full, needed) in frames {
        // BPF_PROG_TEST_RUN refuses XDP input shorter than an Ethernet header,
        // so 14 bytes is the shortest frame the program can ever see.
        for len in 14..=full.len() {
            let frame = &full[..len];
            let (action, out, d) = f.run_counted(frame);
            assert_ne!(action, XDP_ABORTED, "{name} cut at {len}");
            if len < needed {
                assert_eq!(action, XDP_PASS, "{name} cut at {len}");
                assert_eq!(out, frame, "{name} cut at {len}: untouched");
                assert_one_verdict(&d, Stat::PassTruncated, &format!("{name} cut at {len}"));
            } else {
                assert_eq!(action, XDP_TX, "{name} cut at {len} still has every header");
                assert_one_verdict(&d, Stat::Forwarded, name);
            }
        }
    }
}

#[test]
fn vip_without_backends_drops_and_counts() {
    let mut f = Fixture::new();
    let frame = tcp4(CLIENT, 1234, Ipv4Addr::new(10, 0, 0, 200), 80);
    let (action, _, d) = f.run_counted(&frame);
    assert_eq!(action, XDP_DROP);
    assert_one_verdict(&d, Stat::DropNoBackend, "no backend");
    // Deleting the VIP hands its traffic back to the kernel.
    f.agent.del_vip(&vip("10.0.0.200:80/tcp")).expect("del");
    let (action, _, d) = f.run_counted(&frame);
    assert_eq!(action, XDP_PASS);
    assert_one_verdict(&d, Stat::PassNotVip, "deleted VIP");
}

#[test]
fn connection_table_keeps_flows_across_changes_and_moves_a_dead_backends_flows() {
    let mut f = Fixture::new();
    let v = vip("10.0.0.100:80/tcp");
    let flows: Vec<u16> = (20000..20400).collect();
    let mut pinned = Vec::new();
    for &sport in &flows {
        let (a, out) = f.run(&tcp4(CLIENT, sport, VIP4, 80));
        assert_eq!(a, XDP_TX);
        pinned.push(<[u8; 6]>::try_from(&out[0..6]).expect("mac"));
    }
    // A fourth backend changes the Maglev table…
    f.agent.add_backend(&v, IpAddr::V4(Ipv4Addr::new(10, 0, 1, 4)), Some(backend_mac(4)), 1).expect("add");
    let remapped = flows.iter().zip(&pinned).filter(|(s, m)| f.predicted_mac(&key4(CLIENT, **s, &v), &v) != **m).count();
    assert!(remapped > 40, "the new table should move about a quarter of the flows, moved {remapped}");
    // …but established flows stay where they were.
    for (sport, mac) in flows.iter().zip(&pinned) {
        let (a, out, d) = f.run_counted(&tcp4(CLIENT, *sport, VIP4, 80));
        assert_eq!((a, &out[0..6]), (XDP_TX, &mac[..]), "flow {sport} stays on its backend");
        assert_eq!(d[Stat::CtHit as usize], 1);
    }
    // Backend 10.0.1.2 is removed (dead): its flows move, counted as stale.
    let gone = backend_mac(2).0;
    f.agent.del_backend(&v, IpAddr::V4(Ipv4Addr::new(10, 0, 1, 2))).expect("del");
    let mut moved = 0;
    for (sport, mac) in flows.iter().zip(&pinned) {
        let (a, out, d) = f.run_counted(&tcp4(CLIENT, *sport, VIP4, 80));
        assert_eq!(a, XDP_TX);
        assert_ne!(&out[0..6], &gone[..], "nothing goes to the removed backend");
        if *mac == gone {
            moved += 1;
            assert_eq!(d[Stat::CtStale as usize], 1);
            assert_eq!(&out[0..6], &f.predicted_mac(&key4(CLIENT, *sport, &v), &v));
        } else {
            assert_eq!(&out[0..6], &mac[..], "other flows stay");
        }
    }
    assert!(moved > 50, "backend 2 owned {moved} flows");
}

#[test]
fn tables_are_published_by_switching_table_slots() {
    // Every reconcile writes the new table to another slot and then points
    // the VIP at it: the slot in use changes, and the replaced one is not
    // written again before a grace period (after one, the pool may reuse it:
    // s3 may be s1 again when the janitor's grace period ended in between).
    let mut f = Fixture::new();
    let v = vip("10.0.0.100:80/tcp");
    let slot = |f: &Fixture| f.agent.vips()[&v].table_slot.expect("published");
    let s1 = slot(&f);
    let id1 = f.agent.dp.table_id(s1).expect("id").expect("a table in s1");
    f.agent.add_backend(&v, IpAddr::V4(Ipv4Addr::new(10, 0, 1, 9)), Some(backend_mac(9)), 3).expect("add");
    let s2 = slot(&f);
    let id2 = f.agent.dp.table_id(s2).expect("id").expect("a table in s2");
    let table2 = f.agent.vips()[&v].table.clone();
    f.agent.del_backend(&v, IpAddr::V4(Ipv4Addr::new(10, 0, 1, 9))).expect("del");
    let s3 = slot(&f);
    assert!(s1 != s2 && s2 != s3, "slots {s1} {s2} {s3}");
    // The published table is what the datapath reads.
    let ring_size = f.agent.dp.opts.ring_size;
    let table = f.agent.vips()[&v].table.clone();
    for i in [0u32, 1, 777, ring_size - 1] {
        assert_eq!(f.agent.dp.table_entry(s3, i).expect("table"), table[i as usize]);
    }
    // The replaced table cools in its slot, untouched (a program that read
    // the VIP entry just before the switch may still be reading it).
    assert_eq!(f.agent.dp.table_id(s2).expect("id"), Some(id2), "the replaced table stays in its slot");
    if s3 != s1 {
        assert_eq!(f.agent.dp.table_id(s1).expect("id"), Some(id1), "the first replaced table too");
    }
    let differ = (0..ring_size).filter(|i| table2[*i as usize] != table[*i as usize]).count();
    assert!(differ > 1000, "backend 9 owned {differ} entries of the replaced table");
    for i in (0..ring_size).step_by(97) {
        assert_eq!(f.agent.dp.table_entry(s2, i).expect("table"), table2[i as usize], "entry {i} of the replaced table");
    }
    // After a grace period replaced tables are written again: steady
    // publications create no map.
    f.agent.dp.settle_tables().expect("settle");
    let (occupied, _, _, created) = f.agent.dp.table_counts();
    let mut slots = std::collections::BTreeSet::new();
    for w in 2..12u32 {
        f.agent.set_weight(&v, IpAddr::V4(Ipv4Addr::new(10, 0, 1, 1)), w).expect("weight");
        slots.insert(slot(&f));
        f.agent.dp.settle_tables().expect("settle");
    }
    let (occupied2, _, _, created2) = f.agent.dp.table_counts();
    assert_eq!(created2, created, "ten publications, each after a grace period, reuse the replaced tables");
    assert!(occupied2 <= occupied, "{occupied2} slots hold a table, {occupied} before");
    assert!(slots.len() > 1, "publications still switch slots: {slots:?}");
}

#[test]
fn verifier_work_stays_well_under_its_limit() {
    // The kernel gives up at 1M processed instructions; keep a wide margin so
    // a datapath change that explodes verification fails here, clearly.
    let mut f = Fixture::new();
    let n = f.agent.dp.verified_insns().expect("kernel reports verified instructions");
    eprintln!("verifier processed {n} instructions");
    assert!(n < 500_000, "verifier processed {n} instructions");
}

#[test]
fn only_frames_addressed_to_the_interface_or_an_accepted_mac_are_balanced() {
    let mut f = Fixture::new();
    let v = vip("10.0.0.100:80/tcp");
    let with_dst = |dst: [u8; 6], sport: u16| {
        let mut frame = tcp4(CLIENT, sport, VIP4, v.port);
        frame[0..6].copy_from_slice(&dst);
        frame
    };
    let vrrp_mac = [0x00, 0x00, 0x5e, 0x00, 0x01, 0x07];
    // Flooded unknown unicast, broadcast, multicast and a VRRP MAC not
    // (yet) accepted: passed to the kernel untouched, no table entry.
    for (i, dst) in [[0x02, 0, 0, 0, 0, 0x99], [0xff; 6], [0x01, 0x00, 0x5e, 0, 0, 1], vrrp_mac].into_iter().enumerate() {
        let frame = with_dst(dst, 3000 + i as u16);
        let (action, out, d) = f.run_counted(&frame);
        assert_eq!(action, XDP_PASS, "dst {dst:02x?}");
        assert_eq!(out, frame, "dst {dst:02x?}: frame untouched");
        assert_one_verdict(&d, Stat::PassOtherMac, "frame for another MAC");
        assert_eq!(d[Stat::CtMiss as usize] + d[Stat::CtHit as usize], 0, "no table lookup");
    }
    // Non-VIP traffic to another MAC keeps its own verdict (the check costs
    // nothing before the VIP pre-filter).
    let mut other = tcp4(CLIENT, 3100, Ipv4Addr::new(10, 0, 0, 99), 80);
    other[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    let (_, _, d) = f.run_counted(&other);
    assert_one_verdict(&d, Stat::PassNotVip, "non-VIP frame for another MAC");

    // The interface's own MAC and, once accepted, the VRRP MAC: balanced,
    // to the backend the agent's table predicts.
    f.agent.dp.set_accepted_macs(&[LB_MAC, vrrp_mac]).expect("accept the VRRP MAC");
    for (i, dst) in [LB_MAC, vrrp_mac].into_iter().enumerate() {
        let sport = 3200 + i as u16;
        let (action, out, d) = f.run_counted(&with_dst(dst, sport));
        assert_eq!(action, XDP_TX, "dst {dst:02x?}");
        assert_eq!(&out[0..6], &f.predicted_mac(&key4(CLIENT, sport, &v), &v));
        assert_one_verdict(&d, Stat::Forwarded, "frame for an accepted MAC");
    }
    // Bad lists are refused with one line and change nothing.
    for bad in [vec![[0x01, 0, 0x5e, 0, 0, 1]], vec![[0; 6]], vec![LB_MAC; 9], vec![]] {
        let e = f.agent.dp.set_accepted_macs(&bad).expect_err("refused");
        assert!(!e.to_string().contains('\n'), "{e}");
    }
    let (action, _, _) = f.run_counted(&with_dst(vrrp_mac, 3300));
    assert_eq!(action, XDP_TX, "the accepted list is unchanged after refusals");
}

/// Every change of a VIP's table reaches the very next new flow, on both
/// new-flow paths: SYNs (the VIP and the algorithm before the connection
/// table's set) and other packets of unknown flows (the set first), after
/// a new table, a weighted table and the VIP's deletion.
#[test]
fn vip_changes_reach_the_next_new_flow() {
    let mut f = Fixture::new();
    let v = vip("10.0.0.100:80/tcp");
    let syn = |sport: u16| eth(ETH_IP, &[], &ipv4(CLIENT, VIP4, 6, &[], 0, &tcp(sport, 80, frames::tcp_flags::SYN, b"")));
    let check = |f: &mut Fixture, ports: std::ops::Range<u16>, what: &str| {
        for sport in ports {
            let other = sport + 10_000;
            for (frame, port) in [(syn(sport), sport), (tcp4(CLIENT, other, VIP4, 80), other)] {
                let (a, out, d) = f.run_counted(&frame);
                assert_eq!(a, XDP_TX, "{what}: sport {port}");
                assert_eq!(d[Stat::CtMiss as usize], 1, "{what}: a new flow");
                assert_eq!(&out[0..6], &f.predicted_mac(&key4(CLIENT, port, &v), &v), "{what}: sport {port} on the current table");
            }
        }
    };
    check(&mut f, 30000..30200, "first table");
    // A fourth backend: a new table in another ring slot.
    f.agent.add_backend(&v, IpAddr::V4(Ipv4Addr::new(10, 0, 1, 4)), Some(backend_mac(4)), 1).expect("add");
    check(&mut f, 31000..31200, "after a backend was added");
    // Weights change the table again.
    f.agent.add_backend(&v, IpAddr::V4(Ipv4Addr::new(10, 0, 1, 5)), Some(backend_mac(5)), 5).expect("add weighted");
    check(&mut f, 32000..32200, "after a weighted backend was added");
    // Deleted: its new flows are the kernel's at once.
    f.agent.del_vip(&v).expect("del");
    for sport in 33000..33050u16 {
        let (a, _, d) = f.run_counted(&syn(sport));
        assert_eq!(a, XDP_PASS, "deleted VIP, sport {sport}");
        assert_one_verdict(&d, Stat::PassNotVip, "deleted VIP");
    }
}
