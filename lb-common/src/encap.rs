//! Routed backends: how frames reach a backend (`BackendInfo::forward`),
//! the encapsulation settings (`XLB_ENCAP`) and `xlb decap`'s key.

use crate::Addr;

/// How frames reach a backend (`BackendInfo::forward`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Forward {
    /// L2 direct server return: only the MACs change (same segment).
    #[default]
    L2 = 0,
    /// IP-in-IP: IPv4 or IPv6 outer header (the backend's family) around the
    /// client's packet (IPv4-in-IPv4 proto 4, IPv6-in-IPv6 and IPv4-in-IPv6
    /// next header 41/4, IPv6-in-IPv4 proto 41); next hop from the kernel FIB.
    Ipip = 1,
    /// GUE variant 1 (the inner IP packet directly after a UDP header, to
    /// the GUE port): as `Ipip`, with the UDP source port varying per flow.
    Gue = 2,
}

impl Forward {
    /// Every mode.
    pub const ALL: [Forward; 3] = [Forward::L2, Forward::Ipip, Forward::Gue];

    /// Decode a stored byte.
    pub const fn from_u8(v: u8) -> Option<Forward> {
        match v {
            0 => Some(Forward::L2),
            1 => Some(Forward::Ipip),
            2 => Some(Forward::Gue),
            _ => None,
        }
    }

    /// Name on the command line, in config and state files and in status.
    pub const fn name(self) -> &'static str {
        match self {
            Forward::L2 => "l2",
            Forward::Ipip => "ipip",
            Forward::Gue => "gue",
        }
    }

    /// The mode an operator names (`name`'s inverse), if any.
    pub fn from_name(s: &str) -> Option<Forward> {
        Forward::ALL.into_iter().find(|f| f.name() == s)
    }

    /// Reaches its backend through a router (an outer IP header).
    pub const fn is_routed(self) -> bool {
        !matches!(self, Forward::L2)
    }
}

impl core::fmt::Display for Forward {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// Default UDP destination port of GUE encapsulation (`--gue-port`).
pub const DEFAULT_GUE_PORT: u16 = 6080;
/// TTL / hop limit of outer headers (RFC 2003 §3.1: the inner TTL is not
/// touched; the outer one is a fresh default).
pub const ENCAP_TTL: u8 = 64;

/// `EncapConfig::flags`: an IPv4 source prefix is configured.
pub const ENCAP_F_SRC4: u8 = 1;
/// `EncapConfig::flags`: an IPv6 source prefix is configured.
pub const ENCAP_F_SRC6: u8 = 2;

/// The one entry of `XLB_ENCAP`: outer source addresses and the GUE port,
/// shared by the balancer (encapsulation) and `xlb decap`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EncapConfig {
    /// IPv6 source prefix (its host bits are replaced by the flow hash).
    pub src6: Addr,
    /// IPv4 source prefix, network order.
    pub src4: [u8; 4],
    /// Bits of the IPv4 source's last 32 bits taken from the flow hash.
    pub vary4: u32,
    /// Bits of the IPv6 source's last 32 bits taken from the flow hash.
    pub vary6: u32,
    /// GUE destination port, network order.
    pub gue_port_be: u16,
    /// `ENCAP_F_*`.
    pub flags: u8,
    /// Outer TTL / hop limit.
    pub ttl: u8,
}

impl EncapConfig {
    /// The outer IPv4 source for a flow hash: the prefix with its host bits
    /// from the hash (so routers' ECMP spreads flows), network order.
    #[inline(always)]
    pub fn source4(&self, hash: u32) -> [u8; 4] {
        let base = u32::from_be_bytes(self.src4);
        ((base & !self.vary4) | (hash & self.vary4)).to_be_bytes()
    }

    /// The outer IPv6 source for a flow hash (host bits in the last 32).
    #[inline(always)]
    pub fn source6(&self, hash: u32) -> Addr {
        let mut a = self.src6;
        let base = u32::from_be_bytes([a[12], a[13], a[14], a[15]]);
        let w = ((base & !self.vary6) | (hash & self.vary6)).to_be_bytes();
        a[12] = w[0];
        a[13] = w[1];
        a[14] = w[2];
        a[15] = w[3];
        a
    }
}

/// The GUE UDP source port for a flow hash: in 49152..=65535, varying per
/// flow (routers hash it for ECMP).
#[inline(always)]
pub const fn gue_source_port(hash: u32) -> u16 {
    0xc000 | (hash & 0x3fff) as u16
}

/// Key of `XLB_DECAP_VIPS`: an inner destination `xlb decap` accepts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct DecapKey {
    /// The VIP address (see `Addr`).
    pub addr: Addr,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// Explicit padding.
    pub _pad: [u8; 3],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_names_round_trip_and_sources_vary_only_host_bits() {
        for f in Forward::ALL {
            assert_eq!(Forward::from_name(f.name()), Some(f));
            assert_eq!(Forward::from_u8(f as u8), Some(f));
        }
        assert_eq!(Forward::from_name("IPIP"), None);
        let c = EncapConfig { src4: [10, 9, 0, 0], vary4: 0xff, src6: [0xfd; 16], vary6: 0xffff, ..Default::default() };
        assert_eq!(c.source4(0x1234_5678), [10, 9, 0, 0x78]);
        let s6 = c.source6(0x1234_5678);
        assert_eq!(&s6[..14], &[0xfd; 14]);
        assert_eq!(&s6[14..], &[0x56, 0x78]);
        assert!(gue_source_port(0) >= 0xc000 && gue_source_port(u32::MAX) >= 0xc000);
        assert_ne!(gue_source_port(1), gue_source_port(2));
    }
}
