//! API benchmark: `cargo bench --bench api`.
//!
//! ember serves a Firecracker-compatible REST API on a Unix socket. Every time here is
//! reported next to a baseline measured in the same run (see "Performance method" in the
//! design notes), with runs interleaved so drift on a shared host hits both alike:
//!
//! - request latency on one keep-alive connection, `GET /` and `PUT /machine-config`,
//!   against an echo thread in this process that reads a message of the request's size and
//!   writes back one of the response's size over the same kind of socket;
//! - spawn -> API socket accepting, against spawning `/bin/true`; with ember's own
//!   `api_server.process_startup_time_us` metric;
//! - `InstanceStart` -> first guest serial byte, against the bare cost of a KVM VM of the
//!   same shape created in this process; with ember's `latencies_us.instance_start_us`.
//!   Twice, because ember prepares the VM while the API is quiet: once with the shape set
//!   right before InstanceStart (after ember sat idle with another one), once after the
//!   client paused between configuring and starting. Tearing the bare VM down is timed
//!   too, as a diagnostic: a prepared VM of the wrong shape is torn down on the way.
//!
//! `EMBER_BENCH_RUNS` sets the number of measured runs (default 20). Without `--bench` on
//! the command line (`cargo test --all-targets` runs this file too) it makes one short run,
//! as a smoke test. Any ember run that misbehaves (an unexpected status, no `PROBE START`,
//! failing probe checks, a non-zero exit) fails the benchmark.

mod common;

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, ChildStdout, ExitCode, Stdio};
use std::time::{Duration, Instant};

use common::{
    BareKvm, MIB, Order, RUN_TIMEOUT, Result, Running, has_line_starting, median, min_max, ratio,
    ratio_row, spawn_true_once, time_row,
};

/// Guest shape booted through the API; the bare-KVM baseline uses the same.
const MEM_MIB: u64 = 128;
const DEFAULT_RUNS: usize = 20;
/// Runs discarded first, so page cache, the dynamic loader and KVM's module state are warm.
const WARMUP_RUNS: usize = 2;
/// Requests of each kind timed per run; the smoke test (no `--bench`) makes fewer.
const REQUESTS_PER_RUN: usize = 2000;
const SMOKE_REQUESTS: usize = 200;
/// Pause between connection attempts while ember starts: short against its start-up time,
/// long enough that polling does not take a CPU from it on a 2-CPU host.
const CONNECT_POLL: Duration = Duration::from_micros(50);
/// The shape booted (Firecracker's default), and another valid one of the same length that
/// the latency phase alternates with, so every PUT has the same size.
const BOOT_MACHINE: &str = r#"{"vcpu_count": 1, "mem_size_mib": 128}"#;
const OTHER_MACHINE: &str = r#"{"vcpu_count": 2, "mem_size_mib": 256}"#;
/// How long the client pauses between configuring and InstanceStart in the "after idle"
/// run: longer than ember waits for a quiet API before it prepares the VM (5 ms), with
/// room for preparing it.
const IDLE_BEFORE_START: Duration = Duration::from_millis(50);
const STARTUP_METRIC: &str = "ember_api_server_process_startup_time_us";
const INSTANCE_START_METRIC: &str = "ember_latencies_us_instance_start_us";

fn main() -> ExitCode {
    common::exit_code("api", run())
}

fn run() -> Result<()> {
    let bench = if common::invoked_as_bench() {
        Bench::new(
            common::runs_from_env(DEFAULT_RUNS)?,
            WARMUP_RUNS,
            REQUESTS_PER_RUN,
        )?
    } else {
        Bench::new(1, 0, SMOKE_REQUESTS)?
    };
    let result = bench.measure().map(|r| r.print(&bench));
    common::remove_dir_on_success(&bench.dir, result)
}

struct Bench {
    dir: PathBuf,
    probe: PathBuf,
    runs: usize,
    warmup: usize,
    requests: usize,
}

impl Bench {
    fn new(runs: usize, warmup: usize, requests: usize) -> Result<Self> {
        let probe = common::probe_elf()?;
        let dir = common::create_temp_dir("ember-api-bench")?;
        Ok(Bench {
            dir,
            probe,
            runs,
            warmup,
            requests,
        })
    }

