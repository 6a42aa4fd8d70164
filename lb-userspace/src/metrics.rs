//! Opt-in Prometheus metrics (`xlb agent --metrics ADDR`): a read-only HTTP
//! listener that answers `GET /metrics` with the text exposition format and
//! everything else with 404/405. Off by default.

use anyhow::{Context, Result};
use std::{
    fmt::Write,
    net::SocketAddr,
    sync::{Arc, Mutex},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::agent::{Agent, Status};

/// Render a status in the Prometheus text format.
pub fn render(s: &Status) -> String {
    let mut o = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(o, "{name}{labels} {v}");
        }
    };
    let esc = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"");
    let vl = |vip: &str| format!("{{vip=\"{}\"}}", esc(vip));
    let bl = |vip: &str, ip: &str| format!("{{vip=\"{}\",backend=\"{}\"}}", esc(vip), esc(ip));
    let per_vip = |f: &dyn Fn(&crate::agent::VipStatus) -> f64| s.vips.iter().map(|v| (vl(&v.vip), f(v))).collect::<Vec<_>>();
    let per_be = |f: &dyn Fn(&crate::agent::BackendStatus) -> f64| {
        s.vips.iter().flat_map(|v| v.backends.iter().map(move |b| (bl(&v.vip, &b.ip), f(b)))).collect::<Vec<_>>()
    };
    family("xlb_vip_packets_total", "counter", "Packets forwarded for the VIP.", per_vip(&|v| v.packets as f64));
    family("xlb_vip_bytes_total", "counter", "Bytes forwarded for the VIP.", per_vip(&|v| v.bytes as f64));
    family("xlb_vip_new_flows_total", "counter", "New flows of the VIP.", per_vip(&|v| v.new_flows as f64));
    family("xlb_vip_active_flows", "gauge", "Active flows of the VIP.", per_vip(&|v| v.active_flows as f64));
    family("xlb_vip_failing_open", "gauge", "1 while every backend is down and the VIP fails open.", per_vip(&|v| v.failing_open as u8 as f64));
    family("xlb_backend_packets_total", "counter", "Packets forwarded to the backend.", per_be(&|b| b.packets as f64));
    family("xlb_backend_bytes_total", "counter", "Bytes forwarded to the backend.", per_be(&|b| b.bytes as f64));
    family("xlb_backend_new_flows_total", "counter", "New flows sent to the backend.", per_be(&|b| b.new_flows as f64));
    family("xlb_backend_active_flows", "gauge", "Active flows on the backend.", per_be(&|b| b.active_flows as f64));
    family("xlb_backend_up", "gauge", "1 when the backend carries traffic (up or draining).", per_be(&|b| (b.state == "up" || b.state == "drain") as u8 as f64));
    family("xlb_backend_weight", "gauge", "Configured weight.", per_be(&|b| b.weight as f64));
    family("xlb_backend_table_share", "gauge", "Share of the VIP's table the backend owns.", per_be(&|b| b.table_share));
    family("xlb_backend_checks_total", "counter", "Health checks run.", per_be(&|b| b.checks as f64));
    family("xlb_backend_check_failures_total", "counter", "Health checks failed.", per_be(&|b| b.check_failures as f64));
    family("xlb_backend_transitions_total", "counter", "Up/down transitions.", per_be(&|b| b.transitions as f64));
    let lat: Vec<(String, f64)> = s
        .vips
        .iter()
        .flat_map(|v| v.backends.iter().filter_map(move |b| b.check_latency_ms.map(|l| (bl(&v.vip, &b.ip), l / 1e3))))
        .collect();
    family("xlb_backend_check_latency_seconds", "gauge", "Duration of the last health check.", lat);
    let dp: Vec<(String, f64)> = s.counters.iter().map(|(k, v)| (format!("{{counter=\"{k}\"}}"), *v as f64)).collect();
    family("xlb_datapath_total", "counter", "Datapath verdicts and events (see the README).", dp);
    family("xlb_conntrack_capacity", "gauge", "Connection-table capacity (live flows).", vec![(String::new(), s.conntrack_capacity as f64)]);
    family("xlb_conntrack_bytes", "gauge", "Connection-table memory.", vec![(String::new(), s.conntrack_bytes as f64)]);
    if let Some(e) = s.conntrack_entries {
        family("xlb_conntrack_entries", "gauge", "Connection-table entries at the last census.", vec![(String::new(), e as f64)]);
    }
    family("xlb_maglev_table_entries", "gauge", "Entries per Maglev table.", vec![(String::new(), s.ring_size as f64)]);
    if let Some(ha) = &s.ha {
        family("xlb_ha_ready", "gauge", "1 when this node is ready to be master or announced (xlb ha check).", vec![(String::new(), ha.ready as u8 as f64)]);
        family("xlb_ha_drained", "gauge", "1 while this node is drained (xlb ha drain).", vec![(String::new(), ha.drained as u8 as f64)]);
    }
    if let Some(sync) = &s.sync {
        let c: Vec<(String, f64)> = sync.named().into_iter().map(|(k, v)| (format!("{{counter=\"{k}\"}}"), v as f64)).collect();
        family("xlb_sync_total", "counter", "Connection-table sync: entries and datagrams sent, received, inserted, dropped (unauthenticated, stale, malformed).", c);
    }
    let fp: Vec<(String, f64)> =
        s.vips.iter().map(|v| (format!("{{vip=\"{}\",fingerprint=\"{}\"}}", esc(&v.vip), v.table_fingerprint), 1.0)).collect();
    family("xlb_table_fingerprint", "gauge", "The VIP's table fingerprint (label): equal on nodes that choose alike.", fp);
    o
}

/// Serve metrics on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, agent: Arc<Mutex<Agent>>, host: Arc<crate::api::Host>) -> Result<()> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("cannot listen for metrics on {addr}"))?;
    log::info!("metrics on http://{addr}/metrics");
    loop {
        let Ok((mut s, _)) = listener.accept().await else { continue };
        let (agent, host) = (agent.clone(), host.clone());
        tokio::spawn(async move {
            // Read the request head (bounded in size and time): answering
            // with unread bytes pending would reset the connection.
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
                    Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                    _ => return,
                }
            }
            let req = String::from_utf8_lossy(&buf);
            let (status, body) = if req.starts_with("GET /metrics ") || req.starts_with("GET /metrics?") {
                let st = agent.lock().ok().map(|a| host.status(&a));
                match st {
                    Some(Ok(st)) => ("200 OK", render(&st)),
                    _ => ("500 Internal Server Error", "status unavailable\n".to_string()),
                }
            } else if req.starts_with("GET ") {
                ("404 Not Found", "only /metrics\n".to_string())
            } else {
                ("405 Method Not Allowed", "read-only\n".to_string())
            };
            let head = format!(
                "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(body.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}
