//! What the agent knows about each service and backend: configured
//! settings, health and agent-check state, and what was last published.

use anyhow::{anyhow, bail, Result};
use lb_common::{Algo, Forward, VipInfo};
use std::{collections::BTreeMap, net::IpAddr, time::Instant};

use crate::{
    config::{Admin, AllDown, HealthConfig, Mac, VipOpts},
    quic::ServerId,
};

/// Health of one backend.
#[derive(Clone, Debug)]
pub struct Health {
    /// Passing checks (or no checks configured).
    pub up: bool,
    /// False until the first check result arrived.
    pub checked: bool,
    /// Consecutive successes.
    pub ok_streak: u32,
    /// Consecutive failures.
    pub fail_streak: u32,
    /// Why the last check failed.
    pub last_error: Option<String>,
    /// Number of up/down transitions.
    pub transitions: u64,
    /// Checks run and failed in total.
    pub checks: u64,
    /// Failed checks in total.
    pub failures: u64,
    /// Duration of the last check, milliseconds.
    pub last_latency_ms: Option<f64>,
}

impl Health {
    /// A backend's health before its first check (`up` when it is not checked).
    fn fresh(up: bool) -> Health {
        Health {
            up,
            checked: up,
            ok_streak: 0,
            fail_streak: 0,
            last_error: None,
            transitions: 0,
            checks: 0,
            failures: 0,
            last_latency_ms: None,
        }
    }
}

/// One backend of one VIP.
#[derive(Clone, Debug)]
pub struct Backend {
    /// Address.
    pub ip: IpAddr,
    /// MAC given by the operator, if any.
    pub mac_cfg: Option<Mac>,
    /// MAC in use (given or resolved).
    pub mac: Option<Mac>,
    /// Weight (0 = no new flows).
    pub weight: u32,
    /// Datapath id.
    pub id: u32,
    /// Generation of the id.
    pub gen: u16,
    /// Health state.
    pub health: Health,
    /// Health-check settings of this backend (replace the VIP's), if any.
    pub check: Option<HealthConfig>,
    /// Operator's state.
    pub admin: Admin,
    /// When it last came up (slow start ramps its weight from here).
    pub up_since: Option<Instant>,
    /// Slow-start step (0..=SLOW_START_STEPS) in the published table.
    pub ramp_step: u32,
    /// What the backend's agent check last said.
    pub agent: AgentReport,
    /// Forwarding mode given for this backend (replacing the VIP's), if any.
    pub forward_cfg: Option<Forward>,
    /// Forwarding mode in use: `forward_cfg`, else the VIP's.
    pub forward: Forward,
    /// QUIC server ID (`--server-id`), if any.
    pub server_id: Option<ServerId>,
}

/// What a backend's agent check reports (HAProxy's agent-check).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentReport {
    /// Percentage of the configured weight to use.
    pub pct: u32,
    /// State it asks for (`Ready` = "up").
    pub state: AgentState,
}

impl Default for AgentReport {
    fn default() -> Self {
        AgentReport { pct: 100, state: AgentState::Up }
    }
}

/// A state an agent check can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentState {
    /// Serve normally.
    Up,
    /// Keep flows, no new ones.
    Drain,
    /// Down: no traffic, flows move.
    Down,
}

impl AgentState {
    /// Its name in the state file (`from_name` reads it back).
    pub fn name(self) -> &'static str {
        match self {
            AgentState::Up => "up",
            AgentState::Drain => "drain",
            AgentState::Down => "down",
        }
    }

    /// The state `name` wrote.
    pub fn from_name(s: &str) -> Option<AgentState> {
        [AgentState::Up, AgentState::Drain, AgentState::Down].into_iter().find(|a| a.name() == s)
    }
}

