//! What each algorithm's table holds, built from a VIP's usable backends.
//!
//! - `maglev`, `random`, `source-hash`: a weighted Maglev table of
//!   `ring_size` entries (`maglev` module).
//! - `rr`: each backend's id `weight` times in a row, backends in address order.
//! - `wrr`: the same multiset interleaved as evenly as possible (stride
//!   scheduling: the backend whose next turn is earliest goes next), so a
//!   backend of weight 3 among weights 3,1 gets turns 1, 2 and 4 of every 4.
//! - `least-conn`: every backend's id once (the datapath compares their
//!   active flows relative to weight).
//!
//! Sequences longer than the ring size (`ring_size`) get their weights scaled
//! down proportionally (each at least 1).

use anyhow::{bail, Result};
use lb_common::{Algo, MAX_LEAST_CONN_BACKENDS};

use crate::maglev;

/// A usable backend as the table builder sees it.
pub struct Member<'a> {
    /// Stable identity (address bytes).
    pub key: &'a [u8],
    /// Weight (> 0).
    pub weight: u32,
    /// Datapath id.
    pub id: u32,
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Weights reduced by their common divisor and scaled to fit `cap` turns.
fn turns(members: &[Member<'_>], cap: u32) -> Vec<u64> {
    let g = members.iter().fold(0u64, |g, m| gcd(g, m.weight as u64)).max(1);
    let mut w: Vec<u64> = members.iter().map(|m| m.weight as u64 / g).collect();
    let total: u64 = w.iter().sum();
    if total > cap as u64 {
        w = w.iter().map(|x| (x * cap as u64 / total).max(1)).collect();
    }
    w
}

/// What a Maglev layout depends on: ring size, members' keys and weights.
type LayoutKey = (u32, Vec<(Vec<u8>, u32)>);

/// Maglev tables by (ring size, members' keys and weights), as indexes
/// into the members: VIPs that share their backends (and weights) share the
/// table's layout, so it is computed once, not once per VIP (1.6–2 ms each).
/// Indexes are kept in a byte each up to 256 members (a quarter of the
/// memory), so the budget holds 256 layouts of the default ring size: a
/// VIP built up one backend at a time passes through as many layouts as it
/// gets backends, and the next VIP with the same hosts finds them all.
#[derive(Debug, Default)]
pub struct MaglevCache {
    tables: std::collections::HashMap<LayoutKey, std::sync::Arc<Layout>>,
    /// Bytes the cached tables hold.
    bytes: usize,
    /// Tables computed (cache misses).
    pub built: u64,
    /// A replaced VIP table's buffer, filled by the next Maglev table
    /// (`recycle`): a fresh 256 KiB allocation per publication was fresh
    /// pages each time (faults and zeroing were half of a publication's
    /// time in a 512-VIP burst).
    spare: Vec<u32>,
}

/// Bytes of cached tables at most (64 tables of the default ring size as
/// u32 indexes; 256 as byte indexes). The cache is emptied when full.
const MAGLEV_CACHE_BYTES: usize = 64 * 65537 * 4;

/// A cached Maglev table: member indexes, the members' keys (addresses) in
/// index order, and what status reads from it, computed once per layout
/// and shared by every VIP that uses it (512 VIPs on the same hosts: once).
#[derive(Debug)]
pub struct Layout {
    slots: Slots,
    keys: Vec<Vec<u8>>,
    /// Entries per member index.
    counts: std::sync::OnceLock<Vec<usize>>,
    /// `table_fingerprint` per algorithm that used this layout.
    fingerprints: std::sync::Mutex<Vec<(Algo, u64)>>,
}

/// Member indexes.
#[derive(Debug)]
enum Slots {
    /// Up to 256 members.
    Narrow(Vec<u8>),
    /// More.
    Wide(Vec<u32>),
}

impl Layout {
    fn new(t: Vec<u32>, members: &[Member<'_>]) -> Layout {
        let slots = if members.len() <= 256 { Slots::Narrow(t.into_iter().map(|i| i as u8).collect()) } else { Slots::Wide(t) };
        let keys = members.iter().map(|m| m.key.to_vec()).collect();
        Layout { slots, keys, counts: Default::default(), fingerprints: Default::default() }
    }

    fn bytes(&self) -> usize {
        match &self.slots {
            Slots::Narrow(t) => t.len(),
            Slots::Wide(t) => t.len() * 4,
        }
    }

    fn indexes(&self) -> Box<dyn Iterator<Item = usize> + '_> {
        match &self.slots {
            Slots::Narrow(t) => Box::new(t.iter().map(|&i| i as usize)),
            Slots::Wide(t) => Box::new(t.iter().map(|&i| i as usize)),
        }
    }

    /// The table as the members' ids, in `out` (emptied first).
    fn ids_into(&self, members: &[Member<'_>], out: &mut Vec<u32>) {
        out.clear();
        match &self.slots {
            Slots::Narrow(t) => out.extend(t.iter().map(|&i| members[i as usize].id)),
            Slots::Wide(t) => out.extend(t.iter().map(|&i| members[i as usize].id)),
        }
    }
}

/// A VIP's use of a shared layout: the layout and its members' ids, in
/// member order (each VIP has its own ids for the same hosts).
#[derive(Clone, Debug)]
pub struct LayoutUse {
    layout: std::sync::Arc<Layout>,
    ids: Vec<u32>,
}

impl LayoutUse {
    /// `table_fingerprint` of the VIP's table, computed once per layout
    /// and algorithm (entry i's address is `keys[layout[i]]`, the address
    /// of the id the table holds there).
    pub fn fingerprint(&self, algo: Algo) -> u64 {
        let l = &self.layout;
        let mut fps = l.fingerprints.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, f)) = fps.iter().find(|(a, _)| *a == algo) {
            return *f;
        }
        let f = table_fingerprint(algo, l.indexes().map(|i| l.keys[i].as_slice()));
        fps.push((algo, f));
        f
    }

    /// Entries per backend id.
    pub fn slots(&self) -> std::collections::BTreeMap<u32, usize> {
        let counts = self.layout.counts.get_or_init(|| {
            let mut c = vec![0usize; self.layout.keys.len()];
            for i in self.layout.indexes() {
                c[i] += 1;
            }
            c
        });
        self.ids.iter().zip(counts).filter(|(_, n)| **n > 0).map(|(id, n)| (*id, *n)).collect()
    }
}

