//! Restarts and upgrades without a dropped flow: the agent's state file,
//! and adopting pinned maps that an earlier agent (or an earlier version)
//! left running.
//!
//! Adoption keeps every VIP id, backend id and generation that the maps
//! confirm, so connection-table entries stay valid; tables are republished
//! (normally identical: zero entries change). Whatever the state file and
//! the maps disagree on is rebuilt with fresh ids, and map entries nobody
//! owns any more are removed last (`collect_garbage`), after the config file
//! (if any) has been applied, so no service is ever briefly missing.

use anyhow::{Context, Result};
use lb_common::{BackendInfo, VipInfo};
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::PathBuf,
    time::{Duration, Instant},
};

use super::{kind_for, Agent, AgentOptions, AgentState, Backend, Maps, VipState, SLOW_START_STEPS};
use crate::{
    config::{CheckKind, Desired},
    maps::PinnedScan,
    state::{BackendRuntime, Snapshot, VipRuntime, STATE_VERSION},
};

/// Where and how the agent keeps its state file.
#[derive(Clone, Debug)]
pub struct Persist {
    /// The state file.
    pub path: PathBuf,
    /// Pin layout of the maps (`pin::layout_name`).
    pub layout: String,
    /// The deployment the file belongs to.
    pub identity: crate::pin::identity::Identity,
    /// How the pinned link is attached (`native`, `generic`).
    pub mode: String,
    /// Keeps writes in the order their snapshots were taken.
    pub order: std::sync::Arc<SaveOrder>,
}

/// Orders state-file writes done outside the agent's lock: a snapshot
/// taken earlier never overwrites one taken later.
#[derive(Debug, Default)]
pub struct SaveOrder {
    taken: std::sync::atomic::AtomicU64,
    written: std::sync::Mutex<u64>,
}

/// A state-file write taken under the agent's lock (`Agent::take_save`) and
/// done outside it: at 512 VIPs rendering and writing the file is the
/// largest part of a request, and holding the lock for it delays every
/// other request and health result.
#[derive(Debug)]
pub struct PendingSave {
    snap: Snapshot,
    path: PathBuf,
    seq: u64,
    order: std::sync::Arc<SaveOrder>,
}

impl PendingSave {
    /// Write the file, unless a later snapshot is already written. A
    /// failure is logged: the datapath change it records has been made.
    pub fn write(self) {
        let Ok(mut written) = self.order.written.lock() else { return };
        if *written >= self.seq {
            return;
        }
        match self.snap.save(&self.path) {
            Ok(()) => *written = self.seq,
            Err(e) => log::error!("cannot save the agent's state (a restart would reschedule flows): {e:#}"),
        }
    }
}

/// Writes the state file soon after a request changed the agent, so the
/// API answers once the change is published instead of after the file
/// (rendering and writing it is most of a request at 512 VIPs). Wakes
/// coalesce: changes made while a write is under way, or in the pause
/// after it (nine times as long as the write took, and at least
/// `SAVE_PAUSE_MIN`: under a stream of requests the saver uses at most a
/// tenth of a CPU, which the requests and the commands that send them
/// share on a small host; at 64 × 100 backends the file is 1.6 MB), cost
/// one more write, not one each. A `kill -TERM` still saves on exit; a
/// `kill -9` within a pause and a save (~55 ms at 512 × 3, ~100 ms at 64 ×
/// 100) of an answer can leave that change out of the file (the datapath
/// has it; a new agent adopts the earlier state).
pub async fn save_soon_loop<M: Maps>(agent: std::sync::Arc<std::sync::Mutex<Agent<M>>>, wake: std::sync::Arc<tokio::sync::Notify>) {
    loop {
        wake.notified().await;
        let t = std::time::Instant::now();
        let save = match agent.lock() {
            Ok(mut a) => a.take_save(),
            Err(_) => return,
        };
        if let Some(s) = save {
            let _ = tokio::task::spawn_blocking(move || s.write()).await;
            tokio::time::sleep((t.elapsed() * SAVE_PAUSE_RATIO).clamp(SAVE_PAUSE_MIN, SAVE_PAUSE_MAX)).await;
        }
    }
}

/// `save_soon_loop`'s pause after a save, in units of the save's time.
const SAVE_PAUSE_RATIO: u32 = 9;

