//! The agent's state and the one path by which it reaches the datapath.
//!
//! Data flows one way: operations (CLI/API, config file) change the desired
//! state after validating everything they touch; health results change
//! backends' runtime state; both only mark the VIPs they touched, and
//! `flush` turns each marked VIP into map writes once (one plan, one table
//! write, one VIP-entry update) and saves the state file once, however many
//! changes arrived together. A table is published without readers ever
//! seeing a half-written one: it goes to a free ring slot first, then a
//! single VIP-entry update switches the datapath over, and the old slot is
//! recycled last (FIFO, so it is not rewritten while a packet may still
//! read it).
//!
//! Submodules, one concern each: `model` (services, backends, health),
//! `plan` (what a table change does), `checks` (check jobs shared by every
//! VIP using a target, rise/fall, the neighbour cache), `desired` (apply and
//! dump a config), `status` (what status/stats/metrics read), `adopt`
//! (restarts), `maps` (the narrow datapath trait and its in-memory twin).

use anyhow::{anyhow, bail, Result};
use lb_common::{Algo, BackendInfo, VipInfo, BACKEND_F_ALIVE};

pub use crate::config::Admin;
use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::IpAddr,
    time::Instant,
};

use crate::{
    config::{self, AllDown, CheckKind, HealthConfig, Mac, Vip},
    maps::Datapath,
};

mod adopt;
mod checks;
mod desired;
pub mod maps;
mod model;
mod plan;
mod status;
pub use adopt::{in_use as backend_entry_in_use, Adoption, Persist};
pub use checks::{kind_for, CheckJob, CheckOutcome, CheckTarget, Probe};
pub use maps::{Maps, MemMaps};
pub use model::{AgentReport, AgentState, Backend, Health, VipState, SLOW_START_STEPS};
pub use status::{BackendStatus, Status, VipStatus};

pub use crate::config::parse_algo;

/// Check a persistence timeout for an algorithm.
pub fn check_persist(algo: Algo, secs: u32) -> Result<u16> {
    if secs > 0 && algo != Algo::SourceHash {
        bail!("--persist-timeout only applies to the source-hash algorithm");
    }
    u16::try_from(secs).map_err(|_| anyhow!("persistence timeout {secs} s is over the maximum of {} s", u16::MAX))
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
}

impl Default for VipSpec {
    fn default() -> Self {
        VipSpec { algo: Algo::Maglev, persist: 0, health: None, all_down: AllDown::Drop, slow_start_ms: 0 }
    }
}

impl VipSpec {
    /// Check every rule of a VIP's settings (the one place they are checked).
    pub fn validate(&self) -> Result<()> {
        check_persist(self.algo, self.persist as u32)?;
        if let Some(h) = &self.health {
            h.validate()?;
        }
        config::check_slow_start(self.slow_start_ms)?;
        Ok(())
    }
}

/// The agent, over the real datapath (`Datapath`) or an in-memory one
/// (`MemMaps`, for tests without BPF).
pub struct Agent<M: Maps = Datapath> {
    /// The datapath it owns.
    pub dp: M,
    opts: AgentOptions,
    vips: BTreeMap<Vip, VipState>,
    free_vip_ids: VecDeque<u32>,
    free_ring_slots: VecDeque<u32>,
    free_backend_ids: VecDeque<u32>,
    backend_gens: Vec<u16>,
    /// VIPs changed since the last `flush`.
    dirty: BTreeSet<Vip>,
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
        let free_ring_slots = (0..load.ring_slots()).collect();
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
            dirty: BTreeSet::new(),
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