impl AgentReport {
    /// Parse an agent's line: words like `75%`, `up`/`ready`, `drain`,
    /// `down`/`fail`/`stopped`/`maint`; unknown words are ignored. Keeps
    /// what the line does not mention from `prev`.
    pub fn parse(line: &str, prev: AgentReport) -> Result<AgentReport> {
        let mut r = prev;
        let mut understood = false;
        for w in line.split(|c: char| c.is_whitespace() || c == ',').filter(|w| !w.is_empty()) {
            let w = w.to_ascii_lowercase();
            if let Some(p) = w.strip_suffix('%') {
                r.pct = p.parse::<u32>().map_err(|_| anyhow!("bad percentage '{w}'"))?.min(256);
                understood = true;
            } else {
                r.state = match w.as_str() {
                    "up" | "ready" => AgentState::Up,
                    "drain" => AgentState::Drain,
                    "down" | "fail" | "stopped" | "maint" => AgentState::Down,
                    _ => continue,
                };
                understood = true;
            }
        }
        if !understood {
            bail!("agent said nothing usable: {:?}", line.trim());
        }
        Ok(r)
    }
}

/// Slow start raises a weight in this many steps (each one a table rebuild).
pub const SLOW_START_STEPS: u32 = 10;

impl Backend {
    /// A backend in service with datapath id and generation `id`, before
    /// its first check (`up` when it is not checked).
    pub(crate) fn new(ip: IpAddr, mac_cfg: Option<Mac>, weight: u32, id: (u32, u16), up: bool, now: Instant) -> Backend {
        Backend {
            ip,
            mac_cfg,
            mac: mac_cfg,
            weight,
            id: id.0,
            gen: id.1,
            health: Health::fresh(up),
            check: None,
            admin: Admin::Ready,
            up_since: up.then_some(now),
            ramp_step: 0,
            agent: AgentReport::default(),
            forward_cfg: None,
            forward: Forward::L2,
            server_id: None,
        }
    }
    /// Has what its forwarding mode needs: a MAC for L2 (routed backends'
    /// next hops come from the kernel's FIB in the datapath).
    pub fn reachable(&self) -> bool {
        self.forward.is_routed() || self.mac.is_some()
    }
    /// May carry traffic (existing flows at least).
    pub fn alive(&self) -> bool {
        self.health.up && self.reachable() && self.admin != Admin::Maint && self.agent.state != AgentState::Down
    }
    /// Gets new flows.
    pub fn usable(&self) -> bool {
        self.alive() && self.admin == Admin::Ready && self.agent.state == AgentState::Up && self.effective_weight(SLOW_START_STEPS) > 0
    }
    /// Slow-start step at `now` (SLOW_START_STEPS = full weight).
    pub(crate) fn step(&self, now: Instant, slow_start_ms: u64) -> u32 {
        match (self.up_since, slow_start_ms) {
            (Some(t), ms) if ms > 0 => {
                let f = now.saturating_duration_since(t).as_millis() as u64 * SLOW_START_STEPS as u64 / ms;
                (f as u32 + 1).min(SLOW_START_STEPS)
            }
            _ => SLOW_START_STEPS,
        }
    }
    /// The weight the table uses at slow-start step `step`: weight × step,
    /// so a backend at full weight has weight × SLOW_START_STEPS and a
    /// ramping one a tenth, two tenths… of that (shares stay proportional).
    pub(crate) fn effective_weight(&self, step: u32) -> u32 {
        let w = self.weight * step * self.agent.pct / 100;
        if w == 0 && self.weight > 0 && self.agent.pct > 0 {
            1
        } else {
            w
        }
    }
    pub(crate) fn key_bytes(&self) -> Vec<u8> {
        match self.ip {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        }
    }
}