/// The shortest pause between two saves of `save_soon_loop`: at most 20
/// saves a second, however small the state (64 × 100 backends, one command
/// at a time, changed it 400 times a second; each save rendered the whole).
const SAVE_PAUSE_MIN: std::time::Duration = std::time::Duration::from_millis(50);

/// The longest pause between two saves of `save_soon_loop`.
const SAVE_PAUSE_MAX: std::time::Duration = std::time::Duration::from_millis(500);

/// A backend map entry in use (free entries keep only their generation).
pub fn in_use(b: &BackendInfo) -> bool {
    b.src_mac != [0; 6]
}

/// What `Agent::adopt` kept and rebuilt.
#[derive(Debug, Default, Clone, Copy)]
pub struct Adoption {
    /// VIPs whose id (and published table) the maps confirmed.
    pub vips_kept: usize,
    /// VIPs given a new id.
    pub vips_new: usize,
    /// Backends whose id and generation the maps confirmed (their flows stay).
    pub backends_kept: usize,
    /// Backends given a new id (their flows are rescheduled).
    pub backends_new: usize,
}

impl<M: Maps> Agent<M> {
    /// The state file's contents for the running state.
    pub fn snapshot(&self, layout: &str, identity: Option<crate::pin::identity::Identity>) -> Result<Snapshot> {
        let config = self.dump_toml().context("cannot render the config")?;
        let vips = self
            .vips
            .iter()
            .map(|(v, s)| VipRuntime {
                vip: v.to_string(),
                id: s.id,
                retired: [s.retired.packets, s.retired.bytes, s.retired.new_flows],
                backends: s
                    .backends
                    .values()
                    .map(|b| BackendRuntime {
                        ip: b.ip,
                        id: b.id,
                        gen: b.gen,
                        mac: b.mac,
                        up: b.health.up,
                        checked: b.health.checked,
                        checks: b.health.checks,
                        failures: b.health.failures,
                        transitions: b.health.transitions,
                        ramp_step: b.ramp_step,
                        agent_pct: b.agent.pct,
                        agent_state: std::borrow::Cow::Borrowed(b.agent.state.name()),
                    })
                    .collect(),
            })
            .collect();
        Ok(Snapshot { version: STATE_VERSION, layout: layout.to_string(), identity, mode: self.persist.as_ref().map(|p| p.mode.clone()).unwrap_or_default(), config, vips })
    }

    /// Rewrite the state file (when the agent keeps one). A failure is
    /// logged, not returned: the datapath change it records has been made.
    pub fn save_state(&mut self) {
        self.state_dirty = true;
        if let Some(s) = self.take_save() {
            s.write();
        }
    }

    /// The state file's next contents, when it is behind the running state
    /// (to `write` outside the agent's lock; writes keep their order).
    pub fn take_save(&mut self) -> Option<PendingSave> {
        if !std::mem::take(&mut self.state_dirty) {
            return None;
        }
        let p = self.persist.as_ref()?;
        self.saves += 1;
        match self.snapshot(&p.layout, Some(p.identity)) {
            Ok(snap) => {
                let seq = p.order.taken.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                Some(PendingSave { snap, path: p.path.clone(), seq, order: p.order.clone() })
            }
            Err(e) => {
                log::error!("cannot save the agent's state (a restart would reschedule flows): {e:#}");
                None
            }
        }
    }

