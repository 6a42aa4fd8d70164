//! `cargo xtask build | test | demo`: the project's only entry points.
//!
//! - `build`: installs what is missing (eBPF compiler, bpf-linker), compiles
//!   the XDP program, then the `xlb` binary with the object embedded in it:
//!   `target/release/xlb` is the one file to ship.
//! - `test`: build, then every test (unit, BPF_PROG_TEST_RUN on the loaded
//!   program, network-namespace end-to-end). Needs root.
//! - `demo`: build, then a throwaway topology of namespaces showing a VIP
//!   balancing real TCP connections and surviving a backend's death.

mod sh;
mod toolchain;

use anyhow::{bail, Context, Result};
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use sh::run;

fn root_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Where the XDP object lands (lb-userspace's build script reads it there).
fn ebpf_object(root: &Path) -> PathBuf {
    root.join("target/ebpf/bpfel-unknown-none/release/lb-ebpf")
}

fn build_ebpf(root: &Path) -> Result<()> {
    build_ebpf_variant(root, &[], "target/ebpf")
}

/// Build the XDP object with extra cargo arguments into `target_dir`.
fn build_ebpf_variant(root: &Path, extra: &[&str], target_dir: &str) -> Result<()> {
    let tc = toolchain::ebpf_toolchain()?;
    let linker = toolchain::bpf_linker(tc.found.llvm_major)?;
    eprintln!("xtask: building the XDP program with {} (rustc {}, LLVM {})", tc.label, tc.found.version, tc.found.llvm_major);
    let linker_dir = linker.parent().map(Path::to_path_buf).unwrap_or_default();
    let path = format!("{}:{}", linker_dir.display(), std::env::var("PATH").unwrap_or_default());
    let mut c = Command::new(&tc.cargo);
    c.current_dir(root.join("lb-ebpf"))
        .env("PATH", path)
        .env("RUSTC", &tc.rustc)
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTUP_TOOLCHAIN")
        .args(["build", "--release", "--locked", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(extra)
        .arg("--target-dir")
        .arg(root.join(target_dir));
    if tc.bootstrap {
        c.env("RUSTC_BOOTSTRAP", "1");
    }
    run(&mut c).context("building the XDP program failed")?;
    let obj = root.join(target_dir).join("bpfel-unknown-none/release/lb-ebpf");
    if !obj.exists() {
        bail!("the XDP build succeeded but {} is missing", obj.display());
    }
    Ok(())
}

fn host_cargo(root: &Path) -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root).env("XLB_EBPF_OBJECT", ebpf_object(root)).env("XLB_REQUIRE_EBPF", "1");
    c
}

fn build(root: &Path) -> Result<()> {
    build_ebpf(root)?;
    run(host_cargo(root).args(["build", "--release", "--locked", "-p", "xlb-tests", "--bins"]))?;
    // `xlb` static: every CLI command is a process. For musl when rustup
    // can add it (`toolchain::musl_target`: half the start of glibc's);
    // else a glibc static PIE (loading libc, libm and libgcc_s dynamically
    // costs more again). Only this binary is linked so (crt-static would
    // break proc-macro crates if set for the workspace).
    let dest = root.join("target/release/xlb");
    match toolchain::musl_target() {
        Some(target) => {
            run(host_cargo(root).args(["build", "--release", "--locked", "-p", "lb-userspace", "--bin", "xlb", "--target", target]))?;
            // A new file, not a write into cargo's hard link to its own copy
            // (or into a binary an agent is running from).
            let _ = std::fs::remove_file(&dest);
            let built = root.join("target").join(target).join("release/xlb");
            std::fs::copy(&built, &dest).with_context(|| format!("cannot copy {} to {}", built.display(), dest.display()))?;
        }
        None => {
            run(host_cargo(root).args(["rustc", "--release", "--locked", "-p", "lb-userspace", "--bin", "xlb", "--", "-C", "target-feature=+crt-static"]))?;
        }
    }
    eprintln!("xtask: built {}", root.join("target/release/xlb").display());
    Ok(())
}

fn require_root(what: &str) -> Result<()> {
    if !nix_is_root() {
        bail!("{what} needs root (BPF, XDP and network namespaces): run it with sudo");
    }
    Ok(())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

fn runtime_tools() -> Result<()> {
    // `ip` for namespaces/veth/bridges, `ethtool` to turn off TX checksum
    // offload on test senders, keepalived, BIRD and FRR for the failover tests,
    // `tcpdump` reads the pcap `xlb trace` writes, `curl --unix-socket`
    // reads the agent's HTTP API as an operator would.
    toolchain::apt_install(&["iproute2", "ethtool", "keepalived", "bird2", "frr", "tcpdump", "curl"])
}

/// Run `cargo test`, echoing its output, and end with one total line
/// (`tests: N passed, N failed`) over every test binary.
fn run_tests(c: &mut Command) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let mut child = c.stdout(std::process::Stdio::piped()).spawn().context("cannot run cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                let num = |word: &str| {
                    rest.split(';')
                        .find_map(|p| p.trim().strip_suffix(word).and_then(|n| n.trim().rsplit(' ').next()?.parse::<u64>().ok()))
                        .unwrap_or(0)
                };
                passed += num(" passed");
                failed += num(" failed");
            }
        }
    }
    let status = child.wait()?;
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

fn main() -> Result<()> {
    let root = root_dir();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("build") => build(&root),
        Some("test") => {
            require_root("cargo xtask test")?;
            runtime_tools()?;
            build(&root)?;
            let mut c = host_cargo(&root);
            c.args(["test", "--release", "--locked", "--workspace", "--all-targets"])
                .env("XLB_BIN", root.join("target/release/xlb"))
                .env("XLB_LAB_BIN", root.join("target/release/xlb-lab"));
            c.arg("--").args(&args[1..]);
            run_tests(&mut c)
        }
        Some("bench") => {
            require_root("cargo xtask bench")?;
            runtime_tools()?;
            // The comparison's contenders, real clients and servers, and the plot's font, from Debian.
            toolchain::apt_install(&["nftables", "haproxy", "nginx-light", "apache2-utils", "iperf3", "fonts-dejavu-core"])?;
            build(&root)?;
            build_ebpf_variant(&root, &["--features", "floors"], "target/ebpf-floors")?;
            run(Command::new(root.join("target/release/xlb-lab"))
                .arg("bench")
                .arg("--xlb")
                .arg(root.join("target/release/xlb"))
                .arg("--floors")
                .arg(root.join("target/ebpf-floors/bpfel-unknown-none/release/lb-ebpf"))
                .arg("--out")
                .arg(root.join("target/bench"))
                .args(args.get(1).map(|s| vec!["--sections".to_string(), s.clone()]).unwrap_or_default()))
        }
        Some("demo") => {
            require_root("cargo xtask demo")?;
            runtime_tools()?;
            build(&root)?;
            run(Command::new(root.join("target/release/xlb-lab"))
                .arg("demo")
                .arg("--xlb")
                .arg(root.join("target/release/xlb")))
        }
        _ => {
            eprintln!("usage: cargo xtask build | test [TEST FILTER…] | demo | bench [cost,live,compare,scale,encap,vipforms,profile]");
            std::process::exit(2);
        }
    }
}
