//! High availability: what xlb gives the daemons that elect a master
//! (keepalived, VRRP) or announce routes (BIRD, FRR: ECMP). xlb runs no
//! election or routing protocol of its own; it provides
//! - readiness (`xlb ha check`, for keepalived's `track_script` and routing
//!   hooks): the node's tables converged and every VIP has a usable backend;
//! - announcements (`--announce-table N`): one host route per ready VIP
//!   address in kernel routing table N, which a routing daemon exports;
//! - drain (`xlb ha drain` / `undrain`): withdraw the node, keep forwarding;
//! - table fingerprints, equal on nodes that would choose alike.

use anyhow::{Context, Result};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

pub use crate::agent::fingerprint;
use crate::agent::{Agent, Maps, VipState};

/// Route protocol of xlb's announcements (`ip route show table N` prints
/// `proto 245`): how the agent tells its routes from anyone else's.
pub const RTPROT_XLB: u8 = 245;
/// How often readiness is recorded and announcements reconciled.
pub const TICK: Duration = Duration::from_millis(100);
/// Algorithms that make every node choose the same backend for a flow.
pub const CONSISTENT_ALGOS: [lb_common::Algo; 2] = [lb_common::Algo::Maglev, lb_common::Algo::SourceHash];

/// Why a VIP cannot be announced (`None`: it can): its tables have not
/// converged (a backend has had no health verdict yet) or no backend can
/// take new flows.
pub fn vip_not_ready(s: &VipState) -> Option<String> {
    if let Some(b) = s.backends.values().find(|b| !b.health.checked) {
        return Some(format!("backend {} has had no health verdict yet", b.ip));
    }
    if !s.backends.values().any(|b| b.usable()) {
        return Some("no usable backend".to_string());
    }
    None
}

/// The node's verdict, as `xlb ha check` reads it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Announce this node / keep it master.
    pub ready: bool,
    /// Why not, in one line.
    pub why: Option<String>,
    /// Withdrawn by `xlb ha drain`.
    pub drained: bool,
    /// When this was decided (ms since the epoch).
    pub at_ms: u64,
    /// VIP addresses ready to be announced.
    pub announce: Vec<IpAddr>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl<M: Maps> Agent<M> {
    /// The node's readiness now. An address is announced only when every
    /// VIP on it is ready (a route attracts traffic for all its ports).
    pub fn ha_verdict(&self, drained: bool) -> Verdict {
        let mut first_why = None;
        let mut bad: BTreeSet<IpAddr> = BTreeSet::new();
        let mut all: BTreeSet<IpAddr> = BTreeSet::new();
        for (vip, s) in self.vips() {
            all.insert(vip.addr);
            if let Some(why) = vip_not_ready(s) {
                bad.insert(vip.addr);
                first_why.get_or_insert_with(|| format!("VIP {vip}: {why}"));
            }
        }
        let why = if drained {
            Some("drained (xlb ha undrain)".to_string())
        } else if all.is_empty() {
            Some("no VIPs configured".to_string())
        } else {
            first_why
        };
        let announce = if drained { Vec::new() } else { all.difference(&bad).copied().collect() };
        Verdict { ready: why.is_none(), why, drained, at_ms: now_ms(), announce }
    }

    /// VIPs whose algorithm can make nodes of a cluster choose differently.
    pub fn inconsistent_vips(&self) -> Vec<String> {
        self.vips().iter().filter(|(_, s)| !CONSISTENT_ALGOS.contains(&s.algo)).map(|(v, s)| format!("{v} ({})", s.algo.name())).collect()
    }
}

/// The warning given when a VIP uses an algorithm other nodes cannot follow.
pub fn inconsistency_warning(vips: &[String]) -> Option<String> {
    (!vips.is_empty()).then(|| {
        format!(
            "with HA, only maglev and source-hash make every node choose the same backend; {} may send a flow elsewhere after a failover",
            vips.join(", ")
        )
    })
}

/// This node's HA switches, shared by the API and the daemon: the drain
/// flag (kept in a marker file, so a restarted agent stays drained) and the
/// last verdict (in a file, so `ha check` can answer while no agent runs).
#[derive(Debug)]
pub struct Node {
    drained: AtomicBool,
    marker: PathBuf,
    verdict_file: PathBuf,
    /// HA options are set (`--announce-table`, `--sync-peer`): warn about algorithms.
    pub active: bool,
}

/// Where the agent answering on `socket` keeps its verdict.
pub fn verdict_file(socket: &Path) -> PathBuf {
    socket.with_extension("ha.json")
}

