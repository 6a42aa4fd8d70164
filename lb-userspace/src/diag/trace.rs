//! `xlb trace`: frames sampled from the running datapath.
//!
//! The agent swaps its link to the tracing variant of the program
//! (`PROG_TRACE`, same maps) for as long as one client streams, and back
//! when the client has its N frames, closes (Ctrl-C) or is gone. Records come
//! through a BPF ring buffer, filtered and rate-limited in the program
//! (`lb_common::trace`). The client prints one line per frame and, with
//! `--pcap`, writes the frames as they arrived to a classic pcap file.
//! Frames for routed backends are recorded by `xlb_encap` (which the
//! tracing program tail-calls) as they were sent: outer headers first, with
//! the forwarding mode and the outer source and destination on their line.

use anyhow::{anyhow, bail, Context, Result};
use lb_common::{
    trace::{action_bit, TraceConfig, TraceRecord, TRACE_ANY_BACKEND, TRACE_SNAP},
    stats::verdicts,
    FlowKey, FAMILY_V6, PROTO_TCP, PROTO_UDP,
};
use serde::{Deserialize, Serialize};
use std::{
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{
    agent::Agent,
    config::{text, Vip},
};

/// Records per second per CPU by default, and the burst a CPU may send.
pub const DEFAULT_RATE: u32 = 1000;
const BURST: u64 = 64;
/// How often the agent empties the ring while a trace runs.
const POLL: Duration = Duration::from_millis(20);
/// Longest silence on a trace stream (see `stream`).
const KEEPALIVE: Duration = Duration::from_secs(1);

/// The verdicts a trace can be limited to: `tx`, `pass` or `drop` (XDP
/// aborted counts as drop). One `FromStr`/`Display` for the CLI and the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceVerdict {
    /// `XDP_TX` or `XDP_REDIRECT`: sent on.
    Tx,
    /// `XDP_PASS`: handed to the kernel.
    Pass,
    /// `XDP_DROP` or `XDP_ABORTED`.
    Drop,
}

impl TraceVerdict {
    /// The program's verdict bits it selects.
    fn bits(self) -> u8 {
        match self {
            // Sent on: back out (tx) or, routed, out another interface.
            TraceVerdict::Tx => action_bit(XDP_TX) | action_bit(XDP_REDIRECT),
            TraceVerdict::Pass => action_bit(XDP_PASS),
            TraceVerdict::Drop => action_bit(XDP_DROP) | action_bit(XDP_ABORTED),
        }
    }
}

impl std::str::FromStr for TraceVerdict {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tx" => Ok(TraceVerdict::Tx),
            "pass" => Ok(TraceVerdict::Pass),
            "drop" => Ok(TraceVerdict::Drop),
            other => bail!("unknown verdict '{other}' (tx, pass, drop)"),
        }
    }
}

impl std::fmt::Display for TraceVerdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TraceVerdict::Tx => "tx",
            TraceVerdict::Pass => "pass",
            TraceVerdict::Drop => "drop",
        })
    }
}

/// What a client asks to trace.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TraceRequest {
    /// Only frames for this VIP (`ADDR:PORT/PROTO`).
    #[serde(default, with = "text::opt")]
    pub vip: Option<Vip>,
    /// Only frames forwarded to this backend address.
    #[serde(default, with = "text::opt")]
    pub backend: Option<IpAddr>,
    /// Only frames with this verdict.
    #[serde(default, with = "text::opt")]
    pub verdict: Option<TraceVerdict>,
    /// Stop after this many frames.
    #[serde(default)]
    pub count: Option<u64>,
    /// Records per second per CPU at most.
    #[serde(default)]
    pub rate: Option<u32>,
}

