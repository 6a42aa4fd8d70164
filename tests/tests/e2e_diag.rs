//! End to end, issue 14: diagnosis on a running deployment (real
//! namespaces, real servers, the real `xlb`). After real TCP connections,
//! `xlb flows` and `xlb explain` name, for each connection, the backend that
//! answered it; `xlb trace --pcap` while connections are made records
//! exactly the frames sent (tcpdump reads them), a dropped frame shows its
//! reason, and the balancer runs untraced again afterwards. Needs root and
//! tcpdump.

use serde_json::Value;
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};
use xlb_tests::{
    lab::{backend_ip, CLIENT_IP, VIP},
    scenario::{binaries, vip_arg, Deployment},
    traffic::Held,
};

fn json(d: &Deployment, args: &[&str]) -> Value {
    serde_json::from_str(&d.cli_ok(args).expect("cli")).expect("JSON")
}

/// Backend address of a lab server name (`b2` → 10.200.0.22).
fn ip_of(name: &str) -> String {
    backend_ip(name.trim_start_matches('b').parse().expect("bN")).to_string()
}

#[test]
fn flows_and_explain_name_the_backend_that_answered_each_connection() {
    let (xlb, lab_bin) = binaries();
    let mut d = Deployment::start(&xlb, &lab_bin, 3, &["--flow-keys"]).expect("deployment");
    let ips: Vec<String> = (1..=3).map(|i| backend_ip(i).to_string()).collect();
    d.configure_vip(&vip_arg(), &[], &ips).expect("configure");
    d.wait_states(&[1, 2, 3], Duration::from_secs(10)).expect("up");
    let vip = vip_arg();
    d.spawn_hold("hold", 24, 2500).expect("hold");
    let held: Vec<Held> = d.report("hold", Duration::from_secs(20)).expect("report");
    assert_eq!(held.len(), 24);
    let flows = json(&d, &["flows", "--vip", &vip, "--json", "--limit", "1000"]);
    assert_eq!(flows["keys"], true);
    let list = flows["flows"].as_array().expect("flows");
    let mut by_backend = std::collections::BTreeMap::<String, usize>::new();
    for h in &held {
        assert!(h.broken.is_none() && !h.switched && h.pings > 0, "{h:?}");
        let answered = ip_of(&h.backend);
        *by_backend.entry(answered.clone()).or_default() += 1;
        let flow = format!("tcp {CLIENT_IP}:{} > {VIP}:80", h.local_port);
        let f = list.iter().find(|f| f["flow"] == flow.as_str()).unwrap_or_else(|| panic!("{flow} not in flows: {flows}"));
        assert_eq!(f["backend"], answered.as_str(), "{flow}");
        assert_eq!(f["vip"], vip.as_str());
        assert_eq!(f["closed"], true, "the client closed it: {f}");
        let e = json(&d, &["explain", &vip, &format!("{CLIENT_IP}:{}", h.local_port), "--json"]);
        assert_eq!(e["conntrack_entry"]["backend"]["ip"], answered.as_str(), "{e}");
        assert_eq!(e["next_backend"]["ip"], answered.as_str(), "the entry still wins: {e}");
        assert_eq!(e["next_packet"]["via"], "connection-table");
    }
    assert!(by_backend.len() >= 2, "connections spread: {by_backend:?}");
    // Filters, bounds, and the text form.
    let b1 = backend_ip(1).to_string();
    let only = json(&d, &["flows", "--backend", &b1, "--json"]);
    let n1 = by_backend.get(&b1).copied().unwrap_or(0);
    assert_eq!(only["flows"].as_array().expect("flows").len(), n1);
    let two = json(&d, &["flows", "--json", "--limit", "2"]);
    assert_eq!(two["flows"].as_array().expect("flows").len(), 2);
    assert!(two["matched"].as_u64().expect("matched") >= 24);
    let text = d.cli_ok(&["flows", "--limit", "3"]).expect("flows");
    assert!(text.contains(&format!("{CLIENT_IP}:")) && text.contains("closed"), "{text}");
    let err = d.cli(&["flows", "--vip", "10.9.9.9:80/tcp"]).expect("cli");
    assert!(!err.status.success() && String::from_utf8_lossy(&err.stderr).lines().count() == 1);
    let text = d.cli_ok(&["explain", &vip, &format!("{CLIENT_IP}:{}", held[0].local_port)]).expect("explain");
    eprintln!("xlb explain:\n{text}");
    assert!(text.contains("conntrack set") && text.contains("next      →"), "{text}");
}

