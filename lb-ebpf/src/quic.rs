//! QUIC connection-ID routing (`--quic` VIPs): a packet whose destination
//! connection ID carries a server ID (`lb_common::quic` has the encoding)
//! goes to the backend with that ID, so a client whose address or port
//! changes (NAT rebinding, connection migration) stays on its backend.
//!
//! Read only on a connection-table miss of a `--quic` VIP (a flow's first
//! packet, or the first from a client's new address or port, or after its
//! entry was evicted): the new 5-tuple's entry then names the backend the
//! connection ID named. Short headers carry no DCID length: it is the
//! agent's `--quic-cid-len` (`XLB_QUIC_CID_LEN`); long headers carry it,
//! and only Handshake packets among them are routed.

use aya_ebpf::{bindings::xdp_md, helpers::bpf_xdp_load_bytes, programs::XdpContext};
use lb_common::{
    quic::{is_handshake, server_id, FIXED_BIT, LONG_HEADER, MAX_CID_LEN, MIN_CID_LEN},
    BackendInfo, QuicIdKey, Stat, StatBlock, VipInfo, PROTO_UDP,
};

use crate::{
    maps::{BACKENDS, QUIC_IDS},
    parse::Packet,
    stats,
};

/// DCID length of short-header packets (set by the agent at load time:
/// `--quic-cid-len`; every server of the balancer issues this length).
#[no_mangle]
static XLB_QUIC_CID_LEN: u8 = lb_common::quic::DEFAULT_CID_LEN;

/// `route`'s answer when the packet goes by the VIP's algorithm.
const NONE: u32 = u32::MAX;
const UDP_HDR_LEN: usize = 8;
/// Long header: first octet, version (4), DCID length, then the DCID.
const LONG_DCID_OFF: usize = 6;

/// The backend a `--quic` VIP's packet goes to by its connection ID, if
/// any (counted either way); `None`: schedule it as usual.
#[inline(always)]
pub fn backend<'a>(ctx: &XdpContext, pkt: &Packet, vip: &VipInfo, stats: &mut StatBlock) -> Option<(u32, &'a BackendInfo)> {
    if !vip.is_quic() || pkt.key.vip.proto != PROTO_UDP {
        return None;
    }
    let id = route(ctx.ctx, pkt.l4 as usize, vip.vip_id, stats);
    if id == NONE {
        return None;
    }
    BACKENDS.get(id).map(|b| (id, b))
}

/// The backend id the connection ID of the UDP datagram at `l4` names in
/// the VIP `vip_id`, or `NONE`; counts the outcome.
///
/// Not inlined: a BPF subprogram whose result is one scalar, so the
/// verifier meets the caller's state once after the call however the
/// connection ID was judged (inlined, each outcome multiplied the states
/// of the scheduling and forwarding that follow, past the verifier's
/// instruction limit in `xlb_trace`). It reads the frame with
/// `bpf_xdp_load_bytes` into its own stack, so it takes only the context
/// pointer and scalars: LLVM may not turn the context into the packet
/// pointers it would load (the verifier forbids the shifts that follow).
#[inline(never)]
fn route(raw: *mut xdp_md, l4: usize, vip_id: u32, stats: &mut StatBlock) -> u32 {
    let (stat, id) = match judge(raw, l4, vip_id) {
        Ok(id) => (Stat::QuicRouted, id),
        Err(stat) => (stat, NONE),
    };
    stats::count(stats, stat);
    id
}

/// `route`'s decision: the backend id, or the event that says why not.
#[inline(always)]
fn judge(raw: *mut xdp_md, l4: usize, vip_id: u32) -> Result<u32, Stat> {
    let sid = packet_server_id(raw, l4).ok_or(Stat::QuicNoId)?;
    // SAFETY: the value is copied out at once; the agent replaces entries whole.
    let id = unsafe { QUIC_IDS.get(&QuicIdKey::new(vip_id, sid)) }.copied().ok_or(Stat::QuicUnknownId)?;
    match BACKENDS.get(id) {
        Some(be) if be.vip_id == vip_id && be.is_alive() => Ok(id),
        Some(be) if be.vip_id == vip_id => Err(Stat::QuicFallback),
        _ => Err(Stat::QuicUnknownId),
    }
}

/// Where the bytes `route` reads start in the UDP header: its length.
const UDP_LEN_OFF: usize = 4;
/// The UDP length and checksum, then the QUIC header's first bytes up to a
/// long header's server ID: first octet, version (4), DCID length, DCID
/// octets 0-2. (Kept small: this subprogram's stack adds to `xlb_trace`'s
/// within the verifier's 512-byte limit.)
const HEAD_LEN: usize = UDP_HDR_LEN - UDP_LEN_OFF + LONG_DCID_OFF + MIN_CID_LEN as usize;

/// The non-zero server ID in the DCID of the QUIC packet in the UDP
/// datagram at `l4`, if it has a routable one. (Every real QUIC packet is
/// longer than the 9 bytes read: header protection samples 16 bytes after
/// a 4-byte packet number offset, RFC 9001 §5.4.2.)
#[inline(always)]
fn packet_server_id(raw: *mut xdp_md, l4: usize) -> Option<u16> {
    let mut b = [0u8; HEAD_LEN];
    // SAFETY: the helper writes at most `HEAD_LEN` bytes into `b` and
    // fails (non-zero) when they are not all inside the frame.
    if unsafe { bpf_xdp_load_bytes(raw, (l4 + UDP_LEN_OFF) as u32, b.as_mut_ptr().cast(), HEAD_LEN as u32) } != 0 {
        return None;
    }
    let payload_len = (u16::from_be_bytes([b[0], b[1]]) as usize).checked_sub(UDP_HDR_LEN)?;
    let h = &b[UDP_HDR_LEN - UDP_LEN_OFF..];
    if h[0] & FIXED_BIT == 0 {
        return None;
    }
    let sid = if h[0] & LONG_HEADER == 0 {
        // SAFETY: a plain read of a load-time constant; volatile so it is
        // not folded at build time.
        let cid_len = unsafe { core::ptr::read_volatile(&XLB_QUIC_CID_LEN) } as usize;
        if payload_len < 1 + cid_len {
            return None;
        }
        server_id([h[1], h[2], h[3]])
    } else {
        let version = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
        let cid_len = h[5];
        if !is_handshake(version, h[0]) || !(MIN_CID_LEN..=MAX_CID_LEN).contains(&cid_len) {
            return None;
        }
        if payload_len < LONG_DCID_OFF + cid_len as usize {
            return None;
        }
        server_id([h[6], h[7], h[8]])
    };
    (sid != 0).then_some(sid)
}