    /// Three ember processes per run: one for start-up, request latency and a start right
    /// after a change of machine configuration, one for request latency on one CPU, one
    /// for a start after an idle client. The baselines are taken in between.
    fn measure(&self) -> Result<Results> {
        let mut results = Results::default();
        for i in 0..self.warmup + self.runs {
            // In the order ember uses: the memory slot before the irqchip.
            let (vm, bare_kvm) = BareKvm::create(MEM_MIB * MIB, Order::MemorySlotFirst)?;
            let bare_kvm_teardown = vm.teardown();
            let baselines = Baselines {
                bare_kvm,
                bare_kvm_teardown,
                spawn_true: spawn_true_once()?,
            };
            let run = self
                .with_ember(|ember| self.full_run(ember))
                .map_err(|e| format!("ember run {}: {e}", i + 1))?;
            let one_cpu = self
                .one_cpu_run()
                .map_err(|e| format!("ember run {} (one CPU): {e}", i + 1))?;
            let after_idle = self
                .with_ember(|ember| {
                    let mut api = ember.connect()?;
                    self.boot(ember, &mut api, IDLE_BEFORE_START)
                })
                .map_err(|e| format!("ember run {} (start after idle): {e}", i + 1))?;
            if i >= self.warmup {
                results.add(run, one_cpu, after_idle, baselines);
            }
        }
        Ok(results)
    }

    /// Spawns ember, runs `f` on it, and on failure attaches the console output and log.
    fn with_ember<T>(&self, f: impl FnOnce(&mut Ember) -> Result<T>) -> Result<T> {
        let sock = self.dir.join("api.sock");
        let log = self.dir.join("ember.log");
        let mut ember = Ember::spawn(&sock, &log)?;
        f(&mut ember).map_err(|e| ember.explain(e))
    }

    /// Start-up, request latency, then a start right after the machine configuration
    /// changed.
    fn full_run(&self, ember: &mut Ember) -> Result<RunResult> {
        let mut api = ember.connect()?;
        let accepting = ember.spawned.elapsed();
        let info = api.call(&request("GET", "/", ""))?;
        let first_answer = ember.spawned.elapsed();
        expect_status(&info, 200, "GET /")?;
        let metrics = api.call(&request("GET", "/metrics/prometheus", ""))?;
        expect_status(&metrics, 200, "GET /metrics/prometheus")?;
        let startup_metric = metric_us(&metrics.text(), STARTUP_METRIC)?;
        let latency = self.latency(&mut api, &info)?;
        // The latency phase left the 256 MiB shape configured while ember was idle, so an
        // ember that prepares ahead holds a VM of the wrong size: the boot changes the
        // shape and starts at once.
        let start = self.boot(ember, &mut api, Duration::ZERO)?;
        Ok(RunResult {
            latency,
            accepting,
            first_answer,
            startup_metric,
            start,
        })
    }

    /// Request latency with ember, this thread and the echo thread all on one CPU.
    fn one_cpu_run(&self) -> Result<Latency> {
        on_one_cpu(|| {
            self.with_ember(|ember| {
                let mut api = ember.connect()?;
                let info = api.call(&request("GET", "/", ""))?;
                expect_status(&info, 200, "GET /")?;
                let latency = self.latency(&mut api, &info)?;
                drop(api);
                ember.terminate()?;
                Ok(latency)
            })
        })
    }

