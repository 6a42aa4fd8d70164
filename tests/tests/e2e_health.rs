//! End to end, issue 4 (health checks): HTTP checks that take a backend out
//! on HTTP 500 and bring it back, UDP checks, per-backend overrides and
//! fail-open from a config file. Real namespaces, servers and `xlb`. Root.

use std::time::Duration;
use xlb_tests::{
    lab::{backend_ip, VIP},
    scenario::{binaries, vip_arg, Deployment},
};

fn backend(d: &Deployment, vip: &str, ip: &str) -> serde_json::Value {
    let st = d.status().expect("status");
    let v = st["vips"].as_array().and_then(|vs| vs.iter().find(|v| v["vip"] == vip).cloned()).expect("vip listed");
    v["backends"].as_array().and_then(|bs| bs.iter().find(|b| b["ip"] == ip).cloned()).expect("backend listed")
}

#[test]
fn http_check_takes_out_a_backend_answering_500_and_brings_it_back() {
    let d = Deployment::serving_with(3, 3, &["--check", "http", "--check-path", "/health", "--check-status", "200-299"]).expect("deployment");
    let vip = vip_arg();
    let b2 = backend(&d, &vip, &backend_ip(2).to_string());
    assert_eq!(b2["check"], "http");
    assert!(b2["check_latency_ms"].as_f64().is_some_and(|l| l > 0.0 && l < 250.0), "{b2}");

    std::fs::write(d.lab.dir.join("fail-b2"), "").expect("fail b2");
    let t = d.wait_states(&[1, 3], Duration::from_secs(5)).expect("b2 out on HTTP 500");
    eprintln!("HTTP 500 detected after {t:?}");
    let b2 = backend(&d, &vip, &backend_ip(2).to_string());
    assert!(b2["reason"].as_str().is_some_and(|r| r.contains("HTTP 500")), "{b2}");
    let s = d.connect(150).expect("client");
    assert_eq!(s.failed, 0, "{:?}", s.errors);
    assert!(!s.by_backend.contains_key("b2"));

    std::fs::remove_file(d.lab.dir.join("fail-b2")).expect("heal b2");
    d.wait_states(&[1, 2, 3], Duration::from_secs(5)).expect("b2 back");
    let b2 = backend(&d, &vip, &backend_ip(2).to_string());
    assert!(b2["transitions"].as_u64() >= Some(2), "down and up again: {b2}");
}

#[test]
fn udp_check_sees_a_dead_udp_service() {
    let (xlb, lab_bin) = binaries();
    let mut d = Deployment::start(&xlb, &lab_bin, 3, &[]).expect("deployment");
    let vip = format!("{VIP}:5353/udp");
    let ips: Vec<String> = (1..=3).map(|i| backend_ip(i).to_string()).collect();
    d.configure_vip(&vip, &["--check", "udp", "--check-payload", "ping", "--check-expect", "ping"], &ips).expect("configure");
    let ip = |i: usize| backend_ip(i).to_string();
    d.wait_states_of(&vip, &ip, &[1, 2, 3], Duration::from_secs(10)).expect("up by UDP replies");
    assert_eq!(backend(&d, &vip, &ip(1))["check"], "udp");
    d.lab.kill("server1").expect("kill");
    d.wait_states_of(&vip, &ip, &[2, 3], Duration::from_secs(5)).expect("b1 down");
    let b1 = backend(&d, &vip, &ip(1));
    let why = b1["reason"].as_str().unwrap_or("");
    assert!(why.contains("refused") || why.contains("timeout"), "{b1}");
}

