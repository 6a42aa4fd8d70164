//! VIP forms through BPF_PROG_TEST_RUN on the loaded program: any-port
//! VIPs (`ADDR:*/PROTO`), destination-port hashing and ICMP echo answered
//! by the datapath. Fixture tables: frame in → verdict, frame out. Every
//! expected backend is predicted from the agent's published table and the
//! shared hash (`lb_common::hash::maglev_hash`). Needs root.

use lb_common::{hash::maglev_hash, FlowKey, Stat};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use xlb::{
    agent::{Agent, VipSpec},
    config::{HashMode, Mac, Vip, VipOpts},
};
use xlb_tests::{
    frames::{self, eth, icmp6_echo, icmp_echo, ipv4, ipv6, tcp, tcp4, udp4, CLIENT_MAC, ETH_IP, ETH_IPV6, LB_MAC},
    xdp::{assert_one_verdict, test_agent, XDP_PASS, XDP_TX},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 9);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 2, 0, 0, 0, 9);
/// Any-port VIP (3 backends) and an exact VIP of port 443 (1 backend).
const ANY4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 60);
/// Exact VIP only (port 80): other ports are not VIP traffic.
const EXACT4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 61);
/// Any-port VIP with `--hash dst-port`.
const DPORT4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 62);
/// Answers pings.
const PING4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 63);
const ANY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x60);
const PING6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x63);

fn vip(s: &str) -> Vip {
    s.parse().expect("test VIP")
}

fn mac(i: u8) -> Mac {
    Mac([0x02, 0, 0, 0, 6, i])
}

struct Lb {
    agent: Agent,
}

impl Lb {
    fn new() -> Lb {
        let mut agent = test_agent();
        let mut add = |v: &str, opts: VipOpts, backends: &[u8]| {
            let v = vip(v);
            agent.add_vip_spec(v, &VipSpec { opts, ..Default::default() }).expect("add vip");
            for &i in backends {
                let ip: IpAddr = if v.addr.is_ipv4() {
                    IpAddr::V4(Ipv4Addr::new(10, 0, 6, i))
                } else {
                    format!("fd00::6:{i}").parse().expect("ip")
                };
                agent.add_backend(&v, ip, Some(mac(i)), 1).expect("add backend");
            }
        };
        let plain = VipOpts::default();
        add("10.0.0.60:*/tcp", plain, &[1, 2, 3]);
        add("10.0.0.60:443/tcp", plain, &[9]);
        add("10.0.0.61:80/tcp", plain, &[1, 2]);
        add("10.0.0.62:*/tcp", VipOpts { hash: HashMode::DstPort, ..plain }, &[1, 2, 3, 4]);
        add("10.0.0.63:80/tcp", VipOpts { answer_ping: true, ..plain }, &[1]);
        add("[fd00::60]:*/udp", plain, &[11, 12]);
        add("[fd00::63]:443/tcp", VipOpts { answer_ping: true, ..plain }, &[11]);
        Lb { agent }
    }

    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>, Vec<i64>) {
        xlb_tests::xdp::run(&mut self.agent.dp, frame)
    }

    /// The backend MAC the agent's table and the shared hash predict.
    fn predicted(&self, v: &Vip, key: &FlowKey) -> [u8; 6] {
        let s = &self.agent.vips()[v];
        let id = s.table[(maglev_hash(&s.published, key) % s.table.len() as u32) as usize];
        s.backends.values().find(|b| b.id == id).and_then(|b| b.mac).expect("a backend of the VIP").0
    }

    /// Forward `frame` and return the backend MAC it was sent to.
    fn forwarded(&mut self, frame: &[u8], what: &str) -> [u8; 6] {
        let (a, out, d) = self.run(frame);
        assert_eq!(a, XDP_TX, "{what}: forwarded");
        assert_one_verdict(&d, Stat::Forwarded, what);
        assert_eq!(&out[6..12], &LB_MAC, "{what}: source MAC");
        assert_eq!(&out[12..], &frame[12..], "{what}: the IP packet is untouched");
        out[..6].try_into().expect("six bytes")
    }

    fn passed(&mut self, frame: &[u8], want: Stat, what: &str) {
        let (a, out, d) = self.run(frame);
        assert_eq!(a, XDP_PASS, "{what}: passed");
        assert_one_verdict(&d, want, what);
        assert_eq!(out, frame, "{what}: unchanged");
    }
}