/// A fingerprint of a table: FNV-1a (64 bit) over the algorithm's name and
/// every entry's backend *address* (ids are each node's own), so two nodes
/// with the same config and health compute the same number (HA compares
/// them; so must every version that runs beside this one).
pub fn table_fingerprint<'a>(algo: Algo, addrs: impl Iterator<Item = &'a [u8]>) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut eat = |bytes: &[u8]| {
        for &x in bytes {
            h = (h ^ x as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(algo.name().as_bytes());
    for a in addrs {
        eat(a);
    }
    h
}

impl MaglevCache {
    /// Keep `table`'s buffer for the next table built (a VIP's replaced table).
    pub fn recycle(&mut self, table: Vec<u32>) {
        if table.capacity() > self.spare.capacity() {
            self.spare = table;
        }
    }

    fn get(&mut self, members: &[Member<'_>], ring_size: u32) -> std::sync::Arc<Layout> {
        let key = (ring_size, members.iter().map(|m| (m.key.to_vec(), m.weight)).collect::<Vec<_>>());
        if let Some(t) = self.tables.get(&key) {
            return t.clone();
        }
        let entries: Vec<maglev::Entry> = members.iter().map(|m| maglev::Entry { key: m.key, weight: m.weight }).collect();
        let t = std::sync::Arc::new(Layout::new(maglev::build(&entries, ring_size).unwrap_or_default(), members));
        self.built += 1;
        if self.bytes + t.bytes() > MAGLEV_CACHE_BYTES {
            self.tables.clear();
            self.bytes = 0;
        }
        self.bytes += t.bytes();
        self.tables.insert(key, t.clone());
        t
    }
}

/// The ring contents for `algo` (empty when there is no member).
pub fn build(algo: Algo, members: &[Member<'_>], ring_size: u32) -> Result<Vec<u32>> {
    Ok(build_cached(algo, members, ring_size, &mut MaglevCache::default())?.0)
}

/// `build`, taking Maglev layouts from (and adding them to) `cache`; with
/// the shared layout the table comes from (Maglev family).
pub fn build_cached(algo: Algo, members: &[Member<'_>], ring_size: u32, cache: &mut MaglevCache) -> Result<(Vec<u32>, Option<LayoutUse>)> {
    if members.is_empty() {
        return Ok((Vec::new(), None));
    }
    let mut seq = match algo {
        Algo::Maglev | Algo::Random | Algo::SourceHash => {
            let layout = cache.get(members, ring_size);
            let mut table = std::mem::take(&mut cache.spare);
            layout.ids_into(members, &mut table);
            return Ok((table, Some(LayoutUse { layout, ids: members.iter().map(|m| m.id).collect() })));
        }
        Algo::LeastConn => {
            if members.len() > MAX_LEAST_CONN_BACKENDS as usize {
                bail!("least-conn supports at most {MAX_LEAST_CONN_BACKENDS} backends per VIP");
            }
            members.iter().map(|m| m.id).collect::<Vec<u32>>()
        }
        Algo::RoundRobin => {
            let t = turns(members, ring_size);
            members.iter().zip(&t).flat_map(|(m, &n)| std::iter::repeat_n(m.id, n as usize)).collect()
        }
        Algo::WeightedRoundRobin => {
            let t = turns(members, ring_size);
            let total: u64 = t.iter().sum();
            // Backend i's k-th turn is due at (k + 1/2) / t_i of the cycle;
            // compare (2k + 1) * total / t_i exactly in integers.
            let mut next: Vec<u64> = vec![0; members.len()];
            let mut out = Vec::with_capacity(total as usize);
            for _ in 0..total {
                let mut best = usize::MAX;
                for i in 0..members.len() {
                    if next[i] >= t[i] {
                        continue;
                    }
                    if best == usize::MAX
                        || ((2 * next[i] + 1) as u128 * t[best] as u128) < ((2 * next[best] + 1) as u128 * t[i] as u128)
                    {
                        best = i;
                    }
                }
                out.push(members[best].id);
                next[best] += 1;
            }
            out
        }
    };
    seq.truncate(ring_size as usize);
    Ok((seq, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(weights: &[u32]) -> Vec<Member<'static>> {
        const KEYS: [[u8; 4]; 4] = [[10, 0, 0, 1], [10, 0, 0, 2], [10, 0, 0, 3], [10, 0, 0, 4]];
        weights.iter().enumerate().map(|(i, &w)| Member { key: &KEYS[i], weight: w, id: 100 + i as u32 }).collect()
    }

    #[test]
    fn cached_maglev_tables_are_the_same_tables() {
        let mut cache = MaglevCache::default();
        let a = build_cached(Algo::Maglev, &members(&[1, 2, 3]), 65537, &mut cache).expect("a").0;
        assert_eq!(a, build(Algo::Maglev, &members(&[1, 2, 3]), 65537).expect("uncached"));
        // Another VIP with the same backends (other ids): computed once.
        let other: Vec<Member> = members(&[1, 2, 3]).into_iter().map(|m| Member { id: m.id + 1000, ..m }).collect();
        let b = build_cached(Algo::SourceHash, &other, 65537, &mut cache).expect("b").0;
        assert_eq!(cache.built, 1);
        assert!(a.iter().zip(&b).all(|(x, y)| x + 1000 == *y));
        // Other weights: another table.
        build_cached(Algo::Maglev, &members(&[1, 2, 4]), 65537, &mut cache).expect("c");
        assert_eq!(cache.built, 2);
    }

    #[test]
    fn a_hundred_layouts_built_twice_are_computed_once() {
        // VIPs built up one backend at a time over the same 100 hosts: the
        // second VIP's 100 layouts are the first's.
        let keys: Vec<[u8; 4]> = (0..100u32).map(|i| (0x0ac8_0000 + i).to_be_bytes()).collect();
        let mut cache = MaglevCache::default();
        let mut first = Vec::new();
        for vip in 0..2u32 {
            for n in 1..=keys.len() {
                let m: Vec<Member> = keys[..n].iter().enumerate().map(|(i, k)| Member { key: k, weight: 1, id: vip * 1000 + i as u32 }).collect();
                let t = build_cached(Algo::Maglev, &m, 65537, &mut cache).expect("table").0;
                if vip == 0 {
                    first.push(t);
                } else {
                    assert!(t.iter().zip(&first[n - 1]).all(|(b, a)| *b == a + 1000), "{n} members: the same layout");
                }
            }
        }
        assert_eq!(cache.built, 100);
        // Over 256 members, indexes no longer fit a byte: the same table as uncached.
        let many: Vec<[u8; 4]> = (0..300u32).map(|i| (0x0ac9_0000 + i).to_be_bytes()).collect();
        let m: Vec<Member> = many.iter().enumerate().map(|(i, k)| Member { key: k, weight: 1, id: 5000 + i as u32 }).collect();
        let t = build_cached(Algo::Maglev, &m, 65537, &mut cache).expect("wide").0;
        assert_eq!(t, build(Algo::Maglev, &m, 65537).expect("uncached"));
        assert!(t.iter().any(|&id| id >= 5256), "members past 256 are in the table");
    }

    #[test]
    fn fingerprints_are_fnv1a_over_the_name_and_addresses() {
        // Pinned: nodes of different versions compare these (value from an
        // independent FNV-1a 64 of b"maglev" 10.0.0.1 10.0.0.2 10.0.0.1).
        let (a, b) = ([10u8, 0, 0, 1], [10u8, 0, 0, 2]);
        assert_eq!(table_fingerprint(Algo::Maglev, [&a[..], &b[..], &a[..]].into_iter()), 0xdb9d_b97d_257d_37fb);
    }

    #[test]
    fn rr_repeats_by_weight() {
        let t = build(Algo::RoundRobin, &members(&[1, 1, 1]), 65537).expect("rr");
        assert_eq!(t, vec![100, 101, 102]);
        let t = build(Algo::RoundRobin, &members(&[2, 4, 6]), 65537).expect("rr");
        assert_eq!(t, vec![100, 101, 101, 102, 102, 102]);
    }

    #[test]
    fn wrr_interleaves() {
        let t = build(Algo::WeightedRoundRobin, &members(&[3, 1]), 65537).expect("wrr");
        assert_eq!(t, vec![100, 100, 101, 100]);
        let t = build(Algo::WeightedRoundRobin, &members(&[5, 1, 1]), 65537).expect("wrr");
        assert_eq!(t.len(), 7);
        assert_eq!(t.iter().filter(|&&x| x == 100).count(), 5);
        // No backend of weight 1 gets two turns in a row.
        assert!(t.windows(2).all(|w| !(w[0] == w[1] && w[0] != 100)));
    }

    #[test]
    fn long_sequences_scale_down() {
        let t = build(Algo::RoundRobin, &members(&[10_000, 9_999, 1]), 101).expect("rr");
        assert!(t.len() <= 101 && t.contains(&102));
    }

    #[test]
    fn least_conn_lists_each_once_and_is_bounded() {
        assert_eq!(build(Algo::LeastConn, &members(&[1, 5]), 65537).expect("lc"), vec![100, 101]);
        let keys: Vec<[u8; 4]> = (0..300u32).map(|i| i.to_be_bytes()).collect();
        let many: Vec<Member> = keys.iter().map(|k| Member { key: k, weight: 1, id: 0 }).collect();
        assert!(build(Algo::LeastConn, &many, 65537).is_err());
    }
}
