//! arm64 guests in CI: ember's arm64 build (cross-compiled here with Debian's rustc-web and
//! the aarch64 cross linker) runs inside an emulated arm64 host (tools/nested-host with
//! NESTED_ARCH=arm64, whose KVM runs in QEMU's emulated EL2). The test binary is x86_64,
//! so what happens inside is a shell script: it runs ember on configurations the test
//! wrote into the shared tree and prints each run's console, log and exit code with the
//! run's name in front, for the test to read. docs/testing.md has the details.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use super::nested::{NESTED_HOST, initrd_with_script};

const TARGET: &str = "aarch64-unknown-linux-gnu";
/// How long one arm64 nested host may run (it boots a few guests).
const TIMEOUT_S: u64 = 600;
/// run.sh's codes for a nested host that failed or hung by itself: tried again.
const HOST_FAILED: i32 = 125;
const HOST_HUNG: i32 = 126;
const ATTEMPTS: u32 = 3;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn images_dir() -> PathBuf {
    repo().join("target/nested-host-arm64")
}

/// What tools/nested-host/build.sh made for arm64.
pub struct Arm64Images {
    /// Debian's arm64 kernel, an uncompressed Image.
    pub image: PathBuf,
    pub guest_cpio: PathBuf,
    pub rootfs: PathBuf,
}

impl Arm64Images {
    /// Writes `dir/NAME.cpio`: the guests' initramfs with `script` as its /test.sh.
    pub fn initrd(&self, dir: &Path, name: &str, script: &str) -> PathBuf {
        initrd_with_script(&self.guest_cpio, &dir.join(format!("{name}.cpio")), script)
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// A directory in the tree the arm64 host shares (it sees this repository at the same path),
/// emptied first.
pub fn shared_dir(name: &str) -> PathBuf {
    let dir = images_dir().join("runs").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

/// Builds the arm64 images (nothing to do when they are up to date).
pub fn images() -> Result<Arm64Images, String> {
    let status = Command::new("bash")
        .arg(repo().join("tools/nested-host/build.sh"))
        .arg(images_dir())
        .env("NESTED_ARCH", "arm64")
        .status()
        .map_err(|e| format!("cannot run tools/nested-host/build.sh: {e}"))?;
    if !status.success() {
        return Err(format!(
            "tools/nested-host/build.sh (NESTED_ARCH=arm64) failed ({status}); arm64 packages \
             need `dpkg --add-architecture arm64 && apt-get update`"
        ));
    }
    let dir = images_dir();
    Ok(Arm64Images {
        image: dir.join("vmlinuz"),
        guest_cpio: dir.join("guest.cpio"),
        rootfs: dir.join("rootfs.ext4"),
    })
}

/// ember's arm64 release build, cross-compiled once per test process. Needs Debian's
/// `rustc-web` (/usr/bin/rustc), `libstd-rust-web-dev:arm64` and `gcc-aarch64-linux-gnu`,
/// which .ci/run installs.
pub fn ember() -> Result<PathBuf, String> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    static BUILDING: Mutex<()> = Mutex::new(());
    let _one = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    BUILT.get_or_init(cross_build).clone()
}

/// The arm64 build of ember's library unit tests (the binary `cargo test --lib` would run).
pub fn unit_tests() -> Result<PathBuf, String> {
    let out = cargo(&["test", "--lib", "--no-run", "--message-format=json"])?;
    String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["profile"]["test"] == true)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| "cargo named no unit-test executable for arm64".to_owned())
}

/// Runs cargo `args` for the arm64 target with Debian's rustc-web and the cross linker;
/// returns its stdout.
fn cargo(args: &[&str]) -> Result<Vec<u8>, String> {
    for (tool, package) in [
        ("/usr/bin/rustc", "rustc-web and libstd-rust-web-dev:arm64"),
        ("/usr/bin/aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
    ] {
        if !Path::new(tool).exists() {
            return Err(format!(
                "{tool} is missing: the arm64 build needs Debian's {package} (dpkg \
                 --add-architecture arm64; apt-get update; apt-get install ...)"
            ));
        }
    }
    let started = Instant::now();
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .args(["--target", TARGET])
        .arg("--manifest-path")
        .arg(repo().join("Cargo.toml"))
        .env("RUSTC", "/usr/bin/rustc")
        .env(
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
            "aarch64-linux-gnu-gcc",
        )
        // The outer cargo's jobserver is not this child's.
        .env_remove("CARGO_MAKEFLAGS")
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "the arm64 build (cargo {}) failed ({}):\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    eprintln!(
        "arm64 cargo {}: {:.0} s",
        args.join(" "),
        started.elapsed().as_secs_f64()
    );
    Ok(out.stdout)
}

