//! A hostile or broken guest: the probe asked to misbehave (resources/probe/src/hostile.rs)
//! against the real binary. None of it may wedge ember, turn a clean stop into an error,
//! flood the host's log or make the metrics lie.
//!
//! - A guest that prints without end into a stdout nobody reads: ember drops (and counts)
//!   what the host does not take, still takes console input, and stops on SIGTERM with 143.
//!   The issue this guards: a full stdout pipe plus one byte of console input wedged ember,
//!   and SIGTERM then ended it with exit 1, "KVM_RUN failed". With a stdout written
//!   blocking, this test fails (ember never stops).
//! - A guest that publishes a virtio available index its queue cannot hold and notifies the
//!   queue 20000 times: the drive says so once (log line, `queue_broken` count and a
//!   configuration change interrupt), shows DEVICE_NEEDS_RESET in the device status and
//!   leaves the queue alone until the driver resets the device, then works again. Before,
//!   every notification looked at the broken ring again: about 2200 unthrottled
//!   "Iterator error" lines (virtio-queue's own) and 320 KiB of log for this run.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

/// An ember process killed if the test ends early, so no flooding VM outlives a failure.
struct Ember(Child);

impl Drop for Ember {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Ember {
    fn alive(&mut self) -> bool {
        self.0.try_wait().expect("wait for ember").is_none()
    }

    /// Waits at most `limit` for ember to exit.
    fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.0.try_wait().expect("wait for ember") {
                return Some(status);
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// What a reader thread has collected so far from one of ember's pipes.
struct Collected {
    text: Arc<Mutex<Vec<u8>>>,
    reader: Option<JoinHandle<()>>,
}

impl Collected {
    fn start(mut r: impl Read + Send + 'static) -> Self {
        let text = Arc::new(Mutex::new(Vec::new()));
        let sink = text.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = r.read(&mut buf) {
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Collected {
            text,
            reader: Some(reader),
        }
    }

    /// Everything, once the writer has closed the pipe (ember exited).
    fn all(&mut self) -> String {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        String::from_utf8_lossy(&self.text.lock().unwrap()).into_owned()
    }
}

/// Bytes waiting in a pipe (FIONREAD on its read end).
fn pipe_bytes(fd: &impl AsRawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(r, 0, "FIONREAD: {}", std::io::Error::last_os_error());
    n as usize
}

/// Every flushed metrics line of a run.
fn metrics_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("metrics line is JSON"))
        .collect()
}

/// A counter summed over every flushed line (each holds the change since the previous one).
fn metric_sum(lines: &[serde_json::Value], group: &str, name: &str) -> u64 {
    lines
        .iter()
        .map(|l| l[group][name].as_u64().unwrap_or(0))
        .sum()
}

/// How much guest output ember holds for a slow host before it drops (the UART's output
/// buffer, src/devices/legacy/serial.rs).
const EMBER_OUTPUT_BUFFER: usize = 1 << 20;

#[test]
fn console_flood_into_a_full_pipe_then_input_and_sigterm() {
    let dir = Scratch::new("flood");
    let metrics = dir.path("metrics.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&config_json(
        &probe_elf(),
        1,
        128,
        &probe_args(1, 128, "probe.flood=serial"),
    ))
    .unwrap();
    cfg["metrics"] = serde_json::json!({ "metrics_path": metrics });
    let path = dir.write("vm.json", cfg.to_string());
    let mut child = ember_command(&["--no-api", "--config-file", path.to_str().unwrap()])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn ember");
    // Never read: the pipe fills and stays full. Kept open until ember has exited, so
    // ember sees a full pipe, not a closed one.
    let stdout = child.stdout.take().unwrap();
    let mut stderr = Collected::start(child.stderr.take().unwrap());
    let mut stdin = child.stdin.take().unwrap();
    let mut ember = Ember(child);

