//! How a running microVM meets the outside: console input, termination signals, logging,
//! the boot timer, huge pages.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

/// A running ember whose guest has printed its DONE line and now polls its serial port.
struct LiveVm {
    child: Child,
    lines: Vec<String>,
    stdout_rest: JoinHandle<String>,
}

/// Starts the probe with `probe.wait=serial` and returns once the guest is alive and waiting.
fn start_waiting_probe(dir: &Scratch, extra_flags: &[&str]) -> LiveVm {
    let config = config_json(
        &probe_elf(),
        1,
        128,
        &probe_args(1, 128, "probe.wait=serial"),
    );
    let path = dir.write("vm.json", config);
    let mut args = vec!["--no-api", "--config-file", path.to_str().unwrap()];
    args.extend_from_slice(extra_flags);
    let mut child = ember_command(&args)
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn ember");
    let mut lines = Vec::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            panic!("ember exited before the probe finished: {lines:#?}");
        }
        let done = line.starts_with("PROBE DONE");
        lines.push(line.trim_end().to_owned());
        if done {
            break;
        }
    }
    let stdout_rest = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    LiveVm {
        child,
        lines,
        stdout_rest,
    }
}

impl LiveVm {
    fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
    }

    /// Waits for exit; returns (exit code, the rest of stdout, stderr).
    fn finish(self) -> (Option<i32>, String, String) {
        let mut child = self.child;
        let mut stderr = child.stderr.take().unwrap();
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > RUN_DEADLINE {
                let _ = child.kill();
                panic!("ember did not exit");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        (
            status.code(),
            self.stdout_rest.join().unwrap(),
            err.join().unwrap(),
        )
    }
}

