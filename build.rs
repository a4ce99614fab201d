//! Builds the probe guest (resources/probe) so every `cargo build`, `cargo run` and
//! `cargo test` has a fresh guest to boot: target/probe/probe.elf and probe.bzimage.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let root =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    for path in [
        "resources/probe/src",
        "resources/probe/Cargo.toml",
        "resources/probe/Cargo.lock",
        "resources/probe/build.rs",
        "resources/probe/linker.ld",
        "resources/probe/linker-pvh.ld",
        "resources/probe/layout.ld",
        "tools/build-probe.sh",
        "tools/mkbzimage.py",
    ] {
        println!("cargo:rerun-if-changed={path}");
    }
    let out = root.join("target").join("probe");
    let status = Command::new("bash")
        .arg(root.join("tools/build-probe.sh"))
        .arg(&out)
        .status()
        .expect("cannot run bash to build the probe guest");
    assert!(
        status.success(),
        "tools/build-probe.sh failed: the probe guest did not build"
    );
    println!("cargo:rustc-env=EMBER_PROBE_DIR={}", out.display());
}
