//! End to end through real namespaces and the real `xlb` binary: a `--quic`
//! UDP VIP whose backends have server IDs. A client's QUIC-shaped
//! datagrams carrying a backend's server ID in their connection ID reach
//! that backend from whatever address and port they come (NAT rebinding,
//! migration); the backends answer directly. Needs root.

use lb_common::quic::encode_cid;
use std::time::Duration;
use xlb_tests::{
    frames::quic,
    lab::{self, backend_ip, VIP},
    scenario::{binaries, Deployment},
};

/// A second address of the client (a migration to another address).
const CLIENT_MOVED: &str = "10.200.0.3";
const PORT: u16 = 5353;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn a_quic_client_that_changes_address_and_port_stays_on_its_backend() {
    let (xlb, lab_bin) = binaries();
    let d = Deployment::start(&xlb, &lab_bin, 3, &[]).expect("deployment");
    let vip = format!("{VIP}:{PORT}/udp");
    d.cli_ok(&["vip", "add", &vip, "--quic"]).expect("vip add --quic");
    for i in 1..=3usize {
        let sid = (100 + i).to_string();
        d.cli_ok(&["backend", "add", &vip, &backend_ip(i).to_string(), "--server-id", &sid]).expect("backend add --server-id");
    }
    d.wait_states_of(&vip, &|i| backend_ip(i).to_string(), &[1, 2, 3], Duration::from_secs(10)).expect("backends up");
    // Status shows the VIP's mode and each backend's server ID.
    let text = d.cli_ok(&["status"]).expect("status");
    assert!(text.contains(" quic"), "{text}");
    for i in 1..=3 {
        assert!(text.contains(&format!("server-id={}", 100 + i)), "{text}");
    }
    let client = d.lab.ns("client");
    lab::sh("ip", &["-n", &client, "addr", "add", &format!("{CLIENT_MOVED}/24"), "dev", "eth0"]).expect("second client address");
    let target = format!("{VIP}:{PORT}");
    let send = |bind: &str, payload: &[u8], count: u16| -> Vec<String> {
        let out = d
            .lab
            .run("client", &lab_bin, &["datagrams", "--target", &target, "--bind", bind, "--hex", &hex(payload), "--count", &count.to_string()])
            .expect("xlb-lab datagrams");
        assert!(out.status.success(), "datagrams: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
    };

    // Initials (client-chosen DCIDs) from new ports go by the hash: spread.
    let mut hashed = std::collections::BTreeSet::new();
    for n in 0..12u8 {
        let who = send("10.200.0.2:0", &quic::initial(&[n; 8]), 1);
        assert_ne!(who[0], "-", "Initial {n} answered");
        hashed.insert(who[0].clone());
    }
    assert!(hashed.len() >= 2, "Initials from different ports spread over the backends: {hashed:?}");

    // One connection: its Initial picks a backend; the connection IDs that
    // backend issues carry its server ID.
    let first = send("10.200.0.2:41000", &quic::initial(&[0x99; 8]), 1);
    let home = first[0].clone();
    let n: usize = home.trim_start_matches('b').parse().expect("a backend name bN");
    let dcid: [u8; 8] = encode_cid(100 + n as u16, &[1, 2, 3, 4, 5]);
    assert_eq!(send("10.200.0.2:41000", &quic::short(&dcid), 5), vec![home.clone(); 5], "same 5-tuple");
    // NAT rebinding: new source ports; migration: a new address, new ports.
    for bind in ["10.200.0.2:0", CLIENT_MOVED] {
        for _ in 0..10 {
            let bind = if bind.contains(':') { bind.to_string() } else { format!("{bind}:0") };
            assert_eq!(send(&bind, &quic::short(&dcid), 3), vec![home.clone(); 3], "from {bind}: still {home}");
        }
    }
    let st = d.status().expect("status");
    let routed = st["counters"]["quic_routed"].as_u64().unwrap_or(0);
    assert!(routed >= 20, "every new 5-tuple was routed by its connection ID: {}", st["counters"]);
    assert!(st["counters"]["quic_no_id"].as_u64().unwrap_or(0) >= 13, "Initials are hashed: {}", st["counters"]);
    let v = st["vips"].as_array().expect("vips").iter().find(|v| v["vip"] == vip.as_str()).expect("the VIP");
    assert_eq!(v["quic"], true);

    // Bad input: one line each, nothing changes.
    for (args, want) in [
        (vec!["vip", "add", "10.200.0.101:443/tcp", "--quic"], "UDP"),
        (vec!["backend", "add", &vip, "10.200.0.50", "--server-id", "101"], "server ID 101"),
        (vec!["backend", "add", &vip, "10.200.0.50", "--server-id", "0"], "1..=65535"),
        (vec!["backend", "add", &vip, "10.200.0.50", "--server-id", "65536"], "1..=65535"),
    ] {
        let out = d.cli(&args).expect("xlb");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want) && err.trim_end().lines().count() == 1, "{args:?}: {err}");
    }
    assert_eq!(d.status().expect("status")["vips"].as_array().expect("vips").len(), 1, "nothing added");
}
