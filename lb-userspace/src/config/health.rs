//! Health-check settings (`[health]`, `[vip.health]`, `--check-*`) and the
//! rules that make them workable.

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use std::str::FromStr;

use super::{Proto, Vip};

/// How backends are health-checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connect to the backend (TCP VIPs; on a UDP VIP it means `none`).
    #[default]
    Tcp,
    /// An HTTP GET of `http_path`; the status must be in `http_status`.
    Http,
    /// A UDP datagram (`udp_payload`); any reply, or one containing `udp_expect`.
    Udp,
    /// No checks: every backend is up.
    None,
}

impl CheckKind {
    /// Name as in the config file.
    pub fn name(self) -> &'static str {
        match self {
            CheckKind::Tcp => "tcp",
            CheckKind::Http => "http",
            CheckKind::Udp => "udp",
            CheckKind::None => "none",
        }
    }
}

impl FromStr for CheckKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tcp" => Ok(CheckKind::Tcp),
            "http" => Ok(CheckKind::Http),
            "udp" => Ok(CheckKind::Udp),
            "none" => Ok(CheckKind::None),
            other => bail!("unknown check '{other}' (tcp, http, udp, none)"),
        }
    }
}

/// Health checking, in HAProxy's terms: `inter`, `fastinter`, `timeout
/// check`, `rise`, `fall`, plus the check itself. Set for the agent, per VIP,
/// or per backend (the most specific wins, whole).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Check type.
    pub kind: CheckKind,
    /// Time between checks of one backend, milliseconds.
    pub interval_ms: u64,
    /// Time between checks while a backend is changing state (some checks
    /// passed while down, or failed while up), milliseconds.
    pub fast_interval_ms: u64,
    /// Each interval is randomly lengthened or shortened by up to this
    /// percentage, so checks do not synchronise.
    pub jitter_pct: u32,
    /// Time a check may take, milliseconds.
    pub timeout_ms: u64,
    /// Consecutive successes that bring a down backend up.
    pub rise: u32,
    /// Consecutive failures that take an up backend down.
    pub fall: u32,
    /// Port to check (default: the VIP's port).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// HTTP: path to GET.
    pub http_path: String,
    /// HTTP: Host header (default: the backend's address).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_host: Option<String>,
    /// HTTP: accepted status codes, `LOW-HIGH` or one code.
    pub http_status: String,
    /// UDP: payload to send.
    pub udp_payload: String,
    /// UDP: text the reply must contain (any reply when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp_expect: Option<String>,
    /// Agent check (HAProxy's agent-check): a TCP port on the backend that
    /// answers a line such as `75%`, `up`, `drain`, `down` or `maint`
    /// (several words allowed, e.g. `up 50%`); applied at every check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_port: Option<u16>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            kind: CheckKind::Tcp,
            interval_ms: 300,
            fast_interval_ms: 100,
            jitter_pct: 10,
            timeout_ms: 250,
            rise: 2,
            fall: 3,
            port: None,
            http_path: "/".into(),
            http_host: None,
            http_status: "200-399".into(),
            udp_payload: "xlb-health".into(),
            udp_expect: None,
            agent_port: None,
        }
    }
}

impl HealthConfig {
    /// Reject settings that cannot work.
    pub fn validate(&self) -> Result<()> {
        if !(10..=600_000).contains(&self.interval_ms) || !(10..=600_000).contains(&self.fast_interval_ms) {
            bail!("health interval_ms/fast_interval_ms must be 10..=600000");
        }
        if self.timeout_ms == 0 || self.timeout_ms > self.interval_ms.max(1000) * 10 {
            bail!("health timeout_ms {} out of range", self.timeout_ms);
        }
        if !(1..=100).contains(&self.rise) || !(1..=100).contains(&self.fall) {
            bail!("health rise/fall must be 1..=100");
        }
        if self.jitter_pct > 50 {
            bail!("health jitter_pct {} is over 50", self.jitter_pct);
        }
        if self.port == Some(0) || self.agent_port == Some(0) {
            bail!("health port 0");
        }
        if !self.http_path.starts_with('/') || self.http_path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            bail!("health http_path '{}' must start with / and have no spaces", self.http_path);
        }
        if let Some(h) = &self.http_host {
            if h.is_empty() || h.chars().any(|c| c.is_whitespace() || c.is_control()) {
                bail!("health http_host '{h}' is not a host name");
            }
        }
        self.status_range()?;
        if self.udp_payload.is_empty() || self.udp_payload.len() > 1400 {
            bail!("health udp_payload must be 1..=1400 bytes");
        }
        Ok(())
    }

    /// The accepted HTTP status codes.
    pub fn status_range(&self) -> Result<(u16, u16)> {
        let bad = || anyhow!("health http_status '{}' is not CODE or LOW-HIGH (100..=599)", self.http_status);
        let (lo, hi) = match self.http_status.split_once('-') {
            Some((a, b)) => (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?),
            None => {
                let c: u16 = self.http_status.trim().parse().map_err(|_| bad())?;
                (c, c)
            }
        };
        if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
            return Err(bad());
        }
        Ok((lo, hi))
    }
}

/// The check that applies to a VIP's backends under `cfg`: a TCP connect
/// only makes sense for TCP services, so on a UDP VIP it means no check.
pub fn kind_for(vip: &Vip, cfg: &HealthConfig) -> CheckKind {
    match (cfg.kind, vip.proto) {
        (CheckKind::Tcp, Proto::Udp) => CheckKind::None,
        (k, _) => k,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AllDown, FileConfig};

    #[test]
    fn health_settings() {
        let h = HealthConfig { http_status: "200-299".into(), ..Default::default() };
        assert_eq!(h.status_range().expect("valid"), (200, 299));
        assert_eq!(HealthConfig { http_status: "204".into(), ..Default::default() }.status_range().expect("valid"), (204, 204));
        for bad in ["99", "300-200", "abc", "200-700"] {
            assert!(HealthConfig { http_status: bad.into(), ..Default::default() }.validate().is_err(), "{bad}");
        }
        assert!(HealthConfig { http_path: "health".into(), ..Default::default() }.validate().is_err());
        assert!(HealthConfig { jitter_pct: 80, ..Default::default() }.validate().is_err());
        assert_eq!("http".parse::<CheckKind>().expect("kind"), CheckKind::Http);
        assert!("icmp".parse::<CheckKind>().is_err());
        assert_eq!("fail-open".parse::<AllDown>().expect("mode"), AllDown::FailOpen);
        let c: FileConfig = toml::from_str("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\nall_down = \"fail-open\"\n[vip.health]\nkind = \"http\"\nhttp_path = \"/health\"\n").expect("valid");
        assert_eq!(c.vips[0].health.as_ref().map(|h| h.kind), Some(CheckKind::Http));
        assert_eq!(c.vips[0].all_down, Some(AllDown::FailOpen));
    }
}