fn key4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, proto: u8) -> FlowKey {
    FlowKey::v4(src.octets(), sport.to_be(), dst.octets(), dport.to_be(), proto)
}

#[test]
fn any_port_vips_take_every_port_and_an_exact_vip_wins() {
    let mut lb = Lb::new();
    let any = vip("10.0.0.60:*/tcp");
    let exact = vip("10.0.0.60:443/tcp");
    let mut seen = std::collections::BTreeSet::new();
    for (i, dport) in [1u16, 22, 80, 442, 444, 8080, 40000, 65535].into_iter().enumerate() {
        let sport = 30000 + i as u16;
        let got = lb.forwarded(&tcp4(CLIENT, sport, ANY4, dport), &format!("port {dport}"));
        // The flow keeps its real destination port in the 5-tuple hash.
        assert_eq!(got, lb.predicted(&any, &key4(CLIENT, sport, ANY4, dport, 6)), "port {dport}");
        seen.insert(got);
    }
    assert!(seen.len() >= 2, "flows spread over the any-port VIP's backends: {seen:?}");
    // Port 443 has its own VIP: its only backend, every time.
    for sport in 1000..1010 {
        assert_eq!(lb.forwarded(&tcp4(CLIENT, sport, ANY4, 443), "exact 443"), mac(9).0);
    }
    assert_eq!(lb.agent.vips()[&exact].backends.len(), 1);
    // Port 0 is never VIP traffic, not even for an any-port VIP.
    lb.passed(&tcp4(CLIENT, 1234, ANY4, 0), Stat::PassNotVip, "port 0");
    // UDP to the address: no UDP VIP there.
    lb.passed(&udp4(CLIENT, 1234, ANY4, 53), Stat::PassNotVip, "other protocol");
    // An address with only an exact VIP: other ports are not VIP traffic.
    lb.passed(&tcp4(CLIENT, 1234, EXACT4, 81), Stat::PassNotVip, "exact VIP only");
    let _ = lb.forwarded(&tcp4(CLIENT, 1234, EXACT4, 80), "exact VIP's port");
    // IPv6 any-port UDP VIP.
    let v6 = vip("[fd00::60]:*/udp");
    for dport in [53u16, 443, 5000] {
        let f = eth(ETH_IPV6, &[], &ipv6(CLIENT6, ANY6, 17, &frames::udp(4444, dport, b"q")));
        let got = lb.forwarded(&f, &format!("v6 port {dport}"));
        let k = FlowKey::v6(CLIENT6.octets(), 4444u16.to_be(), ANY6.octets(), dport.to_be(), 17);
        assert_eq!(got, lb.predicted(&v6, &k), "v6 port {dport}");
    }
    // Fragments of the any-port VIP's address: its table (3-tuple hash).
    let frag = eth(ETH_IP, &[], &ipv4(CLIENT, ANY4, 6, &[], 0x0005, &[7u8; 40]));
    let (a, out, d) = lb.run(&frag);
    assert_eq!(a, XDP_TX, "fragment forwarded");
    assert_eq!(d[Stat::FragForwarded as usize], 1);
    assert_eq!(&out[..6], &lb.predicted(&any, &key4(CLIENT, 0, ANY4, 0, 6)), "fragment: 3-tuple hash over the any-port table");
}

#[test]
fn removing_an_any_port_vip_leaves_the_exact_one() {
    let mut lb = Lb::new();
    lb.agent.del_vip(&vip("10.0.0.60:*/tcp")).expect("del");
    lb.passed(&tcp4(CLIENT, 1234, ANY4, 8080), Stat::PassNotVip, "any-port VIP removed");
    assert_eq!(lb.forwarded(&tcp4(CLIENT, 1234, ANY4, 443), "exact VIP kept"), mac(9).0);
    lb.agent.del_vip(&vip("10.0.0.60:443/tcp")).expect("del");
    lb.passed(&tcp4(CLIENT, 1234, ANY4, 443), Stat::PassNotVip, "address gone");
}

