//! Finding (and, where missing or unusable, installing) what building the
//! XDP program needs: a Rust compiler that can build `core` for
//! `bpfel-unknown-none` (nightly features + the standard library's source),
//! new enough for the pinned `aya-ebpf`, whose LLVM the pinned `bpf-linker`
//! supports; and that `bpf-linker`, built against the same LLVM major.
//!
//! Usability is decided by version, never by presence (`decide` holds the
//! rules, unit-tested): a new machine's package lists are as old as its
//! image and offer a `rustc-web` (1.85, LLVM 19) that no `bpf-linker`
//! release supports. Nothing touches the network when everything usable is
//! installed; package lists older than a day are refreshed before any
//! install, and again when the version they offer is too old.

use anyhow::{anyhow, bail, Context, Result};
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use crate::sh::{capture, run};

pub mod decide;
use decide::{compiler_problem, linker_action, LinkerAction, Version, BPF_LINKER_VERSION, MIN_EBPF_RUSTC};

/// Debian's compiler packages (stable, unlocked with RUSTC_BOOTSTRAP=1).
const DEBIAN_COMPILER: [&str; 3] = ["rustc-web", "rust-web-src", "cargo-web"];
/// Package lists older than this are refreshed before installing.
const APT_LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
const APT_LISTS: &str = "/var/lib/apt/lists";

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
    /// Its version and LLVM major.
    pub found: decide::Compiler,
}

impl EbpfToolchain {
    fn describe(&self) -> String {
        format!("{} (rustc {}, LLVM {})", self.label, self.found.version, self.found.llvm_major)
    }
}

fn compiler_of(rustc: &Path) -> Option<decide::Compiler> {
    let out = capture(Command::new(rustc).arg("-vV")).ok()?;
    decide::Compiler::from_verbose_version(&out)
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
        found: compiler_of(&rustc)?,
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
        found: compiler_of(&rustc)?,
        cargo,
        rustc,
        bootstrap: true,
    })
}

/// The target `xlb` is built for: musl when rustup has it or can add it,
/// else `None` (glibc, static PIE). Every CLI command is a process, and
/// glibc's start-up (static or not) probes the CPU's caches with CPUID, a VM
/// exit each on these machines: ~0.5 ms of a ~1.0 ms start, where musl's
/// takes ~0.5 ms in all (`perf stat`, `xlb --version`).
pub fn musl_target() -> Option<&'static str> {
    const MUSL: &str = "x86_64-unknown-linux-musl";
    if !cfg!(target_arch = "x86_64") {
        return None;
    }
    let installed = capture(Command::new("rustup").args(["target", "list", "--installed"])).ok()?;
    if installed.lines().any(|l| l.trim() == MUSL) {
        return Some(MUSL);
    }
    eprintln!("xtask: adding the Rust target {MUSL} (rustup)");
    match run(Command::new("timeout").args(["300", "rustup", "target", "add", MUSL])) {
        Ok(()) => Some(MUSL),
        Err(e) => {
            eprintln!("xtask: warning: {e:#}: xlb is built against glibc instead (each CLI command starts ~0.5 ms later)");
            None
        }
    }
}

fn is_root() -> bool {
    crate::nix_is_root()
}

/// Age of the newest package list (`None`: no lists at all).
fn apt_lists_age() -> Option<Duration> {
    let newest = std::fs::read_dir(APT_LISTS)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with("Release"))
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .max()?;
    Some(SystemTime::now().duration_since(newest).unwrap_or_default())
}

/// Package lists refreshed in this run (at most one `apt-get update` per run).
static UPDATED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn apt_update() -> Result<()> {
    if UPDATED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Ok(());
    }
    eprintln!("xtask: refreshing the package lists (apt-get update)");
    run(Command::new("apt-get").args(["update", "-q"])).context("apt-get update failed")
}

/// Refresh the lists when they are older than a day (or missing).
fn apt_update_if_stale() -> Result<()> {
    match apt_lists_age() {
        Some(age) if age < APT_LISTS_MAX_AGE => Ok(()),
        _ => apt_update(),
    }
}

/// The version apt would install for `pkg`.
fn apt_candidate(pkg: &str) -> Option<Version> {
    let out = capture(Command::new("apt-cache").args(["policy", pkg])).ok()?;
    let line = out.lines().find_map(|l| l.trim().strip_prefix("Candidate:"))?;
    Version::parse(line.trim())
}

fn installed(pkg: &str) -> bool {
    capture(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .map(|s| s.contains("install ok installed"))
        .unwrap_or(false)
}

fn apt_get_install(pkgs: &[&str]) -> Result<()> {
    let install = || -> Result<()> {
        run(Command::new("apt-get").env("DEBIAN_FRONTEND", "noninteractive").args(["install", "-y", "-q"]).args(pkgs))
    };
    if install().is_err() && !UPDATED.load(std::sync::atomic::Ordering::SeqCst) {
        // A failed install is often a stale list: refresh once and retry.
        apt_update()?;
        return install().context("apt-get install failed");
    }
    Ok(())
}

/// Install Debian packages that are not installed yet (refreshing package
/// lists older than a day first); nothing happens when all are installed.
pub fn apt_install(pkgs: &[&str]) -> Result<()> {
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("missing Debian packages {}: install them as root (apt-get install {})", missing.join(" "), missing.join(" "));
    }
    apt_update_if_stale()?;
    eprintln!("xtask: installing {}", missing.join(" "));
    apt_get_install(&missing)
}