impl Node {
    /// The node of the agent on `socket`.
    pub fn new(socket: &Path, active: bool) -> Node {
        let marker = socket.with_extension("drained");
        Node { drained: AtomicBool::new(marker.exists()), marker, verdict_file: verdict_file(socket), active }
    }

    /// Drained now.
    pub fn drained(&self) -> bool {
        self.drained.load(Ordering::SeqCst)
    }

    /// Drain (`true`) or undrain.
    pub fn set_drained(&self, on: bool) -> Result<()> {
        if on {
            std::fs::write(&self.marker, b"").with_context(|| format!("cannot write {}", self.marker.display()))?;
        } else if self.marker.exists() {
            std::fs::remove_file(&self.marker).with_context(|| format!("cannot remove {}", self.marker.display()))?;
        }
        self.drained.store(on, Ordering::SeqCst);
        Ok(())
    }

    /// Record `v` for `ha check` (atomically).
    pub fn record(&self, v: &Verdict) -> Result<()> {
        let tmp = self.verdict_file.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(v)?).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.verdict_file).with_context(|| format!("cannot replace {}", self.verdict_file.display()))
    }

    /// Forget the node (`xlb detach`): no verdict, no drain marker.
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.verdict_file);
        let _ = std::fs::remove_file(&self.marker);
    }
}

/// `xlb ha check` when no agent answers: the last recorded verdict counts
/// while it is younger than `grace` (pinned forwarding outlives the agent,
/// so restarting the agents of both nodes at once must not fail both over).
/// Returns (ready, one line).
pub fn offline_check(socket: &Path, grace: Duration) -> (bool, String) {
    let file = verdict_file(socket);
    let v: Option<Verdict> = std::fs::read(&file).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let Some(v) = v else {
        return (false, format!("not ready: no agent answers on {} and none recorded a verdict", socket.display()));
    };
    let age = Duration::from_millis(now_ms().saturating_sub(v.at_ms));
    if age > grace {
        return (false, format!("not ready: no agent has answered for {:.1} s (grace {:.1} s)", age.as_secs_f64(), grace.as_secs_f64()));
    }
    match (v.ready, v.why) {
        (true, _) => (true, format!("ready (no agent answers; last verdict {:.1} s ago, within the grace)", age.as_secs_f64())),
        (false, why) => (false, format!("not ready: {} (last verdict, {:.1} s ago)", why.unwrap_or_default(), age.as_secs_f64())),
    }
}

/// Parse `10s`, `500ms`, `1m` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| anyhow::anyhow!("invalid duration '{s}': expected e.g. 10s, 500ms, 1m"))?;
    if !(v.is_finite() && v >= 0.0 && v * scale <= 86_400.0) {
        anyhow::bail!("invalid duration '{s}': between 0 and a day");
    }
    Ok(Duration::from_secs_f64(v * scale))
}

/// Host routes for ready VIPs in a kernel routing table (`--announce-table`).
pub struct Announcer {
    handle: rtnetlink::Handle,
    table: u32,
    ifindex: u32,
}

impl Announcer {
    /// Announce through table `table`, routes out of `ifindex`.
    pub fn new(handle: rtnetlink::Handle, table: u32, ifindex: u32) -> Announcer {
        Announcer { handle, table, ifindex }
    }

