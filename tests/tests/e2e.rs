//! End to end: real namespaces, real HTTP servers, the real `xlb` binary
//! (agent + CLI), real TCP through the VIP by L2 DSR. Needs root.

use std::{
    io::{BufRead, Write},
    time::Duration,
};
use xlb_tests::{
    lab::backend_ip,
    scenario::{binaries, vip_arg, Deployment},
    traffic::Summary,
};

const CONNECTIONS: usize = 300;

fn assert_fair(s: &Summary, backends: &[&str]) {
    assert_eq!(s.failed, 0, "failed connections: {:?}", s.errors);
    assert_eq!(s.ok, CONNECTIONS);
    let names: Vec<&str> = s.by_backend.keys().map(String::as_str).collect();
    assert_eq!(names, backends, "who answered: {:?}", s.by_backend);
    let fair = CONNECTIONS as f64 / backends.len() as f64;
    for (name, n) in &s.by_backend {
        // Expected share ± 40% of it (5 standard deviations at 300 connections).
        assert!(
            (*n as f64 - fair).abs() <= 0.4 * fair,
            "backend {name} got {n} of {CONNECTIONS} connections (fair: {fair:.0}); spread {:?}",
            s.by_backend
        );
    }
}

#[test]
fn balances_real_tcp_and_removes_a_dead_backend() {
    let (xlb, lab_bin) = binaries();
    let mut d = Deployment::start(&xlb, &lab_bin, 3, &[]).expect("deployment");
    d.configure().expect("configure through the CLI");
    d.wait_states(&[1, 2, 3], Duration::from_secs(10)).expect("backends resolve and come up");
    // MACs were resolved from the neighbour table, not given.
    let st = d.status().expect("status");
    for b in st["vips"][0]["backends"].as_array().expect("backends") {
        assert!(b["mac"].as_str().is_some_and(|m| m.len() == 17), "resolved MAC: {b}");
    }
    let s = d.connect(CONNECTIONS).expect("client");
    assert_fair(&s, &["b1", "b2", "b3"]);
    // The datapath counted them: every backend got new flows and packets.
    let st = d.status().expect("status");
    let vip = &st["vips"][0];
    assert!(vip["new_flows"].as_u64().unwrap_or(0) >= CONNECTIONS as u64, "{vip}");
    assert!(st["counters"]["forwarded"].as_u64().unwrap_or(0) >= 3 * CONNECTIONS as u64);

    // `xlb stats`: JSON with connection-table figures, and the watch view.
    let stats: serde_json::Value = serde_json::from_str(&d.cli_ok(&["stats", "--json"]).expect("stats")).expect("JSON");
    assert!(stats["conntrack"]["misses"].as_u64().unwrap_or(0) >= CONNECTIONS as u64, "{}", stats["conntrack"]);
    assert!(stats["conntrack"]["hits"].as_u64().unwrap_or(0) > 0);
    let watch = std::process::Command::new("timeout")
        .args(["2.5", xlb.to_str().expect("path"), "--socket", d.socket.to_str().expect("path"), "stats", "--watch"])
        .output()
        .expect("stats --watch");
    let screen = String::from_utf8_lossy(&watch.stdout);
    assert!(screen.matches("\x1b[H\x1b[2J").count() >= 2, "refreshes in place: {screen:?}");
    assert!(screen.contains("/s"), "second refresh shows rates");
    assert!(screen.contains(&vip_arg()) && screen.contains("forwarded"));

    d.lab.kill("server2").expect("kill b2's server");
    let detect = d.wait_states(&[1, 3], Duration::from_secs(5)).expect("b2 marked down");
    eprintln!("dead backend detected and removed after {detect:?}");
    let st = d.status().expect("status");
    let b2 = st["vips"][0]["backends"]
        .as_array()
        .and_then(|bs| bs.iter().find(|b| b["ip"] == backend_ip(2).to_string().as_str()).cloned())
        .expect("b2 listed");
    assert_eq!(b2["state"], "down");
    assert_eq!(b2["table_share"].as_f64(), Some(0.0));
    let s = d.connect(CONNECTIONS).expect("client");
    assert_fair(&s, &["b1", "b3"]);
}