/// The program's filter for a request, validated against the agent's
/// services (nothing is changed).
pub fn filter(agent: &Agent, req: &TraceRequest) -> Result<TraceConfig> {
    let all = [XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT].iter().fold(0, |m, a| m | action_bit(*a));
    let mut cfg = TraceConfig { backend_id: TRACE_ANY_BACKEND, verdicts: all, ..Default::default() };
    let vip = req.vip;
    if let Some(v) = &vip {
        if !agent.vips().contains_key(v) {
            bail!("no VIP {v}");
        }
        // Any-port and prefix VIPs: every destination their form covers.
        cfg.vip = v.key();
        cfg.vip_bits = v.prefix.map(u32::from).unwrap_or(0);
        cfg.match_vip = 1;
    }
    if let Some(ip) = req.backend {
        let ids: Vec<u32> = agent
            .vips()
            .iter()
            .filter(|(v, _)| vip.is_none_or(|w| **v == w))
            .filter_map(|(_, s)| s.backends.get(&ip).map(|b| b.id))
            .collect();
        cfg.backend_id = match ids[..] {
            [id] => id,
            [] => bail!("no backend {ip}{}", vip.map(|v| format!(" in {v}")).unwrap_or_default()),
            _ => bail!("backend {ip} serves several VIPs: give --vip"),
        };
    }
    if let Some(v) = req.verdict {
        cfg.verdicts = v.bits();
    }
    let rate = req.rate.unwrap_or(DEFAULT_RATE);
    if !(1..=1_000_000).contains(&rate) {
        bail!("trace rate {rate} out of range 1..=1000000 frames per second");
    }
    if req.count == Some(0) {
        bail!("--count must be at least 1");
    }
    cfg.cost_ns = 1_000_000_000 / rate as u64;
    cfg.burst_ns = cfg.cost_ns * BURST;
    Ok(cfg)
}

const XDP_ABORTED: u32 = 0;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

fn action_name(a: u32) -> &'static str {
    match a {
        XDP_ABORTED => "aborted",
        XDP_DROP => "drop",
        XDP_PASS => "pass",
        XDP_TX => "tx",
        XDP_REDIRECT => "redirect",
        _ => "?",
    }
}

/// One traced frame as the agent sends it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FrameLine {
    /// Wall-clock time, nanoseconds since the epoch.
    pub time_ns: u64,
    /// Interface it arrived on.
    pub iface: String,
    /// `tcp`/`udp` source → destination, when the frame parsed to a 5-tuple.
    pub flow: Option<String>,
    /// XDP action: tx, pass, drop, aborted.
    pub action: String,
    /// The verdict counter it incremented (the reason).
    pub verdict: String,
    /// Backend it was sent to.
    pub backend: Option<String>,
    /// How, for a routed backend: `ipip` or `gue` (`data` is then the
    /// frame as sent, encapsulated).
    #[serde(default)]
    pub forward: Option<String>,
    /// The outer header of an encapsulated frame: `SRC > DST` (GUE: with
    /// the UDP ports), from the frame as sent.
    #[serde(default)]
    pub outer: Option<String>,
    /// Frame length (as sent for a routed backend's frame).
    pub len: u32,
    /// Its first bytes as it arrived (a routed backend's: as sent), hex.
    pub data: String,
}

/// The outer header of an encapsulated frame as sent (`data` from its
/// Ethernet header): `SRC > DST`, with `udp SPORT > DPORT` for GUE.
pub fn outer_text(data: &[u8]) -> Option<String> {
    let (src, dst, proto, l4): (IpAddr, IpAddr, u8, usize) = match data.get(12..14)? {
        [0x08, 0x00] => {
            let h = data.get(14..34)?;
            let a = |i: usize| IpAddr::V4(Ipv4Addr::new(h[i], h[i + 1], h[i + 2], h[i + 3]));
            (a(12), a(16), h[9], 14 + 4 * (h[0] & 0xf) as usize)
        }
        [0x86, 0xdd] => {
            let h = data.get(14..54)?;
            let a = |i: usize| IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&h[i..i + 16]).unwrap_or_default()));
            (a(8), a(24), h[6], 54)
        }
        _ => return None,
    };
    let mut t = format!("{src} > {dst}");
    if proto == PROTO_UDP {
        let u = data.get(l4..l4 + 4)?;
        t += &format!(" udp {} > {}", u16::from_be_bytes([u[0], u[1]]), u16::from_be_bytes([u[2], u[3]]));
    }
    Some(t)
}

fn addr(k: &FlowKey, a: &[u8; 16]) -> IpAddr {
    if k.vip.family == FAMILY_V6 {
        IpAddr::V6(Ipv6Addr::from(*a))
    } else {
        IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
    }
}

