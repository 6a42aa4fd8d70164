//! Counting: one verdict per frame in the global block, and per-backend
//! traffic for forwarded frames (a VIP's traffic is the sum over its
//! backends; the agent keeps what removed backends had carried).

use crate::maps::{BACKEND_STATS, STATS};
use lb_common::{Stat, StatBlock};

/// This CPU's global counter block.
#[inline(always)]
pub fn block() -> Option<&'static mut StatBlock> {
    let p = STATS.get_ptr_mut(0)?;
    // SAFETY: this CPU's value of a per-CPU array. An XDP program runs to
    // completion on its CPU without being re-entered, so this is the only
    // reference to the value while it runs.
    Some(unsafe { &mut *p })
}

/// Add one to a global counter.
#[inline(always)]
pub fn count(block: &mut StatBlock, stat: Stat) {
    if let Some(c) = block.c.get_mut(stat as usize) {
        *c += 1;
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
