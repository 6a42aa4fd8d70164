//! The HTTP form of the API's requests: one route table, read both ways.
//! The server turns (method, path, query, JSON body) into a [`Request`]; the
//! CLI turns a [`Request`] into (method, path, body). Both go through the
//! request's own serde form, so the fields and their rules (`Vip`, `Mac`,
//! `Admin`… through `FromStr`/`Display`) are the ones the config file and the
//! state file use: nothing here checks a value.

use anyhow::{anyhow, Result};
use hyper::{Method, StatusCode};
use serde_json::{Map, Value};

use super::Request;

/// Version prefix of every path.
pub const PREFIX: &str = "/v1";

/// (method, path pattern, request kind). `{vip}` is `ADDR:PORT/PROTO` (two
/// path segments), `{ip}` a backend address.
const ROUTES: &[(Method, &str, &str)] = &[
    (Method::GET, "/v1/status", "status"),
    (Method::GET, "/v1/vips", "vip-list"),
    (Method::POST, "/v1/vips", "vip-add"),
    (Method::DELETE, "/v1/vips/{vip}", "vip-del"),
    (Method::POST, "/v1/vips/{vip}/backends", "backend-add"),
    (Method::PUT, "/v1/vips/{vip}/backends/{ip}", "backend-set"),
    (Method::DELETE, "/v1/vips/{vip}/backends/{ip}", "backend-del"),
    (Method::GET, "/v1/config", "config-dump"),
    (Method::POST, "/v1/config/reload", "config-reload"),
    (Method::POST, "/v1/detach", "detach"),
    (Method::GET, "/v1/ha", "ha-check"),
    (Method::POST, "/v1/ha/drain", "ha-drain"),
    (Method::POST, "/v1/ha/undrain", "ha-undrain"),
    (Method::GET, "/v1/flows", "flows"),
    (Method::GET, "/v1/explain", "explain"),
    (Method::GET, "/v1/trace", "trace"),
];

/// A refused HTTP request: its status and one line saying why.
#[derive(Debug)]
pub struct Refused(pub StatusCode, pub String);

impl Refused {
    fn bad(msg: impl Into<String>) -> Refused {
        Refused(StatusCode::BAD_REQUEST, msg.into())
    }
}

/// The request an HTTP request stands for. `body` is the raw body (empty
/// for none); query values that read as numbers or booleans are those.
pub fn from_http(method: &Method, path: &str, query: Option<&str>, body: &[u8]) -> Result<Request, Refused> {
    let segments: Vec<String> =
        path.split('/').skip(1).map(decode).collect::<Result<_>>().map_err(|e| Refused::bad(format!("{e:#}")))?;
    let mut path_allowed = false;
    let mut found = None;
    for (m, pattern, kind) in ROUTES {
        if let Some(params) = matches(pattern, &segments) {
            path_allowed = true;
            if m == method {
                found = Some((*kind, params));
                break;
            }
        }
    }
    let Some((kind, params)) = found else {
        return Err(if path_allowed {
            Refused(StatusCode::METHOD_NOT_ALLOWED, format!("{method} is not allowed on {path}"))
        } else {
            Refused(StatusCode::NOT_FOUND, format!("no such path: {path} (the API is under {PREFIX}/)"))
        });
    };
    let mut fields = if body.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err(Refused::bad("bad request: the body must be a JSON object")),
            Err(e) => return Err(Refused::bad(format!("bad request: the body is not JSON: {e}"))),
        }
    };
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (decode(k).map_err(|e| Refused::bad(format!("{e:#}")))?, decode(v).map_err(|e| Refused::bad(format!("{e:#}")))?);
        let value = if let Ok(n) = v.parse::<u64>() {
            Value::from(n)
        } else if let Ok(b) = v.parse::<bool>() {
            Value::from(b)
        } else {
            Value::from(v)
        };
        if fields.insert(k.clone(), value).is_some() {
            return Err(Refused::bad(format!("bad request: {k} given twice")));
        }
    }
    for (k, v) in params {
        if fields.insert(k.to_string(), Value::from(v)).is_some() {
            return Err(Refused::bad(format!("bad request: {k} is given by the path, not the body")));
        }
    }
    fields.insert("cmd".into(), Value::from(kind));
    serde_json::from_value(Value::Object(fields)).map_err(|e| Refused::bad(format!("bad request: {e}")))
}

