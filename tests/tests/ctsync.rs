//! Connection-table sync on the loaded program (BPF_PROG_TEST_RUN): a
//! received entry is written where the program finds it, so the flow's
//! next packet goes to the synced backend, not the table's choice; an
//! entry this node saw more recently is kept; the walk that sends selects
//! exactly the flows whose backend differs from the table; forged
//! datagrams change nothing. Needs root.

use std::net::{IpAddr, Ipv4Addr};
use xlb::{
    agent::{Agent, AgentOptions},
    config::{CheckKind, HealthConfig, Mac, Vip},
    ctsync::{self, wire, Inserter, SyncEntry, SyncPeer, SyncSettings, Syncer, Tables},
    maps::{Datapath, LoadOptions},
};
use xlb_tests::{
    frames::{eth, ipv4, tcp, tcp_flags, ETH_IP, LB_MAC},
    xdp::{run, XDP_TX},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 9);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const KEY: &[u8] = b"a key the test's peers share, 32";

fn agent() -> Agent {
    let dp = Datapath::load(LoadOptions { max_vips: 8, conntrack_size: 65536, flow_keys: true, ..Default::default() })
        .expect("the XDP program loads (run the tests as root)");
    let health = HealthConfig { kind: CheckKind::None, ..Default::default() };
    let mut a = Agent::new(dp, AgentOptions { iface_mac: Mac(LB_MAC), accept_macs: Vec::new(), health }).expect("agent");
    let v: Vip = "10.0.0.100:80/tcp".parse().expect("vip");
    a.add_vip(v, lb_common::Algo::Maglev, 0).expect("vip");
    for i in 1..=3u8 {
        a.add_backend(&v, IpAddr::V4(Ipv4Addr::new(10, 0, 1, i)), Some(Mac([2, 0, 0, 0, 1, i])), 1).expect("backend");
    }
    a
}

/// The backend (last octet) a packet of the flow from `port` goes to now.
fn backend_of(a: &mut Agent, port: u16, flags: u8) -> u8 {
    let f = eth(ETH_IP, &[], &ipv4(CLIENT, VIP, 6, &[], 0, &tcp(port, 80, flags, b"")));
    let (action, out, _) = run(&mut a.dp, &f);
    assert_eq!(action, XDP_TX);
    out[5]
}

fn key(port: u16) -> lb_common::FlowKey {
    lb_common::FlowKey::v4(CLIENT.octets(), port.to_be(), VIP.octets(), 80u16.to_be(), lb_common::PROTO_TCP)
}

fn syncer(dir: &xlb_tests::lab::TempDir) -> Syncer {
    use std::os::unix::fs::PermissionsExt;
    let f = dir.join("key");
    std::fs::write(&f, KEY).expect("key");
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let peer: SyncPeer = "10.0.0.2".parse().expect("peer");
    Syncer::new(&SyncSettings { peers: vec![peer], key_file: f, listen: None }).expect("syncer")
}

#[test]
fn received_entries_steer_the_flows_and_the_walk_sends_what_differs() {
    let mut a = agent();
    let dir = xlb_tests::lab::TempDir::new("ctsync-test").expect("dir");
    let sync = syncer(&dir);
    let mut ins = Inserter::new(&a.dp).expect("inserter");
    let mut replay = wire::Replay::default();
    let now_ms = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let other = |b: u8| if b == 3 { 1 } else { b + 1 };

    // Flow 4001 was seen here a moment ago; flow 4100 never was.
    let table_4001 = backend_of(&mut a, 4001, tcp_flags::SYN);
    let (p_new, p_mine) = (4100u16, 4001u16);
    let t = Tables::of(&a);
    // What the peer says: p_new is on another backend than the table's
    // choice; p_mine is on another backend too, but idle for a minute.
    let table_new = {
        let s = &a.vips()[&"10.0.0.100:80/tcp".parse::<Vip>().expect("vip")];
        let id = s.table[lb_common::hash::flow_hash(&key(p_new)) as usize % s.table.len()];
        s.backends.values().find(|b| b.id == id).map(|b| b.mac.expect("mac").0[5]).expect("backend")
    };
    let peer_new = other(table_new);
    let peer_mine = other(table_4001);
    let ip = |last: u8| IpAddr::V4(Ipv4Addr::new(10, 0, 1, last));
    let entries = [
        SyncEntry { key: key(p_new), backend: ip(peer_new), idle: 0 },
        SyncEntry { key: key(p_mine), backend: ip(peer_mine), idle: 3600 },
        SyncEntry { key: key(4200), backend: "10.0.9.9".parse().expect("ip"), idle: 0 },
    ];
    let mut seq = 0;
    let d = wire::encode(KEY, 77, &mut seq, now_ms(), &entries).remove(0);

    // Forged first: a wrong key, then a bit flipped: nothing is written.
    let forged = wire::encode(b"not the key, but just as long!!!", 77, &mut seq, now_ms(), &entries).remove(0);
    sync.receive(&forged, &mut replay, &t, &mut ins);
    let mut flipped = d.clone();
    flipped[40] ^= 1;
    sync.receive(&flipped, &mut replay, &t, &mut ins);
    assert_eq!(backend_of(&mut a, p_new, tcp_flags::ACK), table_new, "forged entries change nothing");

    sync.receive(&d, &mut replay, &t, &mut ins);
    sync.receive(&d, &mut replay, &t, &mut ins);
    let st = sync.stats();
    eprintln!("{}", st.line());
    assert_eq!((st.dropped_unauthenticated, st.dropped_stale, st.received_datagrams), (2, 1, 1), "{st:?}");
    assert_eq!((st.inserted, st.kept_newer, st.unknown_backend), (1, 1, 1), "{st:?}");

    // The program follows the synced entry (a non-SYN packet: an
    // established flow arriving after a failover), and keeps its own
    // more recent one.
    assert_eq!(backend_of(&mut a, p_new, tcp_flags::ACK), peer_new, "the synced backend, not the table's {table_new}");
    assert_eq!(backend_of(&mut a, p_mine, tcp_flags::ACK), table_4001, "this node's newer entry kept");

    // The walk this node's sender makes finds the synced flow (its key was
    // written beside the entry) and sends it on: it differs from the table.
    let reader = a.dp.conntrack_reader().expect("reader");
    let keys = xlb::conntrack::KeysView::map(a.dp.flow_keys_map(), a.dp.opts.flow_key_slots(), false).expect("keys");
    let all = ctsync::keyed_entries(reader.view(), &keys, &a.dp.conntrack_seed());
    let sent = Tables::of(&a).differing(all);
    assert_eq!(sent.iter().map(|e| (e.key, e.backend)).collect::<Vec<_>>(), vec![(key(p_new), ip(peer_new))], "exactly the flow off the table");
}
