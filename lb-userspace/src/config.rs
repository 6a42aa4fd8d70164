//! What an operator writes: VIP and MAC syntax, health-check settings and the
//! TOML config file. Every parser here returns a one-line error and is used
//! by the CLI, the API and the config file alike, so all three accept and
//! reject exactly the same input.

use anyhow::{anyhow, bail, Context, Result};
use lb_common::{addr_v4, VipKey, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};
use serde::{Deserialize, Serialize};
use std::{fmt, net::IpAddr, path::Path, str::FromStr};


/// Serde through `FromStr`/`Display`, so the API (and anything else that
/// serialises these types) accepts and prints exactly what the CLI and the
/// config file do: `#[serde(with = "crate::config::text")]`, or
/// `text::opt` for an `Option`.
pub mod text {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};
    use std::{fmt::Display, str::FromStr};

    /// Serialise as the value's `Display`.
    pub fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    /// Deserialise a string with `FromStr` (its one-line error as is).
    pub fn deserialize<'de, T: FromStr, D: Deserializer<'de>>(d: D) -> Result<T, D::Error>
    where
        T::Err: Display,
    {
        let s = String::deserialize(d)?;
        s.parse().map_err(|e: T::Err| D::Error::custom(format!("{e:#}")))
    }

    /// The same for an optional value.
    pub mod opt {
        use super::*;

        /// Serialise `Some` as the value's `Display`, `None` as null.
        pub fn serialize<T: Display, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(v) => s.collect_str(v),
                None => s.serialize_none(),
            }
        }

        /// Deserialise null or a string with `FromStr`.
        pub fn deserialize<'de, T: FromStr, D: Deserializer<'de>>(d: D) -> Result<Option<T>, D::Error>
        where
            T::Err: Display,
        {
            match Option::<String>::deserialize(d)? {
                Some(s) => s.parse().map(Some).map_err(|e: T::Err| D::Error::custom(format!("{e:#}"))),
                None => Ok(None),
            }
        }
    }
}

/// A scheduling algorithm as operators write it (`Algo::from_name`), with
/// the same error everywhere: a `FromStr` for the CLI, API and config file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AlgoName(pub lb_common::Algo);

impl FromStr for AlgoName {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        parse_algo(s).map(AlgoName)
    }
}

impl fmt::Display for AlgoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.name())
    }
}

/// How backends are reached (`Forward::from_name`): a `FromStr` for the
/// CLI, API and config file, with the same error everywhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardName(pub lb_common::Forward);

impl FromStr for ForwardName {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        lb_common::Forward::from_name(s).map(ForwardName).ok_or_else(|| {
            let names: Vec<&str> = lb_common::Forward::ALL.iter().map(|f| f.name()).collect();
            anyhow!("unknown forwarding mode '{s}' (available: {})", names.join(", "))
        })
    }
}

impl fmt::Display for ForwardName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.name())
    }
}

/// Check a backend address for a VIP reached by `forward`: the same family
/// for L2; either family when routed (the backend's decides the outer header).
pub fn check_backend_ip_for(vip: &Vip, ip: IpAddr, forward: lb_common::Forward) -> Result<IpAddr> {
    if forward.is_routed() {
        check_unicast(ip).with_context(|| format!("invalid backend IP '{ip}'"))?;
        return Ok(ip);
    }
    check_backend_ip(vip, ip)
}

/// Largest backend weight accepted.
pub const MAX_WEIGHT: u32 = 10_000;
/// Weight of a backend added without `--weight`.
pub const DEFAULT_WEIGHT: u32 = 1;

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
/// `--answer-ping`, `--quic` (CLI), the same keys in the API and the config file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipOpts {
    /// What Maglev hashes.
    pub hash: HashMode,
    /// Echo requests to the VIP's address are answered by the datapath.
    pub answer_ping: bool,
    /// QUIC: packets whose connection ID carries a backend's server ID go
    /// to that backend (UDP VIPs; `crate::quic`).
    pub quic: bool,
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
        if self.quic {
            f |= lb_common::VIP_F_QUIC;
        }
        f
    }

    /// Check the options against the VIP and its algorithm.
    pub fn validate(&self, vip: &Vip, algo: lb_common::Algo) -> Result<()> {
        if self.hash == HashMode::DstPort && algo != lb_common::Algo::Maglev {
            bail!("--hash dst-port needs the maglev algorithm (not {})", algo.name());
        }
        crate::quic::check_vip(vip, self)
    }

    /// Options from the optional fields of a request or config entry.
    pub fn from_fields(hash: Option<HashMode>, answer_ping: Option<bool>, quic: Option<bool>) -> VipOpts {
        VipOpts { hash: hash.unwrap_or_default(), answer_ping: answer_ping.unwrap_or(false), quic: quic.unwrap_or(false) }
    }
}

