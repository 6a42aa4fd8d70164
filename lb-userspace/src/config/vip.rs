//! The virtual service as operators write it: `ADDR:PORT/PROTO`, any-port
//! and prefix forms, its protocol and its datapath options (`--hash`,
//! `--answer-ping`).

use anyhow::{anyhow, bail, Context, Result};
use lb_common::{addr_v4, VipKey, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};
use serde::{Deserialize, Serialize};
use std::{fmt, net::IpAddr, str::FromStr};

use super::check_unicast;

/// Transport protocol of a virtual service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// A virtual service: `ADDR:PORT/PROTO`, e.g. `10.0.0.100:80/tcp` or
/// `[2001:db8::100]:443/tcp`, or every port of an address:
/// `10.0.0.100:*/tcp` (port 0 here, `VipKey::any_port` in the datapath).
///
/// Prefix VIPs serve every address of a network: `10.0.0.0/24:443/tcp`,
/// `[2001:db8::]/64:*/udp` (the address is the network's, host bits zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Vip {
    /// Virtual IP address (a prefix VIP's network address).
    pub addr: IpAddr,
    /// Prefix length of a prefix VIP (shorter than the address), `None`
    /// for a single address.
    pub prefix: Option<u8>,
    /// Port (1..=65535), or `ANY_PORT` for every port.
    pub port: u16,
    /// Protocol.
    pub proto: Proto,
}

/// `Vip::port` of an any-port VIP (`ADDR:*/PROTO`).
pub const ANY_PORT: u16 = 0;

impl Vip {
    /// The datapath's key for this service.
    pub fn key(&self) -> VipKey {
        let (addr, family) = match self.addr {
            IpAddr::V4(a) => (addr_v4(a.octets()), FAMILY_V4),
            IpAddr::V6(a) => (a.octets(), FAMILY_V6),
        };
        let k = VipKey { addr, port_be: self.port.to_be(), proto: self.proto.number(), family };
        if self.is_any_port() {
            k.any_port()
        } else {
            k
        }
    }

    /// Serves every destination port of its address (`ADDR:*/PROTO`).
    pub fn is_any_port(&self) -> bool {
        self.port == ANY_PORT
    }

    /// The key of a flow to `port` of this service (any-port VIPs: the
    /// flow keeps its real destination port).
    pub fn flow_vip_key(&self, port: u16) -> VipKey {
        let mut k = self.key().fragment_alias();
        k.port_be = if self.is_any_port() { port } else { self.port }.to_be();
        k
    }
}

impl fmt::Display for Vip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let port = if self.is_any_port() { "*".to_string() } else { self.port.to_string() };
        let len = self.prefix.map(|l| format!("/{l}")).unwrap_or_default();
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}{len}:{port}/{}", self.proto),
            IpAddr::V6(a) => write!(f, "[{a}]{len}:{port}/{}", self.proto),
        }
    }
}

/// Parse `ADDR` or `PREFIX/LEN` (IPv6 in brackets) of a VIP `s`.
fn parse_vip_addr(s: &str, text: &str) -> Result<(IpAddr, Option<u8>)> {
    let bad = || anyhow!("invalid VIP '{s}': expected ADDR:PORT/PROTO, PREFIX/LEN:PORT/PROTO or a port '*', e.g. 10.0.0.100:80/tcp");
    let (addr, len) = match text.rsplit_once('/') {
        Some((a, l)) => (a, Some(l.parse::<u8>().map_err(|_| bad())?)),
        None => (text, None),
    };
    let addr: IpAddr = match addr.strip_prefix('[').and_then(|a| a.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?.into(),
        None => addr.parse::<std::net::Ipv4Addr>().map_err(|_| bad())?.into(),
    };
    let Some(len) = len else { return Ok((addr, None)) };
    let bits: u8 = if addr.is_ipv4() { 32 } else { 128 };
    if len == 0 || len >= bits {
        bail!("invalid VIP '{s}': prefix length {len} (1..{} ; a single address has none)", bits - 1);
    }
    let net = mask(addr, len);
    if net != addr {
        bail!("invalid VIP '{s}': {addr}/{len} has host bits set (the network is {net}/{len})");
    }
    Ok((addr, Some(len)))
}

/// `addr` with all but its first `len` bits zero.
pub fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = if len == 0 { 0 } else { u32::MAX << (32 - len.min(32) as u32) };
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = if len == 0 { 0 } else { u128::MAX << (128 - len.min(128) as u32) };
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

impl FromStr for Vip {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || anyhow!("invalid VIP '{s}': expected ADDR:PORT/PROTO, PREFIX/LEN:PORT/PROTO or a port '*', e.g. 10.0.0.100:80/tcp");
        let (sock, proto) = s.rsplit_once('/').ok_or_else(bad)?;
        let proto = match proto {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            other => bail!("invalid VIP '{s}': protocol '{other}' is not tcp or udp"),
        };
        let (addr, port) = sock.rsplit_once(':').ok_or_else(bad)?;
        let port = if port == "*" {
            ANY_PORT
        } else {
            match port.parse::<u16>() {
                Ok(0) => bail!("invalid VIP '{s}': port 0 (every port is '*')"),
                Ok(p) => p,
                Err(_) => return Err(bad()),
            }
        };
        let (addr, prefix) = parse_vip_addr(s, addr)?;
        check_unicast(addr).with_context(|| format!("invalid VIP '{s}'"))?;
        Ok(Vip { addr, prefix, port, proto })
    }
}

