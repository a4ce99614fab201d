//! ember's seccomp filters: each thread kind's filter kills the process on a call outside
//! its list, the real binary runs its guests under them, and a bad filter file stops ember
//! before any VM exists.
//!
//! The forbidden-call tests run in a child process (this test binary run again with
//! `EMBER_SECCOMP_CHILD` set), so the test runner survives the SIGSYS.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use common::*;
use ember::seccomp::{self, Filters, ThreadKind};

const CHILD_ENV: &str = "EMBER_SECCOMP_CHILD";
/// What the child writes (an allowed `write`) after installing the filter: proof that the
/// filter is in place and lets the thread's own calls through.
const INSTALLED: &str = "FILTER-INSTALLED";

/// The calls no thread may make, and their x86_64 system call numbers.
const FORBIDDEN: [(&str, i64); 5] = [
    ("execve", libc::SYS_execve),
    ("create-file", libc::SYS_openat),
    ("socket", libc::SYS_socket),
    ("tiocsti", libc::SYS_ioctl),
    ("mmap-exec", libc::SYS_mmap),
];

fn kind_named(name: &str) -> ThreadKind {
    ThreadKind::ALL
        .into_iter()
        .find(|k| k.name() == name)
        .unwrap_or_else(|| panic!("no thread kind {name}"))
}

/// Makes the forbidden call `call`; returns only if the filter let it through.
fn forbidden_call(call: &str) {
    // SAFETY: each call is made with valid arguments; none of them should return.
    unsafe {
        match call {
            "execve" => {
                let path = c"/bin/true";
                let argv = [path.as_ptr(), std::ptr::null()];
                let envp = [std::ptr::null()];
                libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
            }
            "create-file" => {
                let path = std::ffi::CString::new(format!(
                    "/tmp/ember-seccomp-created-{}",
                    std::process::id()
                ))
                .unwrap();
                libc::open(path.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o600);
            }
            "socket" => {
                libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            }
            "tiocsti" => {
                // Pushes a byte into a terminal's input: no thread of ember needs it.
                let byte = b'x';
                libc::ioctl(0, libc::TIOCSTI, &byte);
            }
            "mmap-exec" => {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
            }
            other => panic!("unknown call {other}"),
        }
    }
}

/// The child's side: install the filter named in the environment, prove an allowed call
/// works, make the forbidden one. A run without the variable (the normal test run) does
/// nothing.
#[test]
fn child_makes_one_forbidden_call() {
    let Ok(what) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (kind, call) = what.split_once(':').expect("kind:call");
    let filters = Filters::built_in().expect("built-in filters");
    seccomp::install_sigsys_handler().expect("SIGSYS handler");
    filters.install(kind_named(kind)).expect("install");
    let line = format!("{INSTALLED}\n");
    // SAFETY: writes from a live buffer to stderr.
    unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
    forbidden_call(call);
    // Still alive: the filter allowed what it must not.
    let line = format!("CALL-ALLOWED {call}\n");
    // SAFETY: as above.
    unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
    std::process::exit(0);
}

