//! QUIC connection-ID routing through BPF_PROG_TEST_RUN on the loaded
//! program. Fixture tables: frame in → verdict, frame out, QUIC event.
//! Every backend a packet should reach by its connection ID is found from
//! the agent's own backends (their server IDs); every one it should reach
//! by the hash is predicted from the agent's published table and the
//! shared hash (`lb_common::hash::maglev_hash`). Needs root.

use lb_common::{
    hash::maglev_hash,
    quic::{encode_cid, CR_UNROUTABLE, VERSION_1, VERSION_2},
    FlowKey, Stat, PROG_TRACE, PROG_XLB,
};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use xlb::{
    agent::{Agent, VipSpec},
    config::{Admin, Mac, Vip, VipOpts},
    quic::ServerId,
};
use xlb_tests::{
    frames::{
        self, eth, ipv4, ipv6,
        quic::{self, long},
        ETH_IP, ETH_IPV6, LB_MAC,
    },
    xdp::{assert_one_verdict, test_agent, XDP_TX},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 9);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 2, 0, 0, 0, 9);
/// `--quic` VIP, backends with server IDs 101, 102, 103, 65535.
const QUIC4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 70);
/// Plain UDP VIP on the same port, same number of backends.
const PLAIN4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 71);
const QUIC6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x70);
const SERVER_IDS: [u16; 4] = [101, 102, 103, 65535];
const QUIC_EVENTS: [Stat; 4] = [Stat::QuicRouted, Stat::QuicUnknownId, Stat::QuicFallback, Stat::QuicNoId];

fn vip(s: &str) -> Vip {
    s.parse().expect("test VIP")
}

fn mac(i: u8) -> Mac {
    Mac([0x02, 0, 0, 0, 7, i])
}

/// An 8-byte connection ID (the agent's default `--quic-cid-len`).
fn cid(server_id: u16) -> [u8; 8] {
    encode_cid(server_id, &[0x5a, 0x11, 0x22, 0x33, 0x44])
}

struct Lb {
    agent: Agent,
}

/// Where a fixture's frame must go.
enum Want {
    /// The backend with this server ID.
    Server(u16),
    /// The VIP's table, by the shared hash.
    Hashed,
}

impl Lb {
    fn new() -> Lb {
        let mut agent = test_agent();
        let quic = VipOpts { quic: true, ..Default::default() };
        let mut add = |v: &str, opts: VipOpts, n: u8, ids: bool| {
            let v = vip(v);
            agent.add_vip_spec(v, &VipSpec { opts, ..Default::default() }).expect("add vip");
            for i in 1..=n {
                let ip: IpAddr =
                    if v.addr.is_ipv4() { IpAddr::V4(Ipv4Addr::new(10, 0, 7, i)) } else { format!("fd00::7:{i}").parse().expect("ip") };
                let sid = ids.then(|| ServerId(SERVER_IDS[i as usize - 1]));
                agent.add_backend_full(&v, (ip, Some(mac(i)), 1), None, None, sid).expect("add backend");
            }
        };
        add("10.0.0.70:443/udp", quic, 4, true);
        add("10.0.0.71:443/udp", VipOpts::default(), 4, false);
        add("[fd00::70]:443/udp", quic, 2, true);
        Lb { agent }
    }

    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>, Vec<i64>) {
        xlb_tests::xdp::run(&mut self.agent.dp, frame)
    }

    /// The MAC of the backend of `v` with `server_id` (from the agent).
    fn server(&self, v: &Vip, server_id: u16) -> [u8; 6] {
        let s = &self.agent.vips()[v];
        s.backends.values().find(|b| b.server_id == Some(ServerId(server_id))).and_then(|b| b.mac).expect("a backend with that ID").0
    }

    /// The server ID of the backend of `v` whose MAC is `m`.
    fn server_id_of(&self, v: &Vip, m: [u8; 6]) -> u16 {
        let s = &self.agent.vips()[v];
        s.backends.values().find(|b| b.mac == Some(Mac(m))).and_then(|b| b.server_id).expect("a backend with an ID").0
    }

    /// The backend MAC the agent's table and the shared hash predict.
    fn predicted(&self, v: &Vip, key: &FlowKey) -> [u8; 6] {
        let s = &self.agent.vips()[v];
        let id = s.table[(maglev_hash(&s.published, key) % s.table.len() as u32) as usize];
        s.backends.values().find(|b| b.id == id).and_then(|b| b.mac).expect("a backend of the VIP").0
    }

    /// Run `frame`: forwarded (one verdict), the frame out is the frame in
    /// with the backend's and the balancer's MACs, and exactly `event`
    /// among the QUIC counters moved. Returns the backend MAC.
    fn forwarded(&mut self, frame: &[u8], event: Option<Stat>, what: &str) -> [u8; 6] {
        let (a, out, d) = self.run(frame);
        assert_eq!(a, XDP_TX, "{what}: forwarded");
        assert_one_verdict(&d, Stat::Forwarded, what);
        let mut want = frame.to_vec();
        want[..6].copy_from_slice(&out[..6]);
        want[6..12].copy_from_slice(&LB_MAC);
        assert_eq!(out, want, "{what}: only the MACs change");
        for s in QUIC_EVENTS {
            assert_eq!(d[s as usize], (Some(s) == event) as i64, "{what}: counter {}", s.name());
        }
        out[..6].try_into().expect("six bytes")
    }
}

