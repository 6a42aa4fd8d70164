//! Routed backends' test beds.
//!
//! `FibNs`: a network namespace of the test's own, entered by the calling
//! thread, with routes and permanent neighbour entries, so that the XDP
//! program's `bpf_fib_lookup` under BPF_PROG_TEST_RUN gets known answers:
//!
//! ```text
//!   eth0 10.210.0.10/24 fd00:210::10/64  (MAC FIB_SMAC)   ── gw .1 / ::1 (MAC GW_MAC)
//!        10.220.0.0/24, fd00:220::/64 via the gateway      (backends)
//!        10.230.0.0/24, fd00:230::/64 via the gateway, mtu 1400 (too-big cases)
//!        10.221.0.0/24 via 10.210.0.2                       (no neighbour entry)
//!   eth1 10.211.0.10/24 (MAC FIB_SMAC1) ── gw 10.211.0.1 (MAC GW_MAC)
//!        10.240.0.0/24 via it                               (another interface)
//! ```
//!
//! Deleted on drop (also when the test fails).

use anyhow::{bail, Context, Result};
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::lab::{in_ns, sh, Procs};

/// Delete a namespace of this module (only the test's own thread is in
/// it: nothing to kill).
fn del_ns(name: &str) {
    let _ = std::process::Command::new("ip").args(["netns", "del", name]).stderr(std::process::Stdio::null()).status();
}

/// Prefix of every namespace the routed tests create.
pub const NS_PREFIX: &str = "rt-";
/// MAC of the fixture's eth0 (the encapsulated frames' source MAC).
pub const FIB_SMAC: [u8; 6] = [0x02, 0, 0, 0, 0xaa, 0x01];
/// MAC of the fixture's eth1.
pub const FIB_SMAC1: [u8; 6] = [0x02, 0, 0, 0, 0xaa, 0x02];
/// MAC of the gateways (the encapsulated frames' destination MAC).
pub const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xbb, 0x01];

/// The namespace, entered by the thread that created it.
pub struct FibNs {
    /// Its name.
    pub name: String,
    /// Index of eth0 (the ingress interface of test runs).
    pub eth0: u32,
    /// Index of eth1.
    pub eth1: u32,
}

const CLONE_NEWNET: i32 = 0x4000_0000;

extern "C" {
    fn setns(fd: i32, nstype: i32) -> i32;
}

