//! `xlb flows` over the loaded program (BPF_PROG_TEST_RUN) with
//! `--flow-keys`: every new flow is listed with the backend the program
//! sent it to; filters and the bound hold; an entry whose key was not
//! written beside it (made without `--flow-keys`, or overwritten) is
//! counted, never listed. Needs root.

use std::net::{IpAddr, Ipv4Addr};
use xlb::{
    agent::{Agent, AgentOptions},
    config::{CheckKind, HealthConfig, Mac, Vip},
    diag::flows::{flows, FlowsRequest},
    maps::{Datapath, LoadOptions},
};
use xlb_tests::{
    frames::{eth, ipv4, tcp, tcp_flags, ETH_IP, LB_MAC},
    xdp::{run, XDP_TX},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);

fn keyed_agent() -> Agent {
    let dp = Datapath::load(LoadOptions { max_vips: 8, conntrack_size: 65536, flow_keys: true, ..Default::default() })
        .expect("the XDP program loads (run the tests as root)");
    let health = HealthConfig { kind: CheckKind::None, ..Default::default() };
    Agent::new(dp, AgentOptions { iface_mac: Mac(LB_MAC), accept_macs: Vec::new(), health }).expect("agent")
}

#[test]
fn flows_lists_each_new_flow_with_the_backend_the_program_chose() {
    let mut a = keyed_agent();
    let vips: [Vip; 2] = ["10.0.0.100:80/tcp".parse().expect("vip"), "10.0.0.101:80/tcp".parse().expect("vip")];
    for (n, v) in vips.iter().enumerate() {
        a.add_vip(*v, lb_common::Algo::Maglev, 0).expect("vip");
        for i in 1..=3u8 {
            let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 1 + n as u8, i));
            a.add_backend(v, ip, Some(Mac([2, 0, 0, 0, 1 + n as u8, i])), 1).expect("backend");
        }
    }
    let mut sent = Vec::new();
    for (n, v) in vips.iter().enumerate() {
        let dst = Ipv4Addr::new(10, 0, 0, 100 + n as u8);
        for p in 3000..3030u16 {
            let f = eth(ETH_IP, &[], &ipv4(CLIENT, dst, 6, &[], 0, &tcp(p, 80, tcp_flags::SYN, b"")));
            let (action, out, _) = run(&mut a.dp, &f);
            assert_eq!(action, XDP_TX);
            let b = a.vips()[v].backends.values().find(|b| b.mac.map(|m| m.0[..] == out[..6]).unwrap_or(false)).expect("backend");
            sent.push((format!("tcp {CLIENT}:{p} > {dst}:80"), *v, b.ip.to_string()));
        }
    }
    let all = flows(&a, &FlowsRequest { limit: Some(1000), ..Default::default() }).expect("flows");
    assert!(all.keys);
    assert_eq!((all.matched, all.unkeyed, all.flows.len()), (60, 0, 60));
    for (flow, v, backend) in &sent {
        let f = all.flows.iter().find(|f| &f.flow == flow).unwrap_or_else(|| panic!("{flow} not listed"));
        assert_eq!((f.backend.as_deref(), f.vip.clone()), (Some(backend.as_str()), Some(v.to_string())), "{flow}");
        assert!(f.valid && !f.closed);
    }
    assert!(all.flows.windows(2).all(|w| w[0].age_ms <= w[1].age_ms), "most recently seen first");
    // The datapath stamps entries from the jiffies counter, the agent reads
    // them against CLOCK_MONOTONIC_COARSE: the two must agree (an offset
    // would show as ages of minutes or hours, a wrong tick as ages that
    // grow at the wrong rate).
    let newest = all.flows.iter().map(|f| f.age_ms).max().expect("flows");
    assert!(newest <= 120, "flows sent just now are {newest} ms old by the agent's clock");
    std::thread::sleep(std::time::Duration::from_millis(600));
    let later = flows(&a, &FlowsRequest { limit: Some(1000), ..Default::default() }).expect("flows");
    for f in &later.flows {
        assert!((540..=800).contains(&f.age_ms), "{}: {} ms old after 600 ms", f.flow, f.age_ms);
    }
    let one = flows(&a, &FlowsRequest { vip: Some(vips[1]), limit: Some(1000), ..Default::default() }).expect("flows");
    assert_eq!(one.matched, 30);
    assert!(one.flows.iter().all(|f| f.vip == Some(vips[1].to_string())));
    let b = &sent[0].2;
    let on_b = flows(&a, &FlowsRequest { backend: Some(b.parse().expect("backend")), limit: Some(1000), ..Default::default() }).expect("flows");
    assert_eq!(on_b.matched as usize, sent.iter().filter(|s| &s.2 == b).count());
    let few = flows(&a, &FlowsRequest { limit: Some(5), ..Default::default() }).expect("flows");
    assert_eq!((few.matched, few.flows.len()), (60, 5));
    assert!(flows(&a, &FlowsRequest { limit: Some(0), ..Default::default() }).is_err());
    assert!(flows(&a, &FlowsRequest { vip: Some("10.9.9.9:80/tcp".parse().expect("vip")), ..Default::default() }).is_err());

    // An entry made without its key beside it (as by an agent without
    // --flow-keys): counted, not listed.
    let v = vips[0];
    let be = a.vips()[&v].backends.values().next().expect("backend").clone();
    let key = lb_common::FlowKey::v4(CLIENT.octets(), 9999u16.to_be(), [10, 0, 0, 100], 80u16.to_be(), lb_common::PROTO_TCP);
    let seed = a.dp.conntrack_seed();
    a.dp.conntrack_view().expect("view").insert(&seed, &key, be.id, be.gen);
    let after = flows(&a, &FlowsRequest { limit: Some(1000), ..Default::default() }).expect("flows");
    assert_eq!((after.matched, after.unkeyed), (60, 1));
    assert!(!after.flows.iter().any(|f| f.flow.contains(":9999 ")));
}
