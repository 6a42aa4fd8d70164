//! Routed backends on crafted frames (BPF_PROG_TEST_RUN), fixture-table
//! style: frame in → verdict, frame out with every header field checked.
//! The program's `bpf_fib_lookup` answers from a namespace of the test's
//! own (`FibNs`: known routes, gateway MACs and MTUs), entered by the
//! test's thread. Backends and outer sources are predicted from the agent's
//! own tables and the shared flow hash. Needs root.

use lb_common::{hash::flow_hash, EncapConfig, FlowKey, Forward, Stat, PROG_DECAP, PROG_XLB};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use xlb::{agent::Agent, config::Vip, encap::encap_config};
use xlb_tests::{
    frames::{csum, eth, ipv4, ipv6, tcp, udp, ETH_IP, ETH_IPV6, LB_MAC},
    routed::{FibNs, FIB_SMAC, FIB_SMAC1, GW_MAC},
    xdp::{assert_one_verdict, run_on, test_agent, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 2, 0, 0, 0, 7);
const VIP4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
const GUE_PORT: u16 = 7080;
/// DSCP 46 (EF) + ECN ECT(1): must reach the outer header.
const TOS: u8 = 0xb9;

fn vip(s: &str) -> Vip {
    s.parse().expect("test VIP")
}

struct Fixture {
    ns: FibNs,
    agent: Agent,
    cfg: EncapConfig,
}

impl Fixture {
    /// An agent with encapsulation sources 10.210.0.0/24 and fd00:210::/112.
    fn new(tag: &str) -> Fixture {
        let ns = FibNs::enter(tag).expect("FIB namespace (run as root)");
        let mut agent = test_agent();
        let cfg = encap_config(&["10.210.0.0/24".into(), "fd00:210::/112".into()], GUE_PORT).expect("encap config");
        agent.dp.set_encap(&cfg).expect("set encap");
        Fixture { ns, agent, cfg }
    }

    /// A VIP forwarding by `fwd` to `backends`.
    fn vip(&mut self, v: &str, fwd: Forward, backends: &[&str]) -> Vip {
        let v = vip(v);
        let spec = xlb::agent::VipSpec { forward: fwd, ..Default::default() };
        self.agent.add_vip_spec(v, &spec).expect("add vip");
        for b in backends {
            self.agent.add_backend(&v, b.parse().expect("ip"), None, 1).expect("add routed backend");
        }
        v
    }

    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>, Vec<i64>) {
        run_on(&mut self.agent.dp, PROG_XLB, frame, self.ns.eth0)
    }

    fn decap(&mut self, frame: &[u8]) -> (u32, Vec<u8>, Vec<i64>) {
        run_on(&mut self.agent.dp, PROG_DECAP, frame, self.ns.eth0)
    }

    /// The backend address the agent's table predicts for a flow.
    fn predicted(&self, key: &FlowKey, v: &Vip) -> IpAddr {
        let state = &self.agent.vips()[v];
        let id = state.table[(flow_hash(key) % state.table.len() as u32) as usize];
        state.backends.values().find(|b| b.id == id).expect("table names a backend").ip
    }
}

