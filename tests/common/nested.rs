//! The nested host from the Rust side: the images tools/nested-host/build.sh makes, and
//! running this very test or bench binary inside a nested host (tools/nested-host/run.sh).
//! Shared by the tests and the benchmarks (benches/linux_boot.rs includes this file), so it
//! depends on nothing else in tests/common.

#![allow(dead_code)] // the tests and the benchmarks each use a part

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Instant;

/// How long one nested host may run (it boots a few guests).
const NESTED_HOST_TIMEOUT_S: u64 = 420;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn images_dir() -> PathBuf {
    repo().join("target/nested-host")
}

/// What tools/nested-host/build.sh made: the kernels and the guests' initramfs.
pub struct LinuxImages {
    /// The Debian kernel as a bzImage.
    pub bzimage: PathBuf,
    /// The same kernel as an ELF `vmlinux`.
    pub vmlinux: PathBuf,
    /// The guests' initramfs; a test appends its `/test.sh` (see [`LinuxImages::initrd`]).
    pub guest_cpio: PathBuf,
    /// An ext4 image with busybox, to copy and boot from as a virtio-blk root.
    pub rootfs: PathBuf,
}

impl LinuxImages {
    fn at(dir: &Path) -> Self {
        LinuxImages {
            bzimage: dir.join("vmlinuz"),
            vmlinux: dir.join("vmlinux"),
            guest_cpio: dir.join("guest.cpio"),
            rootfs: dir.join("rootfs.ext4"),
        }
    }

    /// Writes `dir/initrd.cpio`: an initramfs whose /init runs `script` as /test.sh, the base
    /// archive with a second one appended, which the kernel unpacks over the first.
    pub fn initrd(&self, dir: &Path, script: &str) -> Result<PathBuf, String> {
        initrd_with_script(&self.guest_cpio, &dir.join("initrd.cpio"), script)
    }

    /// Writes `dir/rootfs.ext4`, a private copy of the root file system image.
    pub fn rootfs_copy(&self, dir: &Path) -> Result<PathBuf, String> {
        let to = dir.join("rootfs.ext4");
        std::fs::copy(&self.rootfs, &to)
            .map_err(|e| format!("cannot copy {}: {e}", self.rootfs.display()))?;
        Ok(to)
    }
}

/// Writes `to`: the initramfs `guest_cpio` with `script` as its /test.sh, the base archive
/// with a second one appended, which the kernel unpacks over the first.
pub fn initrd_with_script(guest_cpio: &Path, to: &Path, script: &str) -> Result<PathBuf, String> {
    let mut bytes = std::fs::read(guest_cpio)
        .map_err(|e| format!("cannot read {}: {e}", guest_cpio.display()))?;
    bytes.extend_from_slice(&cpio_newc(&[("test.sh", 0o100755, script.as_bytes())]));
    std::fs::write(to, bytes).map_err(|e| format!("cannot write {}: {e}", to.display()))?;
    Ok(to.to_path_buf())
}

/// A newc ("070701") cpio archive of regular files, with its trailer.
pub fn cpio_newc(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: usize, name: &str, mode: u32, data: &[u8]) {
        let fields = [
            ino as u32,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            data.len() as u32,
            0, // dev major
            0, // dev minor
            0, // rdev major
            0, // rdev minor
            name.len() as u32 + 1,
            0, // check
        ];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out.extend_from_slice(data);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
    let mut out = Vec::new();
    for (i, (name, mode, data)) in files.iter().enumerate() {
        entry(&mut out, i + 1, name, *mode, data);
    }
    entry(&mut out, 0, "TRAILER!!!", 0, &[]);
    out
}

/// Builds the images (the script does nothing when they are up to date) and returns them.
pub fn build_images() -> Result<LinuxImages, String> {
    let status = Command::new("bash")
        .arg(repo().join("tools/nested-host/build.sh"))
        .arg(images_dir())
        .status()
        .map_err(|e| format!("cannot run tools/nested-host/build.sh: {e}"))?;
    if !status.success() {
        return Err(format!(
            "tools/nested-host/build.sh failed ({status}): the Linux guest images are missing"
        ));
    }
    Ok(LinuxImages::at(&images_dir()))
}

