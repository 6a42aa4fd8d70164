//! `xlb trace`: sampled frame records from the tracing variant of the XDP
//! program (`PROG_TRACE`, the same code with tracing compiled in), through a
//! BPF ring buffer. The agent swaps its link to that program only while a
//! trace runs, so the balancer itself carries no tracing code at all.

use crate::{FlowKey, VipKey};

/// Bytes of each traced frame kept (from its start, as it arrived).
pub const TRACE_SNAP: usize = 128;
/// Bytes of the trace ring buffer (a power-of-two number of pages).
pub const TRACE_RING_BYTES: u32 = 1 << 20;
/// `TraceConfig::backend_id` that matches every frame.
pub const TRACE_ANY_BACKEND: u32 = u32::MAX;

/// The bit of an XDP action (0 aborted, 1 drop, 2 pass, 3 tx) in `verdicts`.
#[inline(always)]
pub const fn action_bit(action: u32) -> u8 {
    if action < 8 {
        1 << action
    } else {
        0
    }
}

/// What to trace (`XLB_TRACE_CFG`, one entry, written by the agent before
/// it swaps the tracing program in).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TraceConfig {
    /// Only frames for this VIP, when `match_vip` is 1: its protocol and
    /// family, its port unless `vip.is_any_port()`, and the first
    /// `vip_bits` bits of its address (`matches_vip`).
    pub vip: VipKey,
    /// 1: filter on `vip`.
    pub match_vip: u8,
    /// Actions traced (`action_bit`s); 0 traces nothing.
    pub verdicts: u8,
    /// Explicit padding.
    pub _pad: u16,
    /// Only frames forwarded to this backend id (`TRACE_ANY_BACKEND`: all).
    pub backend_id: u32,
    /// Address bits of `vip` compared (a prefix VIP's length); 0: all.
    pub vip_bits: u32,
    /// Rate limit: nanoseconds of credit one record costs (1e9 / rate per
    /// second per CPU).
    pub cost_ns: u64,
    /// Burst: most credit a CPU accumulates, in nanoseconds.
    pub burst_ns: u64,
}

/// Per-CPU token bucket of the tracing program (`XLB_TRACE_TB`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TraceBucket {
    /// Credit in nanoseconds.
    pub credit_ns: u64,
    /// Last refill.
    pub last_ns: u64,
    /// Matching frames not recorded (rate limit or full ring).
    pub missed: u64,
}

/// One traced frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceRecord {
    /// `bpf_ktime_get_ns` when the program finished with it.
    pub time_ns: u64,
    /// Its 5-tuple (valid when `has_key` is 1).
    pub key: FlowKey,
    /// Backend id it was sent to (`TRACE_ANY_BACKEND`: none).
    pub backend_id: u32,
    /// XDP action.
    pub action: u32,
    /// Verdict counter (`Stat`) it incremented.
    pub stat: u32,
    /// Frame length.
    pub frame_len: u32,
    /// Bytes of `data` filled.
    pub cap_len: u32,
    /// 1 when the frame parsed to a 5-tuple.
    pub has_key: u32,
    /// Interface it arrived on.
    pub ifindex: u32,
    /// `Forward` of a routed backend's frame (then `data` is the frame as
    /// sent, outer headers first); 0 otherwise.
    pub forward: u8,
    /// Explicit padding.
    pub _pad: [u8; 3],
    /// The frame's first bytes as it arrived (MACs before rewriting), or
    /// as sent when `forward` is not 0.
    pub data: [u8; TRACE_SNAP],
}

impl TraceConfig {
    /// Whether a frame's destination `k` is one the VIP filter covers:
    /// the VIP's protocol and family, its port (any for an any-port VIP),
    /// its address or, for a prefix VIP, an address inside its network.
    #[inline(always)]
    pub fn matches_vip(&self, k: &VipKey) -> bool {
        if k.proto != self.vip.proto || k.family != self.vip.plain_family() {
            return false;
        }
        if !self.vip.is_any_port() && k.port_be != self.vip.port_be {
            return false;
        }
        let bits = if self.vip_bits == 0 || self.vip_bits > 128 { 128 } else { self.vip_bits };
        let mut i = 0;
        while i < 16 {
            let keep = bits.saturating_sub(i as u32 * 8);
            let mask = if keep >= 8 { 0xff } else if keep == 0 { 0 } else { 0xffu8 << (8 - keep) };
            if k.addr[i] & mask != self.vip.addr[i] {
                return false;
            }
            i += 1;
        }
        true
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), Copy, explicit padding, no invalid bit patterns.
    unsafe impl aya::Pod for super::TraceConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TraceBucket {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<TraceConfig>(), 48);
        assert_eq!(size_of::<TraceBucket>(), 24);
        assert_eq!(size_of::<TraceRecord>(), 8 + 40 + 32 + TRACE_SNAP);
        assert_eq!(action_bit(3), 8);
    }

    #[test]
    fn the_vip_filter_covers_a_prefix_and_any_port() {
        let key = |a: [u8; 4], port: u16| VipKey { addr: crate::addr_v4(a), port_be: port.to_be(), proto: 6, family: crate::FAMILY_V4 };
        let exact = TraceConfig { vip: key([10, 0, 0, 1], 80), match_vip: 1, ..Default::default() };
        assert!(exact.matches_vip(&key([10, 0, 0, 1], 80)));
        assert!(!exact.matches_vip(&key([10, 0, 0, 1], 81)));
        assert!(!exact.matches_vip(&key([10, 0, 0, 2], 80)));
        let mut udp = key([10, 0, 0, 1], 80);
        udp.proto = 17;
        assert!(!exact.matches_vip(&udp));
        let net = TraceConfig { vip: key([10, 1, 2, 0], 0).any_port(), vip_bits: 23, ..exact };
        assert!(net.matches_vip(&key([10, 1, 3, 255], 22)));
        assert!(net.matches_vip(&key([10, 1, 2, 0], 443)));
        assert!(!net.matches_vip(&key([10, 1, 4, 0], 443)));
        let port = TraceConfig { vip: key([10, 1, 2, 0], 443), vip_bits: 24, ..exact };
        assert!(port.matches_vip(&key([10, 1, 2, 9], 443)) && !port.matches_vip(&key([10, 1, 2, 9], 80)));
    }
}
