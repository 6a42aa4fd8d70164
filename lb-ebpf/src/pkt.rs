//! Packet access: every read or write of frame bytes goes through these
//! bounds-checked helpers (the verifier demands the check; the helpers make
//! it impossible to forget).

use aya_ebpf::programs::XdpContext;
use core::mem::size_of;
use lb_common::Stat;

/// Header lengths and the numbers that name them.
pub const ETH_LEN: usize = 14;
pub const ETH_P_IP: [u8; 2] = [0x08, 0x00];
pub const ETH_P_IPV6: [u8; 2] = [0x86, 0xdd];
pub const IPV4_LEN: usize = 20;
pub const IPV6_LEN: usize = 40;
pub const UDP_LEN: usize = 8;
/// IP protocol numbers of IPv4 and IPv6 as payloads.
pub const PROTO_IPIP: u8 = 4;
pub const PROTO_IPV6: u8 = 41;

/// A pointer to a `T` at `off` bytes into the frame, if all of it is inside.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + off + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *const T)
}

/// `N` 32-bit words at `off` (each `u32::from_ne_bytes` of four frame
/// bytes), if all inside: one load per word wherever the frame places
/// them. LLVM's BPF backend splits a load it cannot prove aligned into
/// single bytes (and the frame's alignment is unknown to it), while the
/// kernel accepts misaligned loads from packet data on the architectures
/// that handle them (x86-64, arm64: `HAVE_EFFICIENT_UNALIGNED_ACCESS`; on
/// others the verifier rejects the program at load, with its log): so the
/// loads are written in BPF assembly.
#[inline(always)]
pub fn words<const N: usize>(ctx: &XdpContext, off: usize) -> Result<[u32; N], Stat> {
    let p: *const [u32; N] = ptr_at(ctx, off).ok_or(Stat::PassTruncated)?;
    let mut w = [0u32; N];
    for (i, x) in w.iter_mut().enumerate() {
        let v: u64;
        // SAFETY: `ptr_at` checked that the N words lie inside the frame
        // (and the verifier checks it again); the asm only loads from
        // there, touches no other memory and no stack.
        unsafe {
            core::arch::asm!(
                "{v} = *(u32 *)({p} + 0)",
                v = lateout(reg) v,
                p = in(reg) (p as *const u32).add(i),
                options(readonly, nostack, preserves_flags, pure),
            );
        }
        *x = v as u32;
    }
    Ok(w)
}

/// Mutable variant of `ptr_at`.
#[inline(always)]
pub fn ptr_mut_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    ptr_at::<T>(ctx, off).map(|p| p as *mut T)
}

/// Read a `T` at `off` (copied out), or `PassTruncated`.
#[inline(always)]
pub fn read<T: Copy>(ctx: &XdpContext, off: usize) -> Result<T, Stat> {
    let p: *const T = ptr_at(ctx, off).ok_or(Stat::PassTruncated)?;
    // SAFETY: ptr_at checked the bounds; T is plain bytes.
    Ok(unsafe { p.read_unaligned() })
}

/// The frame's 12 MAC bytes (destination, source) for rewriting in place.
#[inline(always)]
pub fn macs(ctx: &XdpContext) -> Option<&mut [u8; 12]> {
    let p: *mut [u8; 12] = ptr_mut_at(ctx, 0)?;
    // SAFETY: `ptr_mut_at` checked that 12 bytes lie inside the frame; the
    // frame is this program's alone while it runs.
    Some(unsafe { &mut *p })
}

/// Frame length in bytes.
#[inline(always)]
pub fn len(ctx: &XdpContext) -> u64 {
    (ctx.data_end() - ctx.data()) as u64
}

/// `N` frame bytes at `off` for writing in place, if all inside.
#[inline(always)]
pub fn bytes_mut<'a, const N: usize>(ctx: &XdpContext, off: usize) -> Option<&'a mut [u8; N]> {
    let p: *mut [u8; N] = ptr_mut_at(ctx, off)?;
    // SAFETY: `ptr_mut_at` checked that N bytes lie inside the frame; the
    // frame is this program's alone while it runs. Callers drop the
    // reference before the frame is resized.
    Some(unsafe { &mut *p })
}
