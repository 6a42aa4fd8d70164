//! The agent's state and the one path by which it reaches the datapath.
//!
//! Data flows one way: operations (CLI/API, config file) change the desired
//! state after validating everything they touch; health results change
//! backends' runtime state; both only mark the VIPs they touched, and
//! `flush` turns each marked VIP into map writes once (one plan, one table
//! write, one VIP-entry update) and saves the state file once, however many
//! changes arrived together. A table is published without readers ever
//! seeing a half-written one: it is created whole as a map of its own in a
//! free table slot, then a single VIP-entry update switches the datapath
//! over, and the old table is freed last (the kernel keeps it for packets
//! still reading it; slots are recycled FIFO).
//!
//! Submodules, one concern each: `model` (services, backends, health),
//! `plan` (what a table change does), `checks` (check jobs shared by every
//! VIP using a target, rise/fall, the neighbour cache), `desired` (apply and
//! dump a config), `status` (what status/stats/metrics read), `adopt`
//! (restarts), `maps` (the narrow datapath trait and its in-memory twin).

use anyhow::{anyhow, bail, Result};
use lb_common::{Algo, BackendInfo, Forward, VipInfo};

pub use crate::config::Admin;
use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::{
    config::{self, AllDown, CheckKind, HealthConfig, Mac, Vip, VipOpts},
    maps::Datapath,
    quic::ServerId,
};

mod adopt;
mod checks;
mod desired;
pub mod maps;
mod model;
mod plan;
mod publish;
mod status;
pub use adopt::{in_use as backend_entry_in_use, save_soon_loop, Adoption, Persist};
pub use checks::{kind_for, CheckJob, CheckOutcome, CheckTarget, Probe};
pub use maps::{Maps, MemMaps};
pub use model::{fingerprint, AgentReport, AgentState, Backend, Health, VipState, SLOW_START_STEPS};
pub use status::{BackendStatus, Status, VipStatus};

pub use crate::config::{check_any_port_health, check_persist};

/// Bursts of at least this many VIP publications are logged with their time
/// (a shared backend going down or up republishes all its VIPs at once).
const BURST_LOG: usize = 8;

/// How long after a failed publication the VIP is published again.
pub(crate) const PUBLISH_RETRY: Duration = Duration::from_secs(1);

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

/// How a VIP is balanced and checked: everything `vip add` (CLI, API) and
/// a config file's `[[vip]]` say besides its address and backends.
#[derive(Clone, Debug, PartialEq)]
pub struct VipSpec {
    /// Scheduling algorithm.
    pub algo: Algo,
    /// Source-hash persistence, seconds.
    pub persist: u16,
    /// Its own health settings (default: the agent's).
    pub health: Option<HealthConfig>,
    /// What to do when every backend is down.
    pub all_down: AllDown,
    /// Slow start, milliseconds.
    pub slow_start_ms: u64,
    /// Datapath options (`--hash`, `--answer-ping`).
    pub opts: VipOpts,
    /// How its backends are reached (each may say otherwise).
    pub forward: Forward,
}

impl Default for VipSpec {
    fn default() -> Self {
        VipSpec {
            algo: Algo::Maglev,
            persist: 0,
            health: None,
            all_down: AllDown::Drop,
            slow_start_ms: 0,
            opts: VipOpts::default(),
            forward: Forward::L2,
        }
    }
}

impl VipSpec {
    /// Check every rule of a VIP's settings (the one place they are checked).
    pub fn validate(&self, vip: &Vip) -> Result<()> {
        check_persist(self.algo, self.persist as u32)?;
        if let Some(h) = &self.health {
            h.validate()?;
        }
        config::check_slow_start(self.slow_start_ms)?;
        self.opts.validate(vip, self.algo)?;
        Ok(())
    }
}

/// A routed backend needs an outer source address of its family.
pub fn check_encap_source(cfg: &lb_common::EncapConfig, ip: IpAddr, forward: Forward) -> Result<()> {
    let (flag, family) = if ip.is_ipv4() { (lb_common::ENCAP_F_SRC4, "IPv4") } else { (lb_common::ENCAP_F_SRC6, "IPv6") };
    if forward.is_routed() && cfg.flags & flag == 0 {
        bail!("backend {ip} is routed ({forward}) but the agent has no {family} --encap-source");
    }
    Ok(())
}

