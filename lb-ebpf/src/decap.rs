//! `xlb decap` (on backends): strip xlb's encapsulation from packets for
//! the host's VIPs and hand the inner packet to the stack, for hosts without
//! ipip/ip6tnl/fou devices.
//!
//! Accepted: an untagged frame whose outer IPv4 (no options, not a
//! fragment) or IPv6 (no extension headers) header carries IPv4 or IPv6
//! (protocol 4 / 41), or UDP to the GUE port with an IP packet directly
//! after it (GUE variant 1), whose inner destination is in
//! `XLB_DECAP_VIPS`. The outer headers are removed, the Ethernet header is
//! rebuilt in front of the inner packet (the frame's MACs, the inner
//! family's EtherType) and the frame is passed (verdict `Decapsulated`).
//! Anything else passes untouched (`DecapNotTunnel`, `DecapNotLocal`).
//! The inner packet is not checked here: the stack does that.
//!
//! ECN (RFC 6040, normal mode): a router between balancer and backend may
//! mark the outer header Congestion Experienced; that mark is copied into
//! an ECN-capable inner header (IPv4: checksum updated), so the backend's
//! TCP still sees the congestion. An inner header that is not ECN-capable
//! is left as it is (the balancer copies the inner ECN field outwards, so a
//! router never sees such a packet as ECN-capable).

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{addr_v4, DecapKey, Stat, FAMILY_V4, FAMILY_V6, PROTO_UDP};

use crate::{
    maps::{DECAP_VIPS, ENCAP},
    // The headers `encap` writes are the ones read here: one definition.
    pkt::{self, ETH_LEN, ETH_P_IP, ETH_P_IPV6, IPV4_LEN, IPV6_LEN, PROTO_IPIP, PROTO_IPV6, UDP_LEN},
};


/// Decapsulate one frame: action and verdict.
#[inline(always)]
pub fn run(ctx: &XdpContext) -> (u32, Stat) {
    match strip(ctx) {
        Ok(()) => (xdp_action::XDP_PASS, Stat::Decapsulated),
        Err(stat) => (xdp_action::XDP_PASS, stat),
    }
}

/// ECN field value Congestion Experienced.
const ECN_CE: u8 = 3;

/// Where the inner packet starts, what it should be (from the outer
/// header's protocol; 0 = from its version nibble, for GUE) and the outer
/// header's ECN field.
#[inline(always)]
fn tunnel(ctx: &XdpContext) -> Result<(usize, u8, u8), Stat> {
    let not = |_| Stat::DecapNotTunnel;
    let ethertype: [u8; 2] = pkt::read(ctx, 12).map_err(not)?;
    let (proto, l4, ecn) = match ethertype {
        ETH_P_IP => {
            let h: [u8; IPV4_LEN] = pkt::read(ctx, ETH_LEN).map_err(not)?;
            // No options, not a fragment (flags+offset other than DF).
            if h[0] != 0x45 || (u16::from_be_bytes([h[6], h[7]]) & 0x3fff) != 0 {
                return Err(Stat::DecapNotTunnel);
            }
            (h[9], ETH_LEN + IPV4_LEN, h[1] & 3)
        }
        ETH_P_IPV6 => {
            let h: [u8; 8] = pkt::read(ctx, ETH_LEN).map_err(not)?;
            if h[0] >> 4 != 6 {
                return Err(Stat::DecapNotTunnel);
            }
            (h[6], ETH_LEN + IPV6_LEN, (h[1] >> 4) & 3)
        }
        _ => return Err(Stat::DecapNotTunnel),
    };
    match proto {
        PROTO_IPIP => Ok((l4, 4, ecn)),
        PROTO_IPV6 => Ok((l4, 6, ecn)),
        PROTO_UDP => {
            let gue_port = ENCAP.get(0).map(|c| c.gue_port_be).unwrap_or(0);
            let udp: [u16; 2] = pkt::read(ctx, l4).map_err(not)?;
            if gue_port == 0 || udp[1] != gue_port {
                return Err(Stat::DecapNotTunnel);
            }
            Ok((l4 + UDP_LEN, 0, ecn))
        }
        _ => Err(Stat::DecapNotTunnel),
    }
}

#[inline(always)]
fn strip(ctx: &XdpContext) -> Result<(), Stat> {
    let (inner, want, outer_ecn) = tunnel(ctx)?;
    let first: [u8; 1] = pkt::read(ctx, inner).map_err(|_| Stat::DecapNotTunnel)?;
    let version = first[0] >> 4;
    if want != 0 && version != want {
        return Err(Stat::DecapNotTunnel);
    }
    let (key, ethertype) = match version {
        4 => {
            let d: [u8; 4] = pkt::read(ctx, inner + 16).map_err(|_| Stat::DecapNotTunnel)?;
            (DecapKey { addr: addr_v4(d), family: FAMILY_V4, _pad: [0; 3] }, ETH_P_IP)
        }
        6 => {
            let d: [u8; 16] = pkt::read(ctx, inner + 24).map_err(|_| Stat::DecapNotTunnel)?;
            (DecapKey { addr: d, family: FAMILY_V6, _pad: [0; 3] }, ETH_P_IPV6)
        }
        _ => return Err(Stat::DecapNotTunnel),
    };
    // SAFETY: map values are only read.
    if unsafe { DECAP_VIPS.get(&key) }.is_none() {
        return Err(Stat::DecapNotLocal);
    }
    if outer_ecn == ECN_CE {
        mark_ce(ctx, inner, version);
    }
    let macs: [u8; 12] = pkt::read(ctx, 0).map_err(|_| Stat::DecapNotTunnel)?;
    let mut eth = [0u8; ETH_LEN];
    eth[..12].copy_from_slice(&macs);
    eth[12..].copy_from_slice(&ethertype);
    let at = inner - ETH_LEN;
    let p: *mut [u8; ETH_LEN] = pkt::ptr_mut_at(ctx, at).ok_or(Stat::DecapNotTunnel)?;
    // SAFETY: `ptr_mut_at` checked that the 14 bytes lie inside the frame
    // (they overwrite outer headers, read in full above).
    unsafe { p.write_unaligned(eth) };
    // SAFETY: moves the frame's start forward by `at` bytes, inside the frame.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, at as i32) } != 0 {
        return Err(Stat::DecapNotTunnel);
    }
    Ok(())
}

/// Copy an outer Congestion Experienced mark into the inner header at
/// `inner` when that is ECN-capable (ECT(0) or ECT(1)).
#[inline(always)]
fn mark_ce(ctx: &XdpContext, inner: usize, version: u8) {
    if version == 4 {
        let Some(h) = pkt::bytes_mut::<12>(ctx, inner) else { return };
        if !matches!(h[1] & 3, 1 | 2) {
            return;
        }
        let old = u16::from_be_bytes([h[0], h[1]]);
        h[1] |= ECN_CE;
        let new = u16::from_be_bytes([h[0], h[1]]);
        // RFC 1624: HC' = ~(~HC + ~m + m').
        let mut sum = !u16::from_be_bytes([h[10], h[11]]) as u32 + !old as u32 + new as u32;
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        let c = (!(sum as u16)).to_be_bytes();
        h[10] = c[0];
        h[11] = c[1];
    } else {
        // Traffic class: low nibble of byte 0, high nibble of byte 1; its
        // ECN bits are bits 4-5 of byte 1.
        let Some(h) = pkt::bytes_mut::<2>(ctx, inner) else { return };
        if matches!((h[1] >> 4) & 3, 1 | 2) {
            h[1] |= ECN_CE << 4;
        }
    }
}
