//! xlb's XDP datapath: L4 load balancing by L2 direct server return.
//!
//! For each frame: `parse` extracts the 5-tuple (or a pass verdict; `pkt`
//! holds the bounds-checked frame access), a one-read pre-filter turns away
//! traffic that cannot be for a VIP, `steer` picks the backend (through the
//! connection table in `conntrack`; the VIP map and an algorithm from
//! `select` only for new flows, fragments and ICMP errors), `forward`
//! rewrites the MACs and returns XDP_TX, and `stats` counts exactly one
//! verdict per frame. Frames that are not VIP traffic leave untouched with
//! XDP_PASS.
#![no_std]
#![no_main]
// Atomic adds on shared map values (BPF has `lock xadd` but no `core` atomics).
#![feature(core_intrinsics)]
// BPF inline assembly (`pkt::words`: loads LLVM would split into bytes).
#![feature(asm_experimental_arch)]
#![allow(internal_features)]

mod conntrack;
mod decap;
mod echo;
mod encap;
#[cfg(feature = "floors")]
mod floors;
mod forward;
mod maps;
mod parse;
mod pkt;
mod quic;
mod records;
mod select;
mod stats;
mod steer;
mod toobig;
mod trace;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{Stat, StatBlock};
use parse::Kind;
use steer::Choice;

/// Set to 1 by the agent at load time (`--debug-datapath`) to log unusual
/// verdicts through aya-log. Read-only data: the verifier removes the logging
/// code entirely when it is 0.
#[no_mangle]
static XLB_DEBUG: u8 = 0;

/// The load balancer.
// `#[xdp]` wraps this function in the program's entry point; inlined, or
// LLVM may keep it a BPF-to-BPF call once the body grows (a call and a
// return per frame: ~20 ns on this kernel's return-thunk mitigations).
#[xdp]
#[inline(always)]
pub fn xlb(ctx: XdpContext) -> u32 {
    balance::<false>(&ctx)
}

/// The load balancer with tracing compiled in (`xlb trace` swaps it into
/// the agent's link while a trace runs; the maps are the same).
#[xdp]
#[inline(always)]
pub fn xlb_trace(ctx: XdpContext) -> u32 {
    balance::<true>(&ctx)
}

/// One frame: process it, count its verdict, and (`TRACE` only) record it.
/// `TRACE` is a constant of each entry point: `xlb` has no tracing code.
#[inline(always)]
fn balance<const TRACE: bool>(ctx: &XdpContext) -> u32 {
    let Some(stats) = stats::block() else {
        // The stats map always has its one entry; without it, do no harm.
        return xdp_action::XDP_PASS;
    };
    let mut seen = if TRACE { records::Seen::start(ctx) } else { None };
    let (action, stat) = process(ctx, stats, &mut seen);
    stats::count(stats, stat);
    if let (true, Some(seen)) = (TRACE, &seen) {
        trace::emit(ctx, seen, action, stat, 0);
    }
    action
}

/// `xlb decap` on a backend: strips xlb's encapsulation from packets for
/// the host's VIPs (see `decap`); everything else passes untouched.
#[xdp]
pub fn xlb_decap(ctx: XdpContext) -> u32 {
    let (action, stat) = decap::run(&ctx);
    if let Some(stats) = stats::block() {
        stats::count(stats, stat);
    }
    action
}

/// The datapath's clock (`conntrack::now_ns`, little-endian) written over
/// the first 8 bytes of the frame: the agent runs it through
/// BPF_PROG_TEST_RUN to relate that clock to `CLOCK_MONOTONIC`. Never
/// attached.
#[xdp]
pub fn xlb_clock(ctx: XdpContext) -> u32 {
    match pkt::bytes_mut::<8>(&ctx, 0) {
        Some(b) => {
            *b = conntrack::now_ns().to_le_bytes();
            xdp_action::XDP_PASS
        }
        None => xdp_action::XDP_ABORTED,
    }
}

