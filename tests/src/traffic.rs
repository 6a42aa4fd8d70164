//! Test servers and clients run inside lab namespaces by the `xlb-lab` binary.
//!
//! `serve`: a small HTTP/1.0 server that answers every request with its own
//! name, so a client can tell which backend served it. `connect`: a bounded
//! number of real TCP connections (HTTP GET) to a target, with a summary of
//! who answered and what failed.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex},
    time::Duration,
};

/// Serve HTTP on `port` (IPv4 and IPv6) forever, answering with `name`.
/// A connection that starts with `HOLD\n` instead stays open and answers
/// every line with `NAME LINE` (long-lived connection tests). `GET /health`
/// answers 500 while `fail_file` exists. With `udp_port`, UDP datagrams are
/// echoed back prefixed with `NAME `.
pub fn serve(name: &str, port: u16, fail_file: Option<std::path::PathBuf>, udp_port: Option<u16>, agent: Option<(u16, std::path::PathBuf)>) -> Result<()> {
    if let Some((ap, file)) = agent {
        // HAProxy-style agent: answer the file's first line (default "100%").
        let l = TcpListener::bind(("::", ap)).with_context(|| format!("cannot listen on agent port {ap}"))?;
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                let line = std::fs::read_to_string(&file).unwrap_or_else(|_| "100%".into());
                let _ = writeln!(c, "{}", line.lines().next().unwrap_or(""));
            }
        });
    }
    if let Some(up) = udp_port {
        let sock = std::net::UdpSocket::bind(("::", up)).with_context(|| format!("cannot bind UDP port {up}"))?;
        let name = name.to_string();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                let mut reply = format!("{name} ").into_bytes();
                reply.extend_from_slice(&buf[..n]);
                let _ = sock.send_to(&reply, from);
            }
        });
    }
    let listener = TcpListener::bind(("::", port)).with_context(|| format!("cannot listen on port {port}"))?;
    for conn in listener.incoming() {
        let Ok(mut s) = conn else { continue };
        let name = name.to_string();
        let fail_file = fail_file.clone();
        std::thread::spawn(move || {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 2048];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") && got.len() < 8192 {
                if got.starts_with(b"HOLD\n") {
                    return echo(s, &name, got[5..].to_vec());
                }
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let failing = got.starts_with(b"GET /health ") && fail_file.as_ref().is_some_and(|f| f.exists());
            let status = if failing { "500 Internal Server Error" } else { "200 OK" };
            let body = format!("{name}\n");
            let _ = write!(s, "HTTP/1.0 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        });
    }
    Ok(())
}

/// Answer each line with `NAME LINE` until the peer closes.
fn echo(s: TcpStream, name: &str, pending: Vec<u8>) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let Ok(mut w) = s.try_clone() else { return };
    let mut r = std::io::BufReader::new(std::io::Cursor::new(pending).chain(s));
    let mut line = String::new();
    loop {
        line.clear();
        match std::io::BufRead::read_line(&mut r, &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if write!(w, "{name} {line}").is_err() {
                    return;
                }
            }
        }
    }
}

/// One long-lived connection's story.
#[derive(Serialize, Deserialize, Debug, Default, Clone)]
pub struct Held {
    /// Backend that answered first.
    pub backend: String,
    /// Round trips that succeeded.
    pub pings: u64,
    /// Another backend answered later (must never happen).
    pub switched: bool,
    /// Why the connection ended early, if it did.
    pub broken: Option<String>,
    /// The connection's client port (to find its flow in `xlb flows`/`explain`).
    #[serde(default)]
    pub local_port: u16,
}

/// Hold `count` connections to `target` for `duration`, sending a line every
/// `interval` on each and checking who answers.
pub fn hold(target: SocketAddr, count: usize, duration: Duration, interval: Duration) -> Vec<Held> {
    let handles: Vec<_> = (0..count)
        .map(|_| {
            std::thread::spawn(move || {
                let mut h = Held::default();
                let mut run = || -> Result<()> {
                    let s = TcpStream::connect_timeout(&target, Duration::from_secs(3)).context("connect")?;
                    h.local_port = s.local_addr()?.port();
                    s.set_read_timeout(Some(Duration::from_secs(5)))?;
                    let mut w = s.try_clone()?;
                    let mut r = std::io::BufReader::new(s);
                    w.write_all(b"HOLD\n")?;
                    let t0 = std::time::Instant::now();
                    let mut i = 0u64;
                    while t0.elapsed() < duration {
                        writeln!(w, "ping {i}")?;
                        let mut line = String::new();
                        if std::io::BufRead::read_line(&mut r, &mut line).context("receive")? == 0 {
                            anyhow::bail!("closed by peer");
                        }
                        let who = line.split_whitespace().next().unwrap_or("").to_string();
                        if h.backend.is_empty() {
                            h.backend = who;
                        } else if who != h.backend {
                            h.switched = true;
                        }
                        h.pings += 1;
                        i += 1;
                        std::thread::sleep(interval);
                    }
                    Ok(())
                };
                if let Err(e) = run() {
                    h.broken = Some(format!("{e:#}"));
                }
                h
            })
        })
        .collect();
    handles.into_iter().filter_map(|t| t.join().ok()).collect()
}