    /// Times `GET /` and `PUT /machine-config` on `api`, each followed by the echo floor
    /// with the same request bytes and ember's own response (`info` for the GET), so both
    /// pay the same client-side work. Leaves the 256 MiB shape configured.
    fn latency(&self, api: &mut Client, info: &Reply) -> Result<Latency> {
        let gets = [request("GET", "/", "")];
        let puts =
            [BOOT_MACHINE, OTHER_MACHINE].map(|body| request("PUT", "/machine-config", body));
        assert!(
            puts[0].len() == puts[1].len(),
            "the alternating machine configs must have the same size"
        );
        let put_reply = api.call(&puts[1])?;
        expect_status(&put_reply, 204, "PUT /machine-config")?;
        // An ember that prepares the VM while the API is quiet does it now, not during an
        // echo phase, where it would take CPU from the baseline.
        std::thread::sleep(IDLE_BEFORE_START);
        let get_ember = time_requests(api, &gets, self.requests, 200)?;
        let get_echo = self.echo_latencies(&gets, &info.raw, 200)?;
        let put_ember = time_requests(api, &puts, self.requests, 204)?;
        // Whatever the count, end on the shape configured during the pause above.
        expect_status(&api.call(&puts[1])?, 204, "PUT /machine-config")?;
        let put_echo = self.echo_latencies(&puts, &put_reply.raw, 204)?;
        Ok(Latency {
            get_ember,
            get_echo,
            put_ember,
            put_echo,
            sizes: MessageSizes {
                get_request: gets[0].len(),
                get_response: info.raw.len(),
                put_request: puts[0].len(),
                put_response: put_reply.raw.len(),
            },
        })
    }

    /// Configures the probe's shape and boot source, waits `idle`, then times InstanceStart
    /// to its answer and to the guest's first serial byte; reads ember's metric for it and
    /// lets the probe finish.
    fn boot(&self, ember: &mut Ember, api: &mut Client, idle: Duration) -> Result<StartTimes> {
        let reply = api.call(&request("PUT", "/machine-config", BOOT_MACHINE))?;
        expect_status(&reply, 204, "PUT /machine-config")?;
        let boot_source = serde_json::json!({
            "kernel_image_path": self.probe,
            // `probe.wait=serial` holds the guest after `PROBE DONE` until it gets a byte,
            // so the metrics can be read before the reset ends ember.
            "boot_args": format!(
                "console=ttyS0 reboot=k panic=1 probe.mem_mib={MEM_MIB} probe.vcpus=1 \
                 probe.wait=serial"
            ),
        });
        let reply = api.call(&request("PUT", "/boot-source", &boot_source.to_string()))?;
        expect_status(&reply, 204, "PUT /boot-source")?;
        std::thread::sleep(idle);
        let start = request("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
        let (reply, answered, first_byte) = ember.instance_start(api, &start)?;
        expect_status(&reply, 204, "InstanceStart")?;

        ember.read_until_line("PROBE DONE")?;
        let metrics = api.call(&request("GET", "/metrics/prometheus", ""))?;
        expect_status(&metrics, 200, "GET /metrics/prometheus")?;
        let metric = metric_us(&metrics.text(), INSTANCE_START_METRIC)?;
        ember.release_and_wait()?;
        Ok(StartTimes {
            answered,
            first_byte,
            metric,
        })
    }

    /// The floor for one request/response exchange: a thread that reads a message of the
    /// request's size and writes back `response` (ember's own answer, so the client parses
    /// the same bytes), over a Unix stream socket like ember's.
    fn echo_latencies(
        &self,
        requests: &[Vec<u8>],
        response: &[u8],
        status: u16,
    ) -> Result<Vec<Duration>> {
        let path = self.dir.join("echo.sock");
        let _ = fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
        let request_len = requests[0].len();
        let response = response.to_vec();
        let server = std::thread::spawn(move || -> Result<()> {
            let (mut conn, _) = listener.accept().map_err(|e| format!("echo accept: {e}"))?;
            let mut buf = vec![0u8; request_len];
            while read_message(&mut conn, &mut buf)? {
                conn.write_all(&response)
                    .map_err(|e| format!("echo write: {e}"))?;
            }
            Ok(())
        });
        let mut client = Client::connect(&path)?;
        let latencies = time_requests(&mut client, requests, self.requests, status);
        drop(client);
        let served = server.join().expect("the echo thread panicked");
        let latencies = latencies?;
        served?;
        Ok(latencies)
    }
}

// ---------------------------------------------------------------------------------------
// HTTP over the API socket

fn request(method: &str, path: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// `METHOD /path` of a request, for messages.
fn request_line(req: &[u8]) -> String {
    let line = req.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    line.trim_end_matches(" HTTP/1.1").to_string()
}

/// One complete response: its status and its bytes as they came off the socket.
struct Reply {
    status: u16,
    raw: Vec<u8>,
    body_start: usize,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.raw[self.body_start..]).into_owned()
    }
}

