//! Live traffic: frames injected with BPF_PROG_RUN in live-frames mode
//! (`BPF_F_TEST_XDP_LIVE_FRAMES`) from a generator namespace over a veth into
//! the balancer's namespace, and counted when they come back.
//!
//! ```text
//!   [gen ns] g0 ──veth── l0 [lb ns]
//!   bench_gen (live frames, XDP_TX out of g0, a new source port per frame
//!   from a set of --flows) → l0: xlb (or the reflector) → XDP_TX → g0:
//!   bench_sink counts and drops.
//! ```
//!
//! The generator runs a bounded number of live frames (≤ 5 s) and transmits
//! `keep` of every 1024 (evenly spread), which sets the offered rate; the
//! balancer's own `forwarded` counter gives its forwarding rate, the sink
//! what arrived. The drop-free rate is the highest offered rate whose loss
//! is under 0.1 %, found by bisection on `keep` (1/128 of the generator's
//! rate apart at the end: integer divisors of the rate, as before, made a
//! mode that lost 0.2 % at full rate look half as fast). The reflector (MAC
//! swap + XDP_TX) on the same path, in the same run, is the reference.

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::PerCpuArray,
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
    EbpfLoader,
};
use serde::{Deserialize, Serialize};
use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use crate::{
    frames::{ipv4, tcp, tcp_flags::ACK, ETH_IP},
    lab::{self, sh},
};

/// What one generator run saw.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct GenReport {
    /// Frames injected.
    pub sent: u64,
    /// Frames that came back to the sink.
    pub received: u64,
    /// Seconds spent sending.
    pub seconds: f64,
}

/// Frames the kernel handles per batch inside one call (at most 256).
const BATCH: u32 = 64;
/// Most frames per BPF_PROG_RUN call. Each call costs about 25 ms of setup
/// and teardown (measured), so calls are large and the offered rate is set
/// in the kernel instead (`every`).
const FRAMES_PER_CALL: u64 = 1 << 22;

fn counter(ebpf: &aya::Ebpf, idx: u32) -> Result<u64> {
    let m: PerCpuArray<_, u64> = PerCpuArray::try_from(ebpf.map("BENCH_CNT").ok_or_else(|| anyhow!("no BENCH_CNT"))?)?;
    Ok(m.get(&idx, 0)?.iter().sum())
}

/// The generator (runs inside the generator namespace): attach the sink to
/// `iface`, run `runs` live frames, transmitting one in `every`, over
/// `flows` flows from source addresses 10.`block`.x.x, for at most `max_secs`.
#[allow(clippy::too_many_arguments)]
pub fn generate(floors: &str, iface: &str, dst_mac: [u8; 6], size: usize, runs: u64, keep: u32, flows: u32, block: u8, max_secs: f64) -> Result<GenReport> {
    let obj = std::fs::read(floors).with_context(|| format!("cannot read {floors}"))?;
    let mut ebpf = EbpfLoader::new()
        .override_global("BENCH_FLOWS", &flows, true)
        .override_global("BENCH_KEEP", &keep, true)
        .override_global("BENCH_DST_MAC", &{
            let mut m = [0u8; 8];
            m[..6].copy_from_slice(&dst_mac);
            m
        }, true)
        .load(&obj)?;
    for name in ["bench_gen", "bench_sink"] {
        let p: &mut Xdp = ebpf.program_mut(name).ok_or_else(|| anyhow!("no {name}"))?.try_into()?;
        p.load()?;
    }
    let sink: &mut Xdp = ebpf.program_mut("bench_sink").ok_or_else(|| anyhow!("no sink"))?.try_into()?;
    sink.attach(iface, XdpMode::Driver).with_context(|| format!("attach sink to {iface}"))?;
    let ifindex = std::fs::read_to_string(format!("/sys/class/net/{iface}/ifindex"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .ok_or_else(|| anyhow!("no ifindex for {iface}"))?;
    // A TCP segment of an established flow to the VIP, padded to `size`.
    let src_mac = [0x02, 0, 0, 0, 0, 0x99];
    let pad = size.saturating_sub(14 + 20 + 20);
    let l3 = ipv4(Ipv4Addr::new(10, block, 0, 2), lab::VIP, 6, &[], 0, &tcp(1024, 80, ACK, &vec![0u8; pad]));
    let mut frame = Vec::with_capacity(14 + l3.len());
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&ETH_IP.to_be_bytes());
    frame.extend_from_slice(&l3);
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    let gen: &Xdp = ebpf.program("bench_gen").ok_or_else(|| anyhow!("no gen"))?.try_into()?;
    let t0 = Instant::now();
    let mut done = 0u64;
    let limit = Duration::from_secs_f64(max_secs);
    while done < runs && t0.elapsed() < limit {
        let n = FRAMES_PER_CALL.min(runs - done) as u32;
        gen.test_run(TestRunOptions {
            data_in: Some(&frame),
            ctx_in: Some(&ctx),
            repeat: n,
            attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
            ..Default::default()
        })
        .context("BPF_PROG_RUN live frames")?;
        done += n as u64;
    }
    let seconds = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(300));
    Ok(GenReport { sent: counter(&ebpf, 2)?, received: counter(&ebpf, 1)?, seconds })
}