fn key(src: IpAddr, sport: u16, v: &Vip) -> FlowKey {
    let mut k = FlowKey { src: [0; 16], sport_be: sport.to_be(), _pad: 0, vip: v.key() };
    match src {
        IpAddr::V4(a) => k.src[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => k.src = a.octets(),
    }
    k
}

/// An IPv4 client packet with TOS `TOS` (checksum redone).
fn inner4(proto: u8, sport: u16, dport: u16, payload_len: usize) -> Vec<u8> {
    let l4 = if proto == 6 { tcp(sport, dport, 0x18, &vec![0x5a; payload_len]) } else { udp(sport, dport, &vec![0x5a; payload_len]) };
    let mut p = ipv4(CLIENT, VIP4, proto, &[], 0x4000, &l4);
    p[1] = TOS;
    p[10] = 0;
    p[11] = 0;
    let c = csum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p
}

/// An IPv6 client packet with traffic class `TOS`.
fn inner6(sport: u16, dport: u16, payload_len: usize) -> Vec<u8> {
    let mut p = ipv6(CLIENT6, VIP6, 6, &tcp(sport, dport, 0x18, &vec![0x5a; payload_len]));
    p[0] = 0x60 | (TOS >> 4);
    p[1] = TOS << 4;
    p
}

/// A client packet with another TOS / traffic class (IPv4 checksum redone).
fn with_tos(mut p: Vec<u8>, tos: u8) -> Vec<u8> {
    if p[0] >> 4 == 4 {
        p[1] = tos;
        p[10] = 0;
        p[11] = 0;
        let c = csum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
    } else {
        p[0] = 0x60 | (tos >> 4);
        p[1] = (tos << 4) | (p[1] & 0x0f);
    }
    p
}

fn frame_of(inner: &[u8]) -> Vec<u8> {
    eth(if inner[0] >> 4 == 4 { ETH_IP } else { ETH_IPV6 }, &[], inner)
}

/// Check an encapsulated frame field by field; returns the outer source.
fn check_encap(out: &[u8], inner: &[u8], backend: IpAddr, fwd: Forward, hash: u32, cfg: &EncapConfig, what: &str) -> IpAddr {
    assert_eq!(&out[0..6], &GW_MAC, "{what}: destination MAC is the gateway's (FIB)");
    assert_eq!(&out[6..12], &FIB_SMAC, "{what}: source MAC is the egress interface's (FIB)");
    let inner_proto = if inner[0] >> 4 == 4 { 4u8 } else { 41 };
    let gue = fwd == Forward::Gue;
    let (l4_off, src) = match backend {
        IpAddr::V4(b) => {
            assert_eq!(&out[12..14], &[0x08, 0x00], "{what}: outer IPv4");
            let h = &out[14..34];
            assert_eq!(h[0], 0x45, "{what}: version/IHL");
            assert_eq!(h[1], TOS, "{what}: DSCP/ECN copied");
            assert_eq!(u16::from_be_bytes([h[2], h[3]]) as usize, 20 + inner.len() + if gue { 8 } else { 0 }, "{what}: total length");
            assert_eq!(&h[4..8], &[0, 0, 0x40, 0], "{what}: id 0, DF");
            assert_eq!(h[8], 64, "{what}: outer TTL");
            assert_eq!(h[9], if gue { 17 } else { inner_proto }, "{what}: protocol");
            assert_eq!(csum(h), 0, "{what}: header checksum");
            let want_src = Ipv4Addr::from(cfg.source4(hash));
            assert_eq!(Ipv4Addr::new(h[12], h[13], h[14], h[15]), want_src, "{what}: source from the prefix and the hash");
            assert_eq!(&h[12..15], &[10, 210, 0], "{what}: source inside 10.210.0.0/24");
            assert_eq!(&h[16..20], &b.octets(), "{what}: destination is the backend");
            (34, IpAddr::V4(want_src))
        }
        IpAddr::V6(b) => {
            assert_eq!(&out[12..14], &[0x86, 0xdd], "{what}: outer IPv6");
            let h = &out[14..54];
            let vcf = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
            assert_eq!(vcf >> 28, 6, "{what}: version");
            assert_eq!((vcf >> 20) as u8, TOS, "{what}: traffic class copied");
            assert_eq!(vcf & 0xfffff, hash & 0xfffff, "{what}: flow label from the flow hash");
            assert_eq!(u16::from_be_bytes([h[4], h[5]]) as usize, inner.len() + if gue { 8 } else { 0 }, "{what}: payload length");
            assert_eq!(h[6], if gue { 17 } else { inner_proto }, "{what}: next header");
            assert_eq!(h[7], 64, "{what}: hop limit");
            let want_src = Ipv6Addr::from(cfg.source6(hash));
            assert_eq!(&h[8..24], &want_src.octets(), "{what}: source from the prefix and the hash");
            assert_eq!(&h[8..22], &"fd00:210::".parse::<Ipv6Addr>().expect("ip").octets()[..14], "{what}: inside fd00:210::/112");
            assert_eq!(&h[24..40], &b.octets(), "{what}: destination is the backend");
            (54, IpAddr::V6(want_src))
        }
    };
    let payload = if gue {
        let u = &out[l4_off..l4_off + 8];
        assert_eq!(u16::from_be_bytes([u[0], u[1]]), lb_common::gue_source_port(hash), "{what}: GUE source port from the hash");
        assert!(u16::from_be_bytes([u[0], u[1]]) >= 0xc000, "{what}: GUE source port in the ephemeral range");
        assert_eq!(u16::from_be_bytes([u[2], u[3]]), GUE_PORT, "{what}: GUE port");
        assert_eq!(u16::from_be_bytes([u[4], u[5]]) as usize, 8 + inner.len(), "{what}: UDP length");
        assert_eq!(&u[6..8], &[0, 0], "{what}: UDP checksum 0");
        assert_eq!(out[l4_off + 8] >> 4, inner[0] >> 4, "{what}: GUE variant 1 (IP version first)");
        &out[l4_off + 8..]
    } else {
        &out[l4_off..]
    };
    assert_eq!(payload, inner, "{what}: the client's packet is carried unchanged (inner TTL untouched)");
    src
}

#[test]
fn every_encapsulation_with_every_header_field() {
    let mut f = Fixture::new("enc");
    let cases: Vec<(&str, Forward, Vec<&str>, bool)> = vec![
        ("10.0.0.100:80/tcp", Forward::Ipip, vec!["10.220.0.1", "10.220.0.2", "10.220.0.3"], false),
        ("10.0.0.100:53/udp", Forward::Gue, vec!["10.220.0.4", "10.220.0.5"], false),
        ("[fd00::100]:80/tcp", Forward::Ipip, vec!["fd00:220::1", "fd00:220::2"], true),
        ("[fd00::100]:443/tcp", Forward::Gue, vec!["fd00:220::3", "fd00:220::4"], true),
        // IPv4 VIP, IPv6 backends: IPv4-in-IPv6.
        ("10.0.0.100:443/tcp", Forward::Ipip, vec!["fd00:220::5", "fd00:220::6"], false),
        ("10.0.0.100:8443/tcp", Forward::Gue, vec!["fd00:220::7"], false),
    ];
    for (vs, fwd, backends, v6) in cases {
        let v = f.vip(vs, fwd, &backends);
        let mut sources = std::collections::BTreeSet::new();
        let mut used = std::collections::BTreeSet::new();
        for sport in 20000..20100u16 {
            let inner = if v6 { inner6(sport, v.port, 40) } else { inner4(v.proto.number(), sport, v.port, 40) };
            let frame = frame_of(&inner);
            let client: IpAddr = if v6 { CLIENT6.into() } else { CLIENT.into() };
            let k = key(client, sport, &v);
            let (action, out, d) = f.run(&frame);
            let what = format!("{vs} {fwd} sport {sport}");
            assert_eq!(action, XDP_TX, "{what}: same interface: XDP_TX");
            assert_one_verdict(&d, Stat::Forwarded, &what);
            let be = f.predicted(&k, &v);
            sources.insert(check_encap(&out, &inner, be, fwd, flow_hash(&k), &f.cfg, &what));
            used.insert(be);
            // The flow's next packet (a connection-table hit): the same frame.
            let (action, again, d) = f.run(&frame);
            assert_eq!((action, &again), (XDP_TX, &out), "{what}: table hit");
            assert_eq!(d[Stat::CtHit as usize], 1);
        }
        assert_eq!(used.len(), backends.len(), "{vs}: every backend used");
        assert!(sources.len() > 40, "{vs}: outer sources vary with the flow ({} distinct of 100)", sources.len());
    }
}

#[test]
fn too_big_once_encapsulated_answers_the_client_with_the_mtu() {
    let mut f = Fixture::new("big");
    // Routes to 10.230/24 and fd00:230::/64 have MTU 1400.
    let v4 = f.vip("10.0.0.100:80/tcp", Forward::Ipip, &["10.230.0.1"]);
    let v6 = f.vip("[fd00::100]:80/tcp", Forward::Ipip, &["fd00:230::1"]);
    let g4 = f.vip("10.0.0.100:53/udp", Forward::Gue, &["10.230.0.2"]);
    // Fits exactly: 1380 + 20 = 1400.
    let fits = inner4(6, 1000, 80, 1380 - 40);
    let (action, _, d) = f.run(&frame_of(&fits));
    assert_eq!(action, XDP_TX);
    assert_one_verdict(&d, Stat::Forwarded, "1380 bytes + IPIP fit 1400");
    for (inner, mtu, what) in [
        (inner4(6, 1001, v4.port, 1381 - 40), 1380u32, "IPIP, one byte over"),
        (inner4(17, 1002, g4.port, 1400 - 28), 1372, "GUE"),
    ] {
        let frame = frame_of(&inner);
        let (action, out, d) = f.run(&frame);
        assert_eq!(action, XDP_TX, "{what}");
        assert_one_verdict(&d, Stat::TooBig, what);
        assert_eq!(out.len(), 14 + 20 + 8 + 28, "{what}: answer length");
        assert_eq!(&out[0..6], &frame[6..12], "{what}: back to the sender's MAC");
        assert_eq!(&out[6..12], &LB_MAC, "{what}: from the balancer's MAC");
        assert_eq!(&out[12..14], &[0x08, 0x00]);
        let ip = &out[14..34];
        assert_eq!(&ip[..4], &[0x45, 0xc0, 0, 56], "{what}: IPv4 header, TOS 0xc0, length 56");
        assert_eq!(&ip[6..10], &[0, 0, 64, 1], "{what}: no DF, TTL 64, ICMP");
        assert_eq!(csum(ip), 0, "{what}: IP checksum");
        assert_eq!(&ip[12..16], &VIP4.octets(), "{what}: from the VIP");
        assert_eq!(&ip[16..20], &CLIENT.octets(), "{what}: to the client");
        let icmp = &out[34..];
        assert_eq!(&icmp[..2], &[3, 4], "{what}: fragmentation needed");
        assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]) as u32, mtu, "{what}: next-hop MTU = route MTU - overhead");
        assert_eq!(csum(icmp), 0, "{what}: ICMP checksum");
        assert_eq!(&icmp[8..], &inner[..28], "{what}: quotes the client's header and 8 bytes");
    }
    // IPv6: packet too big with the MTU, checksum over the pseudo-header.
    let inner = inner6(1003, v6.port, 1400 - 40 - 20 - 40 + 1);
    let frame = frame_of(&inner);
    let (action, out, d) = f.run(&frame);
    assert_eq!(action, XDP_TX);
    assert_one_verdict(&d, Stat::TooBig, "IPv6 too big");
    assert_eq!(out.len(), 14 + 40 + 8 + 48);
    let ip = &out[14..54];
    assert_eq!(&ip[..8], &[0x60, 0, 0, 0, 0, 56, 58, 64], "ICMPv6 header");
    assert_eq!(&ip[8..24], &VIP6.octets());
    assert_eq!(&ip[24..40], &CLIENT6.octets());
    let icmp = &out[54..];
    assert_eq!(&icmp[..2], &[2, 0], "packet too big");
    assert_eq!(u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]), 1360, "MTU = 1400 - 40");
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&ip[8..40]);
    pseudo.extend_from_slice(&56u32.to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(icmp);
    assert_eq!(csum(&pseudo), 0, "ICMPv6 checksum");
    assert_eq!(&icmp[8..], &inner[..48]);
}

