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
/// next free slot of its permutation `offset + k × skip (mod size)`.
///
/// The turn order is that of rounds in which every entry gains its weight
/// in credit and claims one slot per `max_weight` of it (at most one per
/// round, as no weight exceeds the largest): entry j's k-th claim falls in
/// round ⌈k·max/w_j⌉, and within a round entries go in `live` order. Two
/// things make this fast without changing a single slot of the result
/// (`fill_reference`, in the tests, is the plain fill it must equal):
/// - With very unequal weights, turns come from a calendar of weight groups
///   (`Turns`), so a round costs only its claims: with one backend at
///   weight 10 000 and 3 999 at 1, walking every entry in each of ~65 000
///   rounds took 250 ms; the calendar takes 1.5 ms.
/// - While many slots are free, the next free slot of a permutation is
///   found by walking it (one addition per probe). With few left, that
///   walk averages size/free probes (the last 128 slots take half of the
///   table's ~M ln M probes); from `TAIL` free slots on, the claim takes
///   the free slot with the fewest steps ahead on its permutation,
///   `(s − pos) × skip⁻¹ mod size`: the slot the walk would reach first.
///
/// Measured at 65 537 slots (`timing` test): 0.64 ms for 3 equal backends
/// (plain 0.59), 1.08 for 100 (plain 1.23), 0.41 for 3 with one at weight
/// 20 (plain 0.53), 1.2 for 100 with one at 300 (plain 6.0).
fn fill<T: Slot>(entries: &[Entry<'_>], live: &[usize], size: u32) -> Option<Vec<T>> {
    let m = size as u64;
    let weights: Vec<u64> = live.iter().map(|&i| entries[i].weight as u64).collect();
    let max_weight = *weights.iter().max()?;
    let mut f = Fill {
        m,
        live,
        skip: live.iter().map(|&i| bytes_hash(entries[i].key, SEED_SKIP) as u64 % (m - 1) + 1).collect(),
        pos: live.iter().map(|&i| bytes_hash(entries[i].key, SEED_OFFSET) as u64 % m).collect(),
        table: vec![T::EMPTY; size as usize],
        filled: 0,
        walk_until: m.saturating_sub(TAIL),
        tail: None,
    };
    // Rounds until full ≈ m·max/Σw; walking every entry in each costs
    // n·max/Σw per claim: the calendar pays once that is more than a few.
    let sum: u64 = weights.iter().sum();
    if (live.len() as u64) * max_weight <= 4 * sum {
        let mut credit = vec![0u64; live.len()];
        loop {
            for j in 0..live.len() {
                credit[j] += weights[j];
                if credit[j] >= max_weight {
                    credit[j] -= max_weight;
                    if f.claim(j) {
                        return Some(f.table);
                    }
                }
            }
        }
    }
    let mut turns = Turns::new(&weights, max_weight, m);
    loop {
        for &j in turns.next_round() {
            if f.claim(j as usize) {
                return Some(f.table);
            }
        }
    }
}

/// A table being filled.
struct Fill<'a, T> {
    m: u64,
    live: &'a [usize],
    skip: Vec<u64>,
    /// Each entry's next position on its permutation.
    pos: Vec<u64>,
    table: Vec<T>,
    filled: u64,
    /// Free slots are found by walking until this many are filled.
    walk_until: u64,
    tail: Option<Tail>,
}

impl<T: Slot> Fill<'_, T> {
    /// Entry `j` claims the next free slot of its permutation; true when
    /// the table is full.
    #[inline(always)]
    fn claim(&mut self, j: usize) -> bool {
        let (m, step) = (self.m, self.skip[j]);
        let advance = |p: u64| if p + step >= m { p + step - m } else { p + step };
        let p = if self.filled < self.walk_until {
            let mut p = self.pos[j];
            while self.table[p as usize] != T::EMPTY {
                p = advance(p);
            }
            p
        } else {
            let (table, skip) = (&self.table, &self.skip);
            self.tail.get_or_insert_with(|| Tail::new(table, m, skip)).take(j, self.pos[j], m)
        };
        self.table[p as usize] = T::of(self.live[j]);
        self.pos[j] = advance(p);
        self.filled += 1;
        self.filled == m
    }
}

/// Free slots left when the fill stops walking permutations (see `fill`):
/// at 65 537 slots, 32–256 gain 10–15 % from 10 backends up (the walk is
/// cheaper than its probe count suggests: the CPU runs ahead on a loop
/// that mostly finds slots taken).
const TAIL: u64 = 128;

/// The last free slots, and each entry's inverse step.
struct Tail {
    free: Vec<u64>,
    inv_skip: Vec<u64>,
    /// ⌊(2⁶⁴−1)/size⌋, for Barrett reduction (a division costs ~10× more).
    recip: u64,
}

