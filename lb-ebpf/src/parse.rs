//! Header parsing with a bounds check before every read.
//!
//! The result is a `Packet` (the flow's 5-tuple, what kind of packet it is,
//! its TCP flags), or the `Stat` that says why the frame is not balanced.
//! Policy: xlb acts only on frames it fully understands as VIP traffic;
//! everything else gets XDP_PASS with a reason, and the kernel applies its
//! own checks.
//!
//! Understood: Ethernet II with up to two VLAN tags (802.1Q / 802.1ad, tags
//! kept); IPv4 with options (IHL 5..15); IPv6 with up to
//! `MAX_IPV6_EXT_HEADERS` extension headers (hop-by-hop, routing,
//! destination options, AH, fragment); a complete fixed TCP (20 bytes) or UDP
//! (8 bytes) header; IP fragments (key with ports 0, see `Kind::Fragment`);
//! ICMP/ICMPv6 errors that embed a TCP/UDP packet (key of the embedded flow,
//! turned around to the client → VIP direction).

use aya_ebpf::programs::XdpContext;
use lb_common::{addr_of_words, Addr, FlowKey, Stat, MAX_IPV6_EXT_HEADERS, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};
use crate::pkt::{ptr_at, read, words};
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
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;
const IPV6_FRAG_HDR_LEN: usize = 8;
/// IPv4 "more fragments" flag and fragment offset bits.
const IPV4_FRAG_MASK: u16 = 0x3fff;
const TCP_HDR_LEN: usize = 20;
const UDP_HDR_LEN: usize = 8;
const ICMP_HDR_LEN: usize = 8;
/// Offset of the flags byte in a TCP header.
const TCP_FLAGS_OFF: usize = 13;

/// What a balanced packet is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A TCP/UDP packet of a flow.
    Flow,
    /// An IP fragment: the key's ports are 0 (later fragments have none), so
    /// all fragments of a client go to one backend (3-tuple hash).
    Fragment,
    /// An ICMP error about a VIP flow; the key is that flow's.
    IcmpError,
    /// An ICMP/ICMPv6 echo request without IP options or extension headers:
    /// the key is the address's echo entry (`VipKey::echo`); `l3` is the
    /// IP header's offset (the ICMP header follows it directly).
    Echo { l3: usize },
}

/// A parsed frame.
pub struct Packet {
    /// The flow (client → VIP).
    pub key: FlowKey,
    /// What it is.
    pub kind: Kind,
    /// TCP flags (0 for other protocols).
    pub tcp_flags: u8,
    /// Offset of the TCP/UDP header (`Kind::Flow`; 0 otherwise): where
    /// `quic` finds the UDP length and payload. A `u16` beside `tcp_flags`:
    /// it fits in the padding, so `xlb_trace`'s stack does not grow.
    pub l4: u16,
}

impl Packet {
    /// The verdict of a packet whose address is no VIP's: echo requests
    /// keep the one they always had (the kernel answers them).
    #[inline(always)]
    pub fn not_vip(&self) -> Stat {
        match self.kind {
            Kind::Echo { .. } => Stat::PassOtherL4,
            _ => Stat::PassNotVip,
        }
    }
}

/// Parse a frame.
#[inline(always)]
pub fn packet(ctx: &XdpContext) -> Result<Packet, Stat> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Stat::PassTruncated)?;
    // SAFETY: bounds checked by ptr_at.
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut off = EthHdr::LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let tag: [u8; VLAN_TAG_LEN] = read(ctx, off)?;
        ether_type = u16::from_ne_bytes([tag[2], tag[3]]);
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

/// Addresses, protocol and L4 offset of an IPv4 header at `off`.
struct V4 {
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    l4: usize,
    /// Header + payload length claimed by the header.
    tot_len: usize,
    fragment: bool,
}