/// The images, when Linux guests can run right here: inside a nested host (its `/init`
/// sets `EMBER_NESTED_HOST`; the outer run built the images), or on a host with hardware
/// virtualization when `EMBER_LINUX_TESTS=direct`. None means: go through a nested host.
pub fn images_if_runnable_here() -> Option<LinuxImages> {
    if std::env::var_os("EMBER_NESTED_HOST").is_some() {
        return Some(LinuxImages::at(&images_dir()));
    }
    if std::env::var("EMBER_LINUX_TESTS").is_ok_and(|v| v == "direct") {
        return Some(build_images().unwrap_or_else(|e| panic!("{e}")));
    }
    None
}

/// Nested hosts use both cores; two at once would only slow each other down.
pub static NESTED_HOST: Mutex<()> = Mutex::new(());

/// tools/nested-host/run.sh's exit codes for a nested host that failed by itself (its
/// kernel died, or it hung under QEMU's emulation of SVM): such a run says nothing about
/// the binary inside, so it is tried again.
const NESTED_HOST_FAILED: i32 = 125;
const NESTED_HOST_HUNG: i32 = 126;
/// Not run.sh's: the guest triple-faulted or stalled before its /init ran. QEMU's emulation
/// of nested SVM does this to a few boots in a hundred when the nested host is busy
/// (docs/testing.md, "Known limits"); a broken ember fails every boot, so the retries still
/// catch it.
const GUEST_FAILED_EARLY: i32 = -2;
/// What a test inside says when its guest went silent before reaching /init.
pub const GUEST_STALLED: &str = "the guest stalled before its /init";
/// Attempts at one run when the emulated host fails by itself. Each such failure is rare
/// (a few runs in a hundred, more under load); three attempts make a spurious red CI run
/// unlikely while costing nothing when the first attempt is sound.
const NESTED_HOST_ATTEMPTS: u32 = 3;
/// Attempts when the guest failed before its /init. These failures come in runs: CI on
/// 2026-12-06 saw one test's 2-vCPU guest triple-fault three boots in a row (twice at the
/// same point of its boot), where four runs of the same test right after passed. Such a
/// failure costs only the seconds to that point, so more attempts are cheap.
const GUEST_EARLY_ATTEMPTS: u32 = 5;

/// Runs this binary with `args` inside a nested host and returns the nested host's console
/// (which it also prints). Fails when the binary failed there or the host could not run.
pub fn run_self(args: &[&str]) -> Result<String, String> {
    run_self_with_env(args, &[])
}

/// As [`run_self`], with environment variables set for the binary inside. A nested host
/// that hangs or dies by itself is started again, up to [`NESTED_HOST_ATTEMPTS`] times in
/// all, and each retry is reported; a broken ember fails every attempt the same way.
pub fn run_self_with_env(args: &[&str], env: &[(String, String)]) -> Result<String, String> {
    run_self_on_host(args, env, &[])
}

/// As [`run_self_with_env`], with `host_env` set for tools/nested-host/run.sh (the nested
/// host's own shape: `NESTED_PASSTHROUGH_DISK`, say).
pub fn run_self_on_host(
    args: &[&str],
    env: &[(String, String)],
    host_env: &[(&str, &str)],
) -> Result<String, String> {
    let mut attempt = 1;
    loop {
        match run_self_once(args, env, host_env) {
            Err((code, why))
                if (attempt < NESTED_HOST_ATTEMPTS
                    && (code == NESTED_HOST_HUNG || code == NESTED_HOST_FAILED))
                    || (attempt < GUEST_EARLY_ATTEMPTS && code == GUEST_FAILED_EARLY) =>
            {
                eprintln!(
                    "nested host: attempt {attempt} failed in a way the emulated host causes by \
                     itself (code {code}); trying again:\n{why}"
                );
                attempt += 1;
            }
            r => return r.map_err(|(_, why)| why),
        }
    }
}

