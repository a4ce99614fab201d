//! A hostile or broken host side: files that are not what they claim, API clients that
//! pipeline and never read, connect and never speak, or send requests with ambiguous
//! lengths, and a log destination that stops taking lines. None of them may wedge ember,
//! grow its memory without bound or lock other clients out; each case here hung, grew or
//! misbehaved before its fix (docs/security.md lists the limits).

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::api::*;
use common::*;

/// A value from /proc/<pid>/status, in kB (VmRSS) or as a count (Threads).
fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{field} missing from /proc/{pid}/status"))
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("proc fd")
        .count()
}

fn mkfifo(path: &Path) {
    let made = Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("run mkfifo");
    assert!(made.success(), "mkfifo failed");
}

/// Waits until `done` holds, up to `limit`; false if it never did.
fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    done()
}

/// Sends SIGTERM and waits (bounded) for ember's exit code without reading its output.
fn sigterm_and_wait(vm: &mut ApiVm, limit: Duration) -> Option<i32> {
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(vm.child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = vm.child.try_wait().expect("try_wait") {
            return status.code();
        }
        assert!(
            Instant::now() < deadline,
            "ember did not exit within {limit:?} of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn host_paths_of_the_wrong_kind_are_refused_at_once() {
    let vm = ApiVm::start(&[]);
    let fifo = vm.dir.path("kernel.fifo");
    mkfifo(&fifo);
    let dir = vm.dir.path("a-directory");
    std::fs::create_dir(&dir).unwrap();
    let mut c = vm.client();
    // A FIFO opened the ordinary way blocks until a writer comes: the API would hang.
    let started = Instant::now();
    for (path, found) in [(&fifo, "a FIFO"), (&dir, "a directory")] {
        let body = serde_json::json!({"kernel_image_path": path}).to_string();
        let r = c.call("PUT", "/boot-source", Some(&body));
        assert_eq!(r.status, 400, "{r:?}");
        assert!(r.fault().contains(found), "{}", r.fault());
        let drive = serde_json::json!({
            "drive_id": "d", "path_on_host": path, "is_root_device": false,
        });
        let r = c.call("PUT", "/drives/d", Some(&drive.to_string()));
        if r.status == 204 {
            // Drives may be opened at start instead: then start refuses it.
            let r = c.call("PUT", "/boot-source", Some(&boot_source("", 1, 128)));
            assert_eq!(r.status, 204, "{r:?}");
            let r = c.call(
                "PUT",
                "/actions",
                Some(r#"{"action_type": "InstanceStart"}"#),
            );
            assert_eq!(r.status, 400, "{r:?}");
            assert!(r.fault().contains(found), "{}", r.fault());
        } else {
            assert_eq!(r.status, 400, "{r:?}");
            assert!(r.fault().contains(found), "{}", r.fault());
        }
    }
    let r = c.call(
        "PUT",
        "/drives/c",
        Some(r#"{"drive_id": "c", "path_on_host": "/dev/null", "is_root_device": false}"#),
    );
    if r.status == 204 {
        let r = c.call(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#),
        );
        assert_eq!(r.status, 400, "{r:?}");
        assert!(r.fault().contains("character device"), "{}", r.fault());
    } else {
        assert!(r.fault().contains("character device"), "{}", r.fault());
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refusing took {:?}",
        started.elapsed()
    );
    drop(c);
    let (code, _, err) = vm.terminate();
    assert_eq!(code, Some(143), "{err}");
}

#[test]
fn a_client_that_pipelines_and_never_reads_holds_bounded_memory() {
    let vm = ApiVm::start(&[]);
    let pid = vm.child.id();
    // Warm up: the first answers allocate what every later one reuses.
    vm.call("GET", "/metrics/prometheus", None);
    let rss_before = proc_status(pid, "VmRSS");
    // Thousands of requests whose answers are ~10 KiB each, never read, on several
    // connections: unbounded, the answers alone would take hundreds of MiB.
    let one = request_bytes("GET", "/metrics/prometheus", None);
    let batch: Vec<u8> = one.iter().copied().cycle().take(one.len() * 500).collect();
    let mut requests = 0usize;
    let greedy: Vec<UnixStream> = (0..8)
        .map(|_| {
            let mut s = UnixStream::connect(&vm.sock).unwrap();
            s.set_write_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(1);
            while Instant::now() < deadline {
                match s.write(&batch) {
                    Ok(n) => requests += n / one.len(),
                    // ember stopped reading this client: the point of the limit.
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => break,
                    Err(e) => panic!("write: {e}"),
                }
            }
            s
        })
        .collect();
    assert!(requests > 4000, "only {requests} requests went out");
    // Meanwhile other clients are served as usual.
    let started = Instant::now();
    let r = vm.call("GET", "/", None);
    assert_eq!(r.status, 200);
    assert!(started.elapsed() < Duration::from_secs(2));
    let grown_kb = proc_status(pid, "VmRSS").saturating_sub(rss_before);
    assert!(
        grown_kb < 32 * 1024,
        "RSS grew {grown_kb} kB for {requests} unread answers on {} connections",
        greedy.len()
    );
    let greedy = greedy.into_iter().next().unwrap();
    // Reading resumes the answers where they stopped, in order.
    greedy
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reader = std::io::BufReader::new(greedy);
    for _ in 0..3 {
        let r = read_response(&mut reader).expect("an answer once the client reads");
        assert_eq!(r.status, 200);
        assert!(r.body.contains("ember_api_server_connections_accepted"));
    }
    drop(reader);
    let (code, _, err) = vm.terminate();
    assert_eq!(code, Some(143), "{err}");
}

#[test]
fn silent_connections_neither_lock_others_out_nor_stay() {
    let mut vm = ApiVm::start(&["--level", "Debug"]);
    let pid = vm.child.id();
    // Left idle, ember makes a VM ahead of start (more fds): count after that.
    vm.wait_for_log("ahead of start");
    let fds_before = open_fds(pid);
    let threads_before = proc_status(pid, "Threads");
    // More silent connections than ember keeps.
    let silent: Vec<UnixStream> = (0..300)
        .map(|_| UnixStream::connect(&vm.sock).unwrap())
        .collect();
    // A real client still gets an answer at once: an idle connection makes room.
    let started = Instant::now();
    let mut c = vm.client();
    let r = c.call("GET", "/version", None);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "served after {:?}",
        started.elapsed()
    );
    drop(c);
    // Connections that never say anything are closed after the request timeout.
    let closed = eventually(Duration::from_secs(15), || open_fds(pid) <= fds_before + 1);
    assert!(
        closed,
        "{} fds open after the silent clients' timeout, {fds_before} before",
        open_fds(pid)
    );
    assert_eq!(proc_status(pid, "Threads"), threads_before);
    let mut buf = [0u8; 1];
    let mut first = &silent[0];
    first
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    assert_eq!(first.read(&mut buf).unwrap_or(0), 0, "closed by ember");
    drop(silent);
    let (code, _, err) = vm.terminate();
    assert_eq!(code, Some(143), "{err}");
}

#[test]
fn ambiguous_lengths_array_bodies_and_huge_values_are_refused() {
    let vm = ApiVm::start(&[]);
    let mut c = vm.client();
    for head in [
        "Content-Length: +2\r\n",
        "Content-Length: -2\r\n",
        "Content-Length: 2\r\nContent-Length: 2\r\n",
        "Content-Length: 2, 2\r\n",
    ] {
        let mut s = UnixStream::connect(&vm.sock).unwrap();
        s.write_all(format!("PUT /machine-config HTTP/1.1\r\n{head}\r\n{{}}").as_bytes())
            .unwrap();
        let r = read_response(&mut std::io::BufReader::new(s)).unwrap();
        assert_eq!(r.status, 400, "{head:?}: {r:?}");
    }
    // An array is not a machine configuration (it used to set one vCPU).
    let r = c.call("PUT", "/machine-config", Some("[1, 2]"));
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(
        c.call("GET", "/machine-config", None).json()["vcpu_count"],
        1
    );
    let r = c.call("PATCH", "/machine-config", Some("[4]"));
    assert_eq!(r.status, 400, "{r:?}");
    // A megabyte path is not echoed back whole.
    let long = format!("/{}", "x".repeat(1 << 20));
    let body = serde_json::json!({"kernel_image_path": long}).to_string();
    let mut s = UnixStream::connect(&vm.sock).unwrap();
    // ember may answer 413 from the head alone and close before the body is all sent:
    // a broken pipe here is that answer arriving early, not a failure.
    let _ = s.write_all(
        format!(
            "PUT /boot-source HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    let r = read_response(&mut std::io::BufReader::new(s)).unwrap();
    assert!(r.status == 400 || r.status == 413, "{r:?}");
    assert!(r.body.len() < 4096, "{} bytes of fault", r.body.len());
    drop(c);
    let (code, _, err) = vm.terminate();
    assert_eq!(code, Some(143), "{err}");
}

#[test]
fn a_stalled_log_reader_stalls_neither_the_api_nor_sigterm() {
    let mut vm = ApiVm::start(&[]);
    boot_waiting_probe(&mut vm);
    // ember logs to stderr, a pipe this test stops reading; a small pipe fills quickly.
    let stderr = vm.child.stderr.as_ref().expect("stderr");
    // SAFETY: F_SETPIPE_SZ on our own end of the pipe.
    unsafe { libc::fcntl(stderr.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    let mut c = vm.client();
    // Each pause and resume logs a line: far more than the pipe and ember's log queue
    // (LOG_QUEUE_LINES, 4096) hold.
    for round in 0..2600 {
        for state in ["Paused", "Resumed"] {
            let started = Instant::now();
            let r = c.call("PATCH", "/vm", Some(&format!(r#"{{"state": "{state}"}}"#)));
            assert_eq!(r.status, 204, "round {round}: {r:?}");
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "round {round}: {state} took {:?}",
                started.elapsed()
            );
        }
    }
    let prom = c.call("GET", "/metrics/prometheus", None).body;
    let dropped: u64 = prom
        .lines()
        .find_map(|l| l.strip_prefix("ember_vmm_log_lines_dropped "))
        .and_then(|v| v.parse().ok())
        .expect("log_lines_dropped");
    assert!(
        dropped > 0,
        "no line was dropped: did the pipe fill?\n{prom}"
    );
    drop(c);
    // Signal handling does not wait for the log either.
    assert_eq!(
        sigterm_and_wait(&mut vm, Duration::from_secs(10)),
        Some(143)
    );
}

#[test]
fn the_socket_of_a_later_ember_on_the_same_path_survives_an_earlier_ones_exit() {
    let place = Scratch::new("shared-sock");
    let sock = place.path("api.sock");
    let first = ApiVm::start_at(Scratch::new("first-api"), sock.clone(), &[]);
    // An orchestrator reuses the path: it removes the file and starts another ember there.
    std::fs::remove_file(&sock).unwrap();
    let dir = Scratch::new("second-api");
    let second = ApiVm::start_at(dir, sock.clone(), &[]);
    let (code, _, err) = first.terminate();
    assert_eq!(code, Some(143), "{err}");
    assert!(
        sock.exists(),
        "the first ember removed the second one's socket"
    );
    assert_eq!(second.call("GET", "/", None).status, 200);
    let (code, _, err) = second.terminate();
    assert_eq!(code, Some(143), "{err}");
    assert!(!sock.exists(), "ember removes its own socket");
}

#[test]
fn the_exit_line_reaches_stderr_when_the_log_goes_to_a_file() {
    let logs = Scratch::new("exit-line-log");
    let log = logs.write("ember.log", "");
    let dir = Scratch::new("exit-line");
    let sock = dir.path("api.sock");
    let vm = ApiVm::start_at(dir, sock, &["--log-path", log.to_str().unwrap()]);
    let (code, _, err) = vm.terminate();
    assert_eq!(code, Some(143));
    assert!(
        err.contains("ember: microVM stopped") || err.contains("ember: stopped by signal"),
        "stderr: {err:?}"
    );
    assert!(err.contains("143"), "stderr: {err:?}");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("received signal 15"), "{logged}");
}
