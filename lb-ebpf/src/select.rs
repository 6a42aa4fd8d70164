//! Backend selection: the connection table first, then the VIP's algorithm.

use crate::{conntrack, maps::{BACKENDS, RINGS}, stats};
use lb_common::{
    hash::flow_hash, BackendInfo, FlowKey, FlowValue, Stat, StatBlock, VipInfo, BACKEND_F_ALIVE,
};

/// The chosen backend of a packet.
pub struct Choice<'a> {
    /// Backend id (index into `XLB_BACKENDS`).
    pub id: u32,
    /// Its forwarding entry.
    pub backend: &'a BackendInfo,
    /// True when the flow was not in the connection table.
    pub new_flow: bool,
}

/// Choose the backend of a VIP packet, or the drop reason.
#[inline(always)]
pub fn backend<'a>(
    flow: &FlowKey,
    vip: &VipInfo,
    block: *mut StatBlock,
) -> Result<Choice<'a>, Stat> {
    if let Some(entry) = conntrack::lookup(flow) {
        if let Some(be) = BACKENDS.get(entry.backend_id) {
            if be.gen == entry.gen && be.flags & BACKEND_F_ALIVE != 0 && be.vip_id == vip.vip_id {
                stats::count(block, Stat::CtHit);
                return Ok(Choice { id: entry.backend_id, backend: be, new_flow: false });
            }
        }
        // The backend died or its id was reused: schedule the flow again.
        stats::count(block, Stat::CtStale);
    } else {
        stats::count(block, Stat::CtMiss);
    }
    if vip.ring_size == 0 {
        return Err(Stat::DropNoBackend);
    }
    let slot = vip.ring_off + flow_hash(flow) % vip.ring_size;
    let id = *RINGS.get(slot).ok_or(Stat::DropBadBackend)?;
    let be = BACKENDS.get(id).ok_or(Stat::DropBadBackend)?;
    if be.flags & BACKEND_F_ALIVE == 0 {
        return Err(Stat::DropBadBackend);
    }
    if !conntrack::insert(flow, &FlowValue { backend_id: id, gen: be.gen }) {
        stats::count(block, Stat::CtInsertFail);
    }
    Ok(Choice { id, backend: be, new_flow: true })
}