fn key4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> FlowKey {
    FlowKey::v4(src.octets(), sport.to_be(), dst.octets(), dport.to_be(), 17)
}

fn key6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> FlowKey {
    FlowKey::v6(src.octets(), sport.to_be(), dst.octets(), dport.to_be(), 17)
}

fn udp4(sport: u16, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    eth(ETH_IP, &[], &ipv4(CLIENT, dst, 17, &[], 0, &frames::udp(sport, 443, payload)))
}

fn udp6(sport: u16, payload: &[u8]) -> Vec<u8> {
    eth(ETH_IPV6, &[], &ipv6(CLIENT6, QUIC6, 17, &frames::udp(sport, 443, payload)))
}

#[test]
fn quic_fixtures_route_known_server_ids_and_hash_the_rest() {
    let mut lb = Lb::new();
    let q4 = vip("10.0.0.70:443/udp");
    let q6 = vip("[fd00::70]:443/udp");
    let unroutable = {
        let mut c = cid(102);
        c[0] = (CR_UNROUTABLE << 5) | 7;
        c
    };
    let other_config = {
        let mut c = cid(102);
        c[0] = (1 << 5) | 7;
        c
    };
    // A datagram whose UDP length leaves fewer bytes than a connection ID
    // (the rest of the frame is padding).
    let cut_short = {
        let mut f = udp4(0, QUIC4, &quic::short(&cid(101)));
        let udp = 14 + 20;
        f[udp + 4..udp + 6].copy_from_slice(&(8u16 + 5).to_be_bytes());
        f
    };
    let v2_handshake = long(VERSION_2, 3, &cid(103), &[1; 8]);
    let v2_zero_rtt = long(VERSION_2, 2, &cid(103), &[1; 8]);
    let zero_rtt = long(VERSION_1, 1, &cid(101), &[1; 8]);
    let unknown_version = long(0x0a0a_0a0a, 2, &cid(101), &[1; 8]);
    let long_dcid_too_short = quic::handshake(&[0, 0]);
    let table: Vec<(&str, Vec<u8>, Want, Stat)> = vec![
        ("short header, known ID", quic::short(&cid(101)), Want::Server(101), Stat::QuicRouted),
        ("short header, another known ID", quic::short(&cid(102)), Want::Server(102), Stat::QuicRouted),
        ("short header, ID 65535", quic::short(&cid(65535)), Want::Server(65535), Stat::QuicRouted),
        ("short header, unknown ID", quic::short(&cid(999)), Want::Hashed, Stat::QuicUnknownId),
        ("short header, ID 0", quic::short(&cid(0)), Want::Hashed, Stat::QuicNoId),
        ("short header, unroutable config rotation", quic::short(&unroutable), Want::Hashed, Stat::QuicNoId),
        ("short header, another config rotation", quic::short(&other_config), Want::Hashed, Stat::QuicNoId),
        ("long header v1 Handshake, known ID", quic::handshake(&cid(103)), Want::Server(103), Stat::QuicRouted),
        ("long header v2 Handshake, known ID", v2_handshake, Want::Server(103), Stat::QuicRouted),
        ("long header v1 Handshake, unknown ID", quic::handshake(&cid(4242)), Want::Hashed, Stat::QuicUnknownId),
        ("long header v1 Handshake, ID 0", quic::handshake(&cid(0)), Want::Hashed, Stat::QuicNoId),
        ("long header v1 Initial with a known ID in its DCID", quic::initial(&cid(101)), Want::Hashed, Stat::QuicNoId),
        ("long header v1 0-RTT with a known ID", zero_rtt, Want::Hashed, Stat::QuicNoId),
        ("long header v2 0-RTT with a known ID", v2_zero_rtt, Want::Hashed, Stat::QuicNoId),
        ("long header of an unknown version", unknown_version, Want::Hashed, Stat::QuicNoId),
        ("long header, DCID shorter than a server ID", long_dcid_too_short, Want::Hashed, Stat::QuicNoId),
        ("fixed bit clear (not QUIC v1/v2)", vec![0x01; 40], Want::Hashed, Stat::QuicNoId),
        ("too short to be QUIC", b"hello".to_vec(), Want::Hashed, Stat::QuicNoId),
    ];
    for (i, (what, payload, want, event)) in table.iter().enumerate() {
        // Every row is a new 5-tuple (a connection-table miss).
        let sport = 20000 + i as u16;
        let expected = match want {
            Want::Server(id) => lb.server(&q4, *id),
            Want::Hashed => lb.predicted(&q4, &key4(CLIENT, sport, QUIC4, 443)),
        };
        assert_eq!(lb.forwarded(&udp4(sport, QUIC4, payload), Some(*event), what), expected, "v4 {what}");
        // The same packet again: the connection table answers, no QUIC event.
        assert_eq!(lb.forwarded(&udp4(sport, QUIC4, payload), None, what), expected, "v4 {what}, again");
    }
    let mut f = cut_short;
    f[34..36].copy_from_slice(&29999u16.to_be_bytes());
    let want = lb.predicted(&q4, &key4(CLIENT, 29999, QUIC4, 443));
    assert_eq!(lb.forwarded(&f, Some(Stat::QuicNoId), "shorter than the CID length"), want);
    // IPv6: the same decisions.
    for (i, (what, payload, want, event)) in [
        ("v6 short header, known ID", quic::short(&cid(101)), Want::Server(101), Stat::QuicRouted),
        ("v6 short header, the other known ID", quic::short(&cid(102)), Want::Server(102), Stat::QuicRouted),
        ("v6 short header, an ID of the v4 VIP only", quic::short(&cid(103)), Want::Hashed, Stat::QuicUnknownId),
        ("v6 Handshake, known ID", quic::handshake(&cid(102)), Want::Server(102), Stat::QuicRouted),
        ("v6 Initial", quic::initial(&cid(101)), Want::Hashed, Stat::QuicNoId),
    ]
    .into_iter()
    .enumerate()
    {
        let sport = 21000 + i as u16;
        let expected = match want {
            Want::Server(id) => lb.server(&q6, id),
            Want::Hashed => lb.predicted(&q6, &key6(CLIENT6, sport, QUIC6, 443)),
        };
        assert_eq!(lb.forwarded(&udp6(sport, &payload), Some(event), what), expected, "{what}");
    }
}

