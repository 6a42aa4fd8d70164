//! End to end, routed: client → xlb (IPIP / GUE) → router → backends on
//! another subnet running `xlb decap`, which answer the client directly
//! (through the router, never the balancer). IPv4 and IPv6 VIPs, TCP and
//! UDP; a killed backend is taken out by health checks (sent through the
//! kernel's routing); a datagram over the path MTU gets the client an ICMP
//! error with the MTU, which the client's kernel then uses; a TCP connection
//! whose segments no longer fit once encapsulated completes after the
//! client's kernel lowers its path MTU from xlb's ICMP error (IPv4, IPv6);
//! an IPv4 VIP reaches an IPv6 backend (IPv4-in-IPv6); `xlb decap`'s
//! counters show in `xlb stats` (through the agent's status, and on a
//! backend host with no agent). Needs root.

use serde_json::Value;
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};
use xlb_tests::{
    routed::{rt_backend, rt_backend6, RoutedLab, RT_VIP, RT_VIP6},
    traffic::Summary,
};

const ENCAP: [&str; 4] = ["--encap-source", "10.201.0.64/26", "--encap-source", "fd00:201::100/120"];

fn connect(lab: &RoutedLab, target: &str, count: usize) -> Summary {
    let n = count.to_string();
    let out = lab
        .run("client", &lab.lab_bin, &["connect", "--target", target, "--count", &n, "--parallel", "8", "--timeout-ms", "3000"])
        .expect("client");
    assert!(out.status.success(), "client: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("client summary")
}

/// `count` UDP flows (one socket each) to `target`: the backend names that answered.
fn udp_flows(lab: &RoutedLab, target: SocketAddr, count: usize) -> BTreeMap<String, usize> {
    lab.in_netns("client", move || {
        let mut by = BTreeMap::new();
        for i in 0..count {
            let any: SocketAddr = if target.is_ipv4() { "0.0.0.0:0".parse().expect("addr") } else { "[::]:0".parse().expect("addr") };
            let s = UdpSocket::bind(any).expect("bind");
            s.set_read_timeout(Some(Duration::from_millis(1000))).expect("timeout");
            let msg = format!("flow {i}");
            let mut buf = [0u8; 512];
            // Bounded retries: the first datagram of a run may meet an unresolved neighbour.
            let name = (0..3).find_map(|_| {
                s.send_to(msg.as_bytes(), target).ok()?;
                let (n, from) = s.recv_from(&mut buf).ok()?;
                assert_eq!(from.ip(), target.ip(), "the answer comes from the VIP");
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                text.ends_with(&msg).then(|| text.split(' ').next().unwrap_or("").to_string())
            });
            *by.entry(name.unwrap_or_else(|| "no answer".into())).or_insert(0) += 1;
        }
        by
    })
    .expect("thread in the client namespace")
}

/// Forwarded datagrams counted by a namespace's kernel (IPv4 + IPv6).
fn forwarded(lab: &RoutedLab, role: &str) -> u64 {
    let snmp = lab.proc_net(role, "snmp").expect("snmp");
    let mut lines = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
    let col = names.split_whitespace().position(|n| n == "ForwDatagrams").expect("ForwDatagrams column");
    let v4: u64 = values.split_whitespace().nth(col).and_then(|v| v.parse().ok()).expect("value");
    let snmp6 = lab.proc_net(role, "snmp6").expect("snmp6");
    let v6: u64 = snmp6
        .lines()
        .find(|l| l.starts_with("Ip6OutForwDatagrams"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("Ip6OutForwDatagrams");
    v4 + v6
}

fn states(lab: &RoutedLab, vip: &str) -> Vec<(String, String)> {
    let s: Value = serde_json::from_str(&lab.cli_ok(&["status", "--json"]).expect("status")).expect("json");
    xlb_tests::scenario::backend_states_in(&s, vip)
}

fn wait_up(lab: &RoutedLab, vip: &str, up: &[String], limit: Duration) {
    let t0 = Instant::now();
    loop {
        let got = states(lab, vip);
        if got.len() >= up.len() && got.iter().all(|(ip, st)| (st == "up") == up.contains(ip)) {
            return;
        }
        assert!(t0.elapsed() < limit, "{vip}: waiting for {up:?} up, have {got:?}; agent log:\n{}", lab.log("agent"));
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn counter(lab: &RoutedLab, name: &str) -> u64 {
    let s: Value = serde_json::from_str(&lab.cli_ok(&["status", "--json"]).expect("status")).expect("json");
    s["counters"][name].as_u64().unwrap_or_else(|| panic!("counter {name} in status"))
}

#[test]
fn routed_backends_answer_directly_fail_over_and_teach_the_client_the_mtu() {
    let mut lab = RoutedLab::start(2, &ENCAP).expect("routed lab");
    let v4 = format!("{RT_VIP}:80/tcp");
    let v6 = format!("[{RT_VIP6}]:80/tcp");
    let u4 = format!("{RT_VIP}:5353/udp");
    let u6 = format!("[{RT_VIP6}]:5353/udp");
    // TCP by IPIP (v4-in-v4, v6-in-v6), UDP by GUE; UDP backends checked over TCP port 80.
    for (vip, fwd, v6b) in [(&v4, "ipip", false), (&v6, "ipip", true), (&u4, "gue", false), (&u6, "gue", true)] {
        let mut args = vec!["vip", "add", vip.as_str(), "--forward", fwd];
        if vip.ends_with("udp") {
            args.extend_from_slice(&["--check", "tcp", "--check-port", "80"]);
        }
        lab.cli_ok(&args).expect("vip add");
        for i in 1..=2 {
            let ip = if v6b { rt_backend6(i) } else { rt_backend(i) };
            lab.cli_ok(&["backend", "add", vip, &ip]).expect("backend add");
        }
    }
    // A routed backend of the other family (IPv4 VIP, IPv6 backend) is accepted; an L2 one is not.
    let x = format!("{RT_VIP}:8080/tcp");
    lab.cli_ok(&["vip", "add", &x]).expect("l2 vip");
    let e = lab.cli(&["backend", "add", &x, &rt_backend6(1)]).expect("cli");
    assert!(!e.status.success(), "an L2 backend of the other family is refused");
    lab.cli_ok(&["backend", "add", &x, &rt_backend6(1), "--forward", "ipip"]).expect("4in6 backend");
    let lab_bin = lab.lab_bin.clone();
    lab.spawn("server1-8080", "b1", &lab_bin, &["serve", "--name", "b1", "--port", "8080"]).expect("server on 8080");
    let both4 = [rt_backend(1), rt_backend(2)];
    let both6 = [rt_backend6(1), rt_backend6(2)];
    for (vip, up) in [(&v4, &both4), (&v6, &both6), (&u4, &both4), (&u6, &both6)] {
        wait_up(&lab, vip, &up[..], Duration::from_secs(15));
    }
    wait_up(&lab, &x, &[rt_backend6(1)], Duration::from_secs(15));
    let (lb_fwd0, router_fwd0) = (forwarded(&lab, "lb"), forwarded(&lab, "router"));

    // 300 connections per TCP VIP, all answered, by both backends.
    for target in [format!("{RT_VIP}:80"), format!("[{RT_VIP6}]:80")] {
        let s = connect(&lab, &target, 300);
        assert_eq!((s.ok, s.failed), (300, 0), "{target}: {s:?}");
        assert_eq!(s.by_backend.len(), 2, "{target}: both backends answer: {:?}", s.by_backend);
        assert!(s.by_backend.values().all(|n| *n >= 90), "{target}: balanced: {:?}", s.by_backend);
    }
    // IPv4-in-IPv6: the IPv4 VIP's connections reach the IPv6 backend.
    let s = connect(&lab, &format!("{RT_VIP}:8080"), 50);
    assert_eq!((s.ok, s.failed), (50, 0), "4in6: {s:?}");
    assert_eq!(s.by_backend.keys().collect::<Vec<_>>(), vec!["b1"], "4in6: {:?}", s.by_backend);
    // UDP flows by GUE, both families.
    for target in [SocketAddr::new(IpAddr::V4(RT_VIP), 5353), SocketAddr::new(IpAddr::V6(RT_VIP6), 5353)] {
        let by = udp_flows(&lab, target, 100);
        assert_eq!(by.get("no answer"), None, "{target}: every flow answered: {by:?}");
        assert_eq!(by.len(), 2, "{target}: both backends: {by:?}");
    }
    // DSR: the balancer's kernel forwarded nothing (requests went out by
    // XDP, answers never came back through it); the router carried them.
    let (lb_fwd, router_fwd) = (forwarded(&lab, "lb") - lb_fwd0, forwarded(&lab, "router") - router_fwd0);
    assert_eq!(lb_fwd, 0, "the balancer's kernel forwarded {lb_fwd} datagrams");
    assert!(router_fwd > 2 * 600, "the router forwarded requests and answers ({router_fwd})");
    let pins = lab.bpffs.join("xlb").to_string_lossy().into_owned();
    for i in 1..=2 {
        let st = lab.run(&format!("b{i}"), &lab.xlb.clone(), &["decap", "stats", "--iface", "eth0", "--pin-root", &pins, "--json"]).expect("decap stats");
        let v: Value = serde_json::from_slice(&st.stdout).expect("decap stats json");
        assert!(v["decapsulated"].as_u64().unwrap_or(0) > 300, "b{i} decapsulated: {v}");
        // `xlb stats` on the backend, where no agent runs: the decap counters.
        let none = lab.dir.join("no-agent.sock").to_string_lossy().into_owned();
        let st = lab.run(&format!("b{i}"), &lab.xlb.clone(), &["--socket", &none, "stats", "--json", "--pin-root", &pins]).expect("stats");
        assert!(st.status.success(), "b{i}: xlb stats without an agent: {}", String::from_utf8_lossy(&st.stderr));
        let s: Value = serde_json::from_slice(&st.stdout).expect("stats json");
        let d = &s["decap"][0];
        assert_eq!(d["iface"], "eth0", "b{i}: {s}");
        assert_eq!(d["counters"]["decapsulated"], v["decapsulated"], "b{i}: the same counters as xlb decap stats: {s}");
        let st = lab.run(&format!("b{i}"), &lab.xlb.clone(), &["--socket", &none, "stats", "--pin-root", &pins]).expect("stats");
        let text = String::from_utf8_lossy(&st.stdout);
        assert!(text.contains("xlb decap on eth0:") && text.contains("decapsulated"), "b{i}: {text}");
    }
    // With an agent: its status (and stats, metrics) carry the decap
    // counters of its own namespace only (the backends' are not its own).
    let s: Value = serde_json::from_str(&lab.cli_ok(&["status", "--json"]).expect("status")).expect("json");
    assert_eq!(s["decap"], serde_json::json!([]), "no xlb decap in the balancer's namespace yet");
    let lb_ns = lab.ns("lb");
    xlb_tests::lab::sh("ip", &["-n", &lb_ns, "link", "add", "dcp0", "type", "veth", "peer", "name", "dcp1"]).expect("veth");
    xlb_tests::lab::sh("ip", &["-n", &lb_ns, "link", "set", "dcp0", "up"]).expect("up");
    let out = lab.run("lb", &lab.xlb.clone(), &["decap", "attach", "--iface", "dcp0", "--vip", &RT_VIP.to_string(), "--pin-root", &pins]).expect("decap attach");
    assert!(out.status.success(), "decap on dcp0: {}", String::from_utf8_lossy(&out.stderr));
    let s: Value = serde_json::from_str(&lab.cli_ok(&["status", "--json"]).expect("status")).expect("json");
    assert_eq!(s["decap"][0]["iface"], "dcp0", "{}", s["decap"]);
    assert_eq!(s["decap"][0]["counters"]["decapsulated"], 0);
    let text = lab.cli_ok(&["stats"]).expect("stats");
    assert!(text.contains("xlb decap on dcp0:"), "{text}");
    assert_eq!(counter(&lab, "drop_no_route"), 0, "no frame lacked a route");

    // TCP whose full-size segments do not fit once encapsulated (IPIP:
    // +20 bytes, IPv6 +40): xlb answers the first one with the ICMP error,
    // the client's kernel lowers its path MTU and the connection completes.
    let too_big0 = counter(&lab, "too_big");
    for (target, want) in [(SocketAddr::new(IpAddr::V4(RT_VIP), 80), 1480), (SocketAddr::new(IpAddr::V6(RT_VIP6), 80), 1460)] {
        let (echoed, mtu) = lab.in_netns("client", move || big_tcp_exchange(target)).expect("thread");
        assert!(echoed, "{target}: the backend echoed all 6000 bytes");
        assert_eq!(mtu, want, "{target}: path MTU the client's kernel learned");
    }
    assert!(counter(&lab, "too_big") >= too_big0 + 2, "too_big counted for the TCP segments");

    // A frame over the path MTU: the client learns the MTU left after the
    // GUE headers (1500 - 20 - 8; IPv6: 1500 - 40 - 8) from xlb's ICMP error.
    let too_big0 = counter(&lab, "too_big");
    for (target, want) in [(SocketAddr::new(IpAddr::V4(RT_VIP), 5353), 1472), (SocketAddr::new(IpAddr::V6(RT_VIP6), 5353), 1452)] {
        let mtu = lab.in_netns("client", move || path_mtu_after_big_datagram(target)).expect("thread");
        assert_eq!(mtu, want, "{target}: path MTU the client's kernel learned");
    }
    assert!(counter(&lab, "too_big") >= too_big0 + 2, "too_big counted");

    // A backend killed: health checks (routed by the kernel) take it out,
    // every new connection goes to the other one.
    lab.kill("server2").expect("kill b2");
    wait_up(&lab, &v4, &[rt_backend(1)], Duration::from_secs(20));
    let s = connect(&lab, &format!("{RT_VIP}:80"), 100);
    assert_eq!((s.ok, s.failed), (100, 0), "{s:?}");
    assert_eq!(s.by_backend.keys().collect::<Vec<_>>(), vec!["b1"], "only b1 answers: {:?}", s.by_backend);
}

/// One TCP connection to `target` (the lab server's line echo) carrying a
/// 6000-byte line in full-size segments: (the echo came back whole, the
/// path MTU the client's kernel keeps for the connection then).
fn big_tcp_exchange(target: SocketAddr) -> (bool, i32) {
    use std::os::fd::AsRawFd;
    let line = "a".repeat(6000);
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(3)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(format!("HOLD\n{line}\n").as_bytes()).expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 16384];
    // Bounded: the echo, or a read timeout / close.
    while !got.ends_with(b"\n") && got.len() < 7000 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&got);
    let echoed = text.split_once(' ').is_some_and(|(name, rest)| name.starts_with('b') && rest.trim_end() == line);
    let (level, opt) = if target.is_ipv4() { (libc::IPPROTO_IP, libc::IP_MTU) } else { (libc::IPPROTO_IPV6, libc::IPV6_MTU) };
    let mut mtu: libc::c_int = 0;
    let mut len: libc::socklen_t = 4;
    // SAFETY: getsockopt into a valid int on our own connected socket.
    unsafe { libc::getsockopt(s.as_raw_fd(), level, opt, &mut mtu as *mut _ as *mut libc::c_void, &mut len) };
    (echoed, mtu)
}

/// Send one datagram that fills the path MTU the kernel has for `target`
/// with DF set, then read the path MTU it keeps for it after the answer.
fn path_mtu_after_big_datagram(target: SocketAddr) -> i32 {
    use std::os::fd::AsRawFd;
    let any: SocketAddr = if target.is_ipv4() { "0.0.0.0:0".parse().expect("addr") } else { "[::]:0".parse().expect("addr") };
    let s = UdpSocket::bind(any).expect("bind");
    let (level, discover, mtu_opt, header) =
        if target.is_ipv4() { (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_MTU, 28) } else { (libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER, libc::IPV6_MTU, 48) };
    let on: libc::c_int = 2; // IP_PMTUDISC_DO / IPV6_PMTUDISC_DO
    // SAFETY: setsockopt with a valid int option on our own socket.
    let rc = unsafe { libc::setsockopt(s.as_raw_fd(), level, discover, &on as *const _ as *const libc::c_void, 4) };
    assert_eq!(rc, 0, "setsockopt");
    s.connect(target).expect("connect");
    let read_mtu = || {
        let mut mtu: libc::c_int = 0;
        let mut len: libc::socklen_t = 4;
        // SAFETY: getsockopt into a valid int on our own connected socket.
        unsafe { libc::getsockopt(s.as_raw_fd(), level, mtu_opt, &mut mtu as *mut _ as *mut libc::c_void, &mut len) };
        mtu
    };
    // The TCP exchange before may have lowered it already (IPIP's overhead).
    let start = read_mtu();
    let payload = vec![0x42u8; start as usize - header];
    let mut mtu = start;
    for _ in 0..20 {
        let _ = s.send(&payload);
        std::thread::sleep(Duration::from_millis(100));
        mtu = read_mtu();
        if mtu != start {
            break;
        }
    }
    mtu
}
