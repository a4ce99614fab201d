//! Real Linux guests: where they can run, what they boot, and a console to talk to them.
//!
//! A Debian kernel cannot boot under KVM's instruction emulator (the CI hosts' /dev/kvm) in
//! useful time, so each test runs itself inside a *nested host*: a Debian kernel under QEMU
//! with TCG, whose emulated SVM gives it a working /dev/kvm (tools/nested-host/). Outside,
//! [`linux_test`] boots the nested host with this very test binary and runs the one test
//! there; inside (`EMBER_NESTED_HOST=1`), or on a host with hardware virtualization when
//! `EMBER_LINUX_TESTS=direct`, it runs the test's body. docs/testing.md has the details.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use super::api::ApiClient;
use super::nested::{self, LinuxImages};
use super::{RUN_DEADLINE, Scratch, ember_command};

/// How long a Linux guest may take to reach a point the test waits for. Guests reach /init
/// in about 10 s inside the nested host; this leaves room for a loaded CI machine.
pub const GUEST_DEADLINE: Duration = Duration::from_secs(180);

/// How long a guest that has not reached its /init yet may stay silent. A sound boot prints
/// a kernel line every few seconds at most; the emulated host now and then leaves a guest
/// re-emulating one instruction for good (docs/testing.md, "Known limits"), and such a
/// boot is told apart with [`nested::GUEST_STALLED`] so the harness tries it again.
const SILENT_BEFORE_INIT: Duration = Duration::from_secs(60);

/// Runs a Linux guest test: `body` directly where Linux guests can run, otherwise this one
/// test (`name`, the test function's name) inside a nested host.
pub fn linux_test(name: &str, body: impl FnOnce(&LinuxImages)) {
    if let Some(images) = nested::images_if_runnable_here() {
        body(&images);
        return;
    }
    // Knobs for tests inside (EMBER_NET_TRANSFER_MIB, ...) travel with them.
    let env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with("EMBER_NET_"))
        .collect();
    let console =
        nested::run_self_with_env(&["--exact", name, "--nocapture", "--test-threads=1"], &env)
            .unwrap_or_else(|e| panic!("{e}"));
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
    /// Whether the guest's current boot has reached its /init.
    reached_init: bool,
}

impl LinuxVm {
    /// Boots `config` with `--no-api`.
    pub fn boot_config(dir: &Scratch, config: &serde_json::Value) -> Self {
        Self::boot_config_with_flags(dir, config, &[])
    }

    /// Boots `config` with `--no-api` and `flags`.
    pub fn boot_config_with_flags(
        dir: &Scratch,
        config: &serde_json::Value,
        flags: &[&str],
    ) -> Self {
        let path = dir.write("vm.json", config.to_string());
        let mut args = vec!["--no-api", "--config-file", path.to_str().unwrap()];
        args.extend_from_slice(flags);
        Self::spawn(ember_command(&args), None)
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
        // Inside a nested host the guest's console goes to the nested host's console too, so
        // a run shows progress (its watchdog treats a long silence as a hang) and a failure
        // shows what the guest said. The prefix keeps guest lines apart from the host's.
        let echo = std::env::var_os("EMBER_NESTED_HOST").is_some();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let line = line.replace('\r', "");
                if echo {
                    println!("guest| {line}");
                }
                if tx.send(line).is_err() {
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
            reached_init: false,
        }
    }

    /// ember's process id.
    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.child.id()
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
            let wait = if self.reached_init {
                left
            } else {
                left.min(SILENT_BEFORE_INIT)
            };
            match self.lines.recv_timeout(wait) {
                Ok(line) => {
                    if line.starts_with("EMBER-GUEST init") {
                        self.reached_init = true;
                    } else if line.contains("] Linux version ") {
                        self.reached_init = false;
                    }
                    self.console.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) if wait < left => panic!(
                    "{} (no console line for {SILENT_BEFORE_INIT:?}) while waiting for {needle:?}:\n{}\n{}",
                    nested::GUEST_STALLED,
                    self.console.join("\n"),
                    kvm_trace()
                ),
                Err(RecvTimeoutError::Timeout) => panic!(
                    "no console line with {needle:?} within {limit:?}:\n{}\n{}",
                    self.console.join("\n"),
                    kvm_trace()
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    let log = self
                        .log
                        .take()
                        .map(|h| h.join().unwrap_or_default())
                        .unwrap_or_default();
                    panic!(
                        "ember's console closed before {needle:?} (exit {status:?}):\n{}\n--- ember's log ---\n{log}",
                        self.console.join("\n")
                    )
                }
            }
        }
    }

    /// The console lines so far that contain any of `needles`, one per line: what a
    /// failed assertion shows.
    pub fn lines_with(&self, needles: &[&str]) -> String {
        self.console
            .iter()
            .filter(|l| needles.iter().any(|n| l.contains(n)))
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
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
                let trace = kvm_trace();
                let _ = self.child.kill();
                panic!(
                    "ember did not exit within {RUN_DEADLINE:?}:\n{}\n{trace}",
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

/// What KVM does for a guest that went quiet, from its trace events over one second: the
/// exits (with the guest's rip), injected interrupts and APIC traffic tell a guest spinning
/// on a lost interrupt from one that halted for good. Only inside the nested host, where the
/// test owns the kernel; elsewhere it says why it has nothing.
fn kvm_trace() -> String {
    if std::env::var_os("EMBER_NESTED_HOST").is_none() {
        return "(no KVM trace: only taken inside the nested host)".into();
    }
    let tracing = std::path::Path::new("/sys/kernel/tracing");
    if !tracing.join("trace").exists() {
        let _ = Command::new("mount")
            .args(["-t", "tracefs", "nodev"])
            .arg(tracing)
            .status();
    }
    let write = |file: &str, what: &str| std::fs::write(tracing.join(file), what);
    // The nested host's /init keeps a filtered trace of rare exits; this one wants them all.
    let all = write("events/kvm/kvm_exit/filter", "0")
        .and_then(|_| write("trace", ""))
        .and_then(|_| write("events/kvm/enable", "1"));
    if let Err(e) = all {
        return format!("(no KVM trace: {e})");
    }
    std::thread::sleep(Duration::from_secs(1));
    let _ = write("events/kvm/enable", "0");
    let trace = std::fs::read_to_string(tracing.join("trace")).unwrap_or_default();
    let lines: Vec<&str> = trace.lines().filter(|l| !l.starts_with('#')).collect();
    let events = lines.len();
    let tail = lines[events.saturating_sub(80)..].join("\n");
    format!("--- KVM trace, one second: {events} events, the last 80 ---\n{tail}")
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
