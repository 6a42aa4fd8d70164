//! The agent's state file: what a restarted agent needs to adopt pinned
//! maps without disturbing a single flow. The maps hold ids, generations
//! and tables but not backend addresses, settings or health, so the agent
//! rewrites this file (atomically: temporary file, then rename) whenever it
//! publishes a change. It sits in a tmpfs (`/run/xlb`), which like bpffs
//! is gone after a reboot.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::{net::IpAddr, path::Path};

/// Format version of the file; a file of another version is ignored.
pub const STATE_VERSION: u32 = 1;

/// The whole file.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// `STATE_VERSION`.
    pub version: u32,
    /// Pin layout the ids below refer to (`pin::layout_name`).
    pub layout: String,
    /// Attach mode of the pinned link (`native`/`generic`).
    pub mode: String,
    /// The running configuration, as `xlb config dump` prints it (TOML).
    pub config: String,
    /// Datapath ids and health of every VIP.
    pub vips: Vec<VipRuntime>,
}

/// A VIP's runtime state.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VipRuntime {
    /// `ADDR:PORT/PROTO`.
    pub vip: String,
    /// VIP id in the datapath.
    pub id: u32,
    /// Traffic of backends since removed: packets, bytes, new flows.
    pub retired: [u64; 3],
    /// Its backends.
    pub backends: Vec<BackendRuntime>,
}

/// A backend's runtime state.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendRuntime {
    /// Address.
    pub ip: IpAddr,
    /// Backend id in the datapath.
    pub id: u32,
    /// Generation of the id (connection-table entries carry it).
    pub gen: u16,
    /// MAC in use (configured or resolved).
    pub mac: Option<String>,
    /// Passing its checks.
    pub up: bool,
    /// Checked at least once.
    pub checked: bool,
    /// Checks, failures and up/down transitions so far.
    pub checks: u64,
    /// Failed checks so far.
    pub failures: u64,
    /// Up/down transitions so far.
    pub transitions: u64,
    /// Slow-start step in the published table.
    pub ramp_step: u32,
    /// Agent check's weight percentage.
    pub agent_pct: u32,
    /// Agent check's state: `up`, `drain` or `down`.
    pub agent_state: String,
}

impl Snapshot {
    /// Write to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec(self).context("cannot render the state")?;
        std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
    }

    /// Read `path`; `None` when there is no file.
    pub fn load(path: &Path) -> Result<Option<Snapshot>> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let s: Snapshot = serde_json::from_slice(&text).with_context(|| format!("{} is not a state file", path.display()))?;
        if s.version != STATE_VERSION {
            bail!("{} has state format {} (this agent reads {STATE_VERSION})", path.display(), s.version);
        }
        Ok(Some(s))
    }
}
