//! QUIC connection-ID routing, control-plane side: a backend's server ID
//! (`--server-id N`, `server_id = N`), the agent's short-header DCID
//! length (`--quic-cid-len`), and every rule about them, checked here only
//! (CLI, API, config file and state file all come through these).
//! The encoding itself is `lb_common::quic`.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::{collections::BTreeMap, fmt, net::IpAddr, str::FromStr};

use crate::config::{Proto, Vip, VipOpts};

/// A backend's QUIC server ID: 1..=65535 (two octets after the connection
/// ID's first, `lb_common::quic::SERVER_ID_LEN`; 0 means "no server" in
/// the draft and is never assigned), unique within its VIP. A number in
/// JSON and TOML.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct ServerId(pub u16);

impl ServerId {
    /// The one range check.
    pub fn new(n: u32) -> Result<ServerId> {
        match u16::try_from(n) {
            Ok(0) => bail!("invalid server ID 0: 0 means no server (use 1..=65535)"),
            Ok(v) => Ok(ServerId(v)),
            Err(_) => bail!("invalid server ID {n}: expected 1..=65535"),
        }
    }
}

impl TryFrom<u32> for ServerId {
    type Error = anyhow::Error;
    fn try_from(n: u32) -> Result<Self> {
        ServerId::new(n)
    }
}

impl From<ServerId> for u32 {
    fn from(s: ServerId) -> u32 {
        s.0 as u32
    }
}

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for ServerId {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.parse::<u32>() {
            Ok(n) => ServerId::new(n),
            Err(_) => bail!("invalid server ID '{s}': expected 1..=65535"),
        }
    }
}

/// The short-header DCID length the agent's servers issue
/// (`xlb agent --quic-cid-len N`): 3..=20 (a first octet and a server ID
/// at least; QUIC's longest connection ID).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CidLen(pub u8);

impl Default for CidLen {
    fn default() -> Self {
        CidLen(lb_common::quic::DEFAULT_CID_LEN)
    }
}

impl fmt::Display for CidLen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for CidLen {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        use lb_common::quic::{MAX_CID_LEN, MIN_CID_LEN};
        match s.parse::<u8>() {
            Ok(n) if (MIN_CID_LEN..=MAX_CID_LEN).contains(&n) => Ok(CidLen(n)),
            _ => bail!("invalid QUIC connection ID length '{s}': expected {MIN_CID_LEN}..={MAX_CID_LEN}"),
        }
    }
}

/// `--quic` is for UDP VIPs only.
pub fn check_vip(vip: &Vip, opts: &VipOpts) -> Result<()> {
    if opts.quic && vip.proto != Proto::Udp {
        bail!("--quic needs a UDP VIP ({vip} is not)");
    }
    Ok(())
}

/// A VIP's server IDs, as they would be after a change: only a `--quic`
/// VIP's backends have one, and no two the same. Returns server ID →
/// backend address.
pub fn check_server_ids(vip: &Vip, quic: bool, ids: impl IntoIterator<Item = (IpAddr, Option<ServerId>)>) -> Result<BTreeMap<ServerId, IpAddr>> {
    let mut seen = BTreeMap::new();
    for (ip, id) in ids {
        let Some(id) = id else { continue };
        if !quic {
            bail!("backend {ip}: a server ID needs a --quic VIP ({vip} is not)");
        }
        if let Some(other) = seen.insert(id, ip) {
            bail!("server ID {id} is both {other}'s and {ip}'s in VIP {vip}");
        }
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_ids_and_rules() {
        assert_eq!("7".parse::<ServerId>().expect("7"), ServerId(7));
        assert_eq!(ServerId(65535).to_string(), "65535");
        for bad in ["0", "65536", "-1", "x", ""] {
            assert!(bad.parse::<ServerId>().is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<ServerId>("0").is_err());
        assert_eq!(serde_json::to_string(&ServerId(9)).expect("json"), "9");
        assert!("2".parse::<CidLen>().is_err() && "21".parse::<CidLen>().is_err());
        assert_eq!("20".parse::<CidLen>().expect("20"), CidLen(20));
        let udp: Vip = "10.0.0.1:443/udp".parse().expect("vip");
        let tcp: Vip = "10.0.0.1:443/tcp".parse().expect("vip");
        let quic = VipOpts { quic: true, ..Default::default() };
        assert!(check_vip(&udp, &quic).is_ok());
        assert!(check_vip(&tcp, &quic).unwrap_err().to_string().contains("UDP"));
        let a: IpAddr = "10.0.1.1".parse().expect("ip");
        let b: IpAddr = "10.0.1.2".parse().expect("ip");
        assert_eq!(check_server_ids(&udp, true, [(a, Some(ServerId(1))), (b, None)]).expect("ok").len(), 1);
        assert!(check_server_ids(&udp, true, [(a, Some(ServerId(1))), (b, Some(ServerId(1)))]).is_err());
        assert!(check_server_ids(&udp, false, [(a, Some(ServerId(1)))]).is_err());
        assert!(check_server_ids(&udp, false, [(a, None)]).is_ok());
    }
}
