//! Counting: one verdict per frame in the global block, and per-backend
//! traffic for forwarded frames (a VIP's traffic is the sum over its
//! backends; the agent keeps what removed backends had carried).

use crate::maps::{BACKEND_STATS, STATS};
use lb_common::{Stat, StatBlock};

/// This CPU's global counter block.
#[inline(always)]
pub fn block() -> Option<*mut StatBlock> {
    STATS.get_ptr_mut(0)
}

/// Add one to a global counter.
#[inline(always)]
pub fn count(block: *mut StatBlock, stat: Stat) {
    // SAFETY: per-CPU value, this program is its only writer on this CPU;
    // `stat` indexes within STAT_COUNT by construction.
    unsafe {
        if let Some(c) = (*block).c.get_mut(stat as usize) {
            *c += 1;
        }
    }
}

/// Account a forwarded frame to its backend.
#[inline(always)]
pub fn account(backend_id: u32, bytes: u64, new_flow: bool) {
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).new_flows += new_flow as u64;
        }
    }
}