#[test]
fn dst_port_hashing_sends_every_client_of_a_port_to_one_backend() {
    let mut lb = Lb::new();
    let v = vip("10.0.0.62:*/tcp");
    let mut by_port = std::collections::BTreeSet::new();
    for dport in [80u16, 443, 8443, 9000, 9001, 9002, 25, 110] {
        let want = lb.predicted(&v, &key4(CLIENT, 1, DPORT4, dport, 6));
        for c in 1..=12u8 {
            let src = Ipv4Addr::new(198, 51, 100, c);
            let got = lb.forwarded(&tcp4(src, 20000 + c as u16 * 7, DPORT4, dport), &format!("port {dport} client {c}"));
            assert_eq!(got, want, "port {dport}: client {c} on the port's backend");
        }
        by_port.insert(want);
    }
    assert!(by_port.len() >= 2, "different ports reach different backends: {by_port:?}");
    // The same clients to a 5-tuple VIP spread (the hash is not dst-port there).
    let any = vip("10.0.0.60:*/tcp");
    let spread: std::collections::BTreeSet<_> = (1..=12u8)
        .map(|c| lb.forwarded(&tcp4(Ipv4Addr::new(198, 51, 100, c), 20000 + c as u16 * 7, ANY4, 8080), "5-tuple"))
        .collect();
    assert!(spread.len() >= 2, "5-tuple VIP spreads one port's clients: {spread:?}");
    assert_eq!(lb.agent.vips()[&any].published.flags & lb_common::VIP_F_HASH_DST_PORT, 0);
}

/// The reply `out` to echo request `req` (an IPv4 frame): every field.
fn check_echo_reply4(req: &[u8], out: &[u8]) {
    assert_eq!(out.len(), req.len());
    assert_eq!(&out[..6], &CLIENT_MAC, "back to the client's MAC");
    assert_eq!(&out[6..12], &LB_MAC, "from the balancer's");
    assert_eq!(&out[12..14], &req[12..14]);
    let (ip, rip) = (&out[14..34], &req[14..34]);
    assert_eq!(&ip[12..16], &rip[16..20], "source := the VIP");
    assert_eq!(&ip[16..20], &rip[12..16], "destination := the client");
    assert_eq!(ip[8], 64, "fresh TTL");
    assert_eq!(&ip[..8], &rip[..8], "version, length, id, fragment field kept");
    assert_eq!(frames::csum(ip), 0, "IPv4 header checksum");
    let icmp = &out[34..];
    assert_eq!(icmp[0], 0, "echo reply");
    assert_eq!(icmp[1], 0);
    assert_eq!(&icmp[4..], &req[38..], "identifier, sequence and data echoed");
    assert_eq!(frames::csum(icmp), 0, "ICMP checksum");
}

#[test]
fn echo_requests_to_an_answering_vip_are_answered_v4() {
    let mut lb = Lb::new();
    for (id, seq, len) in [(1u16, 1u16, 0usize), (0x1234, 7, 56), (0xffff, 0xfffe, 1001), (0, 0, 3)] {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        let req = eth(ETH_IP, &[], &ipv4(CLIENT, PING4, 1, &[], 0, &icmp_echo(8, id, seq, &payload)));
        let (a, out, d) = lb.run(&req);
        assert_eq!(a, XDP_TX, "answered");
        assert_one_verdict(&d, Stat::EchoReplied, "echo");
        check_echo_reply4(&req, &out);
    }
    // Another TTL in the request: the header checksum is still right.
    let mut req = eth(ETH_IP, &[], &ipv4(CLIENT, PING4, 1, &[], 0, &icmp_echo(8, 5, 5, b"ttl")));
    req[22] = 3;
    req[24..26].copy_from_slice(&[0, 0]);
    let c = frames::csum(&req[14..34]);
    req[24..26].copy_from_slice(&c.to_be_bytes());
    let (a, out, _) = lb.run(&req);
    assert_eq!(a, XDP_TX);
    check_echo_reply4(&req, &out);
}