/// Reject addresses that cannot be a service or backend.
pub fn check_unicast(ip: IpAddr) -> Result<()> {
    let bad = match ip {
        IpAddr::V4(a) => a.is_unspecified() || a.is_multicast() || a.is_broadcast(),
        IpAddr::V6(a) => a.is_unspecified() || a.is_multicast(),
    };
    if bad {
        bail!("{ip} is not a unicast address");
    }
    Ok(())
}

/// Parse a backend address for a VIP (same family, unicast).
pub fn parse_backend_ip(vip: &Vip, s: &str) -> Result<IpAddr> {
    let ip: IpAddr = s.parse().map_err(|_| anyhow!("invalid backend IP '{s}'"))?;
    check_backend_ip(vip, ip)
}

/// A MAC address, `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // By hand: the state file writes one per backend on every save.
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [b':'; 17];
        for (i, b) in self.0.iter().enumerate() {
            out[i * 3] = HEX[(b >> 4) as usize];
            out[i * 3 + 1] = HEX[(b & 15) as usize];
        }
        f.write_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?)
    }
}

impl FromStr for Mac {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || anyhow!("invalid MAC '{s}': expected six hex bytes like 02:00:00:00:00:01");
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for b in out.iter_mut() {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if out == [0; 6] || out[0] & 1 == 1 {
            bail!("invalid MAC '{s}': not a unicast station address");
        }
        Ok(Mac(out))
    }
}

/// A scheduling algorithm as operators name it (`Algo::from_name`, with
/// the error every front end shows).
pub fn parse_algo(s: &str) -> Result<lb_common::Algo> {
    lb_common::Algo::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = lb_common::Algo::ALL.iter().map(|a| a.name()).collect();
        anyhow!("unknown algorithm '{s}' (available: {})", names.join(", "))
    })
}

/// Longest slow start accepted, milliseconds.
pub const MAX_SLOW_START_MS: u64 = 3_600_000;

/// Check a slow-start time.
pub fn check_slow_start(ms: u64) -> Result<u64> {
    if ms > MAX_SLOW_START_MS {
        bail!("slow start {ms} ms is over an hour");
    }
    Ok(ms)
}

/// Check a backend address for a VIP (same family, unicast).
pub fn check_backend_ip(vip: &Vip, ip: IpAddr) -> Result<IpAddr> {
    check_unicast(ip).with_context(|| format!("invalid backend IP '{ip}'"))?;
    if ip.is_ipv4() != vip.addr.is_ipv4() {
        bail!("backend {ip} and VIP {vip} are of different address families");
    }
    Ok(ip)
}

/// Check a weight given by an operator.
pub fn check_weight(w: u32) -> Result<u32> {
    if w > MAX_WEIGHT {
        bail!("invalid weight {w}: must be 0..={MAX_WEIGHT} (0 = no new flows)");
    }
    Ok(w)
}

/// How backends are health-checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connect to the backend (TCP VIPs; on a UDP VIP it means `none`).
    #[default]
    Tcp,
    /// An HTTP GET of `http_path`; the status must be in `http_status`.
    Http,
    /// A UDP datagram (`udp_payload`); any reply, or one containing `udp_expect`.
    Udp,
    /// No checks: every backend is up.
    None,
}

impl CheckKind {
    /// Name as in the config file.
    pub fn name(self) -> &'static str {
        match self {
            CheckKind::Tcp => "tcp",
            CheckKind::Http => "http",
            CheckKind::Udp => "udp",
            CheckKind::None => "none",
        }
    }
}

