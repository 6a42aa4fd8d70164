//! The connection table's layout: a set-associative array in which a flow's
//! lookup and insert touch one 64-byte cache line.
//!
//! `XLB_CONNTRACK` is a BPF array of `CtSet`s (created `BPF_F_MMAPABLE`, so
//! its values start page-aligned and every set is exactly one cache line).
//! A flow hashes to one set; the set holds `CT_WAYS` entries (`CtWay`, 16
//! bytes each). A new flow takes an empty way, else the oldest closed one,
//! else the oldest (least recently seen) one: the cost does not grow as the
//! table fills, and eviction never leaves the line.
//!
//! # Matching: no misroute
//!
//! An entry holds no key, only a signature of it, from two independently
//! seeded 64-bit hashes of the 5-tuple (`ct_hash`): `h1` picks the set (its
//! high 32 bits) and gives the 32-bit check `y` (its low 32 bits); `h2` gives
//! the 44-bit check `x`. An entry matches a flow when both agree, so a flow
//! is taken for another one only when 76 signature bits collide:
//! 2⁻⁷⁶ ≈ 1.3·10⁻²³ per way compared, at most 4 × 2⁻⁷⁶ ≈ 5.3·10⁻²³ per
//! lookup, 10⁷ times below the 10⁻¹⁵ bound we hold ourselves to (at 10⁸
//! lookups/s that is one false match per 6 million years). IPv4 and IPv6
//! keys hash the same way (all 37 meaningful bytes of an IPv6 5-tuple).
//!
//! # Several CPUs writing: no torn entry names another flow's backend
//!
//! An entry is two 8-byte words, each stored with one instruction (atomic
//! for readers), but the pair is not. The value (backend id and generation,
//! 32 bits) is bound into the tag word: `tag.x = x(flow) ⊕ m(value)`, where
//! `m` multiplies by an odd constant modulo 2⁴⁴ and so is injective on 32-bit
//! values. A reader accepts `(tag, val)` for flow F when
//! `tag.x ⊕ m(val.value) = x(F)` and `val.y = y(F)`. Suppose `tag` was last
//! written for flow K with value v_K and `val` for flow H with value v_H
//! (any interleaving of any number of writers; a writer only ever stores a
//! tag whose `x` came from one insert). A reader for F accepts only if
//! y(H) = y(F) and x(K) ⊕ m(v_K) ⊕ m(v_H) = x(F):
//! - H = F: the value is one F itself was given: not a misroute.
//! - H ≠ F, K = F: needs m(v_K) = m(v_H), so v_H = v_K, F's own value.
//! - H ≠ F, K ≠ F: needs 32 + 44 independent bits to collide (2⁻⁷⁶).
//!
//! So an entry torn between writers either names the flow's own backend or
//! matches nobody (that flow then misses and is scheduled again). The age
//! and the closed flag live in the tag word next to `x`, so refreshing or
//! closing an entry is one store that never tears the binding.
//!
//! # Seed
//!
//! The hashes are seeded (`CtSeed`) with random keys chosen when the table is
//! created, so a client cannot aim flows at another client's set to evict
//! its entry. The seed is kept in the table's last element
//! (`CtSet::seed_record`), which no flow maps to, so an agent that adopts a
//! pinned table uses the same one. This is not a cryptographic MAC.

use crate::FlowKey;

/// Entries per set (4 × 16 bytes = one 64-byte cache line).
pub const CT_WAYS: usize = 4;

/// Live flows per set at which the table is sized: with flows spread at
/// random, a set receives a Poisson(1.25) number of them, and the expected
/// share of flows beyond the 4 ways of their set (evicted before their time)
/// is about 0.9 % (the `capacity_is_honest` test measures it).
pub const CT_FLOWS_PER_SET_X100: u64 = 125;

