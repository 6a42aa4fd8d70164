//! The words operators write for a VIP's and a backend's settings:
//! algorithm, forwarding mode, MAC, all-down behaviour, operator state. One
//! `FromStr`/`Display` each, used by the CLI, the API, the config file and
//! the state file alike.

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use std::{fmt, str::FromStr};

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

/// In files (the state file) a MAC is its `Display` form, read back with
/// `FromStr`: one spelling everywhere.
impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Mac, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_syntax() {
        let m: Mac = "02:00:00:aa:bb:0c".parse().expect("valid");
        assert_eq!(m.to_string(), "02:00:00:aa:bb:0c");
        for bad in ["02:00:00:aa:bb", "02:00:00:aa:bb:0c:0d", "zz:00:00:00:00:01", "01:00:5e:00:00:01", "00:00:00:00:00:00", "2:0:0:0:0:1"] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
    }
}
