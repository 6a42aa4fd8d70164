//! Check jobs, rise/fall, MACs and probes over `MemMaps` (no BPF).

use super::*;
use crate::{
    agent::{AgentOptions, MemMaps},
    maps::LoadOptions,
};
use lb_common::Algo;

fn agent(max_vips: u32) -> Agent<MemMaps> {
    let load = LoadOptions { max_vips, max_tables: max_vips, ring_size: 251, ..Default::default() };
    let opts = AgentOptions { iface_mac: "02:00:00:00:00:01".parse().expect("mac"), accept_macs: Vec::new(), health: HealthConfig::default() };
    Agent::new(MemMaps::new(load), opts).expect("agent")
}

fn vip(port: u16) -> Vip {
    format!("10.0.0.100:{port}/tcp").parse().expect("vip")
}

const BACKENDS: [&str; 3] = ["10.0.0.11", "10.0.0.12", "10.0.0.13"];

/// `n` VIPs sharing three backends whose MACs are known.
fn shared(n: u16) -> Agent<MemMaps> {
    let mut a = agent(n as u32);
    for (i, b) in BACKENDS.iter().enumerate() {
        a.neighbour_changed(b.parse().expect("ip"), Some(Mac([2, 0, 0, 0, 0, 0x11 + i as u8]))).expect("neigh");
    }
    for p in 0..n {
        a.add_vip(vip(1000 + p), Algo::Maglev, 0).expect("vip");
        let list: Vec<(IpAddr, Option<Mac>, u32)> = BACKENDS.iter().map(|b| (b.parse().expect("ip"), None, 1)).collect();
        a.add_backends(&vip(1000 + p), &list).expect("backends");
    }
    a
}

fn ok() -> CheckOutcome {
    CheckOutcome { ok: true, latency_ms: Some(0.1), ..Default::default() }
}

fn refused() -> CheckOutcome {
    CheckOutcome { ok: false, error: Some("connect: refused".into()), ..Default::default() }
}

/// Run every due job with `result(ip)` and publish, as the health loop does.
fn round(a: &mut Agent<MemMaps>, now: Instant, result: impl Fn(IpAddr) -> CheckOutcome) -> usize {
    let jobs = a.due_checks(now);
    for j in &jobs {
        a.report(j, result(j.target.ip)).expect("report");
    }
    a.publish_dirty().expect("publish");
    a.save_if_dirty();
    jobs.len()
}

fn live(a: &Agent<MemMaps>, v: &Vip, ip: &str) -> bool {
    let id = a.vips()[v].backends[&ip.parse::<IpAddr>().expect("ip")].id;
    a.dp.table(&v.key()).contains(&id)
}

/// `n` VIPs (of `max` allowed) sharing the three backends, MACs
/// unknown, each checked on port 80.
fn checked_on_80(max: u32, n: u16) -> Agent<MemMaps> {
    let mut a = agent(max);
    let h = HealthConfig { port: Some(80), ..Default::default() };
    for p in 0..n {
        a.add_vip_with(vip(1000 + p), Algo::Maglev, 0, Some(h.clone()), Default::default()).expect("vip");
        let list: Vec<(IpAddr, Option<Mac>, u32)> = BACKENDS.iter().map(|b| (b.parse().expect("ip"), None, 1)).collect();
        a.add_backends(&vip(1000 + p), &list).expect("backends");
    }
    a
}

