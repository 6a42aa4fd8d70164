//! Health checks, one job per target: every (VIP, backend) whose check has
//! the same address, probe, port and settings shares one job, so 512 VIPs
//! on 3 backend hosts cost 3 checks per interval, not 1 536. A job's result
//! fans out to every subscriber, each with its own rise/fall state machine
//! (VIPs may differ in rise and fall). Agent checks are jobs of their own,
//! shared the same way. MACs are not the checks' business: they come from
//! the neighbour cache (`neigh::NeighCache`), fed by one netlink
//! subscription; an address without a MAC is probed once per interval,
//! however many VIPs use it.

use anyhow::Result;
use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    time::{Duration, Instant},
};

use super::{
    model::{AgentReport, Backend, VipState},
    Agent, Maps,
};
pub use crate::config::kind_for;
use crate::config::{Admin, CheckKind, HealthConfig, Mac, Vip};

/// What a job probes on its address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Probe {
    /// The health check proper (tcp, http or udp) on this port.
    Health {
        /// Check kind (never `None`).
        kind: CheckKind,
        /// Port.
        port: u16,
    },
    /// The agent check (HAProxy's agent-check) on this port.
    Agent {
        /// Port.
        port: u16,
    },
}

/// One health job's identity: the same target is checked once, whatever
/// number of VIPs use it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CheckTarget {
    /// Backend address.
    pub ip: IpAddr,
    /// What is probed.
    pub probe: Probe,
    /// The settings that shape the probe and its schedule (what is sent and
    /// expected, timeout, intervals); rise, fall and jitter are the
    /// subscribers' own and are cleared here.
    pub spec: HealthConfig,
}

impl CheckTarget {
    /// The health-check target of a backend checked with `cfg` on `vip`.
    fn health(vip: &Vip, ip: IpAddr, cfg: &HealthConfig) -> Option<CheckTarget> {
        let kind = kind_for(vip, cfg);
        if kind == CheckKind::None {
            return None;
        }
        let d = HealthConfig::default();
        let spec = HealthConfig {
            kind,
            rise: 0,
            fall: 0,
            jitter_pct: 0,
            port: None,
            agent_port: None,
            http_path: if kind == CheckKind::Http { cfg.http_path.clone() } else { d.http_path },
            http_host: if kind == CheckKind::Http { cfg.http_host.clone() } else { None },
            http_status: if kind == CheckKind::Http { cfg.http_status.clone() } else { d.http_status },
            udp_payload: if kind == CheckKind::Udp { cfg.udp_payload.clone() } else { d.udp_payload },
            udp_expect: if kind == CheckKind::Udp { cfg.udp_expect.clone() } else { None },
            ..cfg.clone()
        };
        Some(CheckTarget { ip, probe: Probe::Health { kind, port: cfg.port.unwrap_or(vip.port) }, spec })
    }

    /// The agent-check target of a backend checked with `cfg`, if it has one.
    fn agent(ip: IpAddr, cfg: &HealthConfig) -> Option<CheckTarget> {
        let port = cfg.agent_port?;
        let spec = HealthConfig {
            kind: CheckKind::None,
            interval_ms: cfg.interval_ms,
            fast_interval_ms: cfg.interval_ms,
            timeout_ms: cfg.timeout_ms,
            rise: 0,
            fall: 0,
            jitter_pct: 0,
            ..HealthConfig::default()
        };
        Some(CheckTarget { ip, probe: Probe::Agent { port }, spec })
    }

    /// The targets a backend of `vip` subscribes to (none in maintenance).
    fn of(vip: &Vip, vip_health: &HealthConfig, b: &Backend) -> [Option<CheckTarget>; 2] {
        if b.admin == Admin::Maint {
            return [None, None];
        }
        let cfg = b.check.as_ref().unwrap_or(vip_health);
        [CheckTarget::health(vip, b.ip, cfg), CheckTarget::agent(b.ip, cfg)]
    }
}

/// What a job found.
#[derive(Clone, Debug, Default)]
pub struct CheckOutcome {
    /// The check passed.
    pub ok: bool,
    /// Why not.
    pub error: Option<String>,
    /// How long the check took, milliseconds.
    pub latency_ms: Option<f64>,
    /// An agent check's line, or why it failed.
    pub agent: Option<Result<String, String>>,
}

