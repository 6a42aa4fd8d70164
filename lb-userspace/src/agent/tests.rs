//! The agent's unit tests: planning, coalescing, limits and saves over
//! `MemMaps` (no BPF).

use super::*;
use crate::{
    config::{CheckKind, Desired, DesiredBackend, DesiredVip, Mac},
    maps::LoadOptions,
};

fn agent(max_vips: u32) -> Agent<MemMaps> {
    let load = LoadOptions { max_vips, max_tables: max_vips, ring_size: 251, ..Default::default() };
    let opts = AgentOptions {
        iface_mac: "02:00:00:00:00:01".parse().expect("mac"),
        accept_macs: Vec::new(),
        health: HealthConfig { kind: CheckKind::None, ..Default::default() },
    };
    Agent::new(MemMaps::new(load), opts).expect("agent")
}

fn vip(s: &str) -> Vip {
    s.parse().expect("vip")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn mac(n: u8) -> Option<Mac> {
    Some(Mac([2, 0, 0, 0, 0, n]))
}

/// `n` VIPs on one address, 3 shared backends with known MACs, unchecked.
fn desired(n: u16, weight: u32) -> Desired {
    let vips = (0..n)
        .map(|p| DesiredVip {
            vip: vip(&format!("10.0.0.100:{}/tcp", 1000 + p)),
            algo: Algo::Maglev,
            persist: 0,
            health: None,
            all_down: AllDown::Drop,
            slow_start_ms: 0,
            opts: Default::default(),
            forward: Default::default(),
            backends: (1..=3u8)
                .map(|i| DesiredBackend {
                    ip: ip(&format!("10.0.0.{}", 10 + i)),
                    mac: mac(i),
                    weight: if i == 1 { weight } else { 1 },
                    health: None,
                    state: Admin::Ready,
                    forward: None,
                    server_id: None,
                })
                .collect(),
        })
        .collect();
    Desired { health: HealthConfig { kind: CheckKind::None, ..Default::default() }, vips, sync: None }
}

fn with_state_file(a: &mut Agent<MemMaps>, name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("xlb-agent-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("state.json");
    let identity = crate::pin::identity::Identity { netns_cookie: 1, ifindex: 1 };
    a.persist = Some(Persist { path: path.clone(), layout: "test".into(), identity, mode: "native".into(), order: Default::default() });
    dir
}

#[test]
fn a_reload_publishes_each_vip_once_and_saves_once() {
    let mut a = agent(64);
    let dir = with_state_file(&mut a, "reload");
    a.apply_desired(&desired(64, 1)).expect("apply");
    assert_eq!(a.dp.table_writes, 64, "one table per VIP");
    assert_eq!(a.publications, 64);
    assert_eq!(a.saves, 1, "one state-file save for the whole reload");
    assert!(a.vips().iter().all(|(v, s)| a.dp.table(&v.key()) == s.table && s.table.len() == 251));
    // The same file again changes nothing.
    assert!(a.apply_desired(&desired(64, 1)).expect("apply").is_empty());
    assert_eq!(a.dp.table_writes, 64);
    // One weight in every VIP: each table once more.
    let changes = a.apply_desired(&desired(64, 3)).expect("apply");
    assert_eq!(changes.len(), 64);
    assert_eq!(a.dp.table_writes, 128);
    assert_eq!(a.saves, 2);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_state_files_config_is_the_dump_and_follows_every_change() {
    let mut a = agent(64);
    a.apply_desired(&desired(8, 1)).expect("apply");
    let same = |a: &Agent<MemMaps>| {
        let parsed = Desired::parse(&a.dump_toml().expect("toml"), "test").expect("parses");
        let dumped = Desired::parse(&toml::to_string(&a.dump()).expect("toml"), "test").expect("parses");
        assert_eq!(parsed, dumped);
    };
    same(&a);
    a.set_backend(&vip("10.0.0.100:1003/tcp"), ip("10.0.0.11"), Some(7), Some(Admin::Drain), false).expect("set");
    same(&a);
    a.del_vip(&vip("10.0.0.100:1000/tcp")).expect("del");
    a.add_vip_with(vip("10.0.0.100:1000/tcp"), Algo::SourceHash, 30, None, AllDown::FailOpen).expect("re-add");
    same(&a);
    assert!(a.dump_toml().expect("toml").contains("persist_timeout = 30"));
    a.apply_desired(&desired(4, 2)).expect("apply");
    same(&a);
}

#[test]
fn deferred_saves_are_one_per_tick_and_never_go_back_in_time() {
    let mut a = agent(8);
    let dir = with_state_file(&mut a, "deferred");
    a.defer_saves = true;
    a.apply_desired(&desired(2, 1)).expect("apply");
    a.set_weight(&vip("10.0.0.100:1000/tcp"), ip("10.0.0.11"), 4).expect("weight");
    assert_eq!(a.saves, 0, "requests leave the save to their caller");
    let first = a.take_save().expect("the file is behind");
    assert!(a.take_save().is_none(), "one save for both changes");
    a.set_weight(&vip("10.0.0.100:1000/tcp"), ip("10.0.0.11"), 5).expect("weight");
    let second = a.take_save().expect("behind again");
    // Written out of order (two requests' writes racing): the later
    // snapshot stays.
    second.write();
    first.write();
    let snap = crate::state::Snapshot::load(&dir.join("state.json")).expect("load").expect("a file");
    assert_eq!(snap.config, a.dump_toml().expect("dump"));
    assert!(snap.config.contains("weight = 5"), "{}", snap.config);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_request_changes_the_tables_once() {
    let mut a = agent(8);
    let dir = with_state_file(&mut a, "request");
    let v = vip("10.0.0.100:80/tcp");
    let spec = VipSpec { slow_start_ms: 1000, ..Default::default() };
    a.add_vip_spec(v, &spec).expect("vip");
    assert_eq!((a.dp.vip_writes, a.dp.table_writes, a.saves), (2, 0, 1), "VIP entry and its fragment alias, no table yet");
    a.add_backends(&v, &[(ip("10.0.0.11"), mac(1), 1), (ip("10.0.0.12"), mac(2), 1)]).expect("backends");
    assert_eq!((a.dp.table_writes, a.saves), (1, 2));
    let (w, s) = (a.dp.table_writes, a.saves);
    let (moved, size) = a.set_backend(&v, ip("10.0.0.11"), Some(5), Some(Admin::Ready), true).expect("dry run").expect("counts");
    assert!(moved > 0 && size == 251);
    assert_eq!((a.dp.table_writes, a.saves), (w, s), "a dry run writes nothing");
    assert_eq!(a.set_backend(&v, ip("10.0.0.11"), Some(5), None, false).expect("set"), Some((moved, size)), "the dry run said what happens");
    assert_eq!((a.dp.table_writes, a.saves), (w + 1, s + 1), "one plan, one write, one save");
    a.add_backend_checked(&v, ip("10.0.0.13"), mac(3), 1, Some(HealthConfig { kind: CheckKind::None, ..Default::default() })).expect("add");
    assert_eq!((a.dp.table_writes, a.saves), (w + 2, s + 2));
    a.del_backend(&v, ip("10.0.0.13")).expect("del");
    assert_eq!((a.dp.table_writes, a.saves), (w + 3, s + 3));
    // Bad input changes nothing.
    assert!(a.set_backend(&v, ip("10.0.0.11"), Some(1_000_000), None, false).is_err());
    assert!(a.del_backend(&v, ip("10.0.0.99")).is_err());
    assert!(a.add_backends(&v, &[(ip("10.0.0.14"), None, 1), (ip("10.0.0.14"), None, 1)]).is_err());
    assert_eq!((a.dp.table_writes, a.saves), (w + 3, s + 3));
    assert_eq!(a.vips()[&v].backends.len(), 2);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn requests_that_do_not_wait_share_one_table_per_tick() {
    let mut a = agent(8);
    let (v, w) = (vip("10.0.0.100:80/tcp"), vip("10.0.0.100:81/tcp"));
    a.add_vip(v, Algo::Maglev, 0).expect("vip");
    a.add_vip(w, Algo::Maglev, 0).expect("vip");
    a.add_backend_checked(&v, ip("10.0.0.10"), mac(10), 1, None).expect("add");
    let (writes, before) = (a.dp.table_writes, a.dp.table(&v.key()));
    a.set_no_wait(true);
    for i in 1..=20u8 {
        let r = a.add_backend_full(&v, (ip(&format!("10.0.0.{}", 10 + i)), mac(10 + i), 1), None, None, None).expect("add");
        assert_eq!(r, None, "not published yet: no counts");
    }
    assert_eq!(a.set_backend(&w, ip("10.0.0.99"), Some(2), None, false).map(drop).unwrap_err().to_string(), "backend 10.0.0.99 is not in VIP 10.0.0.100:81/tcp", "refused at once all the same");
    a.add_backend_full(&w, (ip("10.0.0.11"), mac(11), 1), None, None, None).expect("add");
    assert!(a.set_backend(&v, ip("10.0.0.11"), Some(3), None, false).expect("set").is_none());
    a.set_no_wait(false);
    assert_eq!(a.dp.table_writes, writes, "no table written before the tick");
    assert_eq!(a.dp.table(&v.key()), before, "the datapath keeps the last published table");
    assert!(a.is_pending(&v) && a.is_pending(&w));
    assert!(a.status().expect("status").vips.iter().all(|s| s.pending));
    a.tick(Instant::now()).expect("tick");
    assert_eq!(a.dp.table_writes, writes + 2, "one table per VIP for 22 requests");
    assert!(!a.is_pending(&v) && !a.is_pending(&w));
    assert!(a.status().expect("status").vips.iter().all(|s| !s.pending));
    for x in [v, w] {
        assert_eq!(a.dp.table(&x.key()), a.vips()[&x].table, "{x}: the published table is the planned one");
    }
    assert_eq!(a.vips()[&v].backends.len(), 21);
    assert_eq!(a.vips()[&v].backends[&ip("10.0.0.11")].weight, 3);
    // A request that waits publishes what earlier ones left pending.
    a.set_no_wait(true);
    a.add_backend_full(&w, (ip("10.0.0.12"), mac(12), 1), None, None, None).expect("add");
    a.set_no_wait(false);
    let r = a.add_backend_full(&v, (ip("10.0.0.40"), mac(40), 1), None, None, None).expect("add");
    assert!(r.is_some_and(|(moved, _)| moved > 0));
    assert_eq!(a.dp.table_writes, writes + 4);
    assert!(!a.is_pending(&w) && a.dp.table(&w.key()) == a.vips()[&w].table);
}

#[test]
fn max_vips_means_services_whatever_the_aliases_need() {
    // Every VIP on its own address needs a fragment alias too: the VIP
    // map has room for both, so the limit is the one the flag names.
    let mut a = agent(4);
    for i in 0..4 {
        a.add_vip(vip(&format!("10.0.0.{}:80/tcp", 100 + i)), Algo::Maglev, 0).expect("within the limit");
    }
    assert_eq!(a.dp.vips.len(), 8, "4 VIPs + 4 aliases");
    let e = a.add_vip(vip("10.0.0.200:80/tcp"), Algo::Maglev, 0).expect_err("over the limit").to_string();
    assert_eq!(e, "cannot add VIP 10.0.0.200:80/tcp: the limit of 4 VIPs is reached (raise it with `xlb agent --max-vips`)");
    assert!(!e.contains('\n'));
    // A reload over the limit is refused whole, naming the flag.
    let e = a.apply_desired(&desired(5, 1)).expect_err("over").to_string();
    assert!(e.contains("limit is 4") && e.contains("--max-vips"), "{e}");
    assert_eq!(a.vips().len(), 4, "nothing changed");
    // Freed slots are reusable.
    a.del_vip(&vip("10.0.0.100:80/tcp")).expect("del");
    a.add_vip(vip("10.0.0.200:80/tcp"), Algo::Maglev, 0).expect("room again");
}

#[test]
fn vips_with_backends_are_bounded_by_the_tables() {
    let load = LoadOptions { max_vips: 8, max_tables: 2, ring_size: 251, ..Default::default() };
    let opts = AgentOptions { iface_mac: "02:00:00:00:00:01".parse().expect("mac"), accept_macs: Vec::new(), health: HealthConfig { kind: CheckKind::None, ..Default::default() } };
    let mut a = Agent::new(MemMaps::new(load), opts).expect("agent");
    assert!(a.dp.tables.is_empty(), "no table before a VIP has backends");
    for p in 0..3 {
        a.add_vip(vip(&format!("10.0.0.100:{}/tcp", 80 + p)), Algo::Maglev, 0).expect("VIPs without backends need no table");
    }
    a.add_backend(&vip("10.0.0.100:80/tcp"), ip("10.0.0.11"), mac(1), 1).expect("1st table");
    a.add_backend(&vip("10.0.0.100:80/tcp"), ip("10.0.0.12"), mac(2), 1).expect("same table");
    a.add_backend(&vip("10.0.0.100:81/tcp"), ip("10.0.0.11"), mac(1), 1).expect("2nd table");
    let e = a.add_backend(&vip("10.0.0.100:82/tcp"), ip("10.0.0.11"), mac(1), 1).expect_err("3rd").to_string();
    assert!(e.contains("limit of tables is 2") && e.contains("--max-tables") && !e.contains('\n'), "{e}");
    // Many table changes in a row never run out of slots.
    for w in 1..20 {
        a.set_weight(&vip("10.0.0.100:80/tcp"), ip("10.0.0.11"), w).expect("reweight");
    }
    assert_eq!((a.dp.tables.len(), a.dp.table_frees), (2, 18), "each replaced table freed (weight 1 was no change)");
    a.del_backend(&vip("10.0.0.100:81/tcp"), ip("10.0.0.11")).expect("frees the table");
    assert_eq!(a.dp.tables.len(), 1);
    a.add_backend(&vip("10.0.0.100:82/tcp"), ip("10.0.0.11"), mac(1), 1).expect("room again");
}

#[test]
fn backends_per_vip_limit_is_one_line_naming_it() {
    let mut a = agent(2);
    let v = vip("10.0.0.100:80/tcp");
    a.add_vip(v, Algo::LeastConn, 0).expect("vip");
    let many: Vec<(IpAddr, Option<Mac>, u32)> =
        (0..257u32).map(|i| (IpAddr::V4(std::net::Ipv4Addr::from(0x0a01_0000 + i + 1)), mac(1), 1)).collect();
    let e = a.add_backends(&v, &many).expect_err("too many").to_string();
    assert!(e.contains("least-conn allows at most 256") && !e.contains('\n'), "{e}");
    assert!(a.vips()[&v].backends.is_empty());
    a.add_backends(&v, &many[..256]).expect("256 fit");
}

#[test]
fn a_mixed_family_or_duplicate_backend_is_refused_before_anything_changes() {
    let mut a = agent(2);
    let v = vip("10.0.0.100:80/tcp");
    a.add_vip(v, Algo::Maglev, 0).expect("vip");
    assert!(a.add_backend(&v, ip("2001:db8::1"), mac(1), 1).is_err());
    assert!(a.add_backend(&v, ip("224.0.0.1"), mac(1), 1).is_err());
    assert_eq!(a.dp.table_writes, 0);
}

#[test]
fn vip_forms_write_their_derived_entries() {
    let mut a = agent(8);
    let any = vip("10.0.0.100:*/tcp");
    let exact = vip("10.0.0.100:443/tcp");
    a.add_vip(any, Algo::Maglev, 0).expect("any-port");
    a.add_vip_spec(exact, &VipSpec { opts: VipOpts { answer_ping: true, ..Default::default() }, ..Default::default() })
        .expect("exact");
    let idx = filter_index(&exact);
    assert_eq!(a.dp.filter.get(&idx), Some(&(2 | lb_common::VIP_FILTER_ANY_PORT)));
    assert!(a.dp.vips.contains_key(&any.key()) && any.key().is_any_port());
    // Fragments go to the any-port VIP (the address's lowest port).
    assert_eq!(a.dp.vips[&any.key().fragment_alias()].vip_id, a.vips()[&any].id);
    // The echo entry copies the answering VIP's.
    let echo = a.dp.vips[&exact.key().echo()];
    assert!(echo.answers_ping() && echo.vip_id == a.vips()[&exact].id);
    a.del_vip(&exact).expect("del");
    assert!(!a.dp.vips.contains_key(&exact.key().echo()), "no answering VIP left");
    assert_eq!(a.dp.filter.get(&idx), Some(&(1 | lb_common::VIP_FILTER_ANY_PORT)));
    a.del_vip(&any).expect("del");
    assert!(a.dp.vips.is_empty() && a.dp.filter.is_empty());
}

#[test]
fn prefix_vips_live_in_the_trie_and_open_its_gate() {
    let mut a = agent(8);
    let p = vip("10.1.0.0/16:*/tcp");
    let spec = VipSpec { opts: VipOpts { answer_ping: true, ..Default::default() }, ..Default::default() };
    a.add_vip_spec(p, &spec).expect("prefix");
    assert_eq!(a.dp.prefix_count, 1);
    assert!(a.dp.vips.is_empty() && a.dp.filter.is_empty(), "nothing in the exact map or the pre-filter");
    for k in [p.key(), p.key().fragment_alias(), p.key().echo()] {
        assert!(a.dp.prefixes.contains_key(&(k, 16)), "{k:?}");
    }
    a.add_vip(vip("10.1.2.0/24:443/tcp"), Algo::Maglev, 0).expect("inner prefix");
    assert_eq!(a.dp.prefix_count, 2);
    a.del_vip(&p).expect("del");
    assert_eq!(a.dp.prefix_count, 1);
    assert!(a.dp.prefixes.keys().all(|(_, len)| *len == 24), "the /16's entries are gone");
}

#[test]
fn vip_form_options_are_checked() {
    let mut a = agent(8);
    let dst_port = VipSpec { opts: VipOpts { hash: config::HashMode::DstPort, ..Default::default() }, ..Default::default() };
    let e = a.add_vip_spec(vip("10.0.0.1:80/tcp"), &VipSpec { algo: Algo::RoundRobin, ..dst_port.clone() }).expect_err("rr");
    assert!(e.to_string().contains("--hash dst-port needs the maglev algorithm"), "{e}");
    a.add_vip_spec(vip("10.0.0.1:80/tcp"), &dst_port).expect("maglev");
    assert_eq!(a.dp.vips[&vip("10.0.0.1:80/tcp").key()].flags, lb_common::VIP_F_HASH_DST_PORT);
    // An any-port VIP whose checks are on needs a port to check.
    let tcp = HealthConfig { kind: CheckKind::Tcp, ..Default::default() };
    let e = a.add_vip_spec(vip("10.0.0.2:*/tcp"), &VipSpec { health: Some(tcp.clone()), ..Default::default() }).expect_err("no port");
    assert!(e.to_string().contains("--check-port"), "{e}");
    assert!(!a.vips().contains_key(&vip("10.0.0.2:*/tcp")), "nothing changed");
    let with_port = HealthConfig { port: Some(8080), ..tcp };
    a.add_vip_spec(vip("10.0.0.2:*/tcp"), &VipSpec { health: Some(with_port), ..Default::default() }).expect("check port");
    // UDP VIPs are not TCP-checked: no port needed.
    let tcp = HealthConfig { kind: CheckKind::Tcp, ..Default::default() };
    a.add_vip_spec(vip("10.0.0.2:*/udp"), &VipSpec { health: Some(tcp), ..Default::default() }).expect("udp");
}

/// Every entry the datapath can read (VIP entries, fragment aliases, echo
/// entries) names a table that exists and has its size.
fn entries_name_live_tables(m: &MemMaps) {
    for (k, i) in m.vips.iter().chain(m.prefixes.iter().map(|((k, _), i)| (k, i))) {
        if i.ring_size > 0 {
            let t = m.tables.get(&i.table_slot).unwrap_or_else(|| panic!("{k:?} names slot {} with no table", i.table_slot));
            assert_eq!(t.len(), i.ring_size as usize, "{k:?}: table size");
        }
    }
}

#[test]
fn tables_are_allocated_per_vip_and_freed_when_replaced_or_removed() {
    let mut a = agent(512);
    assert!(a.dp.tables.is_empty() && a.dp.memory()["XLB_TABLES"] == 0, "nothing preallocated");
    a.apply_desired(&desired(512, 1)).expect("512 VIPs");
    let table_bytes = lb_common::TableLine::bytes(251);
    assert_eq!(a.dp.tables.len(), 512, "one table per VIP with backends");
    assert_eq!(a.dp.memory()["XLB_TABLES"], 512 * table_bytes);
    let slots: BTreeSet<u32> = a.vips().values().filter_map(|s| s.table_slot).collect();
    assert_eq!(slots.len(), 512, "each its own slot");
    entries_name_live_tables(&a.dp);
    // A change replaces one table: created in a free slot, the old freed.
    let v = vip("10.0.0.100:1000/tcp");
    let old = a.vips()[&v].table_slot.expect("slot");
    a.set_weight(&v, ip("10.0.0.12"), 3).expect("weight");
    let new = a.vips()[&v].table_slot.expect("slot");
    assert_ne!(old, new);
    assert!(!a.dp.tables.contains_key(&old) && a.dp.tables.len() == 512);
    // The lowest port's VIP (its entry is the fragment alias) is removed:
    // the alias moves to the next VIP before the table is freed.
    a.del_vip(&v).expect("del");
    assert_eq!(a.dp.tables.len(), 511);
    entries_name_live_tables(&a.dp);
    // A VIP that loses its last backend gives its table back.
    let w = vip("10.0.0.100:1001/tcp");
    for b in ["10.0.0.11", "10.0.0.12", "10.0.0.13"] {
        a.del_backend(&w, ip(b)).expect("del backend");
    }
    assert_eq!((a.dp.tables.len(), a.vips()[&w].table_slot), (510, None));
    entries_name_live_tables(&a.dp);
    assert_eq!(a.dp.memory()["XLB_TABLES"], 510 * table_bytes);
}

#[test]
fn a_failed_publication_leaves_no_table_behind() {
    // The VIP entry cannot be written: the new table is freed again.
    let mut a = agent(4);
    let v = vip("10.0.0.100:80/tcp");
    a.add_vip(v, Algo::Maglev, 0).expect("vip");
    a.dp.refuse_vip_writes = true;
    assert!(a.add_backend(&v, ip("10.0.0.1"), mac(1), 1).is_err());
    assert!(a.dp.tables.is_empty(), "{:?}", a.dp.tables.keys());
    a.dp.refuse_vip_writes = false;
    a.reconcile(&v).expect("publishes now");
    assert_eq!(a.dp.tables.len(), 1);
    entries_name_live_tables(&a.dp);
}

#[test]
fn quic_server_ids_follow_their_backends_through_every_path() {
    use crate::quic::ServerId;
    let mut a = agent(8);
    let q = vip("10.0.0.70:443/udp");
    a.add_vip_spec(q, &VipSpec { opts: VipOpts { quic: true, ..Default::default() }, ..Default::default() }).expect("quic");
    assert_eq!(a.dp.vips[&q.key()].flags, lb_common::VIP_F_QUIC);
    a.add_backend_full(&q, (ip("10.0.0.11"), mac(1), 1), None, None, Some(ServerId(7))).expect("b1");
    a.add_backend_full(&q, (ip("10.0.0.12"), mac(2), 1), None, None, Some(ServerId(8))).expect("b2");
    a.add_backend_full(&q, (ip("10.0.0.13"), mac(3), 1), None, None, None).expect("b3 without an ID");
    let id = |a: &Agent<MemMaps>, s: &str| a.vips()[&q].backends[&ip(s)].id;
    let vid = a.vips()[&q].id;
    let ids = |a: &Agent<MemMaps>| a.dp.quic_ids.clone();
    assert_eq!(ids(&a), [((vid, 7), id(&a, "10.0.0.11")), ((vid, 8), id(&a, "10.0.0.12"))].into_iter().collect());
    assert!(a.add_backend_full(&q, (ip("10.0.0.14"), mac(4), 1), None, None, Some(ServerId(7))).is_err(), "duplicate");
    assert_eq!(a.vips()[&q].backends.len(), 3, "nothing added");
    // A config that swaps two IDs and gives the third one applies at once.
    let mut d = a.dump();
    assert_eq!(d.vips[0].quic, Some(true));
    d.vips[0].backends[0].server_id = Some(ServerId(8));
    d.vips[0].backends[1].server_id = Some(ServerId(7));
    d.vips[0].backends[2].server_id = Some(ServerId(9));
    let text = toml::to_string(&d).expect("toml");
    let desired = config::Desired::parse(&text, "t").expect("valid");
    let changes = a.apply_desired(&desired).expect("swap");
    assert_eq!(changes.iter().filter(|c| c.contains("server ID")).count(), 3, "{changes:?}");
    assert_eq!(a.dp.quic_ids.get(&(vid, 8)), Some(&id(&a, "10.0.0.11")));
    assert_eq!(a.dp.quic_ids.get(&(vid, 7)), Some(&id(&a, "10.0.0.12")));
    assert_eq!(a.dp.quic_ids.get(&(vid, 9)), Some(&id(&a, "10.0.0.13")));
    assert!(a.dump_toml().expect("toml").contains("server_id = 9"), "the state file keeps them");
    // Config errors name the rule, in one line; nothing changes.
    for (bad, want) in [
        (text.replace("server_id = 8", "server_id = 7"), "both"),
        (text.replace("server_id = 8", "server_id = 0"), "invalid server ID 0"),
        (text.replace("quic = true", "quic = false"), "needs a --quic VIP"),
        (text.replace("443/udp", "443/tcp").replace("server_id", "weight"), "needs a UDP VIP"),
    ] {
        let e = config::Desired::parse(&bad, "t").expect_err(want).to_string();
        assert!(e.contains(want) && !e.contains('\n'), "{want}: {e}");
    }
    a.del_backend(&q, ip("10.0.0.11")).expect("del");
    assert_eq!(a.dp.quic_ids.len(), 2);
    // --quic off: the VIP's entries go; the IDs must go with it.
    let mut d = a.dump();
    d.vips[0].quic = None;
    for b in &mut d.vips[0].backends {
        b.server_id = None;
    }
    a.apply_desired(&config::Desired::parse(&toml::to_string(&d).expect("toml"), "t").expect("valid")).expect("off");
    assert!(a.dp.quic_ids.is_empty() && a.dp.vips[&q.key()].flags == 0);
    d.vips[0].quic = Some(true);
    d.vips[0].backends[0].server_id = Some(ServerId(1));
    a.apply_desired(&config::Desired::parse(&toml::to_string(&d).expect("toml"), "t").expect("valid")).expect("on");
    assert_eq!(a.dp.quic_ids.len(), 1);
    a.del_vip(&q).expect("del vip");
    assert!(a.dp.quic_ids.is_empty());
}

#[test]
fn requests_are_saved_right_after_and_wakes_during_a_save_coalesce() {
    let mut a = agent(8);
    let dir = with_state_file(&mut a, "soon");
    a.defer_saves = true;
    a.apply_desired(&desired(2, 1)).expect("apply");
    let v = vip("10.0.0.100:1000/tcp");
    let agent = std::sync::Arc::new(std::sync::Mutex::new(a));
    let wake = std::sync::Arc::new(tokio::sync::Notify::new());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let saved = |weight: u32| {
        let snap = crate::state::Snapshot::load(&dir.join("state.json")).expect("load");
        snap.is_some_and(|s| s.config.contains(&format!("weight = {weight}")))
    };
    rt.block_on(async {
        let saver = tokio::spawn(save_soon_loop(agent.clone(), wake.clone()));
        // Three requests answered before the saver runs: one write, the last state.
        for w in 3..=5 {
            let mut a = agent.lock().expect("lock");
            a.set_weight(&v, ip("10.0.0.11"), w).expect("weight");
            assert!(a.state_behind(), "a change leaves the file behind");
            wake.notify_one();
        }
        assert!(!saved(5), "nothing is written before the saver runs");
        for _ in 0..200 {
            if saved(5) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(saved(5), "the last change is in the file");
        assert_eq!(agent.lock().expect("lock").saves, 1, "three wakes, one save");
        assert!(!agent.lock().expect("lock").state_behind());
        // A wake with nothing changed writes nothing.
        wake.notify_one();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(agent.lock().expect("lock").saves, 1);
        saver.abort();
    });
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_failed_publication_is_retried_by_the_tick_not_on_every_flush() {
    let mut a = agent(4);
    let v = vip("10.0.0.100:80/tcp");
    a.add_vip(v, Algo::Maglev, 0).expect("vip");
    a.add_backend(&v, ip("10.0.0.1"), mac(1), 1).expect("b1");
    let published = a.vips()[&v].table_slot;
    a.dp.refuse_vip_writes = true;
    assert!(a.add_backend(&v, ip("10.0.0.2"), mac(2), 1).is_err(), "the VIP entry cannot be written");
    assert_eq!(a.vips()[&v].table_slot, published, "the VIP keeps its published table");
    a.dp.refuse_vip_writes = false;
    let now = Instant::now();
    a.tick(now).expect("tick");
    assert_eq!(a.vips()[&v].table_slot, published, "not retried at once (a persistent failure would spin)");
    a.tick(now + Duration::from_millis(1100)).expect("retried");
    assert_ne!(a.vips()[&v].table_slot, published, "published at the retry");
    assert_eq!(a.vips()[&v].table.iter().collect::<std::collections::BTreeSet<_>>().len(), 2, "with both backends");
    entries_name_live_tables(&a.dp);
}

#[test]
fn table_facts_from_the_shared_layout_are_the_tables_own() {
    let mut a = agent(8);
    a.apply_desired(&desired(8, 2)).expect("apply");
    let mut fps = std::collections::BTreeSet::new();
    for (v, s) in a.vips() {
        assert!(s.layout.is_some(), "{v}: a Maglev table keeps its layout");
        let facts = s.facts().clone();
        // The same facts by a walk of the table itself.
        let mut counts = std::collections::BTreeMap::new();
        for &id in &s.table {
            *counts.entry(id).or_insert(0usize) += 1;
        }
        assert_eq!(facts.slots, counts, "{v}: entries per backend");
        assert_eq!(facts.fingerprint, fingerprint(s), "{v}: fingerprint");
        assert_eq!(facts.slots.len(), 3);
        fps.insert(facts.fingerprint);
    }
    assert_eq!(fps.len(), 1, "VIPs on the same hosts and weights have one fingerprint (ids differ)");
    // A weight change: new layout, new facts for that VIP only.
    let v = vip("10.0.0.100:1000/tcp");
    a.set_weight(&v, ip("10.0.0.11"), 5).expect("weight");
    let s = &a.vips()[&v];
    assert_eq!(s.facts().fingerprint, fingerprint(s));
    assert_ne!(s.facts().fingerprint, *fps.iter().next().expect("one"));
    assert_eq!(s.facts().slots.values().sum::<usize>(), s.table.len());
}

#[test]
fn a_table_change_rewrites_only_the_backend_entries_that_change() {
    let mut a = agent(4);
    let v = vip("10.0.0.100:80/tcp");
    a.add_vip(v, Algo::Maglev, 0).expect("vip");
    let list: Vec<(IpAddr, Option<Mac>, u32)> = (0..100u8).map(|i| (ip(&format!("10.0.1.{}", i + 1)), mac(i + 1), 1)).collect();
    a.add_backends(&v, &list).expect("backends");
    let id = |a: &Agent<MemMaps>, s: &str| a.vips()[&v].backends[&ip(s)].id;
    let before = a.dp.backend_writes;
    a.set_weight(&v, ip("10.0.1.7"), 5).expect("weight");
    assert_eq!(a.dp.backend_writes - before, 1, "one entry's weight changed");
    let w = |a: &Agent<MemMaps>, s: &str| a.dp.backends[&id(a, s)].weight;
    assert_eq!(w(&a, "10.0.1.7"), 5 * w(&a, "10.0.1.8"), "the entry written has the new weight");
    // Another backend leaves: its entry is written (dead, then freed); the
    // 99 others stay as they were.
    let before = a.dp.backend_writes;
    let gone = id(&a, "10.0.1.9");
    a.del_backend(&v, ip("10.0.1.9")).expect("del");
    assert!(a.dp.backend_writes - before <= 2, "{} writes", a.dp.backend_writes - before);
    assert_eq!(a.dp.backends[&gone], lb_common::BackendInfo { gen: a.dp.backends[&gone].gen, ..Default::default() }, "freed");
    // A written entry is what the datapath holds for every backend.
    for b in a.vips()[&v].backends.values() {
        let IpAddr::V4(x) = b.ip else { panic!("v4 backends only") };
        assert_eq!(a.dp.backends[&b.id].addr, lb_common::addr_v4(x.octets()));
    }
}
