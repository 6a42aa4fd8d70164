//! End to end, issue 4: zero-drop restarts and upgrades. The maps and the
//! XDP link are pinned (in the lab's own bpffs), so a killed agent leaves
//! forwarding running, a new agent adopts the state (same ids and
//! generations: connection-table entries stay valid) and replaces the
//! program atomically. Long-lived TCP streams must not notice any of it.
//! Also: under a steady stream of new connections, a killed backend is
//! detected and removed with no failed connection to a healthy backend.
//! Real namespaces, real servers, the real `xlb`. Needs root.

use serde_json::Value;
use std::time::Duration;
use xlb_tests::{
    lab::backend_ip,
    scenario::{vip_arg, Deployment},
    traffic::{epoch_ms, Attempt, Held},
};

fn packets_of(st: &Value, ip: &str) -> u64 {
    st["vips"][0]["backends"].as_array().into_iter().flatten().find(|b| b["ip"] == ip).and_then(|b| b["packets"].as_u64()).unwrap_or(0)
}

fn pinned_files(d: &Deployment) -> usize {
    fn walk(p: &std::path::Path) -> usize {
        std::fs::read_dir(p).map(|rd| rd.filter_map(Result::ok).map(|e| if e.path().is_dir() { walk(&e.path()) } else { 1 }).sum()).unwrap_or(0)
    }
    walk(&d.pin_root())
}

