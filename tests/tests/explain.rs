//! `xlb explain` against the loaded program (BPF_PROG_TEST_RUN): before and
//! after each frame, the explanation read from the maps names the backend
//! the program then sends the frame to (or its drop), through new flows,
//! connection-table hits after the table changed, SYN reuse, stale entries
//! (backend in maintenance), source-hash persistence and a VIP with no
//! backend. Needs root.

use lb_common::Stat;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use xlb::{
    agent::{Admin, Agent},
    config::{Mac, Vip},
    diag::explain::{explain, Client, Explanation, Via},
};
use xlb_tests::{
    frames::{eth, ipv4, ipv6, tcp, tcp_flags, udp, ETH_IP, ETH_IPV6},
    xdp::{assert_one_verdict, run, test_agent, XDP_DROP, XDP_TX},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const VIP4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);

fn vip(s: &str) -> Vip {
    s.parse().expect("test VIP")
}

fn mac(i: u8) -> Mac {
    Mac([0x02, 0, 0, 0, 1, i])
}

fn tcp_frame(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, flags: u8) -> Vec<u8> {
    eth(ETH_IP, &[], &ipv4(src, dst, 6, &[], 0, &tcp(sport, 80, flags, b"x")))
}

/// The backend id the program sent a frame to (by its rewritten MAC).
fn chosen(agent: &Agent, v: &Vip, out: &[u8]) -> u32 {
    let b = agent.vips()[v].backends.values().find(|b| b.mac.map(|m| m.0[..] == out[..6]).unwrap_or(false));
    b.unwrap_or_else(|| panic!("frame sent to {:02x?}, no backend of {v}", &out[..6])).id
}

fn ex(agent: &Agent, v: &Vip, client: &str) -> Explanation {
    explain(agent, v, &client.parse::<Client>().expect("client")).expect("explain")
}

/// Send a frame; the program forwards it to the backend `e` predicted for
/// it (`syn`: a pure SYN). Returns that backend id.
fn agrees(agent: &mut Agent, v: &Vip, e: &Explanation, frame: &[u8], syn: bool) -> u32 {
    let d = if syn { &e.syn } else { &e.next_packet };
    let (action, out, delta) = run(&mut agent.dp, frame);
    assert_eq!(action, XDP_TX, "{}: {:?}", e.client, d);
    assert_one_verdict(&delta, Stat::Forwarded, &e.client);
    let got = chosen(agent, v, &out);
    assert_eq!(d.backend_id, Some(got), "{}: explain said {:?}, the program chose {got}", e.client, d);
    got
}