#[test]
fn no_route_drops_counted_and_another_interface_redirects() {
    let mut f = Fixture::new("fib");
    let none = f.vip("10.0.0.100:80/tcp", Forward::Ipip, &["10.250.0.1"]);
    let noneigh = f.vip("10.0.0.100:81/tcp", Forward::Ipip, &["10.221.0.1"]);
    let other = f.vip("10.0.0.100:82/tcp", Forward::Ipip, &["10.240.0.1"]);
    for (v, what) in [(none, "no route"), (noneigh, "next hop not resolved")] {
        let frame = frame_of(&inner4(6, 1000, v.port, 10));
        let (action, out, d) = f.run(&frame);
        assert_eq!(action, XDP_DROP, "{what}");
        assert_one_verdict(&d, Stat::DropNoRoute, what);
        assert_eq!(out, frame, "{what}: untouched");
    }
    let inner = inner4(6, 1000, other.port, 10);
    let (action, out, d) = f.run(&frame_of(&inner));
    assert_eq!(action, XDP_REDIRECT, "next hop on eth1");
    assert_one_verdict(&d, Stat::Redirected, "redirect");
    assert_eq!(&out[6..12], &FIB_SMAC1, "source MAC of eth1");
    assert_eq!(&out[34..], &inner[..]);
    // A VLAN-tagged frame for a routed backend: counted drop.
    let tagged = eth(ETH_IP, &[(0x8100, 5)], &inner);
    let (action, _, d) = f.run(&tagged);
    assert_eq!(action, XDP_DROP);
    assert_one_verdict(&d, Stat::DropNoRoute, "VLAN tag");
    // A routed backend of a family without --encap-source is refused.
    let mut bare = test_agent();
    let v = vip("10.0.0.1:80/tcp");
    bare.add_vip_spec(v, &xlb::agent::VipSpec { forward: Forward::Ipip, ..Default::default() }).expect("vip");
    let e = bare.add_backend(&v, "10.220.0.1".parse().expect("ip"), None, 1).expect_err("no source");
    assert!(e.to_string().contains("--encap-source"), "{e}");
}

