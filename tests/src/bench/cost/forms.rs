//! `cargo xtask bench vipforms`: the VIP forms' paths and the QUIC path.

use super::*;

/// The QUIC path (part of `vipforms`): a plain UDP VIP's established and
/// new flows before and after a `--quic` VIP is added elsewhere (the same
/// agent, the same run), then the `--quic` VIP's established flows, new
/// flows routed by their connection ID, and Initials (hashed).
fn quic(fl: &mut Floors, a: &mut Agent, backends: &[(IpAddr, Option<Mac>, u32)], floor_ns: &dyn Fn(&str) -> f64) -> Result<Vec<Case>> {
    use lb_common::quic::encode_cid;
    const UDP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 104);
    const QUIC: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 105);
    let short = crate::frames::quic::short(&encode_cid::<8>(2, &[1, 2, 3, 4, 5]));
    let initial = crate::frames::quic::initial(&[0x77; 8]);
    let to = |src: Ipv4Addr, sport: u16, dst: Ipv4Addr, payload: &[u8]| eth(ETH_IP, &[], &ipv4(src, dst, 17, &[], 0, &udp(sport, 443, payload)));
    let mut out = Vec::new();
    let measure = |a: &mut Agent, case: &str, frame: &[u8], proof: Stat| -> Result<Case> {
        crate::xdp::run(&mut a.dp, frame);
        let before = stat(a, proof)?;
        let r = repeat_cost(a.dp.program(PROG_XLB)?, frame, 3)?;
        let moved = stat(a, proof)? - before;
        if moved != RUNS as u64 * 3 * N as u64 {
            bail!("{case}: counter {} moved {moved}", proof.name());
        }
        Ok(Case::new(case, 3, "empty", r, "floor_stateless_dsr", floor_ns, format!("{} +{moved} = {RUNS} runs × 3N", proof.name())))
    };
    let plain: Vip = format!("{UDP}:443/udp").parse()?;
    a.add_vip(plain, Algo::Maglev, 0)?;
    a.add_backends(&plain, backends)?;
    let udp_est = to(CLIENT, 40006, UDP, &short);
    out.push(measure(a, "udp_established (no --quic VIP)", &udp_est, Stat::CtHit)?);
    // Each new-flow case its own sources (102.x, 103.x, …): never a hit.
    let mut first_octet = 101u8;
    let mut new_flows = |a: &mut Agent, case: &str, dst: Ipv4Addr, payload: &[u8], event: Option<Stat>| -> Result<Case> {
        first_octet += 1;
        let src = first_octet;
        let ev0 = event.map(|e| stat(a, e)).transpose()?;
        let (miss0, fwd0) = (stat(a, Stat::CtMiss)?, stat(a, Stat::Forwarded)?);
        let fd = a.dp.program(PROG_XLB)?.fd()?.try_clone()?;
        let frame = |run: u8| to(Ipv4Addr::new(src, 64 + 4 * run, 0, 0), 5555, dst, payload);
        let (ns, spread) = fl.warm_new_flows(&fd, &frame, NEW_FLOW_REPEAT, 3)?;
        let want = RUNS as u64 * NEW_FLOW_REPEAT as u64;
        let (misses, fwd) = (stat(a, Stat::CtMiss)? - miss0, stat(a, Stat::Forwarded)? - fwd0);
        let events = match (event, ev0) {
            (Some(e), Some(b)) => Some((e, stat(a, e)? - b)),
            _ => None,
        };
        if misses != want || fwd != want || events.is_some_and(|(_, n)| n != want) {
            bail!("{case}: {misses} misses, {fwd} forwards, {events:?} for {want} new flows");
        }
        let proof = events.map_or(String::new(), |(e, n)| format!(", {} +{n}", e.name()));
        Ok(Case::new(case, 3, "empty", (ns, spread, ns), "floor_one_line", floor_ns, format!("conntrack_miss +{misses}, forwarded +{fwd}{proof}")))
    };
    out.push(new_flows(a, "udp_new_flow (no --quic VIP)", UDP, &short, None)?);
    // A --quic VIP on another address, backends with server IDs 1..=3.
    let q: Vip = format!("{QUIC}:443/udp").parse()?;
    let quic_opts = xlb::config::VipOpts { quic: true, ..Default::default() };
    a.add_vip_spec(q, &xlb::agent::VipSpec { opts: quic_opts, ..Default::default() })?;
    for (i, (ip, mac, w)) in backends.iter().enumerate() {
        a.add_backend_full(&q, (*ip, *mac, *w), None, None, Some(xlb::quic::ServerId(i as u16 + 1)))?;
    }
    let udp_est2 = to(CLIENT, 40008, UDP, &short);
    out.push(measure(a, "udp_established (a --quic VIP elsewhere)", &udp_est2, Stat::CtHit)?);
    out.push(new_flows(a, "udp_new_flow (a --quic VIP elsewhere)", UDP, &short, None)?);
    let quic_est = to(CLIENT, 40007, QUIC, &short);
    out.push(measure(a, "quic_established", &quic_est, Stat::CtHit)?);
    out.push(new_flows(a, "quic_new_flow_routed (by server ID)", QUIC, &short, Some(Stat::QuicRouted))?);
    out.push(new_flows(a, "quic_new_flow_initial (hashed)", QUIC, &initial, Some(Stat::QuicNoId))?);
    Ok(out)
}