/// One HTTP/1.0 request; the whole response as text.
pub fn request(target: SocketAddr, method: &str, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(3)).context("connect")?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "{method} {path} HTTP/1.0\r\nHost: {target}\r\n\r\n").context("send")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).context("receive")?;
    Ok(resp)
}

/// What `connect` saw.
#[derive(Serialize, Deserialize, Debug, Default)]
pub struct Summary {
    /// Connections that got a 200 answer.
    pub ok: usize,
    /// Connections that failed.
    pub failed: usize,
    /// Answers per backend name.
    pub by_backend: BTreeMap<String, usize>,
    /// Failures per error text.
    pub errors: BTreeMap<String, usize>,
}

fn one(target: SocketAddr, timeout: Duration) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&target, timeout).context("connect")?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET / HTTP/1.0\r\nHost: {target}\r\n\r\n").context("send")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).context("receive")?;
    if !resp.starts_with("HTTP/1.0 200") {
        anyhow::bail!("bad answer {:?}", resp.lines().next().unwrap_or(""));
    }
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").trim().to_string();
    Ok(body)
}

/// One connection of a `stream`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Attempt {
    /// When it started, milliseconds since the Unix epoch.
    pub t_ms: u64,
    /// Who answered.
    pub backend: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
}

/// What a UDP probe saw.
#[derive(Serialize, Deserialize, Debug, Default, Clone)]
pub struct ProbeReport {
    /// Probes sent.
    pub sent: u64,
    /// Probes answered.
    pub answered: u64,
    /// Longest run of unanswered probes, as time (run × period), ms: the
    /// outage a client saw.
    pub max_gap_ms: u64,
    /// Backends that answered.
    pub backends: Vec<String>,
}

/// A UDP probe: one numbered datagram to `target` every `1/rate` s for
/// `duration` (from one socket: one flow), answers matched by number.
pub fn probe(target: SocketAddr, rate: u32, duration: Duration) -> Result<ProbeReport> {
    let local: SocketAddr = if target.is_ipv4() { "0.0.0.0:0".parse()? } else { "[::]:0".parse()? };
    let sock = std::net::UdpSocket::bind(local)?;
    // Not connected: with L2 DSR the answer comes from the backend's own
    // address, not the VIP's (the test server's socket is unbound).
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    let period = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let n = (duration.as_secs_f64() / period.as_secs_f64()).ceil() as usize;
    let rx = sock.try_clone()?;
    let until = std::time::Instant::now() + duration + Duration::from_millis(500);
    let receiver = std::thread::spawn(move || {
        let mut got = vec![false; n];
        let mut backends = std::collections::BTreeSet::new();
        let mut buf = [0u8; 512];
        while std::time::Instant::now() < until {
            let Ok((len, _)) = rx.recv_from(&mut buf) else { continue };
            let text = String::from_utf8_lossy(&buf[..len]);
            let mut words = text.split_whitespace();
            let who = words.next().unwrap_or("").to_string();
            if let Some(i) = words.nth(1).and_then(|w| w.parse::<usize>().ok()).filter(|&i| i < n) {
                got[i] = true;
                backends.insert(who);
            }
        }
        (got, backends)
    });
    let t0 = std::time::Instant::now();
    for i in 0..n {
        if let Some(wait) = (period * i as u32).checked_sub(t0.elapsed()) {
            std::thread::sleep(wait);
        }
        let _ = sock.send_to(format!("probe {i}\n").as_bytes(), target);
    }
    let (got, backends) = receiver.join().map_err(|_| anyhow::anyhow!("the probe's receiver failed"))?;
    let (mut run, mut longest) = (0u64, 0u64);
    for &g in &got {
        run = if g { 0 } else { run + 1 };
        longest = longest.max(run);
    }
    Ok(ProbeReport {
        sent: n as u64,
        answered: got.iter().filter(|&&g| g).count() as u64,
        max_gap_ms: (longest as f64 * period.as_secs_f64() * 1000.0).round() as u64,
        backends: backends.into_iter().collect(),
    })
}