    /// An agent over maps that may already carry a running deployment
    /// (`scan`), resuming the state in `snap`. Every id the maps use is
    /// reserved until `collect_garbage`.
    pub fn adopt(dp: M, opts: AgentOptions, snap: Option<&Snapshot>, scan: &PinnedScan) -> Result<(Agent<M>, Adoption)> {
        let desired = match snap {
            Some(s) => Some(Desired::parse(&s.config, "the agent's state file")?),
            None => None,
        };
        let mut opts = opts;
        if let Some(d) = &desired {
            opts.health = d.health.clone();
        }
        let mut a = Agent::new(dp, opts)?;
        for (id, b) in scan.backends.iter().enumerate() {
            if let Some(g) = a.backend_gens.get_mut(id) {
                *g = b.gen;
            }
        }
        let used_vip_ids: BTreeSet<u32> = scan.vips.iter().map(|(_, i)| i.vip_id).collect();
        let used_ids: BTreeSet<u32> =
            scan.backends.iter().enumerate().filter(|(_, b)| in_use(b)).map(|(i, _)| i as u32).collect();
        a.free_vip_ids.retain(|x| !used_vip_ids.contains(x));
        a.free_backend_ids.retain(|x| !used_ids.contains(x));

        let mut report = Adoption::default();
        let (Some(snap), Some(desired)) = (snap, desired) else { return Ok((a, report)) };
        let runtime: HashMap<&str, &VipRuntime> = snap.vips.iter().map(|v| (v.vip.as_str(), v)).collect();
        let published: HashMap<(lb_common::VipKey, Option<u8>), VipInfo> = scan
            .vips
            .iter()
            .map(|(k, i)| ((*k, None), *i))
            .chain(scan.prefixes.iter().map(|(k, l, i)| ((*k, Some(*l)), *i)))
            .collect();
        let now = Instant::now();
        for dv in &desired.vips {
            let name = dv.vip.to_string();
            let rt = runtime.get(name.as_str()).copied();
            let health = dv.health.clone().unwrap_or_else(|| a.opts.health.clone());
            let confirmed = rt.and_then(|rt| published.get(&(dv.vip.key(), dv.vip.prefix)).filter(|i| i.vip_id == rt.id).copied());
            let (id, published, table_slot, table) = match confirmed {
                Some(info) => {
                    report.vips_kept += 1;
                    let slot = (info.ring_size > 0).then_some(info.table_slot);
                    // A table that cannot be read back is published anew.
                    let table = match slot.map(|s| a.dp.read_table(s, info.ring_size)).transpose() {
                        Ok(t) => t.unwrap_or_default(),
                        Err(e) => {
                            log::warn!("VIP {}: its published table cannot be read back ({e:#}); publishing it anew", dv.vip);
                            Vec::new()
                        }
                    };
                    (info.vip_id, info, slot, table)
                }
                None => {
                    report.vips_new += 1;
                    let id = a.free_vip_ids.pop_front().context("no free VIP id for an adopted VIP")?;
                    let info =
                        VipInfo { vip_id: id, algo: dv.algo as u8, persist_secs: dv.persist, flags: dv.opts.flags(), ..Default::default() };
                    (id, info, None, Vec::new())
                }
            };
            let mut backends = BTreeMap::new();
            for db in &dv.backends {
                let brt: Option<&BackendRuntime> = rt.and_then(|r| r.backends.iter().find(|b| b.ip == db.ip));
                let kept = brt.filter(|b| {
                    confirmed.is_some()
                        && scan.backends.get(b.id as usize).is_some_and(|e| in_use(e) && e.gen == b.gen && e.vip_id == id)
                });
                let bid = match kept {
                    Some(b) => {
                        report.backends_kept += 1;
                        (b.id, b.gen)
                    }
                    None => {
                        report.backends_new += 1;
                        a.claim_backend_id()?
                    }
                };
                let unchecked = kind_for(&dv.vip, db.health.as_ref().unwrap_or(&health)) == CheckKind::None;
                let mut be = Backend::new(db.ip, db.mac, db.weight, bid, unchecked, now);
                be.check = db.health.clone();
                be.admin = db.state;
                be.forward_cfg = db.forward;
                be.forward = db.forward.unwrap_or(dv.forward);
                be.server_id = db.server_id;
                if let Some(b) = brt {
                    let h = &mut be.health;
                    h.up = b.up || unchecked;
                    h.checked = b.checked || unchecked;
                    h.checks = b.checks;
                    h.failures = b.failures;
                    h.transitions = b.transitions;
                    be.ramp_step = b.ramp_step.min(SLOW_START_STEPS);
                    be.agent.pct = b.agent_pct;
                    // An unknown name (a newer agent's) reads as up.
                    be.agent.state = AgentState::from_name(&b.agent_state).unwrap_or(AgentState::Up);
                    if be.mac.is_none() {
                        be.mac = b.mac;
                    }
                    // Resume a slow start at the step it had reached.
                    let done = dv.slow_start_ms * be.ramp_step.saturating_sub(1) as u64 / SLOW_START_STEPS as u64;
                    be.up_since = be.health.up.then(|| now.checked_sub(Duration::from_millis(done)).unwrap_or(now));
                }
                backends.insert(db.ip, be);
            }
            let retired = rt.map(|r| lb_common::Counters { packets: r.retired[0], bytes: r.retired[1], new_flows: r.retired[2] });
            a.vips.insert(
                dv.vip,
                VipState {
                    id,
                    algo: dv.algo,
                    persist_secs: dv.persist,
                    health,
                    health_explicit: dv.health.is_some(),
                    all_down: dv.all_down,
                    slow_start_ms: dv.slow_start_ms,
                    opts: dv.opts,
                    forward: dv.forward,
                    failing_open: false,
                    published,
                    table_slot,
                    backends,
                    // The pinned entries of a kept VIP: publication writes
                    // only their difference from what its backends say.
                    quic_ids: scan
                        .quic_ids
                        .iter()
                        .filter(|(k, _)| confirmed.is_some() && k.vip_id == id)
                        .map(|(k, b)| (k.server_id as u16, *b))
                        .collect(),
                    table,
                    published_at: None,
                    retired: retired.unwrap_or_default(),
                    layout: None,
                    facts: Default::default(),
                },
            );
        }
        a.checks.stale.all();
        let vips: Vec<_> = a.vips.keys().copied().collect();
        for v in &vips {
            let (moved, size) = a.reconcile_counted(v)?;
            log::info!("VIP {v}: adopted; {moved} of {size} table entries changed");
        }
        Ok((a, report))
    }