/// What a Maglev VIP hashes to pick a new flow's backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum HashMode {
    /// The 5-tuple (the default).
    #[default]
    FiveTuple,
    /// The destination port only: every client of one port gets the same
    /// backend (`lb_common::hash::dst_port_hash`).
    DstPort,
}

impl fmt::Display for HashMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HashMode::FiveTuple => "5-tuple",
            HashMode::DstPort => "dst-port",
        })
    }
}

impl FromStr for HashMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "5-tuple" => Ok(HashMode::FiveTuple),
            "dst-port" => Ok(HashMode::DstPort),
            _ => bail!("unknown hash '{s}' (available: 5-tuple, dst-port)"),
        }
    }
}

/// A VIP's datapath options besides its algorithm: `--hash`,
/// `--answer-ping` (CLI), the same keys in the API and the config file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipOpts {
    /// What Maglev hashes.
    pub hash: HashMode,
    /// Echo requests to the VIP's address are answered by the datapath.
    pub answer_ping: bool,
}

impl VipOpts {
    /// The `VipInfo::flags` these options set.
    pub fn flags(&self) -> u8 {
        let mut f = 0;
        if self.hash == HashMode::DstPort {
            f |= lb_common::VIP_F_HASH_DST_PORT;
        }
        if self.answer_ping {
            f |= lb_common::VIP_F_ANSWER_PING;
        }
        f
    }

    /// Check the options against the VIP's algorithm.
    pub fn validate(&self, algo: lb_common::Algo) -> Result<()> {
        if self.hash == HashMode::DstPort && algo != lb_common::Algo::Maglev {
            bail!("--hash dst-port needs the maglev algorithm (not {})", algo.name());
        }
        Ok(())
    }

    /// Options from the optional fields of a request or config entry.
    pub fn from_fields(hash: Option<HashMode>, answer_ping: Option<bool>) -> VipOpts {
        VipOpts { hash: hash.unwrap_or_default(), answer_ping: answer_ping.unwrap_or(false) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vip_syntax() {
        let v: Vip = "10.0.0.100:80/tcp".parse().expect("valid");
        assert_eq!(v.to_string(), "10.0.0.100:80/tcp");
        assert_eq!(v.key().port_be, 80u16.to_be());
        assert_eq!(&v.key().addr[..4], &[10, 0, 0, 100]);
        let v6: Vip = "[2001:db8::1]:443/udp".parse().expect("valid");
        assert_eq!(v6.to_string(), "[2001:db8::1]:443/udp");
        let any: Vip = "10.0.0.100:*/tcp".parse().expect("any port");
        assert_eq!(any.to_string(), "10.0.0.100:*/tcp");
        assert!(any.is_any_port() && any.key().is_any_port() && any.key().port_be == 0);
        assert_eq!(any.key().fragment_alias(), v.key().fragment_alias());
        let any6: Vip = "[2001:db8::1]:*/udp".parse().expect("any port v6");
        assert_eq!(any6.to_string(), "[2001:db8::1]:*/udp");
        assert_eq!("dst-port".parse::<HashMode>().expect("hash").to_string(), "dst-port");
        for good in ["10.0.0.0/24:443/tcp", "10.0.0.0/8:*/udp", "[2001:db8::]/64:*/udp", "[2001:db8::]/48:443/tcp"] {
            let p: Vip = good.parse().expect(good);
            assert_eq!(p.to_string(), good);
            assert!(p.prefix.is_some());
        }
        for (bad, why) in [
            ("10.0.0.1/24:443/tcp", "host bits"),
            ("10.0.0.0/32:443/tcp", "prefix length"),
            ("10.0.0.0/0:443/tcp", "prefix length"),
            ("[2001:db8::1]/64:443/tcp", "host bits"),
            ("10.0.0.0/33:443/tcp", "prefix length"),
            ("10.0.0.0/x:443/tcp", "invalid VIP"),
        ] {
            let e = bad.parse::<Vip>().expect_err(bad).to_string();
            assert!(e.contains(why) && e.starts_with("invalid VIP"), "{bad}: {e}");
        }
        assert!("dst".parse::<HashMode>().is_err());
        for bad in [
            "10.0.0.100:**/tcp",
            "10.0.0.100:*",
            "2001:db8::1:80/tcp",
            "10.0.0.100:80",
            "10.0.0.100/tcp",
            "10.0.0.100:0/tcp",
            "10.0.0.100:80/sctp",
            "10.0.0.300:80/tcp",
            "0.0.0.0:80/tcp",
            "224.0.0.1:80/tcp",
            "",
        ] {
            let e = bad.parse::<Vip>().expect_err(bad).to_string();
            assert!(e.contains("invalid VIP"), "{bad}: {e}");
        }
    }
}
