//! The tracing variant's recorder (`xlb trace`): compiled only into the
//! `xlb_trace` entry point, never into `xlb`. A frame that matches the
//! agent's filter (`XLB_TRACE_CFG`) and the per-CPU rate limit
//! (`XLB_TRACE_TB`) becomes one `TraceRecord` in the `XLB_TRACE` ring.

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_xdp_load_bytes},
    programs::XdpContext,
};
use lb_common::{
    trace::{action_bit, TraceRecord, TRACE_ANY_BACKEND, TRACE_SNAP},
    FlowKey, Stat,
};

use crate::{
    maps::{TRACE, TRACE_CFG, TRACE_SEEN, TRACE_TB},
    pkt,
    records::Seen,
};


impl Seen {
    /// A frame as it arrived (`None` only if the per-CPU value is missing:
    /// the frame is then not recorded).
    #[inline(always)]
    pub fn start<'a>(ctx: &XdpContext) -> Option<&'a mut Seen> {
        Seen::put(pkt::read::<[u8; 12]>(ctx, 0).unwrap_or([0; 12]), None, TRACE_ANY_BACKEND)
    }

    /// A frame `xlb_encap` handled for `xlb_trace` (recorded as it left:
    /// `emit` with its `Forward`).
    #[inline(always)]
    pub fn routed<'a>(key: &FlowKey, backend_id: u32) -> Option<&'a mut Seen> {
        Seen::put([0; 12], Some(*key), backend_id)
    }

    /// This CPU's notes, overwritten with a new frame's.
    #[inline(always)]
    fn put<'a>(macs: [u8; 12], key: Option<FlowKey>, backend_id: u32) -> Option<&'a mut Seen> {
        let p = TRACE_SEEN.get_ptr_mut(0)?;
        // SAFETY: this CPU's value of a per-CPU array, used by one frame at
        // a time (XDP programs on a CPU do not interleave; `xlb_encap` runs
        // as a tail call of the frame's own program).
        let s = unsafe { &mut *p };
        s.macs = macs;
        s.key = key;
        s.backend_id = backend_id;
        Some(s)
    }
}

/// Whether the filter and the rate limit let this frame be recorded.
#[inline(always)]
fn wanted(seen: &Seen, action: u32, now: u64) -> bool {
    let Some(cfg) = TRACE_CFG.get(0) else { return false };
    if cfg.verdicts & action_bit(action) == 0 {
        return false;
    }
    // By reference: `Option::is_some_and` would copy the key to the stack.
    if cfg.match_vip != 0 && !matches!(&seen.key, Some(k) if cfg.matches_vip(&k.vip)) {
        return false;
    }
    if cfg.backend_id != TRACE_ANY_BACKEND && seen.backend_id != cfg.backend_id {
        return false;
    }
    let Some(tb) = TRACE_TB.get_ptr_mut(0) else { return false };
    // SAFETY: this CPU's value of a per-CPU array; no other writer runs here.
    let tb = unsafe { &mut *tb };
    let credit = tb.credit_ns.saturating_add(now.saturating_sub(tb.last_ns));
    tb.last_ns = now;
    let credit = if credit > cfg.burst_ns { cfg.burst_ns } else { credit };
    if credit < cfg.cost_ns {
        tb.credit_ns = credit;
        tb.missed += 1;
        return false;
    }
    tb.credit_ns = credit - cfg.cost_ns;
    true
}

/// Record the frame if it is wanted: as it arrived, or with `forward` (a
/// routed backend's `Forward`, not 0) as it was sent, outer headers first.
/// Not inlined: its stack frame is not added to the balancer's (BPF's
/// 512-byte limit).
#[inline(never)]
pub fn emit(ctx: &XdpContext, seen: &Seen, action: u32, stat: Stat, forward: u8) {
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if !wanted(seen, action, now) {
        return;
    }
    let Some(mut e) = TRACE.reserve::<TraceRecord>(0) else {
        if let Some(tb) = TRACE_TB.get_ptr_mut(0) {
            // SAFETY: as in `wanted`.
            unsafe { (*tb).missed += 1 };
        }
        return;
    };
    let len = pkt::len(ctx) as u32;
    let r = e.as_mut_ptr();
    // SAFETY: `r` is the reserved record (uninitialised memory of the
    // right size); every field is written before it is submitted.
    unsafe {
        (*r).time_ns = now;
        match &seen.key {
            Some(k) => {
                (*r).key = *k;
                (*r).has_key = 1;
            }
            None => (*r).has_key = 0,
        }
        (*r).backend_id = seen.backend_id;
        (*r).action = action;
        (*r).stat = stat as u32;
        (*r).frame_len = len;
        (*r).ifindex = (*ctx.ctx).ingress_ifindex;
        (*r).forward = forward;
        (*r)._pad = [0; 3];
        let m = if len > TRACE_SNAP as u32 { TRACE_SNAP as u32 } else { len };
        // 1..=TRACE_SNAP in a form the verifier can bound (the helper
        // refuses a length that may be 0); equal to `m` for every real frame.
        let n = (core::hint::black_box(m).wrapping_sub(1) & (TRACE_SNAP as u32 - 1)) + 1;
        let mut cap = 0;
        if bpf_xdp_load_bytes(ctx.ctx, 0, (*r).data.as_mut_ptr().cast(), n) == 0 {
            cap = n;
            if forward == 0 {
                let data = &mut (*r).data;
                data[..12].copy_from_slice(&seen.macs);
            }
        }
        (*r).cap_len = cap;
    }
    e.submit(0);
}