/// Generator runs per step (it transmits `keep` of every 1024 of them).
const RUNS_PER_STEP: u64 = 1 << 24;

/// Bisection steps below the generator's full rate (resolution 1/2^n).
const BISECT_STEPS: u32 = 7;

/// Loss under which an offered rate counts as drop-free.
const DROP_FREE_LOSS: f64 = 0.001;

/// One offered-rate step of one mode.
#[derive(Serialize, Debug, Clone)]
pub struct Step {
    /// Offered rate: frames the generator transmitted per second.
    pub offered_pps: f64,
    /// Achieved send rate.
    pub sent_pps: f64,
    /// Returned to the sink, per second.
    pub received_pps: f64,
    /// Forwarded per the balancer's counter, per second (xlb only).
    pub lb_forwarded_pps: Option<f64>,
    /// New connection-table entries per second per xlb's `conntrack_miss`
    /// counter (xlb only): proves the new-flow mix is new flows.
    pub lb_new_flows_pps: Option<f64>,
    /// Loss fraction.
    pub loss: f64,
}

/// Results for one mode (xlb or reflector).
#[derive(Serialize, Debug, Clone)]
pub struct Mode {
    /// "xlb" or "reflector".
    pub mode: String,
    /// Steps, fastest first.
    pub steps: Vec<Step>,
    /// Highest offered rate with loss < 0.1 %, frames/s.
    pub drop_free_pps: f64,
    /// Highest forwarding rate seen, frames/s.
    pub max_forwarded_pps: f64,
}

/// The whole live comparison.
#[derive(Serialize, Debug, Clone)]
pub struct Live {
    /// Frame size in bytes.
    pub frame_bytes: usize,
    /// Flows cycled through.
    pub flows: u32,
    /// Both modes.
    pub modes: Vec<Mode>,
    /// xlb drop-free rate ÷ reflector drop-free rate (target ≥ 0.8).
    pub ratio_drop_free: f64,
    /// xlb max forwarded ÷ reflector max forwarded.
    pub ratio_max: f64,
}

/// Namespaces for the live test; removed on drop.
struct Pair {
    gen: String,
    lb: String,
}

impl Drop for Pair {
    fn drop(&mut self) {
        lab::delete_ns(&self.gen);
        lab::delete_ns(&self.lb);
    }
}

fn mac_of(ns: &str, dev: &str) -> Result<[u8; 6]> {
    let out = sh("ip", &["netns", "exec", ns, "cat", &format!("/sys/class/net/{dev}/address")])?;
    let m: xlb::config::Mac = out.trim().parse().map_err(|_| anyhow!("bad MAC {out}"))?;
    Ok(m.0)
}

/// xlb's (forwarded, conntrack_miss) counters.
fn forwarded(xlb: &Path, socket: &Path) -> Result<(u64, u64)> {
    let out = std::process::Command::new(xlb).arg("--socket").arg(socket).args(["status", "--json"]).output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("status JSON")?;
    let c = &v["counters"];
    Ok((c["forwarded"].as_u64().unwrap_or(0), c["conntrack_miss"].as_u64().unwrap_or(0)))
}