impl Tail {
    fn new<T: Slot>(table: &[T], m: u64, skip: &[u64]) -> Tail {
        let free = table.iter().enumerate().filter(|(_, s)| **s == T::EMPTY).map(|(i, _)| i as u64).collect();
        // size is prime: skip^(size−2) is skip's inverse.
        let inv_skip = skip.iter().map(|&s| pow_mod(s, m - 2, m)).collect();
        Tail { free, inv_skip, recip: u64::MAX / m }
    }

    /// The free slot entry `j` (now at `pos` on its permutation) reaches
    /// first, taken out of the free list.
    fn take(&mut self, j: usize, pos: u64, m: u64) -> u64 {
        let inv = self.inv_skip[j];
        let mut best = (u64::MAX, 0usize);
        for (i, &s) in self.free.iter().enumerate() {
            // Steps from pos to s: (s − pos) / skip in the field of size m
            // (both factors < m < 2³², so the product fits in u64).
            let d = if s >= pos { s - pos } else { s + m - pos };
            let steps = self.reduce(d * inv, m);
            if steps < best.0 {
                best = (steps, i);
            }
        }
        self.free.swap_remove(best.1)
    }
}

impl Tail {
    /// `a mod m` by Barrett reduction: the estimate of a / m is short by
    /// at most 2.
    fn reduce(&self, a: u64, m: u64) -> u64 {
        let q = ((a as u128 * self.recip as u128) >> 64) as u64;
        let mut r = a - q * m;
        while r >= m {
            r -= m;
        }
        r
    }
}

/// `b^e mod m` (m < 2³²).
fn pow_mod(mut b: u64, mut e: u64, m: u64) -> u64 {
    let mut r = 1 % m;
    b %= m;
    while e > 0 {
        if e & 1 == 1 {
            r = r * b % m;
        }
        b = b * b % m;
        e >>= 1;
    }
    r
}

/// The turn order of `fill`: entry j's k-th claim falls in round
/// ⌈k·max/w_j⌉, entries in `live` order within a round. With equal weights
/// every entry claims in every round; otherwise a calendar: entries of one
/// weight claim in the same rounds, so each distinct weight is one group,
/// filed under the next round it claims in.
struct Turns {
    groups: Vec<Group>,
    /// Round → first group due then (linked by `Group::link`); `NONE`: none.
    due: Vec<u32>,
    round: usize,
    max_weight: u64,
    /// This round's entries.
    now: Vec<u32>,
}

struct Group {
    weight: u64,
    /// Indexes into `live`, ascending.
    members: Vec<u32>,
    claims: u64,
    link: u32,
}

const NONE: u32 = u32::MAX;

impl Turns {
    fn new(weights: &[u64], max_weight: u64, m: u64) -> Turns {
        let mut t = Turns { groups: Vec::new(), due: Vec::new(), round: 0, max_weight, now: Vec::new() };
        let mut by_weight: std::collections::BTreeMap<u64, usize> = Default::default();
        for (j, &w) in weights.iter().enumerate().filter(|(_, w)| **w > 0) {
            let g = *by_weight.entry(w).or_insert_with(|| {
                t.groups.push(Group { weight: w, members: Vec::new(), claims: 0, link: NONE });
                t.groups.len() - 1
            });
            t.groups[g].members.push(j as u32);
        }
        // The heaviest group claims every round, so the table is full by
        // round m at the latest.
        t.due = vec![NONE; m as usize + 2];
        for g in 0..t.groups.len() {
            t.file(g);
        }
        t
    }

    /// File group `g` under the round of its next claim.
    fn file(&mut self, g: usize) {
        let grp = &mut self.groups[g];
        let k = grp.claims + 1;
        // ⌈k·max/w⌉: k ≤ m < 2³² and max < 2³², so k·max fits in u64.
        let r = (k * self.max_weight).div_ceil(grp.weight) as usize;
        if r < self.due.len() {
            grp.link = self.due[r];
            self.due[r] = g as u32;
        }
    }