/// The agent, over the real datapath (`Datapath`) or an in-memory one
/// (`MemMaps`, for tests without BPF).
pub struct Agent<M: Maps = Datapath> {
    /// The datapath it owns.
    pub dp: M,
    opts: AgentOptions,
    vips: BTreeMap<Vip, VipState>,
    free_vip_ids: VecDeque<u32>,
    free_backend_ids: VecDeque<u32>,
    backend_gens: Vec<u16>,
    /// VIPs changed since the last `flush`.
    dirty: BTreeSet<Vip>,
    /// VIPs whose last publication failed (no table slot, a map error):
    /// published again from `tick` at `retry_at`, not on every flush.
    pub(crate) unpublished: BTreeSet<Vip>,
    /// When `tick` publishes `unpublished` again.
    pub(crate) retry_at: Option<Instant>,
    /// The state file is behind the running state.
    state_dirty: bool,
    /// Tables published (each one plan, one ring write, one VIP entry).
    pub publications: u64,
    /// State-file saves.
    pub saves: u64,
    /// Health checks: one job per distinct target.
    checks: checks::Jobs,
    /// Maglev layouts shared by VIPs with the same backends.
    maglev: crate::tables::MaglevCache,
    /// Each VIP's config as TOML, for the state file (`dump_toml`).
    toml_cache: std::cell::RefCell<std::collections::HashMap<Vip, String>>,
    /// Backend MACs as the kernel's neighbour table has them.
    pub neighbours: crate::neigh::NeighCache,
    /// Connection-table entries at the last census (and when).
    census: Option<(u64, Instant)>,
    /// The state file kept for restarts (pinned deployments only).
    pub persist: Option<Persist>,
    /// Requests leave the state file to their caller (`take_save`, written
    /// outside the lock): the daemon sets this.
    pub defer_saves: bool,
}

