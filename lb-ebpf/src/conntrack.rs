//! The connection tables: keep an established flow on its backend when the
//! VIP's backend set (and so its table) changes. IPv4 flows are looked up by
//! a 16-byte key in their own table, IPv6 flows by the full `FlowKey`.

use crate::maps::{CONNTRACK4, CONNTRACK6};
use lb_common::{FlowKey, FlowValue, FAMILY_V4};

/// The entry of a flow, if any.
#[inline(always)]
pub fn lookup(flow: &FlowKey) -> Option<FlowValue> {
    // SAFETY: the value is copied out at once; entries are replaced whole.
    unsafe {
        if flow.vip.family == FAMILY_V4 {
            CONNTRACK4.get(&flow.v4()).copied()
        } else {
            CONNTRACK6.get(flow).copied()
        }
    }
}

/// Pin a flow to a backend; false when the table refused the entry.
#[inline(always)]
pub fn insert(flow: &FlowKey, value: &FlowValue) -> bool {
    if flow.vip.family == FAMILY_V4 {
        CONNTRACK4.insert(&flow.v4(), value, 0).is_ok()
    } else {
        CONNTRACK6.insert(flow, value, 0).is_ok()
    }
}
