//! Real Linux guests: where they can run, what they boot, and a console to talk to them.
//!
//! A Debian kernel cannot boot under KVM's instruction emulator (the CI hosts' /dev/kvm) in
//! useful time, so each test runs itself inside a *nested host*: a Debian kernel under QEMU
//! with TCG, whose emulated SVM gives it a working /dev/kvm (tools/nested-host/). Outside,
//! [`linux_test`] boots the nested host with this very test binary and runs the one test
//! there; inside (`EMBER_NESTED_HOST=1`), or on a host with hardware virtualization when
//! `EMBER_LINUX_TESTS=direct`, it runs the test's body. docs/testing.md has the details.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use super::api::ApiClient;
use super::{RUN_DEADLINE, Scratch, ember_command};

/// How long a Linux guest may take to reach a point the test waits for. Guests reach /init
/// in about 10 s inside the nested host; this leaves room for a loaded CI machine.
pub const GUEST_DEADLINE: Duration = Duration::from_secs(180);

/// How long one nested host may run (it boots one or two guests).
const NESTED_HOST_TIMEOUT_S: u64 = 420;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
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

    /// An initramfs whose /init runs `script` as /test.sh: the base archive with a second
    /// archive appended, which the kernel unpacks over the first.
    pub fn initrd(&self, dir: &Scratch, script: &str) -> PathBuf {
        let mut bytes = std::fs::read(&self.guest_cpio).expect("read the guest initramfs");
        bytes.extend_from_slice(&cpio_newc(&[("test.sh", 0o100755, script.as_bytes())]));
        dir.write("initrd.cpio", bytes)
    }

    /// A private copy of the root file system image.
    pub fn rootfs_copy(&self, dir: &Scratch) -> PathBuf {
        let to = dir.path("rootfs.ext4");
        std::fs::copy(&self.rootfs, &to).expect("copy the root file system image");
        to
    }
}