/// Time unit of an entry's age: 2²⁴ ns ≈ 16.8 ms.
pub const CT_TIME_SHIFT: u32 = 24;
const TIME_BITS: u32 = 19;
const TIME_MASK: u64 = (1 << TIME_BITS) - 1;
const CLOSED: u64 = 1 << TIME_BITS;
const X_SHIFT: u32 = TIME_BITS + 1;
const X_BITS: u32 = 64 - X_SHIFT;
const X_MASK: u64 = (1 << X_BITS) - 1;
/// Odd multiplier binding the value into the tag (injective modulo 2⁴⁴).
const BIND: u64 = 0x9e37_79b9_7f4a_7c15;

/// One entry: 16 bytes, two words each written with one store.
///
/// - `tag`: bits 63..20 `x ⊕ m(value)`, bit 19 closed, bits 18..0 the time it
///   was last seen (units of `CT_TIME_SHIFT`, wrapping every ~2.4 h).
/// - `val`: bits 63..32 `y` (never 0), 31..16 generation, 15..0 backend id.
///
/// `val == 0` is an empty way.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtWay {
    /// Signature check bound to the value, closed flag, age.
    pub tag: u64,
    /// Signature check, generation, backend id.
    pub val: u64,
}

/// One set: the unit of lookup, insert and eviction (one cache line).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtSet {
    /// The entries.
    pub ways: [CtWay; CT_WAYS],
}

/// The hash keys of a table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtSeed {
    /// Seeds of `h1` and `h2`.
    pub k: [u64; 2],
}

/// Where a flow lives in the table and how its entry is recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtHash {
    /// Set index, below the table's number of sets.
    pub set: u32,
    /// 44-bit check (from `h2`).
    pub x: u64,
    /// 32-bit check (from `h1`), never 0.
    pub y: u32,
}

/// What an entry says about its flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntry {
    /// Backend id.
    pub backend_id: u32,
    /// The backend id's generation when the entry was made.
    pub gen: u16,
    /// A FIN or RST was seen: no longer an active flow.
    pub closed: bool,
}

/// Marks the seed record (the table's last element) as written.
const SEED_MAGIC: u64 = 0x786c_622d_6374_7631; // "xlb-ctv1"

#[inline(always)]
fn fold(h: u64, w: u64) -> u64 {
    (h ^ w).wrapping_mul(0xff51_afd7_ed55_8ccd).rotate_left(29)
}

/// MurmurHash3's 64-bit finaliser: every input bit affects every output bit.
#[inline(always)]
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// An address as two little-endian 64-bit words (`u64::from_le_bytes` of
/// bytes 0..8 and 8..16), built from its 32-bit words (`addr_words`: one
/// aligned load each in a `FlowKey`, where eight byte loads per word were).
#[inline(always)]
fn words64(a: &[u8; 16]) -> [u64; 2] {
    let w = crate::addr_words(a).map(|x| u32::from_le(x) as u64);
    [w[0] | w[1] << 32, w[2] | w[3] << 32]
}

#[inline(always)]
fn m(value: u32) -> u64 {
    (value as u64).wrapping_mul(BIND) & X_MASK
}

/// Number of sets for `flows` live flows (see `CT_FLOWS_PER_SET_X100`).
pub const fn ct_sets(flows: u32) -> u32 {
    let s = (flows as u64 * 100).div_ceil(CT_FLOWS_PER_SET_X100);
    if s == 0 {
        1
    } else {
        s as u32
    }
}

/// Elements of the `XLB_CONNTRACK` array for `flows` live flows: the sets
/// and the seed record after them.
pub const fn ct_elements(flows: u32) -> u32 {
    ct_sets(flows) + 1
}

/// Bytes of the connection table for `flows` live flows.
pub const fn ct_bytes(flows: u32) -> u64 {
    ct_elements(flows) as u64 * core::mem::size_of::<CtSet>() as u64
}