/// One virtual service.
#[derive(Clone, Debug)]
pub struct VipState {
    /// Datapath id (stats index).
    pub id: u32,
    /// Scheduling algorithm.
    pub algo: Algo,
    /// Source-hash persistence, seconds (0 = none).
    pub persist_secs: u16,
    /// Health-check settings of its backends.
    pub health: HealthConfig,
    /// `health` was set for this VIP (not inherited from the agent).
    pub health_explicit: bool,
    /// What to do when every backend is down.
    pub all_down: AllDown,
    /// Slow start: a backend's weight ramps up over this long after it
    /// comes up (0 = at once).
    pub slow_start_ms: u64,
    /// Datapath options (`--hash`, `--answer-ping`).
    pub opts: VipOpts,
    /// How its backends are reached unless they say otherwise.
    pub forward: Forward,
    /// All backends are down and `all_down` is fail-open: balancing over them anyway.
    pub failing_open: bool,
    /// The VIP entry as last published to the datapath.
    pub published: VipInfo,
    /// Ring slot holding the published table, if any.
    pub table_slot: Option<u32>,
    /// Backends by address.
    pub backends: BTreeMap<IpAddr, Backend>,
    /// Server ID → backend id as last published to `XLB_QUIC_IDS`.
    pub quic_ids: BTreeMap<u16, u32>,
    /// The published table or sequence (backend ids), for measuring churn.
    pub table: Vec<u32>,
    /// The shared Maglev layout `table` comes from, if it was built here
    /// (not when read back from the maps after a restart).
    pub layout: Option<crate::tables::LayoutUse>,
    /// When its table was last published (wall clock, for status).
    pub published_at: Option<std::time::SystemTime>,
    /// Traffic of backends since removed (a VIP's counters are the sum over
    /// its backends, kept here when one leaves).
    pub retired: lb_common::Counters,
    /// What status reads from the published table, computed on first use
    /// after each publication (`facts`), not on every status request.
    pub facts: std::cell::OnceCell<TableFacts>,
}

/// Facts of a published table that status, metrics and HA read.
#[derive(Clone, Debug, Default)]
pub struct TableFacts {
    /// `fingerprint` of the table.
    pub fingerprint: u64,
    /// Entries per backend id.
    pub slots: BTreeMap<u32, usize>,
}

impl VipState {
    /// The published table's facts, computed on first use after a
    /// publication: from its shared layout when it has one (once per layout
    /// for all the VIPs that use it: after a burst of 512 publications, the
    /// first status walked 512 tables under the agent's lock, ~1 s), else
    /// by one walk of the table.
    pub fn facts(&self) -> &TableFacts {
        self.facts.get_or_init(|| match &self.layout {
            Some(l) => TableFacts { fingerprint: l.fingerprint(self.algo), slots: l.slots() },
            None => {
                let mut counts: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
                for &id in &self.table {
                    *counts.entry(id).or_insert(0) += 1;
                }
                TableFacts { fingerprint: fingerprint(self), slots: counts.into_iter().collect() }
            }
        })
    }
}

/// A fingerprint of a VIP's published table (`tables::table_fingerprint`:
/// over the backends' addresses, the same on every node).
pub fn fingerprint(s: &VipState) -> u64 {
    // Each backend's address bytes, looked up once (not per table entry).
    let addrs: std::collections::HashMap<u32, Vec<u8>> = s.backends.values().map(|b| (b.id, b.key_bytes())).collect();
    let mut last: Option<(u32, &[u8])> = None;
    let entries = s.table.iter().map(|&id| {
        let bytes: &[u8] = match last {
            Some((l, b)) if l == id => b,
            _ => addrs.get(&id).map_or(&[0xff], Vec::as_slice),
        };
        last = Some((id, bytes));
        bytes
    });
    crate::tables::table_fingerprint(s.algo, entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_state_names_round_trip() {
        for a in [AgentState::Up, AgentState::Drain, AgentState::Down] {
            assert_eq!(AgentState::from_name(a.name()), Some(a));
        }
        assert_eq!(AgentState::from_name("maint"), None);
    }

    #[test]
    fn agent_lines() {
        let d = AgentReport::default();
        assert_eq!(AgentReport::parse("75%\n", d).expect("pct"), AgentReport { pct: 75, state: AgentState::Up });
        assert_eq!(AgentReport::parse("drain", d).expect("drain").state, AgentState::Drain);
        let r = AgentReport::parse("up 50%", AgentReport { pct: 100, state: AgentState::Down }).expect("both");
        assert_eq!(r, AgentReport { pct: 50, state: AgentState::Up });
        assert_eq!(AgentReport::parse("MAINT", d).expect("maint").state, AgentState::Down);
        assert_eq!(AgentReport::parse("ready 10%", r).expect("kept").pct, 10);
        assert!(AgentReport::parse("hello", d).is_err());
        assert!(AgentReport::parse("x%", d).is_err());
    }
}