fn expect_status(reply: &Reply, status: u16, what: &str) -> Result<()> {
    if reply.status == status {
        return Ok(());
    }
    Err(format!(
        "{what} answered {} where {status} was expected:\n{}",
        reply.status,
        String::from_utf8_lossy(&reply.raw)
    ))
}

/// The response at the start of `buf`, or `None` while it is incomplete.
fn parse_response(buf: &[u8]) -> Result<Option<Reply>> {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buf) {
        Ok(httparse::Status::Partial) => return Ok(None),
        Ok(httparse::Status::Complete(n)) => n,
        Err(e) => {
            return Err(format!(
                "malformed HTTP response ({e}): {:?}",
                String::from_utf8_lossy(buf)
            ));
        }
    };
    let status = response
        .code
        .expect("httparse sets the code of a complete response");
    let body_len = match response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
    {
        None => 0,
        Some(h) => std::str::from_utf8(h.value)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .ok_or_else(|| format!("bad Content-Length {:?}", h.value))?,
    };
    let len = head_len + body_len;
    if buf.len() < len {
        return Ok(None);
    }
    Ok(Some(Reply {
        status,
        raw: buf[..len].to_vec(),
        body_start: head_len,
    }))
}

/// A keep-alive HTTP/1.1 client; the same code talks to ember and to the echo thread.
struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Client {
    fn connect(path: &Path) -> Result<Self> {
        let stream = UnixStream::connect(path)
            .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
        Self::new(stream)
    }

    fn new(stream: UnixStream) -> Result<Self> {
        // A blocking read that never returns would hang the bench; this turns it into an error.
        stream
            .set_read_timeout(Some(RUN_TIMEOUT))
            .map_err(|e| format!("cannot set a read timeout: {e}"))?;
        Ok(Client {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    fn send(&mut self, req: &[u8]) -> Result<()> {
        self.stream
            .write_all(req)
            .map_err(|e| format!("cannot send {}: {e}", request_line(req)))
    }

    /// Reads what is available (blocking until something is).
    fn fill(&mut self) -> Result<()> {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk) {
            Ok(0) => Err("the server closed the connection".to_string()),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) => Err(format!("cannot read a response: {e}")),
        }
    }

    /// The next complete response if it has arrived.
    fn take_reply(&mut self) -> Result<Option<Reply>> {
        let reply = parse_response(&self.buf)?;
        if let Some(r) = &reply {
            self.buf.drain(..r.raw.len());
        }
        Ok(reply)
    }

    fn receive(&mut self) -> Result<Reply> {
        loop {
            if let Some(reply) = self.take_reply()? {
                return Ok(reply);
            }
            self.fill()?;
        }
    }

    fn call(&mut self, req: &[u8]) -> Result<Reply> {
        self.send(req)?;
        self.receive()
    }
}

/// Times `count` request -> complete response exchanges, cycling through `requests`.
fn time_requests(
    client: &mut Client,
    requests: &[Vec<u8>],
    count: usize,
    status: u16,
) -> Result<Vec<Duration>> {
    let mut latencies = Vec::with_capacity(count);
    for req in requests.iter().cycle().take(count) {
        let start = Instant::now();
        client.send(req)?;
        let reply = client.receive()?;
        latencies.push(start.elapsed());
        expect_status(&reply, status, &request_line(req))?;
    }
    Ok(latencies)
}

/// Fills `buf` from `conn`; `false` if the peer closed the connection before a message.
fn read_message(conn: &mut UnixStream, buf: &mut [u8]) -> Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match conn.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err("echo: the client closed the connection mid-message".into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("echo read: {e}")),
        }
    }
    Ok(true)
}

/// The value of an un-labelled Prometheus sample `name`, in microseconds.
fn metric_us(text: &str, name: &str) -> Result<Duration> {
    text.lines()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .find_map(|value| value.trim().parse::<u64>().ok())
        .map(Duration::from_micros)
        .ok_or_else(|| format!("no `{name} <integer>` line in the metrics:\n{text}"))
}

