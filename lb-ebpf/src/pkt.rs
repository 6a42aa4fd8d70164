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

/// One 32-bit load from `$p + $off` bytes (`$off` a literal: it goes into
/// the instruction, no pointer arithmetic). Unsafe: `$p + $off` must be
/// readable for 4 bytes.
macro_rules! ldxw {
    ($p:expr, $off:literal) => {{
        let v: u64;
        core::arch::asm!(
            concat!("{v} = *(u32 *)({p} + ", $off, ")"),
            v = lateout(reg) v,
            p = in(reg) $p,
            options(readonly, nostack, preserves_flags, pure),
        );
        v as u32
    }};
}

/// One 32-bit store of `$v` to `$p + $off` bytes. Unsafe: `$p + $off`
/// must be writable for 4 bytes.
macro_rules! stxw {
    ($p:expr, $off:literal, $v:expr) => {{
        core::arch::asm!(
            concat!("*(u32 *)({p} + ", $off, ") = {v}"),
            p = in(reg) $p,
            v = in(reg) $v as u64,
            options(nostack, preserves_flags),
        );
    }};
}

/// `N` (at most 8) 32-bit words at `off`, each `u32::from_ne_bytes` of four
/// frame bytes, if all inside: one load per word wherever the frame places
/// them. LLVM's BPF backend splits a load it cannot prove aligned into
/// single bytes (the frame's alignment is unknown to it), while the kernel
/// accepts misaligned loads from packet data on the architectures that
/// handle them (x86-64, arm64: `HAVE_EFFICIENT_UNALIGNED_ACCESS`; on others
/// the verifier rejects the program at load, with its log): so the loads
/// are written in BPF assembly.
#[inline(always)]
pub fn words<const N: usize>(ctx: &XdpContext, off: usize) -> Result<[u32; N], Stat> {
    const { assert!(N <= 8) };
    let p = ptr_at::<[u32; N]>(ctx, off).ok_or(Stat::PassTruncated)?;
    // SAFETY: `ptr_at` checked that the N words lie inside the frame (the
    // verifier checks it again); the asm only loads from there.
    Ok(core::array::from_fn(|i| unsafe {
        match i {
            0 => ldxw!(p, 0),
            1 => ldxw!(p, 4),
            2 => ldxw!(p, 8),
            3 => ldxw!(p, 12),
            4 => ldxw!(p, 16),
            5 => ldxw!(p, 20),
            6 => ldxw!(p, 24),
            _ => ldxw!(p, 28),
        }
    }))
}

/// Store `w` as `N` (at most 4) 32-bit words at `off` (each word's bytes in
/// memory order), if all inside: one store per word, for the reason
/// `words` gives.
#[inline(always)]
pub fn store_words<const N: usize>(ctx: &XdpContext, off: usize, w: [u32; N]) -> Result<(), ()> {
    const { assert!(N <= 4) };
    let p = ptr_mut_at::<[u32; N]>(ctx, off).ok_or(())?;
    for (i, x) in w.iter().enumerate() {
        // SAFETY: `ptr_mut_at` checked that the N words lie inside the
        // frame (the verifier checks it again), which is this program's
        // alone while it runs; the asm stores there only.
        unsafe {
            match i {
                0 => stxw!(p, 0, *x),
                1 => stxw!(p, 4, *x),
                2 => stxw!(p, 8, *x),
                _ => stxw!(p, 12, *x),
            }
        }
    }
    Ok(())
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