#[inline(always)]
fn v4_header(ctx: &XdpContext, off: usize) -> Result<V4, Stat> {
    let ip: Ipv4Hdr = read(ctx, off)?;
    let hdr_len = ((ip.vihl & 0x0f) as usize) * 4;
    if ip.vihl >> 4 != 4 || hdr_len < Ipv4Hdr::LEN || (u16::from_be_bytes(ip.tot_len) as usize) < hdr_len {
        return Err(Stat::PassBadHeader);
    }
    Ok(V4 {
        src: ip.src_addr,
        dst: ip.dst_addr,
        proto: ip.proto,
        l4: off + hdr_len,
        tot_len: u16::from_be_bytes(ip.tot_len) as usize,
        fragment: u16::from_be_bytes(ip.frags) & IPV4_FRAG_MASK != 0,
    })
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, off: usize) -> Result<Packet, Stat> {
    let h = v4_header(ctx, off)?;
    if h.proto == PROTO_ICMP && !h.fragment {
        return icmp4(ctx, off, &h);
    }
    let l4_len = l4_header_len(h.proto)?;
    if h.fragment {
        let key = FlowKey::v4(h.src, 0, h.dst, 0, h.proto);
        return Ok(Packet { key, kind: Kind::Fragment, tcp_flags: 0, l4: 0 });
    }
    if h.tot_len < h.l4 - off + l4_len {
        return Err(Stat::PassBadHeader);
    }
    let (sport, dport, tcp_flags) = ports(ctx, h.l4, l4_len)?;
    Ok(Packet { key: FlowKey::v4(h.src, sport, h.dst, dport, h.proto), kind: Kind::Flow, tcp_flags, l4: h.l4 as u16 })
}

/// ICMPv4: destination unreachable (incl. fragmentation needed), time
/// exceeded and parameter problem carry the offending packet's IP header and
/// first 8 bytes: the VIP's reply to a client. Steer to the flow's backend.
/// Echo requests (IPv4 header without options) are `Kind::Echo`.
#[inline(always)]
fn icmp4(ctx: &XdpContext, l3: usize, outer: &V4) -> Result<Packet, Stat> {
    let (off, outer_dst) = (outer.l4, outer.dst);
    let icmp: [u8; 2] = read(ctx, off)?;
    if icmp[0] == ICMP_ECHO_REQUEST && off == l3 + Ipv4Hdr::LEN && outer.tot_len >= Ipv4Hdr::LEN + ICMP_HDR_LEN {
        let _: [u8; ICMP_HDR_LEN] = read(ctx, off)?;
        let key = FlowKey::v4(outer.src, 0, outer_dst, 0, PROTO_ICMP);
        return Ok(Packet { key, kind: Kind::Echo { l3 }, tcp_flags: 0, l4: 0 });
    }
    if !matches!(icmp[0], 3 | 11 | 12) {
        return Err(Stat::PassOtherL4);
    }
    let inner = v4_header(ctx, off + ICMP_HDR_LEN)?;
    l4_header_len(inner.proto).map_err(|_| Stat::PassNotVip)?;
    if inner.src != outer_dst {
        return Err(Stat::PassNotVip);
    }
    let p: [u16; 2] = read(ctx, inner.l4)?;
    // Inner: VIP:port → client:port. The flow is client → VIP.
    let key = FlowKey::v4(inner.dst, p[1], inner.src, p[0], inner.proto);
    Ok(Packet { key, kind: Kind::IcmpError, tcp_flags: 0, l4: 0 })
}

/// Walk IPv6 extension headers from `next` at `off`; returns the final
/// next-header value, its offset, and whether a fragment header was seen.
#[inline(always)]
fn v6_ext_walk(ctx: &XdpContext, mut next: u8, mut off: usize) -> Result<(u8, usize, bool), Stat> {
    let mut fragment = false;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        let len = match next {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                let h: [u8; 2] = read(ctx, off)?;
                next = h[0];
                (h[1] as usize + 1) * 8
            }
            IPV6_AH => {
                let h: [u8; 2] = read(ctx, off)?;
                next = h[0];
                (h[1] as usize + 2) * 4
            }
            IPV6_FRAGMENT => {
                let h: [u8; 2] = read(ctx, off)?;
                next = h[0];
                fragment = true;
                IPV6_FRAG_HDR_LEN
            }
            _ => return Ok((next, off, fragment)),
        };
        off += len;
    }
    match next {
        IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_AH | IPV6_FRAGMENT => Err(Stat::PassExtHeaders),
        _ => Ok((next, off, fragment)),
    }
}

/// The addresses of the IPv6 header at `off` (source, destination): eight
/// word loads (`pkt::words`), where the key is built. Read with the header,
/// they were 32 byte loads whose values, live across the extension-header
/// walk, were spilled to the stack one by one and read back.
#[inline(always)]
fn v6_addrs(ctx: &XdpContext, off: usize) -> Result<[Addr; 2], Stat> {
    let w: [u32; 8] = words(ctx, off + V6_ADDRS_OFF)?;
    Ok([addr_of_words([w[0], w[1], w[2], w[3]]), addr_of_words([w[4], w[5], w[6], w[7]])])
}

