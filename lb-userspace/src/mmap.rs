//! A `BPF_F_MMAPABLE` array's values mapped into this process. One owner of
//! the mapping (unmapped on drop) for every map read or written as memory:
//! the ring tables, the connection table and the flow keys.

use anyhow::{bail, Result};
use aya::maps::MapData;
use std::os::fd::{AsFd, AsRawFd};

/// The first bytes of a map's values, mapped shared (rounded up to pages).
pub struct MapMem {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is owned by this value alone and unmapped once, on
// drop; the kernel keeps the memory alive while it is mapped. Its users read
// and write it with volatile accesses, as the datapath's other CPUs do.
unsafe impl Send for MapMem {}
// SAFETY: as above; `&self` hands out only the base pointer.
unsafe impl Sync for MapMem {}

impl MapMem {
    /// Map the first `bytes` of `data`'s values (`writable` for stores).
    pub fn new(data: &MapData, bytes: usize, writable: bool) -> Result<MapMem> {
        Self::with_flags(data, bytes, writable, 0)
    }

    /// `new` with its pages faulted in now (`MAP_POPULATE`): later stores
    /// take no page fault (a table is written on a request's path).
    pub fn populated(data: &MapData, bytes: usize, writable: bool) -> Result<MapMem> {
        Self::with_flags(data, bytes, writable, libc::MAP_POPULATE)
    }

    fn with_flags(data: &MapData, bytes: usize, writable: bool, extra: libc::c_int) -> Result<MapMem> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let len = bytes.div_ceil(page) * page;
        let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
        let fd = data.fd().as_fd().as_raw_fd();
        // SAFETY: a new shared mapping of the map's value area (the kernel
        // checks the length and the flags against the map and fails whole);
        // nothing aliases it.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED | extra, fd, 0) };
        if p == libc::MAP_FAILED {
            bail!("{}", std::io::Error::last_os_error());
        }
        Ok(MapMem { ptr: p.cast(), len })
    }

    /// The base of the mapping, as `T`s.
    pub fn base<T>(&self) -> *mut T {
        self.ptr.cast()
    }
}

impl Drop for MapMem {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