#[test]
fn a_server_id_whose_backend_is_down_falls_back_to_the_hash() {
    let mut lb = Lb::new();
    let q4 = vip("10.0.0.70:443/udp");
    let down = lb.agent.vips()[&q4].backends.values().find(|b| b.server_id == Some(ServerId(102))).expect("102").ip;
    lb.agent.set_backend(&q4, down, None, Some(Admin::Maint), false).expect("maint");
    let down_mac = mac(2).0;
    let mut hashed = std::collections::BTreeSet::new();
    for sport in 22000..22016u16 {
        let want = lb.predicted(&q4, &key4(CLIENT, sport, QUIC4, 443));
        assert_ne!(want, down_mac, "the table no longer names the backend that is down");
        let got = lb.forwarded(&udp4(sport, QUIC4, &quic::short(&cid(102))), Some(Stat::QuicFallback), "ID of a backend that is down");
        assert_eq!(got, want, "sport {sport}: by the hash");
        hashed.insert(got);
    }
    assert!(hashed.len() >= 2, "fallback spreads like the hash: {hashed:?}");
    // Back up: routed to it again (new 5-tuples).
    lb.agent.set_backend(&q4, down, None, Some(Admin::Ready), false).expect("up");
    for sport in 22100..22104u16 {
        assert_eq!(lb.forwarded(&udp4(sport, QUIC4, &quic::short(&cid(102))), Some(Stat::QuicRouted), "up again"), down_mac);
    }
    // Its server ID removed (backend deleted): unknown.
    lb.agent.del_backend(&q4, down).expect("del");
    let want = lb.predicted(&q4, &key4(CLIENT, 22200, QUIC4, 443));
    assert_eq!(lb.forwarded(&udp4(22200, QUIC4, &quic::short(&cid(102))), Some(Stat::QuicUnknownId), "deleted"), want);
}

#[test]
fn a_udp_vip_without_quic_ignores_connection_ids() {
    let mut lb = Lb::new();
    let p4 = vip("10.0.0.71:443/udp");
    for (i, payload) in [quic::short(&cid(101)), quic::short(&cid(102)), quic::handshake(&cid(103)), quic::initial(&cid(101))].iter().enumerate() {
        let sport = 23000 + i as u16;
        let want = lb.predicted(&p4, &key4(CLIENT, sport, PLAIN4, 443));
        assert_eq!(lb.forwarded(&udp4(sport, PLAIN4, payload), None, "plain UDP VIP"), want);
    }
}

