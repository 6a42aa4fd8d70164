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
mod tests {
    use super::*;
    use crate::{
        agent::{AgentOptions, MemMaps},
        maps::LoadOptions,
    };
    use lb_common::Algo;

    fn agent(max_vips: u32) -> Agent<MemMaps> {
        let load = LoadOptions { max_vips, max_tables: max_vips, ring_size: 251, ..Default::default() };
        let opts = AgentOptions { iface_mac: "02:00:00:00:00:01".parse().expect("mac"), accept_macs: Vec::new(), health: HealthConfig::default() };
        Agent::new(MemMaps::new(load), opts).expect("agent")
    }

    fn vip(port: u16) -> Vip {
        format!("10.0.0.100:{port}/tcp").parse().expect("vip")
    }

    const BACKENDS: [&str; 3] = ["10.0.0.11", "10.0.0.12", "10.0.0.13"];

    /// `n` VIPs sharing three backends whose MACs are known.
    fn shared(n: u16) -> Agent<MemMaps> {
        let mut a = agent(n as u32);
        for (i, b) in BACKENDS.iter().enumerate() {
            a.neighbour_changed(b.parse().expect("ip"), Some(Mac([2, 0, 0, 0, 0, 0x11 + i as u8]))).expect("neigh");
        }
        for p in 0..n {
            a.add_vip(vip(1000 + p), Algo::Maglev, 0).expect("vip");
            let list: Vec<(IpAddr, Option<Mac>, u32)> = BACKENDS.iter().map(|b| (b.parse().expect("ip"), None, 1)).collect();
            a.add_backends(&vip(1000 + p), &list).expect("backends");
        }
        a
    }

    fn ok() -> CheckOutcome {
        CheckOutcome { ok: true, latency_ms: Some(0.1), ..Default::default() }
    }

    fn refused() -> CheckOutcome {
        CheckOutcome { ok: false, error: Some("connect: refused".into()), ..Default::default() }
    }

    /// Run every due job with `result(ip)` and publish, as the health loop does.
    fn round(a: &mut Agent<MemMaps>, now: Instant, result: impl Fn(IpAddr) -> CheckOutcome) -> usize {
        let jobs = a.due_checks(now);
        for j in &jobs {
            a.report(j, result(j.target.ip)).expect("report");
        }
        a.publish_dirty().expect("publish");
        a.save_if_dirty();
        jobs.len()
    }

    fn live(a: &Agent<MemMaps>, v: &Vip, ip: &str) -> bool {
        let id = a.vips()[v].backends[&ip.parse::<IpAddr>().expect("ip")].id;
        a.dp.table(&v.key()).contains(&id)
    }

    /// `n` VIPs (of `max` allowed) sharing the three backends, MACs
    /// unknown, each checked on port 80.
    fn checked_on_80(max: u32, n: u16) -> Agent<MemMaps> {
        let mut a = agent(max);
        let h = HealthConfig { port: Some(80), ..Default::default() };
        for p in 0..n {
            a.add_vip_with(vip(1000 + p), Algo::Maglev, 0, Some(h.clone()), Default::default()).expect("vip");
            let list: Vec<(IpAddr, Option<Mac>, u32)> = BACKENDS.iter().map(|b| (b.parse().expect("ip"), None, 1)).collect();
            a.add_backends(&vip(1000 + p), &list).expect("backends");
        }
        a
    }