/// The panic message of the test that failed inside, repeated where a CI log that keeps
/// only the head and tail of a long output still shows it.
fn inner_panic(console: &str) -> String {
    let lines: Vec<&str> = console.lines().collect();
    let Some(at) = lines.iter().position(|l| l.contains("panicked at")) else {
        return String::new();
    };
    let message: Vec<&str> = lines[at..]
        .iter()
        .take_while(|l| !l.starts_with("stack backtrace:") && !l.starts_with("note: "))
        .copied()
        .collect();
    // A long message (a console dump) keeps its head and its last lines, where it ends.
    let shown = if message.len() > 40 {
        let mut shown = message[..5].to_vec();
        shown.push("[...]");
        shown.extend_from_slice(&message[message.len() - 30..]);
        shown
    } else {
        message
    };
    format!("the failure inside:\n{}\n", shown.join("\n"))
}

/// Whether the guest that triple-faulted or stalled had not yet reached its `/init` in the
/// boot that failed. Only the lines the test echoed live as the guest wrote them (`guest| `) count:
/// a failure message quotes the line it waited for ("console closed before \"EMBER-GUEST
/// init\"") and must not pass for the guest having printed it. A test that boots twice
/// counts from the last boot's first kernel line.
pub fn guest_failed_before_init(console: &str) -> bool {
    if !console.contains("triple fault (KVM_EXIT_SHUTDOWN)") && !console.contains(GUEST_STALLED) {
        return false;
    }
    let mut reached_init = false;
    for line in console.lines() {
        let Some(guest) = line.strip_prefix("guest| ") else {
            continue;
        };
        if guest.starts_with("EMBER-GUEST init") {
            reached_init = true;
        } else if guest.contains("] Linux version ") {
            reached_init = false;
        }
    }
    !reached_init
}

fn run_self_once(
    args: &[&str],
    env: &[(String, String)],
    host_env: &[(&str, &str)],
) -> Result<String, (i32, String)> {
    let fail = |why: String| (-1, why);
    let _one_at_a_time = NESTED_HOST.lock().unwrap_or_else(|e| e.into_inner());
    build_images().map_err(fail)?;
    let exe = std::env::current_exe().map_err(|e| fail(format!("this binary's path: {e}")))?;
    let runs = images_dir().join("runs");
    std::fs::create_dir_all(&runs)
        .map_err(|e| fail(format!("cannot create {}: {e}", runs.display())))?;
    let name = args
        .iter()
        .find(|a| !a.starts_with('-'))
        .copied()
        .unwrap_or("run");
    let script = runs.join(format!(
        "{}-{name}.sh",
        exe.file_name().and_then(|n| n.to_str()).unwrap_or("binary")
    ));
    // Values are single-quoted for the nested host's shell; they never hold a quote.
    let vars: String = env
        .iter()
        .map(|(k, v)| format!("{k}='{}' ", v.replace('\'', "")))
        .collect();
    std::fs::write(
        &script,
        format!(
            "{vars}RUST_BACKTRACE=1 exec {} {}\n",
            exe.display(),
            args.join(" ")
        ),
    )
    .map_err(|e| fail(format!("cannot write {}: {e}", script.display())))?;
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(repo().join("tools/nested-host/run.sh"))
        .arg("--timeout")
        .arg(NESTED_HOST_TIMEOUT_S.to_string())
        .arg(&script)
        .envs(host_env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| fail(format!("cannot run tools/nested-host/run.sh: {e}")))?;
    let console = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let errors = String::from_utf8_lossy(&out.stderr);
    println!(
        "--- nested host ({:.1} s) ---\n{console}",
        started.elapsed().as_secs_f64()
    );
    eprintln!("{errors}");
    if !out.status.success() {
        return Err((
            if guest_failed_before_init(&console) {
                GUEST_FAILED_EARLY
            } else {
                out.status.code().unwrap_or(-1)
            },
            format!(
                "{} failed inside the nested host ({}); its output is above.\n{}{errors}",
                exe.display(),
                out.status,
                inner_panic(&console)
            ),
        ));
    }
    Ok(console)
}