#[test]
fn decap_strips_every_encapsulation_for_local_vips_only() {
    let mut f = Fixture::new("dec");
    f.agent.dp.set_decap_vips(&[VIP4.into(), VIP6.into()]).expect("decap vips");
    let cases: Vec<(&str, Forward, &str, bool)> = vec![
        ("10.0.0.100:80/tcp", Forward::Ipip, "10.220.0.1", false),
        ("10.0.0.100:53/udp", Forward::Gue, "10.220.0.2", false),
        ("[fd00::100]:80/tcp", Forward::Ipip, "fd00:220::1", true),
        ("[fd00::100]:443/tcp", Forward::Gue, "fd00:220::2", true),
        ("10.0.0.100:443/tcp", Forward::Ipip, "fd00:220::3", false),
        ("10.0.0.100:8443/tcp", Forward::Gue, "fd00:220::4", false),
    ];
    for (vs, fwd, b, v6) in cases {
        let v = f.vip(vs, fwd, &[b]);
        let inner = if v6 { inner6(3000, v.port, 30) } else { inner4(v.proto.number(), 3000, v.port, 30) };
        let (action, enc, _) = f.run(&frame_of(&inner));
        assert_eq!(action, XDP_TX, "{vs}");
        let (action, out, d) = f.decap(&enc);
        let what = format!("decap {vs} {fwd}");
        assert_eq!(action, XDP_PASS, "{what}");
        assert_one_verdict(&d, Stat::Decapsulated, &what);
        let mut want = enc[..12].to_vec();
        want.extend_from_slice(if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
        want.extend_from_slice(&inner);
        assert_eq!(out, want, "{what}: the inner packet behind the frame's MACs");
    }
    // ECN (RFC 6040): a router's CE mark on the outer header reaches an
    // ECN-capable inner header (IPv4: checksum updated); an inner header
    // that is not ECN-capable keeps its field. Outer IPv4, IPv6, and IPv6
    // around IPv4.
    for (vs, v6) in [("10.0.0.100:80/tcp", false), ("[fd00::100]:80/tcp", true), ("10.0.0.100:443/tcp", false)] {
        let v = vip(vs);
        for (tos, ce) in [(0xb9u8, true), (0xbau8, true), (0xb8u8, false), (0xbbu8, false)] {
            let inner = with_tos(if v6 { inner6(3100, v.port, 30) } else { inner4(6, 3100, v.port, 30) }, tos);
            let (action, mut enc, _) = f.run(&frame_of(&inner));
            assert_eq!(action, XDP_TX, "{vs}");
            if enc[12..14] == [0x08, 0x00] {
                assert_eq!(enc[15], tos, "{vs}: outer TOS copied");
                enc[15] |= 3;
                enc[24..26].copy_from_slice(&[0, 0]);
                let c = csum(&enc[14..34]);
                enc[24..26].copy_from_slice(&c.to_be_bytes());
            } else {
                enc[15] |= 0x30;
            }
            let (action, out, d) = f.decap(&enc);
            let what = format!("{vs} inner TOS {tos:#04x} under an outer CE");
            assert_eq!(action, XDP_PASS, "{what}");
            assert_one_verdict(&d, Stat::Decapsulated, &what);
            let want_inner = if ce { with_tos(inner.clone(), tos | 3) } else { inner.clone() };
            assert_eq!(&out[14..], &want_inner[..], "{what}");
            if !v6 {
                assert_eq!(csum(&out[14..34]), 0, "{what}: inner IPv4 checksum");
            }
        }
    }
    // Not for a local VIP: untouched.
    let v = f.vip("10.0.0.200:80/tcp", Forward::Ipip, &["10.220.0.9"]);
    let mut other = inner4(6, 3001, v.port, 10);
    other[16..20].copy_from_slice(&[10, 0, 0, 200]);
    other[10] = 0;
    other[11] = 0;
    let c = csum(&other[..20]);
    other[10..12].copy_from_slice(&c.to_be_bytes());
    let (_, enc, _) = f.run(&frame_of(&other));
    let (action, out, d) = f.decap(&enc);
    assert_eq!((action, &out), (XDP_PASS, &enc), "not a local VIP");
    assert_one_verdict(&d, Stat::DecapNotLocal, "not local");
    // Plain traffic, UDP to another port, IPv4 with options: untouched.
    let plain = frame_of(&inner4(6, 1, 80, 10));
    let wrong_port = frame_of(&ipv4(CLIENT, VIP4, 17, &[], 0, &udp(1, GUE_PORT + 1, &inner4(6, 1, 80, 10))));
    let options = frame_of(&ipv4(CLIENT, VIP4, 4, &[1; 4], 0, &inner4(6, 1, 80, 10)));
    let fragment = frame_of(&ipv4(CLIENT, VIP4, 4, &[], 0x2000, &inner4(6, 1, 80, 10)));
    for (frame, what) in [(plain, "plain TCP"), (wrong_port, "UDP not to the GUE port"), (options, "outer options"), (fragment, "outer fragment")] {
        let (action, out, d) = f.decap(&frame);
        assert_eq!((action, &out), (XDP_PASS, &frame), "{what}");
        assert_one_verdict(&d, Stat::DecapNotTunnel, what);
    }
}

/// `xlb trace` on routed frames: the tracing program hands them to
/// `xlb_encap` by a tail call, which records each as it was sent (outer
/// headers first) with its verdict, backend, mode and outer addresses; the
/// balancer's own hand-offs record nothing.
#[test]
fn trace_shows_routed_frames_with_their_mode_and_outer_header() {
    use lb_common::PROG_TRACE;
    use xlb::diag::trace::{filter, frame_bytes, frame_line, TraceRequest};
    let mut f = Fixture::new("trc");
    let v4 = f.vip("10.0.0.100:80/tcp", Forward::Ipip, &["10.220.0.1", "10.220.0.2"]);
    let g6 = f.vip("[fd00::100]:443/tcp", Forward::Gue, &["fd00:220::3"]);
    let x46 = f.vip("10.0.0.100:443/tcp", Forward::Ipip, &["fd00:220::5"]);
    let other = f.vip("10.0.0.100:82/tcp", Forward::Ipip, &["10.240.0.1"]);
    let none = f.vip("10.0.0.100:81/tcp", Forward::Ipip, &["10.250.0.1"]);
    let big = f.vip("10.0.0.100:83/tcp", Forward::Gue, &["10.230.0.1"]);
    let arm = |f: &mut Fixture, req: TraceRequest| {
        let cfg = filter(&f.agent, &TraceRequest { rate: Some(100_000), ..req }).expect("filter");
        f.agent.dp.trace_arm(&cfg).expect("arm");
    };
    arm(&mut f, TraceRequest::default());
    let (action, _, _) = f.run(&frame_of(&inner4(6, 5000, v4.port, 10)));
    assert_eq!(action, XDP_TX);
    assert!(f.agent.dp.trace_drain(10).is_empty(), "the balancer's hand-off records nothing");

    // (inner packet, VIP, action, verdict)
    let cases: Vec<(Vec<u8>, Vip, u32, Stat)> = vec![
        (inner4(6, 5001, v4.port, 10), v4, XDP_TX, Stat::Forwarded),
        (inner6(5002, g6.port, 10), g6, XDP_TX, Stat::Forwarded),
        (inner4(6, 5003, x46.port, 10), x46, XDP_TX, Stat::Forwarded),
        (inner4(6, 5004, other.port, 10), other, XDP_REDIRECT, Stat::Redirected),
        (inner4(6, 5005, none.port, 10), none, XDP_DROP, Stat::DropNoRoute),
        (inner4(6, 5006, big.port, 1400), big, XDP_TX, Stat::TooBig),
    ];
    let mut outs = Vec::new();
    for (inner, v, action, stat) in &cases {
        let (got, out, d) = run_on(&mut f.agent.dp, PROG_TRACE, &frame_of(inner), f.ns.eth0);
        assert_eq!(got, *action, "{v}: the tracing program decides as the balancer does");
        assert_one_verdict(&d, *stat, &v.to_string());
        outs.push(out);
    }
    let recs = f.agent.dp.trace_drain(100);
    let lines: Vec<_> = recs.iter().map(|r| frame_line(&f.agent, r, 0)).collect();
    assert_eq!(lines.len(), cases.len(), "one record per routed frame: {lines:#?}");
    for ((inner, v, action, stat), (l, out)) in cases.iter().zip(lines.iter().zip(&outs)) {
        let what = format!("{v}: {l:?}");
        assert_eq!(l.verdict, stat.name(), "{what}");
        assert_eq!(l.action, if *action == XDP_REDIRECT { "redirect" } else if *action == XDP_DROP { "drop" } else { "tx" }, "{what}");
        let client: IpAddr = if v.addr.is_ipv6() { CLIENT6.into() } else { CLIENT.into() };
        let sport = if v.addr.is_ipv6() { u16::from_be_bytes([inner[40], inner[41]]) } else { u16::from_be_bytes([inner[20], inner[21]]) };
        let k = key(client, sport, v);
        let be = f.predicted(&k, v);
        assert_eq!(l.backend.as_deref(), Some(be.to_string().as_str()), "{what}: backend");
        let fwd = f.agent.vips()[v].forward;
        assert_eq!(l.forward.as_deref(), Some(fwd.name()), "{what}: mode");
        assert!(l.flow.as_deref().is_some_and(|x| x.ends_with(&format!(":{}", v.port))), "{what}: the client's 5-tuple");
        assert_eq!(frame_bytes(l).expect("hex"), out[..out.len().min(128)], "{what}: the frame as the program left it");
        assert_eq!(l.len as usize, out.len(), "{what}");
        if matches!(stat, Stat::Forwarded | Stat::Redirected) {
            let src = if *stat == Stat::Forwarded { check_encap(out, inner, be, fwd, flow_hash(&k), &f.cfg, &what) } else { IpAddr::V4(Ipv4Addr::from(f.cfg.source4(flow_hash(&k)))) };
            let mut want = format!("{src} > {be}");
            if fwd == Forward::Gue {
                want += &format!(" udp {} > {GUE_PORT}", lb_common::gue_source_port(flow_hash(&k)));
            }
            assert_eq!(l.outer.as_deref(), Some(want.as_str()), "{what}: outer header");
            let text = xlb::diag::trace::render(l);
            assert!(text.contains(&format!("by {} ({want})", fwd.name())), "{text}");
        } else {
            assert_eq!(l.outer, None, "{what}: not sent encapsulated");
        }
    }
    // Filters see routed frames too: by VIP, by backend, `tx` with redirects.
    arm(&mut f, TraceRequest { verdict: Some(xlb::diag::trace::TraceVerdict::Tx), ..Default::default() });
    for (inner, _, _, _) in &cases {
        run_on(&mut f.agent.dp, PROG_TRACE, &frame_of(inner), f.ns.eth0);
    }
    let got: Vec<String> = f.agent.dp.trace_drain(100).iter().map(|r| frame_line(&f.agent, r, 0).verdict).collect();
    assert_eq!(got, ["forwarded", "forwarded", "forwarded", "redirected", "too_big"], "tx: sent on");
    arm(&mut f, TraceRequest { backend: Some("fd00:220::5".parse().expect("ip")), ..Default::default() });
    for (inner, _, _, _) in &cases {
        run_on(&mut f.agent.dp, PROG_TRACE, &frame_of(inner), f.ns.eth0);
    }
    let got: Vec<Option<String>> = f.agent.dp.trace_drain(100).iter().map(|r| frame_line(&f.agent, r, 0).backend).collect();
    assert_eq!(got, [Some("fd00:220::5".to_string())], "by backend: the IPv4-in-IPv6 one");
}
