//! Embeds the XDP object built by `cargo xtask build` into the `xlb` binary.
//!
//! Like aya-template's build script: when the object was not built (plain
//! `cargo check`, `cargo clippy`, `cargo test` of the pure parts on a
//! machine without the eBPF toolchain), an empty stand-in is embedded
//! instead and the agent refuses to start with a clear line. `cargo xtask`
//! sets `XLB_REQUIRE_EBPF`, so its builds always embed the real object.
use std::{env, fs, path::PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let obj = env::var_os("XLB_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/ebpf/bpfel-unknown-none/release/lb-ebpf"));
    println!("cargo:rerun-if-env-changed=XLB_EBPF_OBJECT");
    println!("cargo:rerun-if-env-changed=XLB_REQUIRE_EBPF");
    println!("cargo:rerun-if-changed={}", obj.display());
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("xlb.bpf.o");
    match fs::read(&obj) {
        Ok(bytes) if !bytes.is_empty() => fs::write(&out, bytes).expect("cannot write OUT_DIR/xlb.bpf.o"),
        res => {
            let why = res.err().map_or_else(|| "empty".to_string(), |e| e.to_string());
            if env::var_os("XLB_REQUIRE_EBPF").is_some() {
                panic!("the XDP object {} is missing ({why}): `cargo xtask build` compiles lb-ebpf first", obj.display());
            }
            println!(
                "cargo:warning=the XDP object {} is missing ({why}): embedding an empty stand-in (the agent will refuse to start); build with `cargo xtask build`",
                obj.display()
            );
            fs::write(&out, b"").expect("cannot write OUT_DIR/xlb.bpf.o");
        }
    }
}
