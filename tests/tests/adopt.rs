//! Issue 4, adoption of pinned maps, on the loaded program via
//! BPF_PROG_TEST_RUN: an agent that adopts with its predecessor's state file
//! keeps every id and generation (flows hit the connection table as
//! before); one that lost the state file rebuilds from the config with new
//! generations, removes what nobody owns any more, and Maglev puts the
//! re-scheduled flows back on the same backends. Needs root (mounts a bpffs).

use lb_common::{Algo, Stat, VIP_FILTER_SIZE};
use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};
use xlb::{
    agent::{backend_entry_in_use, Agent, AgentOptions},
    config::{CheckKind, Desired, HealthConfig, Mac, Vip},
    maps::{Datapath, LoadOptions},
};
use xlb_tests::{
    frames::{eth, ipv4, tcp, tcp_flags::*, ETH_IP, LB_MAC},
    lab::{sh, TempDir},
    xdp::{self, XDP_PASS, XDP_TX},
};

/// A bpffs of the test's own, unmounted on drop.
struct Bpffs(TempDir);

impl Bpffs {
    fn new() -> Bpffs {
        let d = TempDir::new("adopt").expect("scratch dir");
        sh("mount", &["-t", "bpf", "bpf", &d.0.to_string_lossy()]).expect("mount bpffs");
        Bpffs(d)
    }
    fn maps(&self) -> PathBuf {
        self.0.join("maps")
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = sh("umount", &["-l", &self.0 .0.to_string_lossy()]);
    }
}

fn load(fs: &Bpffs) -> Datapath {
    std::fs::create_dir_all(fs.maps()).expect("pin dir");
    Datapath::load_pinned(LoadOptions { max_vips: 8, conntrack_size: 65536, ..Default::default() }, Some(&fs.maps())).expect("load pinned")
}

fn load_unpinned() -> Datapath {
    Datapath::load(LoadOptions { max_vips: 8, conntrack_size: 65536, ..Default::default() }).expect("load")
}

fn opts() -> AgentOptions {
    AgentOptions { iface_mac: Mac(LB_MAC), accept_macs: Vec::new(), health: HealthConfig { kind: CheckKind::None, ..Default::default() } }
}

fn ip(i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 7, i))
}

fn frame(vip_last: u8, sport: u16, flags: u8) -> Vec<u8> {
    eth(ETH_IP, &[], &ipv4(Ipv4Addr::new(192, 0, 2, 7), Ipv4Addr::new(10, 0, 0, vip_last), 6, &[], 0, &tcp(sport, 80, flags, b"x")))
}

/// (backend MAC's last byte, counter deltas) of a frame that must be forwarded.
fn to(a: &mut Agent, f: &[u8]) -> (u8, Vec<i64>) {
    let (act, out, d) = xdp::run(&mut a.dp, f);
    assert_eq!(act, XDP_TX);
    (out[5], d)
}

/// (ip, id, generation) of every backend of `v`.
fn ids(a: &Agent, v: &Vip) -> Vec<(IpAddr, u32, u16)> {
    a.vips()[v].backends.values().map(|b| (b.ip, b.id, b.gen)).collect()
}

const CONFIG: &str = r#"
[health]
kind = "none"
[[vip]]
address = "10.0.0.70:80/tcp"
[[vip.backend]]
ip = "10.0.7.1"
mac = "02:00:00:00:07:01"
[[vip.backend]]
ip = "10.0.7.2"
mac = "02:00:00:00:07:02"
[[vip.backend]]
ip = "10.0.7.3"
mac = "02:00:00:00:07:03"
"#;