impl FromStr for CheckKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tcp" => Ok(CheckKind::Tcp),
            "http" => Ok(CheckKind::Http),
            "udp" => Ok(CheckKind::Udp),
            "none" => Ok(CheckKind::None),
            other => bail!("unknown check '{other}' (tcp, http, udp, none)"),
        }
    }
}

/// Health checking, in HAProxy's terms: `inter`, `fastinter`, `timeout
/// check`, `rise`, `fall`, plus the check itself. Set for the agent, per VIP,
/// or per backend (the most specific wins, whole).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Check type.
    pub kind: CheckKind,
    /// Time between checks of one backend, milliseconds.
    pub interval_ms: u64,
    /// Time between checks while a backend is changing state (some checks
    /// passed while down, or failed while up), milliseconds.
    pub fast_interval_ms: u64,
    /// Each interval is randomly lengthened or shortened by up to this
    /// percentage, so checks do not synchronise.
    pub jitter_pct: u32,
    /// Time a check may take, milliseconds.
    pub timeout_ms: u64,
    /// Consecutive successes that bring a down backend up.
    pub rise: u32,
    /// Consecutive failures that take an up backend down.
    pub fall: u32,
    /// Port to check (default: the VIP's port).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// HTTP: path to GET.
    pub http_path: String,
    /// HTTP: Host header (default: the backend's address).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_host: Option<String>,
    /// HTTP: accepted status codes, `LOW-HIGH` or one code.
    pub http_status: String,
    /// UDP: payload to send.
    pub udp_payload: String,
    /// UDP: text the reply must contain (any reply when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp_expect: Option<String>,
    /// Agent check (HAProxy's agent-check): a TCP port on the backend that
    /// answers a line such as `75%`, `up`, `drain`, `down` or `maint`
    /// (several words allowed, e.g. `up 50%`); applied at every check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_port: Option<u16>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            kind: CheckKind::Tcp,
            interval_ms: 300,
            fast_interval_ms: 100,
            jitter_pct: 10,
            timeout_ms: 250,
            rise: 2,
            fall: 3,
            port: None,
            http_path: "/".into(),
            http_host: None,
            http_status: "200-399".into(),
            udp_payload: "xlb-health".into(),
            udp_expect: None,
            agent_port: None,
        }
    }
}

impl HealthConfig {
    /// Reject settings that cannot work.
    pub fn validate(&self) -> Result<()> {
        if !(10..=600_000).contains(&self.interval_ms) || !(10..=600_000).contains(&self.fast_interval_ms) {
            bail!("health interval_ms/fast_interval_ms must be 10..=600000");
        }
        if self.timeout_ms == 0 || self.timeout_ms > self.interval_ms.max(1000) * 10 {
            bail!("health timeout_ms {} out of range", self.timeout_ms);
        }
        if !(1..=100).contains(&self.rise) || !(1..=100).contains(&self.fall) {
            bail!("health rise/fall must be 1..=100");
        }
        if self.jitter_pct > 50 {
            bail!("health jitter_pct {} is over 50", self.jitter_pct);
        }
        if self.port == Some(0) || self.agent_port == Some(0) {
            bail!("health port 0");
        }
        if !self.http_path.starts_with('/') || self.http_path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            bail!("health http_path '{}' must start with / and have no spaces", self.http_path);
        }
        if let Some(h) = &self.http_host {
            if h.is_empty() || h.chars().any(|c| c.is_whitespace() || c.is_control()) {
                bail!("health http_host '{h}' is not a host name");
            }
        }
        self.status_range()?;
        if self.udp_payload.is_empty() || self.udp_payload.len() > 1400 {
            bail!("health udp_payload must be 1..=1400 bytes");
        }
        Ok(())
    }

    /// The accepted HTTP status codes.
    pub fn status_range(&self) -> Result<(u16, u16)> {
        let bad = || anyhow!("health http_status '{}' is not CODE or LOW-HIGH (100..=599)", self.http_status);
        let (lo, hi) = match self.http_status.split_once('-') {
            Some((a, b)) => (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?),
            None => {
                let c: u16 = self.http_status.trim().parse().map_err(|_| bad())?;
                (c, c)
            }
        };
        if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
            return Err(bad());
        }
        Ok((lo, hi))
    }
}