    #[test]
    fn one_job_per_target_whatever_the_number_of_vips() {
        let mut a = shared(64);
        assert_eq!(a.check_jobs(), 3 * 64, "each VIP port is its own target (the check connects to the VIP's port)");
        // The same services checked on one port (e.g. :80 for 80 and 443 of
        // many tenants) share it.
        let mut a = checked_on_80(64, 64);
        assert_eq!(a.check_jobs(), 3);
        let t0 = Instant::now();
        assert_eq!(a.due_checks(t0).len(), 3, "one job per backend host");
        assert!(a.due_checks(t0).is_empty(), "in flight: not started twice");
        // Rise and fall are each VIP's own; they do not split the job.
        let v = vip(1000);
        a.set_backend_check(&v, BACKENDS[0].parse().expect("ip"), Some(HealthConfig { port: Some(80), rise: 5, fall: 1, ..Default::default() }))
            .expect("check");
        assert_eq!(a.check_jobs(), 3);
        // Another port or path is another job.
        a.set_backend_check(&v, BACKENDS[0].parse().expect("ip"), Some(HealthConfig { port: Some(81), ..Default::default() })).expect("check");
        assert_eq!(a.check_jobs(), 4);
        // Agent checks are shared too.
        let h = HealthConfig { port: Some(80), agent_port: Some(9999), ..Default::default() };
        for p in 1..64 {
            for b in BACKENDS {
                a.set_backend_check(&vip(1000 + p), b.parse().expect("ip"), Some(h.clone())).expect("check");
            }
        }
        assert_eq!(a.check_jobs(), 4 + 3, "the 4 health jobs (the agent port does not split them) + 3 shared agent jobs");
        // A weight changes no target: the jobs are not recomputed (a walk
        // of every backend of every VIP); maintenance stops its checks.
        let b0: IpAddr = BACKENDS[0].parse().expect("ip");
        a.set_weight(&vip(1001), b0, 7).expect("weight");
        assert!(!a.checks.stale.any(), "a weight change leaves the jobs");
        a.set_backend(&vip(1001), b0, None, Some(Admin::Maint), false).expect("maint");
        assert!(a.checks.stale.any(), "maintenance changes the targets");
        assert_eq!(a.check_jobs(), 4 + 3, "(still subscribed through the other VIPs)");
    }