#[test]
fn echo_requests_to_an_answering_vip_are_answered_v6() {
    let mut lb = Lb::new();
    for (id, seq, len) in [(1u16, 1u16, 0usize), (0xbeef, 9, 56), (7, 0xffff, 777)] {
        let payload: Vec<u8> = (0..len).map(|i| (i * 13 + 1) as u8).collect();
        let req = eth(ETH_IPV6, &[], &ipv6(CLIENT6, PING6, 58, &icmp6_echo(CLIENT6, PING6, 128, id, seq, &payload)));
        let (a, out, d) = lb.run(&req);
        assert_eq!(a, XDP_TX, "answered");
        assert_one_verdict(&d, Stat::EchoReplied, "echo v6");
        assert_eq!(out.len(), req.len());
        assert_eq!(&out[..6], &CLIENT_MAC);
        assert_eq!(&out[6..12], &LB_MAC);
        let (ip, rip) = (&out[14..54], &req[14..54]);
        assert_eq!(&ip[..6], &rip[..6], "version, class, flow, payload length kept");
        assert_eq!(ip[6], 58);
        assert_eq!(ip[7], 64, "fresh hop limit");
        assert_eq!(&ip[8..24], &PING6.octets(), "source := the VIP");
        assert_eq!(&ip[24..40], &CLIENT6.octets(), "destination := the client");
        let icmp = &out[54..];
        assert_eq!((icmp[0], icmp[1]), (129, 0), "echo reply");
        assert_eq!(&icmp[4..], &req[58..], "identifier, sequence and data echoed");
        assert_eq!(frames::icmp6_csum(PING6, CLIENT6, icmp), 0, "ICMPv6 checksum with the pseudo-header");
    }
}

#[test]
fn echo_requests_are_the_kernels_unless_the_vip_answers() {
    let mut lb = Lb::new();
    // A VIP address without --answer-ping, a non-VIP address, and an echo
    // reply (not a request) to an answering VIP: passed, as before.
    for dst in [ANY4, EXACT4, Ipv4Addr::new(10, 9, 9, 9)] {
        let req = eth(ETH_IP, &[], &ipv4(CLIENT, dst, 1, &[], 0, &icmp_echo(8, 1, 1, b"x")));
        lb.passed(&req, Stat::PassOtherL4, &format!("echo to {dst}"));
    }
    let reply = eth(ETH_IP, &[], &ipv4(CLIENT, PING4, 1, &[], 0, &icmp_echo(0, 1, 1, b"x")));
    lb.passed(&reply, Stat::PassOtherL4, "echo reply");
    // IP options: not answered (the kernel handles them).
    let opts = eth(ETH_IP, &[], &ipv4(CLIENT, PING4, 1, &[1, 1, 1, 0], 0, &icmp_echo(8, 1, 1, b"x")));
    lb.passed(&opts, Stat::PassOtherL4, "echo with options");
    // A fragment of an echo: not answered.
    let frag = eth(ETH_IP, &[], &ipv4(CLIENT, PING4, 1, &[], 0x2000, &icmp_echo(8, 1, 1, b"x")));
    lb.passed(&frag, Stat::PassOtherL4, "fragmented echo");
    // IPv6 VIP address without an answering VIP.
    let req6 = eth(ETH_IPV6, &[], &ipv6(CLIENT6, ANY6, 58, &icmp6_echo(CLIENT6, ANY6, 128, 1, 1, b"x")));
    lb.passed(&req6, Stat::PassOtherL4, "v6 echo to a silent VIP");
    // Truncated echo header to an answering VIP.
    let mut short = eth(ETH_IP, &[], &ipv4(CLIENT, PING4, 1, &[], 0, &icmp_echo(8, 1, 1, b"")));
    short.truncate(short.len() - 2);
    let (a, _, d) = lb.run(&short);
    assert_eq!(a, XDP_PASS, "truncated echo passed");
    assert_eq!(d[Stat::EchoReplied as usize], 0);
    // Turning answer-ping off (removing the VIP) stops the answers.
    lb.agent.del_vip(&vip("10.0.0.63:80/tcp")).expect("del");
    let req = eth(ETH_IP, &[], &ipv4(CLIENT, PING4, 1, &[], 0, &icmp_echo(8, 1, 1, b"x")));
    lb.passed(&req, Stat::PassOtherL4, "VIP removed");
    // TCP to the answering VIP still balances.
    let v6 = vip("[fd00::63]:443/tcp");
    let f = eth(ETH_IPV6, &[], &ipv6(CLIENT6, PING6, 6, &tcp(5555, 443, 0x18, b"x")));
    assert_eq!(lb.forwarded(&f, "TCP to the answering v6 VIP"), mac(11).0);
    assert!(lb.agent.vips()[&v6].opts.answer_ping);
}