#[test]
fn a_client_whose_address_or_port_changes_stays_on_its_backend() {
    let mut lb = Lb::new();
    let q4 = vip("10.0.0.70:443/udp");
    let p4 = vip("10.0.0.71:443/udp");
    // The connection starts with an Initial: the hash picks its backend,
    // whose server ID the connection IDs it issues then carry.
    let first = key4(CLIENT, 5000, QUIC4, 443);
    let home = lb.predicted(&q4, &first);
    let dcid = cid(lb.server_id_of(&q4, home));
    assert_eq!(lb.forwarded(&udp4(5000, QUIC4, &quic::initial(&[0x77; 8])), Some(Stat::QuicNoId), "Initial"), home);
    assert_eq!(lb.forwarded(&udp4(5000, QUIC4, &quic::handshake(&dcid)), None, "Handshake, same 5-tuple"), home);
    assert_eq!(lb.forwarded(&udp4(5000, QUIC4, &quic::short(&dcid)), None, "1-RTT, same 5-tuple"), home);
    // NAT rebinding and migration: new ports and addresses the hash would
    // send elsewhere (chosen by the agent's own table).
    let mut moved = Vec::new();
    for n in 0..200u16 {
        let (src, sport) = (Ipv4Addr::new(198, 51, 100, (n % 50) as u8 + 1), 40000 + n);
        if lb.predicted(&q4, &key4(src, sport, QUIC4, 443)) != home {
            moved.push((src, sport));
        }
        if moved.len() == 6 {
            break;
        }
    }
    assert_eq!(moved.len(), 6, "some new 5-tuples hash to other backends");
    for &(src, sport) in &moved {
        let f = |dst| eth(ETH_IP, &[], &ipv4(src, dst, 17, &[], 0, &frames::udp(sport, 443, &quic::short(&dcid))));
        assert_eq!(lb.forwarded(&f(QUIC4), Some(Stat::QuicRouted), "migrated"), home, "{src}:{sport} stays on its backend");
        assert_eq!(lb.forwarded(&f(QUIC4), None, "migrated, next packet"), home, "{src}:{sport}: then by the table");
        // Without --quic the same datagrams follow the hash.
        let plain = lb.predicted(&p4, &key4(src, sport, PLAIN4, 443));
        assert_eq!(lb.forwarded(&f(PLAIN4), None, "plain VIP"), plain);
    }
}

#[test]
fn server_ids_are_checked_in_one_place_and_refusals_change_nothing() {
    let mut lb = Lb::new();
    let q4 = vip("10.0.0.70:443/udp");
    let p4 = vip("10.0.0.71:443/udp");
    let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
    let before = lb.agent.vips()[&q4].backends.len();
    let e = lb.agent.add_backend_full(&q4, (ip("10.0.7.9"), Some(mac(9)), 1), None, None, Some(ServerId(101))).expect_err("duplicate");
    assert!(e.to_string().contains("server ID 101") && !e.to_string().contains('\n'), "{e}");
    assert_eq!(lb.agent.vips()[&q4].backends.len(), before, "nothing added");
    let e = lb.agent.add_backend_full(&p4, (ip("10.0.7.9"), Some(mac(9)), 1), None, None, Some(ServerId(5))).expect_err("not quic");
    assert!(e.to_string().contains("--quic"), "{e}");
    let e = lb.agent.add_vip_spec(vip("10.0.0.72:443/tcp"), &VipSpec { opts: VipOpts { quic: true, ..Default::default() }, ..Default::default() });
    assert!(e.expect_err("tcp").to_string().contains("UDP"));
    // Still routed as before.
    assert_eq!(lb.forwarded(&udp4(24000, QUIC4, &quic::short(&cid(101))), Some(Stat::QuicRouted), "after refusals"), mac(1).0);
}

#[test]
fn the_cid_parser_keeps_verification_small() {
    // The CID parser is a BPF subprogram: inlined, it took `xlb_trace` past
    // the verifier's 1M-instruction limit. Both balancers stay far below.
    let mut lb = Lb::new();
    for name in [PROG_XLB, PROG_TRACE] {
        let n = lb.agent.dp.program(name).expect("program").info().expect("info").verified_instruction_count().expect("count");
        eprintln!("verifier processed {n} instructions for {name}");
        assert!(n < 500_000, "{name}: verifier processed {n} instructions");
    }
}