/// Run the live comparison.
pub fn run(xlb: &Path, lab_bin: &Path, floors: &str, size: usize, flows: u32) -> Result<Live> {
    let tag = std::process::id() % 100_000;
    let pair = Pair { gen: format!("{}{tag}gen", lab::NS_PREFIX), lb: format!("{}{tag}lbl", lab::NS_PREFIX) };
    sh("ip", &["netns", "add", &pair.gen])?;
    sh("ip", &["netns", "add", &pair.lb])?;
    sh("ip", &["-n", &pair.gen, "link", "add", "g0", "type", "veth", "peer", "name", "l0", "netns", &pair.lb])?;
    for (ns, dev) in [(&pair.gen, "g0"), (&pair.lb, "l0")] {
        sh("ip", &["-n", ns, "link", "set", dev, "up"])?;
        sh("ip", &["-n", ns, "link", "set", "lo", "up"])?;
    }
    sh("ip", &["-n", &pair.lb, "addr", "add", "10.201.0.10/24", "dev", "l0"])?;
    let l0_mac = mac_of(&pair.lb, "l0")?;
    let dir = std::env::temp_dir().join(format!("xlb-live-{tag}"));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("xlb.sock");
    let config = dir.join("xlb.toml");
    let mut cfg = String::from("[health]\nkind = \"none\"\n\n[[vip]]\naddress = \"");
    cfg.push_str(&format!("{}:80/tcp\"\n", lab::VIP));
    for i in 1..=3 {
        cfg.push_str(&format!("[[vip.backend]]\nip = \"10.201.0.{}\"\nmac = \"02:00:00:00:01:0{i}\"\n", 20 + i));
    }
    std::fs::write(&config, cfg)?;
    // With every frame a new flow, each generator call sends from its own
    // 10.N/16 (a call must not replay an earlier call's flows: the table
    // would still hold them); established flows keep 10.201/16.
    let block = std::cell::Cell::new(0u8);
    let gen = |keep: u32, runs: u64| -> Result<GenReport> {
        block.set(if flows == 0 { block.get() % 200 + 1 } else { 201 });
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &pair.gen])
            .arg(lab_bin)
            .args(["gen", "--floors", floors, "--iface", "g0", "--dst-mac", &xlb::config::Mac(l0_mac).to_string()])
            .args(["--size", &size.to_string(), "--runs", &runs.to_string(), "--keep", &keep.to_string(), "--flows", &flows.to_string()])
            .args(["--source-block", &block.get().to_string()])
            .output()?;
        if !out.status.success() {
            bail!("generator failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        serde_json::from_slice(&out.stdout).context("generator report")
    };
    let mut modes = Vec::new();
    // With every frame a new flow, also the one-line floors in xlb's place:
    // what one random line per frame costs in a driver's loop rather than
    // in BPF_PROG_TEST_RUN's (the cost section's `floor_one_line`).
    let floors_too: &[&str] = if flows == 0 { &["floor_one_line", "floor_one_line_work"] } else { &[] };
    for mode in ["xlb", "reflector"].iter().chain(floors_too).copied() {
        // Every frame a new flow: the default table (1 Mi flows, 51 MiB),
        // so the line is as cold as `floor_one_line`'s; 1024 flows need
        // only a small one.
        let conntrack = if flows == 0 { lb_common::DEFAULT_CONNTRACK_SIZE } else { 65536 };
        let mut child = if mode == "xlb" {
            std::process::Command::new("ip")
                .args(["netns", "exec", &pair.lb])
                .arg(xlb)
                .arg("--socket")
                .arg(&socket)
                .args(["agent", "--iface", "l0", "--no-pin", "--conntrack-size", &conntrack.to_string(), "--config"])
                .arg(&config)
                .stderr(std::process::Stdio::null())
                .spawn()?
        } else {
            std::process::Command::new("ip")
                .args(["netns", "exec", &pair.lb])
                .arg(lab_bin)
                .args(["attach", "--floors", floors, "--prog", if mode == "reflector" { "floor_macswap_tx" } else { mode }, "--iface", "l0"])
                .spawn()?
        };
        let ready = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            sh("ip", &["-n", &pair.lb, "link", "show", "l0"]).map(|s| s.contains("xdp")).unwrap_or(false)
                && (mode != "xlb" || forwarded(xlb, &socket).is_ok())
        });
        if !ready {
            lab::terminate(&mut child);
            bail!("{mode} did not attach");
        }
        // Warm the flows (table entries), then the generator's full rate,
        // then bisection on the kept fraction for the drop-free rate.
        gen(1024, (flows as u64 * 4).max(4096))?;
        let mut steps = Vec::new();
        let mut step = |keep: u32| -> Result<bool> {
            let f0 = if mode == "xlb" { forwarded(xlb, &socket)? } else { (0, 0) };
            let r = gen(keep, RUNS_PER_STEP)?;
            let f1 = if mode == "xlb" {
                let (f, m) = forwarded(xlb, &socket)?;
                Some((f.saturating_sub(f0.0), m.saturating_sub(f0.1)))
            } else {
                None
            };
            let loss = 1.0 - r.received as f64 / r.sent.max(1) as f64;
            steps.push(Step {
                offered_pps: r.sent as f64 / r.seconds,
                sent_pps: r.sent as f64 / r.seconds,
                received_pps: r.received as f64 / r.seconds,
                lb_forwarded_pps: f1.map(|(f, _)| f as f64 / r.seconds),
                lb_new_flows_pps: f1.map(|(_, m)| m as f64 / r.seconds),
                loss,
            });
            Ok(loss < DROP_FREE_LOSS)
        };
        if !step(1024)? {
            // Drop-free somewhere in (lo, hi) of 1024.
            let (mut lo, mut hi) = (0u32, 1024u32);
            for _ in 0..BISECT_STEPS {
                let mid = (lo + hi) / 2;
                if mid == lo || mid == 0 {
                    break;
                }
                if step(mid)? {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
        }
        lab::terminate(&mut child);
        let drop_free = steps.iter().filter(|s| s.loss < DROP_FREE_LOSS).map(|s| s.offered_pps).fold(0.0, f64::max);
        let max_fwd = steps.iter().map(|s| s.received_pps).fold(0.0, f64::max);
        modes.push(Mode { mode: mode.into(), steps, drop_free_pps: drop_free, max_forwarded_pps: max_fwd });
    }
    let _ = std::fs::remove_dir_all(&dir);
    drop(pair);
    let ratio = |f: fn(&Mode) -> f64| f(&modes[0]) / f(&modes[1]).max(1.0);
    Ok(Live {
        frame_bytes: size.max(54),
        flows,
        ratio_drop_free: ratio(|m| m.drop_free_pps),
        ratio_max: ratio(|m| m.max_forwarded_pps),
        modes,
    })
}