#[test]
fn config_file_overrides_per_backend_and_fails_open() {
    let (xlb, lab_bin) = binaries();
    let dir = xlb_tests::lab::TempDir::new("health").expect("scratch dir");
    let cfg = dir.join("xlb.toml");
    let toml = format!(
        "[[vip]]\naddress = \"{}\"\nall_down = \"fail-open\"\n[vip.health]\nkind = \"http\"\nhttp_path = \"/health\"\nfall = 2\n\
         [[vip.backend]]\nip = \"{}\"\n[[vip.backend]]\nip = \"{}\"\n[[vip.backend]]\nip = \"{}\"\n[vip.backend.health]\nkind = \"tcp\"\n",
        vip_arg(),
        backend_ip(1),
        backend_ip(2),
        backend_ip(3)
    );
    std::fs::write(&cfg, toml).expect("config");
    let cfg_arg = cfg.to_string_lossy().into_owned();
    let d = Deployment::start(&xlb, &lab_bin, 3, &["--config", &cfg_arg]).expect("deployment");
    d.wait_states(&[1, 2, 3], Duration::from_secs(10)).expect("up");
    assert_eq!(backend(&d, &vip_arg(), &backend_ip(3).to_string())["check"], "tcp", "per-backend override");
    // Health endpoints fail everywhere: b3 only has a TCP check, so it stays.
    for i in 1..=3 {
        std::fs::write(d.lab.dir.join(format!("fail-b{i}")), "").expect("fail");
    }
    d.wait_states(&[3], Duration::from_secs(5)).expect("b1, b2 out; b3 up by its TCP check");
    // Now b3's server dies too: every backend is down, and the VIP fails open.
    let mut d = d;
    d.lab.kill("server3").expect("kill b3");
    d.wait_states(&[], Duration::from_secs(5)).expect("all down");
    let st = d.status().expect("status");
    assert_eq!(st["vips"][0]["failing_open"], true, "{}", st["vips"][0]);
    let s = d.connect(60).expect("client");
    // b1 and b2 still serve (only their health URL fails); b3 is really dead,
    // so about a third of the new connections fail: fail-open forwards anyway.
    assert!(s.by_backend.get("b1").copied().unwrap_or(0) > 0 && s.by_backend.get("b2").copied().unwrap_or(0) > 0, "{:?}", s.by_backend);
    assert!(s.ok >= 20, "fail-open keeps the service reachable: {} ok", s.ok);
}

#[test]
fn backend_set_reports_table_changes_and_dry_runs() {
    let d = Deployment::serving(3, 3).expect("deployment");
    let vip = vip_arg();
    let b2 = backend_ip(2).to_string();
    let out = d.cli_ok(&["backend", "set", &vip, &b2, "--weight", "4", "--dry-run"]).expect("dry run");
    assert!(out.contains("would change (dry run, nothing applied)"), "{out}");
    assert_eq!(backend(&d, &vip, &b2)["weight"], 1, "dry run applied nothing");
    let out = d.cli_ok(&["backend", "set", &vip, &b2, "--drain"]).expect("drain");
    assert!(out.starts_with("table: ") && out.contains("of 65537 entries changed"), "{out}");
    assert_eq!(backend(&d, &vip, &b2)["state"], "drain");
    let s = d.connect(100).expect("client");
    assert_eq!(s.failed, 0);
    assert!(!s.by_backend.contains_key("b2"), "no new connection to a draining backend");
    d.cli_ok(&["backend", "set", &vip, &b2, "--up"]).expect("up");
    assert_eq!(backend(&d, &vip, &b2)["state"], "up");
    let out = d.cli(&["backend", "set", &vip, &b2]).expect("run");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("nothing to change"));
    let out = d.cli(&["backend", "set", &vip, &b2, "--drain", "--maint"]).expect("run");
    assert!(!out.status.success(), "conflicting states are refused");
}

