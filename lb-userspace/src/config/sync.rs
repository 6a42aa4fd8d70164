//! Connection-table sync as operators configure it (`--sync-peer`,
//! `--sync-key`, `--sync-listen`, or the config file's `[sync]`): the one
//! parser and check for both; `crate::ctsync` runs it.

use anyhow::{bail, Result};
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    str::FromStr,
};

/// UDP port of the sync when a peer or `--sync-listen` names none.
pub const DEFAULT_PORT: u16 = 7470;

/// A peer: `ADDR` or `ADDR:PORT` (`[V6ADDR]:PORT`), the port defaulting
/// to `DEFAULT_PORT`. The one parser for the CLI and the config file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncPeer(pub SocketAddr);

impl FromStr for SyncPeer {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim();
        let addr = match t.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => match t.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
                Ok(ip) => SocketAddr::new(ip, DEFAULT_PORT),
                Err(_) => bail!("invalid sync peer '{s}': expected ADDR or ADDR:PORT (e.g. 10.0.0.2, 10.0.0.2:7470, [fd00::2]:7470)"),
            },
        };
        if addr.port() == 0 || addr.ip().is_unspecified() || addr.ip().is_multicast() {
            bail!("invalid sync peer '{s}': a unicast address and a port above 0");
        }
        Ok(SyncPeer(addr))
    }
}

impl fmt::Display for SyncPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Everything the sync is told (CLI flags or the config file's `[sync]`).
#[derive(Clone, Debug, PartialEq)]
pub struct SyncSettings {
    /// Where entries go.
    pub peers: Vec<SyncPeer>,
    /// File holding the shared key.
    pub key_file: PathBuf,
    /// Where entries are received (default: every address, `DEFAULT_PORT`).
    pub listen: Option<SocketAddr>,
}

impl SyncSettings {
    /// Check the settings that do not need the key file.
    pub fn validate(&self) -> Result<()> {
        if self.peers.is_empty() {
            bail!("sync needs at least one peer (--sync-peer)");
        }
        if let Some(l) = self.listen {
            if l.port() == 0 {
                bail!("invalid sync listen address {l}: give a port");
            }
        }
        Ok(())
    }

    /// The settings of `xlb agent`'s flags: none given, none (or the
    /// config file's); peers and key go together.
    pub fn from_flags(peers: Vec<SyncPeer>, key: Option<PathBuf>, listen: Option<SocketAddr>) -> Result<Option<SyncSettings>> {
        match (peers.is_empty(), key) {
            (true, None) if listen.is_none() => Ok(None),
            (false, Some(key_file)) => {
                let s = SyncSettings { peers, key_file, listen };
                s.validate()?;
                Ok(Some(s))
            }
            _ => bail!("--sync-peer and --sync-key go together (--sync-listen needs them)"),
        }
    }
}