#[test]
fn every_thread_kind_dies_of_sigsys_on_each_forbidden_call() {
    let me = std::env::current_exe().expect("test binary");
    let mut failures = Vec::new();
    for kind in ThreadKind::ALL {
        for (call, number) in FORBIDDEN {
            // The API thread creates the files of PUT /snapshot/create (docs/security.md);
            // the threads the guest can reach may not.
            if kind == ThreadKind::Api && call == "create-file" {
                continue;
            }
            let out = Command::new(&me)
                .args([
                    "child_makes_one_forbidden_call",
                    "--exact",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_ENV, format!("{}:{call}", kind.name()))
                .output()
                .expect("run the child");
            let stderr = String::from_utf8_lossy(&out.stderr);
            let reported = format!("made system call {number},");
            if !stderr.contains(INSTALLED) {
                failures.push(format!(
                    "{kind:?} {call}: the filter was not installed: {stderr}"
                ));
            } else if out.status.signal() != Some(libc::SIGSYS) {
                failures.push(format!(
                    "{kind:?} {call}: ended with {:?}, not SIGSYS: {stderr}",
                    out.status
                ));
            } else if !stderr.contains(&reported) {
                failures.push(format!("{kind:?} {call}: no {reported:?} line: {stderr}"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A filter file with the vCPU threads' `ioctl` left out: the real binary must install it
/// and die of SIGSYS at the first KVM_RUN, saying so.
#[test]
fn ember_installs_the_filters_it_is_given_and_dies_visibly_on_a_violation() {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/resources/seccomp/x86_64-unknown-linux-gnu.json"
        ))
        .expect("the built-in filter file"),
    )
    .expect("JSON");
    let mut json = json;
    let vcpu = json["vcpu"]["filter"].as_array_mut().expect("vcpu filter");
    vcpu.retain(|rule| rule["syscall"] != "ioctl");
    let dir = Scratch::new("seccomp-tight");
    let filter = dir.write("tight.json", json.to_string());
    let config = config_json(&probe_elf(), 1, 128, &probe_args(1, 128, ""));
    let metrics = dir.path("metrics.json");
    let r = boot_config_with_flags(
        &config,
        &[
            "--seccomp-filter",
            filter.to_str().unwrap(),
            "--metrics-path",
            metrics.to_str().unwrap(),
        ],
    );
    assert_eq!(r.status.signal(), Some(libc::SIGSYS), "{r:#?}");
    let flushed = std::fs::read_to_string(&metrics).expect("metrics file");
    assert!(
        flushed
            .lines()
            .any(|l| l == r#"{"seccomp":{"num_faults":1}}"#),
        "{flushed}"
    );
    assert!(
        r.stderr.contains(&format!(
            "the vcpu0 thread made system call {},",
            libc::SYS_ioctl
        )),
        "{}",
        r.stderr
    );
    assert!(r.probe_lines().is_empty(), "the guest ran: {}", r.stdout);
}

#[test]
fn a_broken_filter_file_stops_ember_before_the_vm_starts() {
    let config = config_json(&probe_elf(), 1, 128, &probe_args(1, 128, ""));
    let dir = Scratch::new("seccomp-broken");
    let not_json = dir.write("compiled.bpf", [0x20u8, 0, 0, 0, 4, 0, 0, 0]);
    let partial = dir.write(
        "partial.json",
        r#"{"vmm": {"default_action": "trap", "filter_action": "allow",
                    "filter": [{"syscall": "read"}]}}"#,
    );
    let unknown_syscall = dir.write(
        "unknown.json",
        r#"{"vmm": {"default_action": "trap", "filter_action": "allow",
                    "filter": [{"syscall": "no_such_call"}]}}"#,
    );
    for (file, message) in [
        (not_json, "is not a filter in seccompiler's JSON format"),
        (partial, "has no filter for the \"api\" threads"),
        (
            unknown_syscall,
            "is not a filter in seccompiler's JSON format",
        ),
        (
            dir.path("absent.json"),
            "cannot read the seccomp filter file",
        ),
    ] {
        let r = boot_config_with_flags(&config, &["--seccomp-filter", file.to_str().unwrap()]);
        assert_fails(&r, 3, message);
    }
}

/// docs/security.md lists every call each built-in filter allows: a call added to a filter
/// without saying why fails here.
#[test]
fn the_security_doc_lists_every_allowed_call() {
    let root = env!("CARGO_MANIFEST_DIR");
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!(
            "{root}/resources/seccomp/x86_64-unknown-linux-gnu.json"
        ))
        .expect("the built-in filter file"),
    )
    .expect("JSON");
    let doc = std::fs::read_to_string(format!("{root}/docs/security.md")).expect("security.md");
    let lists = doc
        .split_once("### The lists")
        .map(|(_, l)| l)
        .expect("a \"### The lists\" section");
    let mut missing = Vec::new();
    for kind in ThreadKind::ALL {
        for rule in json[kind.name()]["filter"].as_array().expect("filter") {
            let name = rule["syscall"].as_str().expect("syscall");
            let conditions: Vec<&str> = rule["args"]
                .as_array()
                .map(|a| a.iter().filter_map(|c| c["comment"].as_str()).collect())
                .unwrap_or_default();
            let row = lists.lines().find(|l| {
                l.starts_with(&format!("| `{name}` |")) && conditions.iter().all(|c| l.contains(c))
            });
            if row.is_none() {
                missing.push(format!("{}: {name} {conditions:?}", kind.name()));
            }
        }
    }
    assert!(missing.is_empty(), "not in docs/security.md: {missing:#?}");
}
