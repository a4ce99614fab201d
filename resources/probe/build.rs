// Links the probe as a freestanding image at 1 MiB: no C runtime, no libc, our own layout.
// The `pvh` feature links with linker-pvh.ld, which adds the PT_NOTE carrying the PVH entry.
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR");
    for script in ["linker.ld", "linker-pvh.ld", "layout.ld"] {
        println!("cargo:rerun-if-changed={script}");
    }
    let script = if std::env::var_os("CARGO_FEATURE_PVH").is_some() {
        "linker-pvh.ld"
    } else {
        "linker.ld"
    };
    println!("cargo:rustc-link-arg-bins=-T{dir}/{script}");
    for arg in [
        // Where ld finds layout.ld, which both scripts INCLUDE.
        &format!("-L{dir}"),
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
