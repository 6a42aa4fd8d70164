//! Crafted frames for BPF_PROG_TEST_RUN: Ethernet (optionally VLAN-tagged),
//! IPv4 (with options, fragment fields) or IPv6, TCP or UDP. Checksums of
//! the IPv4 header are real; L4 checksums are left zero (XDP never checks
//! them and xlb does not touch L4).

use std::net::{Ipv4Addr, Ipv6Addr};

/// EtherType IPv4.
pub const ETH_IP: u16 = 0x0800;
/// EtherType IPv6.
pub const ETH_IPV6: u16 = 0x86dd;
/// EtherType ARP.
pub const ETH_ARP: u16 = 0x0806;
/// EtherType 802.1Q.
pub const ETH_8021Q: u16 = 0x8100;
/// EtherType 802.1ad.
pub const ETH_8021AD: u16 = 0x88a8;

/// The client's MAC in crafted frames.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// The balancer's MAC in crafted frames.
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x10];

/// Ethernet header + VLAN tags (outermost first, each `(tpid, vid)`) + payload.
pub fn eth(ethertype: u16, vlans: &[(u16, u16)], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(18 + payload.len());
    f.extend_from_slice(&LB_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    for (tpid, vid) in vlans {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The Internet checksum of `data` (RFC 1071): 0 over data that carries
/// a correct checksum.
pub fn csum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet: header with `options` (padded to 4 bytes), `frag` as the
/// flags+offset field, then `payload`.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, options: &[u8], frag: u16, payload: &[u8]) -> Vec<u8> {
    let mut opts = options.to_vec();
    while !opts.len().is_multiple_of(4) {
        opts.push(0);
    }
    let hlen = 20 + opts.len();
    let total = (hlen + payload.len()) as u16;
    let mut h = vec![0x40 | (hlen / 4) as u8, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34]);
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(&opts);
    let c = csum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// An IPv6 packet.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.extend_from_slice(&[next, 64]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(payload);
    h
}

/// TCP flag bits.
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// A TCP segment (20-byte header).
pub fn tcp(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(20 + payload.len());
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&1u32.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes());
    h.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    h.extend_from_slice(payload);
    h
}

/// A UDP datagram.
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(8 + payload.len());
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(payload);
    h
}

/// A complete TCP/IPv4 frame: a data segment (PSH|ACK) of an established
/// connection (use `tcp` with `tcp_flags::SYN` for connection openings).
pub fn tcp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    eth(ETH_IP, &[], &ipv4(src, dst, 6, &[], 0, &tcp(sport, dport, tcp_flags::ACK | 0x08, b"hello")))
}

/// A complete UDP/IPv4 frame.
pub fn udp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    eth(ETH_IP, &[], &ipv4(src, dst, 17, &[], 0, &udp(sport, dport, b"hello")))
}

/// An ICMP echo request (type 8) or reply (type 0) with a correct checksum.
pub fn icmp_echo(ty: u8, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(payload);
    let c = csum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// The ICMPv6 checksum of `msg` (its checksum field zero or not: the
/// result is 0 when it is correct) with the IPv6 pseudo-header.
pub fn icmp6_csum(src: Ipv6Addr, dst: Ipv6Addr, msg: &[u8]) -> u16 {
    let mut p = Vec::with_capacity(40 + msg.len());
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 58]);
    p.extend_from_slice(msg);
    csum(&p)
}

/// An ICMPv6 echo request (type 128) or reply (129) from `src` to `dst`
/// with a correct checksum.
pub fn icmp6_echo(src: Ipv6Addr, dst: Ipv6Addr, ty: u8, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(payload);
    let c = icmp6_csum(src, dst, &m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// QUIC packets as a client sends them (UDP payloads), connection IDs from
/// `lb_common::quic::encode_cid`. Padded to 40 bytes: every real QUIC
/// packet is longer than the header bytes xlb reads.
pub mod quic {
    use lb_common::quic::{FIXED_BIT, LONG_HEADER, VERSION_1};

    fn padded(mut p: Vec<u8>) -> Vec<u8> {
        while p.len() < 40 {
            p.push(0xa5);
        }
        p
    }

    /// A short-header (1-RTT) packet to `dcid`.
    pub fn short(dcid: &[u8]) -> Vec<u8> {
        let mut p = vec![FIXED_BIT | 0x01];
        p.extend_from_slice(dcid);
        padded(p)
    }

    /// A long-header packet of `version` and type bits `ty` (v1: 0
    /// Initial, 1 0-RTT, 2 Handshake) from `scid` to `dcid`.
    pub fn long(version: u32, ty: u8, dcid: &[u8], scid: &[u8]) -> Vec<u8> {
        let mut p = vec![LONG_HEADER | FIXED_BIT | (ty << 4)];
        p.extend_from_slice(&version.to_be_bytes());
        p.push(dcid.len() as u8);
        p.extend_from_slice(dcid);
        p.push(scid.len() as u8);
        p.extend_from_slice(scid);
        padded(p)
    }

    /// A QUIC v1 Initial to a client-chosen `dcid`.
    pub fn initial(dcid: &[u8]) -> Vec<u8> {
        long(VERSION_1, 0, dcid, &[0xc1; 8])
    }

    /// A QUIC v1 Handshake packet to `dcid`.
    pub fn handshake(dcid: &[u8]) -> Vec<u8> {
        long(VERSION_1, 2, dcid, &[0xc1; 8])
    }
}