/// Run a CLI command that must fail with one line on stderr containing `want`.
/// `--no-wait`: the commands return before the tables are published, the
/// agent's next tick publishes them, and real connections then go where the
/// waiting commands would have sent them.
#[test]
fn changes_that_do_not_wait_are_published_by_the_next_tick() {
    let (xlb, lab_bin) = binaries();
    let d = Deployment::start(&xlb, &lab_bin, 3, &[]).expect("deployment");
    let vip = vip_arg();
    d.cli_ok(&["vip", "add", &vip]).expect("vip add");
    for i in 1..=3 {
        let out = d.cli_ok(&["backend", "add", &vip, &backend_ip(i).to_string(), "--no-wait"]).expect("backend add --no-wait");
        assert_eq!(out.trim(), "table: published with the agent's next tick (--no-wait)");
    }
    d.wait_states(&[1, 2, 3], Duration::from_secs(10)).expect("backends resolve and come up");
    let published = |d: &Deployment| {
        d.wait("no VIP pending", Duration::from_secs(2), || Ok(d.status()?["vips"].as_array().is_some_and(|vs| vs.iter().all(|v| v["pending"] == false))))
    };
    published(&d).expect("published by a tick");
    assert_fair(&d.connect(CONNECTIONS).expect("client"), &["b1", "b2", "b3"]);
    // Weight 0 without waiting: once published, no new flow goes to b3.
    let out = d.cli_ok(&["backend", "set", &vip, &backend_ip(3).to_string(), "--weight", "0", "--no-wait"]).expect("set --no-wait");
    assert!(out.contains("next tick"), "{out}");
    published(&d).expect("published by a tick");
    assert_fair(&d.connect(CONNECTIONS).expect("client"), &["b1", "b2"]);
    // Bad input is refused at once, waiting or not.
    fails(&d, &["backend", "add", &vip, &backend_ip(1).to_string(), "--no-wait"], "already exists");
    fails(&d, &["backend", "set", &vip, "10.200.0.99", "--weight", "2", "--no-wait"], "not in VIP");
    // In the API: `Prefer: respond-async` on a table change is answered 202;
    // on anything else it is ignored (a new VIP is published before the answer).
    let sock = d.socket.to_string_lossy().into_owned();
    let prefer = |method: &str, path: &str, body: &str| -> (String, serde_json::Value) {
        let url = format!("http://xlb{path}");
        let args = ["-sS", "-g", "--max-time", "5", "--unix-socket", &sock, "-X", method, "-w", "\n%{http_code}", "-H", "Prefer: respond-async", "-H", "Content-Type: application/json", "--data-binary", body, &url];
        let out = std::process::Command::new("curl").args(args).output().expect("run curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (json, code) = text.rsplit_once('\n').expect("curl output");
        (code.trim().to_string(), serde_json::from_str(json).unwrap_or_else(|e| panic!("{method} {path}: {e}: {json:?}")))
    };
    let (code, v) = prefer("PUT", &format!("/v1/vips/{vip}/backends/{}", backend_ip(3)), r#"{"weight":2}"#);
    assert_eq!((code.as_str(), v), ("202", serde_json::json!({ "published": false, "applied": true })));
    let other = "10.200.0.101:80/tcp";
    let (code, _) = prefer("POST", "/v1/vips", &format!(r#"{{"vip":"{other}"}}"#));
    assert_eq!(code, "200");
    let st = d.status().expect("status");
    let added = st["vips"].as_array().and_then(|vs| vs.iter().find(|v| v["vip"] == other)).cloned().expect("the new VIP");
    assert_eq!(added["pending"], false, "a VIP add does not wait for a tick: {added}");
    published(&d).expect("published by a tick");
}

fn fails(d: &Deployment, args: &[&str], want: &str) {
    let out = d.cli(args).expect("run xlb");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "`xlb {}` should fail", args.join(" "));
    assert_eq!(err.trim_end().lines().count(), 1, "`xlb {}`: one line expected, got {err:?}", args.join(" "));
    assert!(err.starts_with("xlb: error: ") || err.starts_with("error: "), "{err}");
    assert!(err.contains(want), "`xlb {}`: {err:?} should mention {want:?}", args.join(" "));
}

#[test]
fn bad_input_gets_one_line_and_changes_nothing() {
    let (xlb, lab_bin) = binaries();
    let d = Deployment::start(&xlb, &lab_bin, 1, &[]).expect("deployment");
    let vip = vip_arg();
    let b1 = backend_ip(1).to_string();
    d.cli_ok(&["vip", "add", &vip]).expect("vip add");
    d.cli_ok(&["backend", "add", &vip, &b1, "--weight", "5"]).expect("backend add");
    let before = d.status().expect("status");

    fails(&d, &["vip", "add", "10.200.0.100:80"], "invalid VIP");
    fails(&d, &["vip", "add", "10.200.0.100:80/sctp"], "sctp");
    fails(&d, &["vip", "add", "10.200.0.300:80/tcp"], "invalid VIP");
    fails(&d, &["vip", "add", &vip], "already exists");
    fails(&d, &["vip", "add", "10.200.0.101:80/tcp", "--algo", "fastest"], "unknown algorithm");
    fails(&d, &["vip", "del", "10.200.0.199:80/tcp"], "unknown VIP");
    fails(&d, &["backend", "add", "10.200.0.199:80/tcp", &b1], "unknown VIP");
    fails(&d, &["backend", "add", &vip, "not-an-ip"], "invalid backend IP");
    fails(&d, &["backend", "add", &vip, "fd00::1"], "address families");
    fails(&d, &["backend", "add", &vip, "10.200.0.22", "--mac", "zz:zz"], "invalid MAC");
    fails(&d, &["backend", "add", &vip, "10.200.0.22", "--weight", "99999"], "invalid weight");
    fails(&d, &["backend", "add", &vip, "10.200.0.22", "--weight", "-1"], "-1");
    fails(&d, &["backend", "add", &vip, &b1], "already exists");
    fails(&d, &["backend", "del", &vip, "10.200.0.99"], "not in VIP");

    // The API is HTTP/JSON on the socket: real curl reads it…
    let sock = d.socket.to_string_lossy().into_owned();
    let curl = |method: &str, path: &str, body: Option<&str>| -> (u16, serde_json::Value) {
        let url = format!("http://xlb{path}");
        let mut args = vec!["-sS", "-g", "--max-time", "5", "--unix-socket", &sock, "-X", method, "-w", "\n%{http_code}", &url];
        if let Some(b) = body {
            args.extend(["-H", "Content-Type: application/json", "--data-binary", b]);
        }
        let out = std::process::Command::new("curl").args(&args).output().expect("run curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (json, code) = text.rsplit_once('\n').expect("curl output");
        (code.trim().parse().expect("status code"), serde_json::from_str(json).unwrap_or_else(|e| panic!("{method} {path}: {e}: {json:?}")))
    };
    let (code, st) = curl("GET", "/v1/status", None);
    assert_eq!(code, 200);
    assert_eq!(st["vips"][0]["vip"], vip.as_str(), "{st}");
    assert_eq!(st["vips"][0]["backends"][0]["weight"], 5, "{st}");
    let (code, list) = curl("GET", "/v1/vips", None);
    assert_eq!((code, list), (200, serde_json::json!([vip.clone()])));

    // …and bad requests straight to it (bypassing the CLI's own checks) get
    // an HTTP error status and one JSON line.
    let backends = format!("/v1/vips/{vip}/backends");
    for (method, path, body, want) in [
        ("POST", "/v1/vips", Some("this is not json"), 400),
        ("POST", "/v1/vips", Some(r#"{"vip":"1.2.3.4:0/tcp"}"#), 400),
        ("POST", "/v1/vips", Some(r#"{"vip":"10.200.0.101:80/tcp","algo":"fastest"}"#), 400),
        ("POST", backends.as_str(), Some(r#"{"ip":"10.200.0.23","weight":100000}"#), 400),
        ("POST", backends.as_str(), Some(r#"{"ip":"10.200.0.23","mac":"ff:ff:ff:ff:ff:ff"}"#), 400),
        ("POST", backends.as_str(), Some(r#"{"ip":"10.200.0.23","colour":"red"}"#), 400),
        ("PUT", &format!("{backends}/10.200.0.99"), Some(r#"{"weight":2}"#), 400),
        ("DELETE", "/v1/vips/10.200.0.199:80/tcp", None, 400),
        ("POST", "/v1/reboot", Some("{}"), 404),
        ("GET", "/status", None, 404),
        ("DELETE", "/v1/status", None, 405),
    ] {
        let (code, v) = curl(method, path, body);
        assert_eq!(code, want, "{method} {path} {body:?} → {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty() && !e.contains('\n')), "{method} {path} → {v}");
        assert_eq!(v.as_object().map(|o| o.len()), Some(1), "only the error: {v}");
    }
    // Not HTTP at all: hyper's own 400, and the agent goes on.
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).expect("socket");
    s.write_all(b"this is not http\r\n\r\n").expect("send");
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).expect("answer");
    assert!(line.starts_with("HTTP/1.1 400"), "{line:?}");

    let after = d.status().expect("status");
    assert_eq!(before["vips"].as_array().map(|v| v.len()), after["vips"].as_array().map(|v| v.len()));
    assert_eq!(after["vips"][0]["backends"].as_array().map(|b| b.len()), Some(1));
    assert_eq!(after["vips"][0]["backends"][0]["weight"], 5);

    // The socket is root-only.
    let mode = std::fs::metadata(&d.socket).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777);
    assert_eq!(mode.expect("socket metadata"), 0o600);

    // SIGTERM ends the agent and removes the socket; the pinned program
    // keeps forwarding until `xlb detach` (here with no agent running:
    // it removes the pins, which detaches).
    let lb = d.lab.ns("lb");
    let attached = || xlb_tests::lab::sh("ip", &["-n", &lb, "link", "show", "eth0"]).expect("ip link").contains("xdp");
    assert!(attached(), "attached while running");
    let mut d = d;
    d.lab.stop("agent").expect("stop");
    assert!(attached(), "SIGTERM leaves the pinned program attached");
    assert!(!d.socket.exists(), "socket removed");
    assert!(d.lab.log("agent").contains("XDP stays attached to eth0"));
    let (pins, state) = (d.pin_root(), d.state_dir());
    let out = d
        .lab
        .run("lb", &d.xlb, &["--socket", &d.socket.to_string_lossy(), "detach", "--iface", "eth0", "--pin-root", &pins.to_string_lossy(), "--state-dir", &state.to_string_lossy()])
        .expect("xlb detach");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!attached(), "xlb detach with no agent removed the pins and so the program");
    let out = d.lab.run("lb", &d.xlb, &["--socket", &d.socket.to_string_lossy(), "detach"]).expect("xlb detach");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--iface") && err.trim().lines().count() == 1, "{err}");
}

#[test]
fn agent_and_cli_startup_errors_are_one_line() {
    let (xlb, _) = binaries();
    let dir = xlb_tests::lab::TempDir::new("e2e").expect("scratch dir");
    let sock = dir.join("s.sock");
    let run = |args: &[&str]| {
        std::process::Command::new(&xlb).arg("--socket").arg(&sock).args(args).output().expect("run xlb")
    };
    let one_line = |out: &std::process::Output, want: &str| {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert_eq!(err.trim_end().lines().count(), 1, "{err:?}");
        assert!(err.contains(want), "{err:?} should mention {want:?}");
    };
    one_line(&run(&["status"]), "cannot reach the agent");
    one_line(&run(&["agent", "--iface", "nosuchif0"]), "interface nosuchif0 not found");
    one_line(&run(&["agent", "--iface", "lo", "--ring-size", "65536"]), "prime");
    std::fs::write(dir.join("bad.toml"), "[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n[[vip.backend]]\nip = \"10.0.0.2\"\nweight = 0.5\n").expect("write");
    let cfg = dir.join("bad.toml").to_string_lossy().into_owned();
    one_line(&run(&["agent", "--iface", "lo", "--config", &cfg]), "bad.toml");
    std::fs::write(dir.join("dup.toml"), "[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n").expect("write");
    let cfg = dir.join("dup.toml").to_string_lossy().into_owned();
    one_line(&run(&["agent", "--iface", "lo", "--config", &cfg]), "duplicate VIP");
    // Without privileges (uid/gid nobody, no capabilities).
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
        .arg(&xlb)
        .args(["--socket", "/tmp/xlb-unpriv-test.sock", "agent", "--iface", "lo"])
        .output()
        .expect("setpriv");
    one_line(&out, "root");
    assert!(!sock.exists(), "no failed start left a socket behind");
}