/// What to tell a user when no usable compiler can be had.
fn no_compiler(found: &[EbpfToolchain], why: &str) -> anyhow::Error {
    let found = if found.is_empty() {
        "no compiler with nightly features and the standard library's source".to_string()
    } else {
        found.iter().map(|t| format!("{} — {}", t.describe(), compiler_problem(&t.found).unwrap_or_default())).collect::<Vec<_>>().join("; ")
    };
    anyhow!(
        "no Rust compiler can build the XDP program. Found: {found}. Needed: rustc ≥ {MIN_EBPF_RUSTC} (the pinned aya-ebpf) \
         with LLVM {} (what bpf-linker {BPF_LINKER_VERSION} supports). {why} Fix: as root, `apt-get update && apt-get install {}`, \
         or `rustup toolchain install nightly --component rust-src`",
        decide::llvm_list(),
        DEBIAN_COMPILER.join(" ")
    )
}

/// A usable eBPF compiler, installing or upgrading Debian's when none is.
pub fn ebpf_toolchain() -> Result<EbpfToolchain> {
    let found: Vec<EbpfToolchain> = [rustup_nightly(), debian_rust_web()].into_iter().flatten().collect();
    if let Some(t) = found.iter().find(|t| compiler_problem(&t.found).is_none()) {
        return Ok(t.clone());
    }
    for t in &found {
        eprintln!("xtask: {} is not usable: {}", t.describe(), compiler_problem(&t.found).unwrap_or_default());
    }
    if !is_root() {
        return Err(no_compiler(&found, "Installing one needs root."));
    }
    eprintln!("xtask: installing Debian's {} (rustc ≥ {MIN_EBPF_RUSTC} needed)", DEBIAN_COMPILER.join(" "));
    apt_update_if_stale()?;
    let mut offered = apt_candidate("rustc-web");
    if offered.is_none_or(|v| v < MIN_EBPF_RUSTC) {
        // The lists may be fresh by date yet miss the updates suite's version.
        apt_update()?;
        offered = apt_candidate("rustc-web");
    }
    match offered {
        Some(v) if v >= MIN_EBPF_RUSTC => {}
        Some(v) => return Err(no_compiler(&found, &format!("Debian offers only rustc-web {v}, even after apt-get update."))),
        None => return Err(no_compiler(&found, "Debian offers no rustc-web, even after apt-get update.")),
    }
    // `install` also upgrades an installed but too old rustc-web.
    apt_get_install(&DEBIAN_COMPILER)?;
    let t = debian_rust_web().ok_or_else(|| no_compiler(&found, "rustc-web was installed but /usr/bin/rustc cannot be used."))?;
    if let Some(p) = compiler_problem(&t.found) {
        return Err(no_compiler(std::slice::from_ref(&t), &format!("The installed {} is not usable: {p}.", t.describe())));
    }
    eprintln!("xtask: installed {}", t.describe());
    Ok(t)
}

fn cargo_home_bin() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// Version and LLVM major of a `bpf-linker` binary (`None` where unknown).
fn inspect_linker(path: &Path) -> decide::Linker {
    let version = capture(Command::new(path).arg("--version"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).map(str::to_string));
    // Built with llvm-sys, it links libLLVM dynamically: the library names the major.
    let llvm_major = capture(Command::new("ldd").arg(path)).ok().and_then(|s| decide::llvm_major_of_ldd(&s));
    decide::Linker { version, llvm_major }
}

/// Path of a `bpf-linker` (the pinned version, for `llvm_major`),
/// installing or rebuilding it when the one found does not fit.
pub fn bpf_linker(llvm_major: u32) -> Result<PathBuf> {
    let candidate = cargo_home_bin().join("bpf-linker");
    let found = if candidate.exists() {
        Some(candidate.clone())
    } else {
        capture(Command::new("sh").args(["-c", "command -v bpf-linker"]))
            .ok()
            .map(|p| PathBuf::from(p.trim()))
            .filter(|p| p.exists())
    };
    let info = found.as_deref().map(inspect_linker);
    match linker_action(info.as_ref(), llvm_major) {
        LinkerAction::Use => return Ok(found.expect("Use implies a linker was found")),
        LinkerAction::Unsupported => bail!(
            "bpf-linker {BPF_LINKER_VERSION} supports LLVM {} only; the compiler uses LLVM {llvm_major}",
            decide::llvm_list()
        ),
        LinkerAction::Install => {
            eprintln!("xtask: bpf-linker not found; building {BPF_LINKER_VERSION} against LLVM {llvm_major} (about two minutes)")
        }
        LinkerAction::Rebuild(why) => {
            eprintln!("xtask: rebuilding bpf-linker {BPF_LINKER_VERSION} against LLVM {llvm_major}: the one at {} {why}", found.as_deref().unwrap_or(&candidate).display())
        }
    }
    if !is_root() {
        bail!("building bpf-linker needs llvm-{llvm_major}-dev: run as root, or install it and then `cargo install bpf-linker --version {BPF_LINKER_VERSION} --locked --no-default-features --features llvm-{llvm_major}`");
    }
    let llvm_pkg = format!("llvm-{llvm_major}-dev");
    apt_install(&[llvm_pkg.as_str()])?;
    let llvm_bin = format!("/usr/lib/llvm-{llvm_major}/bin");
    let path = format!("{llvm_bin}:{}", std::env::var("PATH").unwrap_or_default());
    run(Command::new("cargo")
        .env("PATH", path)
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked", "--force", "--no-default-features", "--features"])
        .arg(format!("llvm-{llvm_major}")))
    .context("installing bpf-linker failed")?;
    let info = inspect_linker(&candidate);
    match linker_action(Some(&info), llvm_major) {
        LinkerAction::Use => Ok(candidate),
        _ => bail!(
            "bpf-linker was installed at {} but reports version {:?} / LLVM {:?}, not {BPF_LINKER_VERSION} / {llvm_major}",
            candidate.display(),
            info.version,
            info.llvm_major
        ),
    }
}
