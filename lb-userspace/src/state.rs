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
    /// The deployment this file belongs to (absent in files of agents
    /// before it was recorded: the pinned link decides then).
    #[serde(default)]
    pub identity: Option<crate::pin::identity::Identity>,
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
    pub mac: Option<crate::config::Mac>,
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
    /// Agent check's state: `up`, `drain` or `down` (borrowed when
    /// written: a save allocates nothing per backend for it).
    pub agent_state: std::borrow::Cow<'static, str>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_atomically_loads_back_and_rejects_other_versions() {
        let dir = std::env::temp_dir().join(format!("xlb-state-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("eth0.json");
        assert_eq!(Snapshot::load(&path).expect("no file is not an error"), None);
        let s = Snapshot {
            version: STATE_VERSION,
            layout: "v1-test".into(),
            identity: Some(crate::pin::identity::Identity { netns_cookie: 4097, ifindex: 2 }),
            mode: "native".into(),
            config: "[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n".into(),
            vips: vec![VipRuntime {
                vip: "10.0.0.1:80/tcp".into(),
                id: 3,
                retired: [1, 2, 3],
                backends: vec![BackendRuntime {
                    ip: "10.0.0.2".parse().expect("ip"),
                    id: 7,
                    gen: 9,
                    mac: Some("02:00:00:00:00:02".parse().expect("mac")),
                    up: true,
                    checked: true,
                    checks: 4,
                    failures: 1,
                    transitions: 1,
                    ramp_step: 10,
                    agent_pct: 100,
                    agent_state: "up".into(),
                }],
            }],
        };
        s.save(&path).expect("save");
        assert!(!path.with_extension("json.tmp").exists(), "the temporary file was renamed");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.contains(r#""mac":"02:00:00:00:00:02""#) && text.contains(r#""agent_state":"up""#), "spelled as before: {text}");
        assert_eq!(Snapshot::load(&path).expect("load"), Some(s.clone()));
        let old = Snapshot { version: STATE_VERSION + 1, ..s };
        old.save(&path).expect("save");
        assert!(Snapshot::load(&path).is_err(), "another format version is refused");
        std::fs::write(&path, "not json").expect("write");
        assert!(Snapshot::load(&path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