/// Prefix VIPs: their own agent (the fixture above is at its VIP limit).
fn prefix_lb() -> Lb {
    let mut agent = test_agent();
    let mut add = |v: &str, opts: VipOpts, backends: &[u8]| {
        let v = vip(v);
        agent.add_vip_spec(v, &VipSpec { opts, ..Default::default() }).expect("add vip");
        for &i in backends {
            let ip: IpAddr = if v.addr.is_ipv4() { IpAddr::V4(Ipv4Addr::new(10, 0, 6, i)) } else { format!("fd00::6:{i}").parse().expect("ip") };
            agent.add_backend(&v, ip, Some(mac(i)), 1).expect("add backend");
        }
    };
    let plain = VipOpts::default();
    add("10.1.0.0/16:443/tcp", plain, &[1]);
    add("10.1.0.0/16:80/tcp", VipOpts { answer_ping: true, ..plain }, &[5]);
    add("10.1.2.0/24:443/tcp", plain, &[2]);
    add("10.1.2.0/24:*/tcp", plain, &[3]);
    add("10.1.2.7:443/tcp", plain, &[4]);
    add("[fd00:1::]/64:*/udp", VipOpts { answer_ping: true, ..plain }, &[11, 12]);
    Lb { agent }
}

#[test]
fn prefix_vips_most_specific_wins_and_exact_beats_prefix() {
    let mut lb = prefix_lb();
    let a = |x: u8, y: u8| Ipv4Addr::new(10, 1, x, y);
    for (dst, dport, want, what) in [
        (a(5, 5), 443, 1, "the /16"),
        (a(200, 1), 443, 1, "the /16, far end"),
        (a(5, 5), 80, 5, "the /16's other port"),
        (a(2, 9), 443, 2, "the /24 is more specific than the /16"),
        (a(2, 255), 443, 2, "the /24's last address"),
        (a(2, 9), 8080, 3, "the /24's any-port VIP"),
        (a(2, 9), 80, 5, "a port VIP of the /16 beats the /24's any-port one"),
        (a(2, 7), 443, 4, "an exact VIP inside the prefixes wins"),
        (a(2, 7), 22, 3, "the exact address's other ports: the prefix"),
    ] {
        for sport in [1000u16, 2000, 3000] {
            assert_eq!(lb.forwarded(&tcp4(CLIENT, sport, dst, dport), what), mac(want).0, "{what}: {dst}:{dport}");
        }
    }
    for (frame, what) in [
        (tcp4(CLIENT, 1000, a(5, 5), 8080), "the /16 has no VIP on this port"),
        (tcp4(CLIENT, 1000, Ipv4Addr::new(10, 2, 0, 1), 443), "outside every prefix"),
        (tcp4(CLIENT, 1000, Ipv4Addr::new(10, 0, 255, 255), 443), "just below the /16"),
        (tcp4(CLIENT, 1000, a(2, 9), 0), "port 0"),
        (udp4(CLIENT, 1000, a(2, 9), 443), "no UDP prefix VIP for IPv4"),
    ] {
        lb.passed(&frame, Stat::PassNotVip, what);
    }
    // IPv6 any-port prefix: the 5-tuple over its table.
    let v6 = vip("[fd00:1::]/64:*/udp");
    for (i, dport) in [53u16, 443, 9999].into_iter().enumerate() {
        let dst: Ipv6Addr = format!("fd00:1::{:x}", 0x100 + i).parse().expect("v6");
        let f = eth(ETH_IPV6, &[], &ipv6(CLIENT6, dst, 17, &frames::udp(4444, dport, b"q")));
        let got = lb.forwarded(&f, "v6 prefix");
        let k = FlowKey::v6(CLIENT6.octets(), 4444u16.to_be(), dst.octets(), dport.to_be(), 17);
        assert_eq!(got, lb.predicted(&v6, &k), "v6 {dst}:{dport}");
    }
    let out6: Ipv6Addr = "fd00:2::1".parse().expect("v6");
    lb.passed(&eth(ETH_IPV6, &[], &ipv6(CLIENT6, out6, 17, &frames::udp(4444, 53, b"q"))), Stat::PassNotVip, "outside the /64");
    // Fragments of a prefix address: the lowest-port VIP of the most specific prefix.
    let frag = eth(ETH_IP, &[], &ipv4(CLIENT, a(2, 9), 6, &[], 0x0005, &[7u8; 40]));
    let (act, out, d) = lb.run(&frag);
    assert_eq!((act, d[Stat::FragForwarded as usize]), (XDP_TX, 1), "prefix fragment forwarded");
    assert_eq!(&out[..6], &mac(3).0, "the /24's any-port VIP takes its fragments");
    // Echo: the /16 answers (its VIP on port 80 has --answer-ping), the v6 /64 too.
    let req = eth(ETH_IP, &[], &ipv4(CLIENT, a(2, 9), 1, &[], 0, &icmp_echo(8, 3, 4, b"ping")));
    let (act, out, d) = lb.run(&req);
    assert_eq!(act, XDP_TX);
    assert_one_verdict(&d, Stat::EchoReplied, "prefix echo");
    check_echo_reply4(&req, &out);
    let dst: Ipv6Addr = "fd00:1::77".parse().expect("v6");
    let req6 = eth(ETH_IPV6, &[], &ipv6(CLIENT6, dst, 58, &icmp6_echo(CLIENT6, dst, 128, 1, 1, b"x")));
    let (act, out, _) = lb.run(&req6);
    assert_eq!(act, XDP_TX, "v6 prefix echo");
    assert_eq!(frames::icmp6_csum(dst, CLIENT6, &out[54..]), 0);
    let req = eth(ETH_IP, &[], &ipv4(CLIENT, Ipv4Addr::new(10, 2, 0, 1), 1, &[], 0, &icmp_echo(8, 3, 4, b"ping")));
    lb.passed(&req, Stat::PassOtherL4, "echo outside the prefixes");
}