/// Returns XDP_PASS for every frame: attached to the peer of a veth so that
/// frames sent there with XDP_TX are delivered (a veth requirement).
#[xdp]
pub fn xlb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[inline(always)]
fn process(ctx: &XdpContext, stats: &mut StatBlock, seen: &mut Option<&mut records::Seen>) -> (u32, Stat) {
    let pkt = match parse::packet(ctx) {
        Ok(p) => p,
        Err(stat) => return (xdp_action::XDP_PASS, stat),
    };
    if let Some(s) = seen {
        s.key = Some(pkt.key);
    }
    // One array read turns away almost all traffic that is not for a VIP.
    let idx = lb_common::vip_filter_index(&pkt.key.vip.addr, pkt.key.vip.family);
    // Prefix VIPs (only when there are any) pass the gate by a trie lookup.
    let filter = maps::VIP_FILTER.get(idx).copied().unwrap_or(0);
    let Some(gate) = steer::Gate::open(&pkt.key, filter) else {
        return (xdp_action::XDP_PASS, pkt.not_vip());
    };
    // Only after the pre-filter: non-VIP traffic pays nothing for it.
    if !addressed_to_us(ctx) {
        return (xdp_action::XDP_PASS, Stat::PassOtherMac);
    }
    if let Kind::Echo { l3 } = pkt.kind {
        return answer_ping(ctx, &pkt, l3, gate);
    }
    let Choice { id, backend, new_flow } = match steer::choose(ctx, &pkt, gate, stats) {
        Ok(c) => c,
        Err(Stat::PassNotVip) => return (xdp_action::XDP_PASS, Stat::PassNotVip),
        Err(stat) => {
            debug_verdict(ctx, stat);
            return (xdp_action::XDP_DROP, stat);
        }
    };
    if let Some(s) = seen {
        s.backend_id = id;
    }
    if backend.is_routed() {
        // Returns only when the tail call fails (no `xlb_encap` set).
        return hand_off(ctx, &pkt, id, new_flow, seen.is_some());
    }
    if forward::rewrite(ctx, backend).is_err() {
        return (xdp_action::XDP_ABORTED, Stat::Aborted);
    }
    forwarded(stats, pkt.kind, id, pkt::len(ctx), new_flow);
    (xdp_action::XDP_TX, Stat::Forwarded)
}

/// Events and per-backend traffic of a forwarded frame.
#[inline(always)]
fn forwarded(stats: &mut StatBlock, kind: Kind, id: u32, bytes: u64, new_flow: bool) {
    match kind {
        Kind::Fragment => stats::count(stats, Stat::FragForwarded),
        Kind::IcmpError => stats::count(stats, Stat::IcmpSteered),
        Kind::Flow | Kind::Echo { .. } => {}
    }
    stats::account(id, bytes, new_flow);
}

/// A frame for a routed backend: the choice goes to `xlb_encap` through
/// `XLB_HANDOFF` and a tail call (the encapsulation needs stack the
/// balancer's frame does not leave). `xlb_encap` counts the verdict, and
/// records the frame when `traced` (from `xlb_trace`: a tail call does not
/// come back to the caller's recorder).
#[inline(always)]
fn hand_off(ctx: &XdpContext, pkt: &parse::Packet, id: u32, new_flow: bool, traced: bool) -> (u32, Stat) {
    let Some(h) = maps::HANDOFF.get_ptr_mut(0) else {
        return (xdp_action::XDP_DROP, Stat::DropNoRoute);
    };
    let kind = match pkt.kind {
        // Echo requests are answered before a backend is chosen.
        Kind::Flow | Kind::Echo { .. } => 0,
        Kind::Fragment => 1,
        Kind::IcmpError => 2,
    };
    // SAFETY: this CPU's value of a per-CPU array, used only by this
    // program and the one it tail-calls, which run one after the other.
    unsafe {
        (*h).key = pkt.key;
        (*h).id = id;
        (*h).bytes = pkt::len(ctx) as u32;
        (*h).new_flow = new_flow as u8;
        (*h).kind = kind;
        (*h).trace = traced as u8;
        maps::PROGS.tail_call(ctx, lb_common::TAIL_ENCAP);
    }
    (xdp_action::XDP_DROP, Stat::DropNoRoute)
}