#[test]
fn one_job_per_target_whatever_the_number_of_vips() {
    let mut a = shared(64);
    assert_eq!(a.check_jobs(), 3 * 64, "each VIP port is its own target (the check connects to the VIP's port)");
    // The same services checked on one port (e.g. :80 for 80 and 443 of
    // many tenants) share it.
    let mut a = checked_on_80(64, 64);
    assert_eq!(a.check_jobs(), 3);
    let t0 = Instant::now();
    assert_eq!(a.due_checks(t0).len(), 3, "one job per backend host");
    assert!(a.due_checks(t0).is_empty(), "in flight: not started twice");
    // Rise and fall are each VIP's own; they do not split the job.
    let v = vip(1000);
    a.set_backend_check(&v, BACKENDS[0].parse().expect("ip"), Some(HealthConfig { port: Some(80), rise: 5, fall: 1, ..Default::default() }))
        .expect("check");
    assert_eq!(a.check_jobs(), 3);
    // Another port or path is another job.
    a.set_backend_check(&v, BACKENDS[0].parse().expect("ip"), Some(HealthConfig { port: Some(81), ..Default::default() })).expect("check");
    assert_eq!(a.check_jobs(), 4);
    // Agent checks are shared too.
    let h = HealthConfig { port: Some(80), agent_port: Some(9999), ..Default::default() };
    for p in 1..64 {
        for b in BACKENDS {
            a.set_backend_check(&vip(1000 + p), b.parse().expect("ip"), Some(h.clone())).expect("check");
        }
    }
    assert_eq!(a.check_jobs(), 4 + 3, "the 4 health jobs (the agent port does not split them) + 3 shared agent jobs");
    // A weight changes no target: the jobs are not recomputed (a walk
    // of every backend of every VIP); maintenance stops its checks.
    let b0: IpAddr = BACKENDS[0].parse().expect("ip");
    a.set_weight(&vip(1001), b0, 7).expect("weight");
    assert!(!a.checks.stale.any(), "a weight change leaves the jobs");
    a.set_backend(&vip(1001), b0, None, Some(Admin::Maint), false).expect("maint");
    assert!(a.checks.stale.any(), "maintenance changes the targets");
    assert_eq!(a.check_jobs(), 4 + 3, "(still subscribed through the other VIPs)");
}