/// `xlb-lab attach`: hold a floors program on an interface until SIGTERM;
/// for `floor_forward`, with its VIP and its ring filled with `macs` in turn.
pub fn attach(floors: &str, prog: &str, iface: &str, vip: Option<Ipv4Addr>, macs: &[[u8; 6]]) -> Result<()> {
    let obj = std::fs::read(floors)?;
    let vip = vip.map(|v| v.octets()).unwrap_or_default();
    let mut ebpf = EbpfLoader::new().override_global("FLOOR_VIP", &vip, true).load(&obj)?;
    if !macs.is_empty() {
        let mut ring: aya::maps::Array<_, [u8; 8]> =
            aya::maps::Array::try_from(ebpf.map_mut("FLOOR_RING").ok_or_else(|| anyhow!("no FLOOR_RING"))?)?;
        for i in 0..ring.len() {
            let mut e = [0u8; 8];
            e[..6].copy_from_slice(&macs[i as usize % macs.len()]);
            ring.set(i, e, 0)?;
        }
    }
    let p: &mut Xdp = ebpf.program_mut(prog).ok_or_else(|| anyhow!("no {prog}"))?.try_into()?;
    p.load()?;
    p.attach(iface, XdpMode::Driver)?;
    let (tx, rx) = std::sync::mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = tx.send(());
    })?;
    let _ = rx.recv();
    Ok(())
}