    // SAFETY: F_GETPIPE_SZ only reads the pipe's capacity.
    let capacity = unsafe { libc::fcntl(stdout.as_raw_fd(), libc::F_GETPIPE_SZ) };
    assert!(capacity > 0, "F_GETPIPE_SZ on ember's stdout");
    let capacity = capacity as usize;
    // The pipe filling shows how fast the guest prints; ember's own buffer takes
    // EMBER_OUTPUT_BUFFER more before it drops, which is what this test wants to see.
    let start = Instant::now();
    let mut first_output = None;
    let full_at = loop {
        assert!(
            ember.alive(),
            "ember exited while the guest flooded: {}",
            stderr.all()
        );
        let queued = pipe_bytes(&stdout);
        if queued > 0 && first_output.is_none() {
            first_output = Some(Instant::now());
        }
        if queued + 4096 >= capacity {
            break Instant::now();
        }
        assert!(
            start.elapsed() < RUN_DEADLINE,
            "the pipe never filled ({queued} of {capacity} bytes)"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let fill_time = full_at - first_output.unwrap();
    // At the rate the pipe filled, with a margin for a slower guest later on.
    let overflow = fill_time.mul_f64(1.5 * EMBER_OUTPUT_BUFFER as f64 / capacity as f64);
    let overflow = overflow.clamp(Duration::from_secs(2), RUN_DEADLINE);
    eprintln!("pipe of {capacity} bytes full after {fill_time:?}; waiting {overflow:?} more");
    std::thread::sleep(overflow);
    assert!(
        ember.alive(),
        "ember exited while the guest flooded: {}",
        stderr.all()
    );

    // One byte of console input while the output side is stuck.
    stdin.write_all(b"x").unwrap();
    stdin.flush().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(ember.alive(), "ember exited on console input");

    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(ember.0.id() as i32, libc::SIGTERM) }, 0);
    // ember gives a stuck stdout 2 s to take what is left, then stops regardless.
    let status = ember.wait_exit(Duration::from_secs(10));
    drop(stdout);
    let Some(status) = status else {
        let _ = ember.0.kill();
        let _ = ember.0.wait();
        panic!(
            "ember did not stop within 10 s of SIGTERM:\n{}",
            stderr.all()
        );
    };
    let err = stderr.all();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{err}");
    assert!(!err.contains("KVM_RUN failed"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("stopped by signal 15"), "{err}");

    let lines = metrics_lines(&metrics);
    assert!(!lines.is_empty(), "no metrics flushed at exit");
    let dropped = metric_sum(&lines, "uart", "output_dropped_bytes");
    assert!(
        dropped > 0,
        "ember held every byte of a guest flooding a full pipe for {overflow:?}: {lines:?}"
    );
    assert_eq!(
        metric_sum(&lines, "uart", "input_bytes"),
        1,
        "the console input did not reach the UART: {lines:?}"
    );
}

/// Notifications the probe sends to its broken queue (`hostile::NOTIFICATIONS`).
const HOSTILE_NOTIFICATIONS: usize = 20_000;

#[test]
fn broken_virtqueue_needs_reset_once_and_recovers() {
    let dir = Scratch::new("hostile-virtq");
    let disk = disk_image(&dir, "disk.img", 0, 64);
    let metrics = dir.path("metrics.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&config_json(
        &probe_elf(),
        1,
        128,
        &probe_args(1, 128, "probe.blk=1 probe.hostile=virtq"),
    ))
    .unwrap();
    cfg["drives"] = serde_json::json!([{
        "drive_id": "data",
        "path_on_host": disk,
        "is_root_device": false,
        "is_read_only": false,
    }]);
    cfg["metrics"] = serde_json::json!({ "metrics_path": metrics });
    let r = boot_config(&cfg.to_string());

    // The regular checks pass first; the hostile part follows DONE.
    r.assert_probe_passed(PROBE_CHECKS + 1 + PROBE_CHECKS_PER_BLOCK_DEVICE);
    let hostile = r
        .line_starting("PROBE hostile needs_reset=")
        .unwrap_or_else(|| panic!("no hostile report:\n{}", r.stdout));
    assert_eq!(
        hostile,
        format!("PROBE hostile needs_reset=1 config_irq=1 notified={HOSTILE_NOTIFICATIONS}"),
        "{}",
        r.stdout
    );
    assert_eq!(
        r.line_starting("PROBE hostile recovered="),
        Some("PROBE hostile recovered=1"),
        "{}",
        r.stdout
    );

    // A small log, with one line about the broken queue rather than one per notification
    // (virtio-queue itself logs a broken ring it is asked to pop, without any limit).
    let head: String = r.stderr.chars().take(4096).collect();
    assert!(
        r.stderr.len() < 8 * 1024,
        "{} bytes of log for a guest that notified a broken queue {HOSTILE_NOTIFICATIONS} times:\n{head}",
        r.stderr.len(),
    );
    assert!(!r.stderr.contains("Iterator error"), "{head}");
    let warnings = r.stderr.matches("the guest broke its queue").count();
    assert_eq!(warnings, 1, "{head}");

    // Exactly one breakage, in the sum and for the drive; the metrics stay exact.
    let lines = metrics_lines(&metrics);
    assert!(!lines.is_empty(), "no metrics flushed at exit");
    assert_eq!(metric_sum(&lines, "block", "queue_broken"), 1, "{lines:?}");
    assert_eq!(
        metric_sum(&lines, "block_data", "queue_broken"),
        1,
        "{lines:?}"
    );
}
