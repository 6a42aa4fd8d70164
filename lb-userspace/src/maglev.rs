//! Weighted Maglev consistent hashing (Eisenbud et al., NSDI 2016).
//!
//! Each backend walks its own permutation of the table's slots (offset and
//! skip from two hashes of its identity) and claims the next free slot on its
//! turn. Weights set how many turns a backend gets per round: every round each
//! backend gains its weight in credit, and claims one slot per `max_weight` of
//! credit, so shares follow weights to within a slot or so per round.
//!
//! The table is a pure function of (backend identities, weights, size): two
//! agents with the same backends build the same table, so two balancers send a
//! flow to the same backend.

use lb_common::hash::bytes_hash;

const SEED_OFFSET: u32 = 0x5851_f42d;
const SEED_SKIP: u32 = 0x4c95_7f2d;

/// A backend as Maglev sees it: a stable identity (e.g. its IP address bytes)
/// and a weight (0 = takes no slots).
#[derive(Clone, Debug)]
pub struct Entry<'a> {
    /// Bytes that identify the backend across agents and restarts.
    pub key: &'a [u8],
    /// Relative weight.
    pub weight: u32,
}

/// True when `n` is prime (table sizes must be).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u64;
    while d * d <= n as u64 {
        if (n as u64).is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// Build a lookup table of `size` slots (a prime). Each slot holds an index
/// into `entries`. Returns `None` when no entry has a positive weight.
pub fn build(entries: &[Entry<'_>], size: u32) -> Option<Vec<u32>> {
    debug_assert!(is_prime(size));
    // Turn order by identity, so the caller's order does not matter.
    let mut live: Vec<usize> = (0..entries.len()).filter(|&i| entries[i].weight > 0).collect();
    live.sort_by(|&a, &b| entries[a].key.cmp(entries[b].key));
    // The table being filled is probed at random: as u16 indexes (up to
    // 65 534 backends) it is half the size, so more of it stays in cache.
    if entries.len() < u16::MAX as usize {
        fill::<u16>(entries, &live, size).map(|t| t.into_iter().map(u32::from).collect())
    } else {
        fill::<u32>(entries, &live, size)
    }
}

/// An index into the entries, as stored while filling (`MAX`: empty).
trait Slot: Copy + Eq {
    const EMPTY: Self;
    fn of(i: usize) -> Self;
}

impl Slot for u16 {
    const EMPTY: u16 = u16::MAX;
    fn of(i: usize) -> u16 {
        i as u16
    }
}

impl Slot for u32 {
    const EMPTY: u32 = u32::MAX;
    fn of(i: usize) -> u32 {
        i as u32
    }
}

/// Maglev's fill: each live entry in turn (by weight credit) claims the
/// next free slot of its permutation `offset + k × skip (mod size)`. The
/// permutation position is kept and advanced by one addition (no division
/// per probe: a table takes ~M ln M probes).
fn fill<T: Slot>(entries: &[Entry<'_>], live: &[usize], size: u32) -> Option<Vec<T>> {
    let m = size as u64;
    let max_weight = live.iter().map(|&i| entries[i].weight).max()? as u64;
    let skip: Vec<u64> = live.iter().map(|&i| bytes_hash(entries[i].key, SEED_SKIP) as u64 % (m - 1) + 1).collect();
    let mut pos: Vec<u64> = live.iter().map(|&i| bytes_hash(entries[i].key, SEED_OFFSET) as u64 % m).collect();
    let mut table = vec![T::EMPTY; size as usize];
    let mut credit = vec![0u64; live.len()];
    let mut filled = 0u64;
    loop {
        for (j, &i) in live.iter().enumerate() {
            credit[j] += entries[i].weight as u64;
            while credit[j] >= max_weight {
                credit[j] -= max_weight;
                let (step, mut p) = (skip[j], pos[j]);
                while table[p as usize] != T::EMPTY {
                    p += step;
                    if p >= m {
                        p -= m;
                    }
                }
                table[p as usize] = T::of(i);
                p += step;
                if p >= m {
                    p -= m;
                }
                pos[j] = p;
                filled += 1;
                if filled == m {
                    return Some(table);
                }
            }
        }
    }
}

/// Number of slots whose owner differs between two tables of the same size,
/// comparing backend identities (`a_keys[a[i]]` vs `b_keys[b[i]]`).
pub fn moved_slots(a: &[u32], a_keys: &[&[u8]], b: &[u32], b_keys: &[&[u8]]) -> usize {
    a.iter().zip(b).filter(|(x, y)| a_keys[**x as usize] != b_keys[**y as usize]).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::DEFAULT_RING_SIZE;

    fn ips(n: u8) -> Vec<[u8; 4]> {
        (0..n).map(|i| [10, 0, 1, 10 + i]).collect()
    }

    fn shares(table: &[u32], n: usize) -> Vec<f64> {
        let mut c = vec![0usize; n];
        for &s in table {
            c[s as usize] += 1;
        }
        c.iter().map(|&x| x as f64 / table.len() as f64).collect()
    }

    #[test]
    fn primes() {
        assert!(is_prime(65537) && is_prime(251) && is_prime(2));
        assert!(!is_prime(65535) && !is_prime(1) && !is_prime(0));
    }

    #[test]
    fn weighted_shares_within_one_percent() {
        let m = DEFAULT_RING_SIZE;
        let keys = ips(5);
        for weights in [vec![1, 1, 1, 1, 1], vec![1, 2, 3, 4, 5], vec![100, 1, 50, 7, 13]] {
            let entries: Vec<Entry> =
                keys.iter().zip(&weights).map(|(k, &w)| Entry { key: k, weight: w }).collect();
            let t = build(&entries, m).expect("table");
            assert!(t.iter().all(|&s| (s as usize) < entries.len()));
            let total: u32 = weights.iter().sum();
            for (i, share) in shares(&t, 5).iter().enumerate() {
                let want = weights[i] as f64 / total as f64;
                assert!(
                    (share - want).abs() <= 0.01,
                    "weights {weights:?}: backend {i} has {share:.4}, wants {want:.4}"
                );
            }
        }
    }

    #[test]
    fn zero_weight_gets_nothing_and_all_zero_is_none() {
        let keys = ips(3);
        let e = |w: [u32; 3]| -> Vec<Entry> {
            keys.iter().zip(w).map(|(k, w)| Entry { key: k, weight: w }).collect()
        };
        let t = build(&e([1, 0, 1]), 251).expect("table");
        assert!(!t.contains(&1));
        assert!(build(&e([0, 0, 0]), 251).is_none());
        assert!(build(&[], 251).is_none());
    }

    #[test]
    fn removing_a_backend_moves_little_else() {
        let m = DEFAULT_RING_SIZE;
        for n in [3u8, 10, 50] {
            let keys = ips(n);
            let full: Vec<Entry> = keys.iter().map(|k| Entry { key: k, weight: 1 }).collect();
            let t1 = build(&full, m).expect("table");
            let gone = (n / 2) as usize;
            let rest: Vec<Entry> =
                full.iter().enumerate().filter(|(i, _)| *i != gone).map(|(_, e)| e.clone()).collect();
            let t2 = build(&rest, m).expect("table");
            let k1: Vec<&[u8]> = full.iter().map(|e| e.key).collect();
            let k2: Vec<&[u8]> = rest.iter().map(|e| e.key).collect();
            let owned = t1.iter().filter(|&&s| s as usize == gone).count();
            let moved = moved_slots(&t1, &k1, &t2, &k2);
            let others_moved = moved - owned;
            // Maglev's disruption bound is small; measured well under 2% of the
            // table here (0.7% for 3 backends, ~1% for 50).
            assert!(
                (others_moved as f64) < 0.02 * m as f64,
                "n={n}: {others_moved} slots of surviving backends moved (owned {owned})"
            );
        }
    }

    #[test]
    fn pure_function_of_input() {
        let keys = ips(7);
        let entries: Vec<Entry> =
            keys.iter().enumerate().map(|(i, k)| Entry { key: k, weight: 1 + i as u32 }).collect();
        let a = build(&entries, DEFAULT_RING_SIZE).expect("table");
        assert_eq!(a, build(&entries.clone(), DEFAULT_RING_SIZE).expect("table"));
        // Another agent that learnt the backends in another order agrees on
        // which backend owns every slot.
        let mut reversed = entries.clone();
        reversed.reverse();
        let b = build(&reversed, DEFAULT_RING_SIZE).expect("table");
        let ka: Vec<&[u8]> = entries.iter().map(|e| e.key).collect();
        let kb: Vec<&[u8]> = reversed.iter().map(|e| e.key).collect();
        assert_eq!(moved_slots(&a, &ka, &b, &kb), 0);
    }

    /// Golden table: with the same backends, every node (and every version
    /// that must run beside this one) builds exactly this table.
    #[test]
    fn permutation_is_pinned() {
        let keys: [[u8; 4]; 3] = [[10, 0, 1, 1], [10, 0, 1, 2], [10, 0, 1, 3]];
        let entries: Vec<Entry<'_>> =
            keys.iter().zip([1, 1, 2]).map(|(k, w)| Entry { key: k.as_slice(), weight: w }).collect();
        let t = build(&entries, 251).expect("table");
        let digest = t.iter().fold(0x811c_9dc5u32, |h, &e| (h ^ e).wrapping_mul(0x0100_0193));
        assert_eq!(&t[..16], &[2, 2, 1, 2, 0, 2, 1, 2, 0, 2, 1, 2, 1, 1, 0, 2]);
        assert_eq!(digest, 0xfffd0b90, "FNV-1a of the whole table");
    }
}
