//! The agent's state and the one path by which it reaches the datapath.
//!
//! Data flows one way: operations (CLI/API, config file) change the desired
//! state after validating everything they touch; health results change
//! backends' runtime state; both only mark the VIPs they touched, and
//! `flush` turns each marked VIP into map writes once (one plan, one table
//! write, one VIP-entry update) and saves the state file once, however many
//! changes arrived together. A table is published without readers ever
//! seeing a half-written one: it is written whole into a ready table in a
//! slot of its own, then a single VIP-entry update switches the datapath
//! over; the replaced table is written again only once no program can
//! still be reading it (`maps::pool`).
//!
//! Here: the agent's state, VIP operations and the publication path.
//! Submodules, one concern each: `backends` (backend operations, ids, the
//! census), `model` (services, backends, health),
//! `plan` (what a table change does), `checks` (check jobs shared by every
//! VIP using a target, rise/fall, the neighbour cache), `desired` (apply and
//! dump a config), `status` (what status/stats/metrics read), `adopt`
//! (restarts), `maps` (the narrow datapath trait and its in-memory twin).

use anyhow::{anyhow, bail, Result};
use lb_common::{Algo, Forward, VipInfo};

pub use crate::config::Admin;
use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::{
    config::{self, AllDown, HealthConfig, Mac, Vip, VipOpts},
    maps::Datapath,
};

mod adopt;
mod backends;
mod checks;
mod desired;
pub mod maps;
mod model;
mod plan;
mod publish;
mod status;
pub use adopt::{in_use as backend_entry_in_use, save_soon_loop, Adoption, Persist};
pub use backends::check_backends_per_vip;
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
    /// What this agent last wrote to each backend entry: a publication
    /// rewrites only the entries that change (a VIP of 100 backends made
    /// 100 system calls per table change).
    written: std::collections::HashMap<u32, lb_common::BackendInfo>,
    /// Which backends `due_probes` looks at: the VIPs changed since its
    /// last call, and every VIP when its last full walk is `PROBE_WALK` old.
    probe_walk: checks::ProbeWalk,
    /// Connection-table entries at the last census (and when).
    census: Option<(u64, Instant)>,
    /// The state file kept for restarts (pinned deployments only).
    pub persist: Option<Persist>,
    /// Requests leave the state file to their caller (`take_save`, written
    /// outside the lock): the daemon sets this.
    pub defer_saves: bool,
    /// The request being handled does not wait for its table (`xlb backend
    /// add/set --no-wait`): see `publish_request`.
    defer_tables: bool,
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
            probe_walk: Default::default(),
            written: Default::default(),
            census: None,
            persist: None,
            defer_saves: false,
            defer_tables: false,
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

    /// Whether the requests handled until the next call wait for their
    /// tables (`false`: `--no-wait`, see `publish_request`).
    pub fn set_no_wait(&mut self, no_wait: bool) {
        self.defer_tables = no_wait;
    }

    /// Mark a VIP for the next `flush` (and the state file); its check
    /// jobs are recomputed before the next round.
    fn mark(&mut self, vip: Vip) {
        self.mark_table(vip);
        self.checks.stale.one(vip);
    }

    /// `mark`, for a change that leaves every check target as it was (a
    /// weight, slow start): recomputing the jobs walks every backend of
    /// every VIP under the lock.
    fn mark_table(&mut self, vip: Vip) {
        self.toml_cache.get_mut().remove(&vip);
        self.probe_walk.changed.one(vip);
        self.dirty.insert(vip);
        self.state_dirty = true;
    }

    /// Publish every VIP changed since the last flush, once each, then save
    /// the state file once. Every operator request ends with it. With
    /// `defer_saves` (the daemon), the caller saves (`take_save`, written
    /// outside the lock): the API before it answers, the health loop once
    /// per tick.
    pub fn flush(&mut self) -> Result<()> {
        // A request that does not wait leaves its VIPs to `tick`.
        let r = if self.defer_tables { Ok(()) } else { self.publish_dirty() };
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
                layout: None,
                facts: Default::default(),
            },
        );
        log::info!("VIP {vip} added ({})", spec.algo.name());
        self.sync_filter(&vip)?;
        self.sync_fragment_alias(&vip)?;
        self.sync_echo(&vip, spec.opts.answer_ping)?;
        self.state_dirty = true;
        self.checks.stale.one(vip);
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
        self.checks.stale.one(*vip);
        Ok(())
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

}

/// A VIP's index in the pre-filter.
fn filter_index(v: &Vip) -> u32 {
    let k = v.key();
    lb_common::vip_filter_index(&k.addr, k.plain_family())
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

#[cfg(test)]
mod tests;