/// Set and signature of a flow in a table of `sets` sets.
#[inline(always)]
pub fn ct_hash(k: &FlowKey, seed: &CtSeed, sets: u32) -> CtHash {
    let tail = k.sport_be as u64
        | (k.vip.port_be as u64) << 16
        | (k.vip.proto as u64) << 32
        | (k.vip.family as u64) << 40;
    let (mut a, mut b) = (seed.k[0], seed.k[1]);
    if k.is_v6() {
        let (s, d) = (words64(&k.src), words64(&k.vip.addr));
        for w in [s[0], s[1], d[0], d[1]] {
            a = fold(a, w);
            b = fold(b, w);
        }
    } else {
        let w = u32::from_le(crate::addr_words(&k.src)[0]) as u64 | (u32::from_le(crate::addr_words(&k.vip.addr)[0]) as u64) << 32;
        a = fold(a, w);
        b = fold(b, w);
    }
    let h1 = fmix64(fold(a, tail));
    let h2 = fmix64(fold(b, tail));
    let y = h1 as u32;
    CtHash { set: (((h1 >> 32) * sets as u64) >> 32) as u32, x: h2 >> X_SHIFT, y: if y == 0 { 1 } else { y } }
}

/// A time in the entries' unit, from nanoseconds of `CLOCK_MONOTONIC`
/// (the datapath's are `CtClock::ns` of the jiffies counter).
#[inline(always)]
pub const fn ct_now(ns: u64) -> u64 {
    (ns >> CT_TIME_SHIFT) & TIME_MASK
}

/// The datapath's clock: the kernel's jiffies counter (`bpf_jiffies64`,
/// which the verifier inlines into one load: no helper call, ~10 ns less
/// per packet than `bpf_ktime_get_coarse_ns` on kernels with return-thunk
/// mitigations) turned into nanoseconds since boot. The kernel starts
/// jiffies at `INITIAL_JIFFIES` (300 s before wrapping 32 bits) and
/// advances them once per tick from the same timekeeping as
/// `CLOCK_MONOTONIC_COARSE`, whose resolution (`clock_getres`) is the tick;
/// so `ns` runs at that clock's rate, but from a different moment of boot
/// (≈250 ms apart on the development VM): the agent measures the offset
/// once at load (`xlb_clock`) and reads entries' ages against it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtClock {
    /// Nanoseconds per tick (1 000 000 at 1000 Hz).
    pub tick_ns: u64,
    /// The jiffies counter's value at boot.
    pub base: u64,
}

impl CtClock {
    /// The clock of a kernel whose tick is `tick_ns` nanoseconds.
    pub const fn of_tick(tick_ns: u64) -> CtClock {
        let tick_ns = if tick_ns == 0 { 4_000_000 } else { tick_ns };
        let hz = (1_000_000_000 + tick_ns / 2) / tick_ns;
        // include/linux/jiffies.h: ((unsigned long)(unsigned int)(-300*HZ)).
        CtClock { tick_ns, base: (0u32.wrapping_sub(300u32.wrapping_mul(hz as u32))) as u64 }
    }

    /// Nanoseconds since boot at `jiffies`.
    #[inline(always)]
    pub const fn ns(&self, jiffies: u64) -> u64 {
        jiffies.wrapping_sub(self.base).wrapping_mul(self.tick_ns)
    }
}

impl CtWay {
    /// The entry for a flow with signature `h` going to `backend_id`/`gen`.
    #[inline(always)]
    pub fn new(h: &CtHash, backend_id: u32, gen: u16, closed: bool, now: u64) -> CtWay {
        let value = (backend_id & 0xffff) | (gen as u32) << 16;
        let tag = ((h.x ^ m(value)) << X_SHIFT) | if closed { CLOSED } else { 0 } | (now & TIME_MASK);
        CtWay { tag, val: (h.y as u64) << 32 | value as u64 }
    }

    /// Whether `(tag, val)` (read one word at a time, possibly from
    /// different writes) is the entry of the flow with signature `h`.
    #[inline(always)]
    pub fn matches(tag: u64, val: u64, h: &CtHash) -> bool {
        (val >> 32) as u32 == h.y && (tag >> X_SHIFT) ^ m(val as u32) == h.x
    }

    /// Whether a way read as `val` is free.
    #[inline(always)]
    pub const fn is_empty(val: u64) -> bool {
        val == 0
    }

    /// Whether the entry's flow was closed by FIN/RST.
    #[inline(always)]
    pub const fn is_closed(tag: u64) -> bool {
        tag & CLOSED != 0
    }