/// A job to run.
#[derive(Clone, Debug)]
pub struct CheckJob {
    /// What to check.
    pub target: CheckTarget,
    /// How long it may take.
    pub timeout: Duration,
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

/// One job's schedule and subscribers.
#[derive(Debug)]
struct Job {
    next: Instant,
    in_flight: bool,
    subscribers: Vec<(Vip, IpAddr)>,
}

/// VIPs changed since their consumer last looked: some, or all. What
/// walks the services under the agent's lock after a change walks only
/// these (a command changes one VIP; a walk of every backend of every VIP
/// was ~0.3 ms at 64 × 100).
#[derive(Debug, Default)]
pub struct ChangedVips {
    all: bool,
    vips: BTreeSet<Vip>,
}

impl ChangedVips {
    /// `vip` changed.
    pub fn one(&mut self, vip: Vip) {
        self.vips.insert(vip);
    }

    /// Every VIP changed.
    pub fn all(&mut self) {
        self.all = true;
    }

    /// Whether anything changed.
    pub fn any(&self) -> bool {
        self.all || !self.vips.is_empty()
    }

    /// Take the changes: `None` for every VIP.
    pub fn take(&mut self) -> Option<BTreeSet<Vip>> {
        let vips = std::mem::take(&mut self.vips);
        (!std::mem::take(&mut self.all)).then_some(vips)
    }
}

/// Every job, updated from the services when they change (`stale`: the
/// VIPs whose subscriptions are to be recomputed).
#[derive(Debug, Default)]
pub(crate) struct Jobs {
    jobs: HashMap<CheckTarget, Job>,
    pub(crate) stale: ChangedVips,
    /// Jobs started so far.
    pub started: u64,
}

/// How a backend's health changed with one result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transition {
    None,
    Up,
    Down,
    FirstFailure,
}

/// Apply one health result to a backend's rise/fall state machine.
fn apply_health(b: &mut Backend, cfg: &HealthConfig, out: &CheckOutcome, now: Instant) -> Transition {
    let h = &mut b.health;
    h.checks += 1;
    h.last_latency_ms = out.latency_ms;
    let was_checked = h.checked;
    h.checked = true;
    if out.ok {
        h.ok_streak += 1;
        h.fail_streak = 0;
        if !h.up && (h.ok_streak >= cfg.rise || !was_checked) {
            h.up = true;
            h.transitions += 1;
            b.up_since = Some(now);
            return Transition::Up;
        }
        return Transition::None;
    }
    h.failures += 1;
    h.fail_streak += 1;
    h.ok_streak = 0;
    h.last_error = Some(out.error.clone().unwrap_or_else(|| "check failed".into()));
    if h.up && h.fail_streak >= cfg.fall {
        h.up = false;
        h.transitions += 1;
        Transition::Down
    } else if !was_checked {
        Transition::FirstFailure
    } else {
        Transition::None
    }
}

/// A backend changing state: checked at the fast interval (HAProxy's fastinter).
fn transitioning(b: &Backend) -> bool {
    let h = &b.health;
    (h.up && h.fail_streak > 0) || (!h.up && h.ok_streak > 0)
}

/// "a, b, c and 7 more" for log lines about many VIPs.
fn some_vips(v: &[Vip]) -> String {
    let shown: Vec<String> = v.iter().take(3).map(|v| v.to_string()).collect();
    match v.len() {
        n if n > 3 => format!("{} VIPs: {} and {} more", n, shown.join(", "), n - 3),
        1 => format!("VIP {}", shown[0]),
        n => format!("{n} VIPs: {}", shown.join(", ")),
    }
}

/// How often an address without a MAC is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// How often `due_probes` walks every backend of every VIP (between walks
/// it looks only at the VIPs changed meanwhile): it runs every health tick
/// (20 ms) under the agent's lock, and 64 × 100 backends take ~0.3 ms to walk.
pub const PROBE_WALK: Duration = Duration::from_millis(250);

/// `due_probes`'s bookkeeping.
#[derive(Debug, Default)]
pub struct ProbeWalk {
    /// VIPs changed since the last call (`mark_table`).
    pub changed: ChangedVips,
    /// When every VIP was last walked.
    last_full: Option<Instant>,
}

impl<M: Maps> Agent<M> {
    /// The VIPs `which` names (`None`: every VIP).
    fn vips_in<'a>(&'a self, which: &'a Option<BTreeSet<Vip>>) -> Box<dyn Iterator<Item = (&'a Vip, &'a VipState)> + 'a> {
        match which {
            None => Box::new(self.vips.iter()),
            Some(v) => Box::new(v.iter().filter_map(|v| self.vips.get_key_value(v))),
        }
    }

