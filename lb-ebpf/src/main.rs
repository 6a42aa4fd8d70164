//! xlb's XDP datapath: L4 load balancing by L2 direct server return.
//!
//! For each frame: `parse` extracts the 5-tuple (or a pass verdict), a
//! one-read pre-filter turns away traffic that cannot be for a VIP,
//! `conntrack` and `select` pick the backend (connection table first; the VIP
//! map and its algorithm only for new flows),
//! `forward` rewrites the MACs and returns XDP_TX, and `stats` counts exactly
//! one verdict per frame. Frames that are not VIP traffic leave untouched
//! with XDP_PASS.
#![no_std]
#![no_main]
// Atomic adds on shared map values (BPF has `lock xadd` but no `core` atomics).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod conntrack;
#[cfg(feature = "floors")]
mod floors;
mod forward;
mod maps;
mod parse;
mod select;
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::Stat;
use parse::Kind;

/// Set to 1 by the agent at load time (`--debug-datapath`) to log unusual
/// verdicts through aya-log. Read-only data: the verifier removes the logging
/// code entirely when it is 0.
#[no_mangle]
static XLB_DEBUG: u8 = 0;

/// The load balancer.
#[xdp]
pub fn xlb(ctx: XdpContext) -> u32 {
    let Some(block) = stats::block() else {
        // The stats map always has its one entry; without it, do no harm.
        return xdp_action::XDP_PASS;
    };
    let (action, stat) = process(&ctx, block);
    stats::count(block, stat);
    action
}

/// Returns XDP_PASS for every frame: attached to the peer of a veth so that
/// frames sent there with XDP_TX are delivered (a veth requirement).
#[xdp]
pub fn xlb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[inline(always)]
fn process(ctx: &XdpContext, block: *mut lb_common::StatBlock) -> (u32, Stat) {
    let pkt = match parse::packet(ctx) {
        Ok(p) => p,
        Err(stat) => return (xdp_action::XDP_PASS, stat),
    };
    // One array read turns away almost all traffic that is not for a VIP.
    let idx = lb_common::vip_filter_index(&pkt.key.vip.addr, pkt.key.vip.family);
    if maps::VIP_FILTER.get(idx).copied().unwrap_or(0) == 0 {
        return (xdp_action::XDP_PASS, Stat::PassNotVip);
    }
    let chosen = match pkt.kind {
        Kind::Flow => select::flow(&pkt, block).map(|c| (c.id, c.backend, c.new_flow)),
        Kind::Fragment | Kind::IcmpError => {
            // SAFETY: map values are only read; the agent replaces entries whole.
            let Some(vip) = (unsafe { maps::VIPS.get(&pkt.key.vip) }) else {
                return (xdp_action::XDP_PASS, Stat::PassNotVip);
            };
            if pkt.kind == Kind::Fragment {
                select::fragment(&pkt.key, vip).map(|(id, b)| (id, b, false))
            } else {
                select::icmp(&pkt.key, vip).map(|(id, b)| (id, b, false))
            }
        }
    };
    let (id, backend, new_flow) = match chosen {
        Ok(c) => c,
        Err(Stat::PassNotVip) => return (xdp_action::XDP_PASS, Stat::PassNotVip),
        Err(stat) => {
            debug_verdict(ctx, stat);
            return (xdp_action::XDP_DROP, stat);
        }
    };
    if forward::rewrite(ctx, backend).is_err() {
        return (xdp_action::XDP_ABORTED, Stat::Aborted);
    }
    match pkt.kind {
        Kind::Fragment => stats::count(block, Stat::FragForwarded),
        Kind::IcmpError => stats::count(block, Stat::IcmpSteered),
        Kind::Flow => {}
    }
    let len = (ctx.data_end() - ctx.data()) as u64;
    stats::account(id, len, new_flow);
    (xdp_action::XDP_TX, Stat::Forwarded)
}

#[inline(always)]
fn debug_verdict(ctx: &XdpContext, stat: Stat) {
    // SAFETY: a plain read of a global; volatile so it is not folded at build time.
    if unsafe { core::ptr::read_volatile(&XLB_DEBUG) } != 0 {
        aya_log_ebpf::debug!(ctx, "xlb: dropped a VIP packet, reason {}", stat as u32);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