#[test]
fn prometheus_metrics_are_opt_in_and_read_only() {
    let (xlb, lab_bin) = binaries();
    let addr = format!("{}:9100", xlb_tests::lab::LB_IP);
    let d = Deployment::start(&xlb, &lab_bin, 2, &["--metrics", &addr]).expect("deployment");
    d.configure().expect("configure");
    d.wait_states(&[1, 2], Duration::from_secs(10)).expect("up");
    let s = d.connect(50).expect("client");
    assert_eq!(s.failed, 0);
    let get = |method: &str, path: &str| {
        let out = d.lab.run("client", &d.lab_bin, &["get", "--target", &addr, "--path", path, "--method", method]).expect("get");
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    };
    let body = get("GET", "/metrics");
    assert!(body.starts_with("HTTP/1.") && body[..12].ends_with(" 200"), "{body}");
    let vip = vip_arg();
    let b1 = backend_ip(1);
    assert!(body.contains(&format!("xlb_backend_up{{vip=\"{vip}\",backend=\"{b1}\"}} 1")), "{body}");
    assert!(body.contains("# TYPE xlb_datapath_total counter"));
    let fwd: f64 = body
        .lines()
        .find(|l| l.starts_with("xlb_datapath_total{counter=\"forwarded\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .expect("forwarded counter");
    assert!(fwd >= 150.0, "forwarded {fwd}");
    assert!(body.contains("xlb_backend_check_latency_seconds{"));
    assert!(body.contains("xlb_datapath_memory_bytes{map=\""), "{body}");
    let status_line = |r: String| r.lines().next().unwrap_or_default().to_string();
    assert!(status_line(get("GET", "/admin")).ends_with(" 404 Not Found"));
    assert!(status_line(get("POST", "/metrics")).ends_with(" 405 Method Not Allowed"), "read-only");
}

#[test]
fn agent_checks_set_weights_and_states_live() {
    let d = Deployment::serving_with(3, 3, &["--check-agent-port", "7777", "--check-interval-ms", "100"]).expect("deployment");
    let vip = vip_arg();
    let share = |i: usize| backend(&d, &vip, &backend_ip(i).to_string())["table_share"].as_f64().unwrap_or(0.0);
    // b1's agent reports 50 %: its share of the table halves (0.5 : 1 : 1).
    std::fs::write(d.lab.dir.join("agent-b1"), "50%\n").expect("agent b1");
    d.wait("b1 at half weight", Duration::from_secs(5), || Ok((share(1) - 0.2).abs() < 0.01)).expect("50%");
    assert!(backend(&d, &vip, &backend_ip(1).to_string())["agent"].as_str().is_some_and(|a| a.contains("50%")));
    // b2's agent says drain: no new flows, state shows it.
    std::fs::write(d.lab.dir.join("agent-b2"), "drain\n").expect("agent b2");
    d.wait("b2 draining", Duration::from_secs(5), || Ok(backend(&d, &vip, &backend_ip(2).to_string())["state"] == "drain"))
        .expect("drain");
    let s = d.connect(100).expect("client");
    assert_eq!(s.failed, 0);
    assert!(!s.by_backend.contains_key("b2"), "{:?}", s.by_backend);
    // b3's agent says down; then everyone is back to "up 100%".
    std::fs::write(d.lab.dir.join("agent-b3"), "down\n").expect("agent b3");
    d.wait("b3 down by its agent", Duration::from_secs(5), || Ok(backend(&d, &vip, &backend_ip(3).to_string())["state"] == "down"))
        .expect("down");
    assert!(backend(&d, &vip, &backend_ip(3).to_string())["reason"].as_str().is_some_and(|r| r.contains("agent")));
    for i in 1..=3 {
        std::fs::write(d.lab.dir.join(format!("agent-b{i}")), "up 100%\n").expect("agent");
    }
    d.wait("all back at full weight", Duration::from_secs(5), || Ok((1..=3).all(|i| (share(i) - 1.0 / 3.0).abs() < 0.01)))
        .expect("back");
}

#[test]
fn a_backend_whose_mac_changes_is_followed_live() {
    // Checks once a minute: only the neighbour subscription can be quick.
    let d = Deployment::serving_with(2, 2, &["--check", "tcp", "--check-interval-ms", "60000"]).expect("deployment");
    let vip = vip_arg();
    let b2 = backend_ip(2).to_string();
    let new_mac = "02:00:00:00:aa:22";
    assert_ne!(backend(&d, &vip, &b2)["mac"], new_mac);
    // The backend's NIC is replaced (new MAC) and it talks to the balancer,
    // which learns the new address from its ARP request.
    let ns = d.lab.ns("b2");
    xlb_tests::lab::sh("ip", &["-n", &ns, "link", "set", "eth0", "address", new_mac]).expect("new MAC");
    xlb_tests::lab::sh("ip", &["-n", &ns, "neigh", "flush", "all"]).expect("flush");
    let lb = format!("{}:9", xlb_tests::lab::LB_IP);
    let _ = d.lab.run("b2", &d.lab_bin, &["get", "--target", &lb]);
    let t = d
        .wait("the new MAC", Duration::from_secs(5), || Ok(backend(&d, &vip, &b2)["mac"] == new_mac))
        .expect("followed without operator action");
    eprintln!("MAC change followed after {t:?}");
    assert!(d.lab.log("agent").contains(&format!("backend {b2} moved to {new_mac}")));
    let s = d.connect(100).expect("client");
    assert_eq!(s.failed, 0, "{:?}", s.errors);
    assert!(s.by_backend.get("b2").copied().unwrap_or(0) > 0, "traffic reaches b2 at its new MAC: {:?}", s.by_backend);
}
