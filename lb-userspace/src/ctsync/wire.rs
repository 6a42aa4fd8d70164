//! The connection-table sync datagram: a header, entries (5-tuple → backend
//! address) and an HMAC-SHA256 tag over everything before it, computed with
//! the key the peers share.
//!
//! ```text
//! 0   "XLBS"   magic
//! 4   1        version
//! 5   0        reserved
//! 6   count    u16, entries that follow
//! 8   sender   u64, random per agent start
//! 16  seq      u64, per sender, +1 per datagram
//! 24  time_ms  u64, sender's wall clock (ms since the epoch)
//! 32  entries  count × (flags u8, proto u8, sport u16, vport u16,
//!              idle u16, client, VIP, backend: 4 or 16 bytes each by
//!              the flags)
//! ..  tag      32 bytes, HMAC-SHA256(key, bytes 0..)
//! ```
//!
//! All integers big-endian. `idle`: time since the sender last saw the
//! flow, in the connection table's unit (2²⁴ ns ≈ 16.8 ms). Flags: bit 0
//! the flow is IPv6, bit 1 the backend is IPv6; other bits must be 0. A receiver accepts a datagram
//! only with a valid tag, a sequence number above the last it accepted from
//! that sender, and a time within `WINDOW` of its own clock (an old
//! datagram replayed after its sender restarted is refused too).

use hmac::{Hmac, Mac};
use lb_common::{FlowKey, VipKey, FAMILY_V4, FAMILY_V6};
use sha2::Sha256;
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

const MAGIC: &[u8; 4] = b"XLBS";
const VERSION: u8 = 1;
/// Header bytes before the entries.
pub const HEADER: usize = 32;
/// Tag bytes after them.
pub const TAG: usize = 32;
/// Largest datagram sent: fits a 1280-byte IPv6 minimum MTU with headers.
pub const MAX_DATAGRAM: usize = 1200;
/// How far a datagram's time may be from the receiver's clock, ms.
pub const WINDOW_MS: u64 = 60_000;
/// Senders whose sequence numbers a receiver remembers.
const MAX_SENDERS: usize = 256;
/// Shortest key accepted, bytes.
pub const MIN_KEY: usize = 16;

type HmacSha256 = Hmac<Sha256>;

/// One synced flow: its key and the address of the backend it is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncEntry {
    /// The flow's 5-tuple as the datapath keys it.
    pub key: FlowKey,
    /// Its backend's address.
    pub backend: IpAddr,
    /// Time since the sender last saw the flow (connection-table units).
    pub idle: u16,
}

/// Why a datagram was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Too short, bad magic or version, or entries that do not parse.
    Malformed,
    /// The tag does not verify with our key.
    Unauthenticated,
    /// Sequence number not above the last accepted from its sender, or
    /// a time outside the window.
    Stale,
}

fn entry_len(e: &SyncEntry) -> usize {
    let a = if e.key.is_v6() { 16 } else { 4 };
    let b = if e.backend.is_ipv6() { 16 } else { 4 };
    8 + 2 * a + b
}

fn tag(key: &[u8], bytes: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length: `new_from_slice` cannot fail.
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    m.update(bytes);
    m
}

/// Datagrams carrying `entries` from `sender`, numbered from `*seq` on
/// (advanced past them), each at most `MAX_DATAGRAM` bytes.
pub fn encode(key: &[u8], sender: u64, seq: &mut u64, time_ms: u64, entries: &[SyncEntry]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = entries;
    while !rest.is_empty() {
        let mut body = Vec::with_capacity(MAX_DATAGRAM);
        let mut n = 0usize;
        for e in rest {
            if HEADER + body.len() + entry_len(e) + TAG > MAX_DATAGRAM || n == u16::MAX as usize {
                break;
            }
            let flags = e.key.is_v6() as u8 | (e.backend.is_ipv6() as u8) << 1;
            body.extend_from_slice(&[flags, e.key.vip.proto]);
            body.extend_from_slice(&u16::from_be(e.key.sport_be).to_be_bytes());
            body.extend_from_slice(&u16::from_be(e.key.vip.port_be).to_be_bytes());
            body.extend_from_slice(&e.idle.to_be_bytes());
            let a = e.key.addr_len();
            body.extend_from_slice(&e.key.src[..a]);
            body.extend_from_slice(&e.key.vip.addr[..a]);
            match e.backend {
                IpAddr::V4(b) => body.extend_from_slice(&b.octets()),
                IpAddr::V6(b) => body.extend_from_slice(&b.octets()),
            }
            n += 1;
        }
        let mut d = Vec::with_capacity(HEADER + body.len() + TAG);
        d.extend_from_slice(MAGIC);
        d.extend_from_slice(&[VERSION, 0]);
        d.extend_from_slice(&(n as u16).to_be_bytes());
        d.extend_from_slice(&sender.to_be_bytes());
        *seq += 1;
        d.extend_from_slice(&seq.to_be_bytes());
        d.extend_from_slice(&time_ms.to_be_bytes());
        d.extend_from_slice(&body);
        let t = tag(key, &d).finalize().into_bytes();
        d.extend_from_slice(&t);
        out.push(d);
        rest = &rest[n..];
    }
    out
}