    /// The entries claiming in the next round, in `live` order.
    fn next_round(&mut self) -> &[u32] {
        self.now.clear();
        self.round += 1;
        let mut g = std::mem::replace(&mut self.due[self.round], NONE);
        let mut groups = 0;
        while g != NONE {
            let grp = &mut self.groups[g as usize];
            self.now.extend_from_slice(&grp.members);
            grp.claims += 1;
            let next = grp.link;
            self.file(g as usize);
            groups += 1;
            g = next;
        }
        if groups > 1 {
            self.now.sort_unstable();
        }
        &self.now
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

    /// The plain fill (round by round, walking each permutation to its next
    /// free slot): `fill` must give exactly its table, slot for slot, or
    /// balancers of two versions would disagree on where a flow goes.
    fn fill_reference(entries: &[Entry<'_>], size: u32) -> Option<Vec<u32>> {
        let mut live: Vec<usize> = (0..entries.len()).filter(|&i| entries[i].weight > 0).collect();
        live.sort_by(|&a, &b| entries[a].key.cmp(entries[b].key));
        let m = size as u64;
        let max_weight = live.iter().map(|&i| entries[i].weight).max()? as u64;
        let skip: Vec<u64> = live.iter().map(|&i| bytes_hash(entries[i].key, SEED_SKIP) as u64 % (m - 1) + 1).collect();
        let mut pos: Vec<u64> = live.iter().map(|&i| bytes_hash(entries[i].key, SEED_OFFSET) as u64 % m).collect();
        // u16 slots, as the fill had them (its speed is the baseline).
        let mut table = vec![u16::MAX; size as usize];
        let mut credit = vec![0u64; live.len()];
        let mut filled = 0u64;
        loop {
            for (j, &i) in live.iter().enumerate() {
                credit[j] += entries[i].weight as u64;
                while credit[j] >= max_weight {
                    credit[j] -= max_weight;
                    let (step, mut p) = (skip[j], pos[j]);
                    while table[p as usize] != u16::MAX {
                        p += step;
                        if p >= m {
                            p -= m;
                        }
                    }
                    table[p as usize] = i as u16;
                    p += step;
                    pos[j] = if p >= m { p - m } else { p };
                    filled += 1;
                    if filled == m {
                        return Some(table.into_iter().map(u32::from).collect());
                    }
                }
            }
        }
    }

    #[test]
    fn fast_fill_equals_the_plain_fill_slot_for_slot() {
        // Equal weights, one heavy backend, every weight distinct, zero
        // weights, small and default sizes, 1 to 300 backends.
        let mut seed = 0x9e37_79b9u32;
        let mut rnd = |n: u32| {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed % n
        };
        let mut cases: Vec<(u32, Vec<u32>)> = vec![
            (DEFAULT_RING_SIZE, vec![1; 3]),
            (DEFAULT_RING_SIZE, vec![1; 100]),
            (DEFAULT_RING_SIZE, [vec![300], vec![1; 99]].concat()),
            (DEFAULT_RING_SIZE, (1..=300).collect()),
            (DEFAULT_RING_SIZE, vec![10_000, 1, 0, 5_000]),
            (251, vec![1, 1, 2]),
            (251, vec![7]),
            (13, vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]),
        ];
        for _ in 0..40 {
            let size = [251, 4099, 65_537][rnd(3) as usize];
            let n = 1 + rnd(120);
            let spread = [1, 2, 10, 10_000][rnd(4) as usize];
            cases.push((size, (0..n).map(|_| rnd(spread + 1)).collect()));
        }
        for (size, weights) in cases {
            let keys: Vec<[u8; 4]> = (0..weights.len() as u32).map(|i| (0x0a00_0000 + i * 7919).to_be_bytes()).collect();
            let entries: Vec<Entry> = keys.iter().zip(&weights).map(|(k, &w)| Entry { key: k, weight: w }).collect();
            assert_eq!(build(&entries, size), fill_reference(&entries, size), "size {size}, weights {weights:?}");
        }
    }

    /// Build times (`cargo test --release -p lb-userspace maglev::tests::timing -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn timing() {
        for (name, weights) in [
            ("3 equal", vec![1; 3]),
            ("10 equal", vec![1; 10]),
            ("100 equal", vec![1; 100]),
            ("1000 equal", vec![1; 1000]),
            ("3, one at 20", vec![20, 1, 1]),
            ("100, one at 300", [vec![300], vec![1; 99]].concat()),
            ("4000, one at 10000", [vec![10_000], vec![1; 3999]].concat()),
        ] {
            let keys: Vec<[u8; 4]> = (0..weights.len() as u32).map(|i| (0x0a00_0000 + i).to_be_bytes()).collect();
            let entries: Vec<Entry> = keys.iter().zip(&weights).map(|(k, &w)| Entry { key: k, weight: w }).collect();
            let time = |f: &dyn Fn() -> Option<Vec<u32>>| {
                let mut v: Vec<f64> = (0..7)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        std::hint::black_box(f());
                        t.elapsed().as_secs_f64() * 1e3
                    })
                    .collect();
                v.sort_by(f64::total_cmp);
                v[3]
            };
            let fast = time(&|| build(&entries, DEFAULT_RING_SIZE));
            let plain = time(&|| fill_reference(&entries, DEFAULT_RING_SIZE));
            println!("{name:>20}: {fast:.3} ms (plain {plain:.3} ms)");
        }
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