#[test]
fn removing_prefix_vips_turns_the_trie_off() {
    let mut lb = prefix_lb();
    let dst = Ipv4Addr::new(10, 1, 2, 9);
    assert_eq!(lb.forwarded(&tcp4(CLIENT, 1, dst, 443), "before"), mac(2).0);
    lb.agent.del_vip(&vip("10.1.2.0/24:443/tcp")).expect("del");
    assert_eq!(lb.forwarded(&tcp4(CLIENT, 2, dst, 443), "the /16 again"), mac(1).0);
    for v in ["10.1.0.0/16:443/tcp", "10.1.0.0/16:80/tcp", "10.1.2.0/24:*/tcp", "[fd00:1::]/64:*/udp"] {
        lb.agent.del_vip(&vip(v)).expect("del");
    }
    lb.passed(&tcp4(CLIENT, 3, dst, 443), Stat::PassNotVip, "no prefix VIP left");
    assert_eq!(lb.forwarded(&tcp4(CLIENT, 4, Ipv4Addr::new(10, 1, 2, 7), 443), "exact kept"), mac(4).0);
    // A duplicate prefix VIP is refused in one line and changes nothing.
    lb.agent.add_vip(vip("10.1.0.0/16:443/tcp"), lb_common::Algo::Maglev, 0).expect("add");
    let e = lb.agent.add_vip(vip("10.1.0.0/16:443/tcp"), lb_common::Algo::Maglev, 0).expect_err("duplicate");
    assert!(e.to_string().contains("already exists") && !e.to_string().contains('\n'), "{e}");
}
