//! Scheduling algorithms as the map layouts store them (`VipInfo::algo`),
//! with their one spelling (`name`, `from_name`).

/// Scheduling algorithm of a VIP, as stored in `VipInfo::algo`. It picks
/// the backend of a *new* flow; the connection table keeps it there.
///
/// What the VIP's ring slot holds depends on the algorithm: a weighted Maglev
/// table (`Maglev`, `Random`, `SourceHash`) or a sequence of backend ids
/// (`RoundRobin`, `WeightedRoundRobin`, `LeastConn`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Algo {
    /// Weighted Maglev consistent hashing over the 5-tuple (the default).
    Maglev = 0,
    /// Rotation; a backend of weight w takes w consecutive turns per cycle.
    RoundRobin = 1,
    /// Smooth weighted rotation (turns interleaved, as nginx does).
    WeightedRoundRobin = 2,
    /// Uniform random index into the weighted Maglev table.
    Random = 3,
    /// Maglev over the client address only (optionally with persistence).
    SourceHash = 4,
    /// Fewest active flows relative to weight.
    LeastConn = 5,
}

impl core::fmt::Display for Algo {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

impl Algo {
    /// Every algorithm.
    pub const ALL: [Algo; 6] = [
        Algo::Maglev,
        Algo::RoundRobin,
        Algo::WeightedRoundRobin,
        Algo::Random,
        Algo::SourceHash,
        Algo::LeastConn,
    ];

    /// Decode a stored algorithm byte.
    pub const fn from_u8(v: u8) -> Option<Algo> {
        match v {
            0 => Some(Algo::Maglev),
            1 => Some(Algo::RoundRobin),
            2 => Some(Algo::WeightedRoundRobin),
            3 => Some(Algo::Random),
            4 => Some(Algo::SourceHash),
            5 => Some(Algo::LeastConn),
            _ => None,
        }
    }

    /// Whether the ring holds a Maglev table (else a sequence of ids).
    pub const fn uses_maglev_table(self) -> bool {
        matches!(self, Algo::Maglev | Algo::Random | Algo::SourceHash)
    }

    /// Whether the choice for a given flow is a pure function of the flow
    /// and the table (so it can be recomputed, e.g. for ICMP errors).
    pub const fn is_hash(self) -> bool {
        matches!(self, Algo::Maglev | Algo::SourceHash)
    }

    /// The algorithm an operator names (`name`'s inverse), if any.
    pub fn from_name(s: &str) -> Option<Algo> {
        let mut i = 0;
        while i < Algo::ALL.len() {
            if Algo::ALL[i].name().as_bytes() == s.as_bytes() {
                return Some(Algo::ALL[i]);
            }
            i += 1;
        }
        None
    }

    /// Name used on the command line, in config and state files and in status.
    pub const fn name(self) -> &'static str {
        match self {
            Algo::Maglev => "maglev",
            Algo::RoundRobin => "rr",
            Algo::WeightedRoundRobin => "wrr",
            Algo::Random => "random",
            Algo::SourceHash => "source-hash",
            Algo::LeastConn => "least-conn",
        }
    }
}

/// Most backends a least-conn VIP may have (the datapath scans them all).
pub const MAX_LEAST_CONN_BACKENDS: u32 = 256;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algo_names_round_trip() {
        for a in Algo::ALL {
            assert_eq!(Algo::from_name(a.name()), Some(a));
        }
        assert_eq!(Algo::from_name("Maglev"), None);
        assert_eq!(Algo::from_name(""), None);
    }
}
