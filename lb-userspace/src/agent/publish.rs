//! Publication: how a VIP's planned table reaches the datapath (backend
//! entries, a new table in a free table slot, then the VIP entry that
//! switches to it, atomically for the datapath, then the old table freed),
//! and the entries that follow a VIP (the address pre-filter, the fragment
//! alias, the echo entry).

use anyhow::{anyhow, Result};
use lb_common::{BackendInfo, VipInfo, BACKEND_F_ALIVE};
use std::{collections::BTreeMap, time::Instant};

use super::{filter_index, plan, Agent, Backend, Maps, SLOW_START_STEPS};
use crate::config::Vip;

impl<M: Maps> Agent<M> {
    /// Publish a VIP an operator request changed, before the answer; or,
    /// for a request that does not wait (`set_no_wait`), leave it marked:
    /// the health loop's `tick` (every 20 ms) publishes every marked VIP
    /// once, so a script adding 100 backends to a VIP one command at a time
    /// costs a table build per tick, not per command (a build of 65 537
    /// slots takes ~1 ms, as long as starting the command). `None`: not
    /// published yet (no counts). The request has marked the VIP (`mark`),
    /// which is what `tick` publishes.
    pub(super) fn publish_request(&mut self, vip: &Vip) -> Result<Option<(usize, usize)>> {
        if self.defer_tables {
            debug_assert!(self.dirty.contains(vip), "a request marks the VIP it changes");
            return Ok(None);
        }
        self.publish(vip).map(Some)
    }

    /// Publish a VIP now (dropping its mark): backend entries, a new table
    /// in a free slot, then the VIP entry that switches to it, then the old
    /// table freed (after the entries that copy the VIP's). Returns
    /// (table entries that changed, table size).
    pub(super) fn publish(&mut self, vip: &Vip) -> Result<(usize, usize)> {
        self.publish_counted(vip, true)
    }

    /// `publish`; with `count_moved` false the moved entries are not
    /// counted (0 is returned): the health loop's publications skip it.
    pub(super) fn publish_counted(&mut self, vip: &Vip, count_moved: bool) -> Result<(usize, usize)> {
        let r = self.publish_now(vip, count_moved);
        if r.is_ok() {
            self.unpublished.remove(vip);
        } else if self.vips.contains_key(vip) {
            // Published again from `tick` (a later flush may not come).
            self.unpublished.insert(*vip);
            self.retry_at.get_or_insert(Instant::now() + super::PUBLISH_RETRY);
        }
        r
    }

