//! End to end, issue 11 (part): what xlb gives keepalived and routing
//! daemons, on the real agent in namespaces: `xlb ha check` exit codes,
//! `--announce-table` routes following readiness, drain, the grace while no
//! agent answers, and withdrawal on detach. Needs root.

use std::{process::Output, time::Duration};
use xlb_tests::{
    lab::{self, backend_ip},
    scenario::{binaries, vip_arg, Deployment},
};

const TABLE: &str = "100";

fn routes(d: &Deployment) -> String {
    lab::sh("ip", &["-n", &d.lab.ns("lb"), "route", "show", "table", TABLE]).unwrap_or_default()
}

fn check(d: &Deployment, grace: &str) -> (i32, String) {
    let out: Output = d.cli(&["ha", "check", "--grace", grace]).expect("xlb ha check");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text.trim().to_string())
}

#[test]
fn readiness_announcements_drain_and_grace_follow_the_node() {
    let (xlb, lab_bin) = binaries();
    let mut d = Deployment::start(&xlb, &lab_bin, 3, &["--announce-table", TABLE]).expect("deployment");
    let vip = lab::VIP.to_string();
    // No VIP yet: not ready, nothing announced.
    let (code, line) = check(&d, "10s");
    assert_eq!(code, 1, "{line}");
    assert!(line.starts_with("not ready: no VIPs"), "{line}");

    let ips: Vec<String> = (1..=3).map(|i| backend_ip(i).to_string()).collect();
    d.configure_vip(&vip_arg(), &[], &ips).expect("vip");
    d.wait_states(&[1, 2, 3], Duration::from_secs(10)).expect("backends up");
    d.wait("the announcement", Duration::from_secs(3), || Ok(routes(&d).contains(&vip))).expect("announced");
    let r = routes(&d);
    assert!(r.contains(&format!("{vip} dev eth0 proto 245")), "{r}");
    let (code, line) = check(&d, "10s");
    assert_eq!((code, line.starts_with("ready")), (0, true), "{line}");
    let st = d.status().expect("status");
    assert_eq!(st["ha"]["ready"], true, "{st}");
    assert_eq!(st["vips"][0]["table_fingerprint"].as_str().map(str::len), Some(16), "{st}");

    // A VIP with a non-Maglev algorithm on an HA node: warned, one line.
    let out = d.cli(&["vip", "add", "10.200.0.101:80/tcp", "--algo", "least-conn"]).expect("vip add");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("warning: with HA, only maglev and source-hash"), "{err}");
    d.cli_ok(&["vip", "del", "10.200.0.101:80/tcp"]).expect("vip del");

    // Drain: withdrawn, check fails, forwarding goes on.
    d.cli_ok(&["ha", "drain"]).expect("drain");
    d.wait("the withdrawal", Duration::from_secs(3), || Ok(!routes(&d).contains(&vip))).expect("withdrawn");
    let (code, line) = check(&d, "10s");
    assert_eq!(code, 1, "{line}");
    assert!(line.contains("drained"), "{line}");
    let s = d.connect(30).expect("client");
    assert_eq!(s.failed, 0, "a drained node still forwards: {:?}", s.errors);
    d.cli_ok(&["ha", "undrain"]).expect("undrain");
    d.wait("the announcement", Duration::from_secs(3), || Ok(routes(&d).contains(&vip))).expect("announced again");

    // Every backend's server dies: no usable backend, withdrawn.
    for i in 1..=3 {
        d.lab.kill(&format!("server{i}")).expect("kill a server");
    }
    d.wait("the withdrawal", Duration::from_secs(10), || Ok(!routes(&d).contains(&vip))).expect("withdrawn when no backend serves");
    let (code, line) = check(&d, "10s");
    assert_eq!(code, 1, "{line}");
    assert!(line.contains("no usable backend"), "{line}");
    for i in 1..=3 {
        let fail = d.lab.dir.join(format!("fail-b{i}")).to_string_lossy().into_owned();
        let agent = d.lab.dir.join(format!("agent-b{i}")).to_string_lossy().into_owned();
        let args = ["serve", "--name", &format!("b{i}"), "--port", "80", "--fail-file", &fail, "--udp-port", "5353", "--agent-port", "7777", "--agent-file", &agent];
        d.lab.spawn(&format!("server{i}"), &format!("b{i}"), &lab_bin, &args).expect("restart a server");
    }
    d.wait("the announcement", Duration::from_secs(10), || Ok(routes(&d).contains(&vip))).expect("announced after recovery");

    // The agent is killed: routes stay (forwarding goes on); `ha check`
    // answers from the last verdict within the grace, not after it.
    d.lab.kill("agent").expect("kill -9 the agent");
    assert!(routes(&d).contains(&vip), "announcements outlive the agent with the forwarding");
    let (code, line) = check(&d, "10s");
    assert_eq!(code, 0, "{line}");
    assert!(line.contains("within the grace"), "{line}");
    std::thread::sleep(Duration::from_millis(1200));
    let (code, line) = check(&d, "1s");
    assert_eq!(code, 1, "{line}");
    assert!(line.contains("grace"), "{line}");

    // A new agent adopts; readiness comes back without a withdrawal.
    d.start_agent("agent2", &["--announce-table", TABLE]).expect("second agent");
    d.wait("readiness", Duration::from_secs(5), || Ok(check(&d, "10s").0 == 0)).expect("ready again");
    assert!(routes(&d).contains(&vip));

    // Detach: forwarding stops, so do the announcements.
    d.cli_ok(&["detach"]).expect("detach");
    assert!(!routes(&d).contains(&vip), "withdrawn on detach: {}", routes(&d));
    let (code, line) = check(&d, "10s");
    assert_eq!(code, 1, "{line}");
}

