//! Embeds the XDP object built by `cargo xtask build` into the `xlb` binary.
use std::{env, fs, path::PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let obj = env::var_os("XLB_EBPF_OBJECT").map(PathBuf::from).unwrap_or_else(|| {
        manifest.join("../target/ebpf/bpfel-unknown-none/release/lb-ebpf")
    });
    println!("cargo:rerun-if-env-changed=XLB_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", obj.display());
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("xlb.bpf.o");
    if let Err(e) = fs::copy(&obj, &out) {
        panic!(
            "the XDP object {} is missing ({e}): build with `cargo xtask build` (it compiles lb-ebpf first)",
            obj.display()
        );
    }
}
