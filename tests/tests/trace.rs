//! The tracing variant of the program (`xlb_trace`) on crafted frames
//! (BPF_PROG_TEST_RUN): it decides exactly as the balancer does, records
//! each frame the filter lets through with its verdict, reason and backend
//! and its first bytes as they arrived; the pcap written from the records
//! is read back by `tcpdump -r`; the balancer (`xlb`) records nothing. Needs
//! root and tcpdump (`cargo xtask test` installs it).

use aya::programs::{TestRun, TestRunOptions};
use lb_common::{
    trace::{TraceConfig, TRACE_ANY_BACKEND},
    Stat, PROG_TRACE, PROG_XLB,
};
use std::net::{IpAddr, Ipv4Addr};
use xlb::{
    agent::Agent,
    config::Mac,
    diag::trace::{filter, frame_bytes, frame_line, FrameLine, PcapWriter, TraceRequest, TraceVerdict},
};
use xlb_tests::{
    frames::{eth, ipv4, tcp, tcp_flags, udp4, ETH_ARP, ETH_IP},
    xdp::{test_agent, XDP_DROP, XDP_PASS, XDP_TX},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const VIP4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 200);

fn agent() -> Agent {
    let mut a = test_agent();
    let v = "10.0.0.100:80/tcp".parse().expect("vip");
    a.add_vip(v, lb_common::Algo::Maglev, 0).expect("vip");
    for i in 1..=2u8 {
        a.add_backend(&v, IpAddr::V4(Ipv4Addr::new(10, 0, 1, i)), Some(Mac([2, 0, 0, 0, 1, i])), 1).expect("backend");
    }
    a.add_vip("10.0.0.200:80/tcp".parse().expect("vip"), lb_common::Algo::Maglev, 0).expect("empty vip");
    a
}

/// Run a frame through one of the programs; (action, frame out).
fn run_prog(a: &mut Agent, prog: &str, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    let r = a
        .dp
        .program(prog)
        .expect("program")
        .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..Default::default() })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

fn syn(dst: Ipv4Addr, sport: u16) -> Vec<u8> {
    eth(ETH_IP, &[], &ipv4(CLIENT, dst, 6, &[], 0, &tcp(sport, 80, tcp_flags::SYN, b"")))
}

/// Frames with what each must come out as: (frame, action, verdict).
fn known_frames() -> Vec<(Vec<u8>, u32, Stat)> {
    let mut bad_ihl = ipv4(CLIENT, VIP4, 6, &[], 0, &tcp(4001, 80, tcp_flags::SYN, b""));
    bad_ihl[0] = 0x44; // IHL 4 (< 5): malformed
    let mut truncated = syn(VIP4, 4002);
    truncated.truncate(14 + 20 + 10); // TCP header cut short
    vec![
        (syn(VIP4, 4000), XDP_TX, Stat::Forwarded),
        (eth(ETH_ARP, &[], &[0u8; 28]), XDP_PASS, Stat::PassNotIp),
        (eth(ETH_IP, &[], &bad_ihl), XDP_PASS, Stat::PassBadHeader),
        (truncated, XDP_PASS, Stat::PassTruncated),
        (syn(EMPTY_VIP, 4003), XDP_DROP, Stat::DropNoBackend),
        (udp4(CLIENT, 5000, Ipv4Addr::new(10, 9, 9, 9), 53), XDP_PASS, Stat::PassNotVip),
        (syn(VIP4, 4004), XDP_TX, Stat::Forwarded),
    ]
}

fn arm(a: &mut Agent, req: TraceRequest) {
    let cfg = filter(a, &req).expect("filter");
    a.dp.trace_arm(&cfg).expect("arm");
}

fn lines(a: &mut Agent) -> Vec<FrameLine> {
    let recs = a.dp.trace_drain(1000);
    recs.iter().map(|r| frame_line(a, r, 0)).collect()
}

