//! Heartbeats: the scheduler that runs every due health job (a TCP connect,
//! an HTTP GET, a UDP exchange or an agent check: one per target, however
//! many VIPs share it), probes addresses whose MAC is unknown, and reports
//! outcomes to the agent, which applies rise/fall for every VIP using the
//! target and publishes each changed VIP once per batch of results.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    task::JoinSet,
};

use crate::{
    agent::{Agent, CheckJob, CheckOutcome, Probe},
    config::CheckKind,
    neigh,
};

/// How often probes, slow start and state-file saves run (and due jobs are
/// looked for, besides the timer set to the earliest one).
const TICK: Duration = Duration::from_millis(20);

/// Run health jobs forever: each job starts when it is due (a timer set to
/// the earliest), probes, slow start and saves run every `TICK`.
pub async fn run(agent: Arc<Mutex<Agent>>) {
    let mut running = JoinSet::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut due_at = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let (probes, save) = match agent.lock() {
                    Ok(mut a) => {
                        if let Err(e) = a.tick(Instant::now()) {
                            log::error!("slow start: {e:#}");
                        }
                        (a.due_probes(Instant::now()), a.take_save())
                    }
                    Err(_) => return,
                };
                // At most one state-file save per tick, written outside the lock.
                if let Some(s) = save {
                    tokio::task::spawn_blocking(move || s.write());
                }
                for ip in probes {
                    neigh::probe(ip);
                }
                let Some(next) = start_due(&agent, &mut running) else { return };
                due_at = next;
            }
            _ = tokio::time::sleep_until(due_at) => {
                let Some(next) = start_due(&agent, &mut running) else { return };
                due_at = next;
            }
            Some(done) = running.join_next() => {
                // Take every result that is ready, then publish once.
                let mut batch = vec![done];
                while let Some(more) = running.try_join_next() {
                    batch.push(more);
                }
                {
                    let Ok(mut a) = agent.lock() else { return };
                    for (job, out) in batch.into_iter().filter_map(Result::ok) {
                        if let Err(e) = a.report(&job, out) {
                            log::error!("applying the health of {} failed: {e:#}", job.target.ip);
                        }
                    }
                    if let Err(e) = a.publish_dirty() {
                        log::error!("publishing health changes failed: {e:#}");
                    }
                }
                let Some(next) = start_due(&agent, &mut running) else { return };
                due_at = next;
            }
        }
    }
}

/// Start every due job; returns when the next one is due (at the latest a
/// tick from now: jobs change with the services), or none if the agent's
/// lock is poisoned.
fn start_due(agent: &Mutex<Agent>, running: &mut JoinSet<(CheckJob, CheckOutcome)>) -> Option<tokio::time::Instant> {
    let (jobs, next) = {
        let mut a = agent.lock().ok()?;
        let now = Instant::now();
        let jobs = a.due_checks(now);
        (jobs, a.next_check_due())
    };
    for job in jobs {
        running.spawn(async move {
            let out = check(&job).await;
            (job, out)
        });
    }
    let later = tokio::time::Instant::now() + TICK;
    Some(next.map_or(later, |n| tokio::time::Instant::from_std(n).min(later)))
}

/// Run one job.
pub async fn check(job: &CheckJob) -> CheckOutcome {
    let t0 = Instant::now();
    let ip = job.target.ip;
    let timed_out = || format!("timeout after {} ms", job.timeout.as_millis());
    match job.target.probe {
        Probe::Agent { port } => {
            let agent = match tokio::time::timeout(job.timeout, agent_line(SocketAddr::new(ip, port))).await {
                Ok(r) => r,
                Err(_) => Err(timed_out()),
            };
            CheckOutcome { ok: agent.is_ok(), agent: Some(agent), ..Default::default() }
        }
        Probe::Health { kind, port } => {
            let result = match tokio::time::timeout(job.timeout, probe(kind, job, SocketAddr::new(ip, port))).await {
                Ok(r) => r,
                Err(_) => Err(timed_out()),
            };
            let latency_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
            CheckOutcome { ok: result.is_ok(), error: result.err(), latency_ms, agent: None }
        }
    }
}

/// Read the agent's one line (HAProxy agent-check protocol).
async fn agent_line(addr: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let mut buf = Vec::with_capacity(128);
    let mut chunk = [0u8; 128];
    while !buf.contains(&b'\n') && buf.len() < 512 {
        let n = s.read(&mut chunk).await.map_err(|e| format!("receive: {e}"))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    Ok(text.lines().next().unwrap_or("").to_string())
}

/// The check itself; `Err` carries the reason (refused, HTTP 503, …).
async fn probe(kind: CheckKind, job: &CheckJob, addr: SocketAddr) -> Result<(), String> {
    match kind {
        CheckKind::None => Ok(()),
        CheckKind::Tcp => TcpStream::connect(addr).await.map(|_| ()).map_err(|e| format!("connect: {e}")),
        CheckKind::Http => http(job, addr).await,
        CheckKind::Udp => udp(job, addr).await,
    }
}

/// GET the path; the status code must be in the accepted range.
async fn http(job: &CheckJob, addr: SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let host = job.target.spec.http_host.clone().unwrap_or_else(|| match job.target.ip {
        std::net::IpAddr::V4(a) => a.to_string(),
        std::net::IpAddr::V6(a) => format!("[{a}]"),
    });
    let req = format!("GET {} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: xlb-health\r\nConnection: close\r\n\r\n", job.target.spec.http_path);
    s.write_all(req.as_bytes()).await.map_err(|e| format!("send: {e}"))?;
    let mut buf = vec![0u8; 256];
    let mut got = 0;
    while got < 12 {
        let n = s.read(&mut buf[got..]).await.map_err(|e| format!("receive: {e}"))?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let line = String::from_utf8_lossy(&buf[..got]);
    let code: u16 = line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {:?}", line.lines().next().unwrap_or("")))?;
    let (lo, hi) = job.target.spec.status_range().map_err(|e| e.to_string())?;
    if (lo..=hi).contains(&code) {
        Ok(())
    } else {
        Err(format!("HTTP {code}"))
    }
}

/// Send the payload; any reply (or one containing the expected text) passes.
async fn udp(job: &CheckJob, addr: SocketAddr) -> Result<(), String> {
    let bind: SocketAddr = if addr.is_ipv4() { "0.0.0.0:0".parse() } else { "[::]:0".parse() }.map_err(|_| "bind address".to_string())?;
    let s = UdpSocket::bind(bind).await.map_err(|e| format!("bind: {e}"))?;
    s.connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    s.send(job.target.spec.udp_payload.as_bytes()).await.map_err(|e| format!("send: {e}"))?;
    let mut buf = vec![0u8; 2048];
    let n = s.recv(&mut buf).await.map_err(|e| format!("receive: {e}"))?;
    match &job.target.spec.udp_expect {
        Some(want) if !String::from_utf8_lossy(&buf[..n]).contains(want.as_str()) => {
            Err(format!("reply does not contain {want:?}"))
        }
        _ => Ok(()),
    }
}