/// What a VIP does when every backend is down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AllDown {
    /// Drop its packets (counted as `drop_no_backend`).
    #[default]
    Drop,
    /// Keep balancing over all backends whose MAC is known, as if up (a
    /// broken health check must not take the service down).
    FailOpen,
}

impl fmt::Display for AllDown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AllDown::Drop => "drop",
            AllDown::FailOpen => "fail-open",
        })
    }
}

impl FromStr for AllDown {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "drop" => Ok(AllDown::Drop),
            "fail-open" => Ok(AllDown::FailOpen),
            other => bail!("unknown all-down behaviour '{other}' (drop, fail-open)"),
        }
    }
}

/// An operator's state for a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Admin {
    /// In service.
    #[default]
    Ready,
    /// Keeps its flows, gets no new ones.
    Drain,
    /// Out of service: no traffic, its flows move, no health checks.
    Maint,
}

impl fmt::Display for Admin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Admin::Ready => "up",
            Admin::Drain => "drain",
            Admin::Maint => "maint",
        })
    }
}

impl FromStr for Admin {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "up" | "ready" => Ok(Admin::Ready),
            "drain" => Ok(Admin::Drain),
            "maint" => Ok(Admin::Maint),
            other => bail!("unknown backend state '{other}' (up, drain, maint)"),
        }
    }
}

/// A backend in the config file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Backend IP address.
    pub ip: String,
    /// MAC; resolved from the neighbour table when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Weight (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Health checking of this backend (replaces the VIP's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthConfig>,
    /// Operator's state: up (default), drain or maint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<Admin>,
    /// How to reach it, replacing the VIP's `forward`: l2, ipip or gue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward: Option<String>,
    /// QUIC server ID (1..=65535, unique in the VIP; `--quic` VIPs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_id: Option<crate::quic::ServerId>,
}

/// A VIP in the config file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipConfig {
    /// `ADDR:PORT/PROTO`.
    pub address: String,
    /// Scheduling algorithm (default `maglev`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algo: Option<String>,
    /// Source-hash persistence in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persist_timeout: Option<u32>,
    /// Health checking of this VIP's backends (replaces the agent's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthConfig>,
    /// `drop` (default) or `fail-open` when every backend is down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all_down: Option<AllDown>,
    /// Slow start: milliseconds over which a backend that comes up ramps to
    /// its full weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start_ms: Option<u64>,
    /// `5-tuple` (default) or `dst-port`.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "text::opt")]
    pub hash: Option<HashMode>,
    /// Answer pings to the VIP's address (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_ping: Option<bool>,
    /// How its backends are reached (default `l2`): l2, ipip or gue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward: Option<String>,
    /// QUIC connection-ID routing (default false; UDP VIPs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quic: Option<bool>,
    /// Backends.
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendConfig>,
}

/// The agent's config file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Health-check settings.
    #[serde(default)]
    pub health: HealthConfig,
    /// Virtual services.
    #[serde(default, rename = "vip")]
    pub vips: Vec<VipConfig>,
    /// Connection-table sync with other balancers (read at start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncConfig>,
}

/// The config file's `[sync]`: what `--sync-peer`, `--sync-key` and
/// `--sync-listen` say (the flags win when given).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// Peers, `ADDR` or `ADDR:PORT`.
    pub peers: Vec<String>,
    /// File with the shared key.
    pub key_file: String,
    /// Where to receive, `ADDR:PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
}

/// A backend as configured, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredBackend {
    /// Address.
    pub ip: IpAddr,
    /// MAC, if given.
    pub mac: Option<Mac>,
    /// Weight.
    pub weight: u32,
    /// Own health settings, if any.
    pub health: Option<HealthConfig>,
    /// Operator's state.
    pub state: Admin,
    /// Forwarding mode replacing the VIP's, if any.
    pub forward: Option<lb_common::Forward>,
    /// QUIC server ID, if any.
    pub server_id: Option<crate::quic::ServerId>,
}

/// A service as configured, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredVip {
    /// The service.
    pub vip: Vip,
    /// Algorithm.
    pub algo: lb_common::Algo,
    /// Source-hash persistence, seconds.
    pub persist: u16,
    /// Its own health settings, if any.
    pub health: Option<HealthConfig>,
    /// All-down behaviour.
    pub all_down: AllDown,
    /// Slow start, milliseconds.
    pub slow_start_ms: u64,
    /// Datapath options.
    pub opts: VipOpts,
    /// Forwarding mode of its backends.
    pub forward: lb_common::Forward,
    /// Backends.
    pub backends: Vec<DesiredBackend>,
}