/// A newc ("070701") cpio archive of regular files, with its trailer.
pub fn cpio_newc(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: usize, name: &str, mode: u32, data: &[u8]) {
        let fields = [
            ino as u32,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
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

/// Builds the images (once per machine; the script keeps them up to date) and returns them.
fn images() -> LinuxImages {
    let dir = repo().join("target/nested-host");
    let status = Command::new("bash")
        .arg(repo().join("tools/nested-host/build.sh"))
        .arg(&dir)
        .status()
        .expect("run tools/nested-host/build.sh");
    assert!(
        status.success(),
        "tools/nested-host/build.sh failed ({status}): the Linux guest images are missing"
    );
    LinuxImages::at(&dir)
}

/// Runs a Linux guest test: `body` directly where Linux guests can run, otherwise this one
/// test (`name`, the test function's name) inside a nested host.
pub fn linux_test(name: &str, body: impl FnOnce(&LinuxImages)) {
    let inside = std::env::var_os("EMBER_NESTED_HOST").is_some();
    let direct = std::env::var("EMBER_LINUX_TESTS").is_ok_and(|v| v == "direct");
    if inside || direct {
        let images = if inside {
            // The outer run built them; the shared tree has them at the same path.
            LinuxImages::at(&repo().join("target/nested-host"))
        } else {
            images()
        };
        body(&images);
        return;
    }
    run_in_nested_host(name);
}

/// Nested hosts use both cores; two at once would only slow each other down.
static NESTED_HOST: Mutex<()> = Mutex::new(());

fn run_in_nested_host(name: &str) {
    let _one_at_a_time = NESTED_HOST.lock().unwrap_or_else(|e| e.into_inner());
    images();
    let exe = std::env::current_exe().expect("the test binary's path");
    let runs = repo().join("target/nested-host/runs");
    std::fs::create_dir_all(&runs).expect("create target/nested-host/runs");
    let script = runs.join(format!("{name}.sh"));
    std::fs::write(
        &script,
        format!(
            "RUST_BACKTRACE=1 exec {} --exact {name} --nocapture --test-threads=1\n",
            exe.display()
        ),
    )
    .expect("write the nested host's script");
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(repo().join("tools/nested-host/run.sh"))
        .arg("--timeout")
        .arg(NESTED_HOST_TIMEOUT_S.to_string())
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .expect("run tools/nested-host/run.sh");
    let console = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let errors = String::from_utf8_lossy(&out.stderr);
    // What the test printed inside, for `--nocapture` runs and for failures.
    println!(
        "--- nested host ({:.1} s) ---\n{console}",
        started.elapsed().as_secs_f64()
    );
    eprintln!("{errors}");
    assert!(
        out.status.success(),
        "the test failed inside the nested host ({}); its output is above.\n{errors}",
        out.status
    );
    // A filter that matched nothing would also exit 0: insist that the test really ran.
    assert!(
        console.contains("test result: ok. 1 passed"),
        "the nested host did not run {name}; its output is above"
    );
}

/// A booted ember whose console the test reads line by line with deadlines.
pub struct LinuxVm {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// ember's log, read as it comes so a chatty run never blocks on a full pipe.
    log: Option<std::thread::JoinHandle<String>>,
    /// Every console line so far, for failure messages.
    pub console: Vec<String>,
    /// The API socket, when ember serves one.
    pub sock: Option<PathBuf>,
    started: Instant,
}

impl LinuxVm {
    /// Boots `config` with `--no-api`.
    pub fn boot_config(dir: &Scratch, config: &serde_json::Value) -> Self {
        let path = dir.write("vm.json", config.to_string());
        Self::spawn(
            ember_command(&["--no-api", "--config-file", path.to_str().unwrap()]),
            None,
        )
    }

    /// Starts ember serving its API on a socket in `dir`; configure it through [`Self::api`].
    pub fn serve_api(dir: &Scratch) -> Self {
        let sock = dir.path("api.sock");
        let vm = Self::spawn(
            ember_command(&["--api-sock", sock.to_str().unwrap()]),
            Some(sock.clone()),
        );
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the API socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        vm
    }

    fn spawn(mut cmd: Command, sock: Option<PathBuf>) -> Self {
        let mut child = cmd.stdin(Stdio::piped()).spawn().expect("spawn ember");
        let stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let log = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line.replace('\r', "")).is_err() {
                    break;
                }
            }
        });
        LinuxVm {
            stdin: child.stdin.take(),
            child,
            lines,
            log: Some(log),
            console: Vec::new(),
            sock,
            started: Instant::now(),
        }
    }

    /// A connection to ember's API.
    pub fn api(&self) -> ApiClient {
        ApiClient::connect(
            self.sock
                .as_ref()
                .expect("ember was started with an API socket"),
        )
    }

    /// Waits for a console line containing `needle` and returns it.
    pub fn wait_for(&mut self, needle: &str) -> String {
        self.wait_for_within(needle, GUEST_DEADLINE)
    }

    pub fn wait_for_within(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.console.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "no console line with {needle:?} within {limit:?}:\n{}",
                    self.console.join("\n")
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "ember's console closed before {needle:?} (exit {:?}):\n{}",
                    self.child.try_wait().ok().flatten(),
                    self.console.join("\n")
                ),
            }
        }
    }

    /// Console lines that arrive within `quiet`: none expected while the guest is paused.
    pub fn lines_within(&mut self, quiet: Duration) -> Vec<String> {
        let deadline = Instant::now() + quiet;
        let mut got = Vec::new();
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.console.push(line.clone());
            got.push(line);
        }
        got
    }

    /// Types `text` on the guest's serial console.
    pub fn type_text(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        stdin
            .write_all(text.as_bytes())
            .expect("write to ember's stdin");
        stdin.flush().expect("flush ember's stdin");
    }

    /// Seconds since ember was spawned.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits for ember to exit on its own; returns its exit code and its log (stderr).
    pub fn wait_exit(mut self) -> (Option<i32>, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            if start.elapsed() > RUN_DEADLINE {
                let _ = self.child.kill();
                panic!(
                    "ember did not exit within {RUN_DEADLINE:?}:\n{}",
                    self.console.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The rest of the console, then the log.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.console.push(line);
        }
        let log = self
            .log
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        (status.code(), log)
    }
}

impl Drop for LinuxVm {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The value after `key=` in a console line such as `EMBER-TEST cpus=2 mem_kib=...`.
pub fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// [`field`] as a number.
pub fn number(line: &str, key: &str) -> u64 {
    let v = field(line, key);
    v.parse()
        .unwrap_or_else(|_| panic!("{key}={v} in {line:?} is not a number"))
}