    fn publish_now(&mut self, vip: &Vip, count_moved: bool) -> Result<(usize, usize)> {
        self.dirty.remove(vip);
        self.state_dirty = true;
        let ring_size = self.dp.opts().ring_size;
        let src_mac = self.opts.iface_mac.0;
        let now = Instant::now();
        let state = self.vips.get(vip).ok_or_else(|| anyhow!("unknown VIP {vip}"))?;
        let p = plan::plan(state, ring_size, now, &mut self.maglev, count_moved)?;
        let info = |b: &Backend, alive: bool, weight: u32| {
            let (addr, family) = match b.ip {
                std::net::IpAddr::V4(a) => (lb_common::addr_v4(a.octets()), lb_common::FAMILY_V4),
                std::net::IpAddr::V6(a) => (a.octets(), lb_common::FAMILY_V6),
            };
            BackendInfo {
                dst_mac: b.mac.map(|m| m.0).unwrap_or_default(),
                src_mac,
                flags: if alive { BACKEND_F_ALIVE } else { 0 },
                gen: b.gen,
                weight,
                vip_id: state.id,
                addr,
                forward: b.forward as u8,
                family,
                _pad: 0,
            }
        };
        let entries: Vec<(u32, BackendInfo, bool)> = state
            .backends
            .values()
            .map(|b| {
                let alive = p.alive.contains(&b.id);
                (b.id, info(b, alive, p.weights.get(&b.id).copied().unwrap_or(0)), alive)
            })
            .collect();
        let (vip_id, algo, persist_secs, old_slot, flags) = (state.id, state.algo, state.persist_secs, state.table_slot, state.opts.flags());
        // 1. Alive backends first, so the new table never points at an
        //    entry that is not ready.
        for (id, i, _) in entries.iter().filter(|e| e.2) {
            self.write_backend(*id, i)?;
        }
        // 2. The table, in a free slot (unless it is the one published).
        let unchanged = old_slot.is_some() && p.unchanged;
        let new_slot = if p.table.is_empty() {
            None
        } else if unchanged {
            old_slot
        } else {
            Some(self.dp.write_table(&p.table)?)
        };
        // 3. Publish.
        let published = VipInfo {
            vip_id,
            table_slot: new_slot.unwrap_or(0),
            ring_size: p.table.len() as u32,
            algo: algo as u8,
            flags,
            persist_secs,
        };
        let state = self.vips.get(vip).expect("checked above");
        if published != state.published {
            if let Err(e) = self.put_entry(vip, &vip.key(), &published) {
                if let Some(new) = new_slot.filter(|n| Some(*n) != old_slot) {
                    self.release_table(new)?;
                }
                return Err(e);
            }
        }
        self.sync_quic_ids(vip)?;
        // 4. Backends that left: after the table stopped naming them.
        for (id, i, _) in entries.iter().filter(|e| !e.2) {
            self.write_backend(*id, i)?;
        }
        self.publications += 1;
        let state = self.vips.get_mut(vip).expect("checked above");
        if p.failing_open && !state.failing_open {
            log::error!("VIP {vip}: every backend is down; failing open (balancing over all of them)");
        }
        state.failing_open = p.failing_open;
        if new_slot != state.table_slot || published != state.published {
            state.published_at = Some(std::time::SystemTime::now());
        }
        state.table_slot = new_slot;
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
        let replaced = std::mem::replace(&mut state.table, p.table);
        self.maglev.recycle(replaced);
        let state = self.vips.get_mut(vip).expect("checked above");
        state.layout = p.layout;
        state.facts = Default::default();
        if alias_changed {
            self.sync_fragment_alias(vip)?;
            let answering = self.vips.get(vip).is_some_and(|s| s.opts.answer_ping);
            self.sync_echo(vip, answering)?;
        }
        // 5. The old table: no entry names it any more.
        if let Some(old) = old_slot.filter(|o| Some(*o) != new_slot) {
            self.release_table(old)?;
        }
        Ok(result)
    }

    /// Write a backend entry unless it already holds `info` (as this agent
    /// last wrote it; nothing else writes the backend array).
    pub(super) fn write_backend(&mut self, id: u32, info: &BackendInfo) -> Result<()> {
        if self.written.get(&id) == Some(info) {
            return Ok(());
        }
        self.written.remove(&id);
        self.dp.set_backend(id, info)?;
        self.written.insert(id, *info);
        Ok(())
    }

