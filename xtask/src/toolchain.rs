//! Finding (and, where missing, installing) what building the XDP program
//! needs: a Rust compiler that can build `core` for `bpfel-unknown-none`
//! (nightly features + the standard library's source) and `bpf-linker`
//! built against the same LLVM major version as that compiler.
//!
//! Preference: rustup's nightly with `rust-src`; otherwise Debian's
//! `rustc-web` + `rust-web-src` (stable, unlocked with RUSTC_BOOTSTRAP=1).
//! Installs are idempotent: nothing is installed when it is already there.

use anyhow::{anyhow, bail, Context, Result};
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::sh::{capture, run};

/// A compiler usable for the eBPF build.
#[derive(Debug, Clone)]
pub struct EbpfToolchain {
    /// How to describe it to a user.
    pub label: String,
    /// `cargo` to run.
    pub cargo: PathBuf,
    /// `rustc` it must use.
    pub rustc: PathBuf,
    /// Needs RUSTC_BOOTSTRAP=1 (a stable compiler).
    pub bootstrap: bool,
    /// LLVM major version of that rustc.
    pub llvm_major: u32,
}

fn llvm_major(rustc: &Path) -> Option<u32> {
    let out = capture(Command::new(rustc).arg("-vV")).ok()?;
    let line = out.lines().find(|l| l.starts_with("LLVM version:"))?;
    line.split(':').nth(1)?.trim().split('.').next()?.parse().ok()
}

fn has_core_source(rustc: &Path) -> bool {
    let Ok(sysroot) = capture(Command::new(rustc).arg("--print").arg("sysroot")) else { return false };
    Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core/Cargo.toml").exists()
}

fn rustup_nightly() -> Option<EbpfToolchain> {
    let rustc = capture(Command::new("rustup").args(["which", "--toolchain", "nightly", "rustc"])).ok()?;
    let cargo = capture(Command::new("rustup").args(["which", "--toolchain", "nightly", "cargo"])).ok()?;
    let rustc = PathBuf::from(rustc.trim());
    if !has_core_source(&rustc) {
        return None;
    }
    Some(EbpfToolchain {
        label: "rustup nightly with rust-src".into(),
        llvm_major: llvm_major(&rustc)?,
        cargo: PathBuf::from(cargo.trim()),
        rustc,
        bootstrap: false,
    })
}

fn debian_rust_web() -> Option<EbpfToolchain> {
    let rustc = PathBuf::from("/usr/bin/rustc");
    let cargo = PathBuf::from("/usr/bin/cargo");
    if !rustc.exists() || !cargo.exists() || !has_core_source(&rustc) {
        return None;
    }
    Some(EbpfToolchain {
        label: "Debian rustc-web + rust-web-src (RUSTC_BOOTSTRAP=1)".into(),
        llvm_major: llvm_major(&rustc)?,
        cargo,
        rustc,
        bootstrap: true,
    })
}

fn is_root() -> bool {
    crate::nix_is_root()
}

/// Install Debian packages that are not installed yet.
pub fn apt_install(pkgs: &[&str]) -> Result<()> {
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| {
            !capture(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .map(|s| s.contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("missing Debian packages {}: install them as root (apt-get install {})", missing.join(" "), missing.join(" "));
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    // A failed install is often a stale package list: update once and retry.
    let install = |c: &mut Command| -> Result<()> {
        run(c.env("DEBIAN_FRONTEND", "noninteractive").args(["install", "-y", "-q"]).args(&missing))
    };
    if install(&mut Command::new("apt-get")).is_err() {
        run(Command::new("apt-get").args(["update", "-q"]))?;
        install(&mut Command::new("apt-get")).context("apt-get install failed")?;
    }
    Ok(())
}

/// A usable eBPF compiler, installing Debian's when none is present.
pub fn ebpf_toolchain() -> Result<EbpfToolchain> {
    if let Some(t) = rustup_nightly().or_else(debian_rust_web) {
        return Ok(t);
    }
    eprintln!("xtask: no Rust compiler with nightly features and rust-src found; trying Debian's rustc-web");
    apt_install(&["rustc-web", "rust-web-src", "cargo-web"])?;
    debian_rust_web().ok_or_else(|| {
        anyhow!(
            "no compiler can build the XDP program: install rustup's nightly with rust-src \
             (rustup toolchain install nightly --component rust-src) or Debian's rustc-web rust-web-src cargo-web"
        )
    })
}

fn cargo_home_bin() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// Path of a `bpf-linker` for `llvm_major`, installing it when absent.
pub fn bpf_linker(llvm_major: u32) -> Result<PathBuf> {
    let candidate = cargo_home_bin().join("bpf-linker");
    let found = if candidate.exists() {
        Some(candidate.clone())
    } else {
        capture(Command::new("sh").args(["-c", "command -v bpf-linker"])).ok().map(|p| PathBuf::from(p.trim()))
    };
    if let Some(p) = found.filter(|p| p.exists()) {
        return Ok(p);
    }
    eprintln!("xtask: bpf-linker not found; building it against LLVM {llvm_major} (about a minute)");
    let llvm_pkg = format!("llvm-{llvm_major}-dev");
    apt_install(&[llvm_pkg.as_str()])?;
    let llvm_bin = format!("/usr/lib/llvm-{llvm_major}/bin");
    let path = format!("{llvm_bin}:{}", std::env::var("PATH").unwrap_or_default());
    run(Command::new("cargo")
        .env("PATH", path)
        .args(["install", "bpf-linker", "--no-default-features", "--features"])
        .arg(format!("llvm-{llvm_major}")))
    .context("installing bpf-linker failed")?;
    if candidate.exists() {
        Ok(candidate)
    } else {
        bail!("bpf-linker was installed but is not at {}", candidate.display())
    }
}
