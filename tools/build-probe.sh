#!/usr/bin/env bash
# Builds the probe guest (resources/probe) into OUT_DIR:
#   OUT_DIR/probe.elf      the ELF, booted like a vmlinux
#   OUT_DIR/probe.bzimage  the same code wrapped as a Linux bzImage
#   OUT_DIR/probe-pvh.elf  the ELF with the `pvh` feature: a PVH note and 32-bit entry
# Quiet on success; on failure prints the build log. Safe to call from ember's build.rs:
# the cargo/rustc environment of the outer build is dropped, so the probe always gets its
# own target, flags and target directory.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1"
out="$(cd "$1" && pwd)"

# Variables an outer cargo (or the user) may have set that would change how the probe builds.
for var in $(env | sed -n 's/^\(CARGO_BUILD_[A-Z0-9_]*\|CARGO_TARGET_[A-Z0-9_]*\|CARGO_PROFILE_[A-Z0-9_]*\|CARGO_ENCODED_[A-Z0-9_]*\)=.*/\1/p'); do
    unset "$var"
done
unset RUSTFLAGS RUSTDOCFLAGS RUSTC_WRAPPER RUSTC_WORKSPACE_WRAPPER CARGO_INCREMENTAL \
    CARGO_MAKEFLAGS MAKEFLAGS MFLAGS CARGO_PRIMARY_PACKAGE CARGO_MANIFEST_DIR CARGO_MANIFEST_PATH
# The probe always builds with the default toolchain, even when the outer build runs on
# another one (the fuzz targets build ember with nightly): every build then boots the same
# guest, and target/probe is not rebuilt back and forth.
unset CARGO RUSTC RUSTUP_TOOLCHAIN

# Guest code may run in KVM's instruction emulator, which cannot run SSE arithmetic: build
# without SSE (rustc warns about the float ABI; the probe has no floats).
export RUSTFLAGS="-C target-feature=-sse,-sse2 -C relocation-model=static -C panic=abort"

log="$out/build.log"
: >"$log"

# build TARGET_DIR [CARGO_ARGS...]: each variant gets its own target directory, so neither
# rebuilds the other's artifacts nor overwrites its binary.
build() {
    local target_dir="$1"
    shift
    if ! cargo build --release --offline --locked \
        --target x86_64-unknown-linux-gnu \
        --manifest-path "$root/resources/probe/Cargo.toml" \
        --target-dir "$target_dir" "$@" >>"$log" 2>&1; then
        cat "$log" >&2
        echo "build-probe.sh: cargo build of the probe failed" >&2
        exit 1
    fi
}

# copy_out BUILT_ELF NAME: replaces OUT_DIR/NAME in one step, so no reader sees half a file.
copy_out() {
    cp "$1" "$out/$2.tmp"
    mv "$out/$2.tmp" "$out/$2"
}

bin=x86_64-unknown-linux-gnu/release/ember-probe
build "$out/cargo"
copy_out "$out/cargo/$bin" probe.elf
python3 "$root/tools/mkbzimage.py" "$out/probe.elf" "$out/probe.bzimage"
build "$out/cargo-pvh" --features pvh
copy_out "$out/cargo-pvh/$bin" probe-pvh.elf
