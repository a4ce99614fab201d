//! Builds the probe guest (resources/probe) so every native `cargo build`, `cargo run` and
//! `cargo test` has a fresh guest to boot: target/probe/probe.elf, probe-pvh.elf and
//! probe.bzimage. Everything is done here in Rust with the toolchain ember builds with: no
//! shell, no Python. A cross build of ember (another target than the build host) skips the
//! probe, which only the tests and the README's first command use; so does
//! `EMBER_SKIP_PROBE=1`.

#[path = "tools/bzimage.rs"]
mod bzimage;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The probe always builds for the build host with these flags: guest code may run in
/// KVM's instruction emulator, which cannot run SSE arithmetic (the probe has no floats).
const PROBE_RUSTFLAGS: &str =
    "-C target-feature=-sse,-sse2 -C relocation-model=static -C panic=abort";
const PROBE_TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let root =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    if let Err(e) = build_seccomp_filters(&root) {
        panic!("the seccomp filters did not compile: {e}");
    }
    for path in [
        "resources/probe/src",
        "resources/probe/Cargo.toml",
        "resources/probe/Cargo.lock",
        "resources/probe/build.rs",
        "resources/probe/linker.ld",
        "resources/probe/linker-pvh.ld",
        "resources/probe/layout.ld",
        "tools/bzimage.rs",
    ] {
        println!("cargo:rerun-if-changed={path}");
    }
    println!("cargo:rerun-if-env-changed=EMBER_SKIP_PROBE");
    let out = root.join("target").join("probe");
    println!("cargo:rustc-env=EMBER_PROBE_DIR={}", out.display());

    let target = std::env::var("TARGET").unwrap_or_default();
    let host = std::env::var("HOST").unwrap_or_default();
    if target != host || host != PROBE_TARGET {
        println!(
            "cargo:warning=probe guest not built: it is built only in native x86_64 builds \
             (this builds {target} on {host}); ember itself is unaffected"
        );
        return;
    }
    if std::env::var_os("EMBER_SKIP_PROBE").is_some_and(|v| v == "1") {
        println!("cargo:warning=probe guest not built (EMBER_SKIP_PROBE=1)");
        return;
    }
    if let Err(e) = build_probe(&root, &out) {
        panic!("the probe guest did not build: {e}");
    }
}

/// Compiles `resources/seccomp/<target>.json` to BPF and writes it to
/// `$OUT_DIR/seccomp_filters.bin` for `src/seccomp.rs` to embed: per thread kind, the name's
/// length (u32) and the name, the instruction count (u32) and the instructions (code u16,
/// jt u8, jf u8, k u32), all little-endian. A target without a filter file gets an empty
/// file (ember then needs `--seccomp-filter` or `--no-seccomp`).
fn build_seccomp_filters(root: &Path) -> Result<(), String> {
    let target = std::env::var("TARGET").unwrap_or_default();
    let json = root
        .join("resources/seccomp")
        .join(format!("{target}.json"));
    println!("cargo:rerun-if-changed={}", json.display());
    let out = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?)
        .join("seccomp_filters.bin");
    let mut bytes = Vec::new();
    if json.exists() {
        let arch = target.split('-').next().unwrap_or_default();
        let arch = seccompiler::TargetArch::try_from(arch).map_err(|e| format!("{arch}: {e}"))?;
        let file = std::fs::File::open(&json)
            .map_err(|e| format!("cannot open {}: {e}", json.display()))?;
        let map = seccompiler::compile_from_json(std::io::BufReader::new(file), arch)
            .map_err(|e| format!("{}: {e}", json.display()))?;
        let mut names: Vec<&String> = map.keys().collect();
        names.sort();
        for name in names {
            let program = &map[name];
            bytes.extend_from_slice(&(name.len() as u32).to_le_bytes());
            bytes.extend_from_slice(name.as_bytes());
            bytes.extend_from_slice(&(program.len() as u32).to_le_bytes());
            for i in program {
                bytes.extend_from_slice(&i.code.to_le_bytes());
                bytes.push(i.jt);
                bytes.push(i.jf);
                bytes.extend_from_slice(&i.k.to_le_bytes());
            }
        }
    }
    write_out(&out, &bytes)
}

fn build_probe(root: &Path, out: &Path) -> Result<(), String> {
    std::fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let bin = format!("{PROBE_TARGET}/release/ember-probe");
    cargo_build(root, &out.join("cargo"), &[])?;
    let elf = out.join("cargo").join(&bin);
    copy_out(&elf, &out.join("probe.elf"))?;
    let image = std::fs::read(&elf).map_err(|e| format!("cannot read {}: {e}", elf.display()))?;
    let bz = bzimage::from_elf(&image).map_err(|e| format!("bzImage: {e}"))?;
    write_out(&out.join("probe.bzimage"), &bz)?;
    cargo_build(root, &out.join("cargo-pvh"), &["--features", "pvh"])?;
    copy_out(
        &out.join("cargo-pvh").join(&bin),
        &out.join("probe-pvh.elf"),
    )?;
    Ok(())
}

/// Runs cargo on the probe with a clean environment: nothing the outer build (or the user)
/// set for ember may change how the probe builds, and each variant has its own target
/// directory so neither rebuilds the other. The default toolchain builds it even when ember
/// builds with another (the fuzz targets use nightly), so every build boots the same guest.
fn cargo_build(root: &Path, target_dir: &Path, extra: &[&str]) -> Result<(), String> {
    let mut cmd = Command::new("cargo");
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let outer = [
            "CARGO_BUILD_",
            "CARGO_TARGET_",
            "CARGO_PROFILE_",
            "CARGO_ENCODED_",
        ]
        .iter()
        .any(|p| key.starts_with(p));
        if outer {
            cmd.env_remove(key);
        }
    }
    for key in [
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_INCREMENTAL",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO",
        "RUSTC",
        "RUSTUP_TOOLCHAIN",
    ] {
        cmd.env_remove(key);
    }
    let output = cmd
        .env("RUSTFLAGS", PROBE_RUSTFLAGS)
        .args(["build", "--release", "--offline", "--locked", "--target"])
        .arg(PROBE_TARGET)
        .arg("--manifest-path")
        .arg(root.join("resources/probe/Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        .args(extra)
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "cargo build of the probe failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}

/// Replaces `to` in one step, so a test reading it never sees half a file.
fn write_out(to: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = to.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, to).map_err(|e| format!("cannot replace {}: {e}", to.display()))
}

fn copy_out(from: &Path, to: &Path) -> Result<(), String> {
    let bytes = std::fs::read(from).map_err(|e| format!("cannot read {}: {e}", from.display()))?;
    write_out(to, &bytes)
}
