//! A BPF filesystem that outlives the agent.
//!
//! Pins live as long as the bpffs mount holding them. `ip netns exec` (the
//! usual way to run a command in a network namespace) runs it in a mount
//! namespace of its own with a fresh /sys: a bpffs the agent mounted there
//! dies with the agent, and with it the pinned link, so a killed agent would
//! take forwarding down. So, by default, the agent pins in the *initial*
//! mount namespace's /sys/fs/bpf: a short-lived child process enters that
//! namespace (setns), mounts bpffs there when nothing is mounted, and hands
//! back a descriptor of its `xlb` directory; the agent reaches its pins
//! through `/proc/self/fd/N`. The initial namespace is PID 1's, or, where
//! PID 1 cannot be inspected (some VM and container inits are not
//! dumpable), kthreadd's: kernel threads always live in it.
//!
//! When that cannot be done, the agent says so at start, in `xlb status`
//! and at exit, rather than claiming that forwarding outlives it.

use anyhow::{bail, Context, Result};
use std::{
    ffi::CString,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

/// Where systemd (or the agent, when it is missing) mounts bpffs.
pub const SYS_BPF: &str = "/sys/fs/bpf";
/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// The resolved root of the pins.
#[derive(Debug)]
pub struct Root {
    /// The path every operation uses (may go through `/proc/self/fd/N`).
    pub path: PathBuf,
    /// The path as a person finds it (in the initial mount namespace).
    pub shown: PathBuf,
    /// `None` when pins outlive the agent; otherwise why they do not (or
    /// why that cannot be told).
    pub lost_on_exit: Option<String>,
    /// Keeps the initial namespace's directory reachable.
    _hold: Option<OwnedFd>,
}

/// bpffs at `path`.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: statfs(2) on a valid C string into a zeroed struct.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

fn mnt_ns(pid: &str) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()
}

/// A process in the initial mount namespace whose /proc entries can be read.
fn reference() -> Option<&'static str> {
    if mnt_ns("1").is_some() {
        return Some("1");
    }
    let stat = std::fs::read_to_string("/proc/2/stat").ok()?;
    let is_kthreadd = stat.contains("(kthreadd)") && stat.split_whitespace().nth(3) == Some("0");
    (is_kthreadd && mnt_ns("2").is_some()).then_some("2")
}

/// `major:minor` of the filesystem holding `path`.
fn dev_of(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).ok()?.dev();
    Some(format!("{}:{}", libc::major(dev), libc::minor(dev)))
}

/// A bpffs with device `dev` is mounted in `pid`'s mount namespace.
fn bpffs_mounted_in(pid: &str, dev: &str) -> bool {
    let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")) else { return false };
    info.lines().any(|l| {
        let fields: Vec<&str> = l.split_whitespace().collect();
        let fstype = fields.iter().position(|f| *f == "-").and_then(|i| fields.get(i + 1));
        fields.get(2) == Some(&dev) && fstype == Some(&"bpf")
    })
}

/// Resolve `requested` (the `--pin-root`). The default root, from outside
/// the initial mount namespace, is taken in the initial namespace; other
/// roots are used as given, and checked for outliving the agent. With
/// `create`, bpffs is mounted and directories made where missing.
pub fn resolve(requested: &Path, default: &Path, create: bool) -> Result<Root> {
    let own = mnt_ns("self");
    let refpid = reference();
    let in_initial = own.is_some() && own == refpid.and_then(mnt_ns);
    if requested == default && !in_initial {
        if let Some(pid) = refpid {
            let name = requested.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "xlb".into());
            match open_in_initial_ns(pid, &name, create) {
                Ok((fd, mounted)) => {
                    if mounted {
                        log::info!("mounted a BPF filesystem on {SYS_BPF} in the initial mount namespace");
                    }
                    let path = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
                    return Ok(Root { path, shown: requested.to_path_buf(), lost_on_exit: None, _hold: Some(fd) });
                }
                Err(e) => log::warn!("cannot pin in the initial mount namespace ({e:#}); pinning in this one"),
            }
        }
    }
    if create {
        prepare_here(requested)?;
    }
    let lost_on_exit = if in_initial {
        None
    } else {
        match (refpid, dev_of(requested)) {
            (Some(pid), Some(dev)) if bpffs_mounted_in(pid, &dev) => None,
            (Some(_), _) => Some(format!(
                "the BPF filesystem under {} is mounted only in this agent's own mount namespace (started with `ip netns exec`?), which ends with the agent: forwarding stops when it exits; pin on a bpffs mounted in the host's namespace (the default --pin-root does that when it can)",
                requested.display()
            )),
            (None, _) => Some(format!(
                "cannot tell whether {} outlives the agent (the initial mount namespace cannot be inspected): forwarding may stop when it exits",
                requested.display()
            )),
        }
    };
    Ok(Root { path: requested.to_path_buf(), shown: requested.to_path_buf(), lost_on_exit, _hold: None })
}

