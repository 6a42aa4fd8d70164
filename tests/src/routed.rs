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
use std::os::fd::AsRawFd;

use crate::lab::sh;

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