#[test]
fn traced_frames_carry_verdicts_reasons_backends_and_bytes_and_tcpdump_reads_them() {
    let mut a = agent();
    arm(&mut a, TraceRequest { rate: Some(100_000), ..Default::default() });
    // The balancer itself never records.
    for (f, action, _) in known_frames() {
        assert_eq!(run_prog(&mut a, PROG_XLB, &f).0, action);
    }
    assert!(a.dp.trace_drain(10).is_empty(), "the untraced program records nothing");
    let frames = known_frames();
    let mut outs = Vec::new();
    for (f, action, _) in &frames {
        let (got, out) = run_prog(&mut a, PROG_TRACE, f);
        assert_eq!(got, *action, "the tracing program decides as the balancer does");
        outs.push(out);
    }
    let got = lines(&mut a);
    assert_eq!(got.len(), frames.len(), "one record per frame: {got:#?}");
    for (((f, action, stat), l), out) in frames.iter().zip(&got).zip(&outs) {
        assert_eq!(l.verdict, stat.name(), "{l:?}");
        let name = match *action {
            XDP_TX => "tx",
            XDP_PASS => "pass",
            _ => "drop",
        };
        assert_eq!(l.action, name);
        assert_eq!(frame_bytes(l).expect("hex"), f[..f.len().min(128)], "the frame as it arrived (MACs before the rewrite)");
        assert_eq!(l.len as usize, f.len());
        if *action == XDP_TX {
            let b = a.vips()[&"10.0.0.100:80/tcp".parse().expect("vip")]
                .backends
                .values()
                .find(|b| b.mac.map(|m| m.0[..] == out[..6]).unwrap_or(false))
                .expect("sent to a backend");
            assert_eq!(l.backend.as_deref(), Some(b.ip.to_string().as_str()));
            assert!(l.flow.as_deref().is_some_and(|x| x.starts_with("tcp 192.0.2.7:")), "{l:?}");
        } else {
            assert_eq!(l.backend, None);
        }
    }
    assert_eq!(got[0].flow.as_deref(), Some("tcp 192.0.2.7:4000 > 10.0.0.100:80"));
    assert_eq!(got[4].flow.as_deref(), Some("tcp 192.0.2.7:4003 > 10.0.0.200:80"), "a dropped frame keeps its 5-tuple");
    assert_eq!(got[1].flow, None, "ARP has no 5-tuple");

    // The pcap: tcpdump reads exactly these frames, in order.
    let dir = std::env::temp_dir().join(format!("xlb-trace-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("t.pcap");
    {
        let mut p = PcapWriter::new(std::fs::File::create(&path).expect("pcap")).expect("header");
        for (i, l) in got.iter().enumerate() {
            p.frame(1_700_000_000_000_000_000 + i as u64 * 1000, &frame_bytes(l).expect("hex"), l.len).expect("frame");
        }
    }
    let out = std::process::Command::new("tcpdump").args(["-r"]).arg(&path).args(["-nn", "-e", "-tt"]).output().expect("tcpdump runs (apt-get install tcpdump)");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "tcpdump: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<&str> = text.lines().collect();
    assert_eq!(rows.len(), frames.len(), "{text}");
    assert!(rows[0].contains("192.0.2.7.4000 > 10.0.0.100.80") && rows[0].contains("Flags [S]"), "{}", rows[0]);
    assert!(rows[0].contains("02:00:00:00:00:02 > 02:00:00:00:00:10"), "MACs as the frame arrived: {}", rows[0]);
    assert!(rows[1].contains("ARP"), "{}", rows[1]);
    assert!(rows[4].contains("192.0.2.7.4003 > 10.0.0.200.80"), "{}", rows[4]);
    assert!(rows[5].contains("192.0.2.7.5000 > 10.9.9.9.53"), "{}", rows[5]);
    assert!(rows[6].contains("192.0.2.7.4004 > 10.0.0.100.80"), "{}", rows[6]);
}

#[test]
fn trace_filters_and_rate_limit() {
    let mut a = agent();
    let run_all = |a: &mut Agent| {
        for (f, _, _) in known_frames() {
            run_prog(a, PROG_TRACE, &f);
        }
    };
    arm(&mut a, TraceRequest { verdict: Some(TraceVerdict::Drop), rate: Some(100_000), ..Default::default() });
    run_all(&mut a);
    let got = lines(&mut a);
    assert_eq!(got.iter().map(|l| l.verdict.as_str()).collect::<Vec<_>>(), ["drop_no_backend"]);

    arm(&mut a, TraceRequest { vip: Some("10.0.0.100:80/tcp".parse().expect("vip")), rate: Some(100_000), ..Default::default() });
    run_all(&mut a);
    let got = lines(&mut a);
    // The VIP's frames: the two SYNs; the malformed ones never had a 5-tuple.
    assert_eq!(got.len(), 2, "{got:#?}");
    assert!(got.iter().all(|l| l.flow.as_deref().is_some_and(|f| f.ends_with("10.0.0.100:80"))));

    let b1 = got[0].backend.clone().expect("backend");
    arm(&mut a, TraceRequest { backend: Some(b1.parse().expect("backend")), rate: Some(100_000), ..Default::default() });
    for p in 6000..6040 {
        run_prog(&mut a, PROG_TRACE, &syn(VIP4, p));
    }
    let got = lines(&mut a);
    assert!(!got.is_empty() && got.len() < 40, "{} of 40 flows", got.len());
    assert!(got.iter().all(|l| l.backend.as_deref() == Some(b1.as_str())));

    // The default rate keeps a burst of 64 frames whole.
    arm(&mut a, TraceRequest::default());
    for p in 0..64u16 {
        run_prog(&mut a, PROG_TRACE, &syn(VIP4, 8000 + p));
    }
    assert_eq!((lines(&mut a).len(), a.dp.trace_missed().expect("missed")), (64, 0));

    // Rate limit: a burst of 64 records, then 1 per second.
    let cfg: TraceConfig = filter(&a, &TraceRequest { rate: Some(1), ..Default::default() }).expect("filter");
    assert_eq!(cfg.backend_id, TRACE_ANY_BACKEND);
    a.dp.trace_arm(&cfg).expect("arm");
    for p in 0..200u16 {
        run_prog(&mut a, PROG_TRACE, &syn(VIP4, 7000 + p));
    }
    let n = lines(&mut a).len();
    assert!((64..=66).contains(&n), "{n} records for 200 frames at 1/s with a burst of 64");
    assert_eq!(a.dp.trace_missed().expect("missed"), 200 - n as u64);

    // Bad filters are refused with one line.
    for bad in [
        TraceRequest { vip: Some("10.0.0.1:80/tcp".parse().expect("vip")), ..Default::default() },
        TraceRequest { backend: Some("10.9.9.9".parse().expect("ip")), ..Default::default() },
        TraceRequest { rate: Some(0), ..Default::default() },
    ] {
        let e = filter(&a, &bad).expect_err("refused");
        assert!(!format!("{e:#}").contains('\n'));
    }
    // A verdict that is none is refused by its type, before any filter.
    let e = "maybe".parse::<TraceVerdict>().expect_err("refused");
    assert_eq!(e.to_string(), "unknown verdict 'maybe' (tx, pass, drop)");
}

#[test]
fn a_prefix_or_any_port_vip_filter_traces_every_destination_it_covers() {
    let mut a = test_agent();
    for (v, i) in [("10.9.0.0/24:*/tcp", 1u8), ("10.0.0.100:*/tcp", 2), ("10.0.0.101:80/tcp", 3)] {
        let v = v.parse().expect("vip");
        a.add_vip(v, lb_common::Algo::Maglev, 0).expect("vip");
        a.add_backend(&v, IpAddr::V4(Ipv4Addr::new(10, 0, 1, i)), Some(Mac([2, 0, 0, 0, 1, i])), 1).expect("backend");
    }
    let to = |d: [u8; 4], dport: u16| eth(ETH_IP, &[], &ipv4(CLIENT, d.into(), 6, &[], 0, &tcp(4000, dport, tcp_flags::SYN, b"")));
    let frames = [
        (to([10, 9, 0, 5], 22), Some("prefix")),
        (to([10, 9, 0, 255], 443), Some("prefix")),
        (to([10, 9, 1, 5], 22), None),
        (to([10, 0, 0, 100], 8080), Some("any-port")),
        (to([10, 0, 0, 100], 80), Some("any-port")),
        (to([10, 0, 0, 101], 80), None),
    ];
    for (vip, which) in [("10.9.0.0/24:*/tcp", "prefix"), ("10.0.0.100:*/tcp", "any-port")] {
        arm(&mut a, TraceRequest { vip: Some(vip.parse().expect("vip")), rate: Some(100_000), ..Default::default() });
        for (f, _) in &frames {
            run_prog(&mut a, PROG_TRACE, f);
        }
        let got: Vec<String> = lines(&mut a).into_iter().filter_map(|l| l.flow).collect();
        let want: Vec<String> = frames
            .iter()
            .filter(|(_, w)| *w == Some(which))
            .map(|(f, _)| format!("tcp 192.0.2.7:4000 > {}.{}.{}.{}:{}", f[30], f[31], f[32], f[33], u16::from_be_bytes([f[36], f[37]])))
            .collect();
        assert_eq!(got, want, "{vip}");
    }
}
