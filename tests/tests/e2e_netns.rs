//! End to end, issue 9: the agent run as users run it in a network
//! namespace (`ip netns exec NS xlb agent …`, no `--pin-root`).
//! - `ip netns exec` gives the agent a mount namespace of its own: its pins
//!   must still outlive it (they go to the initial namespace's bpffs), so a
//!   `kill -9` breaks no stream and fails no connection, and a new agent
//!   adopts.
//! - The kernel reuses network-namespace inodes, which name the state file:
//!   an agent in a new namespace must not resume a dead one's state.
//!
//! These tests use the host's default pin root (/sys/fs/bpf/xlb) as a user
//! would, and remove what they pinned there, also on failure. Needs root.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};
use xlb_tests::{
    lab::{self, backend_ip, TempDir, NS_PREFIX},
    scenario::{binaries, vip_arg, Deployment, Pinning},
    traffic::Held,
};

/// Removes a pin directory in the host's bpffs when dropped.
struct PinGuard(Option<PathBuf>);

impl Drop for PinGuard {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// The interface's pin directory (`ROOT/IFACE`) from `status["pinned"]`.
fn pin_dir(status: &serde_json::Value) -> PathBuf {
    let maps = status["pinned"].as_str().expect("pinned").to_string();
    Path::new(&maps).parent().expect("layout dir has a parent").to_path_buf()
}

/// The tests here create and delete namespaces, and one waits for the
/// kernel to hand a freed namespace inode out again: run them one at a time,
/// or another test's namespaces take that inode.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn ip_netns_exec_agent_killed_keeps_forwarding_with_default_pins() {
    let _serial = serial();
    let (xlb, lab_bin) = binaries();
    let mut d = Deployment::start_pinning(&xlb, &lab_bin, 3, &[], Pinning::Default).expect("deployment");
    let ips: Vec<String> = (1..=3).map(|i| backend_ip(i).to_string()).collect();
    d.configure_vip(&vip_arg(), &[], &ips).expect("vip");
    d.wait_states(&[1, 2, 3], Duration::from_secs(10)).expect("backends up");
    let st = d.status().expect("status");
    let dir = pin_dir(&st);
    let _guard = PinGuard(Some(dir.clone()));
    assert!(dir.starts_with("/sys/fs/bpf/xlb"), "default pins in the host's bpffs: {st}");
    assert!(st["pins_lost_on_exit"].is_null(), "pins outlive the agent: {st}");
    // The pins are visible from here (the test runs in the initial mount
    // namespace), not only inside the agent's.
    assert!(dir.join("link").exists(), "{} is pinned in the initial mount namespace", dir.display());
    let prog = d.xdp_prog("lb").expect("ip link").expect("attached");

    // 30 long-lived streams for 10 s; the agent dies with SIGKILL.
    d.spawn_hold("hold", 30, 10_000).expect("hold client");
    std::thread::sleep(Duration::from_millis(1500));
    d.lab.kill("agent").expect("kill -9 the agent");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(d.xdp_prog("lb").expect("ip link"), Some(prog), "still attached with no agent");
    let s = d.connect(60).expect("client");
    assert_eq!((s.ok, s.failed), (60, 0), "new connections with no agent running: {:?}", s.errors);

    // A new agent, started the same way, adopts.
    d.start_agent("agent2", &[]).expect("second agent");
    let log = d.lab.log("agent2");
    assert!(log.contains("adopted the pinned state: 1 VIP(s) and 3 backend(s) kept"), "{log}");
    assert!(log.contains("replaced the program"), "{log}");
    let report: Vec<Held> = d.report("hold", Duration::from_secs(30)).expect("hold report");
    assert_eq!(report.len(), 30);
    let broken: Vec<&Held> = report.iter().filter(|h| h.broken.is_some() || h.switched).collect();
    assert!(broken.is_empty(), "streams broken or moved by the kill: {broken:?}");
    eprintln!("ip netns exec agent killed: 30/30 streams kept, 60/60 new connections without an agent");

    d.cli_ok(&["detach"]).expect("detach");
    assert_eq!(d.xdp_prog("lb").expect("ip link"), None, "detached");
    assert!(!dir.exists(), "`xlb detach` removed {}", dir.display());
}

