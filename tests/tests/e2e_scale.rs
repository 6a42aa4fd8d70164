//! End to end, issue 10 (control plane v2) at a smaller size: 64 VIPs on
//! one address sharing 3 backend hosts, checked on port 80, configured from
//! a file. Checks: every backend of every VIP comes up; in steady state no
//! false down and one check job per backend host (not per VIP); no MAC or
//! netlink trouble; a killed shared backend leaves all 64 tables within
//! fall × fast interval + 100 ms (the poll adds up to a few ms). Needs root.

use std::time::Duration;
use xlb_tests::{
    lab::TempDir,
    scale::{self, Checks},
    scenario::{binaries, Deployment},
};

#[test]
fn sixty_four_vips_sharing_three_backends() {
    let (xlb, lab_bin) = binaries();
    let dir = TempDir::new("scale").expect("scratch dir");
    let mut d = Deployment::start(&xlb, &lab_bin, 3, &["--max-vips", "64"]).expect("deployment");
    // Checks every 100 ms: the time to take a dead backend out is then
    // bounded by fall × fast interval, whatever the phase of the kill.
    let c = Checks { interval_ms: 100, fast_interval_ms: 100, fall: 3 };
    let r = scale::shared(&mut d, &dir.0, 64, c, Duration::from_secs(5), true).expect("scenario");
    eprintln!("scale: {r:?}");
    assert_eq!(r.check_jobs, 3, "one check job per backend host, whatever the number of VIPs");
    assert!(
        r.checks_per_s > r.expected_checks_per_s * 0.6 && r.checks_per_s < r.expected_checks_per_s * 1.3,
        "checks per second {:.1} ≈ targets / interval = {:.1} (not × 64 VIPs)",
        r.checks_per_s,
        r.expected_checks_per_s
    );
    assert_eq!(r.false_transitions, 0, "no backend flapped in steady state");
    assert_eq!(r.steady_publications, 0, "nothing changed, nothing published");
    assert_eq!(r.netlink_errors, 0, "agent log:\n{}", d.lab.log("agent"));
    let removal = r.removal_ms.expect("removal timed");
    // The first failing check starts within one interval of the kill, then
    // fall − 1 more at the fast interval: ≤ 100 + 2 × 100 (+ jitter 10 %),
    // plus publishing 64 tables.
    assert!(removal <= r.removal_bound_ms + 40.0, "out of all 64 tables after {removal:.0} ms (bound {} ms)", r.removal_bound_ms);
    // `xlb status` shows the datapath's memory and the limits.
    let st = scale::status(&d).expect("status");
    assert_eq!(st["max_vips"], 64);
    // One table per VIP, allocated when published: 64 tables of 65 537
    // 8-byte elements, the few ready ones, and none for unused slots.
    let tables = st["datapath_memory"]["XLB_TABLES"].as_u64().unwrap_or(0);
    let most = (64 + xlb::maps::POOL_READY as u64 + 2) * (65537 * 8 + 4096);
    assert!((64 * 65537 * 8..most).contains(&tables), "{}", st["datapath_memory"]);
    let text = d.cli_ok(&["status"]).expect("status");
    assert!(text.contains("MiB in maps") && text.contains("64 of 64 VIPs") && text.contains("3 check job(s)"), "{text}");
    // The 65th VIP: one line naming the limit and the flag; nothing changes.
    let out = d.cli(&["vip", "add", "10.200.0.100:2000/tcp"]).expect("cli");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("limit of 64 VIPs") && err.contains("--max-vips") && err.trim().lines().count() == 1, "{err}");
}