fn sock(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// The flow as one string: `tcp 192.0.2.7:4000 > 10.0.0.100:80`.
pub fn flow_text(k: &FlowKey) -> String {
    let proto = match k.vip.proto {
        PROTO_TCP => "tcp".to_string(),
        PROTO_UDP => "udp".to_string(),
        p => format!("proto{p}"),
    };
    format!(
        "{proto} {} > {}",
        sock(addr(k, &k.src), u16::from_be(k.sport_be)),
        sock(addr(k, &k.vip.addr), u16::from_be(k.vip.port_be))
    )
}

fn ifname(index: u32) -> String {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes into `buf`.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return format!("if{index}");
    }
    let n = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime(2) into a valid timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A record as a line for the client (`wall_minus_mono`: the wall clock's
/// offset from the program's monotonic clock).
pub fn frame_line(agent: &Agent, r: &TraceRecord, wall_minus_mono: u64) -> FrameLine {
    let backend = (r.backend_id != TRACE_ANY_BACKEND)
        .then(|| {
            agent.vips().values().flat_map(|v| v.backends.values()).find(|b| b.id == r.backend_id).map(|b| b.ip.to_string())
        })
        .map(|ip| ip.unwrap_or_else(|| format!("id {}", r.backend_id)));
    let verdict = verdicts().find(|s| *s as u32 == r.stat).map(|s| s.name()).unwrap_or("?");
    let cap = (r.cap_len as usize).min(TRACE_SNAP);
    let forward = lb_common::Forward::from_u8(r.forward).filter(|f| f.is_routed());
    // Encapsulated only when it went on (a drop or a too-big answer is not).
    let sent = r.stat == lb_common::Stat::Forwarded as u32 || r.stat == lb_common::Stat::Redirected as u32;
    FrameLine {
        forward: forward.map(|f| f.name().to_string()),
        outer: forward.filter(|_| sent).and_then(|_| outer_text(&r.data[..cap])),
        time_ns: r.time_ns.wrapping_add(wall_minus_mono),
        iface: ifname(r.ifindex),
        flow: (r.has_key != 0).then(|| flow_text(&r.key)),
        action: action_name(r.action).into(),
        verdict: verdict.into(),
        backend,
        len: r.frame_len,
        data: r.data[..cap].iter().map(|b| format!("{b:02x}")).collect(),
    }
}

/// One line for a terminal.
pub fn render(f: &FrameLine) -> String {
    let secs = f.time_ns / 1_000_000_000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let routed = match (&f.forward, &f.outer) {
        (Some(fw), Some(o)) => format!(" by {fw} ({o})"),
        (Some(fw), None) => format!(" by {fw}"),
        _ => String::new(),
    };
    format!(
        "{h:02}:{m:02}:{s:02}.{:06} {} {} {} {}{}{routed} len {}",
        (f.time_ns % 1_000_000_000) / 1000,
        f.iface,
        f.flow.as_deref().unwrap_or("(no 5-tuple)"),
        f.action,
        f.verdict,
        f.backend.as_deref().map(|b| format!(" → {b}")).unwrap_or_default(),
        f.len
    )
}

/// A message of the trace stream after the first answer line.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StreamMsg {
    /// A frame.
    Frame(FrameLine),
    /// The trace ended: frames sent, and matching frames not recorded.
    End {
        /// Frames sent.
        frames: u64,
        /// Matching frames not recorded (rate limit or full ring).
        missed: u64,
    },
}

fn line<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    let mut l = serde_json::to_vec(v)?;
    l.push(b'\n');
    Ok(l)
}

/// Start a trace: check the request against the agent's services and swap
/// the tracing program in (nothing changes when it fails).
pub fn start(agent: &Mutex<Agent>, req: &TraceRequest) -> Result<()> {
    let mut a = agent.lock().map_err(|_| anyhow!("agent state poisoned"))?;
    let cfg = filter(&a, req)?;
    a.dp.trace_start(&cfg)?;
    log::info!("trace started: the tracing program runs on the interface");
    Ok(())
}

/// Send a started trace's records as lines into `tx` until `count` or until
/// the client is gone, then swap the balancer back in whatever happened.
pub async fn pump(tx: tokio::sync::mpsc::Sender<bytes::Bytes>, agent: Arc<Mutex<Agent>>, count: Option<u64>) {
    let streamed = stream(&tx, &agent, count).await;
    let stopped = agent.lock().map_err(|_| anyhow!("agent state poisoned")).and_then(|mut a| a.dp.trace_stop());
    log::info!("trace ended: the balancer runs on the interface again");
    match (stopped, streamed) {
        (Ok(missed), Ok(frames)) => {
            if let Ok(l) = line(&StreamMsg::End { frames, missed }) {
                let _ = tx.send(l.into()).await;
            }
        }
        (Err(e), _) => log::error!("cannot end the trace: {e:#}"),
        (Ok(_), Err(e)) => log::debug!("trace: {e:#}"),
    }
}

