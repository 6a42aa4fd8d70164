//! Running the loaded program on crafted frames (BPF_PROG_TEST_RUN), the
//! shape of every datapath test: frame in → verdict, frame out, counter deltas.

use aya::programs::{TestRun, TestRunOptions};
use lb_common::{stats::verdicts, Stat, PROG_XLB};
use xlb::{
    agent::{Agent, AgentOptions},
    config::{CheckKind, HealthConfig, Mac},
    maps::{Datapath, LoadOptions},
};

use crate::frames::LB_MAC;

/// XDP_ABORTED.
pub const XDP_ABORTED: u32 = 0;
/// XDP_DROP.
pub const XDP_DROP: u32 = 1;
/// XDP_PASS.
pub const XDP_PASS: u32 = 2;
/// XDP_TX.
pub const XDP_TX: u32 = 3;

/// An agent over a freshly loaded (not attached) datapath, health checks off,
/// the balancer's MAC `LB_MAC`.
pub fn test_agent() -> Agent {
    let dp = Datapath::load(LoadOptions { max_vips: 8, conntrack_size: 65536, ..Default::default() })
        .expect("the XDP program loads (run the tests as root)");
    let health = HealthConfig { kind: CheckKind::None, ..Default::default() };
    Agent::new(dp, AgentOptions { iface_mac: Mac(LB_MAC), accept_macs: Vec::new(), health }).expect("agent")
}

/// Run one frame: (action, frame as the program left it, change of every
/// global counter).
pub fn run(dp: &mut Datapath, frame: &[u8]) -> (u32, Vec<u8>, Vec<i64>) {
    let before = dp.stats().expect("stats");
    let mut out = vec![0u8; frame.len() + 512];
    let prog = dp.program(PROG_XLB).expect("program");
    let r = prog
        .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..Default::default() })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    let after = dp.stats().expect("stats");
    (r.return_value, out, after.iter().zip(before.iter()).map(|(a, b)| *a as i64 - *b as i64).collect())
}

/// XDP_REDIRECT.
pub const XDP_REDIRECT: u32 = 4;

/// `run` for any program of the object, as if the frame arrived on
/// interface `ingress_ifindex` of the calling thread's network namespace
/// (0: none; the kernel then uses the namespace's loopback).
pub fn run_on(dp: &mut Datapath, prog: &str, frame: &[u8], ingress_ifindex: u32) -> (u32, Vec<u8>, Vec<i64>) {
    let before = dp.stats().expect("stats");
    let mut out = vec![0u8; frame.len() + 512];
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
    // rx_queue_index, egress_ifindex (data_end = the frame's length).
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    let p = dp.program(prog).expect("program");
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: (ingress_ifindex != 0).then_some(&ctx[..]),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    let after = dp.stats().expect("stats");
    (r.return_value, out, after.iter().zip(before.iter()).map(|(a, b)| *a as i64 - *b as i64).collect())
}

/// Exactly one verdict counter moved, by one, and it is `want`.
pub fn assert_one_verdict(delta: &[i64], want: Stat, what: &str) {
    for s in verdicts() {
        let expected = if s == want { 1 } else { 0 };
        assert_eq!(delta[s as usize], expected, "{what}: counter {} moved by {}", s.name(), delta[s as usize]);
    }
}