/// Offset of the source address in an IPv6 header (the destination follows).
const V6_ADDRS_OFF: usize = 8;

#[inline(always)]
fn ipv6(ctx: &XdpContext, off: usize) -> Result<Packet, Stat> {
    let ip: Ipv6Hdr = read(ctx, off)?;
    if ip.vcf[0] >> 4 != 6 {
        return Err(Stat::PassBadHeader);
    }
    let (next, l4, fragment) = v6_ext_walk(ctx, ip.next_hdr, off + Ipv6Hdr::LEN)?;
    if next == PROTO_ICMPV6 && !fragment {
        if l4 == off + Ipv6Hdr::LEN && u16::from_be_bytes(ip.payload_len) as usize >= ICMP_HDR_LEN {
            let icmp: [u8; ICMP_HDR_LEN] = read(ctx, l4)?;
            if icmp[0] == ICMPV6_ECHO_REQUEST {
                let [src, dst] = v6_addrs(ctx, off)?;
                let key = FlowKey::v6(src, 0, dst, 0, PROTO_ICMPV6);
                return Ok(Packet { key, kind: Kind::Echo { l3: off }, tcp_flags: 0, l4: 0 });
            }
        }
        let [_, dst] = v6_addrs(ctx, off)?;
        return icmp6(ctx, l4, &dst);
    }
    let l4_len = l4_header_len(next)?;
    if fragment {
        let [src, dst] = v6_addrs(ctx, off)?;
        return Ok(Packet { key: FlowKey::v6(src, 0, dst, 0, next), kind: Kind::Fragment, tcp_flags: 0, l4: 0 });
    }
    if (u16::from_be_bytes(ip.payload_len) as usize) < l4 - off - Ipv6Hdr::LEN + l4_len {
        return Err(Stat::PassBadHeader);
    }
    let (sport, dport, tcp_flags) = ports(ctx, l4, l4_len)?;
    let [src, dst] = v6_addrs(ctx, off)?;
    Ok(Packet { key: FlowKey::v6(src, sport, dst, dport, next), kind: Kind::Flow, tcp_flags, l4: l4 as u16 })
}

/// ICMPv6 destination unreachable, packet too big, time exceeded and
/// parameter problem: as for IPv4 (the embedded header must be followed
/// directly by TCP/UDP).
#[inline(always)]
fn icmp6(ctx: &XdpContext, off: usize, outer_dst: &[u8; 16]) -> Result<Packet, Stat> {
    let icmp: [u8; 2] = read(ctx, off)?;
    if !matches!(icmp[0], 1..=4) {
        return Err(Stat::PassOtherL4);
    }
    let inner: Ipv6Hdr = read(ctx, off + ICMP_HDR_LEN)?;
    l4_header_len(inner.next_hdr).map_err(|_| Stat::PassNotVip)?;
    if inner.src_addr != *outer_dst {
        return Err(Stat::PassNotVip);
    }
    let p: [u16; 2] = read(ctx, off + ICMP_HDR_LEN + Ipv6Hdr::LEN)?;
    let key = FlowKey::v6(inner.dst_addr, p[1], inner.src_addr, p[0], inner.next_hdr);
    Ok(Packet { key, kind: Kind::IcmpError, tcp_flags: 0, l4: 0 })
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

/// Ports (network order) and TCP flags of an L4 header at `off` whose fixed
/// part (`len` bytes) must be inside the frame.
#[inline(always)]
fn ports(ctx: &XdpContext, off: usize, len: usize) -> Result<(u16, u16, u8), Stat> {
    if len == TCP_HDR_LEN {
        let h: [u8; TCP_HDR_LEN] = read(ctx, off)?;
        Ok((u16::from_ne_bytes([h[0], h[1]]), u16::from_ne_bytes([h[2], h[3]]), h[TCP_FLAGS_OFF]))
    } else {
        let h: [u8; UDP_HDR_LEN] = read(ctx, off)?;
        Ok((u16::from_ne_bytes([h[0], h[1]]), u16::from_ne_bytes([h[2], h[3]]), 0))
    }
}