/// The HTTP form of a request: method, path with query, JSON body.
pub fn to_http(req: &Request) -> Result<(Method, String, Option<Vec<u8>>)> {
    let Value::Object(mut fields) = serde_json::to_value(req)? else {
        return Err(anyhow!("a request serializes to an object"));
    };
    let kind = fields.remove("cmd").and_then(|c| c.as_str().map(str::to_string)).unwrap_or_default();
    let (method, pattern, _) =
        ROUTES.iter().find(|(_, _, k)| *k == kind).ok_or_else(|| anyhow!("no route for the request {kind}"))?;
    fields.retain(|_, v| !v.is_null());
    let mut path = String::new();
    for seg in pattern.split('/').skip(1) {
        let param = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}'));
        match param {
            Some(name) => {
                let v = fields.remove(name).and_then(|v| v.as_str().map(str::to_string)).ok_or_else(|| anyhow!("the request has no {name}"))?;
                // A VIP is two segments (ADDR:PORT/PROTO): its last '/'
                // stays; a prefix VIP's other '/' (`10.0.0.0/24:*/tcp`) is
                // encoded within the first segment.
                let (head, tail) = v.rsplit_once('/').map_or((v.as_str(), None), |(h, t)| (h, Some(t)));
                for part in std::iter::once(head).chain(tail) {
                    path.push('/');
                    path.push_str(&encode(part));
                }
            }
            None => {
                path.push('/');
                path.push_str(seg);
            }
        }
    }
    if *method == Method::GET {
        let query: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(&v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()))))
            .collect();
        if !query.is_empty() {
            path = format!("{path}?{}", query.join("&"));
        }
        return Ok((method.clone(), path, None));
    }
    let body = (!fields.is_empty()).then(|| serde_json::to_vec(&Value::Object(fields))).transpose()?;
    Ok((method.clone(), path, body))
}

/// The path parameters of `segments` when they fit `pattern`.
fn matches(pattern: &str, segments: &[String]) -> Option<Vec<(&'static str, String)>> {
    let mut params = Vec::new();
    let mut i = 0;
    for seg in pattern.split('/').skip(1) {
        match seg {
            "{vip}" => {
                let (a, b) = (segments.get(i)?, segments.get(i + 1)?);
                params.push(("vip", format!("{a}/{b}")));
                i += 2;
            }
            "{ip}" => {
                params.push(("ip", segments.get(i)?.clone()));
                i += 1;
            }
            lit => {
                if segments.get(i)? != lit {
                    return None;
                }
                i += 1;
            }
        }
    }
    (i == segments.len()).then_some(params)
}

