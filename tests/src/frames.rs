//! Crafted frames for BPF_PROG_TEST_RUN: Ethernet (optionally VLAN-tagged),
//! IPv4 (with options, fragment fields) or IPv6, TCP or UDP, ICMP echoes.
//! Each header is built and written by `etherparse` (its fields by name,
//! its byte order and checksums); the payload after it is the caller's, so
//! malformed and truncated packets can still be made. Checksums of the IPv4
//! header and of ICMP are real; L4 checksums are left zero (XDP never checks
//! them and xlb does not touch L4).

use etherparse::{
    checksum::Sum16BitWords, EtherType, Ethernet2Header, IcmpEchoHeader, Icmpv4Header, Icmpv4Type, Icmpv6Header, Icmpv6Type,
    IpFragOffset, IpNumber, Ipv4Header, Ipv4Options, Ipv6FlowLabel, Ipv6Header, SingleVlanHeader, TcpHeader, UdpHeader, VlanId,
    VlanPcp,
};
use std::net::{Ipv4Addr, Ipv6Addr};

/// `header` written out (etherparse writes into any `io::Write`; a `Vec`
/// never fails), then `payload`.
fn then(mut out: Vec<u8>, payload: &[u8]) -> Vec<u8> {
    out.extend_from_slice(payload);
    out
}

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
    let mut f = Vec::with_capacity(14 + 4 * vlans.len() + payload.len());
    // Each header names the type of the one after it: the Ethernet header
    // the first tag's TPID, each tag the next one's, the last the payload's.
    let mut types = vlans.iter().map(|(tpid, _)| *tpid).chain(std::iter::once(ethertype));
    let first = types.next().expect("at least the payload's type");
    Ethernet2Header { destination: LB_MAC, source: CLIENT_MAC, ether_type: EtherType(first) }.write(&mut f).expect("write to a Vec");
    for ((_, vid), next) in vlans.iter().zip(types) {
        let vlan_id = VlanId::try_new(*vid).expect("a 12-bit VLAN id");
        SingleVlanHeader { pcp: VlanPcp::ZERO, drop_eligible_indicator: false, vlan_id, ether_type: EtherType(next) }
            .write(&mut f)
            .expect("write to a Vec");
    }
    then(f, payload)
}

/// The Internet checksum of `data` (RFC 1071): 0 over data that carries
/// a correct checksum.
pub fn csum(data: &[u8]) -> u16 {
    Sum16BitWords::new().add_slice(data).ones_complement().to_be()
}

/// An IPv4 packet: header with `options` (padded to 4 bytes), `frag` as the
/// flags+offset field (DF 0x4000, MF 0x2000, offset in 8-byte units), then
/// `payload`; identification 0x1234, TTL 64, a correct header checksum.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, options: &[u8], frag: u16, payload: &[u8]) -> Vec<u8> {
    assert_eq!(frag & 0x8000, 0, "the reserved fragment flag is not set in fixtures");
    let mut opts = options.to_vec();
    while !opts.len().is_multiple_of(4) {
        opts.push(0);
    }
    let options = Ipv4Options::try_from(opts.as_slice()).expect("at most 40 bytes of options");
    let h = Ipv4Header {
        total_len: (Ipv4Header::MIN_LEN + opts.len() + payload.len()) as u16,
        identification: 0x1234,
        dont_fragment: frag & 0x4000 != 0,
        more_fragments: frag & 0x2000 != 0,
        fragment_offset: IpFragOffset::try_new(frag & 0x1fff).expect("13 bits"),
        time_to_live: 64,
        protocol: IpNumber(proto),
        source: src.octets(),
        destination: dst.octets(),
        options,
        ..Default::default()
    };
    let mut p = Vec::with_capacity(h.header_len() + payload.len());
    h.write(&mut p).expect("write to a Vec");
    then(p, payload)
}

/// An IPv6 packet (hop limit 64, traffic class and flow label 0).
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let h = Ipv6Header {
        traffic_class: 0,
        flow_label: Ipv6FlowLabel::ZERO,
        payload_length: payload.len() as u16,
        next_header: IpNumber(next),
        hop_limit: 64,
        source: src.octets(),
        destination: dst.octets(),
    };
    let mut p = Vec::with_capacity(Ipv6Header::LEN + payload.len());
    h.write(&mut p).expect("write to a Vec");
    then(p, payload)
}

/// TCP flag bits.
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// PSH.
    pub const PSH: u8 = 0x08;
    /// ACK.
    pub const ACK: u8 = 0x10;
    /// URG.
    pub const URG: u8 = 0x20;
}

/// A TCP segment: 20-byte header (sequence 1, window 0xffff, checksum 0)
/// with the `tcp_flags` bits in `flags`.
pub fn tcp(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    assert_eq!(flags & 0xc0, 0, "ECE/CWR are not used in fixtures");
    let mut h = TcpHeader::new(sport, dport, 1, 0xffff);
    h.fin = flags & tcp_flags::FIN != 0;
    h.syn = flags & tcp_flags::SYN != 0;
    h.rst = flags & tcp_flags::RST != 0;
    h.psh = flags & tcp_flags::PSH != 0;
    h.ack = flags & tcp_flags::ACK != 0;
    h.urg = flags & tcp_flags::URG != 0;
    let mut p = Vec::with_capacity(h.header_len() + payload.len());
    h.write(&mut p).expect("write to a Vec");
    then(p, payload)
}

/// A UDP datagram (checksum 0: none, as IPv4 allows).
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let h = UdpHeader { source_port: sport, destination_port: dport, length: (UdpHeader::LEN + payload.len()) as u16, checksum: 0 };
    let mut p = Vec::with_capacity(UdpHeader::LEN + payload.len());
    h.write(&mut p).expect("write to a Vec");
    then(p, payload)
}

