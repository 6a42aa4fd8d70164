//! Header parsing with a bounds check before every read.
//!
//! The result is the flow's 5-tuple, or the `Stat` that says why the frame is
//! not balanced. Policy: xlb acts only on frames it fully understands as
//! TCP/UDP to a possible VIP; everything else gets XDP_PASS with a reason, and
//! the kernel applies its own checks.
//!
//! Understood: Ethernet II with up to two VLAN tags (802.1Q / 802.1ad, tags
//! kept), IPv4 with options (IHL 5..15), IPv6 whose next header is TCP or UDP,
//! and a complete fixed TCP (20 bytes) or UDP (8 bytes) header.

use aya_ebpf::programs::XdpContext;
use core::mem::size_of;
use lb_common::{FlowKey, Stat, VipKey, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

const ETH_P_IP: u16 = 0x0800u16.to_be();
const ETH_P_IPV6: u16 = 0x86DDu16.to_be();
const ETH_P_8021Q: u16 = 0x8100u16.to_be();
const ETH_P_8021AD: u16 = 0x88A8u16.to_be();
/// VLAN tags parsed at most (QinQ).
const MAX_VLAN_TAGS: usize = 2;
const VLAN_TAG_LEN: usize = 4;
const IPPROTO_FRAGMENT: u8 = 44;
/// IPv4 "more fragments" flag and fragment offset bits.
const IPV4_FRAG_MASK: u16 = 0x3fff;
const TCP_HDR_LEN: usize = 20;
const UDP_HDR_LEN: usize = 8;

/// A pointer to a `T` at `off` bytes into the frame, if all of it is inside.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + off + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *const T)
}

/// Mutable variant of `ptr_at`.
#[inline(always)]
pub fn ptr_mut_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    ptr_at::<T>(ctx, off).map(|p| p as *mut T)
}

/// Parse a frame into its flow key.
#[inline(always)]
pub fn flow(ctx: &XdpContext) -> Result<FlowKey, Stat> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Stat::PassTruncated)?;
    // SAFETY: bounds checked by ptr_at.
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut off = EthHdr::LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let tag: *const [u8; VLAN_TAG_LEN] = ptr_at(ctx, off).ok_or(Stat::PassTruncated)?;
        // SAFETY: bounds checked; bytes 2..4 of a tag are the inner EtherType.
        ether_type = unsafe { u16::from_ne_bytes([(*tag)[2], (*tag)[3]]) };
        off += VLAN_TAG_LEN;
    }
    if ether_type == ETH_P_IP {
        ipv4(ctx, off)
    } else if ether_type == ETH_P_IPV6 {
        ipv6(ctx, off)
    } else {
        Err(Stat::PassNotIp)
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, off: usize) -> Result<FlowKey, Stat> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, off).ok_or(Stat::PassTruncated)?;
    // SAFETY: the fixed IPv4 header is inside the frame.
    let (vihl, frags, proto, tot_len, src, dst) = unsafe {
        (
            (*ip).vihl,
            u16::from_be_bytes((*ip).frags),
            (*ip).proto,
            u16::from_be_bytes((*ip).tot_len) as usize,
            (*ip).src_addr,
            (*ip).dst_addr,
        )
    };
    let hdr_len = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || hdr_len < Ipv4Hdr::LEN {
        return Err(Stat::PassBadHeader);
    }
    if frags & IPV4_FRAG_MASK != 0 {
        return Err(Stat::PassFragment);
    }
    let l4_len = l4_header_len(proto)?;
    if tot_len < hdr_len + l4_len {
        return Err(Stat::PassBadHeader);
    }
    let sport_be = ports(ctx, off + hdr_len, l4_len)?;
    let mut key = FlowKey {
        src: [0; 16],
        sport_be: sport_be.0,
        _pad: 0,
        vip: VipKey { addr: [0; 16], port_be: sport_be.1, proto, family: FAMILY_V4 },
    };
    key.src[..4].copy_from_slice(&src);
    key.vip.addr[..4].copy_from_slice(&dst);
    Ok(key)
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, off: usize) -> Result<FlowKey, Stat> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, off).ok_or(Stat::PassTruncated)?;
    // SAFETY: the fixed IPv6 header is inside the frame.
    let (vcf0, next, payload_len) =
        unsafe { ((*ip).vcf[0], (*ip).next_hdr, u16::from_be_bytes((*ip).payload_len) as usize) };
    if vcf0 >> 4 != 6 {
        return Err(Stat::PassBadHeader);
    }
    if next == IPPROTO_FRAGMENT {
        return Err(Stat::PassFragment);
    }
    let l4_len = l4_header_len(next)?;
    if payload_len < l4_len {
        return Err(Stat::PassBadHeader);
    }
    let (sport_be, dport_be) = ports(ctx, off + Ipv6Hdr::LEN, l4_len)?;
    // SAFETY: as above.
    let (src, dst) = unsafe { ((*ip).src_addr, (*ip).dst_addr) };
    Ok(FlowKey {
        src,
        sport_be,
        _pad: 0,
        vip: VipKey { addr: dst, port_be: dport_be, proto: next, family: FAMILY_V6 },
    })
}

/// Fixed header length of a balanced L4 protocol.
#[inline(always)]
fn l4_header_len(proto: u8) -> Result<usize, Stat> {
    match proto {
        PROTO_TCP => Ok(TCP_HDR_LEN),
        PROTO_UDP => Ok(UDP_HDR_LEN),
        _ => Err(Stat::PassOtherL4),
    }
}

/// Source and destination ports (network order) of an L4 header at `off`
/// whose fixed part (`len` bytes) must be inside the frame.
#[inline(always)]
fn ports(ctx: &XdpContext, off: usize, len: usize) -> Result<(u16, u16), Stat> {
    let in_frame = if len == TCP_HDR_LEN {
        ptr_at::<[u8; TCP_HDR_LEN]>(ctx, off).is_some()
    } else {
        ptr_at::<[u8; UDP_HDR_LEN]>(ctx, off).is_some()
    };
    if !in_frame {
        return Err(Stat::PassTruncated);
    }
    let p: *const [u16; 2] = ptr_at(ctx, off).ok_or(Stat::PassTruncated)?;
    // SAFETY: bounds checked above.
    unsafe { Ok(((*p)[0], (*p)[1])) }
}