    /// The entry's contents.
    #[inline(always)]
    pub const fn entry(tag: u64, val: u64) -> CtEntry {
        CtEntry { backend_id: (val & 0xffff) as u32, gen: (val >> 16) as u16, closed: Self::is_closed(tag) }
    }

    /// The tag refreshed to `now`, closed if `close` (the binding unchanged).
    #[inline(always)]
    pub const fn touched(tag: u64, now: u64, close: bool) -> u64 {
        (tag & !TIME_MASK) | (now & TIME_MASK) | if close { CLOSED } else { 0 }
    }

    /// Whether the tag already says `now` (no store needed on a hit).
    #[inline(always)]
    pub const fn is_fresh(tag: u64, now: u64) -> bool {
        tag & TIME_MASK == now & TIME_MASK
    }

    /// Time units since the entry was last seen (modulo the ~2.4 h wrap).
    #[inline(always)]
    pub const fn age(tag: u64, now: u64) -> u64 {
        now.wrapping_sub(tag) & TIME_MASK
    }
}

/// The way a new flow takes in a set read as `tags`/`vals`: an empty one,
/// else the oldest closed one, else the oldest. Returns (way, whether an
/// open entry is evicted).
#[inline(always)]
pub fn ct_victim(tags: &[u64; CT_WAYS], vals: &[u64; CT_WAYS], now: u64) -> (usize, bool) {
    let mut best = 0;
    let mut best_rank = 0u64;
    let mut i = 0;
    while i < CT_WAYS {
        let rank = ct_rank(tags[i], vals[i], now);
        if rank > best_rank || i == 0 {
            best = i;
            best_rank = rank;
        }
        i += 1;
    }
    (best, ct_rank_is_open(best_rank))
}

/// How eagerly a way read as `(tag, val)` is taken by a new flow: empty
/// ways first, then closed ones, then by age; one number per way, so the
/// victim is the way of the largest (the first of equals).
#[inline(always)]
pub const fn ct_rank(tag: u64, val: u64, now: u64) -> u64 {
    if CtWay::is_empty(val) {
        u64::MAX
    } else if CtWay::is_closed(tag) {
        (1 << 62) | CtWay::age(tag, now)
    } else {
        CtWay::age(tag, now)
    }
}

/// Whether a way of this rank holds an open flow (evicting it ends the
/// flow's entry before its time).
#[inline(always)]
pub const fn ct_rank_is_open(rank: u64) -> bool {
    rank < (1 << 62)
}

impl CtSet {
    /// The record kept in the table's last element: the seed, marked.
    pub fn seed_record(seed: &CtSeed) -> CtSet {
        let mut s = CtSet::default();
        s.ways[0] = CtWay { tag: SEED_MAGIC, val: seed.k[0] };
        s.ways[1] = CtWay { tag: SEED_MAGIC, val: seed.k[1] };
        s
    }