    /// Mark a VIP for the next `flush` (and the state file).
    fn mark(&mut self, vip: Vip) {
        self.toml_cache.get_mut().remove(&vip);
        self.dirty.insert(vip);
        self.state_dirty = true;
        self.checks.stale();
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
        for v in dirty {
            if self.vips.contains_key(&v) {
                if let Err(e) = self.publish_counted(&v, false) {
                    log::error!("VIP {v}: publishing failed: {e:#}");
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
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
        self.add_vip_spec(vip, &VipSpec { algo, persist: persist_secs, health, all_down, slow_start_ms: 0 })
    }

    /// Add a service as `spec` says; its VIP entry is written once.
    pub fn add_vip_spec(&mut self, vip: Vip, spec: &VipSpec) -> Result<()> {
        self.insert_vip(vip, spec)?;
        self.flush()
    }

    fn insert_vip(&mut self, vip: Vip, spec: &VipSpec) -> Result<()> {
        spec.validate()?;
        if self.vips.contains_key(&vip) {
            bail!("VIP {vip} already exists");
        }
        let max = self.dp.opts().max_vips;
        let id = *self
            .free_vip_ids
            .front()
            .ok_or_else(|| anyhow!("cannot add VIP {vip}: the limit of {max} VIPs is reached (raise it with `xlb agent --max-vips`)"))?;
        let published = VipInfo { vip_id: id, algo: spec.algo as u8, persist_secs: spec.persist, ..Default::default() };
        self.dp.set_vip(&vip.key(), &published)?;
        self.free_vip_ids.pop_front();
        let health_explicit = spec.health.is_some();
        let health = spec.health.clone().unwrap_or_else(|| self.opts.health.clone());
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
                failing_open: false,
                published,
                ring_slot: None,
                backends: BTreeMap::new(),
                table: Vec::new(),
                published_at: None,
                retired: Default::default(),
                facts: Default::default(),
            },
        );
        log::info!("VIP {vip} added ({})", spec.algo.name());
        self.sync_filter(&vip)?;
        self.sync_fragment_alias(&vip)?;
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
        self.dirty.remove(vip);
        self.toml_cache.get_mut().remove(vip);
        log::info!("VIP {vip} removed");
        self.sync_filter(vip)?;
        self.sync_fragment_alias(vip)?;
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
        self.insert_backends(vip, list)?;
        let moved = self.publish(vip)?;
        self.flush()?;
        Ok(moved)
    }

    /// Add a backend with its own health settings (or the VIP's): one
    /// table publication.
    pub fn add_backend_checked(&mut self, vip: &Vip, ip: IpAddr, mac: Option<Mac>, weight: u32, check: Option<HealthConfig>) -> Result<(usize, usize)> {
        if let Some(h) = &check {
            h.validate()?;
        }
        self.insert_backends(vip, &[(ip, mac, weight)])?;
        if check.is_some() {
            self.change_backend_check(vip, ip, check)?;
        }
        let moved = self.publish(vip)?;
        self.flush()?;
        Ok(moved)
    }

    fn insert_backends(&mut self, vip: &Vip, list: &[(IpAddr, Option<Mac>, u32)]) -> Result<()> {
        let state = self.vips.get(vip).ok_or_else(|| anyhow!("unknown VIP {vip}"))?;
        let checks = kind_for(vip, &state.health);
        let mut seen = BTreeSet::new();
        for &(ip, _, weight) in list {
            config::check_weight(weight)?;
            config::check_backend_ip(vip, ip)?;
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
            if b.mac.is_none() {
                b.mac = self.neighbours.get(ip);
            }
            self.vips.get_mut(vip).expect("checked above").backends.insert(ip, b);
            log::debug!("VIP {vip}: backend {ip} added (weight {weight})");
        }
        self.mark(*vip);
        Ok(())
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
        self.mark(*vip);
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
        self.publish_dirty()
    }

    /// Set a VIP's slow-start time.
    pub fn set_slow_start(&mut self, vip: &Vip, ms: u64) -> Result<()> {
        config::check_slow_start(ms)?;
        self.vips.get_mut(vip).ok_or_else(|| anyhow!("unknown VIP {vip}"))?.slow_start_ms = ms;
        self.mark(*vip);
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

    /// Publish a VIP now (dropping its mark): backend entries, a new table
    /// in a free slot, then the VIP entry that switches to it. Returns
    /// (table entries that changed, table size).
    fn publish(&mut self, vip: &Vip) -> Result<(usize, usize)> {
        self.publish_counted(vip, true)
    }

    /// `publish`; with `count_moved` false the moved entries are not
    /// counted (0 is returned): the health loop's publications skip it.
    fn publish_counted(&mut self, vip: &Vip, count_moved: bool) -> Result<(usize, usize)> {
        self.dirty.remove(vip);
        self.state_dirty = true;
        let ring_size = self.dp.opts().ring_size;
        let src_mac = self.opts.iface_mac.0;
        let now = Instant::now();
        let state = self.vips.get(vip).ok_or_else(|| anyhow!("unknown VIP {vip}"))?;
        let p = plan::plan(state, ring_size, now, &mut self.maglev, count_moved)?;
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
        // 2. The table, in a free slot (unless it is the one published).
        let unchanged = old_slot.is_some() && p.unchanged;
        let new_slot = if p.table.is_empty() {
            None
        } else if unchanged {
            old_slot
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
        let state = self.vips.get(vip).expect("checked above");
        if published != state.published {
            self.dp.set_vip(&vip.key(), &published)?;
        }
        if let Some(old) = old_slot.filter(|o| Some(*o) != new_slot) {
            self.free_ring_slots.push_back(old);
        }
        // 4. Backends that left: after the table stopped naming them.
        for (id, i, _) in entries.iter().filter(|e| !e.2) {
            self.dp.set_backend(*id, i)?;
        }
        self.publications += 1;
        let state = self.vips.get_mut(vip).expect("checked above");
        if p.failing_open && !state.failing_open {
            log::error!("VIP {vip}: every backend is down; failing open (balancing over all of them)");
        }
        state.failing_open = p.failing_open;
        if new_slot != state.ring_slot || published != state.published {
            state.published_at = Some(std::time::SystemTime::now());
        }
        state.ring_slot = new_slot;
        let alias_changed = state.published != published;
        state.published = published;
        for b in state.backends.values_mut() {
            b.ramp_step = p.steps.get(&b.id).copied().unwrap_or(SLOW_START_STEPS);
        }
        log::debug!(
            "VIP {vip}: {} table of {} backend(s) published ({} entries, {} changed)",
            algo.name(),
            p.weights.len(),
            p.table.len(),
            p.moved.map_or("not counted".to_string(), |m| m.to_string())
        );
        let result = (p.moved.unwrap_or(0), p.table.len());
        state.table = p.table;
        state.facts = Default::default();
        if alias_changed {
            self.sync_fragment_alias(vip)?;
        }
        Ok(result)
    }

    /// Publish a VIP now, whether or not it changed (adoption republishes
    /// every table); returns (table entries that changed, table size).
    pub fn reconcile_counted(&mut self, vip: &Vip) -> Result<(usize, usize)> {
        let moved = self.publish(vip)?;
        self.flush()?;
        Ok(moved)
    }

    /// `reconcile_counted` without the counts.
    pub fn reconcile(&mut self, vip: &Vip) -> Result<()> {
        self.reconcile_counted(vip).map(|_| ())
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
    /// and protocol (fragments are balanced over its table). The VIP map
    /// has room for one alias per VIP (`maps::vip_map_entries`).
    fn sync_fragment_alias(&mut self, changed: &Vip) -> Result<()> {
        let alias_key = changed.key().fragment_alias();
        let first = self.vips.iter().find(|(v, _)| v.addr == changed.addr && v.proto == changed.proto);
        match first {
            Some((v, _)) if v.port < changed.port => Ok(()),
            Some((_, s)) => {
                let info = s.published;
                self.dp.set_vip(&alias_key, &info)
            }
            None => self.dp.del_vip(&alias_key).or(Ok(())),
        }
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
            load.ring_size as f64 * 8.0 / 1048576.0
        );
    }
    Ok(())
}

/// The error when backend ids run out.
fn backends_full(free: usize) -> String {
    format!("only {free} of the {} backend entries are free (a fixed limit: lb_common::MAX_BACKENDS)", lb_common::MAX_BACKENDS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::{Desired, DesiredBackend, DesiredVip},
        maps::LoadOptions,
    };

    fn agent(max_vips: u32) -> Agent<MemMaps> {
        let load = LoadOptions { max_vips, max_tables: max_vips, ring_size: 251, ..Default::default() };
        let opts = AgentOptions {
            iface_mac: "02:00:00:00:00:01".parse().expect("mac"),
            accept_macs: Vec::new(),
            health: HealthConfig { kind: CheckKind::None, ..Default::default() },
        };
        Agent::new(MemMaps::new(load), opts).expect("agent")
    }

    fn vip(s: &str) -> Vip {
        s.parse().expect("vip")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn mac(n: u8) -> Option<Mac> {
        Some(Mac([2, 0, 0, 0, 0, n]))
    }

    /// `n` VIPs on one address, 3 shared backends with known MACs, unchecked.
    fn desired(n: u16, weight: u32) -> Desired {
        let vips = (0..n)
            .map(|p| DesiredVip {
                vip: vip(&format!("10.0.0.100:{}/tcp", 1000 + p)),
                algo: Algo::Maglev,
                persist: 0,
                health: None,
                all_down: AllDown::Drop,
                slow_start_ms: 0,
                backends: (1..=3u8)
                    .map(|i| DesiredBackend {
                        ip: ip(&format!("10.0.0.{}", 10 + i)),
                        mac: mac(i),
                        weight: if i == 1 { weight } else { 1 },
                        health: None,
                        state: Admin::Ready,
                    })
                    .collect(),
            })
            .collect();
        Desired { health: HealthConfig { kind: CheckKind::None, ..Default::default() }, vips, sync: None }
    }

    fn with_state_file(a: &mut Agent<MemMaps>, name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("xlb-agent-test-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("state.json");
        let identity = crate::pin::identity::Identity { netns_cookie: 1, ifindex: 1 };
        a.persist = Some(Persist { path: path.clone(), layout: "test".into(), identity, mode: "native".into(), order: Default::default() });
        dir
    }

    #[test]
    fn a_reload_publishes_each_vip_once_and_saves_once() {
        let mut a = agent(64);
        let dir = with_state_file(&mut a, "reload");
        a.apply_desired(&desired(64, 1)).expect("apply");
        assert_eq!(a.dp.ring_writes, 64, "one table per VIP");
        assert_eq!(a.publications, 64);
        assert_eq!(a.saves, 1, "one state-file save for the whole reload");
        assert!(a.vips().iter().all(|(v, s)| a.dp.table(&v.key()) == s.table && s.table.len() == 251));
        // The same file again changes nothing.
        assert!(a.apply_desired(&desired(64, 1)).expect("apply").is_empty());
        assert_eq!(a.dp.ring_writes, 64);
        // One weight in every VIP: each table once more.
        let changes = a.apply_desired(&desired(64, 3)).expect("apply");
        assert_eq!(changes.len(), 64);
        assert_eq!(a.dp.ring_writes, 128);
        assert_eq!(a.saves, 2);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_state_files_config_is_the_dump_and_follows_every_change() {
        let mut a = agent(64);
        a.apply_desired(&desired(8, 1)).expect("apply");
        let same = |a: &Agent<MemMaps>| {
            let parsed = Desired::parse(&a.dump_toml().expect("toml"), "test").expect("parses");
            let dumped = Desired::parse(&toml::to_string(&a.dump()).expect("toml"), "test").expect("parses");
            assert_eq!(parsed, dumped);
        };
        same(&a);
        a.set_backend(&vip("10.0.0.100:1003/tcp"), ip("10.0.0.11"), Some(7), Some(Admin::Drain), false).expect("set");
        same(&a);
        a.del_vip(&vip("10.0.0.100:1000/tcp")).expect("del");
        a.add_vip_with(vip("10.0.0.100:1000/tcp"), Algo::SourceHash, 30, None, AllDown::FailOpen).expect("re-add");
        same(&a);
        assert!(a.dump_toml().expect("toml").contains("persist_timeout = 30"));
        a.apply_desired(&desired(4, 2)).expect("apply");
        same(&a);
    }

    #[test]
    fn deferred_saves_are_one_per_tick_and_never_go_back_in_time() {
        let mut a = agent(8);
        let dir = with_state_file(&mut a, "deferred");
        a.defer_saves = true;
        a.apply_desired(&desired(2, 1)).expect("apply");
        a.set_weight(&vip("10.0.0.100:1000/tcp"), ip("10.0.0.11"), 4).expect("weight");
        assert_eq!(a.saves, 0, "requests leave the save to their caller");
        let first = a.take_save().expect("the file is behind");
        assert!(a.take_save().is_none(), "one save for both changes");
        a.set_weight(&vip("10.0.0.100:1000/tcp"), ip("10.0.0.11"), 5).expect("weight");
        let second = a.take_save().expect("behind again");
        // Written out of order (two requests' writes racing): the later
        // snapshot stays.
        second.write();
        first.write();
        let snap = crate::state::Snapshot::load(&dir.join("state.json")).expect("load").expect("a file");
        assert_eq!(snap.config, a.dump_toml().expect("dump"));
        assert!(snap.config.contains("weight = 5"), "{}", snap.config);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_request_changes_the_tables_once() {
        let mut a = agent(8);
        let dir = with_state_file(&mut a, "request");
        let v = vip("10.0.0.100:80/tcp");
        let spec = VipSpec { slow_start_ms: 1000, ..Default::default() };
        a.add_vip_spec(v, &spec).expect("vip");
        assert_eq!((a.dp.vip_writes, a.dp.ring_writes, a.saves), (2, 0, 1), "VIP entry and its fragment alias, no table yet");
        a.add_backends(&v, &[(ip("10.0.0.11"), mac(1), 1), (ip("10.0.0.12"), mac(2), 1)]).expect("backends");
        assert_eq!((a.dp.ring_writes, a.saves), (1, 2));
        let (w, s) = (a.dp.ring_writes, a.saves);
        let (moved, size) = a.set_backend(&v, ip("10.0.0.11"), Some(5), Some(Admin::Ready), true).expect("dry run");
        assert!(moved > 0 && size == 251);
        assert_eq!((a.dp.ring_writes, a.saves), (w, s), "a dry run writes nothing");
        assert_eq!(a.set_backend(&v, ip("10.0.0.11"), Some(5), None, false).expect("set"), (moved, size), "the dry run said what happens");
        assert_eq!((a.dp.ring_writes, a.saves), (w + 1, s + 1), "one plan, one write, one save");
        a.add_backend_checked(&v, ip("10.0.0.13"), mac(3), 1, Some(HealthConfig { kind: CheckKind::None, ..Default::default() })).expect("add");
        assert_eq!((a.dp.ring_writes, a.saves), (w + 2, s + 2));
        a.del_backend(&v, ip("10.0.0.13")).expect("del");
        assert_eq!((a.dp.ring_writes, a.saves), (w + 3, s + 3));
        // Bad input changes nothing.
        assert!(a.set_backend(&v, ip("10.0.0.11"), Some(1_000_000), None, false).is_err());
        assert!(a.del_backend(&v, ip("10.0.0.99")).is_err());
        assert!(a.add_backends(&v, &[(ip("10.0.0.14"), None, 1), (ip("10.0.0.14"), None, 1)]).is_err());
        assert_eq!((a.dp.ring_writes, a.saves), (w + 3, s + 3));
        assert_eq!(a.vips()[&v].backends.len(), 2);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn max_vips_means_services_whatever_the_aliases_need() {
        // Every VIP on its own address needs a fragment alias too: the VIP
        // map has room for both, so the limit is the one the flag names.
        let mut a = agent(4);
        for i in 0..4 {
            a.add_vip(vip(&format!("10.0.0.{}:80/tcp", 100 + i)), Algo::Maglev, 0).expect("within the limit");
        }
        assert_eq!(a.dp.vips.len(), 8, "4 VIPs + 4 aliases");
        let e = a.add_vip(vip("10.0.0.200:80/tcp"), Algo::Maglev, 0).expect_err("over the limit").to_string();
        assert_eq!(e, "cannot add VIP 10.0.0.200:80/tcp: the limit of 4 VIPs is reached (raise it with `xlb agent --max-vips`)");
        assert!(!e.contains('\n'));
        // A reload over the limit is refused whole, naming the flag.
        let e = a.apply_desired(&desired(5, 1)).expect_err("over").to_string();
        assert!(e.contains("limit is 4") && e.contains("--max-vips"), "{e}");
        assert_eq!(a.vips().len(), 4, "nothing changed");
        // Freed slots are reusable.
        a.del_vip(&vip("10.0.0.100:80/tcp")).expect("del");
        a.add_vip(vip("10.0.0.200:80/tcp"), Algo::Maglev, 0).expect("room again");
    }

    #[test]
    fn vips_with_backends_are_bounded_by_the_tables() {
        let load = LoadOptions { max_vips: 8, max_tables: 2, ring_size: 251, ..Default::default() };
        let opts = AgentOptions { iface_mac: "02:00:00:00:00:01".parse().expect("mac"), accept_macs: Vec::new(), health: HealthConfig { kind: CheckKind::None, ..Default::default() } };
        let mut a = Agent::new(MemMaps::new(load), opts).expect("agent");
        assert_eq!(a.dp.rings.len(), 4 * 251, "2 tables + 2 spares allocated, not 8 + 2");
        for p in 0..3 {
            a.add_vip(vip(&format!("10.0.0.100:{}/tcp", 80 + p)), Algo::Maglev, 0).expect("VIPs without backends need no table");
        }
        a.add_backend(&vip("10.0.0.100:80/tcp"), ip("10.0.0.11"), mac(1), 1).expect("1st table");
        a.add_backend(&vip("10.0.0.100:80/tcp"), ip("10.0.0.12"), mac(2), 1).expect("same table");
        a.add_backend(&vip("10.0.0.100:81/tcp"), ip("10.0.0.11"), mac(1), 1).expect("2nd table");
        let e = a.add_backend(&vip("10.0.0.100:82/tcp"), ip("10.0.0.11"), mac(1), 1).expect_err("3rd").to_string();
        assert!(e.contains("limit of tables is 2") && e.contains("--max-tables") && !e.contains('\n'), "{e}");
        // Many table changes in a row never run out of slots.
        for w in 1..20 {
            a.set_weight(&vip("10.0.0.100:80/tcp"), ip("10.0.0.11"), w).expect("reweight");
        }
        a.del_backend(&vip("10.0.0.100:81/tcp"), ip("10.0.0.11")).expect("frees the table");
        a.add_backend(&vip("10.0.0.100:82/tcp"), ip("10.0.0.11"), mac(1), 1).expect("room again");
    }

    #[test]
    fn backends_per_vip_limit_is_one_line_naming_it() {
        let mut a = agent(2);
        let v = vip("10.0.0.100:80/tcp");
        a.add_vip(v, Algo::LeastConn, 0).expect("vip");
        let many: Vec<(IpAddr, Option<Mac>, u32)> =
            (0..257u32).map(|i| (IpAddr::V4(std::net::Ipv4Addr::from(0x0a01_0000 + i + 1)), mac(1), 1)).collect();
        let e = a.add_backends(&v, &many).expect_err("too many").to_string();
        assert!(e.contains("least-conn allows at most 256") && !e.contains('\n'), "{e}");
        assert!(a.vips()[&v].backends.is_empty());
        a.add_backends(&v, &many[..256]).expect("256 fit");
    }

    #[test]
    fn a_mixed_family_or_duplicate_backend_is_refused_before_anything_changes() {
        let mut a = agent(2);
        let v = vip("10.0.0.100:80/tcp");
        a.add_vip(v, Algo::Maglev, 0).expect("vip");
        assert!(a.add_backend(&v, ip("2001:db8::1"), mac(1), 1).is_err());
        assert!(a.add_backend(&v, ip("224.0.0.1"), mac(1), 1).is_err());
        assert_eq!(a.dp.ring_writes, 0);
    }
}