#[test]
fn flows_without_flow_keys_says_so_and_counts_per_backend() {
    let d = Deployment::serving(2, 2).expect("deployment");
    let s = d.connect(10).expect("client");
    assert_eq!(s.failed, 0);
    let text = d.cli_ok(&["flows"]).expect("flows");
    assert!(text.lines().next().is_some_and(|l| l.contains("--flow-keys")), "{text}");
    assert_eq!(text.lines().count(), 3, "one line, then one per backend: {text}");
}

/// `xlb trace …` in the background; (child, pcap path).
fn spawn_trace(d: &Deployment, args: &[&str], pcap: &std::path::Path) -> std::process::Child {
    Command::new(&d.xlb)
        .arg("--socket")
        .arg(&d.socket)
        .arg("trace")
        .args(args)
        .arg("--pcap")
        .arg(pcap)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("xlb trace")
}

fn wait_exit(child: std::process::Child, limit: Duration) -> (String, String) {
    let t0 = Instant::now();
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output());
    while !waiter.is_finished() && t0.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(50));
    }
    if !waiter.is_finished() {
        // SAFETY: kill(2) of the child this test started.
        unsafe { libc::kill(pid as i32, libc::SIGINT) };
        let t1 = Instant::now();
        while !waiter.is_finished() && t1.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(50));
        }
        // Never wait forever on a client that ignored the interrupt (the
        // test then fails on its output instead of hanging the run).
        if !waiter.is_finished() {
            // SAFETY: as above.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
    let out = waiter.join().expect("join").expect("output");
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn trace_records_exactly_the_frames_sent_and_swaps_back() {
    let d = Deployment::serving(2, 2).expect("deployment");
    let vip = vip_arg();
    let prog = d.xdp_prog("lb").expect("ip link").expect("xlb attached");
    let dir = d.lab.dir.clone();

    // Forwarded frames: 12 of the connections' client → VIP frames.
    let pcap = dir.join("tx.pcap");
    let child = spawn_trace(&d, &["--vip", &vip, "--count", "12"], &pcap);
    d.wait("the tracing program on eth0", Duration::from_secs(10), || Ok(d.xdp_prog("lb")?.is_some_and(|p| p != prog)))
        .expect("swapped in");
    let s = d.connect(6).expect("client");
    assert_eq!(s.failed, 0, "{:?}", s.errors);
    let (out, err) = wait_exit(child, Duration::from_secs(10));
    eprintln!("xlb trace:\n{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 12, "stdout {out} stderr {err}");
    for l in &lines {
        assert!(l.contains(&format!("tcp {CLIENT_IP}:")) && l.contains(&format!("> {VIP}:80 tx forwarded → 10.200.0.2")), "{l}");
        assert!(l.contains(" eth0 "), "the interface: {l}");
    }
    assert!(err.contains("trace: 12 frame(s)"), "{err}");
    d.wait("the balancer back on eth0", Duration::from_secs(5), || Ok(d.xdp_prog("lb")? == Some(prog))).expect("swapped back");
    let dump = Command::new("tcpdump").arg("-r").arg(&pcap).args(["-nn", "-e"]).output().expect("tcpdump");
    assert!(dump.status.success(), "{}", String::from_utf8_lossy(&dump.stderr));
    let rows = String::from_utf8_lossy(&dump.stdout).into_owned();
    eprintln!("tcpdump -r:\n{rows}");
    let rows: Vec<&str> = rows.lines().collect();
    assert_eq!(rows.len(), 12, "{rows:#?}");
    for (row, line) in rows.iter().zip(&lines) {
        // Same frame: the client's port in both.
        let port = line.split(&format!("{CLIENT_IP}:")).nth(1).and_then(|r| r.split(' ').next()).expect("port");
        assert!(row.contains(&format!("{CLIENT_IP}.{port} > {VIP}.80")), "{row} vs {line}");
    }
    assert!(rows[0].contains("Flags [S]"), "a connection starts with its SYN: {}", rows[0]);

    // A dropped frame shows its reason: a VIP with no backend.
    d.cli_ok(&["vip", "add", &format!("{VIP}:81/tcp")]).expect("vip without backends");
    let pcap = dir.join("drop.pcap");
    let child = spawn_trace(&d, &["--verdict", "drop", "--count", "1"], &pcap);
    d.wait("the tracing program on eth0", Duration::from_secs(10), || Ok(d.xdp_prog("lb")?.is_some_and(|p| p != prog)))
        .expect("swapped in");
    let _ = d.connect_to(&format!("{VIP}:81"), 1);
    let (out, err) = wait_exit(child, Duration::from_secs(10));
    eprintln!("xlb trace --verdict drop:\n{out}{err}");
    assert!(out.contains(&format!("> {VIP}:81 drop drop_no_backend")), "stdout {out} stderr {err}");
    d.wait("the balancer back on eth0", Duration::from_secs(5), || Ok(d.xdp_prog("lb")? == Some(prog))).expect("swapped back");

    // A client that goes away (Ctrl-C) ends the trace too.
    let child = spawn_trace(&d, &["--count", "1000000"], &dir.join("int.pcap"));
    d.wait("the tracing program on eth0", Duration::from_secs(10), || Ok(d.xdp_prog("lb")?.is_some_and(|p| p != prog)))
        .expect("swapped in");
    // A second trace is refused while one runs.
    let busy = d.cli(&["trace", "--count", "1"]).expect("cli");
    assert!(!busy.status.success() && String::from_utf8_lossy(&busy.stderr).contains("already running"));
    // SAFETY: kill(2) of the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let (_, err) = wait_exit(child, Duration::from_secs(5));
    // Handled (not the default action): the client says so, and it would
    // stop the same way under a parent that ignores SIGINT.
    assert!(err.contains("trace: stopped (signal)"), "{err}");
    d.wait("the balancer back on eth0", Duration::from_secs(5), || Ok(d.xdp_prog("lb")? == Some(prog))).expect("swapped back");
    let s = d.connect(5).expect("client");
    assert_eq!(s.failed, 0, "forwarding goes on: {:?}", s.errors);
}

#[test]
fn trace_swaps_an_unpinned_agents_own_link_too() {
    let (xlb, lab_bin) = binaries();
    let d = Deployment::start(&xlb, &lab_bin, 2, &["--no-pin"]).expect("deployment");
    let ips: Vec<String> = (1..=2).map(|i| backend_ip(i).to_string()).collect();
    d.configure_vip(&vip_arg(), &[], &ips).expect("configure");
    d.wait_states(&[1, 2], Duration::from_secs(10)).expect("up");
    let prog = d.xdp_prog("lb").expect("ip link").expect("xlb attached");
    let child = spawn_trace(&d, &["--count", "4"], &d.lab.dir.join("nopin.pcap"));
    d.wait("the tracing program on eth0", Duration::from_secs(10), || Ok(d.xdp_prog("lb")?.is_some_and(|p| p != prog)))
        .expect("swapped in");
    let s = d.connect(2).expect("client");
    assert_eq!(s.failed, 0, "{:?}", s.errors);
    let (out, err) = wait_exit(child, Duration::from_secs(10));
    assert_eq!(out.lines().count(), 4, "stdout {out} stderr {err}");
    d.wait("the balancer back on eth0", Duration::from_secs(5), || Ok(d.xdp_prog("lb")? == Some(prog))).expect("swapped back");
    let s = d.connect(4).expect("client");
    assert_eq!(s.failed, 0, "forwarding goes on: {:?}", s.errors);
}
