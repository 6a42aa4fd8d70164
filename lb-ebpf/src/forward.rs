//! L2 direct server return: the frame keeps its IP packet untouched (the
//! backend holds the VIP on loopback) and only its MACs change.

use aya_ebpf::programs::XdpContext;
use lb_common::BackendInfo;

use crate::pkt;

/// Destination MAC := the backend's, source MAC := the balancer's.
#[inline(always)]
pub fn rewrite(ctx: &XdpContext, be: &BackendInfo) -> Result<(), ()> {
    let macs = pkt::macs(ctx).ok_or(())?;
    macs[..6].copy_from_slice(&be.dst_mac);
    macs[6..].copy_from_slice(&be.src_mac);
    Ok(())
}
