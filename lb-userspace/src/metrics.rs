//! Opt-in Prometheus metrics (`xlb agent --metrics ADDR`): a read-only HTTP
//! server (hyper) that answers `GET /metrics` with the Prometheus text
//! format rendered by `prometheus-client`, and everything else with 404/405.
//! Off by default. Each scrape renders the agent's status of that moment.

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{header, server::conn::http1, service::service_fn, Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    encoding::prometheus_text,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{atomic::AtomicU64, Arc, Mutex, Weak},
    time::Duration,
};
use tokio::net::TcpListener;

use crate::agent::{Agent, BackendStatus, Status, VipStatus};

type Labels = Vec<(String, String)>;

/// The metric families of one scrape.
struct Families(Registry);

impl Families {
    /// A counter family; `name` ends in `_total` (the suffix the format adds).
    fn counter(&mut self, name: &str, help: &str, samples: Vec<(Labels, u64)>) {
        let fam = Family::<Labels, Counter>::default();
        for (l, v) in samples {
            fam.get_or_create(&l).inc_by(v);
        }
        self.0.register(name.strip_suffix("_total").unwrap_or(name), help.trim_end_matches('.'), fam);
    }

    /// A gauge family.
    fn gauge(&mut self, name: &str, help: &str, samples: Vec<(Labels, f64)>) {
        let fam = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        for (l, v) in samples {
            fam.get_or_create(&l).set(v);
        }
        self.0.register(name, help.trim_end_matches('.'), fam);
    }
}