/// Wall-clock milliseconds since the Unix epoch (comparable across processes).
pub fn epoch_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A steady stream of new connections: one every `1/rate` s for `duration`
/// (each on its own thread, bounded by `timeout`), in start order.
pub fn stream(target: SocketAddr, rate: u32, duration: Duration, timeout: Duration) -> Vec<Attempt> {
    let t0 = std::time::Instant::now();
    let gap = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let mut handles = Vec::new();
    for i in 0.. {
        let due = gap * i;
        if due >= duration {
            break;
        }
        if let Some(wait) = due.checked_sub(t0.elapsed()) {
            std::thread::sleep(wait);
        }
        let t_ms = epoch_ms();
        handles.push(std::thread::spawn(move || match one(target, timeout) {
            Ok(b) => Attempt { t_ms, backend: Some(b), error: None },
            Err(e) => Attempt { t_ms, backend: None, error: Some(format!("{e:#}")) },
        }));
    }
    handles.into_iter().filter_map(|h| h.join().ok()).collect()
}

/// Open `count` connections, `parallel` at a time, each bounded by `timeout`.
pub fn connect(target: SocketAddr, count: usize, parallel: usize, timeout: Duration) -> Summary {
    let summary = Arc::new(Mutex::new(Summary::default()));
    let next = Arc::new(Mutex::new(0usize));
    let workers: Vec<_> = (0..parallel.max(1))
        .map(|_| {
            let (summary, next) = (summary.clone(), next.clone());
            std::thread::spawn(move || loop {
                {
                    let mut n = next.lock().expect("counter");
                    if *n >= count {
                        return;
                    }
                    *n += 1;
                }
                let r = one(target, timeout);
                let mut s = summary.lock().expect("summary");
                match r {
                    Ok(name) => {
                        s.ok += 1;
                        *s.by_backend.entry(name).or_default() += 1;
                    }
                    Err(e) => {
                        s.failed += 1;
                        *s.errors.entry(format!("{e:#}")).or_default() += 1;
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    Arc::try_unwrap(summary).map(|m| m.into_inner().unwrap_or_default()).unwrap_or_default()
}

/// Send `count` ICMP echo requests to `target` (IPv4) from a raw socket, one
/// at a time, waiting up to `timeout` for each reply; returns how many were
/// answered with a correct echo reply (identifier, sequence, data).
pub fn ping(target: std::net::Ipv4Addr, count: u16, timeout: Duration) -> Result<u16> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: socket(2) with constant arguments; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("raw ICMP socket (root needed)");
    }
    // SAFETY: `fd` is a new, valid descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
    // SAFETY: a valid timeval for SO_RCVTIMEO on our socket.
    unsafe {
        libc::setsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv as *const _ as *const libc::c_void, std::mem::size_of::<libc::timeval>() as u32)
    };
    let id = (std::process::id() & 0xffff) as u16;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(target.octets()) },
        sin_zero: [0; 8],
    };
    let mut answered = 0;
    for seq in 0..count {
        let data = format!("xlb-lab ping {seq}");
        let req = crate::frames::icmp_echo(8, id, seq, data.as_bytes());
        // SAFETY: `req` and `addr` are valid for the lengths given.
        let n = unsafe {
            libc::sendto(sock.as_raw_fd(), req.as_ptr() as *const libc::c_void, req.len(), 0, &addr as *const _ as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_in>() as u32)
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error()).context("sendto");
        }
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = [0u8; 1500];
        while std::time::Instant::now() < deadline {
            // SAFETY: `buf` is valid for its length.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
            if n <= 0 {
                continue;
            }
            let pkt = &buf[..n as usize];
            let hl = ((pkt[0] & 0x0f) as usize) * 4;
            if pkt.len() < hl + 8 || pkt[12..16] != target.octets() {
                continue;
            }
            let icmp = &pkt[hl..];
            let ok = icmp[0] == 0
                && u16::from_be_bytes([icmp[4], icmp[5]]) == id
                && u16::from_be_bytes([icmp[6], icmp[7]]) == seq
                && &icmp[8..] == data.as_bytes()
                && crate::frames::csum(icmp) == 0
                && crate::frames::csum(&pkt[..hl]) == 0;
            if ok {
                answered += 1;
                break;
            }
        }
    }
    Ok(answered)
}

/// `count` datagrams with payload `hex` to `target` from one socket bound
/// to `bind`, one at a time: the name each answer starts with (the test
/// server's echo), or "-" when none came within a second.
pub fn datagrams(target: SocketAddr, bind: SocketAddr, hex: &str, count: u16) -> Result<Vec<String>> {
    let payload: Vec<u8> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
        .collect::<std::result::Result<_, _>>()
        .context("payload is not hex")?;
    let sock = std::net::UdpSocket::bind(bind).with_context(|| format!("cannot bind {bind}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut who = Vec::new();
    let mut buf = [0u8; 2048];
    for _ in 0..count {
        sock.send_to(&payload, target)?;
        who.push(match sock.recv_from(&mut buf) {
            Ok((n, _)) => String::from_utf8_lossy(&buf[..n]).split_whitespace().next().unwrap_or("?").to_string(),
            Err(_) => "-".to_string(),
        });
    }
    Ok(who)
}
