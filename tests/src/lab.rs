//! A throwaway L2 DSR topology in network namespaces it creates itself:
//!
//! ```text
//!   client ─┐
//!   lb ─────┤ br0 (in the "sw" namespace)      VIP 10.200.0.100 on every backend's lo
//!   b1..bN ─┘                                  (arp_ignore=1, arp_announce=2)
//! ```
//!
//! The client routes the VIP via the balancer; xlb on the balancer's eth0
//! rewrites MACs and bounces frames back out (XDP_TX) to a backend, which
//! answers the client directly. All traffic stays inside these namespaces.
//! Everything is torn down on drop (so also when a test panics), and
//! `cleanup_all` removes anything a killed run left behind.

use anyhow::{bail, Context, Result};
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// Prefix of every namespace the lab creates.
pub const NS_PREFIX: &str = "xlbt";
/// The virtual IP of the lab's service.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 100);
/// The balancer's address.
pub const LB_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
/// The client's address.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
/// The client's IPv6 address.
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x2);

/// The IPv6 virtual IP.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x100);
/// The balancer's IPv6 address.
pub const LB_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x10);

/// IPv6 address of backend `i` (1-based).
pub fn backend_ip6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x20 + i as u16)
}

/// Address of backend `i` (1-based).
pub fn backend_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, 0, 20 + i as u8)
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Run `ip` (or any command) and fail with its stderr.
pub fn sh(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("cannot run {cmd}"))?;
    if !out.status.success() {
        bail!("`{cmd} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A command to run inside namespace `ns`.
pub fn in_ns(ns: &str, program: &Path) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(program);
    c
}

/// Kill every process in a namespace and delete it.
pub fn delete_ns(ns: &str) {
    if let Ok(pids) = sh("ip", &["netns", "pids", ns]) {
        for pid in pids.split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }
    let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
}

/// Remove every lab namespace on the machine (left by a killed run), and
/// unmount the labs' BPF filesystems.
pub fn cleanup_all() {
    if let Ok(mounts) = std::fs::read_to_string("/proc/mounts") {
        for m in mounts.lines().filter_map(|l| l.split_whitespace().nth(1)).filter(|p| p.contains("/xlb-lab-")) {
            let _ = Command::new("umount").args(["-l", m]).stderr(Stdio::null()).status();
        }
    }
    if let Ok(list) = sh("ip", &["netns", "list"]) {
        for line in list.lines() {
            if let Some(name) = line.split_whitespace().next() {
                if name.starts_with(NS_PREFIX) {
                    delete_ns(name);
                }
            }
        }
    }
}

/// Long-running processes started in network namespaces, each logging to
/// `NAME.log` in a directory; stopped (last started first) on drop, and by
/// their owner before it deletes the namespaces.
pub struct Procs {
    dir: PathBuf,
    children: Vec<(String, Child)>,
}

impl Procs {
    /// No processes yet; logs go to `dir`.
    pub fn new(dir: &Path) -> Procs {
        Procs { dir: dir.to_path_buf(), children: Vec::new() }
    }

    /// Start `program` in namespace `ns` under `name`.
    pub fn spawn(&mut self, name: &str, ns: &str, program: &Path, args: &[&str]) -> Result<()> {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        let child = in_ns(ns, program)
            .args(args)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    fn take(&mut self, name: &str) -> Result<Child> {
        let i = self.children.iter().position(|(n, _)| n == name).with_context(|| format!("no process {name}"))?;
        Ok(self.children.remove(i).1)
    }

    /// SIGTERM, then SIGKILL after 3 s.
    pub fn stop(&mut self, name: &str) -> Result<()> {
        terminate(&mut self.take(name)?);
        Ok(())
    }

    /// SIGKILL at once.
    pub fn kill(&mut self, name: &str) -> Result<()> {
        let mut child = self.take(name)?;
        let _ = child.kill();
        let _ = child.wait();
        Ok(())
    }

    /// The pid (`ip netns exec` execs the program).
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.children.iter().find(|(n, _)| n == name).map(|(_, c)| c.id())
    }

    /// What the process wrote so far.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Stop every process, last started first.
    pub fn stop_all(&mut self) {
        for (_, mut c) in self.children.drain(..).rev() {
            terminate(&mut c);
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// The topology and the processes running in it.
pub struct Lab {
    /// Unique tag of this lab (part of every namespace name).
    pub tag: String,
    /// Number of backends.
    pub backends: usize,
    /// Working directory (API socket, logs).
    pub dir: PathBuf,
    /// A BPF filesystem of this lab's own, for the agent's pins. Mounted in
    /// the root mount namespace: `ip netns exec` remounts /sys, which hides
    /// /sys/fs/bpf from the agent, but not this.
    pub bpffs: PathBuf,
    namespaces: Vec<String>,
    procs: Procs,
}

impl Lab {
    /// Namespace name of a role: "sw", "client", "lb", "b1"….
    pub fn ns(&self, role: &str) -> String {
        format!("{NS_PREFIX}{}{role}", self.tag)
    }

    /// Create the topology with `backends` backends.
    pub fn new(backends: usize) -> Result<Lab> {
        let tag = format!("{}{}", std::process::id() % 100_000, SEQ.fetch_add(1, Ordering::SeqCst));
        let dir = std::env::temp_dir().join(format!("xlb-lab-{tag}"));
        let bpffs = dir.join("bpffs");
        std::fs::create_dir_all(&bpffs)?;
        let mut lab = Lab { tag, backends, procs: Procs::new(&dir), dir, bpffs, namespaces: Vec::new() };
        sh("mount", &["-t", "bpf", "bpf", &lab.bpffs.to_string_lossy()]).context("mounting the lab's bpffs")?;
        lab.build().context("building the namespace topology")?;
        Ok(lab)
    }

    fn add_ns(&mut self, role: &str) -> Result<String> {
        let ns = self.ns(role);
        sh("ip", &["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        sh("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Connect `role`'s eth0 to the bridge (port `p-ROLE`) with an IPv4 and
    /// an IPv6 address (no duplicate address detection: usable at once).
    fn attach(&mut self, role: &str, ip: Ipv4Addr, ip6: Ipv6Addr) -> Result<String> {
        let ns = self.add_ns(role)?;
        let sw = self.ns("sw");
        let port = format!("p-{role}");
        sh("ip", &["-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
        sh("ip", &["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
        sh("ip", &["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        sh("ip", &["-n", &ns, "addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"])?;
        sh("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        Ok(ns)
    }

    /// Another host on the bridge (e.g. a second balancer), torn down with the lab.
    pub fn add_host(&mut self, role: &str, ip: Ipv4Addr, ip6: Ipv6Addr) -> Result<String> {
        self.attach(role, ip, ip6)
    }

    fn build(&mut self) -> Result<()> {
        let sw = self.add_ns("sw")?;
        sh("ip", &["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        sh("ip", &["-n", &sw, "link", "set", "br0", "up"])?;
        let client = self.attach("client", CLIENT_IP, CLIENT_IP6)?;
        sh("ip", &["-n", &client, "route", "add", &format!("{VIP}/32"), "via", &LB_IP.to_string()])?;
        sh("ip", &["-n", &client, "-6", "route", "add", &format!("{VIP6}/128"), "via", &LB_IP6.to_string()])?;
        // Frames XDP_TX'd by the balancer skip checksum completion: make the
        // client's stack compute TCP/UDP checksums itself.
        sh("ip", &["netns", "exec", &client, "ethtool", "-K", "eth0", "tx", "off"])?;
        self.attach("lb", LB_IP, LB_IP6)?;
        for i in 1..=self.backends {
            let ns = self.attach(&format!("b{i}"), backend_ip(i), backend_ip6(i))?;
            sh("ip", &["-n", &ns, "addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            sh("ip", &["-n", &ns, "addr", "add", &format!("{VIP6}/128"), "dev", "lo"])?;
            for (k, v) in [("arp_ignore", "1"), ("arp_announce", "2")] {
                for dev in ["all", "eth0"] {
                    sh("ip", &["netns", "exec", &ns, "sysctl", "-qw", &format!("net.ipv4.conf.{dev}.{k}={v}")])?;
                }
            }
            sh("ip", &["netns", "exec", &ns, "ethtool", "-K", "eth0", "tx", "off"])?;
        }
        Ok(())
    }

    /// Start a long-running process in a role's namespace; killed on drop.
    pub fn spawn(&mut self, name: &str, role: &str, program: &Path, args: &[&str]) -> Result<()> {
        let ns = self.ns(role);
        self.procs.spawn(name, &ns, program, args)
    }

    /// Stop a process started with `spawn` (SIGTERM, then SIGKILL after 3 s).
    pub fn stop(&mut self, name: &str) -> Result<()> {
        self.procs.stop(name)
    }

    /// Kill a process started with `spawn` at once (SIGKILL).
    pub fn kill(&mut self, name: &str) -> Result<()> {
        self.procs.kill(name)
    }

    /// The pid of a process started with `spawn` (`ip netns exec` execs it).
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.procs.pid(name)
    }

    /// The log of a process started with `spawn`.
    pub fn log(&self, name: &str) -> String {
        self.procs.log(name)
    }

    /// Run a command in a role's namespace to completion.
    pub fn run(&self, role: &str, program: &Path, args: &[&str]) -> Result<std::process::Output> {
        in_ns(&self.ns(role), program).args(args).output().with_context(|| format!("cannot run {}", program.display()))
    }
}

/// A scratch directory for one test, removed on drop (also when the test fails).
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// `$TMPDIR/xlb-TAG-PID`, created empty.
    pub fn new(tag: &str) -> Result<TempDir> {
        let d = std::env::temp_dir().join(format!("xlb-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
        Ok(TempDir(d))
    }

    /// A path inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// SIGTERM a child and wait up to 3 s before SIGKILL.
pub fn terminate(child: &mut Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc_kill(child.id() as i32, 15);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.procs.stop_all();
        for ns in self.namespaces.drain(..).rev() {
            delete_ns(&ns);
        }
        // Unmounting frees whatever is still pinned there.
        let _ = Command::new("umount").args(["-l"]).arg(&self.bpffs).stderr(Stdio::null()).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
