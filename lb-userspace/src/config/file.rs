//! The config file's schema (TOML), as written: strings and optional
//! fields, turned into a validated `Desired` by `Desired::parse`.

use serde::{Deserialize, Serialize};

use super::{text, Admin, AllDown, HashMode, HealthConfig};

/// A backend in the config file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Backend IP address.
    pub ip: String,
    /// MAC; resolved from the neighbour table when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Weight (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Health checking of this backend (replaces the VIP's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthConfig>,
    /// Operator's state: up (default), drain or maint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<Admin>,
    /// How to reach it, replacing the VIP's `forward`: l2, ipip or gue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward: Option<String>,
}

/// A VIP in the config file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipConfig {
    /// `ADDR:PORT/PROTO`.
    pub address: String,
    /// Scheduling algorithm (default `maglev`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algo: Option<String>,
    /// Source-hash persistence in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persist_timeout: Option<u32>,
    /// Health checking of this VIP's backends (replaces the agent's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthConfig>,
    /// `drop` (default) or `fail-open` when every backend is down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all_down: Option<AllDown>,
    /// Slow start: milliseconds over which a backend that comes up ramps to
    /// its full weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start_ms: Option<u64>,
    /// `5-tuple` (default) or `dst-port`.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "text::opt")]
    pub hash: Option<HashMode>,
    /// Answer pings to the VIP's address (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_ping: Option<bool>,
    /// How its backends are reached (default `l2`): l2, ipip or gue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward: Option<String>,
    /// Backends.
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendConfig>,
}

/// The agent's config file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Health-check settings.
    #[serde(default)]
    pub health: HealthConfig,
    /// Virtual services.
    #[serde(default, rename = "vip")]
    pub vips: Vec<VipConfig>,
    /// Connection-table sync with other balancers (read at start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncConfig>,
}

/// The config file's `[sync]`: what `--sync-peer`, `--sync-key` and
/// `--sync-listen` say (the flags win when given).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// Peers, `ADDR` or `ADDR:PORT`.
    pub peers: Vec<String>,
    /// File with the shared key.
    pub key_file: String,
    /// Where to receive, `ADDR:PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_rejects_unknown_keys() {
        let good = "[health]\ninterval_ms = 100\n[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n[[vip.backend]]\nip = \"10.0.0.2\"\n";
        let c: FileConfig = toml::from_str(good).expect("valid");
        assert_eq!(c.vips[0].backends[0].ip, "10.0.0.2");
        assert_eq!(c.health.interval_ms, 100);
        assert_eq!(c.health.fall, HealthConfig::default().fall);
        assert!(toml::from_str::<FileConfig>("[[vip]]\naddres = \"x\"\n").is_err());
    }
}
