//! End to end, issue 3: IPv6 through the balancer (MACs by neighbour
//! discovery), and long-lived TCP connections that must stay on their backend
//! while backends are added, reweighted and drained, and must move when their
//! backend dies. Real namespaces, real servers, the real `xlb`. Needs root.

use serde_json::Value;
use std::time::Duration;
use xlb_tests::{
    lab::{self, backend_ip, backend_ip6},
    scenario::{binaries, vip6_arg, vip_arg, Deployment},
    traffic::Held,
};

#[test]
fn ipv6_vip_balances_and_survives_a_dead_backend() {
    let (xlb, lab_bin) = binaries();
    let mut d = Deployment::start(&xlb, &lab_bin, 3, &[]).expect("deployment");
    let vip = vip6_arg();
    let ips: Vec<String> = (1..=3).map(|i| backend_ip6(i).to_string()).collect();
    d.configure_vip(&vip, &[], &ips).expect("configure");
    let ip6 = |i: usize| backend_ip6(i).to_string();
    d.wait_states_of(&vip, &ip6, &[1, 2, 3], Duration::from_secs(10)).expect("backends resolved by NDP and up");
    let target = format!("[{}]:80", lab::VIP6);
    let s = d.connect_to(&target, 300).expect("client");
    assert_eq!((s.ok, s.failed), (300, 0), "{:?}", s.errors);
    assert_eq!(s.by_backend.len(), 3, "{:?}", s.by_backend);
    for (b, n) in &s.by_backend {
        assert!((60..=140).contains(n), "{b} got {n} of 300");
    }
    d.lab.kill("server1").expect("kill");
    let t = d.wait_states_of(&vip, &ip6, &[2, 3], Duration::from_secs(5)).expect("b1 down");
    eprintln!("IPv6 backend death detected after {t:?}");
    let s = d.connect_to(&target, 200).expect("client");
    assert_eq!((s.ok, s.failed), (200, 0), "{:?}", s.errors);
    assert!(!s.by_backend.contains_key("b1"));
}

fn counter(st: &Value, name: &str) -> u64 {
    st["counters"][name].as_u64().unwrap_or(0)
}

#[test]
fn long_lived_connections_stay_put_through_changes_and_move_when_their_backend_dies() {
    let mut d = Deployment::serving(4, 3).expect("deployment serving b1-b3");
    let vip = vip_arg();

    // Phase 1: 50 connections for 6 s; meanwhile add b4, reweight b1, drain b2.
    d.spawn_hold("hold1", 50, 6000).expect("hold client");
    std::thread::sleep(Duration::from_millis(1500));
    d.cli_ok(&["backend", "add", &vip, &backend_ip(4).to_string()]).expect("add b4");
    d.cli_ok(&["backend", "set", &vip, &backend_ip(1).to_string(), "--weight", "3"]).expect("reweight b1");
    d.cli_ok(&["backend", "set", &vip, &backend_ip(2).to_string(), "--weight", "0"]).expect("drain b2");
    d.wait_states(&[1, 2, 3, 4], Duration::from_secs(5)).expect("b4 up");
    let st = d.status().expect("status");
    let b2 = &st["vips"][0]["backends"][1];
    assert_eq!(b2["ip"], backend_ip(2).to_string());
    assert!(b2["active_flows"].as_u64().unwrap_or(0) > 0, "drained b2 still has its flows: {b2}");
    // New connections avoid the drained backend and reach the new one.
    let s = d.connect(200).expect("client");
    assert_eq!(s.failed, 0, "{:?}", s.errors);
    assert!(!s.by_backend.contains_key("b2"), "no new flow to drained b2: {:?}", s.by_backend);
    assert!(s.by_backend.get("b4").copied().unwrap_or(0) > 0, "{:?}", s.by_backend);
    let report: Vec<Held> = d.report("hold1", Duration::from_secs(20)).expect("hold report");
    assert_eq!(report.len(), 50);
    for h in &report {
        assert!(h.broken.is_none() && !h.switched && h.pings >= 30, "connection did not survive: {h:?}");
    }
    let on_b2 = report.iter().filter(|h| h.backend == "b2").count();
    assert!(on_b2 > 0, "some long-lived connections were on the drained backend");

    // Phase 2: b3 drops off the network while connections to it are open.
    d.cli_ok(&["backend", "set", &vip, &backend_ip(2).to_string(), "--weight", "1"]).expect("undrain");
    d.spawn_hold("hold2", 40, 6000).expect("hold client");
    std::thread::sleep(Duration::from_millis(1500));
    let stale_before = counter(&d.status().expect("status"), "conntrack_stale");
    lab::sh("ip", &["-n", &d.lab.ns("b3"), "link", "set", "eth0", "down"]).expect("b3 off the network");
    d.wait_states(&[1, 2, 4], Duration::from_secs(5)).expect("b3 marked down");
    let report: Vec<Held> = d.report("hold2", Duration::from_secs(30)).expect("hold report");
    let (on_b3, others): (Vec<&Held>, Vec<&Held>) = report.iter().partition(|h| h.backend == "b3");
    assert!(!on_b3.is_empty(), "some connections were on b3");
    for h in &on_b3 {
        // Their packets were re-scheduled to a live backend, which has no such
        // connection and resets it: the client learns at once, instead of
        // retransmitting into a dead host.
        assert!(h.broken.as_deref().is_some_and(|e| e.contains("reset")), "b3 connection: {h:?}");
    }
    for h in &others {
        assert!(h.broken.is_none() && !h.switched, "a healthy backend's connection broke: {h:?}");
    }
    let stale_after = counter(&d.status().expect("status"), "conntrack_stale");
    assert!(stale_after > stale_before, "the dead backend's flows were re-scheduled (conntrack_stale)");
}