#[test]
fn ha_check_bad_arguments_exit_2() {
    let (xlb, _) = binaries();
    let out = std::process::Command::new(&xlb).args(["ha", "check", "--grace", "soon"]).output().expect("run xlb");
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn flooded_frames_to_a_mac_nobody_owns_are_not_forwarded() {
    let (xlb, lab_bin) = binaries();
    let d = Deployment::start(&xlb, &lab_bin, 3, &[]).expect("deployment");
    let vip = format!("{}:5353/udp", lab::VIP);
    let ips: Vec<String> = (1..=3).map(|i| backend_ip(i).to_string()).collect();
    d.configure_vip(&vip, &["--check", "none"], &ips).expect("vip");
    d.wait_states_of(&vip, &|i| backend_ip(i).to_string(), &[1, 2, 3], Duration::from_secs(10)).expect("up");
    let client = d.lab.ns("client");
    let counter = |d: &Deployment, name: &str| d.status().expect("status")["counters"][name].as_u64().unwrap_or(0);
    // The client's next hop for the VIP now has a MAC nobody owns: the
    // bridge floods every frame to every port, the balancer's included.
    lab::sh("ip", &["-n", &client, "neigh", "replace", &lab::LB_IP.to_string(), "lladdr", "02:de:ad:00:00:01", "dev", "eth0", "nud", "permanent"])
        .expect("static neighbour");
    let (fwd0, other0) = (counter(&d, "forwarded"), counter(&d, "pass_other_mac"));
    let send = format!("for i in $(seq 1 10); do echo x$i > /dev/udp/{}/5353; done", lab::VIP);
    lab::sh("ip", &["netns", "exec", &client, "bash", "-c", &send]).expect("send 10 datagrams");
    std::thread::sleep(Duration::from_millis(300));
    let (fwd1, other1) = (counter(&d, "forwarded"), counter(&d, "pass_other_mac"));
    assert_eq!(fwd1 - fwd0, 0, "flooded frames forwarded");
    assert_eq!(other1 - other0, 10, "each flooded frame passed and counted once");
    // Addressed to the balancer again: forwarded.
    let link = lab::sh("ip", &["-n", &d.lab.ns("lb"), "link", "show", "eth0"]).expect("ip link");
    let lb_mac = link.split_whitespace().skip_while(|w| *w != "link/ether").nth(1).expect("the balancer's MAC").to_string();
    lab::sh("ip", &["-n", &client, "neigh", "replace", &lab::LB_IP.to_string(), "lladdr", &lb_mac, "dev", "eth0", "nud", "permanent"])
        .expect("the balancer's MAC");
    lab::sh("ip", &["netns", "exec", &client, "bash", "-c", &send]).expect("send 10 datagrams");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(counter(&d, "forwarded") - fwd1, 10, "frames to the balancer's MAC are balanced");
}

/// keepalived in `role`'s namespace with examples/ha/keepalived.conf.
fn keepalived(d: &mut Deployment, role: &str, priority: u32, socket: &std::path::Path) {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/ha/keepalived.conf");
    let example = std::fs::canonicalize(&example).expect("examples/ha/keepalived.conf");
    let conf = d.lab.dir.join(format!("keepalived-{role}.conf"));
    let text = format!(
        "$IFACE=eth0\n$PRIORITY={priority}\n$XLB={} --socket {}\ninclude {}\n",
        d.xlb.display(),
        socket.display(),
        example.display()
    );
    std::fs::write(&conf, text).expect("write keepalived.conf");
    let pid = |what: &str| d.lab.dir.join(format!("keepalived-{role}-{what}.pid")).to_string_lossy().into_owned();
    let (main, vrrp, check) = (pid("main"), pid("vrrp"), pid("check"));
    let conf = conf.to_string_lossy().into_owned();
    let args = ["-n", "-l", "-D", "-f", conf.as_str(), "-p", main.as_str(), "-r", vrrp.as_str(), "-c", check.as_str()];
    d.lab.spawn(&format!("keepalived-{role}"), role, std::path::Path::new("/usr/sbin/keepalived"), &args).expect("keepalived");
}

fn holds_address(d: &Deployment, role: &str, addr: &str) -> bool {
    lab::sh("ip", &["-n", &d.lab.ns(role), "addr", "show", "eth0"]).map(|s| s.contains(&format!("{addr}/"))).unwrap_or(false)
}

#[test]
fn vrrp_pair_fails_over_with_every_stream_kept() {
    assert!(std::path::Path::new("/usr/sbin/keepalived").exists(), "keepalived is not installed (cargo xtask test installs it)");
    let (xlb, lab_bin) = binaries();
    let mut d = Deployment::start(&xlb, &lab_bin, 3, &[]).expect("deployment");
    // The standby: another balancer on the segment, with its own agent.
    let lb2_ip: std::net::Ipv4Addr = "10.200.0.11".parse().expect("ip");
    d.lab.add_host("lb2", lb2_ip, "fd00:200::11".parse().expect("ip6")).expect("lb2");
    d.lab.spawn("xdp-pass-lb2", "sw", &xlb, &["xdp-pass", "--iface", "p-lb2"]).expect("xdp-pass");
    let sw = d.lab.ns("sw");
    for port in ["p-lb", "p-lb2"] {
        // Unknown unicast is not flooded to balancers: outages are not hidden.
        lab::sh("ip", &["netns", "exec", &sw, "bridge", "link", "set", "dev", port, "flood", "off"]).expect("flood off");
    }
    let sock2 = d.lab.dir.join("xlb2.sock");
    let (pins, state) = (d.pin_root().to_string_lossy().into_owned(), d.state_dir().to_string_lossy().into_owned());
    let s2 = sock2.to_string_lossy().into_owned();
    let args = ["--socket", s2.as_str(), "agent", "--iface", "eth0", "--conntrack-size", "65536", "--pin-root", pins.as_str(), "--state-dir", state.as_str()];
    d.lab.spawn("agent-lb2", "lb2", &xlb, &args).expect("second balancer's agent");
    let ips: Vec<String> = (1..=3).map(|i| backend_ip(i).to_string()).collect();
    d.configure_vip(&vip_arg(), &[], &ips).expect("vip on lb");
    let lb2 = Deployment::cli_at(&xlb, &sock2);
    d.wait("lb2's API", Duration::from_secs(15), || Ok(lb2(&["vip", "list"]).status.success())).expect("lb2 agent");
    assert!(lb2(&["vip", "add", &vip_arg()]).status.success());
    for ip in &ips {
        assert!(lb2(&["backend", "add", &vip_arg(), ip]).status.success());
    }
    d.wait_states(&[1, 2, 3], Duration::from_secs(10)).expect("lb backends up");
    d.wait("lb2 ready", Duration::from_secs(10), || Ok(lb2(&["ha", "check"]).status.success())).expect("lb2 ready");

    // keepalived on both; the client reaches the VIP through the VRRP address.
    let sock1 = d.socket.clone();
    keepalived(&mut d, "lb", 150, &sock1);
    keepalived(&mut d, "lb2", 100, &sock2);
    let client = d.lab.ns("client");
    lab::sh("ip", &["-n", &client, "route", "replace", &format!("{}/32", lab::VIP), "via", "10.200.0.9"]).expect("route via VRRP");
    d.wait("lb to be master", Duration::from_secs(10), || Ok(holds_address(&d, "lb", "10.200.0.9"))).expect("master");
    let s = d.connect(30).expect("client");
    assert_eq!(s.failed, 0, "through the master: {:?}", s.errors);

    // 40 streams; the master's link goes down under them.
    d.spawn_hold("hold", 40, 8_000).expect("hold");
    std::thread::sleep(Duration::from_millis(2000));
    lab::sh("ip", &["-n", &sw, "link", "set", "p-lb", "down"]).expect("cut the master's link");
    let took = d.wait("lb2 to take over", Duration::from_secs(5), || Ok(holds_address(&d, "lb2", "10.200.0.9"))).expect("failover");
    eprintln!("VRRP: lb2 master {:?} after the master's link went down", took);
    let report: Vec<xlb_tests::traffic::Held> = d.report("hold", Duration::from_secs(30)).expect("hold report");
    let broken: Vec<_> = report.iter().filter(|h| h.broken.is_some() || h.switched).collect();
    eprintln!("VRRP failover: {} streams, {} broken or moved", report.len(), broken.len());
    assert_eq!(report.len(), 40);
    assert!(broken.is_empty(), "streams broken or moved by the failover: {broken:?}");
    let s = d.connect(30).expect("client");
    assert_eq!(s.failed, 0, "new connections through the new master: {:?}", s.errors);
}
