//! L2 direct server return: the frame keeps its IP packet untouched (the
//! backend holds the VIP on loopback) and only its MACs change.

use aya_ebpf::programs::XdpContext;
use lb_common::BackendInfo;

use crate::parse::ptr_mut_at;

/// Destination MAC := the backend's, source MAC := the balancer's.
#[inline(always)]
pub fn rewrite(ctx: &XdpContext, be: &BackendInfo) -> Result<(), ()> {
    let macs: *mut [u8; 12] = ptr_mut_at(ctx, 0).ok_or(())?;
    // SAFETY: `ptr_mut_at` checked that 12 bytes lie inside the frame.
    let macs = unsafe { &mut *macs };
    macs[..6].copy_from_slice(&be.dst_mac);
    macs[6..].copy_from_slice(&be.src_mac);
    Ok(())
}
