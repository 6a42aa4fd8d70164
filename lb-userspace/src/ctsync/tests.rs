//! Which entries are sent, and how received ones map to this node's
//! backends, on agents over in-memory maps (no BPF, no root).

use super::*;
use crate::{
    agent::MemMaps,
    config::Mac,
    ha::tests::readiness::{node, rounds, vip, BACKENDS, VIPS},
};
use lb_common::PROTO_TCP;

/// `n` client flows to the first VIP (10.0.0.100:80/tcp).
fn flows(n: u32) -> Vec<FlowKey> {
    (0..n).map(|i| FlowKey::v4([172, 16, (i >> 8) as u8, i as u8], (10_000 + i as u16).to_be(), [10, 0, 0, 100], 80u16.to_be(), PROTO_TCP)).collect()
}

/// Where the first VIP's table sends each flow now: the entries a node
/// makes for flows that start now.
fn entries_now(a: &Agent<MemMaps>, keys: &[FlowKey]) -> Vec<(FlowKey, CtEntry, u64)> {
    let s = &a.vips()[&vip(VIPS[0])];
    keys.iter()
        .map(|k| {
            let id = s.table[flow_hash(k) as usize % s.table.len()];
            let gen = s.backends.values().find(|b| b.id == id).map(|b| b.gen).expect("a backend of the table");
            (*k, CtEntry { backend_id: id, gen, closed: false }, 0)
        })
        .collect()
}

fn add_fourth(a: &mut Agent<MemMaps>) {
    let ip: IpAddr = "10.0.0.14".parse().expect("ip");
    a.neighbour_changed(ip, Some(Mac([2, 0, 0, 0, 0, 0x14]))).expect("neigh");
    a.add_backends(&vip(VIPS[0]), &[(ip, None, 1)]).expect("backend");
}

#[test]
fn exactly_the_entries_the_table_no_longer_gives_are_sent() {
    let mut a = node(&[0, 1, 2]);
    let t = rounds(&mut a, 4, Instant::now(), |_| true);
    let keys = flows(3000);
    let established = entries_now(&a, &keys);
    assert!(Tables::of(&a).differing(established.clone()).is_empty(), "nothing differs while the table is the one that chose");

    // A backend is added: Maglev moves about a quarter of the flows.
    add_fourth(&mut a);
    rounds(&mut a, 4, t, |_| true);
    let tables = Tables::of(&a);
    let sent = tables.differing(established.clone());
    let now = entries_now(&a, &keys);
    let moved: Vec<FlowKey> = established.iter().zip(&now).filter(|(e, n)| e.1.backend_id != n.1.backend_id).map(|(e, _)| e.0).collect();
    eprintln!("{} of {} flows differ from the new table", moved.len(), keys.len());
    assert!(moved.len() > 500 && moved.len() < 1000, "about a quarter move: {}", moved.len());
    assert_eq!(sent.iter().map(|e| e.key).collect::<Vec<_>>(), moved, "exactly the moved flows");
    let s = &a.vips()[&vip(VIPS[0])];
    for (e, (_, old, _)) in sent.iter().zip(established.iter().filter(|(k, _, _)| moved.contains(k))) {
        let b = s.backends.values().find(|b| b.id == old.backend_id).expect("backend");
        assert_eq!(e.backend, b.ip, "sent with the backend it is on");
        assert_ne!(e.backend, "10.0.0.14".parse::<IpAddr>().expect("ip"), "no established flow is on the new backend");
    }

    // Closed, idle and stale entries are not sent.
    let mut odd = established.clone();
    for (i, e) in odd.iter_mut().enumerate() {
        match i % 3 {
            0 => e.1.closed = true,
            1 => e.2 = (MAX_AGE.as_nanos() >> CT_TIME_SHIFT) as u64 + 1,
            _ => e.1.gen = e.1.gen.wrapping_add(1),
        }
    }
    assert!(tables.differing(odd).is_empty());
}

#[test]
fn algorithms_a_peer_cannot_follow_send_every_open_entry() {
    let mut a = node(&[0, 1, 2]);
    rounds(&mut a, 4, Instant::now(), |_| true);
    let est = entries_now(&a, &flows(100));
    let mut t = Tables::of(&a);
    for v in t.vips.values_mut() {
        v.algo = Algo::LeastConn;
    }
    assert_eq!(t.differing(est).len(), 100);
}

#[test]
fn received_entries_map_to_this_nodes_own_ids() {
    // The peer added the backends in another order: other ids, same addresses.
    let mut a = node(&[0, 1, 2]);
    let mut b = node(&[2, 0, 1]);
    rounds(&mut a, 4, Instant::now(), |_| true);
    rounds(&mut b, 4, Instant::now(), |_| true);
    let tb = Tables::of(&b);
    let key = flows(1)[0];
    for ip in BACKENDS {
        let ip: IpAddr = ip.parse().expect("ip");
        let mine = b.vips()[&vip(VIPS[0])].backends[&ip].clone();
        assert_eq!(tb.resolve(&SyncEntry { key, backend: ip, idle: 0 }), Some((mine.id, mine.gen)), "{ip}");
        assert_ne!(a.vips()[&vip(VIPS[0])].backends[&ip].id, mine.id, "{ip}: the ids differ between nodes");
    }
    assert_eq!(tb.resolve(&SyncEntry { key, backend: "10.0.0.99".parse().expect("ip"), idle: 0 }), None, "unknown backend");
    assert_eq!(tb.resolve(&SyncEntry { key, backend: "fd00::11".parse().expect("ip"), idle: 0 }), None, "other family");
    let mut elsewhere = key;
    elsewhere.vip.port_be = 8080u16.to_be();
    assert_eq!(tb.resolve(&SyncEntry { key: elsewhere, backend: BACKENDS[0].parse().expect("ip"), idle: 0 }), None, "unknown VIP");
}

#[test]
fn peers_parse_with_a_default_port_and_one_line_errors() {
    assert_eq!("10.0.0.2".parse::<SyncPeer>().expect("peer").0, "10.0.0.2:7470".parse().expect("addr"));
    assert_eq!("10.0.0.2:9000".parse::<SyncPeer>().expect("peer").0.port(), 9000);
    assert_eq!("[fd00::2]:9000".parse::<SyncPeer>().expect("peer").0, "[fd00::2]:9000".parse().expect("addr"));
    assert_eq!("fd00::2".parse::<SyncPeer>().expect("peer").0.port(), DEFAULT_PORT);
    for bad in ["", "host", "10.0.0.2:0", "0.0.0.0", "224.0.0.1:7470", "10.0.0.2:99999"] {
        let e = bad.parse::<SyncPeer>().expect_err(bad).to_string();
        assert!(e.contains("invalid sync peer") && !e.contains('\n'), "{bad}: {e}");
    }
}

#[test]
fn the_key_file_must_be_private_and_long_enough() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("xlb-sync-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let f = dir.join("key");
    std::fs::write(&f, "0123456789abcdef0123\n").expect("write");
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let e = load_key(&f).expect_err("world-readable").to_string();
    assert!(e.contains("chmod 600"), "{e}");
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    assert_eq!(load_key(&f).expect("key"), b"0123456789abcdef0123");
    std::fs::write(&f, "short\n").expect("write");
    assert!(load_key(&f).expect_err("short").to_string().contains("at least 16"));
    assert!(load_key(&dir.join("missing")).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}