fn cross_build() -> Result<PathBuf, String> {
    cargo(&["build", "--release", "--bin", "ember"])?;
    Ok(repo().join("target").join(TARGET).join("release/ember"))
}

/// The shell functions the script inside starts with: `run NAME CONFIG [NEEDLE TEXT]` runs
/// ember on CONFIG with its stdin a FIFO (TEXT is typed once the guest printed NEEDLE),
/// then prints its console as `NAME| line`, its log as `NAME log| line` and
/// `NAME| ember-exit=CODE`.
fn prelude(ember: &Path) -> String {
    format!(
        r#"EMBER={ember}
run() {{
    name=$1
    rm -f /tmp/$name.in
    mkfifo /tmp/$name.in
    "$EMBER" --no-api --config-file "$2" </tmp/$name.in >/tmp/$name.out 2>/tmp/$name.log &
    pid=$!
    exec 3>/tmp/$name.in
    if [ -n "$3" ]; then
        n=0
        while ! grep -q "$3" /tmp/$name.out && [ $n -lt 1200 ]; do sleep 0.25; n=$((n+1)); done
        echo "$4" >&3
    fi
    wait $pid
    code=$?
    exec 3>&-
    sed "s/^/$name| /" /tmp/$name.out
    sed "s/^/$name log| /" /tmp/$name.log
    echo "$name| ember-exit=$code"
}}
"#,
        ember = ember.display()
    )
}

/// Runs `script` (after [`prelude`]) in an arm64 nested host with a GIC of generation `gic`
/// (2 or 3) and returns its console. A nested host that fails or hangs by itself is started
/// again (three attempts); the script's own failure is returned as it is.
pub fn run(name: &str, gic: u8, ember: &Path, script: &str) -> Result<String, String> {
    let _one_at_a_time = NESTED_HOST.lock().unwrap_or_else(|e| e.into_inner());
    let path = images_dir().join("runs").join(format!("{name}.sh"));
    std::fs::create_dir_all(images_dir().join("runs")).map_err(|e| e.to_string())?;
    std::fs::write(&path, format!("{}{script}", prelude(ember)))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let mut attempt = 1;
    loop {
        let started = Instant::now();
        let out = Command::new("bash")
            .arg(repo().join("tools/nested-host/run.sh"))
            .arg("--timeout")
            .arg(TIMEOUT_S.to_string())
            .arg(&path)
            .env("NESTED_ARCH", "arm64")
            .env("NESTED_GIC", gic.to_string())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run tools/nested-host/run.sh: {e}"))?;
        let console = String::from_utf8_lossy(&out.stdout).replace('\r', "");
        let errors = String::from_utf8_lossy(&out.stderr).into_owned();
        println!(
            "--- arm64 nested host, GICv{gic} ({:.1} s) ---\n{console}",
            started.elapsed().as_secs_f64()
        );
        eprintln!("{errors}");
        let code = out.status.code().unwrap_or(-1);
        if out.status.success() {
            return Ok(console);
        }
        if attempt < ATTEMPTS && (code == HOST_FAILED || code == HOST_HUNG) {
            eprintln!(
                "arm64 nested host: attempt {attempt} failed by itself ({code}); trying again"
            );
            attempt += 1;
            continue;
        }
        return Err(format!(
            "the arm64 nested host's script failed ({}); its console is above\n{errors}",
            out.status
        ));
    }
}

/// What run `name` printed, without the prefixes: its console lines (with `ember-exit=N`),
/// then `--- log ---` and ember's log.
pub fn output_of(console: &str, name: &str) -> String {
    let with = |prefix: String| -> Vec<&str> {
        console
            .lines()
            .filter_map(|l| l.strip_prefix(prefix.as_str()))
            .collect()
    };
    format!(
        "{}\n--- log ---\n{}",
        with(format!("{name}| ")).join("\n"),
        with(format!("{name} log| ")).join("\n")
    )
}
