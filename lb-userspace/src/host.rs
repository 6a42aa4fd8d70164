//! What the daemon knows beside the agent (how and where the program runs,
//! its config file, HA switches, the sync) and the requests that need it:
//! status with those facts, `config reload`, detach. The API and the
//! daemon's signal handling both read it; the agent knows none of it.

use anyhow::{anyhow, Result};
use std::path::PathBuf;

use crate::agent::{Agent, Status};

/// What the daemon knows beside the agent: how and where the program runs
/// (for `status`), the config file (`config reload` without a file, and
/// SIGHUP) and how to ask it to detach. None of it is the agent's concern.
#[derive(Debug, Default)]
pub struct Host {
    /// The agent's `--config` file, if any.
    pub config_path: Option<PathBuf>,
    /// How the program is attached (`native`, `generic`).
    pub attach_mode: String,
    /// Pin directory of the maps, when pinned.
    pub pinned: Option<PathBuf>,
    /// The `--pin-root` given, where `xlb decap` pins too (its counters go
    /// into status).
    pub pin_root: Option<PathBuf>,
    /// Why the pins die with the agent (forwarding stops when it exits), if they do.
    pub pins_lost_on_exit: Option<String>,
    /// Asks the daemon to detach and exit (`xlb detach`).
    pub detach_tx: Option<tokio::sync::mpsc::UnboundedSender<()>>,
    /// Told by the daemon when it has detached, so `xlb detach` answers then.
    pub detached: tokio::sync::Notify,
    /// Told by the API once that answer is written (the daemon then exits).
    pub answered: tokio::sync::Notify,
    /// Told by the API when a request changed the agent: the daemon's
    /// `save_soon_loop` writes the state file (after the answer).
    pub save_soon: std::sync::Arc<tokio::sync::Notify>,
    /// This node's HA switches (drain, last verdict); the daemon sets them.
    pub ha: Option<std::sync::Arc<crate::ha::Node>>,
    /// The connection-table sync, when on.
    pub sync: Option<std::sync::Arc<crate::ctsync::Syncer>>,
}

impl Host {
    /// The agent's status with what the daemon knows added.
    pub fn status(&self, agent: &Agent) -> Result<Status> {
        let mut s = agent.status()?;
        self.fill(&mut s);
        s.ha = self.ha.as_ref().map(|n| agent.ha_verdict(n.drained()));
        Ok(s)
    }

    /// Add what the daemon knows to the agent's status.
    pub fn fill(&self, s: &mut Status) {
        s.attach_mode = self.attach_mode.clone();
        s.pinned = self.pinned.as_ref().map(|p| p.display().to_string());
        s.pins_lost_on_exit = self.pins_lost_on_exit.clone();
        s.sync = self.sync.as_ref().map(|x| x.stats());
        if let Some(root) = &self.pin_root {
            s.decap = crate::encap::decap_all(root).unwrap_or_else(|e| {
                log::warn!("cannot read the xlb decap counters: {e:#}");
                Vec::new()
            });
        }
    }

    /// The file `config reload` applies: `path`, or the agent's `--config`.
    pub fn config_file(&self, path: Option<PathBuf>) -> Result<PathBuf> {
        path.or_else(|| self.config_path.clone()).ok_or_else(|| anyhow!("the agent has no --config file; give one"))
    }

    /// `config reload` (API) and SIGHUP: read `path` or the agent's
    /// `--config`, validate it in full, apply exactly its difference (a
    /// file with any error changes nothing); a line per change.
    pub fn reload(&self, agent: &mut Agent, path: Option<PathBuf>) -> Result<Vec<String>> {
        agent.reload(&self.config_file(path)?)
    }
}