#[test]
fn kill_9_restart_and_upgrade_keep_every_long_lived_stream() {
    let mut d = Deployment::serving(4, 3).expect("deployment serving b1-b3");
    let vip = vip_arg();
    let prog1 = d.xdp_prog("lb").expect("ip link").expect("attached");
    assert_eq!(d.status().expect("status")["program_id"], prog1, "status names the attached program");

    // 40 streams for 12 s, a line every 100 ms each.
    d.spawn_hold("hold", 40, 12_000).expect("hold client");
    std::thread::sleep(Duration::from_millis(1500));
    let before = d.status().expect("status");

    // kill -9: nothing cleans up; forwarding must go on without an agent,
    // for the streams and for new connections.
    d.lab.kill("agent").expect("kill -9 the agent");
    assert_eq!(d.xdp_prog("lb").expect("ip link"), Some(prog1), "still attached with no agent");
    let s = d.connect(60).expect("client");
    assert_eq!((s.ok, s.failed), (60, 0), "new connections with no agent running: {:?}", s.errors);
    std::thread::sleep(Duration::from_millis(1500));

    // A new agent (no config, no CLI) adopts the state and swaps in its own
    // freshly loaded program: an upgrade, atomically (bpf_link_update).
    d.start_agent("agent2", &[]).expect("second agent");
    let log = d.lab.log("agent2");
    eprintln!("--- second agent's log ---\n{log}---");
    assert!(log.contains("adopted the pinned state: 1 VIP(s) and 3 backend(s) kept"), "{log}");
    assert!(log.contains("0 of 65537 table entries changed"), "the adopted table is the running one: {log}");
    assert!(log.contains("replaced the program"), "{log}");
    let prog2 = d.xdp_prog("lb").expect("ip link").expect("attached");
    assert_ne!(prog2, prog1, "the new agent's program runs now");
    d.wait_states(&[1, 2, 3], Duration::from_secs(3)).expect("backends adopted up");
    // A second agent on the same interface (another socket) is refused.
    let (pins, state, other) = (d.pin_root(), d.state_dir(), d.lab.dir.join("other.sock"));
    let out = d
        .lab
        .run("lb", &d.xlb, &["--socket", &other.to_string_lossy(), "agent", "--iface", "eth0", "--pin-root", &pins.to_string_lossy(), "--state-dir", &state.to_string_lossy()])
        .expect("run a second agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("another xlb agent is running"), "{err}");
    let after = d.status().expect("status");
    for ip in (1..=3).map(|i| backend_ip(i).to_string()) {
        assert!(packets_of(&after, &ip) >= packets_of(&before, &ip), "counters survive the restart ({ip})");
    }
    // The connection table survived: a change that moves most new flows
    // (b4 with weight 10 of 13) must not move an existing stream.
    let out = d.cli_ok(&["backend", "add", &vip, &backend_ip(4).to_string(), "--weight", "10"]).expect("add b4");
    eprintln!("after adoption: {}", out.trim());
    d.wait_states(&[1, 2, 3, 4], Duration::from_secs(5)).expect("b4 up");

    // Graceful exit (SIGTERM) keeps forwarding too; the next agent loads a
    // different program (datapath logging compiled in) in its place.
    d.lab.stop("agent2").expect("SIGTERM");
    assert!(d.lab.log("agent2").contains("XDP stays attached"), "{}", d.lab.log("agent2"));
    assert_eq!(d.xdp_prog("lb").expect("ip link"), Some(prog2));
    d.start_agent("agent3", &["--debug-datapath"]).expect("third agent");
    let prog3 = d.xdp_prog("lb").expect("ip link").expect("attached");
    assert_ne!(prog3, prog2);
    assert!(d.lab.log("agent3").contains("4 backend(s) kept"), "{}", d.lab.log("agent3"));

    let report: Vec<Held> = d.report("hold", Duration::from_secs(30)).expect("hold report");
    assert_eq!(report.len(), 40);
    for h in &report {
        assert!(h.broken.is_none() && !h.switched && h.pings >= 60, "stream did not survive restarts: {h:?}");
    }
    let s = d.connect(200).expect("client");
    assert_eq!(s.failed, 0, "{:?}", s.errors);
    assert!(s.by_backend.get("b4").copied().unwrap_or(0) > 100, "new flows follow the new table: {:?}", s.by_backend);

    // `xlb detach` detaches and removes the pins and the state file.
    assert!(pinned_files(&d) > 0);
    d.cli_ok(&["detach"]).expect("detach");
    assert_eq!(d.xdp_prog("lb").expect("ip link"), None, "detached");
    assert_eq!(pinned_files(&d), 0, "pins removed");
    assert!(std::fs::read_dir(d.state_dir()).map(|mut r| r.next().is_none()).unwrap_or(true), "state removed");
}

#[test]
fn new_sizes_restore_services_into_new_tables_and_no_pin_detaches_on_exit() {
    let mut d = Deployment::serving_with(2, 2, &["--algo", "rr"]).expect("deployment");
    let vip = vip_arg();
    d.cli_ok(&["backend", "set", &vip, &backend_ip(2).to_string(), "--weight", "3"]).expect("weight");
    d.lab.stop("agent").expect("SIGTERM");

    // Another connection-table size is another layout: the pinned maps
    // cannot be reused, the state file restores the services into new ones.
    d.start_agent("agent2", &["--conntrack-size", "32768"]).expect("agent with other sizes");
    let log = d.lab.log("agent2");
    assert!(log.contains("pinned maps of this layout are missing"), "{log}");
    assert!(log.contains("removing maps of another layout"), "{log}");
    let st = d.status().expect("status");
    assert_eq!(st["vips"][0]["algo"], "rr");
    assert_eq!(st["vips"][0]["backends"][1]["weight"], 3, "runtime changes survive: {st}");
    assert_eq!(st["conntrack_capacity"], 32768);
    assert_eq!(st["conntrack_bytes"], lb_common::ct::ct_bytes(32768), "status shows the table's memory");
    d.wait_states(&[1, 2], Duration::from_secs(5)).expect("up");
    let s = d.connect(100).expect("client");
    assert_eq!(s.failed, 0, "{:?}", s.errors);
    assert_eq!(s.by_backend.len(), 2, "{:?}", s.by_backend);

    // A lost state file: an agent without --config refuses to take over the
    // running deployment (it could not manage it) and changes nothing.
    d.lab.stop("agent2").expect("SIGTERM");
    let prog = d.xdp_prog("lb").expect("ip link");
    for e in std::fs::read_dir(d.state_dir()).expect("state dir").filter_map(Result::ok) {
        if e.path().extension().is_some_and(|x| x == "json") {
            std::fs::remove_file(e.path()).expect("remove the state file");
        }
    }
    let (pins, state) = (d.pin_root().to_string_lossy().into_owned(), d.state_dir().to_string_lossy().into_owned());
    let sock = d.socket.to_string_lossy().into_owned();
    let pin_args = ["--pin-root", pins.as_str(), "--state-dir", state.as_str()];
    let mut args = vec!["--socket", sock.as_str(), "agent", "--iface", "eth0", "--conntrack-size", "32768"];
    args.extend_from_slice(&pin_args);
    let out = d.lab.run("lb", &d.xlb, &args).expect("run the agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("state file") && err.contains("xlb detach"), "{err}");
    assert_eq!(d.xdp_prog("lb").expect("ip link"), prog, "the running program was left alone");
    let s = d.connect(50).expect("client");
    assert_eq!(s.failed, 0, "still forwarding: {:?}", s.errors);

    // Without pins, exiting detaches (nothing outlives the agent).
    let mut args = vec!["--socket", sock.as_str(), "detach", "--iface", "eth0"];
    args.extend_from_slice(&pin_args);
    let out = d.lab.run("lb", &d.xlb, &args).expect("xlb detach");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(d.xdp_prog("lb").expect("ip link"), None);
    d.start_agent("agent3", &["--no-pin"]).expect("unpinned agent");
    assert!(d.xdp_prog("lb").expect("ip link").is_some());
    assert!(d.status().expect("status")["pinned"].is_null());
    d.lab.stop("agent3").expect("SIGTERM");
    assert_eq!(d.xdp_prog("lb").expect("ip link"), None, "an unpinned agent detaches on exit");
    assert!(d.lab.log("agent3").contains("detached from eth0"));
    assert!(!d.socket.exists(), "socket removed");
}

#[test]
fn killed_backend_under_steady_new_connections_fails_none_to_healthy_backends() {
    let mut d = Deployment::serving(3, 3).expect("deployment");

    // 100 new connections per second for 6 s; b1's server dies after 2 s.
    d.spawn_stream("stream", 100, 6000).expect("stream client");
    std::thread::sleep(Duration::from_millis(2000));
    let killed_at_ms = epoch_ms();
    d.lab.kill("server1").expect("kill b1's server");
    let detected = d.wait_states(&[2, 3], Duration::from_secs(5)).expect("b1 removed");
    eprintln!("killed backend detected and removed after {detected:?} (checks every 300 ms, fall 3)");

    let attempts: Vec<Attempt> = d.report("stream", Duration::from_secs(20)).expect("stream report");
    assert!(attempts.len() >= 550, "{} attempts", attempts.len());
    let failed: Vec<&Attempt> = attempts.iter().filter(|a| a.error.is_some()).collect();
    // A connection can only be refused by b1 (its namespace is alive, its
    // port closed); b2 and b3 listen. So every failure must be a refusal,
    // started after the kill and before the removal (plus the 300 ms a
    // check interval can add), or a reset of a connection b1's kernel had
    // accepted when its server was killed (started at most one request
    // timeout before the kill). Anything else hit a healthy backend.
    for a in &failed {
        let e = a.error.as_deref().unwrap_or("");
        let in_flight_reset = e.contains("reset") && a.t_ms + 3000 >= killed_at_ms && a.t_ms <= killed_at_ms + 100;
        assert!(e.contains("refused") || in_flight_reset, "a connection failed other than by b1's refusal or reset: {a:?}");
        assert!(a.t_ms >= killed_at_ms || in_flight_reset, "failure before the kill: {a:?}");
    }
    // Status is polled every 50 ms: the removal happened before it was seen.
    let window_end = killed_at_ms + detected.as_millis() as u64;
    let late: Vec<&&Attempt> = failed.iter().filter(|a| a.t_ms > window_end).collect();
    assert!(late.is_empty(), "failures after b1 was removed: {late:?}");
    let ok_after: Vec<&Attempt> = attempts.iter().filter(|a| a.t_ms > window_end).collect();
    assert!(ok_after.iter().all(|a| a.backend.as_deref().is_some_and(|b| b != "b1")));
    let healthy = attempts.iter().filter(|a| matches!(a.backend.as_deref(), Some("b2" | "b3"))).count();
    eprintln!(
        "{} attempts: {} refused by the dead b1 before its removal, {healthy} served by b2/b3, 0 failed to a healthy backend",
        attempts.len(),
        failed.len()
    );
}
