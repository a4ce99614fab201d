// Links the probe as a freestanding image at 1 MiB: no C runtime, no libc, our own layout.
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR");
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rustc-link-arg-bins=-T{dir}/linker.ld");
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-Wl,--build-id=none",
        "-Wl,-z,noexecstack",
        "-no-pie",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
}