/// A namespace `ns` whose `eth0` is a veth to `eth0` in namespace `peer`.
struct Net {
    names: Vec<String>,
}

impl Net {
    fn new(ns: &str, peer: &str) -> Net {
        let net = Net { names: vec![ns.to_string(), peer.to_string()] };
        for n in &net.names {
            lab::sh("ip", &["netns", "add", n]).expect("ip netns add");
        }
        lab::sh("ip", &["-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", peer]).expect("veth");
        for n in &net.names {
            lab::sh("ip", &["-n", n, "link", "set", "eth0", "up"]).expect("up");
        }
        net
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in &self.names {
            lab::delete_ns(n);
        }
    }
}

fn inode(ns: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/run/netns/{ns}")).expect("netns file").ino()
}

/// Start `xlb agent` in `ns` as a user would (defaults, but the state and
/// socket in `dir`) and wait for its API.
fn agent(xlb: &Path, ns: &str, dir: &TempDir, name: &str) -> Child {
    let log = std::fs::File::create(dir.join(&format!("{name}.log"))).expect("log");
    let mut c = lab::in_ns(ns, xlb)
        .args(["--socket"])
        .arg(dir.join("xlb.sock"))
        .args(["agent", "--iface", "eth0", "--conntrack-size", "65536", "--state-dir"])
        .arg(dir.join("state"))
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start the agent");
    wait_api(xlb, dir, &mut c, name);
    c
}