impl FibNs {
    /// Create the namespace and move the calling thread into it.
    pub fn enter(tag: &str) -> Result<FibNs> {
        let name = format!("{NS_PREFIX}{tag}{}", std::process::id());
        del_ns(&name);
        sh("ip", &["netns", "add", &name])?;
        let mut ns = FibNs { name, eth0: 0, eth1: 0 };
        ns.build().context("building the FIB namespace")?;
        let f = std::fs::File::open(format!("/var/run/netns/{}", ns.name))?;
        // SAFETY: setns(2) on a namespace file we opened; affects this thread only.
        if unsafe { setns(f.as_raw_fd(), CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        let idx = |dev: &str| -> Result<u32> {
            let out = sh("ip", &["-n", &ns.name, "-o", "link", "show", dev])?;
            out.split(':').next().and_then(|i| i.trim().parse().ok()).context("ifindex")
        };
        let (eth0, eth1) = (idx("eth0")?, idx("eth1")?);
        ns.eth0 = eth0;
        ns.eth1 = eth1;
        Ok(ns)
    }

    fn ip(&self, args: &str) -> Result<String> {
        let mut a = vec!["-n", &self.name];
        a.extend(args.split_whitespace());
        sh("ip", &a)
    }

    fn build(&self) -> Result<()> {
        let mac = |m: [u8; 6]| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
        let (s0, s1, gw) = (mac(FIB_SMAC), mac(FIB_SMAC1), mac(GW_MAC));
        for cmd in [
            "link set lo up".to_string(),
            "link add eth0 type veth peer name peer0".to_string(),
            "link add eth1 type veth peer name peer1".to_string(),
            format!("link set eth0 address {s0} mtu 1500 up"),
            format!("link set eth1 address {s1} up"),
            "link set peer0 up".to_string(),
            "link set peer1 up".to_string(),
            "addr add 10.210.0.10/24 dev eth0".to_string(),
            "addr add fd00:210::10/64 dev eth0 nodad".to_string(),
            "addr add 10.211.0.10/24 dev eth1".to_string(),
            format!("neigh add 10.210.0.1 lladdr {gw} dev eth0 nud permanent"),
            format!("neigh add fd00:210::1 lladdr {gw} dev eth0 nud permanent"),
            format!("neigh add 10.211.0.1 lladdr {gw} dev eth1 nud permanent"),
            "route add 10.220.0.0/24 via 10.210.0.1".to_string(),
            "route add fd00:220::/64 via fd00:210::1".to_string(),
            "route add 10.230.0.0/24 via 10.210.0.1 mtu lock 1400".to_string(),
            "route add fd00:230::/64 via fd00:210::1 mtu lock 1400".to_string(),
            "route add 10.221.0.0/24 via 10.210.0.2".to_string(),
            "route add 10.240.0.0/24 via 10.211.0.1".to_string(),
        ] {
            self.ip(&cmd)?;
        }
        for k in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            sh("ip", &["netns", "exec", &self.name, "sysctl", "-qw", k])?;
        }
        Ok(())
    }
}

impl Drop for FibNs {
    fn drop(&mut self) {
        del_ns(&self.name);
    }
}

/// A routed deployment in namespaces of its own (all named `rt-TAG…`):
///
/// ```text
///   client 10.201.0.2 ─┐                        ┌─ b1 10.202.0.21 (xlb decap)
///   lb     10.201.0.10 ┼ brA ── router ── brB ──┼─ b2 10.202.0.22 (xlb decap)
///          (xlb agent) ┘  .1            .1      └─ …
/// ```
///
/// (IPv6 alike: fd00:201::/64, fd00:202::/64.) The client routes the VIPs
/// via the balancer; the balancer's default route is the router; backends
/// hold the VIPs on lo, run `xlb decap` on eth0 and answer the client
/// directly through the router (their default route, source the VIP).
/// Torn down on drop, also when a test fails.
pub struct RoutedLab {
    /// The `xlb` binary.
    pub xlb: PathBuf,
    /// The `xlb-lab` binary.
    pub lab_bin: PathBuf,
    /// The agent's API socket.
    pub socket: PathBuf,
    /// Working directory (logs, socket, state).
    pub dir: PathBuf,
    /// The lab's own BPF filesystem (pins of the agent and of `xlb decap`).
    pub bpffs: PathBuf,
    tag: String,
    namespaces: Vec<String>,
    procs: Procs,
}

/// The routed lab's IPv4 VIP.
pub const RT_VIP: Ipv4Addr = Ipv4Addr::new(10, 201, 9, 100);
/// The routed lab's IPv6 VIP.
pub const RT_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 9, 0, 0, 0, 0, 0x100);

/// Backend `i`'s IPv4 address (another subnet than the balancer's).
pub fn rt_backend(i: usize) -> String {
    format!("10.202.0.{}", 20 + i)
}