    /// Targets and their subscribers, sorted (to compare two refreshes).
    fn subscriptions(a: &Agent<MemMaps>) -> Vec<(String, Vec<(Vip, IpAddr)>)> {
        let mut v: Vec<(String, Vec<(Vip, IpAddr)>)> = a
            .checks
            .jobs
            .iter()
            .map(|(t, j)| {
                let mut s = j.subscribers.clone();
                s.sort();
                (format!("{t:?}"), s)
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn recomputing_only_the_changed_vips_gives_the_jobs_a_full_walk_gives() {
        let mut a = checked_on_80(16, 8);
        assert_eq!(a.check_jobs(), 3);
        let t0 = Instant::now();
        let started = a.due_checks(t0).len();
        assert_eq!(started, 3);
        let b0: IpAddr = BACKENDS[0].parse().expect("ip");
        type Step<'a> = Box<dyn Fn(&mut Agent<MemMaps>) + 'a>;
        let steps: Vec<Step> = vec![
            Box::new(|a| a.set_backend_check(&vip(1003), b0, Some(HealthConfig { port: Some(81), ..Default::default() })).expect("check")),
            Box::new(|a| a.add_backend(&vip(1004), "10.0.0.40".parse().expect("ip"), None, 1).map(|_| ()).expect("backend")),
            Box::new(|a| a.del_vip(&vip(1003)).expect("del")),
            Box::new(|a| a.set_backend(&vip(1005), b0, None, Some(Admin::Maint), false).map(|_| ()).expect("maint")),
            Box::new(|a| a.add_vip_with(vip(1010), Algo::Maglev, 0, Some(HealthConfig { port: Some(82), ..Default::default() }), Default::default()).expect("vip")),
            Box::new(|a| a.add_backend(&vip(1010), b0, None, 1).map(|_| ()).expect("backend")),
            Box::new(|a| a.del_backend(&vip(1004), "10.0.0.40".parse().expect("ip")).map(|_| ()).expect("del")),
        ];
        for (i, step) in steps.iter().enumerate() {
            step(&mut a);
            assert!(a.checks.stale.any(), "step {i} changes the targets");
            a.check_jobs();
            let incremental = subscriptions(&a);
            a.checks.stale.all();
            a.check_jobs();
            assert_eq!(incremental, subscriptions(&a), "step {i}: the changed VIPs' refresh and a full one differ");
        }
        // The port-81 job left with VIP 1003; port 82 came with VIP 1010.
        let ports: BTreeSet<u16> = a.checks.jobs.keys().filter_map(|t| match t.probe { Probe::Health { port, .. } => Some(port), _ => None }).collect();
        assert_eq!(ports, BTreeSet::from([80, 82]));
        // Targets that stayed kept their schedule: still in flight.
        assert!(a.due_checks(t0 + Duration::from_secs(10)).iter().all(|j| !matches!(j.target.probe, Probe::Health { port: 80, .. })));
    }

    #[test]
    fn a_shared_result_fans_out_to_every_vip_in_one_flush() {
        let mut a = agent(512);
        let h = HealthConfig { port: Some(80), ..Default::default() };
        let macs: Vec<(IpAddr, Mac)> =
            BACKENDS.iter().enumerate().map(|(i, b)| (b.parse().expect("ip"), Mac([2, 0, 0, 0, 0, 0x11 + i as u8]))).collect();
        a.neighbours_dumped(&macs).expect("dump");
        let mut d = crate::config::Desired::default();
        for p in 0..512 {
            d.vips.push(crate::config::DesiredVip {
                vip: vip(1000 + p),
                algo: Algo::Maglev,
                persist: 0,
                health: Some(h.clone()),
                all_down: Default::default(),
                slow_start_ms: 0,
                opts: Default::default(),
                forward: Default::default(),
                backends: BACKENDS
                    .iter()
                    .map(|b| crate::config::DesiredBackend {
                        ip: b.parse().expect("ip"),
                        mac: None,
                        weight: 1,
                        health: None,
                        state: Admin::Ready,
                        forward: None,
                        server_id: None,
                    })
                    .collect(),
            });
        }
        a.apply_desired(&d).expect("apply");
        let writes = a.dp.table_writes;
        assert_eq!(writes, 0, "no backend is up before its first check: no table");
        let t0 = Instant::now();
        assert_eq!(round(&mut a, t0, |_| ok()), 3);
        assert_eq!(a.dp.table_writes, 512, "one table per VIP, once");
        assert_eq!(a.dp.prepared, 0, "passing checks prepare no table");
        assert!(a.vips().keys().all(|v| BACKENDS.iter().all(|b| live(&a, v, b))));
        // Backend 2 dies: fall (3) failures at the fast interval take it out
        // of all 512 tables, each written once.
        let dead: IpAddr = BACKENDS[1].parse().expect("ip");
        let mut t = t0;
        for i in 0..3 {
            t += Duration::from_millis(400);
            let before = a.dp.table_writes;
            let started = Instant::now();
            assert_eq!(round(&mut a, t, |ip| if ip == dead { refused() } else { ok() }), 3);
            let ended = Instant::now();
            let out = a.vips().keys().filter(|v| !live(&a, v, BACKENDS[1])).count();
            let next = a.checks.jobs.iter().find(|(k, _)| k.ip == dead).map(|(_, j)| j.next).expect("job");
            // The next check is scheduled during the round: bounded from
            // both ends of it, however long publishing 512 tables took.
            if i < 2 {
                assert!(next <= ended + Duration::from_millis(115), "fast interval (100 ms) while changing state");
            } else {
                assert!(next >= started + Duration::from_millis(265), "the normal interval (300 ms) once down");
            }
            if i < 2 {
                assert_eq!(out, 0, "still in after {} failure(s)", i + 1);
                assert_eq!(a.dp.table_writes, before);
                assert_eq!(a.dp.prepared, 512, "the first failure has 512 tables made ready for the removal");
            } else {
                assert_eq!(out, 512, "out of every VIP's table after the third failure");
                assert_eq!(a.dp.table_writes, before + 512);
            }
        }
        assert!(a.vips().keys().all(|v| live(&a, v, BACKENDS[0]) && live(&a, v, BACKENDS[2])), "no false down");
        // Its first passing check after that (rise 2): the tables of its
        // return are made ready too.
        a.dp.prepared = 0;
        t += Duration::from_millis(400);
        round(&mut a, t, |_| ok());
        assert_eq!(a.vips().keys().filter(|v| live(&a, v, BACKENDS[1])).count(), 0, "rise 2: not back after one pass");
        assert_eq!(a.dp.prepared, 512, "tables made ready for its return");
    }

    #[test]
    fn rise_and_fall_are_each_vips_own() {
        let mut a = shared(2);
        let (v1, v2) = (vip(1000), vip(1001));
        let ip: IpAddr = BACKENDS[0].parse().expect("ip");
        a.set_backend_check(&v2, ip, Some(HealthConfig { fall: 1, ..Default::default() })).expect("check");
        let mut t = Instant::now();
        round(&mut a, t, |_| ok());
        assert!(live(&a, &v1, BACKENDS[0]) && live(&a, &v2, BACKENDS[0]));
        t += Duration::from_secs(1);
        round(&mut a, t, |i| if i == ip { refused() } else { ok() });
        assert!(live(&a, &v1, BACKENDS[0]), "fall 3: one failure is not enough");
        assert!(!live(&a, &v2, BACKENDS[0]), "fall 1: out after one failure");
    }

    #[test]
    fn macs_come_from_the_cache_and_unresolved_addresses_are_probed_once_each() {
        let mut a = agent(8);
        for p in 0..8 {
            a.add_vip(vip(1000 + p), Algo::Maglev, 0).expect("vip");
            let list: Vec<(IpAddr, Option<Mac>, u32)> = BACKENDS.iter().map(|b| (b.parse().expect("ip"), None, 1)).collect();
            a.add_backends(&vip(1000 + p), &list).expect("backends");
        }
        let t0 = Instant::now();
        let probes = a.due_probes(t0);
        assert_eq!(probes.len(), 3, "one probe per address, not per VIP: {probes:?}");
        assert!(a.due_probes(t0 + Duration::from_millis(100)).is_empty(), "not again within the probe interval");
        // A backend added between two full walks is probed at the next call.
        let late: IpAddr = "10.0.0.30".parse().expect("ip");
        a.add_backend(&vip(1000), late, None, 1).expect("backend");
        assert_eq!(a.due_probes(t0 + Duration::from_millis(120)), vec![late], "a changed VIP is walked at once");
        assert_eq!(a.due_probes(t0 + PROBE_INTERVAL).len(), 3, "again after it");
        round(&mut a, t0, |_| ok());
        assert_eq!(a.dp.table_writes, 0, "up but no MAC: no table");
        let ip: IpAddr = BACKENDS[0].parse().expect("ip");
        let m = Mac([2, 0, 0, 0, 0, 0x42]);
        a.neighbour_changed(ip, Some(m)).expect("event");
        assert_eq!(a.dp.table_writes, 8, "every VIP using it published once");
        assert!((0..8).all(|p| a.vips()[&vip(1000 + p)].backends[&ip].mac == Some(m)));
        let later = a.due_probes(t0 + 2 * PROBE_INTERVAL);
        assert!(later.len() == 3 && !later.contains(&ip), "the resolved address is no longer probed: {later:?}");
        // The entry vanishes: the MAC is kept, the address probed once.
        a.neighbour_changed(ip, None).expect("event");
        assert!((0..8).all(|p| a.vips()[&vip(1000 + p)].backends[&ip].mac == Some(m)));
        assert!(a.due_probes(t0 + 4 * PROBE_INTERVAL).contains(&ip));
        // A dump after an overrun brings changes missed meanwhile.
        let m2 = Mac([2, 0, 0, 0, 0, 0x43]);
        a.neighbours_dumped(&[(ip, m2)]).expect("dump");
        assert!((0..8).all(|p| a.vips()[&vip(1000 + p)].backends[&ip].mac == Some(m2)));
        // A configured MAC is never overridden.
        let fixed: IpAddr = "10.0.0.20".parse().expect("ip");
        let m3 = Mac([2, 0, 0, 0, 0, 0x20]);
        a.add_backend(&vip(1000), fixed, Some(m3), 1).expect("backend");
        a.neighbour_changed(fixed, Some(m2)).expect("event");
        assert_eq!(a.vips()[&vip(1000)].backends[&fixed].mac, Some(m3));
        assert!(!a.due_probes(t0 + 8 * PROBE_INTERVAL).contains(&fixed), "a configured MAC needs no probe");
    }
}
