//! The agent's state and the one path by which it reaches the datapath.
//!
//! Data flows one way: operations (CLI/API, config file) change the desired
//! state after validating everything they touch; health results change
//! backends' runtime state; `reconcile` turns a VIP's state into map writes.
//! A reconcile publishes a new Maglev table without readers ever seeing a
//! half-written one: the table goes to a free ring slot first, then a single
//! VIP-entry update switches the datapath over, and the old slot is recycled
//! last (FIFO, so it is not rewritten while a packet may still read it).

use anyhow::{anyhow, bail, Result};
use lb_common::{Algo, BackendInfo, VipInfo, BACKEND_F_ALIVE};
use serde::Serialize;

pub use crate::config::Admin;
use std::{
    collections::{BTreeMap, VecDeque},
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::{
    config::{self, AllDown, CheckKind, Desired, FileConfig, HealthConfig, Mac, Proto, Vip},
    maps::Datapath,
    tables,
};

mod adopt;
pub use adopt::{in_use as backend_entry_in_use, Adoption, Persist};

/// A scheduling algorithm as operators name it.
pub fn parse_algo(s: &str) -> Result<Algo> {
    Algo::ALL.into_iter().find(|a| a.name() == s).ok_or_else(|| {
        let names: Vec<&str> = Algo::ALL.iter().map(|a| a.name()).collect();
        anyhow!("unknown algorithm '{s}' (available: {})", names.join(", "))
    })
}

/// Check a persistence timeout for an algorithm.
pub fn check_persist(algo: Algo, secs: u32) -> Result<u16> {
    if secs > 0 && algo != Algo::SourceHash {
        bail!("--persist-timeout only applies to the source-hash algorithm");
    }
    u16::try_from(secs).map_err(|_| anyhow!("persistence timeout {secs} s is over the maximum of {} s", u16::MAX))
}

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
    /// When the next check is due.
    pub next_check: Instant,
    /// Duration of the last check, milliseconds.
    pub last_latency_ms: Option<f64>,
    /// A check is running.
    pub in_flight: bool,
}