async fn stream(tx: &tokio::sync::mpsc::Sender<bytes::Bytes>, agent: &Arc<Mutex<Agent>>, count: Option<u64>) -> Result<u64> {
    let offset = clock_ns(libc::CLOCK_REALTIME).wrapping_sub(clock_ns(libc::CLOCK_MONOTONIC));
    let mut sent = 0u64;
    let mut quiet = std::time::Instant::now();
    loop {
        let out = {
            let mut a = agent.lock().map_err(|_| anyhow!("agent state poisoned"))?;
            let want = count.map(|c| (c - sent) as usize).unwrap_or(256).min(256);
            let recs = a.dp.trace_drain(want);
            let mut out = Vec::new();
            for r in &recs {
                out.extend(line(&StreamMsg::Frame(frame_line(&a, r, offset)))?);
            }
            sent += recs.len() as u64;
            out
        };
        // An empty line now and then while nothing matches: writing it is
        // how a client that went away is noticed.
        if !out.is_empty() || quiet.elapsed() >= KEEPALIVE {
            let out = if out.is_empty() { b"\n".to_vec() } else { out };
            tx.send(out.into()).await.map_err(|_| anyhow!("the trace client is gone"))?;
            quiet = std::time::Instant::now();
        }
        if count.is_some_and(|c| sent >= c) {
            return Ok(sent);
        }
        tokio::select! {
            _ = tx.closed() => bail!("the trace client closed the connection"),
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

/// A classic pcap file (microsecond timestamps, Ethernet), written a record
/// at a time and flushed, so an interrupted trace leaves a readable file.
pub struct PcapWriter<W: Write> {
    out: W,
}

impl<W: Write> PcapWriter<W> {
    /// Write the 24-byte file header.
    pub fn new(mut out: W) -> Result<PcapWriter<W>> {
        let mut h = Vec::with_capacity(24);
        h.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        h.extend_from_slice(&2u16.to_le_bytes());
        h.extend_from_slice(&4u16.to_le_bytes());
        h.extend_from_slice(&0i32.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&(TRACE_SNAP as u32).to_le_bytes());
        h.extend_from_slice(&1u32.to_le_bytes()); // LINKTYPE_ETHERNET
        out.write_all(&h).context("cannot write the pcap header")?;
        out.flush()?;
        Ok(PcapWriter { out })
    }

    /// One frame: its captured bytes, its length on the wire, its time.
    pub fn frame(&mut self, time_ns: u64, data: &[u8], orig_len: u32) -> Result<()> {
        let mut h = Vec::with_capacity(16 + data.len());
        h.extend_from_slice(&((time_ns / 1_000_000_000) as u32).to_le_bytes());
        h.extend_from_slice(&(((time_ns % 1_000_000_000) / 1000) as u32).to_le_bytes());
        h.extend_from_slice(&(data.len() as u32).to_le_bytes());
        h.extend_from_slice(&orig_len.max(data.len() as u32).to_le_bytes());
        h.extend_from_slice(data);
        self.out.write_all(&h).context("cannot write to the pcap file")?;
        self.out.flush().context("cannot write to the pcap file")
    }
}

/// Bytes of a `FrameLine`'s hex data.
pub fn frame_bytes(f: &FrameLine) -> Result<Vec<u8>> {
    if !f.data.len().is_multiple_of(2) {
        bail!("malformed frame data from the agent");
    }
    (0..f.data.len()).step_by(2).map(|i| u8::from_str_radix(&f.data[i..i + 2], 16).context("malformed frame data from the agent")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcap_layout_is_classic() {
        let mut buf = Vec::new();
        let mut p = PcapWriter::new(&mut buf).unwrap();
        p.frame(1_700_000_000_123_456_789, &[1, 2, 3], 60).unwrap();
        assert_eq!(&buf[..4], &[0xd4, 0xc3, 0xb2, 0xa1]);
        assert_eq!(buf.len(), 24 + 16 + 3);
        assert_eq!(u32::from_le_bytes(buf[24..28].try_into().unwrap()), 1_700_000_000);
        assert_eq!(u32::from_le_bytes(buf[28..32].try_into().unwrap()), 123_456);
        assert_eq!(u32::from_le_bytes(buf[32..36].try_into().unwrap()), 3);
        assert_eq!(u32::from_le_bytes(buf[36..40].try_into().unwrap()), 60);
    }

    #[test]
    fn flows_render_both_families() {
        let k = FlowKey::v4([192, 0, 2, 7], 4000u16.to_be(), [10, 0, 0, 100], 80u16.to_be(), PROTO_TCP);
        assert_eq!(flow_text(&k), "tcp 192.0.2.7:4000 > 10.0.0.100:80");
        let mut a = [0u8; 16];
        a[0] = 0xfd;
        a[15] = 7;
        let k = FlowKey::v6(a, 53u16.to_be(), a, 53u16.to_be(), PROTO_UDP);
        assert_eq!(flow_text(&k), "udp [fd00::7]:53 > [fd00::7]:53");
    }
}