/// A verified datagram's contents.
#[derive(Debug, PartialEq, Eq)]
pub struct Datagram {
    /// Who sent it.
    pub sender: u64,
    /// Its sequence number.
    pub seq: u64,
    /// Sender's clock, ms since the epoch.
    pub time_ms: u64,
    /// The flows.
    pub entries: Vec<SyncEntry>,
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[i..i + 8]);
    u64::from_be_bytes(w)
}

/// Verify and parse a datagram (the tag first: nothing unauthenticated is
/// parsed further than its length).
pub fn decode(key: &[u8], d: &[u8]) -> Result<Datagram, Refused> {
    if d.len() < HEADER + TAG || d.len() > 65_535 {
        return Err(Refused::Malformed);
    }
    let (signed, t) = d.split_at(d.len() - TAG);
    tag(key, signed).verify_slice(t).map_err(|_| Refused::Unauthenticated)?;
    if &signed[..4] != MAGIC || signed[4] != VERSION || signed[5] != 0 {
        return Err(Refused::Malformed);
    }
    let count = u16_at(signed, 6) as usize;
    let (sender, seq, time_ms) = (u64_at(signed, 8), u64_at(signed, 16), u64_at(signed, 24));
    let mut entries = Vec::with_capacity(count.min(MAX_DATAGRAM / 20));
    let mut i = HEADER;
    for _ in 0..count {
        let flags = *signed.get(i).ok_or(Refused::Malformed)?;
        if flags & !3 != 0 {
            return Err(Refused::Malformed);
        }
        let (a, b) = (if flags & 1 != 0 { 16 } else { 4 }, if flags & 2 != 0 { 16 } else { 4 });
        let len = 8 + 2 * a + b;
        let e = signed.get(i..i + len).ok_or(Refused::Malformed)?;
        let mut key = FlowKey::default();
        key.vip.proto = e[1];
        key.sport_be = u16_at(e, 2).to_be();
        key.vip.port_be = u16_at(e, 4).to_be();
        key.src[..a].copy_from_slice(&e[8..8 + a]);
        key.vip.addr[..a].copy_from_slice(&e[8 + a..8 + 2 * a]);
        key.vip.family = if a == 16 { FAMILY_V6 } else { FAMILY_V4 };
        let idle = u16_at(e, 6);
        let raw = &e[8 + 2 * a..];
        let backend = if b == 16 {
            let mut o = [0u8; 16];
            o.copy_from_slice(raw);
            IpAddr::V6(Ipv6Addr::from(o))
        } else {
            IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
        };
        entries.push(SyncEntry { key, backend, idle });
        i += len;
    }
    if i != signed.len() {
        return Err(Refused::Malformed);
    }
    Ok(Datagram { sender, seq, time_ms, entries })
}

/// The last sequence number accepted from each sender (bounded).
#[derive(Default, Debug)]
pub struct Replay {
    last: HashMap<u64, (u64, u64)>,
}

impl Replay {
    /// Whether `d` is fresh at `now_ms` (then remembered as the last).
    pub fn accept(&mut self, d: &Datagram, now_ms: u64) -> Result<(), Refused> {
        if d.time_ms.abs_diff(now_ms) > WINDOW_MS {
            return Err(Refused::Stale);
        }
        if self.last.get(&d.sender).is_some_and(|&(seq, _)| d.seq <= seq) {
            return Err(Refused::Stale);
        }
        if !self.last.contains_key(&d.sender) && self.last.len() >= MAX_SENDERS {
            // Forget the sender heard from longest ago (its datagrams are
            // past the window by now, or it is one of too many).
            if let Some(old) = self.last.iter().min_by_key(|(_, &(_, t))| t).map(|(s, _)| *s) {
                self.last.remove(&old);
            }
        }
        self.last.insert(d.sender, (d.seq, now_ms));
        Ok(())
    }
}