    /// Free a table no entry names any more.
    pub(super) fn release_table(&mut self, slot: u32) -> Result<()> {
        self.dp.free_table(slot);
        Ok(())
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

    /// Make the VIP's entries of `XLB_QUIC_IDS` (server ID → backend id)
    /// what its backends say (none unless it is a `--quic` VIP): only the
    /// difference from the last publication is written.
    pub(super) fn sync_quic_ids(&mut self, vip: &Vip) -> Result<()> {
        let s = self.vips.get(vip).ok_or_else(|| anyhow!("unknown VIP {vip}"))?;
        let want: BTreeMap<u16, u32> =
            if s.opts.quic { s.backends.values().filter_map(|b| Some((b.server_id?.0, b.id))).collect() } else { BTreeMap::new() };
        if want == s.quic_ids {
            return Ok(());
        }
        let (vip_id, old) = (s.id, s.quic_ids.clone());
        for sid in old.keys().filter(|k| !want.contains_key(k)) {
            self.dp.set_quic_id(vip_id, *sid, None)?;
        }
        for (sid, id) in want.iter().filter(|(k, v)| old.get(k) != Some(v)) {
            self.dp.set_quic_id(vip_id, *sid, Some(*id))?;
        }
        self.vips.get_mut(vip).expect("checked above").quic_ids = want;
        Ok(())
    }

    /// Keep the VIP pre-filter entry of this VIP's address equal to the
    /// number of VIP addresses (any port or protocol) that fold to it.
    pub(super) fn sync_filter(&mut self, changed: &Vip) -> Result<()> {
        if changed.prefix.is_some() {
            return self.dp.set_prefix_count(self.prefix_count());
        }
        let idx = filter_index(changed);
        self.dp.set_vip_filter(idx, self.filter_value(idx))
    }

    /// Number of prefix VIPs (the datapath reads the trie only when > 0).
    pub(super) fn prefix_count(&self) -> u32 {
        self.vips.keys().filter(|v| v.prefix.is_some()).count() as u32
    }

    /// Write one of `vip`'s datapath entries (its own, its fragment alias,
    /// its address's echo entry): the VIP map, or the prefix trie for a
    /// prefix VIP.
    pub(super) fn put_entry(&mut self, vip: &Vip, key: &lb_common::VipKey, info: &VipInfo) -> Result<()> {
        match vip.prefix {
            None => self.dp.set_vip(key, info),
            Some(len) => self.dp.set_prefix_vip(key, len, info),
        }
    }

    /// Remove one of `vip`'s datapath entries.
    pub(super) fn drop_entry(&mut self, vip: &Vip, key: &lb_common::VipKey) -> Result<()> {
        match vip.prefix {
            None => self.dp.del_vip(key),
            Some(len) => self.dp.del_prefix_vip(key, len),
        }
    }

    /// The pre-filter value at `idx`: how many VIPs fold there, and
    /// `VIP_FILTER_ANY_PORT` if one of them is an any-port VIP.
    pub(super) fn filter_value(&self, idx: u32) -> u32 {
        let here = || self.vips.keys().filter(|v| v.prefix.is_none() && filter_index(v) == idx);
        let n = here().count() as u32;
        let any = here().any(|v| v.is_any_port());
        if any {
            n | lb_common::VIP_FILTER_ANY_PORT
        } else {
            n
        }
    }

    /// The address's echo entry (`VipKey::echo`): a copy of the entry of
    /// its first VIP with `--answer-ping`, present while there is one.
    /// `answering`: the changed VIP answers pings or did before the change
    /// (otherwise the entry is not its business and nothing is written).
    pub(super) fn sync_echo(&mut self, changed: &Vip, answering: bool) -> Result<()> {
        if !answering {
            return Ok(());
        }
        let key = changed.key().echo();
        let first = self.vips.iter().find(|(v, s)| v.addr == changed.addr && v.prefix == changed.prefix && s.opts.answer_ping);
        match first {
            Some((_, s)) => {
                let info = s.published;
                self.put_entry(changed, &key, &info)
            }
            None => self.drop_entry(changed, &key).or(Ok(())),
        }
    }

    /// IP fragments carry no ports after the first, so they are matched by
    /// address and protocol: the datapath looks them up under port 0, where
    /// this keeps a copy of the entry of the lowest-port VIP on that address
    /// and protocol (fragments are balanced over its table). The VIP map
    /// has room for one alias per VIP (`maps::vip_map_entries`).
    pub(super) fn sync_fragment_alias(&mut self, changed: &Vip) -> Result<()> {
        let alias_key = changed.key().fragment_alias();
        // Any-port VIPs (port 0) come first: they get the fragments.
        let first = self.vips.iter().find(|(v, _)| v.addr == changed.addr && v.prefix == changed.prefix && v.proto == changed.proto);
        match first {
            Some((v, _)) if v.port < changed.port => Ok(()),
            Some((_, s)) => {
                let info = s.published;
                self.put_entry(changed, &alias_key, &info)
            }
            None => self.drop_entry(changed, &alias_key).or(Ok(())),
        }
    }
}
