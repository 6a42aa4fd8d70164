//! The CLI's side of the API: hyper's HTTP/1.1 client connection (no pool,
//! no TLS: one request per connection over the unix socket) on a
//! current-thread runtime, the same HTTP code as the server, chunked
//! streams (trace) included.

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, header, StatusCode};
use hyper_util::rt::TokioIo;
use std::path::Path;

use super::{http::to_http, Request};

/// Send one request to the agent at `socket` and return its result.
pub fn call(socket: &Path, req: &Request) -> Result<serde_json::Value> {
    call_with(socket, req, false)
}

/// `call`; with `no_wait`, a table change is answered once validated and
/// recorded, its table published with the agent's next tick
/// (`Prefer: respond-async`).
pub fn call_with(socket: &Path, req: &Request, no_wait: bool) -> Result<serde_json::Value> {
    runtime()?.block_on(async {
        let resp = send(socket, req, no_wait).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await.context("the agent's answer broke off")?.to_bytes();
        answer(status, &body)
    })
}

/// How a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// The agent ended it, or `on_line` did.
    Done,
    /// SIGINT or SIGTERM: the connection is dropped, which ends the
    /// agent's side too. Handled rather than left to the default action,
    /// which a parent that ignores SIGINT (a shell's background job) would
    /// have turned into "never".
    Interrupted,
}

/// Send a streaming request (trace): `on_line` gets each non-empty line of
/// the answer until it returns false, the agent ends the stream, or a
/// SIGINT/SIGTERM arrives.
pub fn stream(socket: &Path, req: &Request, mut on_line: impl FnMut(&str) -> Result<bool>) -> Result<StreamEnd> {
    use tokio::signal::unix::{signal, SignalKind};
    runtime()?.block_on(async {
        let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let resp = send(socket, req, false).await?;
        let status = resp.status();
        let mut body = resp.into_body();
        if status != StatusCode::OK {
            let bytes = body.collect().await.context("the agent's answer broke off")?.to_bytes();
            answer(status, &bytes)?;
            bail!("the agent answered {status}");
        }
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let frame = tokio::select! {
                f = body.frame() => f,
                _ = int.recv() => return Ok(StreamEnd::Interrupted),
                _ = term.recv() => return Ok(StreamEnd::Interrupted),
            };
            let Some(frame) = frame else { break };
            let frame = frame.context("the agent closed the stream")?;
            let Some(data) = frame.data_ref() else { continue };
            pending.extend_from_slice(data);
            while let Some(n) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=n).collect();
                let line = std::str::from_utf8(&line).context("malformed line from the agent")?.trim();
                if !line.is_empty() && !on_line(line)? {
                    return Ok(StreamEnd::Done);
                }
            }
        }
        Ok(StreamEnd::Done)
    })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_io().build().context("cannot start the async runtime")
}

async fn send(socket: &Path, req: &Request, no_wait: bool) -> Result<hyper::Response<Incoming>> {
    let (method, path, body) = to_http(req)?;
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| anyhow!("cannot reach the agent at {} ({e}); is `xlb agent` running?", socket.display()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.context("cannot talk to the agent")?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            log::debug!("API connection: {e}");
        }
    });
    let mut http = hyper::Request::builder().method(method).uri(path).header(header::HOST, "xlb");
    if body.is_some() {
        http = http.header(header::CONTENT_TYPE, "application/json");
    }
    if no_wait {
        http = http.header("prefer", "respond-async");
    }
    let http = http.body(Full::new(Bytes::from(body.unwrap_or_default()))).context("cannot build the request")?;
    sender.send_request(http).await.context("no answer from the agent")
}

/// The result of an answer, or its error line.
fn answer(status: StatusCode, body: &[u8]) -> Result<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_slice(body).with_context(|| format!("malformed answer from the agent ({status})"))?;
    if status.is_success() {
        return Ok(v);
    }
    match v["error"].as_str() {
        Some(e) => Err(anyhow!("{e}")),
        None => Err(anyhow!("the agent answered {status}")),
    }
}
