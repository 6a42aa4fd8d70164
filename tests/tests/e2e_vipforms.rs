//! End to end through real namespaces and the real `xlb` binary: an
//! any-port VIP and a prefix VIP serving real TCP on several ports and
//! addresses, and a VIP answering pings in the datapath (the echo request
//! comes from a raw socket in the client namespace: `xlb-lab ping`).
//! Needs root.

use std::time::Duration;
use xlb_tests::{
    lab::{self, backend_ip, LB_IP, VIP},
    scenario::{binaries, Deployment},
};

/// The prefix VIP's network (on the backends' loopback, routed to the
/// balancer by the client).
const PREFIX: &str = "10.201.0.0/24";

#[test]
fn any_port_and_prefix_vips_serve_real_tcp_and_a_vip_answers_ping() {
    let (xlb, lab_bin) = binaries();
    let mut d = Deployment::start(&xlb, &lab_bin, 2, &[]).expect("deployment");
    // Backends: the prefix's addresses are theirs too, and they serve two
    // more ports; the client routes the prefix to the balancer.
    for i in 1..=2usize {
        let ns = d.lab.ns(&format!("b{i}"));
        lab::sh("ip", &["-n", &ns, "addr", "add", PREFIX, "dev", "lo"]).expect("prefix on lo");
        for port in ["8080", "9443"] {
            let name = format!("b{i}");
            d.lab.spawn(&format!("server{i}-{port}"), &name, &lab_bin, &["serve", "--name", &name, "--port", port]).expect("server");
        }
    }
    let client = d.lab.ns("client");
    lab::sh("ip", &["-n", &client, "route", "add", PREFIX, "via", &LB_IP.to_string()]).expect("client route");

    let any = format!("{VIP}:*/tcp");
    let prefix = format!("{PREFIX}:*/tcp");
    let backends: Vec<String> = (1..=2).map(|i| backend_ip(i).to_string()).collect();
    // An any-port VIP checked on port 80, answering pings.
    d.configure_vip(&any, &["--check-port", "80", "--answer-ping"], &backends).expect("any-port VIP");
    d.configure_vip(&prefix, &["--check-port", "80"], &backends).expect("prefix VIP");
    d.wait_states_of(&any, &|i| backend_ip(i).to_string(), &[1, 2], Duration::from_secs(10)).expect("any-port backends up");
    d.wait_states_of(&prefix, &|i| backend_ip(i).to_string(), &[1, 2], Duration::from_secs(10)).expect("prefix backends up");

    for target in [
        format!("{VIP}:80"),
        format!("{VIP}:8080"),
        format!("{VIP}:9443"),
        "10.201.0.1:80".to_string(),
        "10.201.0.77:8080".to_string(),
        "10.201.0.254:9443".to_string(),
    ] {
        let s = d.connect_to(&target, 60).expect("client");
        assert_eq!((s.ok, s.failed), (60, 0), "{target}: {:?}", s.errors);
        let who: Vec<&str> = s.by_backend.keys().map(String::as_str).collect();
        assert_eq!(who, ["b1", "b2"], "{target}: both backends answer: {:?}", s.by_backend);
    }

    // Ping: answered by the datapath for the any-port VIP's address.
    let out = d.lab.run("client", &lab_bin, &["ping", "--target", &VIP.to_string(), "--count", "5"]).expect("ping");
    assert!(out.status.success(), "ping: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "5", "every echo answered with a correct reply");
    let st = d.status().expect("status");
    assert!(st["counters"]["echo_replied"].as_u64().unwrap_or(0) >= 5, "{}", st["counters"]);
    // The prefix VIP does not answer pings: no reply (nobody else owns it on the balancer).
    let out = d.lab.run("client", &lab_bin, &["ping", "--target", "10.201.0.1", "--count", "2"]).expect("ping");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "no --answer-ping: no reply");
    let vips = st["vips"].as_array().expect("vips");
    let shown: Vec<&str> = vips.iter().filter_map(|v| v["vip"].as_str()).collect();
    assert!(shown.contains(&any.as_str()) && shown.contains(&prefix.as_str()), "{shown:?}");
    assert!(vips.iter().any(|v| v["vip"] == any.as_str() && v["answer_ping"] == true));
    // Bad forms: one line each, nothing changes.
    for (args, want) in [
        (vec!["vip", "add", "10.202.0.1:*/tcp"], "--check-port"),
        (vec!["vip", "add", "10.202.0.1/24:80/tcp"], "host bits"),
        (vec!["vip", "add", &prefix, "--check-port", "80"], "already exists"),
        (vec!["vip", "add", "10.202.0.1:80/tcp", "--hash", "dst-port", "--algo", "rr"], "maglev"),
    ] {
        let out = d.cli(&args).expect("xlb");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want) && err.trim_end().lines().count() == 1, "{args:?}: {err}");
    }
}