// ---------------------------------------------------------------------------------------
// The ember process

/// An ember process serving the API; `child` is killed and reaped if a run is abandoned,
/// so an error never leaves a guest waiting on its serial port behind.
struct Ember {
    child: Running,
    stdin: Option<ChildStdin>,
    stdout: ChildStdout,
    /// Everything the guest has written on its serial console so far.
    out: Vec<u8>,
    sock: PathBuf,
    log: PathBuf,
    spawned: Instant,
    /// Everything in one run happens by then, or the run has hung.
    deadline: Instant,
}

impl Ember {
    fn spawn(sock: &Path, log: &Path) -> Result<Self> {
        // ember removes its socket when it exits; one left by a killed run must not count.
        let _ = fs::remove_file(sock);
        let mut cmd = common::ember_command(log, Stdio::piped())?;
        cmd.arg("--api-sock").arg(sock);
        let spawned = Instant::now();
        let mut child = Running::spawn(&mut cmd)?;
        let stdin = child.0.stdin.take();
        let stdout = child.0.stdout.take().expect("stdout was set to a pipe");
        Ok(Ember {
            child,
            stdin,
            stdout,
            out: Vec::new(),
            sock: sock.to_path_buf(),
            log: log.to_path_buf(),
            spawned,
            deadline: spawned + RUN_TIMEOUT,
        })
    }

    /// Tries to connect until ember accepts, `CONNECT_POLL` apart.
    fn connect(&mut self) -> Result<Client> {
        loop {
            match UnixStream::connect(&self.sock) {
                Ok(stream) => return Client::new(stream),
                Err(e) => {
                    if let Some(status) = self
                        .child
                        .0
                        .try_wait()
                        .map_err(|e| format!("cannot check on ember: {e}"))?
                    {
                        return Err(format!("ember exited ({status}) before accepting: {e}"));
                    }
                    if Instant::now() > self.deadline {
                        return Err(format!("the API socket never accepted: {e}"));
                    }
                    std::thread::sleep(CONNECT_POLL);
                }
            }
        }
    }

    /// Sends `req` (InstanceStart) and waits for both its answer and the guest's first
    /// serial byte; returns the answer and the time from sending to each.
    fn instance_start(
        &mut self,
        api: &mut Client,
        req: &[u8],
    ) -> Result<(Reply, Duration, Duration)> {
        let start = Instant::now();
        api.send(req)?;
        let mut answer = None;
        let mut first_byte = None;
        while answer.is_none() || first_byte.is_none() {
            let want_api = answer.is_none().then_some(api.stream.as_raw_fd());
            let want_out = first_byte.is_none().then_some(self.stdout.as_raw_fd());
            let [api_ready, out_ready] = poll_readable([want_api, want_out], self.deadline)?;
            let at = start.elapsed();
            if api_ready {
                api.fill()?;
                if let Some(reply) = api.take_reply()? {
                    answer = Some((reply, at));
                }
            }
            if out_ready {
                if self.read_output()? == 0 {
                    return Err("ember's stdout closed before the guest wrote".into());
                }
                first_byte = Some(at);
            }
        }
        let (reply, answered) = answer.expect("the loop ends once the answer is in");
        Ok((reply, answered, first_byte.expect("and the first byte")))
    }