#[test]
fn explain_names_the_backend_the_program_chooses() {
    let mut agent = test_agent();
    let v = vip("10.0.0.100:80/tcp");
    agent.add_vip(v, lb_common::Algo::Maglev, 0).expect("vip");
    for i in 1..=3u8 {
        agent.add_backend(&v, IpAddr::V4(Ipv4Addr::new(10, 0, 1, i)), Some(mac(i)), 1).expect("backend");
    }
    let ports: Vec<u16> = (2000..2060).collect();
    let mut first = std::collections::HashMap::new();
    // New flows: the table decides; then the entry does.
    for &p in &ports {
        let c = format!("{CLIENT}:{p}");
        let e = ex(&agent, &v, &c);
        assert!(e.conntrack_entry.is_none(), "{c}: no entry yet");
        assert_eq!(e.next_packet.via, Some(Via::Table), "{c}");
        assert_eq!(e.next_packet.backend_id, e.table_backend.as_ref().map(|b| b.id));
        let id = agrees(&mut agent, &v, &e, &tcp_frame(CLIENT, p, VIP4, tcp_flags::SYN), true);
        first.insert(p, id);
        let e = ex(&agent, &v, &c);
        let entry = e.conntrack_entry.as_ref().expect("an entry after the first packet");
        assert_eq!((entry.backend.id, entry.closed), (id, false));
        assert_eq!(e.next_packet.via, Some(Via::ConnectionTable));
        assert!(e.render_ok());
    }
    // A fourth backend changes the table: flows stay on their entries.
    agent.add_backend(&v, IpAddr::V4(Ipv4Addr::new(10, 0, 1, 4)), Some(mac(4)), 3).expect("backend 4");
    let mut moved_in_table = 0;
    for &p in &ports {
        let e = ex(&agent, &v, &format!("{CLIENT}:{p}"));
        if e.table_backend.as_ref().map(|b| b.id) != Some(first[&p]) {
            moved_in_table += 1;
        }
        assert_eq!(e.next_packet.via, Some(Via::ConnectionTable));
        let id = agrees(&mut agent, &v, &e, &tcp_frame(CLIENT, p, VIP4, tcp_flags::ACK), false);
        assert_eq!(id, first[&p], "established flows keep their backend");
    }
    assert!(moved_in_table > 10, "the new table moves flows ({moved_in_table} of {})", ports.len());
    // A pure SYN on a known 5-tuple is a new connection: the table decides.
    let mut resyn = 0;
    for &p in &ports[..20] {
        let e = ex(&agent, &v, &format!("{CLIENT}:{p}"));
        assert!(e.syn.why.contains("conntrack_syn_reuse"), "{}", e.syn.why);
        resyn += (agrees(&mut agent, &v, &e, &tcp_frame(CLIENT, p, VIP4, tcp_flags::SYN), true) != first[&p]) as u32;
    }
    assert!(resyn > 0, "some SYNs land elsewhere than their old entry");
    // Backend 1 into maintenance: its entries are stale, re-scheduled.
    let b1 = agent.vips()[&v].backends[&IpAddr::V4(Ipv4Addr::new(10, 0, 1, 1))].id;
    agent.set_backend(&v, IpAddr::V4(Ipv4Addr::new(10, 0, 1, 1)), None, Some(Admin::Maint), false).expect("maint");
    let mut stale = 0;
    for &p in &ports[20..] {
        let e = ex(&agent, &v, &format!("{CLIENT}:{p}"));
        if e.conntrack_entry.as_ref().map(|c| c.backend.id) == Some(b1) {
            stale += 1;
            assert!(e.next_packet.why.contains("conntrack_stale"), "{}", e.next_packet.why);
            assert_eq!(e.next_packet.via, Some(Via::Table));
        }
        let id = agrees(&mut agent, &v, &e, &tcp_frame(CLIENT, p, VIP4, tcp_flags::ACK), false);
        assert_ne!(id, b1);
    }
    assert!(stale > 0, "some flows were on backend 1");
}

#[test]
fn explain_says_when_the_answer_may_change() {
    let mut agent = test_agent();
    let v = vip("10.0.0.100:80/tcp");
    agent.add_vip(v, lb_common::Algo::Maglev, 0).expect("vip");
    for i in 1..=2u8 {
        agent.add_backend(&v, IpAddr::V4(Ipv4Addr::new(10, 0, 1, i)), Some(mac(i)), 1).expect("backend");
    }
    let c = "192.0.2.8:5000";
    let e = ex(&agent, &v, c);
    let id = agrees(&mut agent, &v, &e, &tcp_frame(Ipv4Addr::new(192, 0, 2, 8), 5000, VIP4, tcp_flags::SYN), true);
    let ip = agent.vips()[&v].backends.values().find(|b| b.id == id).expect("backend").ip;
    agent.set_backend(&v, ip, None, Some(Admin::Drain), false).expect("drain");
    let e = ex(&agent, &v, c);
    assert_eq!(e.next_packet.backend_id, Some(id), "a drained backend keeps its flow");
    assert!(e.may_change.iter().any(|m| m.contains("draining")), "{:?}", e.may_change);
    assert_ne!(e.syn.backend_id, Some(id), "a new connection goes elsewhere");
    agrees(&mut agent, &v, &e, &tcp_frame(Ipv4Addr::new(192, 0, 2, 8), 5000, VIP4, tcp_flags::ACK), false);
    // Slow start: a backend that comes up ramps, and explain says so.
    agent.set_slow_start(&v, 60_000).expect("slow start");
    agent.add_backend(&v, IpAddr::V4(Ipv4Addr::new(10, 0, 1, 3)), Some(mac(3)), 1).expect("backend 3");
    let e = ex(&agent, &v, "192.0.2.8:5001");
    assert!(e.may_change.iter().any(|m| m.contains("slow start")), "{:?}", e.may_change);
}

