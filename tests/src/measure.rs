//! `cargo xtask measure-conntrack`: the per-packet cost of the shared and the
//! per-CPU connection table, measured with BPF_PROG_TEST_RUN on two builds of
//! the same program, in one run. Established flows: one frame repeated (every
//! run a table hit, checked from the program's counters); new flows: a new
//! 5-tuple per run (repeat 1 over many frames, every run an insert).

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{Array, HashMap, PerCpuArray},
    programs::{TestRun, TestRunOptions, Xdp},
    EbpfLoader,
};
use lb_common::{map_names, BackendInfo, Stat, StatBlock, VipInfo, BACKEND_F_ALIVE, DEFAULT_RING_SIZE, PROG_XLB};
use std::net::Ipv4Addr;

use crate::frames::{tcp4, LB_MAC};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const REPEAT: u32 = 2_000_000;
const NEW_FLOWS: u16 = 60_000;

/// ns per packet for (established, new flow).
fn measure(path: &str) -> Result<(f64, f64)> {
    let obj = std::fs::read(path).with_context(|| format!("cannot read {path}"))?;
    let mut ebpf = EbpfLoader::new().load(&obj).context("load")?;
    let prog: &mut Xdp = ebpf.program_mut(PROG_XLB).ok_or_else(|| anyhow!("no program"))?.try_into()?;
    prog.load().context("verifier")?;
    let vip: lb_common::VipKey = "10.0.0.100:80/tcp".parse::<xlb::config::Vip>()?.key();
    let mut vips: HashMap<_, lb_common::VipKey, VipInfo> =
        HashMap::try_from(ebpf.map_mut(map_names::VIPS).ok_or_else(|| anyhow!("no VIP map"))?)?;
    vips.insert(vip, VipInfo { vip_id: 0, ring_off: 0, ring_size: DEFAULT_RING_SIZE, algo: 0, flags: 0, persist_secs: 0 }, 0)?;
    let mut filter: Array<_, u32> =
        Array::try_from(ebpf.map_mut(map_names::VIP_FILTER).ok_or_else(|| anyhow!("no VIP filter"))?)?;
    filter.set(lb_common::vip_filter_index(&vip.addr, vip.family), 1, 0)?;
    let mut backends: Array<_, BackendInfo> =
        Array::try_from(ebpf.map_mut(map_names::BACKENDS).ok_or_else(|| anyhow!("no backend map"))?)?;
    backends.set(1, BackendInfo { dst_mac: [2, 0, 0, 0, 0, 1], src_mac: LB_MAC, flags: BACKEND_F_ALIVE, gen: 1, weight: 1, vip_id: 0 }, 0)?;
    let mut rings: Array<_, u32> = Array::try_from(ebpf.map_mut(map_names::RINGS).ok_or_else(|| anyhow!("no ring map"))?)?;
    for i in 0..DEFAULT_RING_SIZE {
        rings.set(i, 1, 0)?;
    }
    let stats = |ebpf: &aya::Ebpf| -> Result<[u64; lb_common::stats::STAT_COUNT as usize]> {
        let m: PerCpuArray<_, StatBlock> = PerCpuArray::try_from(ebpf.map(map_names::STATS).ok_or_else(|| anyhow!("no stats"))?)?;
        let mut out = [0u64; lb_common::stats::STAT_COUNT as usize];
        for b in m.get(&0, 0)?.iter() {
            for (o, v) in out.iter_mut().zip(b.c.iter()) {
                *o += v;
            }
        }
        Ok(out)
    };
    let prog: &Xdp = ebpf.program(PROG_XLB).ok_or_else(|| anyhow!("no program"))?.try_into()?;
    let run = |frame: &[u8], repeat: u32| -> Result<(u32, u64)> {
        let mut out = vec![0u8; frame.len() + 256];
        let r = prog.test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), repeat, ..Default::default() })?;
        Ok((r.return_value, r.duration.as_nanos() as u64))
    };
    // Established: one insert, then REPEAT hits (twice, keep the faster).
    let frame = tcp4(CLIENT, 1234, VIP, 80);
    run(&frame, 1)?;
    let before = stats(&ebpf)?;
    let mut est = f64::MAX;
    for _ in 0..2 {
        let (ret, ns) = run(&frame, REPEAT)?;
        if ret != 3 {
            bail!("established frame not forwarded ({ret})");
        }
        est = est.min(ns as f64);
    }
    let after = stats(&ebpf)?;
    let hits = after[Stat::CtHit as usize] - before[Stat::CtHit as usize];
    if hits != 2 * REPEAT as u64 {
        bail!("expected {} table hits, counted {hits}", 2 * REPEAT);
    }
    // New flows: a new source port every run.
    let before = stats(&ebpf)?;
    let mut total = 0u64;
    for p in 0..NEW_FLOWS {
        let (ret, ns) = run(&tcp4(Ipv4Addr::new(192, 0, 3, (p % 250) as u8), 10000 + p, VIP, 80), 1)?;
        if ret != 3 {
            bail!("new flow not forwarded");
        }
        total += ns;
    }
    let after = stats(&ebpf)?;
    let misses = after[Stat::CtMiss as usize] - before[Stat::CtMiss as usize];
    if misses != NEW_FLOWS as u64 {
        bail!("expected {NEW_FLOWS} table misses, counted {misses}");
    }
    Ok((est, total as f64 / NEW_FLOWS as f64))
}

/// Measure both builds and print the comparison.
pub fn run(shared: &str, percpu: &str) -> Result<()> {
    let (se, sn) = measure(shared).context("shared table")?;
    let (pe, pn) = measure(percpu).context("per-CPU table")?;
    println!("connection table   established ns/pkt   new flow ns/pkt");
    println!("shared (LRU_HASH)  {se:>20.1}   {sn:>15.1}");
    println!("per-CPU (LRU_PERCPU_HASH) {pe:>13.1}   {pn:>15.1}");
    println!("(established: kernel average over {REPEAT} runs, best of 2; new flow: mean of {NEW_FLOWS} single runs, includes the per-call overhead)");
    Ok(())
}
