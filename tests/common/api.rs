//! A minimal HTTP/1.1 client over the API's Unix socket, and an ember process driven
//! through it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use super::{PROBE_CHECKS, RUN_DEADLINE, Scratch, ember_command, probe_args, probe_elf};

/// A response: status, headers (lower-case names) and body.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    /// The `fault_message` of an error response.
    pub fn fault(&self) -> String {
        self.json()["fault_message"]
            .as_str()
            .unwrap_or_else(|| panic!("no fault_message: {self:?}"))
            .to_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response from a buffered stream.
pub fn read_response(reader: &mut BufReader<UnixStream>) -> std::io::Result<HttpResponse> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        // Skip interim 100 Continue responses.
        if line.starts_with("HTTP/1.1 100") {
            let mut blank = String::new();
            reader.read_line(&mut blank)?;
            continue;
        }
        break;
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (n, v) = h.split_once(':').expect("header line");
        headers.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map(|(_, v)| v.parse().expect("content-length"))
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body)?;
    Ok(HttpResponse {
        status,
        headers,
        body: String::from_utf8(body).expect("utf-8 body"),
    })
}

pub fn request_bytes(method: &str, path: &str, body: Option<&str>) -> Vec<u8> {
    let body = body.unwrap_or("");
    format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A keep-alive connection to the API.
pub struct ApiClient {
    reader: BufReader<UnixStream>,
}

impl ApiClient {
    pub fn connect(sock: &Path) -> Self {
        let stream = UnixStream::connect(sock).expect("connect to the API socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        ApiClient {
            reader: BufReader::new(stream),
        }
    }

    pub fn stream(&mut self) -> &mut UnixStream {
        self.reader.get_mut()
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream().write_all(bytes).expect("write request");
    }

    pub fn read(&mut self) -> HttpResponse {
        read_response(&mut self.reader).expect("read response")
    }

    pub fn call(&mut self, method: &str, path: &str, body: Option<&str>) -> HttpResponse {
        self.send_raw(&request_bytes(method, path, body));
        self.read()
    }

    /// Sends a request that must be refused with 400 and a fault message containing `want`.
    pub fn expect_fault(&mut self, method: &str, path: &str, body: &str, want: &str) {
        let r = self.call(method, path, Some(body));
        assert_eq!(r.status, 400, "{method} {path} {body}: {r:?}");
        assert!(
            r.fault().contains(want),
            "{method} {path} {body}: {}",
            r.fault()
        );
    }
}

/// An ember process serving the API on a socket in its own scratch directory.
pub struct ApiVm {
    pub dir: Scratch,
    pub sock: PathBuf,
    pub child: Child,
    stdout: Option<BufReader<ChildStdout>>,
    /// ember's log line by line, once a test waits for a log line.
    log: Option<Receiver<String>>,
    /// Log lines already read from `log`.
    log_seen: Vec<String>,
}

impl ApiVm {
    pub fn start(extra_flags: &[&str]) -> Self {
        let dir = Scratch::new("api");
        let sock = dir.path("api.sock");
        Self::start_at(dir, sock, extra_flags)
    }

    /// Starts ember serving the API at `sock`.
    pub fn start_at(dir: Scratch, sock: PathBuf, extra_flags: &[&str]) -> Self {
        let mut args = vec!["--api-sock", sock.to_str().expect("utf-8 path")];
        args.extend_from_slice(extra_flags);
        let cmd = ember_command(&args);
        Self::start_command(dir, sock, cmd)
    }

    /// Starts `cmd`, an ember told to serve the API at `sock` (run another way: inside a
    /// network namespace, say).
    pub fn start_command(dir: Scratch, sock: PathBuf, mut cmd: std::process::Command) -> Self {
        let mut child = cmd.stdin(Stdio::piped()).spawn().expect("spawn ember");
        let start = Instant::now();
        while UnixStream::connect(&sock).is_err() {
            if let Some(status) = child.try_wait().expect("try_wait") {
                let mut err = String::new();
                let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
                panic!("ember exited ({status}) before serving the API: {err}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "API socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let stdout = child.stdout.take().map(BufReader::new);
        ApiVm {
            dir,
            sock,
            child,
            stdout,
            log: None,
            log_seen: Vec::new(),
        }
    }

    pub fn client(&self) -> ApiClient {
        ApiClient::connect(&self.sock)
    }

    /// One request on a fresh connection.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> HttpResponse {
        self.client().call(method, path, body)
    }

    /// Reads guest console lines until one starts with `prefix`; returns all lines read.
    pub fn wait_for_line(&mut self, prefix: &str) -> Vec<String> {
        let out = self.stdout.as_mut().expect("stdout still attached");
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if out.read_line(&mut line).expect("read stdout") == 0 {
                panic!("ember's stdout closed before {prefix:?}: {lines:#?}");
            }
            let found = line.starts_with(prefix);
            lines.push(line.trim_end().to_owned());
            if found {
                return lines;
            }
        }
    }

    /// Waits (up to 20 s) for a line of ember's log containing `needle`; returns it.
    pub fn wait_for_log(&mut self, needle: &str) -> String {
        let stderr = self.child.stderr.take();
        let log = self.log.get_or_insert_with(|| {
            let (tx, rx) = channel();
            let stderr = stderr.expect("stderr still attached");
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match log.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.log_seen.push(line.clone());
                    if found {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "no log line with {needle:?} ({e}):\n{}",
                    self.log_seen.join("\n")
                ),
            }
        }
    }

    pub fn send_console(&mut self, bytes: &[u8]) {
        self.child
            .stdin
            .as_mut()
            .expect("stdin")
            .write_all(bytes)
            .expect("write to ember's stdin");
    }

    /// Waits for ember to exit; returns (exit code, rest of stdout, stderr).
    pub fn finish(mut self) -> (Option<i32>, String, String) {
        let stderr = self.child.stderr.take();
        let log = self.log.take();
        let mut seen = std::mem::take(&mut self.log_seen);
        let err = std::thread::spawn(move || match (stderr, log) {
            (Some(mut stderr), _) => {
                let mut s = String::new();
                let _ = stderr.read_to_string(&mut s);
                s
            }
            (None, Some(log)) => {
                seen.extend(log.iter());
                seen.iter().map(|l| format!("{l}\n")).collect()
            }
            (None, None) => String::new(),
        });
        let mut stdout = self.stdout.take();
        let out = std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(o) = stdout.as_mut() {
                let _ = o.read_to_string(&mut s);
            }
            s
        });
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            if start.elapsed() > RUN_DEADLINE {
                let _ = self.child.kill();
                panic!("ember did not exit");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        (
            status.code(),
            out.join().unwrap_or_default(),
            err.join().unwrap_or_default(),
        )
    }

    pub fn terminate(self) -> (Option<i32>, String, String) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.finish()
    }
}