#[test]
fn explain_says_why_a_vip_without_backends_drops() {
    let mut agent = test_agent();
    let v = vip("10.0.0.200:80/tcp");
    agent.add_vip(v, lb_common::Algo::Maglev, 0).expect("vip");
    let e = ex(&agent, &v, "192.0.2.9:4000");
    assert_eq!(e.next_packet.verdict.as_deref(), Some(Stat::DropNoBackend.name()));
    assert!(e.may_change.iter().any(|m| m.contains("fail-open")), "{:?}", e.may_change);
    let (action, _, delta) = run(&mut agent.dp, &tcp_frame(Ipv4Addr::new(192, 0, 2, 9), 4000, Ipv4Addr::new(10, 0, 0, 200), tcp_flags::SYN));
    assert_eq!(action, XDP_DROP);
    assert_one_verdict(&delta, Stat::DropNoBackend, "no backend");
    // A port is needed for a 5-tuple algorithm; not for source-hash.
    assert!(explain(&agent, &v, &"192.0.2.9".parse().expect("client")).is_err());
}

#[test]
fn explain_follows_source_hash_persistence_and_ipv6() {
    let mut agent = test_agent();
    let v = vip("10.0.0.100:53/udp");
    agent.add_vip(v, lb_common::Algo::SourceHash, 60).expect("vip");
    for i in 1..=3u8 {
        agent.add_backend(&v, IpAddr::V4(Ipv4Addr::new(10, 0, 1, i)), Some(mac(i)), 1).expect("backend");
    }
    let udp_frame = |src: Ipv4Addr, sport: u16| eth(ETH_IP, &[], &ipv4(src, VIP4, 17, &[], 0, &udp(sport, 53, b"q")));
    let mut kept = Vec::new();
    for n in 1..=12u8 {
        let client = Ipv4Addr::new(198, 51, 100, n);
        let e = ex(&agent, &v, &client.to_string());
        assert!(e.persistence.is_none() && e.conntrack_set.is_none());
        assert_eq!(e.next_packet.via, Some(Via::Table));
        let id = agrees(&mut agent, &v, &e, &udp_frame(client, 5000), false);
        let e = ex(&agent, &v, &client.to_string());
        assert_eq!(e.persistence.as_ref().map(|p| p.backend.id), Some(id));
        assert_eq!(e.next_packet.via, Some(Via::Persistence));
        kept.push((client, id));
    }
    // The table changes; clients keep their persisted backend for new flows.
    agent.add_backend(&v, IpAddr::V4(Ipv4Addr::new(10, 0, 1, 4)), Some(mac(4)), 5).expect("backend 4");
    let mut differs = 0;
    for (client, id) in kept {
        let e = ex(&agent, &v, &format!("{client}:6000"));
        assert!(e.conntrack_entry.is_none());
        assert_eq!((e.next_packet.via, e.next_packet.backend_id), (Some(Via::Persistence), Some(id)));
        differs += (e.table_backend.as_ref().map(|b| b.id) != Some(id)) as u32;
        agrees(&mut agent, &v, &e, &udp_frame(client, 6000), false);
    }
    assert!(differs > 0, "the new table would send some clients elsewhere");

    // IPv6, Maglev.
    let v6 = vip("[fd00::100]:443/tcp");
    agent.add_vip(v6, lb_common::Algo::Maglev, 0).expect("vip6");
    for i in 1..=2u8 {
        agent.add_backend(&v6, format!("fd00::1:{i}").parse().expect("ip"), Some(mac(10 + i)), 1).expect("backend6");
    }
    let c6: Ipv6Addr = "fd00::2:7".parse().expect("ip");
    let d6: Ipv6Addr = "fd00::100".parse().expect("ip");
    for p in 3000..3010u16 {
        let e = ex(&agent, &v6, &format!("[{c6}]:{p}"));
        let frame = eth(ETH_IPV6, &[], &ipv6(c6, d6, 6, &tcp(p, 443, tcp_flags::SYN, b"")));
        let id = agrees(&mut agent, &v6, &e, &frame, true);
        let e = ex(&agent, &v6, &format!("[{c6}]:{p}"));
        assert_eq!(e.conntrack_entry.map(|c| c.backend.id), Some(id));
    }
}

