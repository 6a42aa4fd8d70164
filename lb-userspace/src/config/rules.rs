//! The rules of operator input that go beyond one value's syntax: backend
//! addresses against their VIP, weights, slow start, persistence. Each is
//! checked here and only here; the CLI, the API, the config file and the
//! agent call these.

use anyhow::{anyhow, bail, Context, Result};
use std::net::IpAddr;

use super::{kind_for, CheckKind, HealthConfig, Vip};
use lb_common::Algo;

/// Check a backend address for a VIP reached by `forward`: the same family
/// for L2; either family when routed (the backend's decides the outer header).
pub fn check_backend_ip_for(vip: &Vip, ip: IpAddr, forward: lb_common::Forward) -> Result<IpAddr> {
    if forward.is_routed() {
        check_unicast(ip).with_context(|| format!("invalid backend IP '{ip}'"))?;
        return Ok(ip);
    }
    check_backend_ip(vip, ip)
}

/// Largest backend weight accepted.
pub const MAX_WEIGHT: u32 = 10_000;
/// Weight of a backend added without `--weight`.
pub const DEFAULT_WEIGHT: u32 = 1;

/// Reject addresses that cannot be a service or backend.
pub fn check_unicast(ip: IpAddr) -> Result<()> {
    let bad = match ip {
        IpAddr::V4(a) => a.is_unspecified() || a.is_multicast() || a.is_broadcast(),
        IpAddr::V6(a) => a.is_unspecified() || a.is_multicast(),
    };
    if bad {
        bail!("{ip} is not a unicast address");
    }
    Ok(())
}

/// Parse a backend address (its family and kind are checked against its
/// VIP by `check_backend_ip_for`).
pub fn parse_backend_ip(s: &str) -> Result<IpAddr> {
    s.parse().map_err(|_| anyhow!("invalid backend IP '{s}'"))
}

/// Longest slow start accepted, milliseconds.
pub const MAX_SLOW_START_MS: u64 = 3_600_000;

/// Check a slow-start time.
pub fn check_slow_start(ms: u64) -> Result<u64> {
    if ms > MAX_SLOW_START_MS {
        bail!("slow start {ms} ms is over an hour");
    }
    Ok(ms)
}

/// Check a backend address for a VIP (same family, unicast).
pub fn check_backend_ip(vip: &Vip, ip: IpAddr) -> Result<IpAddr> {
    check_unicast(ip).with_context(|| format!("invalid backend IP '{ip}'"))?;
    if ip.is_ipv4() != vip.addr.is_ipv4() {
        bail!("backend {ip} and VIP {vip} are of different address families");
    }
    Ok(ip)
}

/// Check a weight given by an operator.
pub fn check_weight(w: u32) -> Result<u32> {
    if w > MAX_WEIGHT {
        bail!("invalid weight {w}: must be 0..={MAX_WEIGHT} (0 = no new flows)");
    }
    Ok(w)
}

/// Check a persistence timeout for an algorithm.
pub fn check_persist(algo: Algo, secs: u32) -> Result<u16> {
    if secs > 0 && algo != Algo::SourceHash {
        bail!("--persist-timeout only applies to the source-hash algorithm");
    }
    u16::try_from(secs).map_err(|_| anyhow!("persistence timeout {secs} s is over the maximum of {} s", u16::MAX))
}

/// An any-port VIP has no port to health-check: its checks need one
/// (`--check-port`, `port` in a `[vip.health]`), unless they are off.
pub fn check_any_port_health(vip: &Vip, health: &HealthConfig) -> Result<()> {
    if vip.is_any_port() && health.port.is_none() && kind_for(vip, health) != CheckKind::None {
        bail!("VIP {vip} serves every port: give its health checks a port (--check-port N) or turn them off (--check none)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_family_must_match() {
        let v: Vip = "10.0.0.100:80/tcp".parse().expect("valid");
        let ip = |s: &str| parse_backend_ip(s).expect(s);
        assert!(check_backend_ip(&v, ip("10.0.0.11")).is_ok());
        assert!(check_backend_ip(&v, ip("2001:db8::1")).is_err());
        assert!(check_backend_ip_for(&v, ip("2001:db8::1"), lb_common::Forward::Ipip).is_ok());
        assert!(check_backend_ip_for(&v, ip("0.0.0.0"), lb_common::Forward::Ipip).is_err());
        assert!(parse_backend_ip("banana").expect_err("banana").to_string().contains("invalid backend IP 'banana'"));
        assert!(check_weight(MAX_WEIGHT + 1).is_err());
    }
}