/// A whole config file, validated: what the agent should run.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Desired {
    /// Agent-wide health settings.
    pub health: HealthConfig,
    /// Services.
    pub vips: Vec<DesiredVip>,
    /// Connection-table sync, if configured.
    pub sync: Option<crate::ctsync::SyncSettings>,
}

/// 1-based number of the `nth` (0-based) line containing `needle`, or of the
/// first one.
fn line_of(text: &str, needle: &str, nth: usize) -> usize {
    let hits: Vec<usize> = text.lines().enumerate().filter(|(_, l)| l.contains(needle)).map(|(i, _)| i + 1).collect();
    hits.get(nth).or(hits.first()).copied().unwrap_or(0)
}

/// The line of `key = …` inside the entry that starts at line `from`
/// (1-based; up to the next `[` header), or `from` itself.
fn key_line(text: &str, from: usize, key: &str) -> usize {
    text.lines()
        .enumerate()
        .skip(from)
        .take_while(|(_, l)| !l.trim_start().starts_with('['))
        .find(|(_, l)| l.trim_start().strip_prefix(key).is_some_and(|r| r.trim_start().starts_with('=')))
        .map(|(i, _)| i + 1)
        .unwrap_or(from)
}

impl Desired {
    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Desired> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
        Desired::parse(&text, &path.display().to_string())
    }

    /// Validate a config text completely; errors name the line
    /// (`config ORIGIN line N: …`). Lines are looked up only for an error:
    /// searching the text for every entry would make a file of thousands
    /// of backends take seconds.
    pub fn parse(text: &str, origin: &str) -> Result<Desired> {
        let cfg: FileConfig = toml::from_str(text).map_err(|e| {
            let msg = e.to_string().replace('\n', " ");
            let line = e.span().map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            match line {
                Some(l) => anyhow!("config {origin} line {l}: {msg}"),
                None => anyhow!("config {origin}: {msg}"),
            }
        })?;
        cfg.health.validate().map_err(|e| anyhow!("config {origin} line {}: [health]: {e}", line_of(text, "[health]", 0)))?;
        let mut vips = Vec::new();
        let mut seen: std::collections::HashMap<String, usize> = Default::default();
        let mut unique = std::collections::HashSet::new();
        for v in &cfg.vips {
            let n = seen.entry(v.address.clone()).or_default();
            let nth = *n;
            *n += 1;
            let vline = || line_of(text, &format!("\"{}\"", v.address), nth);
            let at = |line: usize, e: anyhow::Error| anyhow!("config {origin} line {line}: vip {}: {e:#}", v.address);
            let vip: Vip = v.address.parse().map_err(|e| at(vline(), e))?;
            if !unique.insert(vip) {
                return Err(at(vline(), anyhow!("duplicate VIP")));
            }
            let algo = parse_algo(v.algo.as_deref().unwrap_or("maglev")).map_err(|e| at(key_line(text, vline(), "algo"), e))?;
            let persist = crate::agent::check_persist(algo, v.persist_timeout.unwrap_or(0))
                .map_err(|e| at(key_line(text, vline(), "persist_timeout"), e))?;
            if let Some(h) = &v.health {
                h.validate().map_err(|e| at(line_of(text, "[vip.health]", vips.len()).max(vline()), e))?;
            }
            let slow_start_ms = v.slow_start_ms.unwrap_or(0);
            check_slow_start(slow_start_ms).map_err(|e| at(key_line(text, vline(), "slow_start_ms"), e))?;
            crate::agent::check_any_port_health(&vip, v.health.as_ref().unwrap_or(&cfg.health)).map_err(|e| at(vline(), e))?;
            let opts = VipOpts::from_fields(v.hash, v.answer_ping, v.quic);
            let opts_key = if opts.quic && vip.proto != Proto::Udp { "quic" } else { "hash" };
            opts.validate(&vip, algo).map_err(|e| at(key_line(text, vline(), opts_key), e))?;
            let forward = v
                .forward
                .as_deref()
                .map(str::parse::<ForwardName>)
                .transpose()
                .map_err(|e| at(key_line(text, vline(), "forward"), e))?
                .map_or(lb_common::Forward::L2, |f| f.0);
            let mut backends: Vec<DesiredBackend> = Vec::new();
            let mut seen_ips = std::collections::HashSet::new();
            for b in &v.backends {
                let bat = |key: &str, e: anyhow::Error| {
                    let bline = line_of(text, &format!("\"{}\"", b.ip), 0);
                    let line = if key.is_empty() { bline } else { key_line(text, bline, key) };
                    anyhow!("config {origin} line {line}: vip {} backend {}: {e:#}", v.address, b.ip)
                };
                let bforward = b
                    .forward
                    .as_deref()
                    .map(str::parse::<ForwardName>)
                    .transpose()
                    .map_err(|e| bat("forward", e))?
                    .map(|f| f.0);
                let ip: IpAddr = b.ip.parse().map_err(|_| bat("", anyhow!("invalid backend IP '{}'", b.ip)))?;
                let ip = check_backend_ip_for(&vip, ip, bforward.unwrap_or(forward)).map_err(|e| bat("", e))?;
                if !seen_ips.insert(ip) {
                    return Err(bat("", anyhow!("duplicate backend")));
                }
                let mac = b.mac.as_deref().map(str::parse::<Mac>).transpose().map_err(|e| bat("mac", e))?;
                let weight = check_weight(b.weight.unwrap_or(DEFAULT_WEIGHT)).map_err(|e| bat("weight", e))?;
                if let Some(h) = &b.health {
                    h.validate().map_err(|e| bat("", e))?;
                }
                backends.push(DesiredBackend {
                    ip,
                    mac,
                    weight,
                    health: b.health.clone(),
                    state: b.state.unwrap_or_default(),
                    forward: bforward,
                    server_id: b.server_id,
                });
            }
            crate::quic::check_server_ids(&vip, opts.quic, backends.iter().map(|b| (b.ip, b.server_id)))
                .map_err(|e| at(key_line(text, vline(), "quic"), e))?;
            vips.push(DesiredVip {
                vip,
                algo,
                persist,
                health: v.health.clone(),
                all_down: v.all_down.unwrap_or_default(),
                slow_start_ms,
                opts,
                forward,
                backends,
            });
        }
        let sync = match &cfg.sync {
            None => None,
            Some(c) => {
                let at = |e: anyhow::Error| anyhow!("config {origin} line {}: [sync]: {e:#}", line_of(text, "[sync]", 0));
                let peers = c.peers.iter().map(|p| p.parse()).collect::<Result<Vec<crate::ctsync::SyncPeer>>>().map_err(at)?;
                let listen = c
                    .listen
                    .as_deref()
                    .map(|l| l.parse::<std::net::SocketAddr>().map_err(|_| anyhow!("invalid listen address '{l}': expected ADDR:PORT")))
                    .transpose()
                    .map_err(at)?;
                let s = crate::ctsync::SyncSettings { peers, key_file: c.key_file.clone().into(), listen };
                s.validate().map_err(at)?;
                Some(s)
            }
        };
        Ok(Desired { health: cfg.health, vips, sync })
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

    #[test]
    fn mac_syntax() {
        let m: Mac = "02:00:00:aa:bb:0c".parse().expect("valid");
        assert_eq!(m.to_string(), "02:00:00:aa:bb:0c");
        for bad in ["02:00:00:aa:bb", "02:00:00:aa:bb:0c:0d", "zz:00:00:00:00:01", "01:00:5e:00:00:01", "00:00:00:00:00:00", "2:0:0:0:0:1"] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
    }

    #[test]
    fn backend_family_must_match() {
        let v: Vip = "10.0.0.100:80/tcp".parse().expect("valid");
        assert!(parse_backend_ip(&v, "10.0.0.11").is_ok());
        assert!(parse_backend_ip(&v, "2001:db8::1").is_err());
        assert!(parse_backend_ip(&v, "banana").is_err());
        assert!(check_weight(MAX_WEIGHT + 1).is_err());
    }

    #[test]
    fn health_settings() {
        let h = HealthConfig { http_status: "200-299".into(), ..Default::default() };
        assert_eq!(h.status_range().expect("valid"), (200, 299));
        assert_eq!(HealthConfig { http_status: "204".into(), ..Default::default() }.status_range().expect("valid"), (204, 204));
        for bad in ["99", "300-200", "abc", "200-700"] {
            assert!(HealthConfig { http_status: bad.into(), ..Default::default() }.validate().is_err(), "{bad}");
        }
        assert!(HealthConfig { http_path: "health".into(), ..Default::default() }.validate().is_err());
        assert!(HealthConfig { jitter_pct: 80, ..Default::default() }.validate().is_err());
        assert_eq!("http".parse::<CheckKind>().expect("kind"), CheckKind::Http);
        assert!("icmp".parse::<CheckKind>().is_err());
        assert_eq!("fail-open".parse::<AllDown>().expect("mode"), AllDown::FailOpen);
        let c: FileConfig = toml::from_str("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\nall_down = \"fail-open\"\n[vip.health]\nkind = \"http\"\nhttp_path = \"/health\"\n").expect("valid");
        assert_eq!(c.vips[0].health.as_ref().map(|h| h.kind), Some(CheckKind::Http));
        assert_eq!(c.vips[0].all_down, Some(AllDown::FailOpen));
    }

    #[test]
    fn config_errors_name_the_line() {
        let text = "[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n\n[[vip.backend]]\nip = \"10.0.0.2\"\n[[vip.backend]]\nip = \"10.0.0.3\"\nmac = \"zz\"\n";
        let e = Desired::parse(text, "t.toml").expect_err("bad MAC").to_string();
        assert!(e.starts_with("config t.toml line 8: ") && e.contains("invalid MAC"), "{e}");
        let e = Desired::parse("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n", "t").expect_err("dup").to_string();
        assert!(e.contains("line 4") && e.contains("duplicate VIP"), "{e}");
        let e = Desired::parse("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\nweight = 3\n", "t").expect_err("unknown key").to_string();
        assert!(e.contains("line 3"), "{e}");
        let d = Desired::parse(text.replace("mac = \"zz\"\n", "state = \"drain\"\n").as_str(), "t").expect("valid");
        assert_eq!(d.vips[0].backends[1].state, Admin::Drain);
    }

    #[test]
    fn sync_section() {
        let base = "[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n";
        let d = Desired::parse(&format!("{base}[sync]\npeers = [\"10.0.0.2\", \"10.0.0.3:9000\"]\nkey_file = \"/etc/xlb/sync.key\"\n"), "t").expect("valid");
        let s = d.sync.expect("sync");
        assert_eq!(s.peers.iter().map(|p| p.to_string()).collect::<Vec<_>>(), ["10.0.0.2:7470", "10.0.0.3:9000"]);
        assert_eq!(s.key_file, std::path::PathBuf::from("/etc/xlb/sync.key"));
        let e = Desired::parse(&format!("{base}\n[sync]\npeers = [\"nope\"]\nkey_file = \"k\"\n"), "t").expect_err("bad peer").to_string();
        assert!(e.starts_with("config t line 4: [sync]: invalid sync peer 'nope'"), "{e}");
        let e = Desired::parse(&format!("{base}[sync]\npeers = []\nkey_file = \"k\"\n"), "t").expect_err("no peer").to_string();
        assert!(e.contains("at least one peer"), "{e}");
        assert!(Desired::parse(&format!("{base}[sync]\npeers = [\"10.0.0.2\"]\n"), "t").is_err(), "key_file is required");
        assert!(Desired::parse(base, "t").expect("valid").sync.is_none());
    }

    #[test]
    fn config_file_rejects_unknown_keys() {
        let good = "[health]\ninterval_ms = 100\n[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n[[vip.backend]]\nip = \"10.0.0.2\"\n";
        let c: FileConfig = toml::from_str(good).expect("valid");
        assert_eq!(c.vips[0].backends[0].ip, "10.0.0.2");
        assert_eq!(c.health.interval_ms, 100);
        assert_eq!(c.health.fall, HealthConfig::default().fall);
        assert!(toml::from_str::<FileConfig>("[[vip]]\naddres = \"x\"\n").is_err());
    }
}