    /// Reads what the guest wrote so far; 0 at end of file.
    fn read_output(&mut self) -> Result<usize> {
        let mut chunk = [0u8; 4096];
        let n = self
            .stdout
            .read(&mut chunk)
            .map_err(|e| format!("cannot read ember's stdout: {e}"))?;
        self.out.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    fn read_until_line(&mut self, prefix: &str) -> Result<()> {
        while !has_line_starting(&self.out, prefix) {
            poll_readable([Some(self.stdout.as_raw_fd())], self.deadline)?;
            if self.read_output()? == 0 {
                return Err(format!("ember's stdout closed before `{prefix}`"));
            }
        }
        Ok(())
    }

    /// Sends the waiting probe its byte, then checks the whole run: ember exited 0, the
    /// console began with `PROBE START`, every probe check passed and the byte arrived.
    fn release_and_wait(&mut self) -> Result<()> {
        let mut stdin = self.stdin.take().expect("stdin is released only once");
        stdin
            .write_all(b"x")
            .map_err(|e| format!("cannot write to ember's stdin: {e}"))?;
        drop(stdin);
        loop {
            poll_readable([Some(self.stdout.as_raw_fd())], self.deadline)?;
            if self.read_output()? == 0 {
                break;
            }
        }
        let status = self.child.wait()?;
        let out = String::from_utf8_lossy(&self.out);
        if !status.success() {
            return Err(format!("ember exited with {status}"));
        }
        if !out.starts_with("PROBE START") {
            return Err("the console output does not begin with `PROBE START`".into());
        }
        common::check_probe_done(&out)?;
        if !out.contains("PROBE GOT 0x78") {
            return Err("the probe did not report the byte sent on stdin".into());
        }
        Ok(())
    }

    /// Stops an ember that never started a guest with SIGTERM; it must shut down cleanly,
    /// with 128 + 15 as its exit code.
    fn terminate(&mut self) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.0.id()).expect("a pid fits pid_t");
        // SAFETY: kill(2) on our own child, which has not been waited for, so the pid is
        // still ours.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            return Err(format!(
                "cannot send SIGTERM to ember: {}",
                std::io::Error::last_os_error()
            ));
        }
        let status = self.child.wait()?;
        if status.code() != Some(128 + libc::SIGTERM) {
            return Err(format!("ember exited with {status} on SIGTERM, not 143"));
        }
        Ok(())
    }

    /// `problem` with the guest's console output and ember's log attached.
    fn explain(&self, problem: String) -> String {
        common::explain(&problem, &String::from_utf8_lossy(&self.out), &self.log)
    }
}

/// Waits until one of the given descriptors (`None`: not watched) is readable or closed;
/// gives up at `deadline` so a stuck guest or server cannot hang the bench.
fn poll_readable<const N: usize>(fds: [Option<RawFd>; N], deadline: Instant) -> Result<[bool; N]> {
    common::poll_until(fds, deadline)?
        .ok_or_else(|| format!("ember did not get there within {} s", RUN_TIMEOUT.as_secs()))
}