    /// Recompute targets and subscribers (after the services changed),
    /// keeping the schedule of targets that stay.
    fn refresh_jobs(&mut self, now: Instant) {
        if !self.checks.stale.any() {
            return;
        }
        let changed = self.checks.stale.take();
        // Drop the subscriptions being recomputed, then add them again.
        for j in self.checks.jobs.values_mut() {
            j.subscribers.retain(|(v, _)| changed.as_ref().is_some_and(|c| !c.contains(v)));
        }
        let mut add: Vec<(CheckTarget, Vip, IpAddr)> = Vec::new();
        for (vip, s) in self.vips_in(&changed) {
            for b in s.backends.values() {
                for t in CheckTarget::of(vip, &s.health, b).into_iter().flatten() {
                    add.push((t, *vip, b.ip));
                }
            }
        }
        for (t, vip, ip) in add {
            // A target that stays keeps its schedule.
            let job = self.checks.jobs.entry(t).or_insert_with(|| Job { next: now, in_flight: false, subscribers: Vec::new() });
            job.subscribers.push((vip, ip));
        }
        self.checks.jobs.retain(|_, j| !j.subscribers.is_empty());
    }

    /// Jobs due now (each target once); marks them in flight.
    pub fn due_checks(&mut self, now: Instant) -> Vec<CheckJob> {
        self.refresh_jobs(now);
        let mut due = Vec::new();
        for (t, j) in self.checks.jobs.iter_mut() {
            if !j.in_flight && j.next <= now {
                j.in_flight = true;
                due.push(CheckJob { target: t.clone(), timeout: Duration::from_millis(t.spec.timeout_ms) });
            }
        }
        self.checks.started += due.len() as u64;
        due
    }

    /// When the next job is due (none: no job waits), so the scheduler
    /// starts it on time rather than at its next tick.
    pub fn next_check_due(&self) -> Option<Instant> {
        if self.checks.stale.any() {
            return Some(Instant::now());
        }
        self.checks.jobs.values().filter(|j| !j.in_flight).map(|j| j.next).min()
    }

    /// Number of distinct check jobs (targets).
    pub fn check_jobs(&mut self) -> usize {
        self.refresh_jobs(Instant::now());
        self.checks.jobs.len()
    }

    /// Number of check jobs as of the last round (without recomputing).
    pub(crate) fn checks_running(&self) -> usize {
        self.checks.jobs.len()
    }

    /// Apply a job's outcome to every subscriber; VIPs whose state changed
    /// are marked for the next `flush` (the caller's).
    pub fn report(&mut self, job: &CheckJob, out: CheckOutcome) -> Result<()> {
        let now = Instant::now();
        let Some(j) = self.checks.jobs.get_mut(&job.target) else { return Ok(()) };
        j.in_flight = false;
        let ip = job.target.ip;
        let (mut down, mut up, mut first, mut agent_changed) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut fast = false;
        let mut jitter = 0;
        let mut flapping = 0;
        // VIPs whose backend is changing state (a failure while up, a pass
        // while down) and may be republished at once: (count, hold).
        let (mut suspect, mut hold_ms) = (0usize, 0u64);
        for (vip, bip) in &j.subscribers {
            let Some(state) = self.vips.get_mut(vip) else { continue };
            let Some(b) = state.backends.get_mut(bip) else { continue };
            let cfg = b.check.as_ref().unwrap_or(&state.health);
            jitter = jitter.max(cfg.jitter_pct);
            let changed = match job.target.probe {
                Probe::Agent { .. } => match &out.agent {
                    Some(Ok(line)) => match AgentReport::parse(line, b.agent) {
                        Ok(r) if r != b.agent => {
                            b.agent = r;
                            agent_changed.push(*vip);
                            true
                        }
                        Ok(_) => false,
                        Err(e) => {
                            log::debug!("backend {ip} agent check: {e:#}");
                            false
                        }
                    },
                    // As in HAProxy, a failing agent check does not change the state.
                    _ => false,
                },
                Probe::Health { .. } => {
                    let cfg = cfg.clone();
                    let t = apply_health(b, &cfg, &out, now);
                    fast |= transitioning(b);
                    if transitioning(b) {
                        suspect += 1;
                        let checks = u64::from(cfg.fall.max(cfg.rise));
                        hold_ms = hold_ms.max(checks * job.target.spec.fast_interval_ms.max(job.target.spec.interval_ms));
                    }
                    match t {
                        Transition::Up => up.push(*vip),
                        Transition::Down => down.push(*vip),
                        Transition::FirstFailure => first.push(*vip),
                        Transition::None => {}
                    }
                    if matches!(t, Transition::Up | Transition::Down) && b.health.transitions.is_multiple_of(10) {
                        flapping = flapping.max(b.health.transitions);
                    }
                    matches!(t, Transition::Up | Transition::Down)
                }
            };
            if changed {
                self.dirty.insert(*vip);
                self.state_dirty = true;
            }
        }
        // A backend changing state is checked at the fast interval, without
        // jitter: its fall or rise then takes what the settings say.
        j.next = now + if fast { Duration::from_millis(job.target.spec.fast_interval_ms) } else { jittered(job.target.spec.interval_ms, jitter) };
        if suspect > 0 {
            // Its removal (or return) would republish them all at once: their
            // new tables are made while the fall (rise) count runs, not after.
            self.dp.prepare_tables(suspect, Duration::from_millis(hold_ms + 1000));
        }
        let what = match job.target.probe {
            Probe::Health { kind, port } => format!("{} :{port}", kind.name()),
            Probe::Agent { port } => format!("agent :{port}"),
        };
        let why = out.error.as_deref().unwrap_or("check failed");
        if !down.is_empty() {
            log::warn!("backend {ip} is down ({what} check failed: {why}) for {}", some_vips(&down));
        }
        if !up.is_empty() {
            log::info!("backend {ip} is up ({what} check passed) for {}", some_vips(&up));
        }
        if !first.is_empty() {
            log::warn!("backend {ip} failed its first {what} check ({why}) for {}", some_vips(&first));
        }
        if let (false, Some(Ok(line))) = (agent_changed.is_empty(), &out.agent) {
            log::info!("backend {ip}: agent says {:?} for {}", line.trim(), some_vips(&agent_changed));
        }
        if flapping > 0 {
            log::warn!("backend {ip} is flapping ({flapping} transitions)");
        }
        let stranded: Vec<Vip> = down
            .iter()
            .filter(|v| self.vips.get(v).is_some_and(|s| !s.backends.values().any(|b| b.usable())))
            .copied()
            .collect();
        if !stranded.is_empty() {
            log::error!("no backend is available (packets dropped, or balanced over all with fail-open) for {}", some_vips(&stranded));
        }
        Ok(())
    }