/// Wait until the agent `c` (logging to `NAME.log`) answers.
fn wait_api(xlb: &Path, dir: &TempDir, c: &mut Child, name: &str) {
    let t0 = Instant::now();
    while !cli(xlb, dir, &["vip", "list"]).status.success() {
        if t0.elapsed() > Duration::from_secs(15) || c.try_wait().expect("wait").is_some() {
            let _ = c.kill();
            panic!("agent {name} did not come up: {}", std::fs::read_to_string(dir.join(&format!("{name}.log"))).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The binary, a scratch directory and two namespace names for test `what`.
fn bed(what: &str) -> (PathBuf, TempDir, String, String) {
    let (xlb, _) = binaries();
    let dir = TempDir::new(&format!("netns-{what}")).expect("dir");
    let tag = std::process::id() % 100_000;
    (xlb, dir, format!("{NS_PREFIX}{tag}{what}"), format!("{NS_PREFIX}{tag}{what}p"))
}

fn cli(xlb: &Path, dir: &TempDir, args: &[&str]) -> std::process::Output {
    Command::new(xlb).arg("--socket").arg(dir.join("xlb.sock")).args(args).stdin(Stdio::null()).output().expect("run xlb")
}

#[test]
fn a_new_namespace_with_a_reused_inode_does_not_resume_a_dead_deployment() {
    let _serial = serial();
    let (xlb, dir, ns, peer) = bed("reuse");
    let mut guard = PinGuard(None);

    // A deployment with a few VIPs; the agent is killed, its namespace deleted.
    let net = Net::new(&ns, &peer);
    let old_inode = inode(&ns);
    let mut a1 = agent(&xlb, &ns, &dir, "agent1");
    let vips: Vec<String> = (0..3).map(|i| format!("10.9.0.{}:80/tcp", 100 + i)).collect();
    for v in &vips {
        assert!(cli(&xlb, &dir, &["vip", "add", v]).status.success());
    }
    let st: serde_json::Value = serde_json::from_slice(&cli(&xlb, &dir, &["status", "--json"]).stdout).expect("status");
    guard.0 = Some(pin_dir(&st));
    let _ = a1.kill();
    let _ = a1.wait();
    drop(net);

    // A new namespace with the same name until the kernel hands out the
    // same inode (it does once the old namespace is freed, which a loaded
    // machine may take long to do). If it does not within 15 s, the test
    // gives the new namespace the dead one's leftovers itself (its state
    // file and pins renamed to the new inode's names): the same situation.
    let t0 = Instant::now();
    let net = loop {
        let net = Net::new(&ns, &peer);
        let now = inode(&ns);
        if now == old_inode {
            eprintln!("namespace inode {old_inode} reused after {:?}", t0.elapsed());
            break net;
        }
        if t0.elapsed() > Duration::from_secs(15) {
            let state = dir.join("state");
            let (old_key, new_key) = (format!("eth0@ns{old_inode}"), format!("eth0@ns{now}"));
            std::fs::rename(state.join(format!("{old_key}.json")), state.join(format!("{new_key}.json"))).expect("move the state file");
            let old_pins = guard.0.take().expect("pins");
            let new_pins = old_pins.with_file_name(&new_key);
            std::fs::rename(&old_pins, &new_pins).expect("move the pins");
            guard.0 = Some(new_pins);
            eprintln!("inode {old_inode} not reused within 15 s: the dead deployment's leftovers were renamed to {new_key}");
            break net;
        }
        drop(net);
        std::thread::sleep(Duration::from_millis(200));
    };

    // The agent there, with defaults, finds the dead one's state file under
    // the same name: it must set it aside and start clean.
    let mut a2 = agent(&xlb, &ns, &dir, "agent2");
    let log = std::fs::read_to_string(dir.join("agent2.log")).unwrap_or_default();
    assert!(log.contains("belongs to a deployment that is gone"), "{log}");
    assert!(log.contains("kept aside") && log.contains("starting clean"), "{log}");
    assert!(!log.contains("adopted"), "nothing of the dead deployment is adopted: {log}");
    let list = String::from_utf8_lossy(&cli(&xlb, &dir, &["vip", "list"]).stdout).into_owned();
    for v in &vips {
        assert!(!list.contains(v.as_str()), "{v} resumed from a dead deployment: {list}");
    }
    let add = cli(&xlb, &dir, &["vip", "add", &vips[0]]);
    assert!(add.status.success(), "{}", String::from_utf8_lossy(&add.stderr));
    let aside = std::fs::read_dir(dir.join("state"))
        .expect("state dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".json.stale-"))
        .count();
    assert_eq!(aside, 1, "the dead deployment's state file is kept aside");

    // A restart of this deployment still adopts its own state.
    let _ = a2.kill();
    let _ = a2.wait();
    let mut a3 = agent(&xlb, &ns, &dir, "agent3");
    let log = std::fs::read_to_string(dir.join("agent3.log")).unwrap_or_default();
    assert!(log.contains("adopted the pinned state: 1 VIP(s)"), "{log}");
    assert!(cli(&xlb, &dir, &["detach"]).status.success());
    let _ = a3.wait();
    drop(net);
}

#[test]
fn pins_that_die_with_the_agent_are_reported_never_claimed_to_stay() {
    let _serial = serial();
    let (xlb, dir, ns, peer) = bed("priv");
    let _net = Net::new(&ns, &peer);
    // A bpffs mounted only inside the agent's own mount namespace (what
    // `ip netns exec` gives it): pins there end with the agent.
    let private = dir.join("bpffs");
    std::fs::create_dir_all(&private).expect("mkdir");
    let script = format!(
        "mount -t bpf bpf {p} && exec {xlb} --socket {s} agent --iface eth0 --conntrack-size 65536 --pin-root {p}/xlb --state-dir {st}",
        p = private.display(),
        xlb = xlb.display(),
        s = dir.join("xlb.sock").display(),
        st = dir.join("state").display()
    );
    let log = std::fs::File::create(dir.join("agent.log")).expect("log");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns, "sh", "-c", &script])
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start the agent");
    wait_api(&xlb, &dir, &mut child, "agent");
    let st: serde_json::Value = serde_json::from_slice(&cli(&xlb, &dir, &["status", "--json"]).stdout).expect("status");
    let why = st["pins_lost_on_exit"].as_str().unwrap_or_default().to_string();
    assert!(why.contains("own mount namespace"), "status says the pins die with the agent: {st}");
    let text = String::from_utf8_lossy(&cli(&xlb, &dir, &["status"]).stdout).into_owned();
    assert!(text.contains("forwarding stops when the agent exits"), "{text}");
    lab::terminate(&mut child);
    let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    assert!(log.contains("pins do not outlive this agent"), "said at start: {log}");
    assert!(log.contains("XDP detaches from eth0 now") && !log.contains("stays attached"), "honest at exit: {log}");
    let attached = lab::sh("ip", &["-n", &ns, "link", "show", "eth0"]).expect("ip link");
    assert!(!attached.contains("xdp"), "forwarding ended with the agent, as it said: {attached}");
}