/// Percent-encode what is not unreserved in a path segment or query value
/// (':' stays: `ADDR:PORT` reads as it is written).
fn encode(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

/// Undo percent-encoding (and '+' in queries is left as it is).
fn decode(s: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
            out.push(hex.ok_or_else(|| anyhow!("bad request: malformed percent-encoding in {s}"))?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| anyhow!("bad request: {s} is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Admin;

    fn round_trip(req: Request) -> (Method, String) {
        let (m, p, body) = to_http(&req).unwrap();
        let (path, query) = p.split_once('?').map_or((p.as_str(), None), |(a, b)| (a, Some(b)));
        let back = from_http(&m, path, query, body.as_deref().unwrap_or_default()).unwrap();
        assert_eq!(serde_json::to_value(&back).unwrap(), serde_json::to_value(&req).unwrap());
        (m, p)
    }

    #[test]
    fn every_request_has_one_route_and_reads_back() {
        let vip = "10.0.0.1:80/tcp".parse().unwrap();
        let (m, p) = round_trip(Request::BackendSet { vip, ip: "10.0.0.2".parse().unwrap(), weight: Some(3), state: Some(Admin::Drain), dry_run: true });
        assert_eq!((m, p.as_str()), (Method::PUT, "/v1/vips/10.0.0.1:80/tcp/backends/10.0.0.2"));
        let v6 = "[fd00::1]:53/udp".parse().unwrap();
        let (m, p) = round_trip(Request::VipDel { vip: v6 });
        assert_eq!((m, p.as_str()), (Method::DELETE, "/v1/vips/%5Bfd00::1%5D:53/udp"));
        let (m, p) = round_trip(Request::Flows { vip: Some("10.0.0.1:80/tcp".parse().expect("vip")), backend: None, limit: Some(5) });
        assert_eq!((m, p.as_str()), (Method::GET, "/v1/flows?limit=5&vip=10.0.0.1:80%2Ftcp"));
        round_trip(Request::Status);
        round_trip(Request::VipDel { vip: "10.0.0.0/24:*/tcp".parse().unwrap() });
        round_trip(Request::VipDel { vip: "[2001:db8::]/64:443/udp".parse().unwrap() });
        round_trip(Request::VipAdd {
            vip: "10.0.0.1:81/udp".parse().unwrap(),
            algo: None,
            persist_timeout: Some(5),
            health: None,
            all_down: None,
            slow_start_ms: None,
            hash: None,
            answer_ping: None,
            forward: Some(crate::config::ForwardName(lb_common::Forward::Gue)),
        });
        round_trip(Request::ConfigReload { path: Some("/etc/xlb.toml".into()) });
        let (_, p) = round_trip(Request::Trace {
            vip: Some("[fd00::1]:53/udp".parse().unwrap()),
            backend: Some("fd00::2".parse().unwrap()),
            verdict: Some(crate::diag::trace::TraceVerdict::Tx),
            count: Some(3),
            rate: Some(10),
        });
        assert!(p.contains("verdict=tx") && p.contains("backend=fd00::2"), "{p}");
        round_trip(Request::Explain { vip: "10.0.0.1:80/tcp".parse().unwrap(), client: "[fd00::7]:4000".parse().unwrap() });
        // A malformed value is refused by its type's parser, with its words.
        let e = from_http(&Method::GET, "/v1/trace", Some("verdict=maybe"), b"").expect_err("bad verdict");
        assert!(e.1.contains("unknown verdict 'maybe'"), "{}", e.1);
        let e = from_http(&Method::GET, "/v1/explain", Some("vip=10.0.0.1:80&client=1.2.3.4"), b"").expect_err("bad VIP");
        assert!(e.1.contains("invalid VIP"), "{}", e.1);
        // Every kind has a route.
        let kinds: Vec<&str> = ROUTES.iter().map(|r| r.2).collect();
        for k in ["vip-add", "vip-del", "vip-list", "backend-add", "backend-set", "backend-del", "status", "config-dump", "config-reload", "detach", "ha-check", "ha-drain", "ha-undrain", "flows", "explain", "trace"] {
            assert!(kinds.contains(&k), "{k}");
        }
    }

    #[test]
    fn malformed_requests_are_refused_with_a_status_and_one_line() {
        let refused = |m: Method, p: &str, body: &str| match from_http(&m, p, None, body.as_bytes()) {
            Err(Refused(s, msg)) => {
                assert!(!msg.contains('\n') && !msg.is_empty(), "{msg}");
                s
            }
            Ok(r) => panic!("{m} {p} {body} was accepted: {r:?}"),
        };
        assert_eq!(refused(Method::GET, "/v2/status", ""), StatusCode::NOT_FOUND);
        assert_eq!(refused(Method::GET, "/status", ""), StatusCode::NOT_FOUND);
        assert_eq!(refused(Method::DELETE, "/v1/status", ""), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(refused(Method::POST, "/v1/vips", "not json"), StatusCode::BAD_REQUEST);
        assert_eq!(refused(Method::POST, "/v1/vips", "[1]"), StatusCode::BAD_REQUEST);
        assert_eq!(refused(Method::POST, "/v1/vips", r#"{"vip":"1.2.3.4:0/tcp"}"#), StatusCode::BAD_REQUEST);
        assert_eq!(refused(Method::POST, "/v1/vips", r#"{"vip":"1.2.3.4:80/tcp","colour":"red"}"#), StatusCode::BAD_REQUEST);
        assert_eq!(refused(Method::POST, "/v1/vips/1.2.3.4:80/tcp/backends", r#"{"vip":"1.2.3.4:80/tcp","ip":"10.0.0.2"}"#), StatusCode::BAD_REQUEST);
        assert_eq!(refused(Method::PUT, "/v1/vips/1.2.3.4:80/tcp/backends/10.0.0.2", r#"{"state":"sleepy"}"#), StatusCode::BAD_REQUEST);
        assert_eq!(refused(Method::DELETE, "/v1/vips/1.2.3.4:80/tcp/backends/%ZZ", ""), StatusCode::BAD_REQUEST);
    }
}