impl Health {
    /// A backend's health before its first check (`up` when it is not checked).
    fn fresh(up: bool, now: Instant) -> Health {
        Health {
            up,
            checked: up,
            ok_streak: 0,
            fail_streak: 0,
            last_error: None,
            transitions: 0,
            checks: 0,
            failures: 0,
            next_check: now,
            in_flight: false,
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
    fn new(ip: IpAddr, mac_cfg: Option<Mac>, weight: u32, id: (u32, u16), up: bool, now: Instant) -> Backend {
        Backend {
            ip,
            mac_cfg,
            mac: mac_cfg,
            weight,
            id: id.0,
            gen: id.1,
            health: Health::fresh(up, now),
            check: None,
            admin: Admin::Ready,
            up_since: up.then_some(now),
            ramp_step: 0,
            agent: AgentReport::default(),
        }
    }
    /// May carry traffic (existing flows at least).
    pub fn alive(&self) -> bool {
        self.health.up && self.mac.is_some() && self.admin != Admin::Maint && self.agent.state != AgentState::Down
    }
    /// Gets new flows.
    pub fn usable(&self) -> bool {
        self.alive() && self.admin == Admin::Ready && self.agent.state == AgentState::Up && self.effective_weight(SLOW_START_STEPS) > 0
    }
    /// Slow-start step at `now` (SLOW_START_STEPS = full weight).
    fn step(&self, now: Instant, slow_start_ms: u64) -> u32 {
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
    fn effective_weight(&self, step: u32) -> u32 {
        let w = self.weight * step * self.agent.pct / 100;
        if w == 0 && self.weight > 0 && self.agent.pct > 0 {
            1
        } else {
            w
        }
    }
    fn key_bytes(&self) -> Vec<u8> {
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
    /// All backends are down and `all_down` is fail-open: balancing over them anyway.
    pub failing_open: bool,
    /// The VIP entry as last published to the datapath.
    pub published: VipInfo,
    /// Ring slot holding the published table, if any.
    pub ring_slot: Option<u32>,
    /// Backends by address.
    pub backends: BTreeMap<IpAddr, Backend>,
    /// The published table or sequence (backend ids), for measuring churn.
    pub table: Vec<u32>,
    /// Traffic of backends since removed (a VIP's counters are the sum over
    /// its backends, kept here when one leaves).
    pub retired: lb_common::Counters,
}

/// What a VIP's datapath state should be, computed without touching it.
struct Plan {
    /// Ids whose entries are alive.
    alive: Vec<u32>,
    /// Effective weights of the backends in the table.
    weights: std::collections::HashMap<u32, u32>,
    /// Slow-start steps used.
    steps: std::collections::HashMap<u32, u32>,
    /// The table or sequence.
    table: Vec<u32>,
    /// Entries that differ from the published table.
    moved: usize,
    /// Every backend is down and the VIP fails open.
    failing_open: bool,
}

/// Compute a VIP's plan at `now` (slow start included).
fn plan(state: &VipState, ring_size: u32, now: Instant) -> Result<Plan> {
    // All down and fail-open: treat every backend with a known MAC as up.
    let failing_open = state.all_down == AllDown::FailOpen
        && !state.backends.values().any(|b| b.usable())
        && state.backends.values().any(|b| b.mac.is_some() && b.weight > 0 && b.admin == Admin::Ready);
    let alive_now = |b: &Backend| b.alive() || (failing_open && b.mac.is_some() && b.admin != Admin::Maint);
    let usable_now = |b: &Backend| b.usable() || (failing_open && b.mac.is_some() && b.weight > 0 && b.admin == Admin::Ready);
    let mut steps = std::collections::HashMap::new();
    let mut weights = std::collections::HashMap::new();
    let mut keys: Vec<(Vec<u8>, u32, u32)> = Vec::new();
    for b in state.backends.values().filter(|b| usable_now(b)) {
        let step = b.step(now, state.slow_start_ms);
        let w = b.effective_weight(step);
        steps.insert(b.id, step);
        weights.insert(b.id, w);
        keys.push((b.key_bytes(), w, b.id));
    }
    let members: Vec<tables::Member> = keys.iter().map(|(k, w, id)| tables::Member { key: k, weight: *w, id: *id }).collect();
    let table = tables::build(state.algo, &members, ring_size)?;
    let moved = if state.table.len() == table.len() {
        state.table.iter().zip(&table).filter(|(a, b)| a != b).count()
    } else {
        table.len().max(state.table.len())
    };
    let alive = state.backends.values().filter(|b| alive_now(b)).map(|b| b.id).collect();
    Ok(Plan { alive, weights, steps, table, moved, failing_open })
}

/// Settings of an agent.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// MAC of the balancer's interface (the rewritten source MAC, and the
    /// first destination MAC the datapath acts on).
    pub iface_mac: Mac,
    /// Further destination MACs to act on (`--accept-mac`, e.g. keepalived's VRRP MAC).
    pub accept_macs: Vec<Mac>,
    /// Health checking.
    pub health: HealthConfig,
}

/// What a health job found.
#[derive(Clone, Debug)]
pub struct CheckOutcome {
    /// The check passed (always true for `none` checks).
    pub ok: bool,
    /// Why not.
    pub error: Option<String>,
    /// The backend's MAC from the neighbour table, if it was looked up and found.
    pub mac: Option<Mac>,
    /// How long the check took, milliseconds.
    pub latency_ms: Option<f64>,
    /// The agent check's line, or why it failed.
    pub agent: Option<Result<String, String>>,
}

/// A health job to run: what to check.
#[derive(Clone, Debug)]
pub struct CheckJob {
    /// The VIP.
    pub vip: Vip,
    /// The backend.
    pub ip: IpAddr,
    /// The check to run (`None`: only resolve the MAC).
    pub kind: CheckKind,
    /// Its settings.
    pub cfg: HealthConfig,
    /// Look the MAC up.
    pub resolve_mac: bool,
    /// Check timeout.
    pub timeout: Duration,
}

/// The check that applies to a VIP's backends under `cfg`: a TCP connect
/// only makes sense for TCP services, so on a UDP VIP it means no check.
pub fn kind_for(vip: &Vip, cfg: &HealthConfig) -> CheckKind {
    match (cfg.kind, vip.proto) {
        (CheckKind::Tcp, Proto::Udp) => CheckKind::None,
        (k, _) => k,
    }
}

/// `ms` lengthened or shortened at random by up to `pct` percent.
fn jittered(ms: u64, pct: u32) -> Duration {
    use std::hash::BuildHasher;
    let spread = ms * pct as u64 / 100;
    if spread == 0 {
        return Duration::from_millis(ms);
    }
    let r = std::collections::hash_map::RandomState::new().hash_one(ms);
    Duration::from_millis(ms - spread + r % (2 * spread + 1))
}

/// The agent.
pub struct Agent {
    /// The datapath it owns.
    pub dp: Datapath,
    opts: AgentOptions,
    vips: BTreeMap<Vip, VipState>,
    free_vip_ids: VecDeque<u32>,
    free_ring_slots: VecDeque<u32>,
    free_backend_ids: VecDeque<u32>,
    backend_gens: Vec<u16>,
    /// Connection-table entries at the last census (and when).
    census: Option<(u64, Instant)>,
    /// The config file `config reload` and SIGHUP read, if any.
    pub config_path: Option<std::path::PathBuf>,
    /// The state file kept for restarts (pinned deployments only).
    pub persist: Option<Persist>,
    /// How the program is attached (`native`, `generic`), for status and the state file.
    pub attach_mode: String,
    /// Pin directory of the maps, when pinned.
    pub pinned: Option<std::path::PathBuf>,
    /// Why the pins die with the agent (forwarding stops when it exits), if they do.
    pub pins_lost_on_exit: Option<String>,
    /// Asks the daemon to detach and exit (`xlb detach`).
    pub detach_tx: Option<tokio::sync::mpsc::UnboundedSender<()>>,
}

impl Agent {
    /// An agent with no services over a loaded datapath.
    pub fn new(dp: Datapath, opts: AgentOptions) -> Result<Agent> {
        opts.health.validate()?;
        let macs: Vec<[u8; 6]> = std::iter::once(opts.iface_mac).chain(opts.accept_macs.iter().copied()).map(|m| m.0).collect();
        let mut dp = dp;
        dp.set_accepted_macs(&macs)?;
        let free_vip_ids = (0..dp.opts.max_vips).collect();
        let free_ring_slots = (0..dp.opts.ring_slots()).collect();
        let free_backend_ids = (0..dp.max_backends()).collect();
        let backend_gens = vec![0; dp.max_backends() as usize];
        Ok(Agent {
            dp,
            opts,
            vips: BTreeMap::new(),
            free_vip_ids,
            free_ring_slots,
            free_backend_ids,
            backend_gens,
            census: None,
            config_path: None,
            persist: None,
            attach_mode: "not attached".to_string(),
            pinned: None,
            pins_lost_on_exit: None,
            detach_tx: None,
        })
    }

    /// The services.
    pub fn vips(&self) -> &BTreeMap<Vip, VipState> {
        &self.vips
    }

    /// Health settings.
    pub fn health_config(&self) -> &HealthConfig {
        &self.opts.health
    }

    /// Add a service (with no backends: its packets are dropped and
    /// counted), checked with the agent's health settings.
    pub fn add_vip(&mut self, vip: Vip, algo: Algo, persist_secs: u16) -> Result<()> {
        self.add_vip_with(vip, algo, persist_secs, None, AllDown::Drop)
    }

    /// Add a service with its own health settings and all-down behaviour.
    pub fn add_vip_with(&mut self, vip: Vip, algo: Algo, persist_secs: u16, health: Option<HealthConfig>, all_down: AllDown) -> Result<()> {
        check_persist(algo, persist_secs as u32)?;
        if let Some(h) = &health {
            h.validate()?;
        }
        let health_explicit = health.is_some();
        let health = health.unwrap_or_else(|| self.opts.health.clone());
        if self.vips.contains_key(&vip) {
            bail!("VIP {vip} already exists");
        }
        let id = *self
            .free_vip_ids
            .front()
            .ok_or_else(|| anyhow!("cannot add VIP {vip}: all {} VIP slots are in use", self.dp.opts.max_vips))?;
        let published = VipInfo { vip_id: id, algo: algo as u8, persist_secs, ..Default::default() };
        self.dp.set_vip(&vip.key(), &published)?;
        self.free_vip_ids.pop_front();
        self.vips.insert(
            vip,
            VipState {
                id,
                algo,
                persist_secs,
                health,
                health_explicit,
                all_down,
                slow_start_ms: 0,
                failing_open: false,
                published,
                ring_slot: None,
                backends: BTreeMap::new(),
                table: Vec::new(),
                retired: Default::default(),
            },
        );
        log::info!("VIP {vip} added ({})", algo.name());
        self.sync_filter(&vip)?;
        self.sync_fragment_alias(&vip)?;
        self.save_state();
        Ok(())
    }

    /// Remove a service and its backends.
    pub fn del_vip(&mut self, vip: &Vip) -> Result<()> {
        let state = self.vips.get(vip).ok_or_else(|| anyhow!("unknown VIP {vip}"))?;
        // Unpublish first: from here on its packets are XDP_PASS.
        self.dp.del_vip(&vip.key())?;
        let ids: Vec<u32> = state.backends.values().map(|b| b.id).collect();
        let state = self.vips.remove(vip).expect("checked above");
        for id in ids {
            self.release_backend_id(id)?;
        }
        if let Some(slot) = state.ring_slot {
            self.free_ring_slots.push_back(slot);
        }
        self.free_vip_ids.push_back(state.id);
        log::info!("VIP {vip} removed");
        self.sync_filter(vip)?;
        self.sync_fragment_alias(vip)?;
        self.save_state();
        Ok(())
    }

    /// Add a backend to a service. Without a MAC, it is resolved from the
    /// kernel's neighbour table; the backend carries traffic once it is
    /// resolved and has passed its first health check.
    pub fn add_backend(&mut self, vip: &Vip, ip: IpAddr, mac: Option<Mac>, weight: u32) -> Result<(usize, usize)> {
        self.add_backends(vip, &[(ip, mac, weight)])
    }

    /// Add several backends to a service with one table rebuild. All are
    /// validated first: on any error nothing is added.
    pub fn add_backends(&mut self, vip: &Vip, list: &[(IpAddr, Option<Mac>, u32)]) -> Result<(usize, usize)> {
        let state = self.vips.get(vip).ok_or_else(|| anyhow!("unknown VIP {vip}"))?;
        let checks = kind_for(vip, &state.health);
        let mut seen = std::collections::BTreeSet::new();
        for &(ip, _, weight) in list {
            config::check_weight(weight)?;
            if ip.is_ipv4() != vip.addr.is_ipv4() {
                bail!("backend {ip} and VIP {vip} are of different address families");
            }
            if state.backends.contains_key(&ip) || !seen.insert(ip) {
                bail!("backend {ip} already exists in VIP {vip}");
            }
        }
        if state.algo == Algo::LeastConn
            && state.backends.len() + list.len() > lb_common::MAX_LEAST_CONN_BACKENDS as usize
        {
            bail!("VIP {vip} (least-conn) would exceed the maximum of {} backends", lb_common::MAX_LEAST_CONN_BACKENDS);
        }
        if self.free_backend_ids.len() < list.len() {
            bail!("not enough free backend ids ({} left)", self.free_backend_ids.len());
        }
        let now = Instant::now();
        let up = checks == CheckKind::None;
        for &(ip, mac, weight) in list {
            let (id, gen) = self.claim_backend_id()?;
            let b = Backend::new(ip, mac, weight, (id, gen), up, now);
            self.vips.get_mut(vip).expect("checked above").backends.insert(ip, b);
            log::info!("VIP {vip}: backend {ip} added (weight {weight})");
        }
        self.reconcile_counted(vip)
    }

    /// Give a backend its own health settings (replacing the VIP's).
    pub fn set_backend_check(&mut self, vip: &Vip, ip: IpAddr, check: Option<HealthConfig>) -> Result<()> {
        if let Some(h) = &check {
            h.validate()?;
        }
        let state = self.vips.get_mut(vip).ok_or_else(|| anyhow!("unknown VIP {vip}"))?;
        let b = state.backends.get_mut(&ip).ok_or_else(|| anyhow!("backend {ip} is not in VIP {vip}"))?;
        let kind = kind_for(vip, check.as_ref().unwrap_or(&state.health));
        b.check = check;
        if !b.health.checked || kind == CheckKind::None {
            // Not judged yet (or no longer checked): start as the new check says.
            b.health.up = kind == CheckKind::None;
            b.health.checked = b.health.up;
            b.health.next_check = Instant::now();
        }
        self.reconcile(vip)
    }

    /// Change a backend's weight. Weight 0 drains it: existing flows stay,
    /// new flows go elsewhere.
    pub fn set_weight(&mut self, vip: &Vip, ip: IpAddr, weight: u32) -> Result<()> {
        self.set_backend(vip, ip, Some(weight), None, false).map(|_| ())
    }

    /// Change a backend's weight and/or operator state; with `dry_run`,
    /// only report what the table change would be. Returns (entries that
    /// change, table size).
    pub fn set_backend(&mut self, vip: &Vip, ip: IpAddr, weight: Option<u32>, admin: Option<Admin>, dry_run: bool) -> Result<(usize, usize)> {
        if let Some(w) = weight {
            config::check_weight(w)?;
        }
        let ring_size = self.dp.opts.ring_size;
        let state = self.vips.get(vip).ok_or_else(|| anyhow!("unknown VIP {vip}"))?;
        if !state.backends.contains_key(&ip) {
            bail!("backend {ip} is not in VIP {vip}");
        }
        let mut next = state.clone();
        let b = next.backends.get_mut(&ip).expect("checked above");
        if let Some(w) = weight {
            b.weight = w;
        }
        if let Some(a) = admin {
            if a == Admin::Ready && b.admin == Admin::Maint {
                // Back from maintenance: checked again from scratch.
                b.health.up = kind_for(vip, b.check.as_ref().unwrap_or(&state.health)) == CheckKind::None;
                b.health.checked = b.health.up;
                b.health.next_check = Instant::now();
                b.up_since = b.health.up.then(Instant::now);
            }
            b.admin = a;
        }
        let plan = plan(&next, ring_size, Instant::now())?;
        if dry_run {
            return Ok((plan.moved, plan.table.len()));
        }
        log::info!("VIP {vip}: backend {ip} set to weight {} ({:?})", next.backends[&ip].weight, next.backends[&ip].admin);
        *self.vips.get_mut(vip).expect("checked above") = next;
        self.reconcile_counted(vip)
    }

    /// Rebuild tables whose backends' slow start moved to another step.
    pub fn tick(&mut self, now: Instant) -> Result<()> {
        let due: Vec<Vip> = self
            .vips
            .iter()
            .filter(|(_, s)| {
                s.slow_start_ms > 0 && s.backends.values().any(|b| b.usable() && b.step(now, s.slow_start_ms) != b.ramp_step)
            })
            .map(|(v, _)| *v)
            .collect();
        for v in due {
            self.reconcile(&v)?;
        }
        Ok(())
    }

    /// Set a VIP's slow-start time.
    pub fn set_slow_start(&mut self, vip: &Vip, ms: u64) -> Result<()> {
        if ms > 3_600_000 {
            bail!("slow start {ms} ms is over an hour");
        }
        self.vips.get_mut(vip).ok_or_else(|| anyhow!("unknown VIP {vip}"))?.slow_start_ms = ms;
        self.reconcile(vip)
    }

    /// Remove a backend from a service; its flows move to the others.
    pub fn del_backend(&mut self, vip: &Vip, ip: IpAddr) -> Result<(usize, usize)> {
        let state = self.vips.get_mut(vip).ok_or_else(|| anyhow!("unknown VIP {vip}"))?;
        let b = state.backends.remove(&ip).ok_or_else(|| anyhow!("backend {ip} is not in VIP {vip}"))?;
        let carried = self.dp.backend_counters(b.id)?;
        self.vips.get_mut(vip).expect("checked above").retired.add(&carried);
        let moved = self.reconcile_counted(vip)?;
        self.release_backend_id(b.id)?;
        log::info!("VIP {vip}: backend {ip} removed");
        Ok(moved)
    }

    /// Take a free backend id with its next generation (so the id's earlier
    /// flows never match), its counters zeroed.
    fn claim_backend_id(&mut self) -> Result<(u32, u16)> {
        let id = self.free_backend_ids.pop_front().ok_or_else(|| anyhow!("no free backend id"))?;
        self.backend_gens[id as usize] = self.backend_gens[id as usize].wrapping_add(1);
        self.dp.reset_backend_counters(id)?;
        self.dp.set_backend_conns(id, 0)?;
        Ok((id, self.backend_gens[id as usize]))
    }

    fn release_backend_id(&mut self, id: u32) -> Result<()> {
        // The entry keeps its generation: a restarted agent reads it back, so
        // the id's next owner never matches its predecessor's flows.
        self.dp.set_backend(id, &BackendInfo { gen: self.backend_gens[id as usize], ..Default::default() })?;
        self.free_backend_ids.push_back(id);
        Ok(())
    }

    /// Health jobs due now; marks them in flight.
    pub fn due_checks(&mut self, now: Instant) -> Vec<CheckJob> {
        let mut jobs = Vec::new();
        for (vip, state) in self.vips.iter_mut() {
            for b in state.backends.values_mut() {
                let cfg = b.check.as_ref().unwrap_or(&state.health);
                let kind = if b.admin == Admin::Maint { CheckKind::None } else { kind_for(vip, cfg) };
                let needs_mac = b.mac_cfg.is_none();
                let agent = cfg.agent_port.is_some() && b.admin != Admin::Maint;
                if (kind == CheckKind::None && !needs_mac && !agent) || b.health.in_flight || b.health.next_check > now {
                    continue;
                }
                b.health.in_flight = true;
                jobs.push(CheckJob {
                    vip: *vip,
                    ip: b.ip,
                    kind,
                    cfg: cfg.clone(),
                    resolve_mac: needs_mac,
                    timeout: Duration::from_millis(cfg.timeout_ms),
                });
            }
        }
        jobs
    }

    /// Apply a health job's outcome; reconciles the VIP when anything changed.
    pub fn report(&mut self, job: &CheckJob, out: CheckOutcome) -> Result<()> {
        let Some(state) = self.vips.get_mut(&job.vip) else { return Ok(()) };
        let Some(b) = state.backends.get_mut(&job.ip) else { return Ok(()) };
        let cfg = b.check.as_ref().unwrap_or(&state.health).clone();
        let mut came_up = false;
        b.health.in_flight = false;
        let mut changed = false;
        if let (true, Some(mac)) = (job.resolve_mac, out.mac) {
            if b.mac != Some(mac) {
                log::info!("VIP {}: backend {} is at {mac}", job.vip, job.ip);
                b.mac = Some(mac);
                changed = true;
            }
        }
        match &out.agent {
            Some(Ok(line)) => match AgentReport::parse(line, b.agent) {
                Ok(r) if r != b.agent => {
                    log::info!("VIP {}: backend {} agent says {:?} → weight {}%, {:?}", job.vip, job.ip, line.trim(), r.pct, r.state);
                    b.agent = r;
                    changed = true;
                }
                Ok(_) => {}
                Err(e) => log::warn!("VIP {}: backend {} agent check: {e:#}", job.vip, job.ip),
            },
            // As in HAProxy, a failing agent check does not change the state.
            Some(Err(e)) => log::debug!("VIP {}: backend {} agent check failed: {e}", job.vip, job.ip),
            None => {}
        }
        let h = &mut b.health;
        if job.kind != CheckKind::None {
            h.checks += 1;
            h.last_latency_ms = out.latency_ms;
            if out.ok {
                h.ok_streak += 1;
                h.fail_streak = 0;
                if !h.up && (h.ok_streak >= cfg.rise || !h.checked) {
                    h.up = true;
                    came_up = true;
                    h.transitions += 1;
                    changed = true;
                    log::info!("VIP {}: backend {} is up ({} {} check(s) passed)", job.vip, job.ip, h.ok_streak, job.kind.name());
                }
            } else {
                h.failures += 1;
                h.fail_streak += 1;
                h.ok_streak = 0;
                let why = out.error.unwrap_or_else(|| "check failed".into());
                if h.up && h.fail_streak >= cfg.fall {
                    h.up = false;
                    h.transitions += 1;
                    changed = true;
                    log::warn!("VIP {}: backend {} is down after {} failed {} checks: {why}", job.vip, job.ip, h.fail_streak, job.kind.name());
                } else if !h.checked {
                    log::warn!("VIP {}: backend {} failed its first {} check: {why}", job.vip, job.ip, job.kind.name());
                } else {
                    log::debug!("VIP {}: backend {} check failed: {why}", job.vip, job.ip);
                }
                h.last_error = Some(why);
            }
            if h.transitions > 0 && h.transitions.is_multiple_of(10) && changed {
                log::warn!("VIP {}: backend {} is flapping ({} transitions)", job.vip, job.ip, h.transitions);
            }
            h.checked = true;
        }
        // HAProxy's fastinter: check more often while a backend is changing state.
        let transitioning = (h.up && h.fail_streak > 0) || (!h.up && h.ok_streak > 0);
        let base = if transitioning { cfg.fast_interval_ms } else { cfg.interval_ms };
        h.next_check = Instant::now() + jittered(base, cfg.jitter_pct);
        if came_up {
            b.up_since = Some(Instant::now());
        }
        if changed {
            self.reconcile(&job.vip)?;
            if let Some(state) = self.vips.get(&job.vip) {
                if !state.backends.is_empty() && !state.backends.values().any(|b| b.usable()) {
                    if state.failing_open {
                        log::error!("VIP {}: every backend is down; failing open (balancing over all of them)", job.vip);
                    } else {
                        log::error!("VIP {}: no backend is available; its packets are dropped", job.vip);
                    }
                }
            }
        }
        Ok(())
    }

    /// Bring the datapath in line with a VIP's state: backend entries, a new
    /// table in a free slot, then the VIP entry that publishes it.
    pub fn reconcile(&mut self, vip: &Vip) -> Result<()> {
        self.reconcile_counted(vip).map(|_| ())
    }

    /// `reconcile`, returning (table entries that changed, table size).
    pub fn reconcile_counted(&mut self, vip: &Vip) -> Result<(usize, usize)> {
        let ring_size = self.dp.opts.ring_size;
        let src_mac = self.opts.iface_mac.0;
        let now = Instant::now();
        let state = self.vips.get(vip).ok_or_else(|| anyhow!("unknown VIP {vip}"))?;
        let p = plan(state, ring_size, now)?;
        let info = |b: &Backend, alive: bool, weight: u32| BackendInfo {
            dst_mac: b.mac.map(|m| m.0).unwrap_or_default(),
            src_mac,
            flags: if alive { BACKEND_F_ALIVE } else { 0 },
            gen: b.gen,
            weight,
            vip_id: state.id,
        };
        let entries: Vec<(u32, BackendInfo, bool)> = state
            .backends
            .values()
            .map(|b| {
                let alive = p.alive.contains(&b.id);
                (b.id, info(b, alive, p.weights.get(&b.id).copied().unwrap_or(0)), alive)
            })
            .collect();
        let (vip_id, algo, persist_secs, old_slot) = (state.id, state.algo, state.persist_secs, state.ring_slot);
        // 1. Alive backends first, so the new table never points at an
        //    entry that is not ready.
        for (id, i, _) in entries.iter().filter(|e| e.2) {
            self.dp.set_backend(*id, i)?;
        }
        // 2. The table, in a free slot.
        let new_slot = if p.table.is_empty() {
            None
        } else {
            let slot = self.free_ring_slots.pop_front().ok_or_else(|| anyhow!("no free ring slot"))?;
            if let Err(e) = self.dp.write_ring(slot, &p.table) {
                self.free_ring_slots.push_front(slot);
                return Err(e);
            }
            Some(slot)
        };
        // 3. Publish.
        let published = VipInfo {
            vip_id,
            ring_off: new_slot.map(|s| s * ring_size).unwrap_or(0),
            ring_size: p.table.len() as u32,
            algo: algo as u8,
            flags: 0,
            persist_secs,
        };
        self.dp.set_vip(&vip.key(), &published)?;
        if let Some(old) = old_slot {
            self.free_ring_slots.push_back(old);
        }
        // 4. Backends that left: after the table stopped naming them.
        for (id, i, _) in entries.iter().filter(|e| !e.2) {
            self.dp.set_backend(*id, i)?;
        }
        let state = self.vips.get_mut(vip).expect("checked above");
        if p.failing_open && !state.failing_open {
            log::error!("VIP {vip}: every backend is down; failing open (balancing over all of them)");
        }
        state.failing_open = p.failing_open;
        state.ring_slot = new_slot;
        state.published = published;
        for b in state.backends.values_mut() {
            b.ramp_step = p.steps.get(&b.id).copied().unwrap_or(SLOW_START_STEPS);
        }
        log::info!(
            "VIP {vip}: {} table of {} backend(s) published ({} entries, {} changed)",
            algo.name(),
            p.weights.len(),
            p.table.len(),
            p.moved
        );
        let result = (p.moved, p.table.len());
        state.table = p.table;
        self.sync_fragment_alias(vip)?;
        self.save_state();
        Ok(result)
    }

    /// Keep the VIP pre-filter entry of this VIP's address equal to the
    /// number of VIP addresses (any port or protocol) that fold to it.
    fn sync_filter(&mut self, changed: &Vip) -> Result<()> {
        let k = changed.key();
        let idx = lb_common::vip_filter_index(&k.addr, k.family);
        let n = self
            .vips
            .keys()
            .filter(|v| {
                let vk = v.key();
                lb_common::vip_filter_index(&vk.addr, vk.family) == idx
            })
            .count();
        self.dp.set_vip_filter(idx, n as u32)
    }

    /// IP fragments carry no ports after the first, so they are matched by
    /// address and protocol: the datapath looks them up under port 0, where
    /// this keeps a copy of the entry of the lowest-port VIP on that address
    /// and protocol (fragments are balanced over its table).
    fn sync_fragment_alias(&mut self, changed: &Vip) -> Result<()> {
        let alias_key = changed.key().fragment_alias();
        let first = self
            .vips
            .iter()
            .find(|(v, _)| v.addr == changed.addr && v.proto == changed.proto)
            .map(|(_, s)| s.published);
        match first {
            Some(info) => self.dp.set_vip(&alias_key, &info),
            None => self.dp.del_vip(&alias_key).or(Ok(())),
        }
    }

    /// Follow a neighbour-table change: a backend without a configured MAC
    /// whose resolved MAC changed gets the new one at once (no operator
    /// action); a vanished entry is re-resolved by the next check.
    pub fn neighbour_changed(&mut self, ip: IpAddr, mac: Option<Mac>) -> Result<()> {
        let Some(mac) = mac else { return Ok(()) };
        let mut changed = Vec::new();
        for (vip, s) in self.vips.iter_mut() {
            if let Some(b) = s.backends.get_mut(&ip) {
                if b.mac_cfg.is_none() && b.mac != Some(mac) {
                    log::info!("VIP {vip}: backend {ip} moved to {mac} (was {})", b.mac.map(|m| m.to_string()).unwrap_or_else(|| "unresolved".into()));
                    b.mac = Some(mac);
                    changed.push(*vip);
                }
            }
        }
        for v in changed {
            self.reconcile(&v)?;
        }
        Ok(())
    }

    /// Set every backend's active-flow count from a census of the
    /// connection table (corrects flows that ended without FIN/RST).
    pub fn apply_census(&mut self, census: &crate::conntrack::ConntrackCensus) -> Result<()> {
        let ids: Vec<(u32, u16)> = self.vips.values().flat_map(|s| s.backends.values().map(|b| (b.id, b.gen))).collect();
        for (id, gen) in ids {
            let n = census.open.get(&(id, gen)).copied().unwrap_or(0);
            self.dp.set_backend_conns(id, n)?;
        }
        self.census = Some((census.entries, Instant::now()));
        Ok(())
    }

    /// Make the running state what `d` says, changing only what differs;
    /// returns a line per change. `d` is fully validated; capacity is checked
    /// before anything is touched.
    pub fn apply_desired(&mut self, d: &Desired) -> Result<Vec<String>> {
        let mut changes = Vec::new();
        let wanted: BTreeMap<Vip, &config::DesiredVip> = d.vips.iter().map(|v| (v.vip, v)).collect();
        let new_vips = wanted.keys().filter(|v| !self.vips.contains_key(v)).count();
        let freed_vips = self.vips.keys().filter(|v| !wanted.contains_key(v)).count();
        if new_vips > self.free_vip_ids.len() + freed_vips {
            bail!("the config has {} VIPs; the agent has room for {}", d.vips.len(), self.dp.opts.max_vips);
        }
        let new_backends: usize = d
            .vips
            .iter()
            .map(|dv| dv.backends.iter().filter(|b| self.vips.get(&dv.vip).is_none_or(|s| !s.backends.contains_key(&b.ip))).count())
            .sum();
        if new_backends > self.free_backend_ids.len() {
            bail!("the config adds {new_backends} backends; {} backend ids are free", self.free_backend_ids.len());
        }
        for dv in &d.vips {
            if dv.algo == Algo::LeastConn && dv.backends.len() > lb_common::MAX_LEAST_CONN_BACKENDS as usize {
                bail!("VIP {} (least-conn) has more than {} backends", dv.vip, lb_common::MAX_LEAST_CONN_BACKENDS);
            }
        }
        // Agent-wide health settings, inherited by VIPs without their own.
        if d.health != self.opts.health {
            self.opts.health = d.health.clone();
            changes.push("agent health settings changed".to_string());
            let inherit: Vec<Vip> = self.vips.iter().filter(|(_, s)| !s.health_explicit).map(|(v, _)| *v).collect();
            for v in inherit {
                if let Some(s) = self.vips.get_mut(&v) {
                    s.health = d.health.clone();
                }
            }
        }
        let gone: Vec<Vip> = self.vips.keys().filter(|v| !wanted.contains_key(v)).copied().collect();
        for v in gone {
            self.del_vip(&v)?;
            changes.push(format!("vip {v} removed"));
        }
        for dv in &d.vips {
            let vip = dv.vip;
            if !self.vips.contains_key(&vip) {
                self.add_vip_with(vip, dv.algo, dv.persist, dv.health.clone(), dv.all_down)?;
                changes.push(format!("vip {vip} added"));
            } else {
                let s = self.vips.get_mut(&vip).expect("present");
                let health = dv.health.clone().unwrap_or_else(|| self.opts.health.clone());
                if s.algo != dv.algo || s.persist_secs != dv.persist || s.all_down != dv.all_down || s.health != health || s.health_explicit != dv.health.is_some() {
                    s.algo = dv.algo;
                    s.persist_secs = dv.persist;
                    s.all_down = dv.all_down;
                    s.health = health;
                    s.health_explicit = dv.health.is_some();
                    changes.push(format!("vip {vip} settings changed"));
                }
            }
            let s = self.vips.get_mut(&vip).expect("present");
            if s.slow_start_ms != dv.slow_start_ms {
                s.slow_start_ms = dv.slow_start_ms;
                changes.push(format!("vip {vip} slow start {} ms", dv.slow_start_ms));
            }
            let extra: Vec<IpAddr> = s.backends.keys().filter(|ip| !dv.backends.iter().any(|b| b.ip == **ip)).copied().collect();
            for ip in extra {
                self.del_backend(&vip, ip)?;
                changes.push(format!("vip {vip} backend {ip} removed"));
            }
            let add: Vec<(IpAddr, Option<Mac>, u32)> = dv
                .backends
                .iter()
                .filter(|b| !self.vips[&vip].backends.contains_key(&b.ip))
                .map(|b| (b.ip, b.mac, b.weight))
                .collect();
            if !add.is_empty() {
                self.add_backends(&vip, &add)?;
                for (ip, _, _) in &add {
                    changes.push(format!("vip {vip} backend {ip} added"));
                }
            }
            for b in &dv.backends {
                let cur = &self.vips[&vip].backends[&b.ip];
                if cur.check != b.health {
                    self.set_backend_check(&vip, b.ip, b.health.clone())?;
                    changes.push(format!("vip {vip} backend {} health settings changed", b.ip));
                }
                let cur = &self.vips[&vip].backends[&b.ip];
                if cur.mac_cfg != b.mac {
                    let be = self.vips.get_mut(&vip).expect("present").backends.get_mut(&b.ip).expect("present");
                    be.mac_cfg = b.mac;
                    if b.mac.is_some() {
                        be.mac = b.mac;
                    }
                    changes.push(format!("vip {vip} backend {} MAC changed", b.ip));
                }
                let cur = &self.vips[&vip].backends[&b.ip];
                if cur.weight != b.weight || cur.admin != b.state {
                    changes.push(format!("vip {vip} backend {} weight {} {:?} → {} {:?}", b.ip, cur.weight, cur.admin, b.weight, b.state));
                    self.set_backend(&vip, b.ip, Some(b.weight), Some(b.state), false)?;
                }
            }
            self.reconcile(&vip)?;
        }
        for c in &changes {
            log::info!("config: {c}");
        }
        Ok(changes)
    }

    /// The running state as a config file that reproduces it.
    pub fn dump(&self) -> FileConfig {
        let vips = self
            .vips
            .iter()
            .map(|(v, s)| config::VipConfig {
                address: v.to_string(),
                algo: (s.algo != Algo::Maglev).then(|| s.algo.name().to_string()),
                persist_timeout: (s.persist_secs > 0).then_some(s.persist_secs as u32),
                health: s.health_explicit.then(|| s.health.clone()),
                all_down: (s.all_down != AllDown::Drop).then_some(s.all_down),
                slow_start_ms: (s.slow_start_ms > 0).then_some(s.slow_start_ms),
                backends: s
                    .backends
                    .values()
                    .map(|b| config::BackendConfig {
                        ip: b.ip.to_string(),
                        mac: b.mac_cfg.map(|m| m.to_string()),
                        weight: (b.weight != config::DEFAULT_WEIGHT).then_some(b.weight),
                        health: b.check.clone(),
                        state: (b.admin != Admin::Ready).then_some(b.admin),
                    })
                    .collect(),
            })
            .collect();
        FileConfig { health: self.opts.health.clone(), vips }
    }

    /// Everything `xlb status` shows.
    pub fn status(&self) -> Result<Status> {
        let mut vips = Vec::new();
        for (vip, s) in &self.vips {
            let mut backends = Vec::new();
            for b in s.backends.values() {
                let c = self.dp.backend_counters(b.id)?;
                let state = match b.admin {
                    Admin::Maint => "maint",
                    Admin::Drain if b.alive() => "drain",
                    _ if b.alive() && b.agent.state == AgentState::Drain => "drain",
                    _ if b.alive() => "up",
                    _ => "down",
                }
                .to_string();
                let agent_note = (b.agent != AgentReport::default()).then(|| format!("agent: {}% {:?}", b.agent.pct, b.agent.state).to_lowercase());
                let reason = if let Some(a) = agent_note.clone().filter(|_| b.agent.state != AgentState::Up) {
                    Some(a)
                } else if state == "down" && s.failing_open && b.mac.is_some() {
                    Some(format!("fail-open: {}", b.health.last_error.clone().unwrap_or_else(|| "down".into())))
                } else if b.mac.is_none() {
                    Some("MAC not resolved yet".to_string())
                } else if !b.health.up && !b.health.checked {
                    Some("not checked yet".to_string())
                } else if !b.health.up {
                    b.health.last_error.clone()
                } else if b.weight == 0 {
                    Some("weight 0: no new flows".to_string())
                } else {
                    None
                };
                let slots = s.table.iter().filter(|&&id| id == b.id).count();
                backends.push(BackendStatus {
                    ip: b.ip.to_string(),
                    mac: b.mac.map(|m| m.to_string()),
                    weight: b.weight,
                    state,
                    reason,
                    table_share: if s.table.is_empty() { 0.0 } else { slots as f64 / s.table.len() as f64 },
                    check: kind_for(vip, b.check.as_ref().unwrap_or(&s.health)).name().to_string(),
                    agent: agent_note,
                    check_latency_ms: b.health.last_latency_ms,
                    checks: b.health.checks,
                    check_failures: b.health.failures,
                    transitions: b.health.transitions,
                    packets: c.packets,
                    bytes: c.bytes,
                    new_flows: c.new_flows,
                    active_flows: self.dp.backend_conns(b.id)? as u64,
                });
            }
            let mut c = s.retired;
            for b in &backends {
                c.add(&lb_common::Counters { packets: b.packets, bytes: b.bytes, new_flows: b.new_flows });
            }
            vips.push(VipStatus {
                vip: vip.to_string(),
                algo: s.algo.name().to_string(),
                persist_timeout: s.persist_secs,
                active_flows: backends.iter().map(|b| b.active_flows).sum(),
                health_check: kind_for(vip, &s.health).name().to_string(),
                all_down: if s.all_down == AllDown::FailOpen { "fail-open" } else { "drop" }.to_string(),
                failing_open: s.failing_open,
                backends,
                packets: c.packets,
                bytes: c.bytes,
                new_flows: c.new_flows,
            });
        }
        let stats = self.dp.stats()?;
        let counters = lb_common::stats::ALL.iter().map(|s| (s.name().to_string(), stats[*s as usize])).collect();
        Ok(Status {
            vips,
            attach_mode: self.attach_mode.clone(),
            program_id: self.dp.program_id(),
            pinned: self.pinned.as_ref().map(|p| p.display().to_string()),
            pins_lost_on_exit: self.pins_lost_on_exit.clone(),
            counters,
            ring_size: self.dp.opts.ring_size,
            conntrack_capacity: self.dp.opts.conntrack_size,
            conntrack_bytes: self.dp.opts.conntrack_bytes(),
            conntrack_entries: self.census.map(|(n, _)| n),
            conntrack_census_age_ms: self.census.map(|(_, t)| t.elapsed().as_millis() as u64),
        })
    }
}

/// `xlb status` data.
#[derive(Serialize, serde::Deserialize, Debug)]
pub struct Status {
    /// Services.
    pub vips: Vec<VipStatus>,
    /// How the program is attached (`native`, `generic`).
    #[serde(default)]
    pub attach_mode: String,
    /// Kernel id of the running XDP program.
    #[serde(default)]
    pub program_id: Option<u32>,
    /// Where the maps are pinned (none: forwarding ends with the agent).
    #[serde(default)]
    pub pinned: Option<String>,
    /// Set when the pins die with the agent (so does forwarding): why.
    #[serde(default)]
    pub pins_lost_on_exit: Option<String>,
    /// Global datapath counters by name.
    pub counters: BTreeMap<String, u64>,
    /// Entries per Maglev table.
    pub ring_size: u32,
    /// Connection-table capacity: live flows it holds with at most 1 %
    /// evicted early.
    pub conntrack_capacity: u32,
    /// Connection-table memory, bytes.
    #[serde(default)]
    pub conntrack_bytes: u64,
    /// Connection-table entries at the last census (none yet: null).
    pub conntrack_entries: Option<u64>,
    /// Age of that census, milliseconds.
    pub conntrack_census_age_ms: Option<u64>,
}

/// One service in `xlb status`.
#[derive(Serialize, serde::Deserialize, Debug)]
pub struct VipStatus {
    /// `ADDR:PORT/PROTO`.
    pub vip: String,
    /// Algorithm.
    pub algo: String,
    /// Source-hash persistence, seconds (0 = none).
    pub persist_timeout: u16,
    /// Active flows (sum over backends).
    pub active_flows: u64,
    /// Health check in use.
    pub health_check: String,
    /// `drop` or `fail-open` when every backend is down.
    pub all_down: String,
    /// Failing open right now.
    pub failing_open: bool,
    /// Backends.
    pub backends: Vec<BackendStatus>,
    /// Packets forwarded.
    pub packets: u64,
    /// Bytes forwarded.
    pub bytes: u64,
    /// New flows.
    pub new_flows: u64,
}

/// One backend in `xlb status`.
#[derive(Serialize, serde::Deserialize, Debug)]
pub struct BackendStatus {
    /// Address.
    pub ip: String,
    /// MAC in use.
    pub mac: Option<String>,
    /// Weight.
    pub weight: u32,
    /// `up` or `down`.
    pub state: String,
    /// Why it is down (or gets no new flows).
    pub reason: Option<String>,
    /// Share of the Maglev table it owns.
    pub table_share: f64,
    /// Its health check.
    pub check: String,
    /// What its agent check reported, when not plain "100% up".
    #[serde(default)]
    pub agent: Option<String>,
    /// Duration of its last check, milliseconds.
    pub check_latency_ms: Option<f64>,
    /// Health checks run.
    pub checks: u64,
    /// Health checks failed.
    pub check_failures: u64,
    /// Up/down transitions.
    pub transitions: u64,
    /// Packets forwarded to it.
    pub packets: u64,
    /// Bytes forwarded to it.
    pub bytes: u64,
    /// New flows sent to it.
    pub new_flows: u64,
    /// Active flows (opened, not yet closed by FIN/RST or ended).
    pub active_flows: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

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
