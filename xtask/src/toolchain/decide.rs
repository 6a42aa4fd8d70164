//! The version rules of the eBPF toolchain, apart from the commands that
//! probe and install, so that they are unit-tested.

use std::fmt;

/// The oldest compiler that builds the XDP program: the pinned `aya-ebpf`
/// (0.2.x, lb-ebpf/Cargo.lock) declares `rust-version = "1.87.0"`, so cargo
/// refuses anything older (the stale Debian list's rustc-web 1.85 included).
pub const MIN_EBPF_RUSTC: Version = Version(1, 87, 0);
/// The `bpf-linker` release `cargo install` gets (`--version`, `--locked`):
/// a new release cannot break a fresh build.
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// LLVM majors that `bpf-linker` 0.13.0 has a feature for (`llvm-NN`).
pub const BPF_LINKER_LLVM: &[u32] = &[21, 22, 23];

/// `MAJOR.MINOR.PATCH` of a compiler or a Debian package version
/// (`1.85.0+dfsg3-1~deb12u3` reads as 1.85.0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

impl Version {
    /// Parse the leading `N.N[.N]` of `s` (an epoch `N:` is skipped).
    pub fn parse(s: &str) -> Option<Version> {
        let s = s.trim();
        let s = s.split_once(':').map_or(s, |(_, rest)| rest);
        let end = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
        let mut parts = s[..end].split('.').filter(|p| !p.is_empty()).map(str::parse::<u32>);
        let major = parts.next()?.ok()?;
        let minor = parts.next()?.ok()?;
        let patch = parts.next().and_then(Result::ok).unwrap_or(0);
        Some(Version(major, minor, patch))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// A compiler as `rustc -vV` describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compiler {
    /// `release:`.
    pub version: Version,
    /// Major of `LLVM version:`.
    pub llvm_major: u32,
}

impl Compiler {
    /// Read `rustc -vV` output.
    pub fn from_verbose_version(out: &str) -> Option<Compiler> {
        let field = |name: &str| out.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
        let version = Version::parse(field("release:")?)?;
        let llvm_major = field("LLVM version:")?.split('.').next()?.parse().ok()?;
        Some(Compiler { version, llvm_major })
    }
}

/// `21, 22 or 23`.
pub fn llvm_list() -> String {
    match BPF_LINKER_LLVM.split_last() {
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")),
        None => String::new(),
    }
}

/// Why `c` cannot build the XDP program (`None`: it can).
pub fn compiler_problem(c: &Compiler) -> Option<String> {
    if c.version < MIN_EBPF_RUSTC {
        return Some(format!("rustc {} is older than {MIN_EBPF_RUSTC}, which the pinned aya-ebpf needs", c.version));
    }
    if !BPF_LINKER_LLVM.contains(&c.llvm_major) {
        return Some(format!("its LLVM {} is not one bpf-linker {BPF_LINKER_VERSION} supports ({})", c.llvm_major, llvm_list()));
    }
    None
}

/// A `bpf-linker` binary as found on the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Linker {
    /// From `bpf-linker --version`.
    pub version: Option<String>,
    /// The major of the libLLVM it links.
    pub llvm_major: Option<u32>,
}

/// What to do about the linker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkerAction {
    /// The one found fits.
    Use,
    /// None found: install the pinned version.
    Install,
    /// One found that does not fit (the reason): install the pinned version over it.
    Rebuild(String),
    /// No `bpf-linker` release we pin supports the compiler's LLVM.
    Unsupported,
}

/// Decide about the linker for a compiler with LLVM `llvm_major`.
pub fn linker_action(found: Option<&Linker>, llvm_major: u32) -> LinkerAction {
    if !BPF_LINKER_LLVM.contains(&llvm_major) {
        return LinkerAction::Unsupported;
    }
    let Some(l) = found else { return LinkerAction::Install };
    match (&l.version, l.llvm_major) {
        (Some(v), Some(m)) if v == BPF_LINKER_VERSION && m == llvm_major => LinkerAction::Use,
        (_, Some(m)) if m != llvm_major => LinkerAction::Rebuild(format!("is built against LLVM {m}")),
        (_, None) => LinkerAction::Rebuild("links no LLVM library we can identify".into()),
        (v, _) => LinkerAction::Rebuild(format!("is version {}", v.as_deref().unwrap_or("unknown"))),
    }
}