/// The routed path (tail-called by `xlb`/`xlb_trace`, never attached):
/// encapsulate the frame for the backend in `XLB_HANDOFF` and count its
/// verdict; a frame `xlb_trace` handed off is recorded here, as sent.
#[xdp]
pub fn xlb_encap(ctx: XdpContext) -> u32 {
    let Some(stats) = stats::block() else {
        return xdp_action::XDP_DROP;
    };
    let mut seen = None;
    let (action, stat) = encap_handed(&ctx, stats, &mut seen);
    stats::count(stats, stat);
    if let Some((seen, forward)) = &seen {
        trace::emit(&ctx, seen, action, stat, *forward);
    }
    action
}

#[inline(always)]
fn encap_handed<'a>(ctx: &XdpContext, stats: &mut StatBlock, seen: &mut Option<(&'a mut records::Seen, u8)>) -> (u32, Stat) {
    let Some(h) = maps::HANDOFF.get(0) else {
        return (xdp_action::XDP_DROP, Stat::DropNoRoute);
    };
    let Some(backend) = maps::BACKENDS.get(h.id) else {
        return (xdp_action::XDP_DROP, Stat::DropBadBackend);
    };
    if h.trace != 0 {
        *seen = records::Seen::routed(&h.key, h.id).map(|s| (s, backend.forward));
    }
    let (action, stat) = encap::forward(ctx, &h.key, backend);
    if matches!(stat, Stat::Forwarded | Stat::Redirected) {
        let kind = match h.kind {
            1 => Kind::Fragment,
            2 => Kind::IcmpError,
            _ => Kind::Flow,
        };
        forwarded(stats, kind, h.id, h.bytes as u64, h.new_flow != 0);
    }
    (action, stat)
}

/// An echo request to a VIP address: answered when the address has an
/// echo entry (some VIP of it has `--answer-ping`), else the kernel's as
/// before (`PassOtherL4`).
#[inline(always)]
fn answer_ping(ctx: &XdpContext, pkt: &parse::Packet, l3: usize, gate: steer::Gate) -> (u32, Stat) {
    if !steer::answers_ping(&pkt.key.vip, gate) {
        return (xdp_action::XDP_PASS, Stat::PassOtherL4);
    }
    match echo::reply(ctx, l3, pkt.key.is_v6()) {
        Ok(()) => (xdp_action::XDP_TX, Stat::EchoReplied),
        Err(()) => (xdp_action::XDP_ABORTED, Stat::Aborted),
    }
}

/// The frame's destination MAC is one of `XLB_MACS` (the interface's own
/// comes first: one read in the common case). An empty list accepts any
/// MAC: only measurement harnesses run so (BPF_PROG_TEST_RUN with repeat
/// runs the program again on the frame it rewrote, addressed to the
/// backend by then); the agent always lists its interface's MAC.
#[inline(always)]
fn addressed_to_us(ctx: &XdpContext) -> bool {
    // The destination MAC and two bytes of the source MAC, two word loads
    // (`mac_key` of the first six bytes, as the agent writes `XLB_MACS`).
    let Ok([lo, hi]) = pkt::words::<2>(ctx, 0) else { return false };
    let want = lb_common::mac_key_of_words(lo, hi);
    for i in 0..lb_common::MAX_ACCEPT_MACS {
        match maps::MACS.get(i).copied() {
            Some(m) if m == want => return true,
            Some(0) => return i == 0,
            None => return false,
            _ => {}
        }
    }
    false
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