/// Targets and their subscribers, sorted (to compare two refreshes).
fn subscriptions(a: &Agent<MemMaps>) -> Vec<(String, Vec<(Vip, IpAddr)>)> {
    let mut v: Vec<(String, Vec<(Vip, IpAddr)>)> = a
        .checks
        .jobs
        .iter()
        .map(|(t, j)| {
            let mut s = j.subscribers.clone();
            s.sort();
            (format!("{t:?}"), s)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn recomputing_only_the_changed_vips_gives_the_jobs_a_full_walk_gives() {
    let mut a = checked_on_80(16, 8);
    assert_eq!(a.check_jobs(), 3);
    let t0 = Instant::now();
    let started = a.due_checks(t0).len();
    assert_eq!(started, 3);
    let b0: IpAddr = BACKENDS[0].parse().expect("ip");
    type Step<'a> = Box<dyn Fn(&mut Agent<MemMaps>) + 'a>;
    let steps: Vec<Step> = vec![
        Box::new(|a| a.set_backend_check(&vip(1003), b0, Some(HealthConfig { port: Some(81), ..Default::default() })).expect("check")),
        Box::new(|a| a.add_backend(&vip(1004), "10.0.0.40".parse().expect("ip"), None, 1).map(|_| ()).expect("backend")),
        Box::new(|a| a.del_vip(&vip(1003)).expect("del")),
        Box::new(|a| a.set_backend(&vip(1005), b0, None, Some(Admin::Maint), false).map(|_| ()).expect("maint")),
        Box::new(|a| a.add_vip_with(vip(1010), Algo::Maglev, 0, Some(HealthConfig { port: Some(82), ..Default::default() }), Default::default()).expect("vip")),
        Box::new(|a| a.add_backend(&vip(1010), b0, None, 1).map(|_| ()).expect("backend")),
        Box::new(|a| a.del_backend(&vip(1004), "10.0.0.40".parse().expect("ip")).map(|_| ()).expect("del")),
    ];
    for (i, step) in steps.iter().enumerate() {
        step(&mut a);
        assert!(a.checks.stale.any(), "step {i} changes the targets");
        a.check_jobs();
        let incremental = subscriptions(&a);
        a.checks.stale.all();
        a.check_jobs();
        assert_eq!(incremental, subscriptions(&a), "step {i}: the changed VIPs' refresh and a full one differ");
    }
    // The port-81 job left with VIP 1003; port 82 came with VIP 1010.
    let ports: BTreeSet<u16> = a.checks.jobs.keys().filter_map(|t| match t.probe { Probe::Health { port, .. } => Some(port), _ => None }).collect();
    assert_eq!(ports, BTreeSet::from([80, 82]));
    // Targets that stayed kept their schedule: still in flight.
    assert!(a.due_checks(t0 + Duration::from_secs(10)).iter().all(|j| !matches!(j.target.probe, Probe::Health { port: 80, .. })));
}

#[test]
fn a_shared_result_fans_out_to_every_vip_in_one_flush() {
    let mut a = agent(512);
    let h = HealthConfig { port: Some(80), ..Default::default() };
    let macs: Vec<(IpAddr, Mac)> =
        BACKENDS.iter().enumerate().map(|(i, b)| (b.parse().expect("ip"), Mac([2, 0, 0, 0, 0, 0x11 + i as u8]))).collect();
    a.neighbours_dumped(&macs).expect("dump");
    let mut d = crate::config::Desired::default();
    for p in 0..512 {
        d.vips.push(crate::config::DesiredVip {
            vip: vip(1000 + p),
            algo: Algo::Maglev,
            persist: 0,
            health: Some(h.clone()),
            all_down: Default::default(),
            slow_start_ms: 0,
            opts: Default::default(),
            forward: Default::default(),
            backends: BACKENDS
                .iter()
                .map(|b| crate::config::DesiredBackend {
                    ip: b.parse().expect("ip"),
                    mac: None,
                    weight: 1,
                    health: None,
                    state: Admin::Ready,
                    forward: None,
                    server_id: None,
                })
                .collect(),
        });
    }
    a.apply_desired(&d).expect("apply");
    let writes = a.dp.table_writes;
    assert_eq!(writes, 0, "no backend is up before its first check: no table");
    let t0 = Instant::now();
    assert_eq!(round(&mut a, t0, |_| ok()), 3);
    assert_eq!(a.dp.table_writes, 512, "one table per VIP, once");
    assert_eq!(a.dp.prepared, 0, "passing checks prepare no table");
    assert!(a.vips().keys().all(|v| BACKENDS.iter().all(|b| live(&a, v, b))));
    // Backend 2 dies: fall (3) failures at the fast interval take it out
    // of all 512 tables, each written once.
    let dead: IpAddr = BACKENDS[1].parse().expect("ip");
    let mut t = t0;
    for i in 0..3 {
        t += Duration::from_millis(400);
        let before = a.dp.table_writes;
        let started = Instant::now();
        assert_eq!(round(&mut a, t, |ip| if ip == dead { refused() } else { ok() }), 3);
        let ended = Instant::now();
        let out = a.vips().keys().filter(|v| !live(&a, v, BACKENDS[1])).count();
        let next = a.checks.jobs.iter().find(|(k, _)| k.ip == dead).map(|(_, j)| j.next).expect("job");
        // The next check is scheduled during the round: bounded from
        // both ends of it, however long publishing 512 tables took.
        if i < 2 {
            assert!(next <= ended + Duration::from_millis(115), "fast interval (100 ms) while changing state");
        } else {
            assert!(next >= started + Duration::from_millis(265), "the normal interval (300 ms) once down");
        }
        if i < 2 {
            assert_eq!(out, 0, "still in after {} failure(s)", i + 1);
            assert_eq!(a.dp.table_writes, before);
            assert_eq!(a.dp.prepared, 512, "the first failure has 512 tables made ready for the removal");
        } else {
            assert_eq!(out, 512, "out of every VIP's table after the third failure");
            assert_eq!(a.dp.table_writes, before + 512);
        }
    }
    assert!(a.vips().keys().all(|v| live(&a, v, BACKENDS[0]) && live(&a, v, BACKENDS[2])), "no false down");
    // Its first passing check after that (rise 2): the tables of its
    // return are made ready too.
    a.dp.prepared = 0;
    t += Duration::from_millis(400);
    round(&mut a, t, |_| ok());
    assert_eq!(a.vips().keys().filter(|v| live(&a, v, BACKENDS[1])).count(), 0, "rise 2: not back after one pass");
    assert_eq!(a.dp.prepared, 512, "tables made ready for its return");
}

#[test]
fn rise_and_fall_are_each_vips_own() {
    let mut a = shared(2);
    let (v1, v2) = (vip(1000), vip(1001));
    let ip: IpAddr = BACKENDS[0].parse().expect("ip");
    a.set_backend_check(&v2, ip, Some(HealthConfig { fall: 1, ..Default::default() })).expect("check");
    let mut t = Instant::now();
    round(&mut a, t, |_| ok());
    assert!(live(&a, &v1, BACKENDS[0]) && live(&a, &v2, BACKENDS[0]));
    t += Duration::from_secs(1);
    round(&mut a, t, |i| if i == ip { refused() } else { ok() });
    assert!(live(&a, &v1, BACKENDS[0]), "fall 3: one failure is not enough");
    assert!(!live(&a, &v2, BACKENDS[0]), "fall 1: out after one failure");
}

#[test]
fn macs_come_from_the_cache_and_unresolved_addresses_are_probed_once_each() {
    let mut a = agent(8);
    for p in 0..8 {
        a.add_vip(vip(1000 + p), Algo::Maglev, 0).expect("vip");
        let list: Vec<(IpAddr, Option<Mac>, u32)> = BACKENDS.iter().map(|b| (b.parse().expect("ip"), None, 1)).collect();
        a.add_backends(&vip(1000 + p), &list).expect("backends");
    }
    let t0 = Instant::now();
    let probes = a.due_probes(t0);
    assert_eq!(probes.len(), 3, "one probe per address, not per VIP: {probes:?}");
    assert!(a.due_probes(t0 + Duration::from_millis(100)).is_empty(), "not again within the probe interval");
    // A backend added between two full walks is probed at the next call.
    let late: IpAddr = "10.0.0.30".parse().expect("ip");
    a.add_backend(&vip(1000), late, None, 1).expect("backend");
    assert_eq!(a.due_probes(t0 + Duration::from_millis(120)), vec![late], "a changed VIP is walked at once");
    assert_eq!(a.due_probes(t0 + PROBE_INTERVAL).len(), 3, "again after it");
    round(&mut a, t0, |_| ok());
    assert_eq!(a.dp.table_writes, 0, "up but no MAC: no table");
    let ip: IpAddr = BACKENDS[0].parse().expect("ip");
    let m = Mac([2, 0, 0, 0, 0, 0x42]);
    a.neighbour_changed(ip, Some(m)).expect("event");
    assert_eq!(a.dp.table_writes, 8, "every VIP using it published once");
    assert!((0..8).all(|p| a.vips()[&vip(1000 + p)].backends[&ip].mac == Some(m)));
    let later = a.due_probes(t0 + 2 * PROBE_INTERVAL);
    assert!(later.len() == 3 && !later.contains(&ip), "the resolved address is no longer probed: {later:?}");
    // The entry vanishes: the MAC is kept, the address probed once.
    a.neighbour_changed(ip, None).expect("event");
    assert!((0..8).all(|p| a.vips()[&vip(1000 + p)].backends[&ip].mac == Some(m)));
    assert!(a.due_probes(t0 + 4 * PROBE_INTERVAL).contains(&ip));
    // A dump after an overrun brings changes missed meanwhile.
    let m2 = Mac([2, 0, 0, 0, 0, 0x43]);
    a.neighbours_dumped(&[(ip, m2)]).expect("dump");
    assert!((0..8).all(|p| a.vips()[&vip(1000 + p)].backends[&ip].mac == Some(m2)));
    // A configured MAC is never overridden.
    let fixed: IpAddr = "10.0.0.20".parse().expect("ip");
    let m3 = Mac([2, 0, 0, 0, 0, 0x20]);
    a.add_backend(&vip(1000), fixed, Some(m3), 1).expect("backend");
    a.neighbour_changed(fixed, Some(m2)).expect("event");
    assert_eq!(a.vips()[&vip(1000)].backends[&fixed].mac, Some(m3));
    assert!(!a.due_probes(t0 + 8 * PROBE_INTERVAL).contains(&fixed), "a configured MAC needs no probe");
}