    /// Follow one neighbour-table change: backends at `ip` without a
    /// configured MAC take the new one at once (no operator action). A
    /// vanished or failed entry keeps the last MAC (the health check judges
    /// the backend) and the address is probed again.
    pub fn neighbour_changed(&mut self, ip: IpAddr, mac: Option<Mac>) -> Result<()> {
        self.neighbours.update(ip, mac);
        if let Some(mac) = mac {
            self.take_mac(ip, mac);
        }
        self.publish_dirty()
    }

    /// A full dump of the neighbour table (at start, or after the
    /// subscription overran): the cache becomes exactly it.
    pub fn neighbours_dumped(&mut self, entries: &[(IpAddr, Mac)]) -> Result<()> {
        self.neighbours.replace(entries);
        for &(ip, mac) in entries {
            self.take_mac(ip, mac);
        }
        self.publish_dirty()
    }

    fn take_mac(&mut self, ip: IpAddr, mac: Mac) {
        let mut moved = Vec::new();
        let mut was = None;
        for (vip, s) in self.vips.iter_mut() {
            if let Some(b) = s.backends.get_mut(&ip) {
                if b.mac_cfg.is_none() && b.mac != Some(mac) {
                    was = was.or(b.mac);
                    b.mac = Some(mac);
                    moved.push(*vip);
                }
            }
        }
        match (moved.is_empty(), was) {
            (true, _) => {}
            (false, Some(old)) => log::info!("backend {ip} moved to {mac} (was {old}) for {}", some_vips(&moved)),
            (false, None) => log::info!("backend {ip} is at {mac} (neighbour table) for {}", some_vips(&moved)),
        }
        for v in moved {
            self.dirty.insert(v);
            self.state_dirty = true;
        }
    }

    /// Addresses to probe now so the kernel resolves them: backends without
    /// a MAC, and vanished entries, each address at most once per
    /// `PROBE_INTERVAL` whatever number of VIPs use it.
    /// Every VIP is walked at least every `PROBE_WALK` (an address not
    /// resolved keeps being probed every `PROBE_INTERVAL`); a VIP changed
    /// since the last call is walked at once.
    pub fn due_probes(&mut self, now: Instant) -> Vec<IpAddr> {
        let mut want: BTreeSet<IpAddr> = self.neighbours.take_refresh();
        if self.probe_walk.last_full.is_none_or(|t| now.saturating_duration_since(t) >= PROBE_WALK) {
            self.probe_walk.last_full = Some(now);
            self.probe_walk.changed.all();
        }
        let changed = self.probe_walk.changed.take();
        for (_, s) in self.vips_in(&changed) {
            for b in s.backends.values() {
                if b.mac.is_none() && b.mac_cfg.is_none() && b.admin != Admin::Maint {
                    want.insert(b.ip);
                }
            }
        }
        want.into_iter().filter(|ip| self.neighbours.probe_due(*ip, now, PROBE_INTERVAL)).collect()
    }
}

#[cfg(test)]
mod tests;