    /// xlb's routes in the table: (destination, the kernel's message).
    async fn ours(&self) -> Result<Vec<(IpAddr, netlink_packet_route::route::RouteMessage)>> {
        use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteProtocol};
        let mut out = Vec::new();
        for family in [false, true] {
            let msg = if family {
                rtnetlink::RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
            } else {
                rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
            };
            let mut routes = self.handle.route().get(msg).execute();
            while let Some(r) = routes.try_next().await.context("cannot list routes")? {
                let table = r.attributes.iter().find_map(|a| if let RouteAttribute::Table(t) = a { Some(*t) } else { None });
                if table.unwrap_or(r.header.table as u32) != self.table || r.header.protocol != RouteProtocol::Other(RTPROT_XLB) {
                    continue;
                }
                let dst = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
                    RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
                    _ => None,
                });
                if let Some(d) = dst {
                    out.push((d, r));
                }
            }
        }
        Ok(out)
    }

    /// Make the table hold exactly `want`; returns (added, removed).
    pub async fn reconcile(&self, want: &BTreeSet<IpAddr>) -> Result<(usize, usize)> {
        use netlink_packet_route::route::RouteProtocol;
        let have = self.ours().await?;
        let have_set: BTreeSet<IpAddr> = have.iter().map(|(d, _)| *d).collect();
        let mut removed = 0;
        for (dst, msg) in have {
            if !want.contains(&dst) {
                self.handle.route().del(msg).execute().await.with_context(|| format!("cannot withdraw {dst}"))?;
                log::info!("announcement of {dst} withdrawn (table {})", self.table);
                removed += 1;
            }
        }
        let mut added = 0;
        for dst in want.difference(&have_set) {
            let len = if dst.is_ipv4() { 32 } else { 128 };
            let msg = rtnetlink::RouteMessageBuilder::<IpAddr>::new()
                .destination_prefix(*dst, len)
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .output_interface(self.ifindex)
                .table_id(self.table)
                .protocol(RouteProtocol::Other(RTPROT_XLB))
                .build();
            self.handle.route().add(msg).replace().execute().await.with_context(|| format!("cannot announce {dst}"))?;
            log::info!("{dst} announced (table {})", self.table);
            added += 1;
        }
        Ok((added, removed))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").expect("10s"), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").expect("ms"), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").expect("m"), Duration::from_secs(120));
        assert_eq!(parse_duration("3").expect("plain"), Duration::from_secs(3));
        for bad in ["", "x", "-1s", "1e9s", "nan"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn offline_verdicts_count_only_within_the_grace() {
        let dir = std::env::temp_dir().join(format!("xlb-ha-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let sock = dir.join("xlb.sock");
        let node = Node::new(&sock, true);
        assert!(!offline_check(&sock, Duration::from_secs(10)).0, "nothing recorded");
        let mut v = Verdict { ready: true, why: None, drained: false, at_ms: now_ms(), announce: vec![] };
        node.record(&v).expect("record");
        let (ok, line) = offline_check(&sock, Duration::from_secs(10));
        assert!(ok, "{line}");
        v.at_ms -= 20_000;
        node.record(&v).expect("record");
        let (ok, line) = offline_check(&sock, Duration::from_secs(10));
        assert!(!ok && line.contains("grace"), "{line}");
        v.at_ms = now_ms();
        v.ready = false;
        v.why = Some("drained".into());
        node.record(&v).expect("record");
        assert!(offline_check(&sock, Duration::from_secs(10)).1.contains("drained"));
        node.set_drained(true).expect("drain");
        assert!(Node::new(&sock, true).drained(), "a new agent stays drained");
        node.set_drained(false).expect("undrain");
        assert!(!Node::new(&sock, true).drained());
        node.remove();
        let _ = std::fs::remove_dir_all(&dir);
    }

    pub(crate) mod readiness {
        use super::super::*;
        use crate::{
            agent::{AgentOptions, CheckOutcome, MemMaps},
            config::{HealthConfig, Mac, Vip},
            maps::LoadOptions,
        };
        use lb_common::Algo;
        use std::time::Instant;

        pub(crate) const BACKENDS: [&str; 3] = ["10.0.0.11", "10.0.0.12", "10.0.0.13"];
        pub(crate) const VIPS: [&str; 3] = ["10.0.0.100:80/tcp", "10.0.0.100:443/tcp", "10.0.0.101:80/tcp"];

        pub(crate) fn vip(s: &str) -> Vip {
            s.parse().expect("vip")
        }

        /// The three VIPs over three shared TCP-checked backends, added in
        /// `order` (ids then differ between agents built in other orders).
        pub(crate) fn node(order: &[usize]) -> Agent<MemMaps> {
            let load = LoadOptions { max_vips: 8, max_tables: 8, ring_size: 251, ..Default::default() };
            let opts = AgentOptions { iface_mac: "02:00:00:00:00:01".parse().expect("mac"), accept_macs: Vec::new(), health: HealthConfig::default() };
            let mut a = Agent::new(MemMaps::new(load), opts).expect("agent");
            for (i, b) in BACKENDS.iter().enumerate() {
                a.neighbour_changed(b.parse().expect("ip"), Some(Mac([2, 0, 0, 0, 0, 0x11 + i as u8]))).expect("neigh");
            }
            for v in VIPS {
                a.add_vip(vip(v), Algo::Maglev, 0).expect("vip");
                let list: Vec<(IpAddr, Option<Mac>, u32)> = order.iter().map(|&i| (BACKENDS[i].parse().expect("ip"), None, 1)).collect();
                a.add_backends(&vip(v), &list).expect("backends");
            }
            a
        }

        /// Check rounds (each one interval later) with `ok(vip port, ip)`.
        pub(crate) fn rounds(a: &mut Agent<MemMaps>, n: usize, t0: Instant, ok: impl Fn(&str) -> bool) -> Instant {
            let mut now = t0;
            for _ in 0..n {
                now += std::time::Duration::from_secs(5);
                for j in a.due_checks(now) {
                    let pass = ok(&j.target.ip.to_string());
                    let out = CheckOutcome { ok: pass, error: (!pass).then(|| "refused".to_string()), ..Default::default() };
                    a.report(&j, out).expect("report");
                }
                a.publish_dirty().expect("publish");
            }
            now
        }

        #[test]
        fn ready_only_when_converged_and_served_and_undrained() {
            let mut a = node(&[0, 1, 2]);
            let v = a.ha_verdict(false);
            assert!(!v.ready && v.why.as_deref().unwrap_or("").contains("no health verdict"), "{v:?}");
            assert!(v.announce.is_empty(), "nothing announced before the tables converged");
            let t = rounds(&mut a, 4, Instant::now(), |_| true);
            let v = a.ha_verdict(false);
            assert!(v.ready, "{v:?}");
            assert_eq!(v.announce, vec!["10.0.0.100".parse::<IpAddr>().expect("ip"), "10.0.0.101".parse().expect("ip")]);
            // Drained: not ready, nothing announced, forwarding untouched.
            let d = a.ha_verdict(true);
            assert!(!d.ready && d.drained && d.announce.is_empty() && d.why.as_deref().unwrap_or("").contains("drained"));
            // Every backend down: no VIP has a usable backend.
            rounds(&mut a, 6, t, |_| false);
            let v = a.ha_verdict(false);
            assert!(!v.ready && v.why.as_deref().unwrap_or("").contains("no usable backend"), "{v:?}");
            assert!(v.announce.is_empty());
        }

        #[test]
        fn an_address_is_announced_only_when_all_its_vips_are_ready() {
            let mut a = node(&[0, 1, 2]);
            let t = rounds(&mut a, 4, Instant::now(), |_| true);
            // 10.0.0.100:443 loses every backend (maintenance): the address
            // carries 80 and 443, so it is withdrawn; 10.0.0.101 stays.
            for b in BACKENDS {
                a.set_backend(&vip(VIPS[1]), b.parse().expect("ip"), None, Some(crate::config::Admin::Maint), false).expect("maint");
            }
            rounds(&mut a, 1, t, |_| true);
            let v = a.ha_verdict(false);
            assert!(!v.ready && v.why.as_deref().unwrap_or("").contains("10.0.0.100:443/tcp"), "{v:?}");
            assert_eq!(v.announce, vec!["10.0.0.101".parse::<IpAddr>().expect("ip")]);
        }

        #[test]
        fn fingerprints_agree_across_nodes_and_follow_the_table() {
            let mut a = node(&[0, 1, 2]);
            let mut b = node(&[2, 0, 1]);
            rounds(&mut a, 4, Instant::now(), |_| true);
            rounds(&mut b, 4, Instant::now(), |_| true);
            for v in VIPS {
                let (sa, sb) = (&a.vips()[&vip(v)], &b.vips()[&vip(v)]);
                assert_ne!(sa.backends.values().map(|x| x.id).collect::<Vec<_>>(), sb.backends.values().map(|x| x.id).collect::<Vec<_>>(), "ids differ between the nodes");
                assert_eq!(fingerprint(sa), fingerprint(sb), "{v}: same config and health, same table");
            }
            let before = fingerprint(&a.vips()[&vip(VIPS[0])]);
            a.set_backend(&vip(VIPS[0]), BACKENDS[0].parse().expect("ip"), Some(3), None, false).expect("weight");
            assert_ne!(fingerprint(&a.vips()[&vip(VIPS[0])]), before, "a weight change changes the table");
            assert_eq!(fingerprint(&a.vips()[&vip(VIPS[2])]), fingerprint(&b.vips()[&vip(VIPS[2])]), "other VIPs unchanged");
        }

        #[test]
        fn algorithms_other_nodes_cannot_follow_are_named() {
            let mut a = node(&[0, 1, 2]);
            assert!(inconsistency_warning(&a.inconsistent_vips()).is_none());
            a.add_vip(vip("10.0.0.102:80/tcp"), Algo::LeastConn, 0).expect("vip");
            let w = inconsistency_warning(&a.inconsistent_vips()).expect("warned");
            assert!(w.contains("10.0.0.102:80/tcp (least-conn)") && !w.contains('\n'), "{w}");
        }
    }
}