trait RenderOk {
    fn render_ok(&self) -> bool;
}

impl RenderOk for Explanation {
    /// The text form names the decision and the entry.
    fn render_ok(&self) -> bool {
        let t = xlb::diag::explain::render(self);
        t.contains("next      →") && t.contains("conntrack set") && t.contains("way")
    }
}

/// The backend id of any VIP the program sent a frame to (by its MAC).
fn chosen_any(agent: &Agent, out: &[u8]) -> (Vip, u32) {
    for (v, s) in agent.vips() {
        if let Some(b) = s.backends.values().find(|b| b.mac.is_some_and(|m| m.0[..] == out[..6])) {
            return (*v, b.id);
        }
    }
    panic!("frame sent to {:02x?}, no backend of any VIP", &out[..6])
}

/// The VIP that serves a destination, and how the lookup found it.
type Served = (&'static str, xlb::diag::explain::Lookup);

#[test]
fn explain_finds_any_port_and_prefix_vips_as_the_program_does() {
    let mut agent = test_agent();
    let mut n = 0u8;
    for (v, backends) in [
        ("10.0.0.60:*/tcp", 3),
        ("10.0.0.60:443/tcp", 1),
        ("10.1.0.0/16:443/tcp", 2),
        ("10.1.2.0/24:*/tcp", 3),
        ("10.1.2.7:443/tcp", 1),
        ("[fd00:1::]/64:*/tcp", 2),
    ] {
        let v = vip(v);
        agent.add_vip(v, lb_common::Algo::Maglev, 0).expect("vip");
        for _ in 0..backends {
            n += 1;
            let ip: IpAddr = if v.addr.is_ipv4() { Ipv4Addr::new(10, 0, 7, n).into() } else { format!("fd00::7:{n}").parse().expect("ip") };
            agent.add_backend(&v, ip, Some(mac(n)), 1).expect("backend");
        }
    }
    let a = |x: u8, y: u8| IpAddr::V4(Ipv4Addr::new(10, 1, x, y));
    let c6: Ipv6Addr = "fd00::2:7".parse().expect("ip");
    // (destination, port, the VIP that serves it and how; None: not VIP traffic)
    let cases: Vec<(IpAddr, u16, Option<Served>)> = {
        use xlb::diag::explain::Lookup::*;
        vec![
            (IpAddr::V4(Ipv4Addr::new(10, 0, 0, 60)), 443, Some(("10.0.0.60:443/tcp", Exact))),
            (IpAddr::V4(Ipv4Addr::new(10, 0, 0, 60)), 8080, Some(("10.0.0.60:*/tcp", AnyPort))),
            (IpAddr::V4(Ipv4Addr::new(10, 0, 0, 60)), 22, Some(("10.0.0.60:*/tcp", AnyPort))),
            (a(5, 5), 443, Some(("10.1.0.0/16:443/tcp", Prefix))),
            (a(2, 9), 443, Some(("10.1.0.0/16:443/tcp", Prefix))),
            (a(2, 9), 8080, Some(("10.1.2.0/24:*/tcp", Prefix))),
            (a(2, 7), 443, Some(("10.1.2.7:443/tcp", Exact))),
            (a(2, 7), 22, Some(("10.1.2.0/24:*/tcp", Prefix))),
            ("fd00:1::9".parse().expect("ip"), 80, Some(("[fd00:1::]/64:*/tcp", Prefix))),
            ("fd00:1::ab".parse().expect("ip"), 5000, Some(("[fd00:1::]/64:*/tcp", Prefix))),
            (a(5, 5), 8080, None),
            (IpAddr::V4(Ipv4Addr::new(10, 2, 0, 1)), 443, None),
        ]
    };
    for (dst, dport, want) in cases {
        let dest = vip(&match dst {
            IpAddr::V4(d) => format!("{d}:{dport}/tcp"),
            IpAddr::V6(d) => format!("[{d}]:{dport}/tcp"),
        });
        let mut ids = std::collections::BTreeSet::new();
        for sport in 4000..4024u16 {
            let (client, frame) = match dst {
                IpAddr::V4(d) => (format!("{CLIENT}:{sport}"), eth(ETH_IP, &[], &ipv4(CLIENT, d, 6, &[], 0, &tcp(sport, dport, tcp_flags::SYN, b"")))),
                IpAddr::V6(d) => (format!("[{c6}]:{sport}"), eth(ETH_IPV6, &[], &ipv6(c6, d, 6, &tcp(sport, dport, tcp_flags::SYN, b"")))),
            };
            let e = ex(&agent, &dest, &client);
            let what = format!("{client} → {dest}");
            let Some((served, lookup)) = want else {
                assert_eq!((e.served_by.as_deref(), e.next_packet.verdict.as_deref()), (None, Some(Stat::PassNotVip.name())), "{what}");
                let (action, _, delta) = run(&mut agent.dp, &frame);
                assert_eq!(action, xlb_tests::xdp::XDP_PASS, "{what}");
                assert_one_verdict(&delta, Stat::PassNotVip, &what);
                continue;
            };
            assert_eq!((e.served_by.as_deref(), e.lookup), (Some(served), Some(lookup)), "{what}");
            assert_eq!(e.syn.via, Some(Via::Table), "{what}: a new flow");
            let (action, out, delta) = run(&mut agent.dp, &frame);
            assert_eq!(action, XDP_TX, "{what}");
            assert_one_verdict(&delta, Stat::Forwarded, &what);
            let (by, id) = chosen_any(&agent, &out);
            assert_eq!(by.to_string(), served, "{what}: the program used the VIP explain named");
            assert_eq!(e.syn.backend_id, Some(id), "{what}: explain said {:?}, the program chose {id}", e.syn);
            ids.insert(id);
            // The entry the frame made is the one explain reads for the flow
            // (keyed by the real address and port, not the VIP's form).
            let e = ex(&agent, &dest, &client);
            assert_eq!(e.conntrack_entry.as_ref().map(|c| c.backend.id), Some(id), "{what}: entry");
            assert_eq!(e.next_packet.via, Some(Via::ConnectionTable), "{what}");
            assert!(xlb::diag::explain::render(&e).contains(&format!("vip       {served}: ")), "{what}");
        }
        if let Some((served, _)) = want {
            let size = agent.vips()[&vip(served)].backends.len();
            assert_eq!(ids.len(), size, "{dest}: 24 flows reach every backend of {served}");
        }
    }
    // The VIP forms themselves are not one flow's destination.
    for form in ["10.1.2.0/24:*/tcp", "10.0.0.60:*/tcp", "10.1.0.0/16:443/tcp"] {
        let err = explain(&agent, &vip(form), &"192.0.2.7:4000".parse().expect("client")).expect_err(form).to_string();
        assert!(err.contains("give the flow's destination") && !err.contains('\n'), "{form}: {err}");
    }
}