impl Drop for ApiVm {
    /// A test that fails half-way must not leave an ember running behind it.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A `PUT /boot-source` body for the probe with `extra` arguments.
pub fn boot_source(extra: &str, vcpus: u8, mem: usize) -> String {
    serde_json::json!({
        "kernel_image_path": probe_elf(),
        "boot_args": probe_args(vcpus, mem, extra),
    })
    .to_string()
}

/// Configures and starts the probe through the API; returns once the guest printed DONE.
pub fn boot_waiting_probe(vm: &mut ApiVm) {
    boot_waiting_probe_with(vm, "", PROBE_CHECKS);
}

/// As [`boot_waiting_probe`], with more probe arguments and the checks they add.
pub fn boot_waiting_probe_with(vm: &mut ApiVm, args: &str, checks: usize) {
    let mut c = vm.client();
    let r = c.call(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 2, "mem_size_mib": 256}"#),
    );
    assert_eq!(r.status, 204, "{r:?}");
    let r = c.call(
        "PUT",
        "/boot-source",
        Some(&boot_source(&format!("probe.wait=serial {args}"), 2, 256)),
    );
    assert_eq!(r.status, 204, "{r:?}");
    let r = c.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(r.status, 204, "{r:?}");
    let lines = vm.wait_for_line("PROBE DONE");
    assert!(
        lines.contains(&format!("PROBE DONE pass={checks} fail=0")),
        "{lines:#?}"
    );
}
