//! QUIC connection-ID routing (`--quic` VIPs): the connection-ID encoding
//! xlb reads, shared by the datapath (which reads it), the agent (which
//! writes the server-ID map) and the tests (which build packets with it).
//!
//! The encoding is the plaintext algorithm of the IETF QUIC-LB draft
//! (draft-ietf-quic-load-balancers) with one configuration:
//!
//! ```text
//! DCID octet 0:    CR (top 3 bits, config rotation) | 5 bits the server owns
//!                  (the draft's CID length self-description, length − 1,
//!                  or random; xlb does not read them)
//! DCID octets 1-2: server ID, big-endian (`SERVER_ID_LEN`), 1..=65535
//! DCID octets 3-:  the server's own (nonce)
//! ```
//!
//! Only connection IDs whose CR is `CONFIG_ID` are routed; `0b111` is the
//! draft's "unroutable" and any other value a configuration xlb does not
//! have: such packets, server ID 0, and every Initial/0-RTT packet (their
//! DCID is the client's random choice) go by the VIP's algorithm.

/// Bytes of a server ID, right after the connection ID's first octet.
pub const SERVER_ID_LEN: usize = 2;
/// The config rotation value (top 3 bits of the DCID's first octet) of
/// xlb's one configuration: routed. Others fall back to the hash.
pub const CONFIG_ID: u8 = 0;
/// Config rotation value the draft reserves for unroutable connection IDs.
pub const CR_UNROUTABLE: u8 = 0b111;
/// Shortest connection ID that holds a server ID (first octet + ID).
pub const MIN_CID_LEN: u8 = 1 + SERVER_ID_LEN as u8;
/// Longest connection ID of QUIC version 1 and 2 (RFC 9000 §17.2).
pub const MAX_CID_LEN: u8 = 20;
/// Default short-header DCID length (`xlb agent --quic-cid-len`): short
/// headers do not carry it, so every server of the balancer uses one length.
pub const DEFAULT_CID_LEN: u8 = 8;

/// First octet: long header form.
pub const LONG_HEADER: u8 = 0x80;
/// First octet: the fixed bit, set in every QUIC v1/v2 packet.
pub const FIXED_BIT: u8 = 0x40;
/// QUIC version 1 (RFC 9000).
pub const VERSION_1: u32 = 1;
/// QUIC version 2 (RFC 9369).
pub const VERSION_2: u32 = 0x6b33_43cf;
/// Long-header packet type of a Handshake packet (bits 5-4 of the first
/// octet) in version 1 and in version 2: the only long headers whose DCID
/// the server chose (Initial and 0-RTT carry the client's random one;
/// Retry is sent by servers).
pub const HANDSHAKE_V1: u8 = 2;
/// See `HANDSHAKE_V1`.
pub const HANDSHAKE_V2: u8 = 3;

/// Key of the server-ID map (`XLB_QUIC_IDS` → backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct QuicIdKey {
    /// The VIP's id.
    pub vip_id: u32,
    /// The server ID (1..=65535) of one of its backends.
    pub server_id: u32,
}

impl QuicIdKey {
    /// The key of `server_id` in the VIP `vip_id`.
    #[inline(always)]
    pub const fn new(vip_id: u32, server_id: u16) -> QuicIdKey {
        QuicIdKey { vip_id, server_id: server_id as u32 }
    }
}

/// The server ID of a connection ID whose first three octets are `head`,
/// or 0 (none) when its config rotation is not xlb's.
#[inline(always)]
pub const fn server_id(head: [u8; 3]) -> u16 {
    if head[0] >> 5 != CONFIG_ID {
        return 0;
    }
    u16::from_be_bytes([head[1], head[2]])
}

/// Whether a long header's packet type (bits 5-4 of its first octet)
/// under `version` is a Handshake packet (routed by its DCID).
#[inline(always)]
pub const fn is_handshake(version: u32, first: u8) -> bool {
    let t = (first >> 4) & 3;
    (version == VERSION_1 && t == HANDSHAKE_V1) || (version == VERSION_2 && t == HANDSHAKE_V2)
}

/// A connection ID carrying `server_id` (config rotation `CONFIG_ID`, the
/// low 5 bits of the first octet self-describing the length as the draft
/// allows), the rest from `nonce`: what a backend issues.
pub fn encode_cid<const N: usize>(server_id: u16, nonce: &[u8]) -> [u8; N] {
    let mut cid = [0u8; N];
    cid[0] = (CONFIG_ID << 5) | ((N as u8).saturating_sub(1) & 0x1f);
    let id = server_id.to_be_bytes();
    cid[1] = id[0];
    cid[2] = id[1];
    for (i, b) in cid.iter_mut().skip(MIN_CID_LEN as usize).enumerate() {
        *b = nonce.get(i).copied().unwrap_or(0);
    }
    cid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips() {
        let c: [u8; 8] = encode_cid(0x1234, &[9; 5]);
        assert_eq!(c, [7, 0x12, 0x34, 9, 9, 9, 9, 9]);
        assert_eq!(server_id([c[0], c[1], c[2]]), 0x1234);
        assert_eq!(server_id([CR_UNROUTABLE << 5, 0x12, 0x34]), 0, "unroutable");
        assert_eq!(server_id([1 << 5, 0x12, 0x34]), 0, "another configuration");
        assert!(is_handshake(VERSION_1, 0xe0));
        assert!(!is_handshake(VERSION_1, 0xc0), "v1 Initial");
        assert!(!is_handshake(VERSION_1, 0xd0), "v1 0-RTT");
        assert!(is_handshake(VERSION_2, 0xf0));
        assert!(!is_handshake(VERSION_2, 0xe0), "v2 0-RTT");
        assert!(!is_handshake(0xff00_001d, 0xe0), "unknown version");
    }
}