fn label(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Render a status in the Prometheus text format (0.0.4).
pub fn render(s: &Status) -> String {
    let mut f = Families(Registry::default());
    let per_vip = |g: &dyn Fn(&VipStatus) -> u64| s.vips.iter().map(|v| (label(&[("vip", &v.vip)]), g(v))).collect::<Vec<_>>();
    let per_vip_f = |g: &dyn Fn(&VipStatus) -> f64| s.vips.iter().map(|v| (label(&[("vip", &v.vip)]), g(v))).collect::<Vec<_>>();
    let per_be = |g: &dyn Fn(&BackendStatus) -> u64| {
        s.vips.iter().flat_map(|v| v.backends.iter().map(move |b| (label(&[("vip", &v.vip), ("backend", &b.ip)]), g(b)))).collect::<Vec<_>>()
    };
    let per_be_f = |g: &dyn Fn(&BackendStatus) -> f64| {
        s.vips.iter().flat_map(|v| v.backends.iter().map(move |b| (label(&[("vip", &v.vip), ("backend", &b.ip)]), g(b)))).collect::<Vec<_>>()
    };
    let one = |v: f64| vec![(Labels::new(), v)];
    f.counter("xlb_vip_packets_total", "Packets forwarded for the VIP.", per_vip(&|v| v.packets));
    f.counter("xlb_vip_bytes_total", "Bytes forwarded for the VIP.", per_vip(&|v| v.bytes));
    f.counter("xlb_vip_new_flows_total", "New flows of the VIP.", per_vip(&|v| v.new_flows));
    f.gauge("xlb_vip_active_flows", "Active flows of the VIP.", per_vip_f(&|v| v.active_flows as f64));
    f.gauge("xlb_vip_failing_open", "1 while every backend is down and the VIP fails open.", per_vip_f(&|v| v.failing_open as u8 as f64));
    f.counter("xlb_backend_packets_total", "Packets forwarded to the backend.", per_be(&|b| b.packets));
    f.counter("xlb_backend_bytes_total", "Bytes forwarded to the backend.", per_be(&|b| b.bytes));
    f.counter("xlb_backend_new_flows_total", "New flows sent to the backend.", per_be(&|b| b.new_flows));
    f.gauge("xlb_backend_active_flows", "Active flows on the backend.", per_be_f(&|b| b.active_flows as f64));
    f.gauge("xlb_backend_up", "1 when the backend carries traffic (up or draining).", per_be_f(&|b| (b.state == "up" || b.state == "drain") as u8 as f64));
    f.gauge("xlb_backend_weight", "Configured weight.", per_be_f(&|b| b.weight as f64));
    f.gauge("xlb_backend_table_share", "Share of the VIP's table the backend owns.", per_be_f(&|b| b.table_share));
    f.counter("xlb_backend_checks_total", "Health checks run.", per_be(&|b| b.checks));
    f.counter("xlb_backend_check_failures_total", "Health checks failed.", per_be(&|b| b.check_failures));
    f.counter("xlb_backend_transitions_total", "Up/down transitions.", per_be(&|b| b.transitions));
    let lat = s
        .vips
        .iter()
        .flat_map(|v| v.backends.iter().filter_map(move |b| b.check_latency_ms.map(|l| (label(&[("vip", &v.vip), ("backend", &b.ip)]), l / 1e3))))
        .collect();
    f.gauge("xlb_backend_check_latency_seconds", "Duration of the last health check.", lat);
    let dp = s.counters.iter().map(|(k, v)| (label(&[("counter", k)]), *v)).collect();
    f.counter("xlb_datapath_total", "Datapath verdicts and events (see the README).", dp);
    f.gauge("xlb_conntrack_capacity", "Connection-table capacity (live flows).", one(s.conntrack_capacity as f64));
    f.gauge("xlb_conntrack_bytes", "Connection-table memory.", one(s.conntrack_bytes as f64));
    if let Some(e) = s.conntrack_entries {
        f.gauge("xlb_conntrack_entries", "Connection-table entries at the last census.", one(e as f64));
    }
    f.gauge("xlb_maglev_table_entries", "Entries per Maglev table.", one(s.ring_size as f64));
    let mem = s.datapath_memory.iter().map(|(k, v)| (label(&[("map", k)]), *v as f64)).collect();
    f.gauge("xlb_datapath_memory_bytes", "Memory of the datapath's maps, per map.", mem);
    if let Some(ha) = &s.ha {
        f.gauge("xlb_ha_ready", "1 when this node is ready to be master or announced (xlb ha check).", one(ha.ready as u8 as f64));
        f.gauge("xlb_ha_drained", "1 while this node is drained (xlb ha drain).", one(ha.drained as u8 as f64));
    }
    if let Some(sync) = &s.sync {
        let c = sync.named().into_iter().map(|(k, v)| (label(&[("counter", k)]), v)).collect();
        f.counter("xlb_sync_total", "Connection-table sync: entries and datagrams sent, received, inserted, dropped (unauthenticated, stale, malformed).", c);
    }
    if !s.decap.is_empty() {
        let d = s.decap.iter().flat_map(|d| d.counters.iter().map(|(k, v)| (label(&[("iface", &d.iface), ("counter", k)]), *v))).collect();
        f.counter("xlb_decap_total", "xlb decap verdicts on this host, per interface.", d);
    }
    let fp = s.vips.iter().map(|v| (label(&[("vip", &v.vip), ("fingerprint", &v.table_fingerprint.to_string())]), 1.0)).collect();
    f.gauge("xlb_table_fingerprint", "The VIP's table fingerprint (label): equal on nodes that choose alike.", fp);
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_text::encode(&mut out, &f.0);
    out
}

/// Serve metrics on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, agent: Arc<Mutex<Agent>>, host: Arc<crate::host::Host>) -> Result<()> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("cannot listen for metrics on {addr}"))?;
    log::info!("metrics on http://{addr}/metrics");
    let agent = Arc::downgrade(&agent);
    loop {
        let Ok((s, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let (agent, host) = (agent.clone(), host.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let r = respond(&req, &agent, &host);
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(s), svc);
            if let Err(e) = conn.await {
                log::debug!("metrics connection: {e}");
            }
        });
    }
}

fn respond<B>(req: &hyper::Request<B>, agent: &Weak<Mutex<Agent>>, host: &crate::host::Host) -> hyper::Response<Full<Bytes>> {
    let answer = |status: StatusCode, body: String| {
        let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(prometheus_text::CONTENT_TYPE));
        r
    };
    if req.uri().path() != "/metrics" {
        return answer(StatusCode::NOT_FOUND, "only /metrics\n".into());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = answer(StatusCode::METHOD_NOT_ALLOWED, "read-only\n".into());
        r.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let status = agent.upgrade().and_then(|a| a.lock().ok().map(|a| host.status(&a)));
    match status {
        Some(Ok(st)) => answer(StatusCode::OK, render(&st)),
        _ => answer(StatusCode::INTERNAL_SERVER_ERROR, "status unavailable\n".into()),
    }
}