/// Backend `i`'s IPv6 address.
pub fn rt_backend6(i: usize) -> String {
    format!("fd00:202::{}", 20 + i)
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl RoutedLab {
    /// Namespace name of a role.
    pub fn ns(&self, role: &str) -> String {
        format!("{NS_PREFIX}{}{role}", self.tag)
    }

    /// Build the topology with `backends` backends, start their servers
    /// (HTTP on 80, UDP echo on 5353), `xlb decap` on them, the veth
    /// helper and the agent (`agent_args` added), and wait for its API.
    pub fn start(backends: usize, agent_args: &[&str]) -> Result<RoutedLab> {
        let (xlb, lab_bin) = crate::scenario::binaries();
        let tag = format!("{}{}", std::process::id() % 100_000, SEQ.fetch_add(1, Ordering::SeqCst));
        let dir = std::env::temp_dir().join(format!("xlb-rt-{tag}"));
        let bpffs = dir.join("bpffs");
        std::fs::create_dir_all(&bpffs)?;
        let socket = dir.join("xlb.sock");
        let mut r = RoutedLab { xlb, lab_bin, socket, procs: Procs::new(&dir), dir, bpffs, tag, namespaces: Vec::new() };
        sh("mount", &["-t", "bpf", "bpf", &r.bpffs.to_string_lossy()]).context("mounting the lab's bpffs")?;
        r.build(backends).context("building the routed topology")?;
        let pins = r.bpffs.join("xlb").to_string_lossy().into_owned();
        let (xlb, lab_bin) = (r.xlb.clone(), r.lab_bin.clone());
        for i in 1..=backends {
            let role = format!("b{i}");
            let out = r.run(&role, &xlb, &["decap", "attach", "--iface", "eth0", "--vip", &RT_VIP.to_string(), "--vip", &RT_VIP6.to_string(), "--pin-root", &pins])?;
            if !out.status.success() {
                bail!("xlb decap attach on {role}: {}", String::from_utf8_lossy(&out.stderr));
            }
            r.spawn(&format!("server{i}"), &role, &lab_bin, &["serve", "--name", &role, "--port", "80", "--udp-port", "5353"])?;
        }
        // XDP_TX'd frames reach the bridge only with a program on the peer.
        r.spawn("xdp-pass", "sw", &xlb, &["xdp-pass", "--iface", "brA-lb"])?;
        let (sock, state) = (r.socket.to_string_lossy().into_owned(), r.dir.join("state").to_string_lossy().into_owned());
        let mut args = vec!["--socket", &sock, "agent", "--iface", "eth0", "--conntrack-size", "65536", "--state-dir", &state, "--pin-root", &pins];
        args.extend_from_slice(agent_args);
        r.spawn("agent", "lb", &xlb, &args)?;
        let t0 = Instant::now();
        while !r.cli(&["vip", "list"])?.status.success() {
            if t0.elapsed() > Duration::from_secs(15) {
                bail!("the agent's API did not come up: {}", r.log("agent"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(r)
    }

    fn add_ns(&mut self, role: &str) -> Result<String> {
        let ns = self.ns(role);
        sh("ip", &["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        sh("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Plug `dev` of `role` into bridge `br` with addresses.
    fn plug(&self, role: &str, dev: &str, br: &str, v4: &str, v6: &str) -> Result<()> {
        let (ns, sw) = (self.ns(role), self.ns("sw"));
        let port = format!("{br}-{role}");
        sh("ip", &["-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", dev, "netns", &ns])?;
        sh("ip", &["-n", &sw, "link", "set", &port, "master", br, "up"])?;
        sh("ip", &["-n", &ns, "addr", "add", v4, "dev", dev])?;
        sh("ip", &["-n", &ns, "addr", "add", v6, "dev", dev, "nodad"])?;
        sh("ip", &["-n", &ns, "link", "set", dev, "up"])?;
        sh("ip", &["netns", "exec", &ns, "ethtool", "-K", dev, "tx", "off"])?;
        Ok(())
    }

    fn sysctl(&self, role: &str, kv: &str) -> Result<()> {
        sh("ip", &["netns", "exec", &self.ns(role), "sysctl", "-qw", kv]).map(|_| ())
    }

    fn build(&mut self, backends: usize) -> Result<()> {
        let sw = self.add_ns("sw")?;
        for br in ["brA", "brB"] {
            sh("ip", &["-n", &sw, "link", "add", br, "type", "bridge"])?;
            sh("ip", &["-n", &sw, "link", "set", br, "up"])?;
        }
        self.add_ns("client")?;
        self.plug("client", "eth0", "brA", "10.201.0.2/24", "fd00:201::2/64")?;
        let c = self.ns("client");
        sh("ip", &["-n", &c, "route", "add", &format!("{RT_VIP}/32"), "via", "10.201.0.10"])?;
        sh("ip", &["-n", &c, "-6", "route", "add", &format!("{RT_VIP6}/128"), "via", "fd00:201::10"])?;
        self.add_ns("lb")?;
        self.plug("lb", "eth0", "brA", "10.201.0.10/24", "fd00:201::10/64")?;
        let lb = self.ns("lb");
        sh("ip", &["-n", &lb, "route", "add", "default", "via", "10.201.0.1"])?;
        sh("ip", &["-n", &lb, "-6", "route", "add", "default", "via", "fd00:201::1"])?;
        // bpf_fib_lookup answers only where forwarding is enabled.
        self.sysctl("lb", "net.ipv4.ip_forward=1")?;
        self.sysctl("lb", "net.ipv6.conf.all.forwarding=1")?;
        sh("ip", &["-n", &sw, "link", "set", "brA-lb", "type", "bridge_slave", "flood", "off"])?;
        self.add_ns("router")?;
        self.plug("router", "eth0", "brA", "10.201.0.1/24", "fd00:201::1/64")?;
        self.plug("router", "eth1", "brB", "10.202.0.1/24", "fd00:202::1/64")?;
        self.sysctl("router", "net.ipv4.ip_forward=1")?;
        self.sysctl("router", "net.ipv6.conf.all.forwarding=1")?;
        for i in 1..=backends {
            let role = format!("b{i}");
            self.add_ns(&role)?;
            self.plug(&role, "eth0", "brB", &format!("{}/24", rt_backend(i)), &format!("{}/64", rt_backend6(i)))?;
            let ns = self.ns(&role);
            sh("ip", &["-n", &ns, "addr", "add", &format!("{RT_VIP}/32"), "dev", "lo"])?;
            sh("ip", &["-n", &ns, "addr", "add", &format!("{RT_VIP6}/128"), "dev", "lo", "nodad"])?;
            // Answers (UDP from a wildcard socket too) leave from the VIP.
            sh("ip", &["-n", &ns, "route", "add", "default", "via", "10.202.0.1", "src", &RT_VIP.to_string()])?;
            sh("ip", &["-n", &ns, "-6", "route", "add", "default", "via", "fd00:202::1", "src", &RT_VIP6.to_string()])?;
        }
        Ok(())
    }

    /// Start a long-running process in a role's namespace; killed on drop.
    pub fn spawn(&mut self, name: &str, role: &str, program: &Path, args: &[&str]) -> Result<()> {
        let ns = self.ns(role);
        self.procs.spawn(name, &ns, program, args)
    }

    /// Kill a process started with `spawn` at once.
    pub fn kill(&mut self, name: &str) -> Result<()> {
        self.procs.kill(name)
    }

    /// The log of a process started with `spawn`.
    pub fn log(&self, name: &str) -> String {
        self.procs.log(name)
    }

    /// Run a command in a role's namespace to completion.
    pub fn run(&self, role: &str, program: &Path, args: &[&str]) -> Result<Output> {
        in_ns(&self.ns(role), program).args(args).output().with_context(|| format!("cannot run {}", program.display()))
    }

    /// Run the CLI against the agent.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        Command::new(&self.xlb).arg("--socket").arg(&self.socket).args(args).output().context("cannot run xlb")
    }

    /// Run the CLI and require success; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args)?;
        if !out.status.success() {
            bail!("`xlb {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A file in the `/proc/net` of a role's namespace.
    pub fn proc_net(&self, role: &str, file: &str) -> Result<String> {
        let out = self.run(role, Path::new("cat"), &[&format!("/proc/net/{file}")])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Run `f` on a thread inside a role's network namespace (sockets it
    /// opens live there).
    pub fn in_netns<T: Send + 'static>(&self, role: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let path = format!("/var/run/netns/{}", self.ns(role));
        std::thread::spawn(move || -> Result<T> {
            let ns = std::fs::File::open(&path)?;
            // SAFETY: setns(2) on a namespace file we opened; affects this thread only.
            if unsafe { setns(ns.as_raw_fd(), CLONE_NEWNET) } != 0 {
                bail!("setns: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread in {role} panicked"))?
    }
}

impl Drop for RoutedLab {
    fn drop(&mut self) {
        self.procs.stop_all();
        for ns in self.namespaces.drain(..).rev() {
            crate::lab::delete_ns(&ns);
        }
        let _ = Command::new("umount").args(["-l"]).arg(&self.bpffs).stderr(std::process::Stdio::null()).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