/// Runs `f` with this thread confined to one CPU (the first it may use), like `taskset -c`;
/// threads and processes started meanwhile inherit that. The old mask is restored after.
fn on_one_cpu<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut old: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: fills `old`, a cpu_set_t of `size` bytes, with this thread's mask.
    if unsafe { libc::sched_getaffinity(0, size, &mut old) } != 0 {
        return Err(format!(
            "sched_getaffinity: {}",
            std::io::Error::last_os_error()
        ));
    }
    let cpus = usize::try_from(libc::CPU_SETSIZE).expect("CPU_SETSIZE is positive");
    // SAFETY: CPU_ISSET reads bit `c` of `old`, and `c` is below CPU_SETSIZE.
    let Some(cpu) = (0..cpus).find(|&c| unsafe { libc::CPU_ISSET(c, &old) }) else {
        return Err("this thread may run on no CPU at all".into());
    };
    // SAFETY: as above, an empty set; CPU_SET then sets bit `cpu`, below CPU_SETSIZE.
    let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut one) };
    let set = |mask: &libc::cpu_set_t| {
        // SAFETY: applies a valid cpu_set_t of `size` bytes to this thread only.
        if unsafe { libc::sched_setaffinity(0, size, mask) } != 0 {
            return Err(format!(
                "sched_setaffinity: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    };
    set(&one)?;
    let result = f();
    set(&old)?;
    result
}

// ---------------------------------------------------------------------------------------
// Statistics and report

struct MessageSizes {
    get_request: usize,
    get_response: usize,
    put_request: usize,
    put_response: usize,
}

/// The baselines of one run, measured in this process.
struct Baselines {
    bare_kvm: Duration,
    bare_kvm_teardown: Duration,
    spawn_true: Duration,
}

/// Everything one ember run measured.
struct RunResult {
    /// With ember's threads wherever the scheduler puts them.
    latency: Latency,
    accepting: Duration,
    first_answer: Duration,
    startup_metric: Duration,
    /// InstanceStart right after the machine configuration changed.
    start: StartTimes,
}

/// One run's request latencies, ember and echo.
struct Latency {
    get_ember: Vec<Duration>,
    get_echo: Vec<Duration>,
    put_ember: Vec<Duration>,
    put_echo: Vec<Duration>,
    sizes: MessageSizes,
}

/// One InstanceStart, timed from sending the request.
struct StartTimes {
    answered: Duration,
    first_byte: Duration,
    /// ember's own `latencies_us.instance_start_us`.
    metric: Duration,
}

#[derive(Default)]
struct Starts {
    answered: Vec<Duration>,
    first_byte: Vec<Duration>,
    metric: Vec<Duration>,
}

impl Starts {
    fn add(&mut self, t: StartTimes) {
        self.answered.push(t.answered);
        self.first_byte.push(t.first_byte);
        self.metric.push(t.metric);
    }

    fn print(&self, when: &str) {
        time_row(
            &format!("ember InstanceStart {when} -> 204 answer"),
            &self.answered,
        );
        time_row(
            &format!("ember InstanceStart {when} -> first serial byte"),
            &self.first_byte,
        );
        time_row(
            "  ember metric latencies_us.instance_start_us",
            &self.metric,
        );
    }
}

/// Request latencies: the median of each run, and every request for the tail.
#[derive(Default)]
struct Latencies {
    run_medians: Vec<Duration>,
    all: Vec<Duration>,
}

impl Latencies {
    fn add(&mut self, run: Vec<Duration>) {
        self.run_medians.push(median(&run));
        self.all.extend(run);
    }

    fn p99(&self) -> Duration {
        let mut sorted = self.all.clone();
        sorted.sort_unstable();
        sorted[(sorted.len() - 1) * 99 / 100]
    }
}

/// Request latencies over all runs.
#[derive(Default)]
struct LatencyResults {
    get_ember: Latencies,
    get_echo: Latencies,
    put_ember: Latencies,
    put_echo: Latencies,
    sizes: Option<MessageSizes>,
}

impl LatencyResults {
    fn add(&mut self, run: Latency) {
        self.get_ember.add(run.get_ember);
        self.get_echo.add(run.get_echo);
        self.put_ember.add(run.put_ember);
        self.put_echo.add(run.put_echo);
        self.sizes = Some(run.sizes);
    }

    fn get_ratio(&self) -> f64 {
        ratio(&self.get_ember.run_medians, &self.get_echo.run_medians)
    }

    fn put_ratio(&self) -> f64 {
        ratio(&self.put_ember.run_medians, &self.put_echo.run_medians)
    }

    fn print(&self, placement: &str) {
        let sizes = self.sizes.as_ref().expect("at least one run was measured");
        println!(
            "  {:<56} {:>9} {:>9} {:>9} {:>9}",
            format!("{placement} (µs)"),
            "median",
            "min",
            "max",
            "p99"
        );
        let get_sizes = format!("{} B -> {} B", sizes.get_request, sizes.get_response);
        let put_sizes = format!("{} B -> {} B", sizes.put_request, sizes.put_response);
        latency_row(
            &format!("ember GET / -> 200 ({get_sizes})"),
            &self.get_ember,
        );
        latency_row(
            &format!("baseline: echo thread ({get_sizes})"),
            &self.get_echo,
        );
        latency_row(
            &format!("ember PUT /machine-config -> 204 ({put_sizes})"),
            &self.put_ember,
        );
        latency_row(
            &format!("baseline: echo thread ({put_sizes})"),
            &self.put_echo,
        );
        ratio_row("ratio GET / echo", self.get_ratio());
        ratio_row("ratio PUT / echo", self.put_ratio());
    }
}

#[derive(Default)]
struct Results {
    one_cpu: LatencyResults,
    free: LatencyResults,
    accepting: Vec<Duration>,
    first_answer: Vec<Duration>,
    startup_metric: Vec<Duration>,
    spawn_true: Vec<Duration>,
    start_changed: Starts,
    start_after_idle: Starts,
    bare_kvm: Vec<Duration>,
    bare_kvm_teardown: Vec<Duration>,
}

impl Results {
    fn add(
        &mut self,
        run: RunResult,
        one_cpu: Latency,
        after_idle: StartTimes,
        baselines: Baselines,
    ) {
        self.free.add(run.latency);
        self.one_cpu.add(one_cpu);
        self.accepting.push(run.accepting);
        self.first_answer.push(run.first_answer);
        self.startup_metric.push(run.startup_metric);
        self.spawn_true.push(baselines.spawn_true);
        self.start_changed.add(run.start);
        self.start_after_idle.add(after_idle);
        self.bare_kvm.push(baselines.bare_kvm);
        self.bare_kvm_teardown.push(baselines.bare_kvm_teardown);
    }

    fn print(&self, bench: &Bench) {
        println!(
            "ember API latency: request -> full response on one keep-alive connection, {} \
             requests of each kind per run; {} runs after {} warm-up",
            bench.requests, bench.runs, bench.warmup
        );
        println!("  (median/min/max over runs of each run's median; p99 over all requests)");
        self.one_cpu
            .print("one CPU: bench, echo thread and ember pinned to it");
        self.free
            .print("free placement: threads where the scheduler puts them");
        println!();

        println!(
            "ember start-up through the API: 1 vCPU, {MEM_MIB} MiB, probe guest; \
             {} runs after {} warm-up",
            bench.runs, bench.warmup
        );
        common::time_header();
        time_row("ember spawn -> API socket accepting", &self.accepting);
        time_row("ember spawn -> first GET / answered", &self.first_answer);
        time_row(
            "ember metric api_server.process_startup_time_us",
            &self.startup_metric,
        );
        time_row("baseline: spawn /bin/true -> exit", &self.spawn_true);
        self.start_after_idle
            .print(&format!("({} ms idle)", IDLE_BEFORE_START.as_millis()));
        self.start_changed.print("(shape changed)");
        time_row(
            &format!("baseline: bare KVM VM+{MEM_MIB}MiB slot+irqchip+vCPU"),
            &self.bare_kvm,
        );
        time_row(
            "diagnostic: tearing that bare KVM VM down",
            &self.bare_kvm_teardown,
        );
        let accept_ratio = ratio(&self.accepting, &self.spawn_true);
        let changed_ratio = ratio(&self.start_changed.first_byte, &self.bare_kvm);
        let idle_ratio = ratio(&self.start_after_idle.first_byte, &self.bare_kvm);
        ratio_row("ratio accepting / spawn /bin/true", accept_ratio);
        ratio_row("ratio first byte (after idle) / bare KVM", idle_ratio);
        ratio_row("ratio first byte (shape changed) / bare KVM", changed_ratio);
        println!(
            "  (shape changed: {MEM_MIB} MiB is PUT right before InstanceStart, after \
             ember sat idle configured for 256 MiB;"
        );
        println!(
            "   after idle: the client waits {} ms between configuring and InstanceStart)",
            IDLE_BEFORE_START.as_millis()
        );
        println!();

        println!("api: ratio get/echo = {:.2}", self.one_cpu.get_ratio());
        println!("api: ratio put/echo = {:.2}", self.one_cpu.put_ratio());
        println!(
            "api: ratio get/echo-free-placement = {:.2}",
            self.free.get_ratio()
        );
        println!(
            "api: ratio put/echo-free-placement = {:.2}",
            self.free.put_ratio()
        );
        println!("api: ratio accepting/spawn-true = {accept_ratio:.2}");
        println!("api: ratio first-byte-after-idle/bare-kvm = {idle_ratio:.2}");
        println!("api: ratio first-byte-shape-changed/bare-kvm = {changed_ratio:.2}");
    }
}

fn latency_row(name: &str, l: &Latencies) {
    let us = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e6);
    let (min, max) = min_max(&l.run_medians);
    println!(
        "  {name:<56} {:>9} {:>9} {:>9} {:>9}",
        us(median(&l.run_medians)),
        us(min),
        us(max),
        us(l.p99())
    );
}
