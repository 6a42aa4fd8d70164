//! The connection table: keeps an established flow on its backend when the
//! VIP's backend set (and so its Maglev table) changes.

use crate::maps::CONNTRACK;
use lb_common::{FlowKey, FlowValue};

/// The entry of a flow, if any.
#[inline(always)]
pub fn lookup(flow: &FlowKey) -> Option<FlowValue> {
    // SAFETY: the value is copied out at once; entries are replaced whole.
    unsafe { CONNTRACK.get(flow).copied() }
}

/// Pin a flow to a backend; false when the table refused the entry.
#[inline(always)]
pub fn insert(flow: &FlowKey, value: &FlowValue) -> bool {
    CONNTRACK.insert(flow, value, 0).is_ok()
}