/// The LLVM major in `ldd` output (`libLLVM.so.22.1`, `libLLVM-19.so`).
pub fn llvm_major_of_ldd(ldd: &str) -> Option<u32> {
    ldd.split_whitespace().find_map(|w| {
        let rest = w.strip_prefix("libLLVM")?;
        let digits: String = rest.trim_start_matches(['.', '-', 's', 'o']).chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rustc(v: (u32, u32, u32), llvm: u32) -> Compiler {
        Compiler { version: Version(v.0, v.1, v.2), llvm_major: llvm }
    }

    #[test]
    fn versions_parse_from_rustc_and_debian() {
        assert_eq!(Version::parse("1.85.0+dfsg3-1~deb12u3"), Some(Version(1, 85, 0)));
        assert_eq!(Version::parse("1.96.0+dfsg1-1~deb12u2"), Some(Version(1, 96, 0)));
        assert_eq!(Version::parse("1:22.1.8-1~deb12u1"), Some(Version(22, 1, 8)));
        assert_eq!(Version::parse("1.87"), Some(Version(1, 87, 0)));
        assert_eq!(Version::parse("(none)"), None);
        assert_eq!(Version::parse(""), None);
        let vv = "rustc 1.96.0 (ac68faa20 2026-05-25)\nbinary: rustc\nrelease: 1.96.0\nLLVM version: 22.1.8\n";
        assert_eq!(Compiler::from_verbose_version(vv), Some(rustc((1, 96, 0), 22)));
        assert_eq!(Compiler::from_verbose_version("rustc 1.96.0\n"), None);
    }

    #[test]
    fn compilers_are_judged_by_version_and_llvm() {
        // The stale list's rustc-web: too old, and its LLVM has no linker.
        let stale = compiler_problem(&rustc((1, 85, 0), 19)).expect("1.85 is refused");
        assert!(stale.contains("1.85.0") && stale.contains("1.87.0"), "{stale}");
        // New enough but an LLVM bpf-linker 0.13 lacks.
        assert!(compiler_problem(&rustc((1, 88, 0), 20)).expect("LLVM 20").contains("LLVM 20"));
        assert!(compiler_problem(&rustc((1, 99, 0), 24)).is_some());
        // The current Debian one and a rustup nightly with LLVM 21/23.
        assert_eq!(compiler_problem(&rustc((1, 96, 0), 22)), None);
        assert_eq!(compiler_problem(&rustc((1, 87, 0), 21)), None);
        assert_eq!(compiler_problem(&rustc((1, 98, 0), 23)), None);
    }

    #[test]
    fn linkers_are_used_installed_or_rebuilt() {
        let l = |v: Option<&str>, m: Option<u32>| Linker { version: v.map(str::to_string), llvm_major: m };
        assert_eq!(linker_action(None, 22), LinkerAction::Install);
        assert_eq!(linker_action(Some(&l(Some("0.13.0"), Some(22))), 22), LinkerAction::Use);
        // Built for another LLVM (the compiler was upgraded): rebuild.
        assert!(matches!(linker_action(Some(&l(Some("0.13.0"), Some(21))), 22), LinkerAction::Rebuild(r) if r.contains("LLVM 21")));
        // Another release, or one whose LLVM cannot be told: rebuild the pinned one.
        assert!(matches!(linker_action(Some(&l(Some("0.9.15"), Some(22))), 22), LinkerAction::Rebuild(r) if r.contains("0.9.15")));
        assert!(matches!(linker_action(Some(&l(Some("0.13.0"), None)), 22), LinkerAction::Rebuild(_)));
        // No pinned release supports LLVM 19.
        assert_eq!(linker_action(None, 19), LinkerAction::Unsupported);
    }

    #[test]
    fn llvm_major_from_ldd() {
        let ldd = "\tlibLLVM.so.22.1 => /usr/lib/llvm-22/lib/libLLVM.so.22.1 (0x00007f815c000000)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6\n";
        assert_eq!(llvm_major_of_ldd(ldd), Some(22));
        assert_eq!(llvm_major_of_ldd("\tlibLLVM-19.so => /usr/lib/llvm-19/lib/libLLVM-19.so (0x1)\n"), Some(19));
        assert_eq!(llvm_major_of_ldd("\tlibc.so.6 => /lib/libc.so.6\n"), None);
        assert_eq!(llvm_list(), "21, 22 or 23");
    }
}
