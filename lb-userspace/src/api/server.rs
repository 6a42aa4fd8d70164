//! The API server: hyper (HTTP/1.1) on the agent's tokio runtime, one task
//! per connection. Answers are JSON: the result with 200, or an HTTP error
//! status with `{"error": "one line"}`.

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, Limited, StreamBody};
use hyper::{body::Frame, header, server::conn::http1, service::service_fn, StatusCode};
use hyper_util::rt::TokioIo;
use std::{
    convert::Infallible,
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, Weak,
    },
    time::Duration,
};
use tokio::net::UnixListener;

use super::{handle, http::Refused, Request};
use crate::host::Host;
use crate::agent::Agent;

/// Largest request body accepted.
const MAX_REQUEST: usize = 64 * 1024;
/// How long `POST /v1/detach` waits for the daemon to have detached.
const DETACH_WAIT: Duration = Duration::from_secs(10);

/// A response body: whole, or streamed (trace).
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Bind the API socket: refuses when another agent answers on it, replaces
/// a stale file, and makes it root-only.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("another agent is already listening on {}", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", path.display()))?;
    Ok(listener)
}

/// Serve requests until the task is dropped. Connections hold the agent
/// weakly: an idle or detaching client never keeps the datapath alive.
pub async fn serve(listener: UnixListener, agent: Arc<Mutex<Agent>>, host: Arc<Host>) {
    let agent = Arc::downgrade(&agent);
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                log::error!("API accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let (agent, host) = (agent.clone(), host.clone());
        tokio::spawn(async move {
            let detached = Arc::new(AtomicBool::new(false));
            let (h, d) = (host.clone(), detached.clone());
            let svc = service_fn(move |req| {
                let (agent, host, d) = (agent.clone(), h.clone(), d.clone());
                async move { Ok::<_, Infallible>(respond(req, agent, host, d).await) }
            });
            if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await {
                log::debug!("API connection: {e}");
            }
            if detached.load(Ordering::Relaxed) {
                // The `detach` answer is written: the daemon may exit.
                host.answered.notify_one();
            }
        });
    }
}

/// A JSON answer.
pub fn json(status: StatusCode, v: &serde_json::Value) -> hyper::Response<Body> {
    let body = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = hyper::Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    r
}

/// An error answer: the status and `{"error": "one line"}`.
pub fn error(status: StatusCode, msg: &str) -> hyper::Response<Body> {
    let line = msg.split_whitespace().collect::<Vec<_>>().join(" ");
    json(status, &serde_json::json!({ "error": line }))
}

async fn respond(
    req: hyper::Request<hyper::body::Incoming>,
    agent: Weak<Mutex<Agent>>,
    host: Arc<Host>,
    detached: Arc<AtomicBool>,
) -> hyper::Response<Body> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_REQUEST).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return error(StatusCode::PAYLOAD_TOO_LARGE, &format!("request body over {MAX_REQUEST} bytes"))
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("cannot read the request: {e}")),
    };
    let req = match super::http::from_http(&parts.method, parts.uri.path(), parts.uri.query(), &body) {
        Ok(r) => r,
        Err(Refused(status, msg)) => return error(status, &msg),
    };
    let Some(agent) = agent.upgrade() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the agent is exiting");
    };
    if let Request::Trace { vip, backend, verdict, count, rate } = req {
        let req = crate::diag::trace::TraceRequest { vip, backend, verdict, count, rate };
        return trace(agent, req);
    }
    let detaching = matches!(req, Request::Detach);
    // Only the table changes scripts repeat may skip the wait: removals, VIP
    // changes and reloads are published before they are answered.
    let no_wait = prefers_async(&parts.headers) && matches!(req, Request::BackendAdd { .. } | Request::BackendSet { .. });
    let (res, changed) = match agent.lock() {
        Ok(mut a) => {
            a.set_no_wait(no_wait);
            let res = handle(&mut a, &host, req);
            a.set_no_wait(false);
            (res, a.state_behind())
        }
        Err(_) => return error(StatusCode::INTERNAL_SERVER_ERROR, "agent state poisoned"),
    };
    // The daemon needs the last reference to the agent to drop the datapath.
    drop(agent);
    // The change is published: answer now; the daemon's saver writes the
    // state file right after (`save_soon_loop`: coalesced, off the lock).
    if changed {
        host.save_soon.notify_one();
    }
    match res {
        Err(e) => error(StatusCode::BAD_REQUEST, &format!("{e:#}")),
        Ok(v) if detaching => {
            // Answer once the daemon has detached, and close the connection
            // (the daemon exits when the answer is out).
            let _ = tokio::time::timeout(DETACH_WAIT, host.detached.notified()).await;
            detached.store(true, Ordering::Relaxed);
            let mut r = json(StatusCode::OK, &v);
            r.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
            r
        }
        Ok(serde_json::Value::Null) => json(StatusCode::OK, &serde_json::json!({})),
        // Accepted, its table not yet published (`Prefer: respond-async`).
        Ok(v) if v["published"] == false => json(StatusCode::ACCEPTED, &v),
        Ok(v) => json(StatusCode::OK, &v),
    }
}

/// `Prefer: respond-async` (RFC 7240): answer a table change once it is
/// validated and recorded, and publish its table with the next tick's.
fn prefers_async(headers: &hyper::HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("respond-async"))
}

/// `GET /v1/trace`: 200 and one JSON line per frame (chunked) while the
/// client reads, or an error before anything is traced.
fn trace(agent: Arc<Mutex<Agent>>, req: crate::diag::trace::TraceRequest) -> hyper::Response<Body> {
    if let Err(e) = crate::diag::trace::start(&agent, &req) {
        return error(StatusCode::BAD_REQUEST, &format!("{e:#}"));
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(crate::diag::trace::pump(tx, agent, req.count));
    let frames = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (Ok(Frame::data(b)), rx)) });
    let mut r = hyper::Response::new(StreamBody::new(frames).boxed_unsync());
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/x-ndjson"));
    r
}
