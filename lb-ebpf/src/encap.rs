//! Routed backends: the client's IP packet inside an outer IPv4 or IPv6
//! header (the backend's family decides), optionally with a UDP header in
//! between (GUE variant 1), sent to the next hop the kernel's FIB names.
//!
//! - Outer source: `EncapConfig`'s prefix with host bits from the flow hash
//!   (and for GUE a per-flow UDP source port; for IPv6 the flow label), so
//!   routers' ECMP spreads flows while each flow keeps one path.
//! - DSCP/ECN copied from the inner header; outer TTL/hop limit a fresh
//!   `ENCAP_TTL` (RFC 2003 §3.1: the inner TTL is not touched); IPv4 outer
//!   headers carry DF (XDP cannot fragment) and a correct checksum; the GUE
//!   UDP checksum is 0 (RFC 6935 for IPv6 tunnels).
//! - Next hop: `bpf_fib_lookup` from the ingress interface's view (needs
//!   forwarding enabled there). No answer (no route, next hop's neighbour
//!   entry not resolved yet, forwarding off): `DropNoRoute` — passing the
//!   client's packet to the kernel instead would route it towards the VIP.
//!   Same interface: XDP_TX; another one: XDP_REDIRECT (`Redirected`).
//! - Too big for the path MTU once encapsulated: `toobig` answers the
//!   client with the MTU that fits.
//! - Untagged frames only: a VLAN-tagged frame for a routed backend is
//!   `DropNoRoute` (the FIB answers for the parent interface, not the VLAN).
//!
//! Stack: the balancer's frame is close to the 512-byte BPF limit (and a
//! BPF-to-BPF call's frame adds to it), so this path is a program of its
//! own, `xlb_encap`, that the balancer tail-calls with its choice in
//! `XLB_HANDOFF`; it counts the frame's verdict itself.

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibLookup, xdp_action},
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_xdp_adjust_head},
    programs::XdpContext,
    EbpfContext,
};
use lb_common::{
    gue_source_port, hash::flow_hash, BackendInfo, FlowKey, Forward, Stat, ENCAP_F_SRC4, ENCAP_F_SRC6, ENCAP_TTL,
    FAMILY_V6, PROTO_UDP,
};

