//! What identifies a deployment, so that a new one never resumes a dead
//! one's state. Pin directories and state files are named after the
//! interface and the network namespace's inode, which the kernel reuses
//! once a namespace is gone: the name finds a predecessor's leftovers, the
//! identity below (never reused while the machine runs) tells whether they
//! are ours.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::{ffi::CString, os::fd::FromRawFd, path::Path};

/// A deployment: one interface in one network namespace.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// The network namespace's cookie (`SO_NETNS_COOKIE`): a 64-bit
    /// counter, never reused, unlike the namespace's inode.
    pub netns_cookie: u64,
    /// The interface's index in that namespace.
    pub ifindex: u32,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "network namespace cookie {}, ifindex {}", self.netns_cookie, self.ifindex)
    }
}

impl Identity {
    /// This process's network namespace and `ifindex`.
    pub fn here(ifindex: u32) -> Result<Identity> {
        Ok(Identity { netns_cookie: netns_cookie()?, ifindex })
    }
}

/// The cookie of the calling thread's network namespace (Linux ≥ 5.14).
pub fn netns_cookie() -> Result<u64> {
    const SO_NETNS_COOKIE: i32 = 71;
    // SAFETY: socket(2); the descriptor is owned (and closed) right away.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned here.
    let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt(2) into a u64 of the length given.
    let rc = unsafe {
        use std::os::fd::AsRawFd;
        libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&mut cookie as *mut u64).cast(), &mut len)
    };
    if rc != 0 {
        bail!("cannot read the network namespace cookie (SO_NETNS_COOKIE needs Linux 5.14): {}", std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The interface index the XDP link pinned at `pin` is attached to: `None`
/// without a pin, `Some(0)` when its device is gone (a defunct link).
pub fn link_ifindex(pin: &Path) -> Result<Option<u32>> {
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_TYPE_XDP: u32 = 6;
    if !pin.exists() {
        return Ok(None);
    }
    let path = CString::new(pin.as_os_str().as_encoded_bytes())?;
    // union bpf_attr for BPF_OBJ_GET: pathname (u64), bpf_fd, file_flags.
    let mut attr = [0u64; 2];
    attr[0] = path.as_ptr() as u64;
    // SAFETY: bpf(2) with an attr of the size given, pointing at a live C string.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, attr.as_mut_ptr(), std::mem::size_of_val(&attr)) };
    if fd < 0 {
        bail!("cannot open the pinned link {}: {}", pin.display(), std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor; we own it.
    let link = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    // struct bpf_link_info: type, id, prog_id, (pad), then the union whose
    // `xdp.ifindex` is the first u32 at offset 16.
    let mut info = [0u32; 16];
    let mut attr = [0u64; 2];
    {
        use std::os::fd::AsRawFd;
        attr[0] = link.as_raw_fd() as u64 | ((std::mem::size_of_val(&info) as u64) << 32);
    }
    attr[1] = info.as_mut_ptr() as u64;
    // SAFETY: bpf(2) filling `info` (its length is in attr) for a descriptor we own.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, attr.as_mut_ptr(), std::mem::size_of_val(&attr)) };
    if rc != 0 {
        bail!("cannot read the pinned link {}: {}", pin.display(), std::io::Error::last_os_error());
    }
    if info[0] != BPF_LINK_TYPE_XDP {
        bail!("{} is not an XDP link (type {})", pin.display(), info[0]);
    }
    Ok(Some(info[4]))
}

/// What a new agent does with what it finds under its name.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// Nothing, or this deployment's own: carry on (adopt what is there).
    Ours,
    /// A dead deployment's leftovers (why): keep the state file aside,
    /// remove its pins, start clean.
    Stale(String),
    /// Another deployment that still runs (why): refuse, touch nothing.
    Foreign(String),
}

/// Judge the leftovers: `recorded` is the state file's identity (`None`:
/// none recorded, e.g. a file of an older agent), `has_state` whether
/// there is a state file, `link` the pinned link's ifindex (`Some(0)`:
/// its device is gone).
pub fn judge(ours: Identity, has_state: bool, recorded: Option<Identity>, link: Option<u32>) -> Found {
    let alive = link.filter(|&i| i != 0);
    match (has_state, recorded) {
        (true, Some(r)) if r == ours => Found::Ours,
        (true, Some(r)) => match alive {
            Some(i) => Found::Foreign(format!(
                "the state file belongs to another deployment ({r}; this is {ours}) whose XDP link is still attached (ifindex {i} in its namespace)"
            )),
            None => Found::Stale(format!("the state file belongs to a deployment that is gone ({r}; this is {ours})")),
        },
        // A state file of an agent that recorded no identity: the pinned
        // link tells whether it is this deployment's.
        (true, None) => match alive {
            Some(i) if i == ours.ifindex => Found::Ours,
            Some(i) => Found::Foreign(format!("the state file names no deployment and the pinned XDP link is attached to ifindex {i}, not {}", ours.ifindex)),
            None => Found::Stale("the state file names no deployment and its XDP link is gone".into()),
        },
        (false, _) => match link {
            Some(0) => Found::Stale("the pinned XDP link's device is gone".into()),
            _ => Found::Ours,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Identity = Identity { netns_cookie: 4100, ifindex: 2 };

    #[test]
    fn a_reused_namespace_inode_never_resumes_a_dead_deployment() {
        // The exact defect: same inode (same file name), new namespace,
        // the old veth gone with the old namespace (its link defunct), and
        // the new eth0 has the same ifindex.
        let dead = Identity { netns_cookie: 4099, ifindex: 2 };
        assert!(matches!(judge(US, true, Some(dead), Some(0)), Found::Stale(r) if r.contains("4099")));
        assert!(matches!(judge(US, true, Some(dead), None), Found::Stale(_)));
        // Same namespace, interface re-created (new ifindex): stale too.
        let old_if = Identity { netns_cookie: 4100, ifindex: 7 };
        assert!(matches!(judge(US, true, Some(old_if), Some(0)), Found::Stale(_)));
        // ... unless the old link still runs somewhere: never touch it.
        assert!(matches!(judge(US, true, Some(old_if), Some(7)), Found::Foreign(_)));
        assert!(matches!(judge(US, true, Some(dead), Some(3)), Found::Foreign(_)));
    }

    #[test]
    fn own_state_and_older_agents_files_are_resumed() {
        assert_eq!(judge(US, true, Some(US), Some(2)), Found::Ours);
        assert_eq!(judge(US, true, Some(US), None), Found::Ours, "pins lost, state restores");
        assert_eq!(judge(US, true, None, Some(2)), Found::Ours, "an older agent's file, its link on our interface");
        assert!(matches!(judge(US, true, None, Some(0)), Found::Stale(_)));
        assert!(matches!(judge(US, true, None, Some(5)), Found::Foreign(_)));
        assert_eq!(judge(US, false, None, None), Found::Ours, "nothing found");
        assert_eq!(judge(US, false, None, Some(2)), Found::Ours, "pins without state: the caller decides");
        assert!(matches!(judge(US, false, None, Some(0)), Found::Stale(_)));
    }
}
