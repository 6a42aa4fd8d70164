//! What a table change does, computed without touching the datapath: the
//! table, the backends it names, the entries that move. `set --dry-run`
//! shows a plan; publishing writes one.

use anyhow::Result;
use std::time::Instant;

use super::model::{Backend, VipState};
use crate::{config::{Admin, AllDown}, tables};

/// What a VIP's datapath state should be, computed without touching it.
pub(crate) struct Plan {
    /// Ids whose entries are alive.
    pub(crate) alive: Vec<u32>,
    /// Effective weights of the backends in the table.
    pub(crate) weights: std::collections::HashMap<u32, u32>,
    /// Slow-start steps used.
    pub(crate) steps: std::collections::HashMap<u32, u32>,
    /// The table or sequence.
    pub(crate) table: Vec<u32>,
    /// The shared Maglev layout the table comes from (status reads its
    /// facts once per layout).
    pub(crate) layout: Option<tables::LayoutUse>,
    /// Entries that differ from the published table (counted only when
    /// asked: a request reports it; a health change does not need it).
    pub(crate) moved: Option<usize>,
    /// The table is the published one.
    pub(crate) unchanged: bool,
    /// Every backend is down and the VIP fails open.
    pub(crate) failing_open: bool,
}

/// Compute a VIP's plan at `now` (slow start included).
pub(crate) fn plan(state: &VipState, ring_size: u32, now: Instant, cache: &mut tables::MaglevCache, count_moved: bool) -> Result<Plan> {
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
    let (table, layout) = tables::build_cached(state.algo, &members, ring_size, cache)?;
    let unchanged = state.table == table;
    let moved = count_moved.then(|| match (unchanged, state.table.len() == table.len()) {
        (true, _) => 0,
        (false, true) => state.table.iter().zip(&table).filter(|(a, b)| a != b).count(),
        (false, false) => table.len().max(state.table.len()),
    });
    let alive = state.backends.values().filter(|b| alive_now(b)).map(|b| b.id).collect();
    Ok(Plan { alive, weights, steps, table, layout, moved, unchanged, failing_open })
}