/// Rounds of the interleaved none / every-feature comparison.
const INTERLEAVED_ROUNDS: usize = 5;

/// `cargo xtask bench vipforms`: the VIP forms' paths (any-port VIPs,
/// `--hash dst-port`, `--answer-ping`) and, in the same run, non-VIP and
/// established traffic with none of them configured and with them
/// configured on other addresses (3 backends, table empty).
pub fn vip_forms(fl: &mut Floors, floor_ns: &dyn Fn(&str) -> f64) -> Result<Vec<Case>> {
    const ANY: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 101);
    const DPORT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 102);
    const PING: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 103);
    let nonvip = eth(ETH_IP, &[], &ipv4(CLIENT, Ipv4Addr::new(10, 0, 0, 99), 6, &[], 0, &tcp(1234, 80, ACK, b"x")));
    let est4 = v4_tcp(40000, ACK);
    let any_est = eth(ETH_IP, &[], &ipv4(CLIENT, ANY, 6, &[], 0, &tcp(40003, 8080, ACK, b"0123456789")));
    let dport_est = eth(ETH_IP, &[], &ipv4(CLIENT, DPORT, 6, &[], 0, &tcp(40004, 8443, ACK, b"0123456789")));
    let mut out = Vec::new();
    let mut push = |case: &str, ct: &str, r: (f64, [f64; 2], f64), floor: &str, verified: String| {
        out.push(Case::new(case, 3, ct, r, floor, floor_ns, verified));
    };
    // A steady case: warm once, then N/2N; the counter proves the path.
    /// (median, spread, kernel average) and what the counters proved.
    type Measured = ((f64, [f64; 2], f64), String);
    let steady = |a: &mut Agent, frame: &[u8], want: u32, proof: Stat| -> Result<Measured> {
        crate::xdp::run(&mut a.dp, frame);
        let before = stat(a, proof)?;
        let r = repeat_cost(a.dp.program(PROG_XLB)?, frame, want)?;
        let moved = stat(a, proof)? - before;
        let expect = RUNS as u64 * 3 * N as u64;
        if moved != expect {
            bail!("counter {} moved {moved}, expected {expect}", proof.name());
        }
        Ok((r, format!("{} +{moved} = {RUNS} runs × 3N", proof.name())))
    };
    // 1. Nothing but the exact VIP 10.0.0.100:80/tcp.
    let mut plain = agent("10.0.0.100:80/tcp", 3)?;
    for (case, frame, want, floor, proof) in [
        ("nonvip_pass (no VIP forms)", &nonvip, 2, "floor_pass", Stat::PassNotVip),
        ("v4_tcp_established (no VIP forms)", &est4, 3, "floor_stateless_dsr", Stat::CtHit),
    ] {
        let (r, v) = steady(&mut plain, frame, want, proof).with_context(|| case.to_string())?;
        push(case, "empty", r, floor, v);
    }
    drop(plain);
    // 2. The same plus an any-port VIP, a dst-port VIP and an answering VIP.
    let mut a = agent("10.0.0.100:80/tcp", 3)?;
    let backends: Vec<(IpAddr, Option<Mac>, u32)> = a.vips().values().flat_map(|s| s.backends.values().map(|b| (b.ip, b.mac, 1))).collect();
    // An any-port VIP, a dst-port VIP and an answering VIP, same backends.
    let add_forms = |ag: &mut Agent| -> Result<()> {
        for (v, opts) in [
            ("10.0.0.101:*/tcp", xlb::config::VipOpts::default()),
            ("10.0.0.102:*/tcp", xlb::config::VipOpts { hash: xlb::config::HashMode::DstPort, ..Default::default() }),
            ("10.0.0.103:80/tcp", xlb::config::VipOpts { answer_ping: true, ..Default::default() }),
        ] {
            let v: Vip = v.parse()?;
            ag.add_vip_spec(v, &xlb::agent::VipSpec { opts, ..Default::default() })?;
            ag.add_backends(&v, &backends)?;
        }
        Ok(())
    };
    add_forms(&mut a)?;
    for (case, frame, want, floor, proof) in [
        ("nonvip_pass (VIP forms elsewhere)", &nonvip, 2, "floor_pass", Stat::PassNotVip),
        ("v4_tcp_established (VIP forms elsewhere)", &est4, 3, "floor_stateless_dsr", Stat::CtHit),
        ("any_port_established", &any_est, 3, "floor_stateless_dsr", Stat::CtHit),
        ("dst_port_established", &dport_est, 3, "floor_stateless_dsr", Stat::CtHit),
    ] {
        let (r, v) = steady(&mut a, frame, want, proof).with_context(|| case.to_string())?;
        push(case, "empty", r, floor, v);
    }
    // New flows to the any-port and dst-port VIPs (warm method).
    for (case, dst, port) in [("any_port_new_flow", ANY, 8080u16), ("dst_port_new_flow", DPORT, 8443)] {
        let (miss0, fwd0) = (stat(&a, Stat::CtMiss)?, stat(&a, Stat::Forwarded)?);
        let fd = a.dp.program(PROG_XLB)?.fd()?.try_clone()?;
        let frame = |run: u8| eth(ETH_IP, &[], &ipv4(Ipv4Addr::new(101, 64 + 4 * run, 0, 0), dst, 6, &[], 0, &tcp(5555, port, SYN, b"")));
        let (ns, spread) = fl.warm_new_flows(&fd, &frame, NEW_FLOW_REPEAT, 3)?;
        let want = RUNS as u64 * NEW_FLOW_REPEAT as u64;
        let (misses, fwd) = (stat(&a, Stat::CtMiss)? - miss0, stat(&a, Stat::Forwarded)? - fwd0);
        if misses != want || fwd != want {
            bail!("{case}: {misses} misses, {fwd} forwards for {want} new flows");
        }
        push(case, "empty", (ns, spread, ns), "floor_one_line", format!("conntrack_miss +{misses}, forwarded +{fwd}"));
    }
    // QUIC (before prefix VIPs, which change the non-VIP path).
    let quic_cases = quic(fl, &mut a, &backends, floor_ns)?;
    // 3. Prefix VIPs: the gate opens; non-VIP traffic pays a trie miss.
    let prefix: Vip = "10.5.0.0/16:*/tcp".parse()?;
    a.add_vip(prefix, Algo::Maglev, 0)?;
    a.add_backends(&prefix, &backends)?;
    let prefix_est = eth(ETH_IP, &[], &ipv4(CLIENT, Ipv4Addr::new(10, 5, 1, 2), 6, &[], 0, &tcp(40005, 8080, ACK, b"0123456789")));
    for (case, frame, want, floor, proof) in [
        ("nonvip_pass (prefix VIPs configured)", &nonvip, 2, "floor_pass", Stat::PassNotVip),
        ("prefix_established", &prefix_est, 3, "floor_stateless_dsr", Stat::CtHit),
    ] {
        let (r, v) = steady(&mut a, frame, want, proof).with_context(|| case.to_string())?;
        push(case, "empty", r, floor, v);
    }
    // 4. And a routed VIP (IPIP; no traffic to it): every #13 feature is
    // configured, the L2 VIP's established flows and non-VIP traffic must
    // not notice (non-VIP traffic pays the trie lookup of prefix VIPs).
    let add_routed = |ag: &mut Agent| -> Result<()> {
        ag.dp.set_encap(&xlb::encap::encap_config(&["10.210.0.0/24".into()], lb_common::DEFAULT_GUE_PORT)?)?;
        let routed: Vip = "10.0.0.104:80/tcp".parse()?;
        ag.add_vip_spec(routed, &xlb::agent::VipSpec { forward: lb_common::Forward::Ipip, ..Default::default() })?;
        ag.add_backend(&routed, "10.220.0.1".parse()?, None, 1)?;
        Ok(())
    };
    add_routed(&mut a)?;
    // Same run, interleaved (the machine's load drifts between sections):
    // fresh agents with none of the features, and with all but prefix VIPs
    // (the only one non-VIP traffic may pay for), against this one, round
    // by round; each figure the median of its rounds.
    let mut none = agent("10.0.0.100:80/tcp", 3)?;
    let mut no_prefix = agent("10.0.0.100:80/tcp", 3)?;
    add_forms(&mut no_prefix)?;
    add_routed(&mut no_prefix)?;
    const CONFIGS: [&str; 3] = ["none configured", "every #13 feature but prefix VIPs", "every #13 feature"];
    // rounds[r][2 * config + (0 non-VIP, 1 established)]
    let mut rounds: Vec<[f64; 6]> = Vec::new();
    for _ in 0..INTERLEAVED_ROUNDS {
        let mut r = [0.0; 6];
        for (i, slot) in r.iter_mut().enumerate() {
            let ag = match i / 2 {
                0 => &mut none,
                1 => &mut no_prefix,
                _ => &mut a,
            };
            let (frame, want, proof) = if i % 2 == 0 { (&nonvip, 2, Stat::PassNotVip) } else { (&est4, 3, Stat::CtHit) };
            *slot = steady(ag, frame, want, proof).context("interleaved rounds")?.0 .0;
        }
        rounds.push(r);
    }
    let median = |i: usize| {
        let mut v: Vec<f64> = rounds.iter().map(|r| r[i]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let spread = |i: usize| [rounds.iter().map(|r| r[i]).fold(f64::INFINITY, f64::min), rounds.iter().map(|r| r[i]).fold(0.0, f64::max)];
    let per_round = |i: usize, j: usize| rounds.iter().map(|r| format!("{:.2}", r[j] / r[i])).collect::<Vec<_>>().join(", ");
    for i in 0..6 {
        let (name, floor) = if i % 2 == 0 { ("nonvip_pass", "floor_pass") } else { ("v4_tcp_established", "floor_stateless_dsr") };
        let case = format!("{name} ({}, interleaved)", CONFIGS[i / 2]);
        let proof = if i >= 2 {
            format!("{INTERLEAVED_ROUNDS} rounds; ÷ none configured per round: {}", per_round(i % 2, i))
        } else {
            format!("{INTERLEAVED_ROUNDS} rounds, median")
        };
        push(&case, "empty", (median(i), spread(i), median(i)), floor, proof);
    }
    // Echo replies: the reply is no request, so one syscall per frame (as
    // the cold new-flow method), the call overhead calibrated on floor_pass.
    let echoes: Vec<Vec<u8>> = (0..NEW_FLOWS)
        .map(|i| eth(ETH_IP, &[], &ipv4(CLIENT, PING, 1, &[], 0, &crate::frames::icmp_echo(8, i as u16, 1, &[0x5a; 56]))))
        .collect();
    let before = stat(&a, Stat::EchoReplied)?;
    let total = loop_cost(a.dp.program(PROG_XLB)?, &echoes, 3)?;
    let pass_total = loop_cost(fl.prog("floor_pass")?, &echoes, 2)?;
    let replied = stat(&a, Stat::EchoReplied)? - before;
    if replied != NEW_FLOWS as u64 {
        bail!("echo: {replied} replies for {NEW_FLOWS} requests");
    }
    let ns = (total - pass_total) / NEW_FLOWS as f64 + floor_ns("floor_pass");
    push("echo_reply_cold", "-", (ns, [ns, ns], total / NEW_FLOWS as f64), "floor_stateless_dsr_new_flows_cold", format!("echo_replied +{replied}; one syscall per frame"));
    out.extend(quic_cases);
    Ok(out)
}
