//! `--answer-ping`: an ICMP/ICMPv6 echo request to a VIP address is turned
//! into its reply in place and sent back out (XDP_TX), so monitoring can
//! ping a VIP. MACs and IP addresses are swapped, the type becomes echo
//! reply, the hop limit a fresh 64, and the checksums are updated
//! incrementally (RFC 1624): swapping addresses leaves both the IPv4 header
//! checksum and the ICMPv6 pseudo-header sum unchanged, so only the words
//! that change are folded in.

use aya_ebpf::programs::XdpContext;
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::pkt;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMPV6_ECHO_REPLY: u8 = 129;
/// TTL / hop limit of a reply (Linux's default).
const REPLY_TTL: u8 = 64;

/// One's-complement checksum `check` (as a big-endian number) after a
/// 16-bit word of the data changed from `old` to `new` (RFC 1624, eqn. 3).
#[inline(always)]
fn csum_replace(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = (!check) as u32 + (!old) as u32 + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Rewrite the echo request whose IP header is at `l3` into its reply.
#[inline(always)]
pub fn reply(ctx: &XdpContext, l3: usize, v6: bool) -> Result<(), ()> {
    let macs = pkt::macs(ctx).ok_or(())?;
    let mut client = [0u8; 6];
    client.copy_from_slice(&macs[6..]);
    let mut ours = [0u8; 6];
    ours.copy_from_slice(&macs[..6]);
    macs[..6].copy_from_slice(&client);
    macs[6..].copy_from_slice(&ours);
    if v6 {
        let ip: *mut Ipv6Hdr = pkt::ptr_mut_at(ctx, l3).ok_or(())?;
        let icmp: *mut [u8; 4] = pkt::ptr_mut_at(ctx, l3 + Ipv6Hdr::LEN).ok_or(())?;
        // SAFETY: both pointers were bounds-checked by `ptr_mut_at`; the
        // frame is this program's alone while it runs.
        unsafe {
            core::mem::swap(&mut (*ip).src_addr, &mut (*ip).dst_addr);
            (*ip).hop_limit = REPLY_TTL;
            retype(&mut *icmp, ICMPV6_ECHO_REPLY);
        }
    } else {
        let ip: *mut Ipv4Hdr = pkt::ptr_mut_at(ctx, l3).ok_or(())?;
        let icmp: *mut [u8; 4] = pkt::ptr_mut_at(ctx, l3 + Ipv4Hdr::LEN).ok_or(())?;
        // SAFETY: as above.
        unsafe {
            core::mem::swap(&mut (*ip).src_addr, &mut (*ip).dst_addr);
            let old = u16::from_be_bytes([(*ip).ttl, (*ip).proto]);
            let new = u16::from_be_bytes([REPLY_TTL, (*ip).proto]);
            (*ip).ttl = REPLY_TTL;
            let c = csum_replace(u16::from_be_bytes((*ip).check), old, new);
            (*ip).check = c.to_be_bytes();
            retype(&mut *icmp, ICMP_ECHO_REPLY);
        }
    }
    Ok(())
}

/// Set the ICMP type (first byte) and fix the checksum (bytes 2..4).
#[inline(always)]
fn retype(icmp: &mut [u8; 4], ty: u8) {
    let old = u16::from_be_bytes([icmp[0], icmp[1]]);
    let new = u16::from_be_bytes([ty, icmp[1]]);
    icmp[0] = ty;
    let c = csum_replace(u16::from_be_bytes([icmp[2], icmp[3]]), old, new);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
}