/// Make sure `dir` is on a bpffs (mounting one on /sys/fs/bpf when
/// nothing is mounted there) and exists.
fn prepare_here(dir: &Path) -> Result<()> {
    let mut base = dir;
    while !base.exists() {
        base = base.parent().with_context(|| format!("pin directory {} has no existing parent", dir.display()))?;
    }
    if !is_bpffs(base) {
        if dir.starts_with(SYS_BPF) && Path::new(SYS_BPF).is_dir() && !is_bpffs(Path::new(SYS_BPF)) {
            mount_bpffs(SYS_BPF)?;
            log::info!("mounted a BPF filesystem on {SYS_BPF}");
        } else {
            bail!(
                "{} is not on a BPF filesystem; mount one (mount -t bpf bpf {SYS_BPF}), choose another --pin-root, or run with --no-pin",
                base.display()
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create pin directory {}", dir.display()))
}

fn mount_bpffs(target: &str) -> Result<()> {
    let c = |s: &str| CString::new(s).expect("constant without NUL");
    let (src, target_c, fstype) = (c("bpf"), c(target), c("bpf"));
    // SAFETY: mount(2) with valid C strings and no data.
    let rc = unsafe { libc::mount(src.as_ptr(), target_c.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        bail!("no BPF filesystem on {target} and mounting one failed ({}); run with --no-pin to work without pins", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Steps of the child, reported with errno when one fails.
const STEPS: [&str; 6] = ["", "open the namespace", "enter the namespace", "mount bpffs", "create the directory", "open the directory"];

/// In a child process inside `pid`'s mount namespace: mount bpffs on
/// /sys/fs/bpf when missing (with `create`), create `/sys/fs/bpf/NAME`
/// and send back a descriptor of it. Returns it, and whether bpffs was
/// mounted.
fn open_in_initial_ns(pid: &str, name: &str, create: bool) -> Result<(OwnedFd, bool)> {
    let c = |s: String| CString::new(s).context("path with a NUL byte");
    let ns = c(format!("/proc/{pid}/ns/mnt"))?;
    let mount_point = c(SYS_BPF.to_string())?;
    let dir = c(format!("{SYS_BPF}/{name}"))?;
    let bpf = c("bpf".to_string())?;
    let mut sv = [0i32; 2];
    // SAFETY: socketpair(2) into a two-element array.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0, sv.as_mut_ptr()) } != 0 {
        bail!("socketpair: {}", std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned here.
    let (parent_end, child_end) = unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) };
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let cmsg_space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) as usize };
    // SAFETY: the child runs only async-signal-safe system calls on values
    // prepared before the fork (no allocation, no locks), then _exit(2).
    let child = unsafe { libc::fork() };
    if child < 0 {
        bail!("fork: {}", std::io::Error::last_os_error());
    }
    if child == 0 {
        // SAFETY: see above; every pointer refers to memory prepared before the fork.
        unsafe {
            child_main(child_end.as_raw_fd(), &ns, &mount_point, &dir, &bpf, create, cmsg_space);
        }
    }
    drop(child_end);
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(child, &mut status, 0) };
    let mut payload = [0u8; 6];
    let mut cmsg = [0u64; 8];
    let mut iov = libc::iovec { iov_base: payload.as_mut_ptr().cast(), iov_len: payload.len() };
    // SAFETY: a zeroed msghdr pointing at buffers that outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = cmsg_space as _; // size_t on glibc, socklen_t on musl
    // SAFETY: recvmsg(2) into the buffers above; the child has exited, so its datagram is queued or there is none.
    let n = unsafe { libc::recvmsg(parent_end.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC) };
    if n < payload.len() as isize {
        bail!("the helper process in the initial mount namespace ended without an answer (status {status})");
    }
    let (step, mounted, errno) = (payload[0], payload[1] == 1, i32::from_ne_bytes([payload[2], payload[3], payload[4], payload[5]]));
    if step != 0 {
        let what = STEPS.get(step as usize).copied().unwrap_or("?");
        bail!("cannot {what} ({})", std::io::Error::from_raw_os_error(errno));
    }
    // SAFETY: the control buffer was filled by recvmsg; CMSG_FIRSTHDR/DATA walk it.
    let fd = unsafe {
        let h = libc::CMSG_FIRSTHDR(&msg);
        if h.is_null() || (*h).cmsg_level != libc::SOL_SOCKET || (*h).cmsg_type != libc::SCM_RIGHTS {
            bail!("the helper process sent no descriptor");
        }
        std::ptr::read_unaligned(libc::CMSG_DATA(h).cast::<i32>())
    };
    // SAFETY: SCM_RIGHTS installed this descriptor in our table; we own it.
    Ok((unsafe { OwnedFd::from_raw_fd(fd) }, mounted))
}

/// The child's side of `open_in_initial_ns`; never returns.
///
/// # Safety
/// Call only in a freshly forked child, with pointers valid in it.
unsafe fn child_main(sock: i32, ns: &CString, mount_point: &CString, dir: &CString, bpf: &CString, create: bool, cmsg_space: usize) -> ! {
    let report = |step: u8, mounted: bool, fd: i32| -> ! {
        let errno = if step == 0 { 0 } else { *libc::__errno_location() };
        let e = errno.to_ne_bytes();
        let mut payload = [step, mounted as u8, e[0], e[1], e[2], e[3]];
        let mut cmsg = [0u64; 8];
        let mut iov = libc::iovec { iov_base: payload.as_mut_ptr().cast(), iov_len: payload.len() };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if fd >= 0 {
            msg.msg_control = cmsg.as_mut_ptr().cast();
            msg.msg_controllen = cmsg_space as _;
            let h = libc::CMSG_FIRSTHDR(&msg);
            (*h).cmsg_level = libc::SOL_SOCKET;
            (*h).cmsg_type = libc::SCM_RIGHTS;
            (*h).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(h).cast::<i32>(), fd);
        }
        libc::sendmsg(sock, &msg, 0);
        libc::_exit(0)
    };
    let nsfd = libc::open(ns.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
    if nsfd < 0 {
        report(1, false, -1);
    }
    if libc::setns(nsfd, libc::CLONE_NEWNS) != 0 {
        report(2, false, -1);
    }
    let mut mounted = false;
    let mut st: libc::statfs = std::mem::zeroed();
    if libc::statfs(mount_point.as_ptr(), &mut st) != 0 || st.f_type as i64 != BPF_FS_MAGIC {
        if !create {
            *libc::__errno_location() = libc::ENOENT;
            report(3, false, -1);
        }
        if libc::mount(bpf.as_ptr(), mount_point.as_ptr(), bpf.as_ptr(), 0, std::ptr::null()) != 0 {
            report(3, false, -1);
        }
        mounted = true;
    }
    if create && libc::mkdir(dir.as_ptr(), 0o755) != 0 && *libc::__errno_location() != libc::EEXIST {
        report(4, mounted, -1);
    }
    let fd = libc::open(dir.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC);
    if fd < 0 {
        report(5, mounted, -1);
    }
    report(0, mounted, fd)
}