#[test]
fn adoption_keeps_ids_and_flows_and_a_lost_state_file_rebuilds_cleanly() {
    let fs = Bpffs::new();
    let v: Vip = "10.0.0.70:80/tcp".parse().expect("vip");
    let v2: Vip = "10.0.0.71:80/tcp".parse().expect("vip");
    let mut a = Agent::new(load(&fs), opts()).expect("agent");
    a.apply_desired(&Desired::parse(CONFIG, "test").expect("config")).expect("apply");
    a.add_vip(v2, Algo::Maglev, 0).expect("vip 2");
    a.add_backend(&v2, ip(9), Some(Mac([2, 0, 0, 0, 7, 9])), 1).expect("backend");
    // A backend that comes and goes: its id keeps a generation in the map.
    a.add_backend(&v, ip(4), Some(Mac([2, 0, 0, 0, 7, 4])), 1).expect("b4");
    a.del_backend(&v, ip(4)).expect("del b4");
    let flows: Vec<(u16, u8)> = (3000..3100).map(|p| (p, to(&mut a, &frame(70, p, SYN)).0)).collect();
    assert_eq!(to(&mut a, &frame(71, 5000, SYN)).0, 9);
    let snap = a.snapshot("test", None).expect("snapshot");
    let (old_ids, old_table) = (ids(&a, &v), a.vips()[&v].table.clone());
    let seed = a.dp.conntrack_seed();
    drop(a); // the maps stay pinned

    // A new agent with the state file: same ids, same generations, the same
    // table; every flow is a connection-table hit on its backend.
    let dp = load(&fs);
    assert_eq!(dp.conntrack_seed(), seed, "the pinned connection table keeps its hash seed");
    assert_ne!(load_unpinned().conntrack_seed(), seed, "a new table gets a new seed");
    let scan = dp.scan().expect("scan");
    let (mut b, r) = Agent::adopt(dp, opts(), Some(&snap), &scan).expect("adopt");
    b.collect_garbage(&scan).expect("gc");
    assert_eq!((r.vips_kept, r.backends_kept, r.vips_new, r.backends_new), (2, 4, 0, 0), "{r:?}");
    assert_eq!(ids(&b, &v), old_ids);
    assert_eq!(b.vips()[&v].table, old_table);
    for (p, be) in &flows {
        let (got, d) = to(&mut b, &frame(70, *p, ACK));
        assert_eq!(got, *be, "flow {p} stays on its backend");
        assert_eq!((d[Stat::CtHit as usize], d[Stat::CtStale as usize]), (1, 0), "flow {p}: a table hit");
    }
    // The next new backend on a reused id gets a newer generation than
    // the id's previous owner had.
    b.add_backend(&v, ip(5), Some(Mac([2, 0, 0, 0, 7, 5])), 1).expect("b5");
    let b5 = &b.vips()[&v].backends[&ip(5)];
    assert!(b5.gen > scan.backends[b5.id as usize].gen, "generation {} after {}", b5.gen, scan.backends[b5.id as usize].gen);
    assert!(scan.backends[b5.id as usize].gen >= 1, "b5 reuses an id that had an owner (b4's)");
    b.del_backend(&v, ip(5)).expect("del b5");
    drop(b);

    // The state file is lost; the config names only the first VIP. Old ids
    // stay reserved until the config is applied, then everything nobody owns
    // is removed. New generations make the old entries stale, and Maglev
    // (same addresses, same weights) re-schedules each flow to where it was.
    let dp = load(&fs);
    let scan = dp.scan().expect("scan");
    let (mut c, r) = Agent::adopt(dp, opts(), None, &scan).expect("adopt without state");
    assert_eq!(r.vips_kept + r.backends_kept, 0);
    c.apply_desired(&Desired::parse(CONFIG, "test").expect("config")).expect("apply");
    c.collect_garbage(&scan).expect("gc");
    for (ip, id, gen) in ids(&c, &v) {
        assert!(!old_ids.iter().any(|(_, i, g)| (*i, *g) == (id, gen)), "{ip} got a fresh (id, generation)");
    }
    for (p, be) in &flows {
        let (got, d) = to(&mut c, &frame(70, *p, ACK));
        assert_eq!(got, *be, "flow {p} lands on the same backend");
        assert_eq!(d[Stat::CtStale as usize], 1, "flow {p}: the old entry is stale");
    }
    let (act, _, d) = xdp::run(&mut c.dp, &frame(71, 5000, SYN));
    assert_eq!(act, XDP_PASS, "the unconfigured VIP is gone");
    assert_eq!(d[Stat::PassNotVip as usize], 1);
    let after = c.dp.scan().expect("scan");
    let in_use = after.backends.iter().filter(|e| backend_entry_in_use(e)).count();
    assert_eq!(in_use, 3, "only the three configured backends remain in the map");
    assert!(after.vips.iter().all(|(k, _)| k.addr[..4] == [10, 0, 0, 70]), "no entry of the removed VIP remains");
    assert!(after.filter.len() == 1 && after.filter[0] < VIP_FILTER_SIZE, "one pre-filter entry: {:?}", after.filter);
}
