//! The flow hash: a 32-bit Murmur3-style mix of the 5-tuple.
//!
//! The XDP program uses it to index a VIP's Maglev table; the agent and the
//! tests use the same code to predict which backend a flow lands on. It has no
//! seed, so every balancer running the same tables makes the same choice.

use crate::FlowKey;

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

#[inline(always)]
fn mix(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Bytes `i..i + 4` as a native-endian word (`addr_words`: one load in a `FlowKey`).
#[inline(always)]
fn word(a: &[u8; 16], i: usize) -> u32 {
    crate::addr_words(a)[i / 4]
}

/// Hash of a flow's 5-tuple (addresses, ports, protocol).
#[inline(always)]
pub fn flow_hash(k: &FlowKey) -> u32 {
    let mut h = mix(0, word(&k.src, 0));
    h = mix(h, word(&k.vip.addr, 0));
    if k.addr_len() == 16 {
        h = mix(h, word(&k.src, 4));
        h = mix(h, word(&k.src, 8));
        h = mix(h, word(&k.src, 12));
        h = mix(h, word(&k.vip.addr, 4));
        h = mix(h, word(&k.vip.addr, 8));
        h = mix(h, word(&k.vip.addr, 12));
    }
    h = mix(h, ((k.sport_be as u32) << 16) | k.vip.port_be as u32);
    h = mix(h, k.vip.proto as u32);
    fmix(h)
}

/// Hash of the flow's source address only (source-hash scheduling).
#[inline(always)]
pub fn src_hash(k: &FlowKey) -> u32 {
    let mut h = mix(0, word(&k.src, 0));
    if k.addr_len() == 16 {
        h = mix(h, word(&k.src, 4));
        h = mix(h, word(&k.src, 8));
        h = mix(h, word(&k.src, 12));
    }
    fmix(h)
}

/// Hash of the destination port only (`--hash dst-port`): every flow to
/// one port, from any client and to any address of the VIP, gets the same
/// value.
#[inline(always)]
pub fn dst_port_hash(k: &FlowKey) -> u32 {
    fmix(mix(0, k.vip.port_be as u32))
}

/// The hash a Maglev VIP indexes its table with: the 5-tuple, or the
/// destination port for `--hash dst-port` VIPs. The datapath and every
/// prediction (`xlb explain`, tests) use this one function.
#[inline(always)]
pub fn maglev_hash(vip: &crate::VipInfo, k: &FlowKey) -> u32 {
    if vip.hashes_dst_port() {
        dst_port_hash(k)
    } else {
        flow_hash(k)
    }
}

/// A general 32-bit hash of bytes with a seed (used for Maglev permutations).
pub fn bytes_hash(data: &[u8], seed: u32) -> u32 {
    let mut h = seed;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        h = mix(h, u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    }
    let mut tail = 0u32;
    for (i, b) in chunks.remainder().iter().enumerate() {
        tail |= (*b as u32) << (8 * i);
    }
    h = mix(h, tail ^ data.len() as u32);
    fmix(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{addr_v4, VipKey, FAMILY_V4, PROTO_TCP};

    fn key(sport: u16) -> FlowKey {
        FlowKey {
            src: addr_v4([10, 0, 0, 1]),
            sport_be: sport.to_be(),
            _pad: 0,
            vip: VipKey {
                addr: addr_v4([10, 0, 0, 100]),
                port_be: 80u16.to_be(),
                proto: PROTO_TCP,
                family: FAMILY_V4,
            },
        }
    }

    #[test]
    fn deterministic_and_sensitive_to_every_field() {
        let k = key(1234);
        assert_eq!(flow_hash(&k), flow_hash(&k));
        assert_ne!(flow_hash(&k), flow_hash(&key(1235)));
        let mut k2 = k;
        k2.vip.proto = 17;
        assert_ne!(flow_hash(&k), flow_hash(&k2));
        let mut k3 = k;
        k3.src[3] = 2;
        assert_ne!(flow_hash(&k), flow_hash(&k3));
    }

    #[test]
    fn spreads_sequential_ports() {
        // 64k sequential source ports into 16 buckets: each within 5% of even.
        let mut buckets = [0u32; 16];
        for p in 0..65536u32 {
            buckets[(flow_hash(&key(p as u16)) % 16) as usize] += 1;
        }
        for b in buckets {
            assert!((3891..=4301).contains(&b), "bucket {b}");
        }
    }
}

/// Golden vectors: every balancer of a cluster must hash a flow the same
/// way (ECMP and VRRP failover move flows between nodes that only agree
/// through this function). A change that breaks these splits a cluster of
/// mixed versions: it needs a `LAYOUT_VERSION` bump and a release note.
#[cfg(test)]
mod golden {
    use super::*;

    /// `dst_port_hash` of any flow to port 80.
    const DST_PORT_80: u32 = 0x8f2591d0;
    use crate::{FlowKey, PROTO_TCP, PROTO_UDP};

    #[test]
    fn flow_and_source_hashes_are_pinned() {
        let v4 = FlowKey::v4([192, 0, 2, 7], 40000u16.to_be(), [10, 0, 0, 100], 80u16.to_be(), PROTO_TCP);
        let v4u = FlowKey::v4([198, 51, 100, 9], 5353u16.to_be(), [10, 0, 0, 100], 53u16.to_be(), PROTO_UDP);
        let mut s6 = [0u8; 16];
        s6[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        s6[15] = 7;
        let mut d6 = [0u8; 16];
        d6[0] = 0xfd;
        d6[14..].copy_from_slice(&[1, 1]);
        let v6 = FlowKey::v6(s6, 50000u16.to_be(), d6, 443u16.to_be(), PROTO_TCP);
        assert_eq!(flow_hash(&v4), 0x45734c00);
        assert_eq!(flow_hash(&v4u), 0xdb775f86);
        assert_eq!(flow_hash(&v6), 0xc6d226ec);
        assert_eq!(src_hash(&v4), 0x82e15499);
        assert_eq!(src_hash(&v6), 0xedc06d78);
        assert_eq!(bytes_hash(&[10, 0, 1, 1], 0x5851_f42d), 0x5f76beea);
        assert_eq!(dst_port_hash(&v4), DST_PORT_80);
        assert_eq!(dst_port_hash(&v6), dst_port_hash(&FlowKey::v4([1, 2, 3, 4], 9, [5, 6, 7, 8], 443u16.to_be(), PROTO_UDP)));
        assert_eq!(bytes_hash(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3], 7), 0xbacfc91f);
    }
}