/// A complete TCP/IPv4 frame: a data segment (PSH|ACK) of an established
/// connection (use `tcp` with `tcp_flags::SYN` for connection openings).
pub fn tcp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    eth(ETH_IP, &[], &ipv4(src, dst, 6, &[], 0, &tcp(sport, dport, tcp_flags::ACK | tcp_flags::PSH, b"hello")))
}

/// A complete UDP/IPv4 frame.
pub fn udp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    eth(ETH_IP, &[], &ipv4(src, dst, 17, &[], 0, &udp(sport, dport, b"hello")))
}

/// An ICMP echo request (type 8) or reply (type 0) with a correct checksum.
pub fn icmp_echo(ty: u8, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let echo = IcmpEchoHeader { id, seq };
    let icmp_type = match ty {
        8 => Icmpv4Type::EchoRequest(echo),
        0 => Icmpv4Type::EchoReply(echo),
        _ => panic!("ICMP type {ty} is not an echo"),
    };
    let mut m = Vec::with_capacity(8 + payload.len());
    Icmpv4Header::with_checksum(icmp_type, payload).write(&mut m).expect("write to a Vec");
    then(m, payload)
}

/// The ICMPv6 checksum of `msg` (its checksum field zero or not: the
/// result is 0 when it is correct) with the IPv6 pseudo-header.
pub fn icmp6_csum(src: Ipv6Addr, dst: Ipv6Addr, msg: &[u8]) -> u16 {
    Sum16BitWords::new()
        .add_slice(&src.octets())
        .add_slice(&dst.octets())
        .add_slice(&(msg.len() as u32).to_be_bytes())
        .add_slice(&[0, 0, 0, 58])
        .add_slice(msg)
        .ones_complement()
        .to_be()
}

/// An ICMPv6 echo request (type 128) or reply (129) from `src` to `dst`
/// with a correct checksum.
pub fn icmp6_echo(src: Ipv6Addr, dst: Ipv6Addr, ty: u8, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let echo = IcmpEchoHeader { id, seq };
    let icmp_type = match ty {
        128 => Icmpv6Type::EchoRequest(echo),
        129 => Icmpv6Type::EchoReply(echo),
        _ => panic!("ICMPv6 type {ty} is not an echo"),
    };
    let h = Icmpv6Header::with_checksum(icmp_type, src.octets(), dst.octets(), payload).expect("a payload under 4 GiB");
    let mut m = Vec::with_capacity(8 + payload.len());
    h.write(&mut m).expect("write to a Vec");
    then(m, payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetHeaders, PacketHeaders, TransportHeader};

    /// What the builders write reads back, field by field, as they say.
    #[test]
    fn frames_read_back_as_built() {
        let (c, v) = (Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 100));
        let f = eth(ETH_IP, &[(ETH_8021AD, 100), (ETH_8021Q, 42)], &ipv4(c, v, 6, &[1, 1, 1], 0x4000, &tcp(1234, 80, tcp_flags::SYN, b"x")));
        let p = PacketHeaders::from_ethernet_slice(&f).expect("parses");
        let e = p.link.and_then(|l| l.ethernet2()).expect("ethernet");
        assert_eq!((e.destination, e.source, e.ether_type), (LB_MAC, CLIENT_MAC, EtherType(ETH_8021AD)));
        let ids: Vec<(u16, u16)> = p
            .link_exts
            .iter()
            .filter_map(|x| match x {
                etherparse::LinkExtHeader::Vlan(s) => Some((s.vlan_id.value(), s.ether_type.0)),
                _ => None,
            })
            .collect();
        assert_eq!(ids, [(100, ETH_8021Q), (42, ETH_IP)]);
        let Some(NetHeaders::Ipv4(ip, _)) = &p.net else { panic!("IPv4 expected") };
        assert_eq!((ip.identification, ip.time_to_live, ip.protocol.0), (0x1234, 64, 6));
        assert_eq!((ip.dont_fragment, ip.more_fragments, ip.fragment_offset.value()), (true, false, 0));
        let (frag, _) = Ipv4Header::from_slice(&ipv4(c, v, 6, &[], 0x2005, &[0; 8])).expect("parses");
        assert_eq!((frag.dont_fragment, frag.more_fragments, frag.fragment_offset.value()), (false, true, 5));
        assert_eq!(ip.options.as_slice(), &[1, 1, 1, 0]);
        assert_eq!(ip.total_len as usize, 24 + 20 + 1);
        assert_eq!(csum(&f[22..46]), 0, "header checksum");
        let Some(TransportHeader::Tcp(t)) = &p.transport else { panic!("TCP expected") };
        assert!(t.syn && !t.ack && !t.fin && !t.rst && !t.psh);
        assert_eq!((t.sequence_number, t.acknowledgment_number, t.window_size, t.checksum), (1, 0, 0xffff, 0));
        assert_eq!(p.payload.slice(), b"x");
        let (c6, v6): (Ipv6Addr, Ipv6Addr) = ("fd00::2".parse().expect("ip"), "2001:db8::1".parse().expect("ip"));
        let echo = icmp6_echo(c6, v6, 128, 7, 9, b"ping");
        assert_eq!(icmp6_csum(c6, v6, &echo), 0, "ICMPv6 checksum");
        assert_eq!(&echo[..8], &[128, 0, echo[2], echo[3], 0, 7, 0, 9]);
        assert_eq!(csum(&icmp_echo(8, 7, 9, b"ping")), 0, "ICMP checksum");
        assert_eq!(udp(5, 53, b"q"), [0, 5, 0, 53, 0, 9, 0, 0, b'q']);
    }
}
