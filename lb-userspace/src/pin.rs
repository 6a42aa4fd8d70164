//! Pinning under bpffs, so that forwarding outlives the agent (restart,
//! crash, upgrade) and the next agent adopts the running state.
//!
//! Per interface, under the pin root (default `/sys/fs/bpf/xlb`):
//!
//! ```text
//! ROOT/IFACE/link          the XDP bpf_link (replaced atomically on upgrade)
//! ROOT/IFACE/LAYOUT/XLB_*  every map; LAYOUT names the layout version and
//!                          the map sizes, so a pin is reused only by an
//!                          agent that reads it the same way
//! ```
//!
//! `IFACE` is the interface name, suffixed with `@ns<inode>` outside the
//! initial network namespace (interface names are per namespace). bpffs holds no
//! regular files; the agent's own state goes to the state directory.
//!
//! `mountns` finds a root that outlives the agent (also under `ip netns
//! exec`); `identity` tells a predecessor's leftovers from a dead
//! deployment's, since the kernel reuses namespace inodes.

pub mod identity;
pub mod mountns;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

use crate::maps::LoadOptions;
use lb_common::{map_names, LAYOUT_VERSION};

/// Default root of the pins.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/xlb";
/// Default directory of the agent's state files (a tmpfs, gone at reboot like bpffs).
pub const DEFAULT_STATE_DIR: &str = "/run/xlb";
/// Name of the pinned link in an interface's directory.
const LINK: &str = "link";

/// Pin paths of one interface.
#[derive(Clone, Debug)]
pub struct Pins {
    /// `ROOT/IFACE`.
    pub dir: PathBuf,
    /// `ROOT/IFACE/LAYOUT`: the maps.
    pub maps: PathBuf,
    /// `ROOT/IFACE/link`: the XDP link.
    pub link: PathBuf,
    /// The agent's state file for this interface (in the state directory).
    pub state: PathBuf,
    /// `ROOT/IFACE` as a person finds it (`dir` may go through /proc/self/fd).
    pub shown: PathBuf,
}

/// The directory name of a layout: version and every size that shapes a map.
pub fn layout_name(load: &LoadOptions) -> String {
    format!(
        "v{LAYOUT_VERSION}-vips{}-tables{}-ring{}-ct{}-persist{}",
        load.max_vips, load.tables(), load.ring_size, load.conntrack_size, load.persist_size
    )
}

fn netns_inode(pid: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/net")).ok().map(|m| m.ino())
}

/// The interface's directory name: its name, plus its network namespace
/// unless that is known to be the initial one (in some containers PID 1's
/// namespace cannot be read; then the suffix is always there).
pub fn iface_key(iface: &str) -> String {
    match (netns_inode("self"), netns_inode("1")) {
        (Some(me), Some(init)) if me == init => iface.to_string(),
        (Some(me), _) => format!("{iface}@ns{me}"),
        (None, _) => iface.to_string(),
    }
}

impl Pins {
    /// The paths for `iface` under `root` (nothing is created).
    pub fn new(root: &mountns::Root, state_dir: &Path, iface: &str, load: &LoadOptions) -> Pins {
        let key = iface_key(iface);
        let dir = root.path.join(&key);
        Pins {
            maps: dir.join(layout_name(load)),
            link: dir.join(LINK),
            state: state_dir.join(format!("{key}.json")),
            shown: root.shown.join(&key),
            dir,
        }
    }

    /// Create the directories (the root is resolved by `mountns::resolve`).
    pub fn prepare(&self) -> Result<()> {
        std::fs::create_dir_all(&self.maps).with_context(|| format!("cannot create pin directory {}", self.maps.display()))?;
        if let Some(d) = self.state.parent() {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create state directory {}", d.display()))?;
        }
        Ok(())
    }

    /// Take the interface's agent lock (held while the returned file is
    /// open; the kernel releases it when the process dies, even by
    /// `kill -9`): two agents must never drive the same pinned maps.
    pub fn lock(&self) -> Result<std::fs::File> {
        use std::os::fd::AsRawFd;
        let path = self.state.with_extension("lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: flock(2) on an open descriptor.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            bail!("another xlb agent is running on this interface (it holds {})", path.display());
        }
        Ok(f)
    }

    /// Maps of this layout are pinned (left by an earlier agent).
    pub fn maps_pinned(&self) -> bool {
        self.maps.join(map_names::CONNTRACK).exists()
    }

    /// Map directories of other layouts (an agent with other sizes or an
    /// older version left them).
    pub fn other_layouts(&self) -> Vec<PathBuf> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        rd.filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_dir() && *p != self.maps)
            .collect()
    }

    /// Remove a map directory (the maps are freed once no program uses them).
    pub fn remove_maps(dir: &Path) -> Result<()> {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))
    }

    /// Remove every pin of this interface (link and maps). Removing the
    /// link's pin detaches the program once no process holds the link.
    pub fn remove_pins(&self) -> Result<()> {
        if self.link.exists() {
            std::fs::remove_file(&self.link).with_context(|| format!("cannot remove {}", self.link.display()))?;
        }
        if self.dir.exists() {
            std::fs::remove_dir_all(&self.dir).with_context(|| format!("cannot remove {}", self.dir.display()))?;
        }
        Ok(())
    }

    /// Remove every pin of this interface, the state file and the lock.
    pub fn remove_all(&self) -> Result<()> {
        self.remove_pins()?;
        for f in [self.state.clone(), self.state.with_extension("lock")] {
            match std::fs::remove_file(&f) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("cannot remove {}", f.display()))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Keep a dead deployment's state file aside (`IFACE.json.stale-SECS`);
    /// returns where it went.
    pub fn set_state_aside(&self) -> Result<PathBuf> {
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let aside = self.state.with_extension(format!("json.stale-{secs}"));
        std::fs::rename(&self.state, &aside).with_context(|| format!("cannot move {} aside", self.state.display()))?;
        Ok(aside)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_names_change_with_every_size() {
        let a = LoadOptions::default();
        let mut b = a;
        b.conntrack_size *= 2;
        let mut c = a;
        c.ring_size = 251;
        assert_ne!(layout_name(&a), layout_name(&b));
        assert_ne!(layout_name(&a), layout_name(&c));
        assert!(layout_name(&a).starts_with(&format!("v{LAYOUT_VERSION}-")));
    }
}