use crate::{
    maps::{ENCAP, SCRATCH},
    pkt::{self, ETH_LEN, ETH_P_IP, ETH_P_IPV6, IPV4_LEN, IPV6_LEN, PROTO_IPIP, PROTO_IPV6, UDP_LEN},
    records::FibParams,
    toobig,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const FIB_SUCCESS: i64 = 0;
const FIB_FRAG_NEEDED: i64 = 8;

/// `xlb_encap`'s work: encapsulate the handed-off frame and send it;
/// returns the action and its verdict.
#[inline(always)]
pub fn forward(ctx: &XdpContext, key: &FlowKey, be: &BackendInfo) -> (u32, Stat) {
    match encapsulate(ctx, key, be) {
        Ok(r) => r,
        Err(stat) => (xdp_action::XDP_DROP, stat),
    }
}

#[inline(always)]
fn encapsulate(ctx: &XdpContext, key: &FlowKey, be: &BackendInfo) -> Result<(u32, Stat), Stat> {
    let cfg = ENCAP.get(0).ok_or(Stat::DropNoRoute)?;
    let fib_ptr = SCRATCH.get_ptr_mut(0).ok_or(Stat::DropNoRoute)?;
    // SAFETY: this CPU's value of a per-CPU array; an XDP program runs to
    // completion on its CPU, so nothing else uses it meanwhile.
    let fib = unsafe { &mut *fib_ptr };

    // The client's packet: family, DSCP/ECN, length (the IP header's, not
    // the frame's, which may carry Ethernet padding).
    let h: [u8; 10] = pkt::read(ctx, 12).map_err(|_| Stat::DropNoRoute)?;
    let frame = pkt::len(ctx) as usize - ETH_LEN;
    let inner6 = match [h[0], h[1]] {
        ETH_P_IP => false,
        ETH_P_IPV6 => true,
        _ => return Err(Stat::DropNoRoute),
    };
    let (inner_proto, tos, claimed) = if inner6 {
        (PROTO_IPV6, (h[2] << 4) | (h[3] >> 4), IPV6_LEN + u16::from_be_bytes([h[6], h[7]]) as usize)
    } else {
        (PROTO_IPIP, h[3], u16::from_be_bytes([h[4], h[5]]) as usize)
    };
    let inner_len = if claimed < frame { claimed } else { frame };

    let outer6 = be.family == FAMILY_V6;
    let gue = be.forward == Forward::Gue as u8;
    let ip_len = if outer6 { IPV6_LEN } else { IPV4_LEN };
    let udp_len = if gue { UDP_LEN } else { 0 };
    let hash = flow_hash(key);
    let next = if gue { PROTO_UDP } else { inner_proto };
    let sport = gue_source_port(hash);

    fib.family = if outer6 { AF_INET6 } else { AF_INET };
    fib.l4_protocol = next;
    fib.sport = if gue { sport.to_be() } else { 0 };
    fib.dport = if gue { cfg.gue_port_be } else { 0 };
    fib.tot_len = (inner_len + ip_len + udp_len) as u16;
    fib.ifindex = ctx.ingress_ifindex() as u32;
    fib.tos = 0;
    fib.vlan = 0;
    fib.dst = be.addr;
    if outer6 {
        if cfg.flags & ENCAP_F_SRC6 == 0 {
            return Err(Stat::DropNoRoute);
        }
        fib.src = cfg.source6(hash);
    } else {
        if cfg.flags & ENCAP_F_SRC4 == 0 {
            return Err(Stat::DropNoRoute);
        }
        fib.src = lb_common::addr_v4(cfg.source4(hash));
    }
    // SAFETY: `fib` points to a writable 64-byte map value with the layout
    // of `struct bpf_fib_lookup`; `ctx` is this program's context.
    let rc = unsafe { bpf_fib_lookup(ctx.as_ptr(), fib_ptr as *mut FibLookup, core::mem::size_of::<FibParams>() as i32, 0) };
    if rc == FIB_FRAG_NEEDED {
        let mtu = (fib.tot_len as usize).saturating_sub(ip_len + udp_len);
        return toobig::answer(ctx, inner6, mtu as u32).ok_or(Stat::DropNoRoute);
    }
    if rc != FIB_SUCCESS {
        return Err(Stat::DropNoRoute);
    }

    // SAFETY: the helper only moves the frame's start within its headroom
    // (it fails otherwise); every access after it is bounds-checked again.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -((ip_len + udp_len) as i32)) } != 0 {
        return Ok((xdp_action::XDP_ABORTED, Stat::Aborted));
    }
    let e: &mut [u8; ETH_LEN] = pkt::bytes_mut(ctx, 0).ok_or(Stat::Aborted)?;
    e[..6].copy_from_slice(&fib.dmac);
    e[6..12].copy_from_slice(&fib.smac);
    let l3_len = ip_len + udp_len + inner_len;
    if outer6 {
        e[12..].copy_from_slice(&ETH_P_IPV6);
        let ip: &mut [u8; IPV6_LEN] = pkt::bytes_mut(ctx, ETH_LEN).ok_or(Stat::Aborted)?;
        // Flow label from the flow hash (RFC 6438): ECMP on IPv6 uses it.
        let vcf = (6u32 << 28) | ((tos as u32) << 20) | (hash & 0x000f_ffff);
        ip[..4].copy_from_slice(&vcf.to_be_bytes());
        ip[4..6].copy_from_slice(&((l3_len - IPV6_LEN) as u16).to_be_bytes());
        ip[6] = next;
        ip[7] = ttl(cfg.ttl);
        ip[8..24].copy_from_slice(&fib.src);
        ip[24..40].copy_from_slice(&be.addr);
    } else {
        e[12..].copy_from_slice(&ETH_P_IP);
        let ip: &mut [u8; IPV4_LEN] = pkt::bytes_mut(ctx, ETH_LEN).ok_or(Stat::Aborted)?;
        ip[0] = 0x45;
        ip[1] = tos;
        ip[2..4].copy_from_slice(&(l3_len as u16).to_be_bytes());
        // Id 0, DF: the outer packet is never fragmented on the way.
        ip[4..8].copy_from_slice(&[0, 0, 0x40, 0]);
        ip[8] = ttl(cfg.ttl);
        ip[9] = next;
        ip[10] = 0;
        ip[11] = 0;
        ip[12..16].copy_from_slice(&fib.src[..4]);
        ip[16..20].copy_from_slice(&be.addr[..4]);
        let c = toobig::fold(toobig::sum(ip, 0)).to_be_bytes();
        ip[10] = c[0];
        ip[11] = c[1];
    }
    if gue {
        let u: &mut [u8; UDP_LEN] = pkt::bytes_mut(ctx, ETH_LEN + ip_len).ok_or(Stat::Aborted)?;
        u[..2].copy_from_slice(&sport.to_be_bytes());
        u[2..4].copy_from_slice(&cfg.gue_port_be.to_ne_bytes());
        u[4..6].copy_from_slice(&((UDP_LEN + inner_len) as u16).to_be_bytes());
        u[6] = 0;
        u[7] = 0;
    }
    if fib.ifindex == ctx.ingress_ifindex() as u32 {
        Ok((xdp_action::XDP_TX, Stat::Forwarded))
    } else {
        // SAFETY: a helper call with plain integer arguments.
        let action = unsafe { bpf_redirect(fib.ifindex, 0) } as u32;
        Ok((action, Stat::Redirected))
    }
}

#[inline(always)]
fn ttl(configured: u8) -> u8 {
    if configured == 0 {
        ENCAP_TTL
    } else {
        configured
    }
}
