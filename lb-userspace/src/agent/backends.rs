//! Backend operations: add, remove, change weight, operator state and
//! checks, QUIC server ids; backend ids and their generations; the
//! connection-table census of active flows. Each validates everything
//! first, then changes the desired state and marks the VIPs it touched.

use anyhow::{anyhow, bail, Result};
use lb_common::{Algo, BackendInfo, Forward};
use std::{collections::BTreeSet, net::IpAddr, time::Instant};

use super::{check_encap_source, check_tables, kind_for, plan, Admin, Agent, Backend, Maps, VipState};
use crate::{
    config::{self, CheckKind, HealthConfig, Mac, Vip},
    quic::ServerId,
};

impl<M: Maps> Agent<M> {
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
        self.add_backend_full(vip, (ip, mac, weight), check, None, None).map(Option::unwrap_or_default)
    }

    /// `add_backend_checked` with a forwarding mode of its own (`None`:
    /// the VIP's) and a QUIC server ID: one table publication (`None`: left
    /// to the next tick, see `publish_request`).
    pub fn add_backend_full(
        &mut self,
        vip: &Vip,
        (ip, mac, weight): (IpAddr, Option<Mac>, u32),
        check: Option<HealthConfig>,
        forward: Option<Forward>,
        server_id: Option<ServerId>,
    ) -> Result<Option<(usize, usize)>> {
        if let Some(h) = &check {
            h.validate()?;
        }
        self.check_server_ids(vip, &[(ip, server_id)])?;
        self.insert_backends(vip, &[(ip, mac, weight)], forward)?;
        if check.is_some() {
            self.change_backend_check(vip, ip, check)?;
        }
        self.set_server_ids(vip, &[(ip, server_id)])?;
        let moved = self.publish_request(vip)?;
        self.flush()?;
        Ok(moved)
    }

    /// Add backends (`forward`: their own forwarding mode, else the VIP's).
    pub(super) fn insert_backends(&mut self, vip: &Vip, list: &[(IpAddr, Option<Mac>, u32)], forward: Option<Forward>) -> Result<()> {
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
    pub(super) fn set_server_ids(&mut self, vip: &Vip, ids: &[(IpAddr, Option<ServerId>)]) -> Result<bool> {
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

    pub(super) fn change_backend_check(&mut self, vip: &Vip, ip: IpAddr, check: Option<HealthConfig>) -> Result<()> {
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
        self.set_backend(vip, ip, Some(weight), None, false).map(drop)
    }

    /// Change a backend's weight and/or operator state; with `dry_run`,
    /// only report what the table change would be. Returns (entries that
    /// change, table size; `None`: left to the next tick, see
    /// `publish_request`). Plans once, publishes once.
    pub fn set_backend(&mut self, vip: &Vip, ip: IpAddr, weight: Option<u32>, admin: Option<Admin>, dry_run: bool) -> Result<Option<(usize, usize)>> {
        if dry_run {
            let mut next = self.vips.get(vip).ok_or_else(|| anyhow!("unknown VIP {vip}"))?.clone();
            change_backend(vip, &mut next, ip, weight, admin)?;
            let p = plan::plan(&next, self.dp.opts().ring_size, Instant::now(), &mut self.maglev, true)?;
            return Ok(Some((p.moved.unwrap_or(0), p.table.len())));
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
        let moved = self.publish_request(vip)?;
        self.flush()?;
        Ok(moved)
    }

    /// Remove a backend from a service; its flows move to the others.
    pub fn del_backend(&mut self, vip: &Vip, ip: IpAddr) -> Result<(usize, usize)> {
        let moved = self.remove_backends(vip, &[ip])?;
        self.flush()?;
        Ok(moved)
    }

    /// Remove backends and publish their VIP's table at once (their ids are
    /// released only after the table stopped naming them).
    pub(super) fn remove_backends(&mut self, vip: &Vip, ips: &[IpAddr]) -> Result<(usize, usize)> {
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
    pub(super) fn claim_backend_id(&mut self) -> Result<(u32, u16)> {
        let id = self.free_backend_ids.pop_front().ok_or_else(|| anyhow!("{}", backends_full(0)))?;
        self.backend_gens[id as usize] = self.backend_gens[id as usize].wrapping_add(1);
        self.dp.reset_backend_counters(id)?;
        self.dp.set_backend_conns(id, 0)?;
        Ok((id, self.backend_gens[id as usize]))
    }

    pub(super) fn release_backend_id(&mut self, id: u32) -> Result<()> {
        // The entry keeps its generation: a restarted agent reads it back, so
        // the id's next owner never matches its predecessor's flows.
        self.write_backend(id, &BackendInfo { gen: self.backend_gens[id as usize], ..Default::default() })?;
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

/// Apply a weight and/or operator state to a VIP's backend (validated).
pub(super) fn change_backend(vip: &Vip, state: &mut VipState, ip: IpAddr, weight: Option<u32>, admin: Option<Admin>) -> Result<()> {
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

/// The error when backend ids run out.
fn backends_full(free: usize) -> String {
    format!("only {free} of the {} backend entries are free (a fixed limit: lb_common::MAX_BACKENDS)", lb_common::MAX_BACKENDS)
}