    /// The seed in a record written by `seed_record`, if it is one.
    pub fn seed(&self) -> Option<CtSeed> {
        (self.ways[0].tag == SEED_MAGIC && self.ways[1].tag == SEED_MAGIC)
            .then_some(CtSeed { k: [self.ways[0].val, self.ways[1].val] })
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::{vec, vec::Vec};
    use crate::{addr_v4, VipKey, FAMILY_V4, FAMILY_V6, PROTO_TCP};
    use core::mem::size_of;

    const SEED: CtSeed = CtSeed { k: [0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210] };

    /// A small deterministic generator (xorshift*) for test flows.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    fn flow(r: &mut Rng, v6: bool) -> FlowKey {
        let mut k = FlowKey {
            src: [0; 16],
            sport_be: r.next() as u16,
            _pad: 0,
            vip: VipKey { addr: addr_v4([10, 0, 0, 100]), port_be: 80u16.to_be(), proto: PROTO_TCP, family: FAMILY_V4 },
        };
        if v6 {
            k.src = (r.next() as u128 | (r.next() as u128) << 64).to_le_bytes();
            k.vip.addr = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];
            k.vip.family = FAMILY_V6;
        } else {
            k.src[..4].copy_from_slice(&(r.next() as u32).to_le_bytes());
        }
        k
    }

    #[test]
    fn address_words_are_the_little_endian_words() {
        let mut r = Rng(11);
        for _ in 0..100 {
            let a = (r.next() as u128 | (r.next() as u128) << 64).to_le_bytes();
            let want = [u64::from_le_bytes(a[..8].try_into().unwrap()), u64::from_le_bytes(a[8..].try_into().unwrap())];
            assert_eq!(words64(&a), want);
            assert_eq!(crate::addr_of_words(crate::addr_words(&a)), a);
        }
    }

    #[test]
    fn a_set_is_one_cache_line() {
        assert_eq!(size_of::<CtWay>(), 16);
        assert_eq!(size_of::<CtSet>(), 64);
        assert_eq!(core::mem::align_of::<CtSet>(), 64);
    }

    #[test]
    fn entries_round_trip_and_match_only_their_flow() {
        let mut r = Rng(7);
        for v6 in [false, true] {
            let a = ct_hash(&flow(&mut r, v6), &SEED, 1000);
            let b = ct_hash(&flow(&mut r, v6), &SEED, 1000);
            let e = CtWay::new(&a, 16383, 0xbeef, false, 12345);
            assert!(CtWay::matches(e.tag, e.val, &a));
            assert!(!CtWay::matches(e.tag, e.val, &b));
            assert_eq!(CtWay::entry(e.tag, e.val), CtEntry { backend_id: 16383, gen: 0xbeef, closed: false });
            let t = CtWay::touched(e.tag, 99, true);
            assert!(CtWay::matches(t, e.val, &a), "refreshing and closing keep the match");
            assert!(CtWay::entry(t, e.val).closed);
            assert!(!CtWay::is_empty(e.val));
        }
    }

    #[test]
    fn every_field_of_the_key_changes_the_signature() {
        let mut r = Rng(11);
        for v6 in [false, true] {
            let k = flow(&mut r, v6);
            let h = ct_hash(&k, &SEED, 1 << 20);
            let mut variants = Vec::new();
            for i in 0..k.addr_len() {
                let mut v = k;
                v.src[i] ^= 1;
                variants.push(v);
                let mut v = k;
                v.vip.addr[i] ^= 0x80;
                variants.push(v);
            }
            let mut v = k;
            v.sport_be ^= 1;
            variants.push(v);
            let mut v = k;
            v.vip.port_be ^= 0x100;
            variants.push(v);
            let mut v = k;
            v.vip.proto = 17;
            variants.push(v);
            for v in variants {
                let o = ct_hash(&v, &SEED, 1 << 20);
                assert!(o.x != h.x && o.y != h.y, "{v:?}");
            }
            let other = CtSeed { k: [SEED.k[0] ^ 1, SEED.k[1]] };
            assert_ne!(ct_hash(&k, &other, 1 << 20), h, "the seed changes everything");
        }
    }

    /// Every combination of a tag from one write and a value from another
    /// (what a reader can see while several CPUs write one way) matches a
    /// flow only with that flow's own value.
    #[test]
    fn torn_entries_never_name_another_flows_backend() {
        let mut r = Rng(3);
        let flows: Vec<CtHash> = (0..64).map(|i| ct_hash(&flow(&mut r, i % 2 == 0), &SEED, 1)).collect();
        // Writes: each flow with two values, plus flows that share values.
        let mut writes = Vec::new();
        for (i, h) in flows.iter().enumerate() {
            writes.push((i, CtWay::new(h, (i % 5) as u32, 1, false, 10)));
            writes.push((i, CtWay::new(h, (i % 7) as u32 + 100, 2, i % 2 == 0, 20)));
        }
        let mut accepted = 0;
        for (ka, a) in &writes {
            for (kb, b) in &writes {
                for (f, h) in flows.iter().enumerate() {
                    if CtWay::matches(a.tag, b.val, h) {
                        accepted += 1;
                        let got = CtWay::entry(a.tag, b.val);
                        let own: Vec<(u32, u16)> = writes
                            .iter()
                            .filter(|(k, _)| *k == f)
                            .map(|(_, w)| (CtWay::entry(w.tag, w.val).backend_id, CtWay::entry(w.tag, w.val).gen))
                            .collect();
                        assert!(own.contains(&(got.backend_id, got.gen)), "flow {f} read tag of {ka} and value of {kb}");
                    }
                }
            }
        }
        // Each write matches its own flow, and torn pairs of one flow's two
        // writes never do (their values differ).
        assert_eq!(accepted, writes.len());
    }

    #[test]
    fn victim_prefers_empty_then_closed_then_oldest() {
        let h = CtHash { set: 0, x: 5, y: 9 };
        let e = |closed, t| CtWay::new(&h, 1, 1, closed, t);
        let now = 1000;
        let ways = [e(false, 990), e(false, 900), e(true, 999), CtWay::default()];
        let tags = ways.map(|w| w.tag);
        let vals = ways.map(|w| w.val);
        assert_eq!(ct_victim(&tags, &vals, now), (3, false), "the empty way");
        let ways = [e(false, 990), e(false, 900), e(true, 999), e(true, 995)];
        assert_eq!(ct_victim(&ways.map(|w| w.tag), &ways.map(|w| w.val), now), (3, false), "the oldest closed");
        let ways = [e(false, 990), e(false, 900), e(false, 999), e(false, 995)];
        assert_eq!(ct_victim(&ways.map(|w| w.tag), &ways.map(|w| w.val), now), (1, true), "the oldest");
        // Ages wrap: an entry from just before the wrap is older than one after.
        let ways = [e(false, TIME_MASK - 2), e(false, 1), e(false, 2), e(false, 3)];
        assert_eq!(ct_victim(&ways.map(|w| w.tag), &ways.map(|w| w.val), 4).0, 0);
    }

    /// `--conntrack-size` live flows spread at random over `ct_sets` sets:
    /// at most 1 % lose their entry to a later one (IPv4 and IPv6).
    #[test]
    fn capacity_is_honest() {
        for (flows, v6) in [(65_536u32, false), (1 << 20, false), (100_000, true)] {
            let sets = ct_sets(flows);
            let mut per_set = vec![0u8; sets as usize];
            let mut r = Rng(flows as u64 + v6 as u64);
            let mut evicted = 0u64;
            for _ in 0..flows {
                let h = ct_hash(&flow(&mut r, v6), &SEED, sets);
                let n = &mut per_set[h.set as usize];
                if *n as usize >= CT_WAYS {
                    evicted += 1;
                }
                *n = n.saturating_add(1);
            }
            let share = evicted as f64 / flows as f64;
            assert!(share <= 0.01, "{flows} flows (v6 {v6}) in {sets} sets: {:.2} % evicted", share * 100.0);
            assert!(share >= 0.005, "sized too generously: {:.2} %", share * 100.0);
        }
    }

    #[test]
    fn the_seed_record_round_trips() {
        assert_eq!(CtSet::seed_record(&SEED).seed(), Some(SEED));
        assert_eq!(CtSet::default().seed(), None);
    }

    #[test]
    fn the_clock_counts_ticks_from_the_kernels_initial_jiffies() {
        // include/linux/jiffies.h: INITIAL_JIFFIES = (u32)(-300 * HZ).
        for (tick, hz) in [(1_000_000u64, 1000u64), (4_000_000, 250), (3_333_333, 300), (10_000_000, 100)] {
            let c = CtClock::of_tick(tick);
            assert_eq!(c.base, (1u64 << 32) - 300 * hz, "HZ {hz}");
            assert_eq!(c.ns(c.base), 0);
            assert_eq!(c.ns(c.base + hz), hz * tick, "one second of ticks");
        }
        // An unknown tick (clock_getres failed) falls back to 250 Hz.
        assert_eq!(CtClock::of_tick(0), CtClock::of_tick(4_000_000));
    }
}