#[test]
fn stdin_reaches_the_guest_console() {
    let dir = Scratch::new("stdin");
    let mut vm = start_waiting_probe(&dir, &[]);
    assert!(
        vm.lines
            .iter()
            .any(|l| *l == format!("PROBE DONE pass={PROBE_CHECKS} fail=0")),
        "{:#?}",
        vm.lines
    );
    vm.child.stdin.as_mut().unwrap().write_all(b"A").unwrap();
    let (code, out, err) = vm.finish();
    assert!(
        out.contains("PROBE GOT 0x41"),
        "stdout: {out}\nstderr: {err}"
    );
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn sigterm_stops_cleanly_with_its_own_code() {
    for (signal, name) in [(libc::SIGTERM, "15"), (libc::SIGINT, "2")] {
        let dir = Scratch::new("sigterm");
        let vm = start_waiting_probe(&dir, &[]);
        vm.signal(signal);
        let (code, _, err) = vm.finish();
        assert_eq!(code, Some(128 + signal), "{err}");
        assert!(
            err.contains(&format!("received signal {name}; stopping the microVM")),
            "{err}"
        );
        assert!(err.contains(&format!("stopped by signal {name}")), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn closed_stdin_does_not_stop_the_guest() {
    // EOF on the console input must not be mistaken for a reason to stop.
    let dir = Scratch::new("eof");
    let mut vm = start_waiting_probe(&dir, &[]);
    drop(vm.child.stdin.take());
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        vm.child.try_wait().unwrap().is_none(),
        "ember exited on stdin EOF"
    );
    vm.signal(libc::SIGTERM);
    let (code, _, _) = vm.finish();
    assert_eq!(code, Some(128 + libc::SIGTERM));
}

#[test]
fn boot_timer_and_log_file() {
    let dir = Scratch::new("log");
    let log = dir.path("ember.log");
    let config = config_json(&probe_elf(), 1, 128, &probe_args(1, 128, ""));
    let r = boot_config_with_flags(
        &config,
        &[
            "--boot-timer",
            "--id",
            "vm-42",
            "--log-path",
            log.to_str().unwrap(),
            "--show-level",
            "--show-log-origin",
        ],
    );
    r.assert_probe_passed(PROBE_CHECKS);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("Guest-boot-time = "), "{text}");
    // Lines carry the id, thread, level and origin.
    let line = text
        .lines()
        .find(|l| l.contains("microVM running"))
        .expect("running line");
    assert!(line.contains("[vm-42:main:Info:src/"), "{line}");
    assert!(r.stderr.is_empty(), "log went to stderr too: {}", r.stderr);
}

#[test]
fn log_level_filters() {
    let config = config_json(&probe_elf(), 1, 128, &probe_args(1, 128, ""));
    let r = boot_config_with_flags(&config, &["--level", "Warning"]);
    r.assert_probe_passed(PROBE_CHECKS);
    assert!(!r.stderr.contains("microVM running"), "{}", r.stderr);
}

#[test]
fn errors_reach_stderr_when_logging_to_a_file() {
    let dir = Scratch::new("logerr");
    let log = dir.path("ember.log");
    let config = config_json("/nonexistent/k".as_ref(), 1, 128, "x=1");
    let r = boot_config_with_flags(&config, &["--log-path", log.to_str().unwrap()]);
    assert_eq!(r.code(), Some(3));
    assert!(
        r.stderr
            .starts_with("ember: cannot open kernel image /nonexistent/k"),
        "{}",
        r.stderr
    );
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("cannot open kernel image")
    );
}

#[test]
fn version_flag() {
    let r = run_ember(&["--version"]);
    assert_eq!(r.code(), Some(0));
    assert_eq!(
        r.stdout.trim(),
        format!(
            "ember v{} (Firecracker API {})",
            env!("CARGO_PKG_VERSION"),
            ember::version::FIRECRACKER_API_VERSION
        )
    );
}

#[test]
fn not_yet_effective_flags_are_accepted_and_logged() {
    let config = config_json(&probe_elf(), 1, 128, &probe_args(1, 128, ""));
    let r = boot_config_with_flags(
        &config,
        &[
            "--no-seccomp",
            "--mmds-size-limit",
            "1024",
            "--start-time-us",
            "1",
            "--start-time-cpu-us",
            "1",
            "--parent-cpu-time-us",
            "1",
            "--http-api-max-payload-size",
            "4096",
        ],
    );
    r.assert_probe_passed(PROBE_CHECKS);
    assert!(
        r.stderr
            .contains("--start-time-cpu-us is accepted but not yet effective"),
        "{}",
        r.stderr
    );
    // The metadata service's size limit is a working flag now, not a logged one.
    assert!(
        !r.stderr.contains("--mmds-size-limit is accepted"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("--no-seccomp: ember's threads run without seccomp filters"),
        "{}",
        r.stderr
    );
}

/// Reads and sets the host's pool of reserved 2 MiB pages.
fn nr_hugepages() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn set_nr_hugepages(n: u64) -> bool {
    std::fs::write("/proc/sys/vm/nr_hugepages", n.to_string()).is_ok() && nr_hugepages() == Some(n)
}

#[test]
fn huge_pages_2m() {
    let Some(before) = nr_hugepages() else {
        cannot_run("no /proc/sys/vm/nr_hugepages");
        return;
    };
    let args = probe_args(1, 128, "");
    let mut config: serde_json::Value =
        serde_json::from_str(&config_json(&probe_elf(), 1, 128, &args)).unwrap();
    config["machine-config"]["huge_pages"] = "2M".into();
    let config = config.to_string();

    // 128 MiB needs 64 free 2 MiB pages. Reserve them for this test and give them back.
    let free: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
    if free < 64 && !set_nr_hugepages(before + 64 - free) {
        cannot_run("cannot reserve 2 MiB pages here");
        set_nr_hugepages(before);
        return;
    }
    let r = boot_config(&config);
    set_nr_hugepages(before);
    r.assert_probe_passed(PROBE_CHECKS);

    // With no pages reserved, the error says what to do.
    if before == 0 {
        let r = boot_config(&config);
        assert_eq!(r.code(), Some(4), "{r:#?}");
        assert!(r.stderr.contains("nr_hugepages"), "{}", r.stderr);
    }
}