/// A VIP key's family check used by decode's callers: the entry's flow and
/// VIP agree in family by construction; this says whether a backend
/// address can serve it (same family).
pub fn same_family(vip: &VipKey, backend: IpAddr) -> bool {
    (vip.family == FAMILY_V6) == backend.is_ipv6()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{PROTO_TCP, PROTO_UDP};

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn entries(n: usize) -> Vec<SyncEntry> {
        (0..n)
            .map(|i| {
                if i % 3 == 2 {
                    let k = FlowKey {
                        src: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, (i >> 8) as u8, i as u8],
                        vip: VipKey { addr: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], port_be: 443u16.to_be(), proto: PROTO_UDP, family: FAMILY_V6 },
                        sport_be: (40000 + i as u16).to_be(),
                        ..Default::default()
                    };
                    SyncEntry { key: k, backend: "fd00::11".parse().expect("ip"), idle: i as u16 }
                } else {
                    let k = FlowKey::v4([10, 0, (i >> 8) as u8, i as u8], (1024 + i as u16).to_be(), [10, 0, 0, 100], 80u16.to_be(), PROTO_TCP);
                    SyncEntry { key: k, backend: IpAddr::V4(Ipv4Addr::new(10, 0, 1, (i % 7) as u8 + 1)), idle: u16::MAX - i as u16 }
                }
            })
            .collect()
    }

    #[test]
    fn entries_round_trip_in_bounded_datagrams() {
        let all = entries(500);
        let mut seq = 41;
        let ds = encode(KEY, 7, &mut seq, 1_000, &all);
        assert!(ds.len() > 1 && ds.iter().all(|d| d.len() <= MAX_DATAGRAM), "{} datagrams", ds.len());
        assert_eq!(seq, 41 + ds.len() as u64);
        let mut back = Vec::new();
        for (i, d) in ds.iter().enumerate() {
            let g = decode(KEY, d).expect("valid");
            assert_eq!((g.sender, g.seq, g.time_ms), (7, 42 + i as u64, 1_000));
            back.extend(g.entries);
        }
        assert_eq!(back, all);
        assert!(encode(KEY, 7, &mut seq, 0, &[]).is_empty());
    }

    #[test]
    fn forged_truncated_or_foreign_datagrams_are_refused() {
        let mut seq = 0;
        let d = encode(KEY, 1, &mut seq, 5, &entries(10)).remove(0);
        assert_eq!(decode(b"another key, also 32 bytes long!", &d), Err(Refused::Unauthenticated));
        for i in [0, 7, HEADER + 3, d.len() - 1] {
            let mut bad = d.clone();
            bad[i] ^= 0x40;
            assert_eq!(decode(KEY, &bad), Err(Refused::Unauthenticated), "bit flipped at {i}");
        }
        assert_eq!(decode(KEY, &d[..d.len() - 5]), Err(Refused::Unauthenticated));
        assert_eq!(decode(KEY, &d[..HEADER]), Err(Refused::Malformed));
        assert_eq!(decode(KEY, &[]), Err(Refused::Malformed));
        // Well signed but inconsistent: a count beyond the entries, a bad
        // flag, trailing bytes, another version.
        let resign = |mut body: Vec<u8>| {
            let t = tag(KEY, &body).finalize().into_bytes();
            body.extend_from_slice(&t);
            body
        };
        let signed = d[..d.len() - TAG].to_vec();
        let mut more = signed.clone();
        more[7] += 1;
        assert_eq!(decode(KEY, &resign(more)), Err(Refused::Malformed));
        let mut flag = signed.clone();
        flag[HEADER] = 0x80;
        assert_eq!(decode(KEY, &resign(flag)), Err(Refused::Malformed));
        let mut tail = signed.clone();
        tail.push(0);
        assert_eq!(decode(KEY, &resign(tail)), Err(Refused::Malformed));
        let mut v2 = signed.clone();
        v2[4] = 2;
        assert_eq!(decode(KEY, &resign(v2)), Err(Refused::Malformed));
        assert!(decode(KEY, &resign(signed)).is_ok());
    }

    #[test]
    fn replays_and_old_datagrams_are_stale() {
        let mut r = Replay::default();
        let g = |sender, seq, time_ms| Datagram { sender, seq, time_ms, entries: Vec::new() };
        let now = 1_000_000;
        assert_eq!(r.accept(&g(1, 5, now), now), Ok(()));
        assert_eq!(r.accept(&g(1, 5, now), now), Err(Refused::Stale), "the same datagram again");
        assert_eq!(r.accept(&g(1, 4, now), now), Err(Refused::Stale));
        assert_eq!(r.accept(&g(1, 6, now), now), Ok(()));
        assert_eq!(r.accept(&g(2, 1, now), now), Ok(()), "another sender has its own numbers");
        assert_eq!(r.accept(&g(3, 1, now - WINDOW_MS - 1), now), Err(Refused::Stale), "too old");
        assert_eq!(r.accept(&g(3, 1, now + WINDOW_MS + 1), now), Err(Refused::Stale), "from the future");
        for s in 10..10 + MAX_SENDERS as u64 {
            assert_eq!(r.accept(&g(s, 1, now), now + s), Ok(()));
        }
        assert!(r.last.len() <= MAX_SENDERS);
    }
}
