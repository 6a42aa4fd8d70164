//! A VIP packet that does not fit its path once encapsulated: XDP cannot
//! fragment, so the client gets an ICMP fragmentation-needed (IPv4, type 3
//! code 4, with the next-hop MTU) or ICMPv6 packet-too-big (type 2, with the
//! MTU) and the frame is turned into that answer in place and sent back
//! out (XDP_TX, verdict `TooBig`). The answer comes from the VIP (the
//! address the client sent to), quotes the start of the client's packet
//! (IPv4: its first 28 bytes, the header and 8 bytes of it when it has no
//! options; IPv6: the 40-byte header and 8 bytes), and has correct
//! checksums. IPv4 packets without DF are answered the same way: they
//! cannot be forwarded whole, and the sender learns the MTU that fits.
//!
//! In place: new headers go in front of the client's packet (which stays
//! where it is and becomes the quote), then the frame is cut after the quote.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::Stat;

use crate::{
    pkt::{ETH_LEN, IPV4_LEN, IPV6_LEN},
    pkt,
};

const V4_QUOTE: usize = 28;
const V6_QUOTE: usize = 48;
const ICMP_LEN: usize = 8;
const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
const TTL: u8 = 64;

/// One's-complement sum of `b` (big-endian 16-bit words) added to `acc`.
#[inline(always)]
pub fn sum<const N: usize>(b: &[u8; N], acc: u32) -> u32 {
    let mut s = acc;
    let mut i = 0;
    while i + 1 < N {
        s += u16::from_be_bytes([b[i], b[i + 1]]) as u32;
        i += 2;
    }
    if N % 2 == 1 {
        s += (b[N - 1] as u32) << 8;
    }
    s
}

/// Fold a sum to 16 bits and complement it: the checksum field's value.
#[inline(always)]
pub fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// Turn the frame into the ICMP answer for a client packet (`v6`: the
/// client's family) that needs `mtu` or less: action and verdict, or
/// `None` when the frame could not be reshaped.
#[inline(always)]
pub fn answer(ctx: &XdpContext, v6: bool, mtu: u32) -> Option<(u32, Stat)> {
    if v6 {
        answer6(ctx, mtu)?;
    } else {
        answer4(ctx, mtu)?;
    }
    Some((xdp_action::XDP_TX, Stat::TooBig))
}

/// Make room for `front` bytes of headers before the client's packet and
/// cut the frame to `total` bytes; returns the client's MACs (destination,
/// source) as they were.
#[inline(always)]
fn reshape(ctx: &XdpContext, front: usize, total: usize) -> Option<[u8; 12]> {
    // SAFETY: the helpers move the frame's start and end within its buffer
    // (they fail otherwise); every access after them is bounds-checked again.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(front as i32)) } != 0 {
        return None;
    }
    let macs: [u8; 12] = pkt::read(ctx, front).ok()?;
    let delta = total as i32 - pkt::len(ctx) as i32;
    // SAFETY: as above.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return None;
    }
    Some(macs)
}

/// Ethernet header back to where the frame came from.
#[inline(always)]
fn eth_back(ctx: &XdpContext, macs: &[u8; 12], ethertype: [u8; 2]) -> Option<()> {
    let e: &mut [u8; ETH_LEN] = pkt::bytes_mut(ctx, 0)?;
    e[..6].copy_from_slice(&macs[6..]);
    e[6..12].copy_from_slice(&macs[..6]);
    e[12..].copy_from_slice(&ethertype);
    Some(())
}

#[inline(always)]
fn answer4(ctx: &XdpContext, mtu: u32) -> Option<()> {
    const AT: usize = ETH_LEN + IPV4_LEN + ICMP_LEN;
    let macs = reshape(ctx, IPV4_LEN + ICMP_LEN, AT + V4_QUOTE)?;
    eth_back(ctx, &macs, [0x08, 0x00])?;
    let quote: &[u8; V4_QUOTE] = pkt::bytes_mut(ctx, AT)?;
    let icmp: &mut [u8; ICMP_LEN] = pkt::bytes_mut(ctx, ETH_LEN + IPV4_LEN)?;
    let m = (mtu.min(0xffff) as u16).to_be_bytes();
    *icmp = [3, 4, 0, 0, 0, 0, m[0], m[1]];
    let c = fold(sum(quote, sum(icmp, 0))).to_be_bytes();
    icmp[2] = c[0];
    icmp[3] = c[1];
    let ip: &mut [u8; IPV4_LEN] = pkt::bytes_mut(ctx, ETH_LEN)?;
    // From the VIP (the client's destination) to the client; TOS 0xc0
    // (internetwork control) as routers send ICMP errors.
    let tot = ((IPV4_LEN + ICMP_LEN + V4_QUOTE) as u16).to_be_bytes();
    ip[..12].copy_from_slice(&[0x45, 0xc0, tot[0], tot[1], 0, 0, 0, 0, TTL, PROTO_ICMP, 0, 0]);
    ip[12..16].copy_from_slice(&quote[16..20]);
    ip[16..20].copy_from_slice(&quote[12..16]);
    let c = fold(sum(ip, 0)).to_be_bytes();
    ip[10] = c[0];
    ip[11] = c[1];
    Some(())
}

#[inline(always)]
fn answer6(ctx: &XdpContext, mtu: u32) -> Option<()> {
    const AT: usize = ETH_LEN + IPV6_LEN + ICMP_LEN;
    let macs = reshape(ctx, IPV6_LEN + ICMP_LEN, AT + V6_QUOTE)?;
    eth_back(ctx, &macs, [0x86, 0xdd])?;
    let quote: &[u8; V6_QUOTE] = pkt::bytes_mut(ctx, AT)?;
    let ip: &mut [u8; IPV6_LEN] = pkt::bytes_mut(ctx, ETH_LEN)?;
    let plen = (ICMP_LEN + V6_QUOTE) as u16;
    ip[..8].copy_from_slice(&[0x60, 0, 0, 0, (plen >> 8) as u8, plen as u8, PROTO_ICMPV6, TTL]);
    ip[8..24].copy_from_slice(&quote[24..40]);
    ip[24..40].copy_from_slice(&quote[8..24]);
    let icmp: &mut [u8; ICMP_LEN] = pkt::bytes_mut(ctx, ETH_LEN + IPV6_LEN)?;
    let m = mtu.to_be_bytes();
    *icmp = [2, 0, 0, 0, m[0], m[1], m[2], m[3]];
    // Pseudo-header: addresses, upper-layer length, next header.
    let pseudo = sum(ip, 0) - sum(&[0x60, 0, 0, 0, (plen >> 8) as u8, plen as u8, PROTO_ICMPV6, TTL], 0);
    let c = fold(sum(quote, sum(icmp, pseudo + plen as u32 + PROTO_ICMPV6 as u32))).to_be_bytes();
    icmp[2] = c[0];
    icmp[3] = c[1];
    Some(())
}
