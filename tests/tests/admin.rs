//! Issue 4 (operations) on the loaded program via BPF_PROG_TEST_RUN: drain,
//! maintenance, back up, slow start, and dry runs that report the table
//! change without applying it. Needs root.

use lb_common::{Algo, Stat};
use std::net::{IpAddr, Ipv4Addr};
use xlb::{
    agent::{Admin, Agent},
    config::{Mac, Vip},
};
use xlb_tests::{
    frames::{eth, ipv4, tcp, tcp_flags::*, ETH_IP},
    xdp::{self, test_agent, XDP_TX},
};

fn ip(i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 3, i))
}

fn setup(slow_start_ms: u64) -> (Agent, Vip) {
    let mut a = test_agent();
    let v: Vip = "10.0.0.60:80/tcp".parse().expect("vip");
    a.add_vip(v, Algo::Maglev, 0).expect("vip");
    if slow_start_ms > 0 {
        a.set_slow_start(&v, slow_start_ms).expect("slow start");
    }
    for i in 1..=3 {
        a.add_backend(&v, ip(i), Some(Mac([2, 0, 0, 0, 3, i])), 1).expect("backend");
    }
    (a, v)
}

fn frame(sport: u16, flags: u8) -> Vec<u8> {
    eth(ETH_IP, &[], &ipv4(Ipv4Addr::new(192, 0, 2, 9), Ipv4Addr::new(10, 0, 0, 60), 6, &[], 0, &tcp(sport, 80, flags, b"x")))
}

/// Backend index (last MAC byte) a frame goes to, and the counter deltas.
fn to(a: &mut Agent, f: &[u8]) -> (u8, Vec<i64>) {
    let (act, out, d) = xdp::run(&mut a.dp, f);
    assert_eq!(act, XDP_TX);
    (out[5], d)
}

fn share(a: &Agent, v: &Vip, i: u8) -> f64 {
    let st = &a.vips()[v];
    let id = st.backends[&ip(i)].id;
    st.table.iter().filter(|&&x| x == id).count() as f64 / st.table.len() as f64
}

#[test]
fn dry_run_reports_the_change_and_applies_nothing() {
    let (mut a, v) = setup(0);
    let before = a.vips()[&v].table.clone();
    let (moved, entries) = a.set_backend(&v, ip(2), Some(5), None, true).expect("dry run").expect("counts");
    assert_eq!(entries, before.len());
    assert!(moved > entries / 4, "reweighting 1 → 5 of 3 backends moves a lot: {moved}");
    assert_eq!(a.vips()[&v].table, before, "dry run changed nothing");
    assert_eq!(a.vips()[&v].backends[&ip(2)].weight, 1);
    let (applied, _) = a.set_backend(&v, ip(2), Some(5), None, false).expect("apply").expect("published");
    assert_eq!(applied, moved, "the dry run predicted the real change");
    assert!((share(&a, &v, 2) - 5.0 / 7.0).abs() < 0.01);
    // Removal reports what moved too: exactly the slots it owned.
    let owned = a.vips()[&v].table.iter().filter(|&&x| x == a.vips()[&v].backends[&ip(2)].id).count();
    let (moved, _) = a.del_backend(&v, ip(2)).expect("del");
    assert!(moved >= owned && moved < owned + a.vips()[&v].table.len() / 50, "moved {moved}, owned {owned}");
}

#[test]
fn drain_keeps_flows_maint_moves_them_up_restores() {
    let (mut a, v) = setup(0);
    // Pin 60 flows; note who has them.
    let flows: Vec<(u16, u8)> = (1000..1060).map(|p| (p, to(&mut a, &frame(p, SYN)).0)).collect();
    let on2: Vec<u16> = flows.iter().filter(|(_, b)| *b == 2).map(|(p, _)| *p).collect();
    assert!(!on2.is_empty());
    a.set_backend(&v, ip(2), None, Some(Admin::Drain), false).expect("drain");
    for p in &on2 {
        assert_eq!(to(&mut a, &frame(*p, ACK)).0, 2, "drained backend keeps flow {p}");
    }
    for p in 2000..2100 {
        assert_ne!(to(&mut a, &frame(p, SYN)).0, 2, "no new flow to a drained backend");
    }
    assert_eq!(a.status().expect("status").vips[0].backends[1].state, "drain");
    a.set_backend(&v, ip(2), None, Some(Admin::Maint), false).expect("maint");
    for p in &on2 {
        let (b, d) = to(&mut a, &frame(*p, ACK));
        assert_ne!(b, 2, "maintenance moves flow {p}");
        assert_eq!(d[Stat::CtStale as usize], 1);
    }
    assert_eq!(a.status().expect("status").vips[0].backends[1].state, "maint");
    a.set_backend(&v, ip(2), None, Some(Admin::Ready), false).expect("up");
    assert_eq!(a.status().expect("status").vips[0].backends[1].state, "up");
    assert!((share(&a, &v, 2) - 1.0 / 3.0).abs() < 0.01, "full share back");
}

#[test]
fn slow_start_ramps_a_new_backend() {
    let (mut a, v) = setup(1000);
    // The first three came up with the VIP: let their own slow start finish.
    std::thread::sleep(std::time::Duration::from_millis(1050));
    a.tick(std::time::Instant::now()).expect("tick");
    assert!((share(&a, &v, 1) - 1.0 / 3.0).abs() < 0.01);
    a.add_backend(&v, ip(4), Some(Mac([2, 0, 0, 0, 3, 4])), 1).expect("add");
    let first = share(&a, &v, 4);
    assert!(first < 0.06, "starts at a tenth of its weight: share {first:.3}");
    std::thread::sleep(std::time::Duration::from_millis(450));
    a.tick(std::time::Instant::now()).expect("tick");
    let mid = share(&a, &v, 4);
    assert!(mid > first && mid < 0.2, "ramping: {mid:.3}");
    std::thread::sleep(std::time::Duration::from_millis(700));
    a.tick(std::time::Instant::now()).expect("tick");
    let full = share(&a, &v, 4);
    assert!((full - 0.25).abs() < 0.01, "full weight after the slow start: {full:.3}");
    // Established backends were never ramped.
    assert!((share(&a, &v, 1) - 0.25).abs() < 0.01);
}