    /// After `adopt` (and the config file, if any): remove every map entry
    /// the agent does not own and free the ids and slots they held.
    pub fn collect_garbage(&mut self, scan: &PinnedScan) -> Result<()> {
        // Entries of owned VIPs and their derived ones (fragment aliases,
        // echo entries), by (key, prefix length).
        let owned: BTreeSet<(lb_common::VipKey, Option<u8>)> = self
            .vips
            .iter()
            .flat_map(|(v, s)| {
                [Some(v.key()), Some(v.key().fragment_alias()), s.opts.answer_ping.then(|| v.key().echo())]
                    .into_iter()
                    .flatten()
                    .map(|k| (k, v.prefix))
            })
            .collect();
        for (k, _) in &scan.vips {
            if !owned.contains(&(*k, None)) {
                self.dp.del_vip(k)?;
                log::info!("removed a VIP entry no longer configured");
            }
        }
        for (k, len, _) in &scan.prefixes {
            if !owned.contains(&(*k, Some(*len))) {
                self.dp.del_prefix_vip(k, *len)?;
                log::info!("removed a prefix-VIP entry no longer configured");
            }
        }
        self.dp.set_prefix_count(self.prefix_count())?;
        for (k, _) in &scan.quic_ids {
            let owned = self.vips.values().any(|s| s.id == k.vip_id && s.quic_ids.contains_key(&(k.server_id as u16)));
            if !owned {
                self.dp.set_quic_id(k.vip_id, k.server_id as u16, None)?;
            }
        }
        let owned_keys: BTreeSet<lb_common::VipKey> = self.vips.keys().filter(|v| v.prefix.is_none()).map(|v| v.key()).collect();
        let owned_ids: BTreeSet<u32> = self.vips.values().flat_map(|s| s.backends.values().map(|b| b.id)).collect();
        for (id, b) in scan.backends.iter().enumerate() {
            let id = id as u32;
            if in_use(b) && !owned_ids.contains(&id) {
                self.write_backend(id, &BackendInfo { gen: self.backend_gens[id as usize], ..Default::default() })?;
            }
        }
        // The VIP pre-filter: exact counts for every index in use before or now.
        let mut indexes: BTreeSet<u32> = scan.filter.iter().copied().collect();
        indexes.extend(owned_keys.iter().map(|k| lb_common::vip_filter_index(&k.addr, k.plain_family())));
        for idx in indexes {
            self.dp.set_vip_filter(idx, self.filter_value(idx))?;
        }
        let owned_vip_ids: BTreeSet<u32> = self.vips.values().map(|s| s.id).collect();
        let owned_slots: BTreeSet<u32> = self.vips.values().filter_map(|s| s.table_slot).collect();
        self.free_vip_ids = (0..self.dp.opts().max_vips).filter(|i| !owned_vip_ids.contains(i)).collect();
        // Tables no entry names (an agent stopped mid-publication, VIPs no
        // longer configured, an earlier agent's ready tables): freed.
        let loose = self.dp.release_unnamed(&owned_slots);
        if loose > 0 {
            log::info!("freeing {loose} table(s) no VIP names");
        }
        self.free_backend_ids = (0..self.dp.max_backends()).filter(|i| !owned_ids.contains(i)).collect();
        self.save_state();
        Ok(())
    }
}