impl<M: Maps> Agent<M> {
    /// An agent with no services over a loaded datapath.
    pub fn new(dp: M, opts: AgentOptions) -> Result<Agent<M>> {
        opts.health.validate()?;
        let macs: Vec<[u8; 6]> = std::iter::once(opts.iface_mac).chain(opts.accept_macs.iter().copied()).map(|m| m.0).collect();
        let mut dp = dp;
        dp.set_accepted_macs(&macs)?;
        let load = dp.opts();
        let free_vip_ids = (0..load.max_vips).collect();
        let free_backend_ids = (0..dp.max_backends()).collect();
        let backend_gens = vec![0; dp.max_backends() as usize];
        Ok(Agent {
            dp,
            opts,
            vips: BTreeMap::new(),
            free_vip_ids,
            free_backend_ids,
            backend_gens,
            dirty: BTreeSet::new(),
            unpublished: BTreeSet::new(),
            retry_at: None,
            state_dirty: false,
            publications: 0,
            saves: 0,
            checks: Default::default(),
            maglev: Default::default(),
            toml_cache: Default::default(),
            neighbours: Default::default(),
            census: None,
            persist: None,
            defer_saves: false,
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

    /// Whether a change of this VIP awaits publication (`xlb explain`).
    pub fn is_pending(&self, vip: &Vip) -> bool {
        self.dirty.contains(vip)
    }

    /// Mark a VIP for the next `flush` (and the state file); its check
    /// jobs are recomputed before the next round.
    fn mark(&mut self, vip: Vip) {
        self.mark_table(vip);
        self.checks.stale();
    }

    /// `mark`, for a change that leaves every check target as it was (a
    /// weight, slow start): recomputing the jobs walks every backend of
    /// every VIP under the lock.
    fn mark_table(&mut self, vip: Vip) {
        self.toml_cache.get_mut().remove(&vip);
        self.dirty.insert(vip);
        self.state_dirty = true;
    }

    /// Publish every VIP changed since the last flush, once each, then save
    /// the state file once. Every operator request ends with it. With
    /// `defer_saves` (the daemon), the caller saves (`take_save`, written
    /// outside the lock): the API before it answers, the health loop once
    /// per tick.
    pub fn flush(&mut self) -> Result<()> {
        let r = self.publish_dirty();
        if !self.defer_saves {
            self.save_if_dirty();
        }
        r
    }

    /// Publish every VIP changed since the last call, once each, without
    /// saving the state file: health results, slow start and neighbour
    /// changes use it, and the health loop saves at most once per tick
    /// (`save_if_dirty`), so a burst of results costs one save.
    pub fn publish_dirty(&mut self) -> Result<()> {
        let dirty = std::mem::take(&mut self.dirty);
        let mut first_err = None;
        let t = Instant::now();
        // A burst: its new tables in one batch (a table change waits for no
        // kernel grace period while ready tables last).
        if dirty.len() > 1 {
            if let Err(e) = self.dp.reserve_tables(dirty.len()) {
                log::warn!("reserving {} tables: {e:#}", dirty.len());
            }
        }
        let reserved = t.elapsed();
        let n = dirty.len();
        let mut failed = 0;
        for v in dirty {
            if self.vips.contains_key(&v) {
                if let Err(e) = self.publish_counted(&v, false) {
                    if failed == 0 {
                        log::error!("VIP {v}: publishing failed: {e:#}");
                    }
                    failed += 1;
                    first_err.get_or_insert(e);
                }
            }
        }
        if failed > 0 {
            // One line for a burst, and a retry that does not spin.
            log::error!("{failed} VIP(s) not published (the first one's error above); retried in {} s", PUBLISH_RETRY.as_secs());
        }
        if n >= BURST_LOG {
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            log::info!("{n} VIPs published in {:.1} ms ({:.1} ms of it making tables ready)", ms(t.elapsed()), ms(reserved));
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Whether the state file is behind the running state (a save is due).
    pub fn state_behind(&self) -> bool {
        self.state_dirty
    }

    /// Save the state file if anything changed since the last save.
    pub fn save_if_dirty(&mut self) {
        if self.state_dirty {
            self.save_state();
        }
    }

    /// Add a service (with no backends: its packets are dropped and
    /// counted), checked with the agent's health settings.
    pub fn add_vip(&mut self, vip: Vip, algo: Algo, persist_secs: u16) -> Result<()> {
        self.add_vip_spec(vip, &VipSpec { algo, persist: persist_secs, ..Default::default() })
    }

    /// Add a service with its own health settings and all-down behaviour.
    pub fn add_vip_with(&mut self, vip: Vip, algo: Algo, persist_secs: u16, health: Option<HealthConfig>, all_down: AllDown) -> Result<()> {
        self.add_vip_spec(vip, &VipSpec { algo, persist: persist_secs, health, all_down, ..Default::default() })
    }

    /// Add a service as `spec` says; its VIP entry is written once.
    pub fn add_vip_spec(&mut self, vip: Vip, spec: &VipSpec) -> Result<()> {
        self.insert_vip(vip, spec)?;
        self.flush()
    }

    fn insert_vip(&mut self, vip: Vip, spec: &VipSpec) -> Result<()> {
        spec.validate(&vip)?;
        if self.vips.contains_key(&vip) {
            bail!("VIP {vip} already exists");
        }
        let max = self.dp.opts().max_vips;
        let id = *self
            .free_vip_ids
            .front()
            .ok_or_else(|| anyhow!("cannot add VIP {vip}: the limit of {max} VIPs is reached (raise it with `xlb agent --max-vips`)"))?;
        let health_explicit = spec.health.is_some();
        let health = spec.health.clone().unwrap_or_else(|| self.opts.health.clone());
        check_any_port_health(&vip, &health)?;
        let published =
            VipInfo { vip_id: id, algo: spec.algo as u8, persist_secs: spec.persist, flags: spec.opts.flags(), ..Default::default() };
        self.put_entry(&vip, &vip.key(), &published)?;
        self.free_vip_ids.pop_front();
        self.vips.insert(
            vip,
            VipState {
                id,
                algo: spec.algo,
                persist_secs: spec.persist,
                health,
                health_explicit,
                all_down: spec.all_down,
                slow_start_ms: spec.slow_start_ms,
                opts: spec.opts,
                forward: spec.forward,
                failing_open: false,
                published,
                table_slot: None,
                backends: BTreeMap::new(),
                quic_ids: BTreeMap::new(),
                table: Vec::new(),
                published_at: None,
                retired: Default::default(),
                facts: Default::default(),
            },
        );
        log::info!("VIP {vip} added ({})", spec.algo.name());
        self.sync_filter(&vip)?;
        self.sync_fragment_alias(&vip)?;
        self.sync_echo(&vip, spec.opts.answer_ping)?;
        self.state_dirty = true;
        self.checks.stale();
        Ok(())
    }

    /// Remove a service and its backends.
    pub fn del_vip(&mut self, vip: &Vip) -> Result<()> {
        self.remove_vip(vip)?;
        self.flush()
    }

    fn remove_vip(&mut self, vip: &Vip) -> Result<()> {
        if !self.vips.contains_key(vip) {
            bail!("unknown VIP {vip}");
        }
        // Unpublish first: from here on its packets are XDP_PASS.
        self.drop_entry(vip, &vip.key())?;
        let ids: Vec<u32> = self.vips[vip].backends.values().map(|b| b.id).collect();
        let (vip_id, server_ids) = (self.vips[vip].id, self.vips[vip].quic_ids.clone());
        for sid in server_ids.keys() {
            self.dp.set_quic_id(vip_id, *sid, None)?;
        }
        let state = self.vips.remove(vip).expect("checked above");
        let answered = state.opts.answer_ping;
        for id in ids {
            self.release_backend_id(id)?;
        }
        self.free_vip_ids.push_back(state.id);
        self.dirty.remove(vip);
        self.toml_cache.get_mut().remove(vip);
        log::info!("VIP {vip} removed");
        self.sync_filter(vip)?;
        self.sync_fragment_alias(vip)?;
        self.sync_echo(vip, answered)?;
        // After the entries that may have copied the VIP's.
        if let Some(slot) = state.table_slot {
            self.release_table(slot)?;
        }
        self.state_dirty = true;
        self.checks.stale();
        Ok(())
    }

    /// Add a backend to a service. Without a MAC, it comes from the
    /// neighbour cache (the kernel's table, followed live); the backend
    /// carries traffic once it has a MAC and has passed its first check.
    pub fn add_backend(&mut self, vip: &Vip, ip: IpAddr, mac: Option<Mac>, weight: u32) -> Result<(usize, usize)> {
        self.add_backends(vip, &[(ip, mac, weight)])
    }

    /// Add several backends to a service with one table rebuild. All are
    /// validated first: on any error nothing is added.
    pub fn add_backends(&mut self, vip: &Vip, list: &[(IpAddr, Option<Mac>, u32)]) -> Result<(usize, usize)> {
        self.insert_backends(vip, list, None)?;
        let moved = self.publish(vip)?;
        self.flush()?;
        Ok(moved)
    }

    /// Add a backend with its own health settings (or the VIP's): one
    /// table publication.
    pub fn add_backend_checked(&mut self, vip: &Vip, ip: IpAddr, mac: Option<Mac>, weight: u32, check: Option<HealthConfig>) -> Result<(usize, usize)> {
        self.add_backend_full(vip, (ip, mac, weight), check, None, None)
    }

    /// `add_backend_checked` with a forwarding mode of its own (`None`:
    /// the VIP's) and a QUIC server ID: one table publication.
    pub fn add_backend_full(
        &mut self,
        vip: &Vip,
        (ip, mac, weight): (IpAddr, Option<Mac>, u32),
        check: Option<HealthConfig>,
        forward: Option<Forward>,
        server_id: Option<ServerId>,
    ) -> Result<(usize, usize)> {
        if let Some(h) = &check {
            h.validate()?;
        }
        self.check_server_ids(vip, &[(ip, server_id)])?;
        self.insert_backends(vip, &[(ip, mac, weight)], forward)?;
        if check.is_some() {
            self.change_backend_check(vip, ip, check)?;
        }
        self.set_server_ids(vip, &[(ip, server_id)])?;
        let moved = self.publish(vip)?;
        self.flush()?;
        Ok(moved)
    }

    /// Add backends (`forward`: their own forwarding mode, else the VIP's).
    fn insert_backends(&mut self, vip: &Vip, list: &[(IpAddr, Option<Mac>, u32)], forward: Option<Forward>) -> Result<()> {
        let state = self.vips.get(vip).ok_or_else(|| anyhow!("unknown VIP {vip}"))?;
        let checks = kind_for(vip, &state.health);
        let effective = forward.unwrap_or(state.forward);
        let mut seen = BTreeSet::new();
        for &(ip, _, weight) in list {
            config::check_weight(weight)?;
            config::check_backend_ip_for(vip, ip, effective)?;
            check_encap_source(&self.dp.encap_config(), ip, effective)?;
            if state.backends.contains_key(&ip) || !seen.insert(ip) {
                bail!("backend {ip} already exists in VIP {vip}");
            }
        }
        check_backends_per_vip(vip, state.algo, state.backends.len() + list.len())?;
        if state.backends.is_empty() && !list.is_empty() {
            let with = self.vips.values().filter(|s| !s.backends.is_empty()).count();
            check_tables(&self.dp.opts(), with + 1).map_err(|e| anyhow!("cannot add backends to VIP {vip}: {e}"))?;
        }
        if self.free_backend_ids.len() < list.len() {
            bail!("cannot add {} backend(s) to VIP {vip}: {}", list.len(), backends_full(self.free_backend_ids.len()));
        }
        let now = Instant::now();
        let up = checks == CheckKind::None;
        for &(ip, mac, weight) in list {
            let (id, gen) = self.claim_backend_id()?;
            let mut b = Backend::new(ip, mac, weight, (id, gen), up, now);
            b.forward_cfg = forward;
            b.forward = effective;
            if b.mac.is_none() && !effective.is_routed() {
                b.mac = self.neighbours.get(ip);
            }
            self.vips.get_mut(vip).expect("checked above").backends.insert(ip, b);
            log::debug!("VIP {vip}: backend {ip} added (weight {weight})");
        }
        self.mark(*vip);
        Ok(())
    }

    /// Whether a VIP's server IDs would follow the rules after giving
    /// `ids` to these (present or new) backends (`quic::check_server_ids`).
    fn check_server_ids(&self, vip: &Vip, ids: &[(IpAddr, Option<ServerId>)]) -> Result<()> {
        let state = self.vips.get(vip).ok_or_else(|| anyhow!("unknown VIP {vip}"))?;
        let given = |ip: &IpAddr| ids.iter().find(|(i, _)| i == ip).map(|(_, id)| *id);
        let after = state
            .backends
            .values()
            .map(|b| (b.ip, given(&b.ip).unwrap_or(b.server_id)))
            .chain(ids.iter().filter(|(ip, _)| !state.backends.contains_key(ip)).copied());
        crate::quic::check_server_ids(vip, state.opts.quic, after).map(|_| ())
    }

    /// Give backends of a VIP their QUIC server IDs (`None`: none), checked
    /// all together first; marks the VIP when one changed (publication
    /// writes `XLB_QUIC_IDS`). Returns whether one changed.
    fn set_server_ids(&mut self, vip: &Vip, ids: &[(IpAddr, Option<ServerId>)]) -> Result<bool> {
        self.check_server_ids(vip, ids)?;
        let state = self.vips.get_mut(vip).ok_or_else(|| anyhow!("unknown VIP {vip}"))?;
        if let Some((ip, _)) = ids.iter().find(|(ip, _)| !state.backends.contains_key(ip)) {
            bail!("backend {ip} is not in VIP {vip}");
        }
        let mut changed = false;
        for (ip, id) in ids {
            let b = state.backends.get_mut(ip).expect("checked above");
            changed |= b.server_id != *id;
            b.server_id = *id;
        }
        if changed {
            self.mark(*vip);
        }
        Ok(changed)
    }

    /// Give a backend its own health settings (replacing the VIP's).
    pub fn set_backend_check(&mut self, vip: &Vip, ip: IpAddr, check: Option<HealthConfig>) -> Result<()> {
        self.change_backend_check(vip, ip, check)?;
        self.flush()
    }

    fn change_backend_check(&mut self, vip: &Vip, ip: IpAddr, check: Option<HealthConfig>) -> Result<()> {
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
        }
        self.mark(*vip);
        Ok(())
    }

    /// Change a backend's weight. Weight 0 drains it: existing flows stay,
    /// new flows go elsewhere.
    pub fn set_weight(&mut self, vip: &Vip, ip: IpAddr, weight: u32) -> Result<()> {
        self.set_backend(vip, ip, Some(weight), None, false).map(|_| ())
    }

    /// Change a backend's weight and/or operator state; with `dry_run`,
    /// only report what the table change would be. Returns (entries that
    /// change, table size). Plans once, publishes once.
    pub fn set_backend(&mut self, vip: &Vip, ip: IpAddr, weight: Option<u32>, admin: Option<Admin>, dry_run: bool) -> Result<(usize, usize)> {
        if dry_run {
            let mut next = self.vips.get(vip).ok_or_else(|| anyhow!("unknown VIP {vip}"))?.clone();
            change_backend(vip, &mut next, ip, weight, admin)?;
            let p = plan::plan(&next, self.dp.opts().ring_size, Instant::now(), &mut self.maglev, true)?;
            return Ok((p.moved.unwrap_or(0), p.table.len()));
        }
        let state = self.vips.get_mut(vip).ok_or_else(|| anyhow!("unknown VIP {vip}"))?;
        change_backend(vip, state, ip, weight, admin)?;
        log::info!("VIP {vip}: backend {ip} set to weight {} ({:?})", state.backends[&ip].weight, state.backends[&ip].admin);
        // Maintenance stops a backend's checks; a weight changes none.
        if admin.is_some() {
            self.mark(*vip);
        } else {
            self.mark_table(*vip);
        }
        let moved = self.publish(vip)?;
        self.flush()?;
        Ok(moved)
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
            self.dirty.insert(v);
        }
        if self.retry_at.is_some_and(|t| now >= t) {
            self.retry_at = None;
            self.dirty.extend(std::mem::take(&mut self.unpublished).into_iter().filter(|v| self.vips.contains_key(v)));
        }
        self.publish_dirty()
    }

    /// Set a VIP's slow-start time.
    pub fn set_slow_start(&mut self, vip: &Vip, ms: u64) -> Result<()> {
        config::check_slow_start(ms)?;
        self.vips.get_mut(vip).ok_or_else(|| anyhow!("unknown VIP {vip}"))?.slow_start_ms = ms;
        self.mark_table(*vip);
        self.flush()
    }

    /// Remove a backend from a service; its flows move to the others.
    pub fn del_backend(&mut self, vip: &Vip, ip: IpAddr) -> Result<(usize, usize)> {
        let moved = self.remove_backends(vip, &[ip])?;
        self.flush()?;
        Ok(moved)
    }

    /// Remove backends and publish their VIP's table at once (their ids are
    /// released only after the table stopped naming them).
    fn remove_backends(&mut self, vip: &Vip, ips: &[IpAddr]) -> Result<(usize, usize)> {
        let state = self.vips.get(vip).ok_or_else(|| anyhow!("unknown VIP {vip}"))?;
        if let Some(ip) = ips.iter().find(|ip| !state.backends.contains_key(ip)) {
            bail!("backend {ip} is not in VIP {vip}");
        }
        let mut ids = Vec::new();
        for ip in ips {
            let b = self.vips.get_mut(vip).expect("checked above").backends.remove(ip).expect("checked above");
            let carried = self.dp.backend_counters(b.id)?;
            self.vips.get_mut(vip).expect("checked above").retired.add(&carried);
            ids.push(b.id);
            log::debug!("VIP {vip}: backend {ip} removed");
        }
        self.mark(*vip);
        let moved = self.publish(vip)?;
        for id in ids {
            self.release_backend_id(id)?;
        }
        Ok(moved)
    }

    /// Take a free backend id with its next generation (so the id's earlier
    /// flows never match), its counters zeroed.
    fn claim_backend_id(&mut self) -> Result<(u32, u16)> {
        let id = self.free_backend_ids.pop_front().ok_or_else(|| anyhow!("{}", backends_full(0)))?;
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

    /// Set every backend's active-flow count from a census of the
    /// connection table (corrects flows that ended without FIN/RST).
    pub fn apply_census(&mut self, census: &crate::conntrack::ConntrackCensus) -> Result<()> {
        let ids = self.census_backends();
        self.apply_census_to(census, &ids)
    }

    /// Every backend (id, generation) a census sets.
    pub fn census_backends(&self) -> Vec<(u32, u16)> {
        self.vips.values().flat_map(|s| s.backends.values().map(|b| (b.id, b.gen))).collect()
    }

    /// `apply_census` for some backends: the daemon applies a census in
    /// parts, releasing the lock between them (one write per backend: at
    /// 1 536 backends, a few ms that a request would otherwise wait).
    pub fn apply_census_to(&mut self, census: &crate::conntrack::ConntrackCensus, ids: &[(u32, u16)]) -> Result<()> {
        for &(id, gen) in ids {
            let n = census.open.get(&(id, gen)).copied().unwrap_or(0);
            self.dp.set_backend_conns(id, n)?;
        }
        self.census = Some((census.entries, Instant::now()));
        Ok(())
    }
}

/// A VIP's index in the pre-filter.
fn filter_index(v: &Vip) -> u32 {
    let k = v.key();
    lb_common::vip_filter_index(&k.addr, k.plain_family())
}

/// Apply a weight and/or operator state to a VIP's backend (validated).
fn change_backend(vip: &Vip, state: &mut VipState, ip: IpAddr, weight: Option<u32>, admin: Option<Admin>) -> Result<()> {
    if let Some(w) = weight {
        config::check_weight(w)?;
    }
    let health = state.health.clone();
    let b = state.backends.get_mut(&ip).ok_or_else(|| anyhow!("backend {ip} is not in VIP {vip}"))?;
    if let Some(w) = weight {
        b.weight = w;
    }
    if let Some(a) = admin {
        if a == Admin::Ready && b.admin == Admin::Maint {
            // Back from maintenance: checked again from scratch.
            b.health.up = kind_for(vip, b.check.as_ref().unwrap_or(&health)) == CheckKind::None;
            b.health.checked = b.health.up;
            b.up_since = b.health.up.then(Instant::now);
        }
        b.admin = a;
    }
    Ok(())
}

/// The most backends one VIP may have: least-conn scans them all in the
/// datapath; the others are bounded by the backend array.
pub fn check_backends_per_vip(vip: &Vip, algo: Algo, n: usize) -> Result<()> {
    if algo == Algo::LeastConn && n > lb_common::MAX_LEAST_CONN_BACKENDS as usize {
        bail!(
            "VIP {vip} would have {n} backends; least-conn allows at most {} per VIP (a fixed limit of the datapath's scan)",
            lb_common::MAX_LEAST_CONN_BACKENDS
        );
    }
    Ok(())
}

/// VIPs with backends each need a table: at most `--max-tables` of them.
pub fn check_tables(load: &crate::maps::LoadOptions, vips_with_backends: usize) -> Result<()> {
    let max = load.tables();
    if vips_with_backends > max as usize {
        bail!(
            "{vips_with_backends} VIPs would have backends; the limit of tables is {max} (raise it with `xlb agent --max-tables`; each table takes {:.1} MiB)",
            lb_common::TableLine::bytes(load.ring_size) as f64 / 1048576.0
        );
    }
    Ok(())
}

/// The error when backend ids run out.
fn backends_full(free: usize) -> String {
    format!("only {free} of the {} backend entries are free (a fixed limit: lb_common::MAX_BACKENDS)", lb_common::MAX_BACKENDS)
}

#[cfg(test)]
mod tests;
