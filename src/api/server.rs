//! The API server loop: one thread, non-blocking sockets and `poll`, so a slow, silent or
//! misbehaving client never holds up another. Requests on a connection are answered in
//! order (keep-alive and pipelining); a request that does not complete in time is answered
//! with 408 and its connection closed.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::mpsc::{self, Sender};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::http::{self, CONTINUE, Parsed, Request, Response};
use super::router;
use super::socket::SocketFile;
use crate::devices::virtio::block::open_backing;
use crate::metrics::METRICS;
use crate::seccomp::{Filters, SeccompError, ThreadKind};
use crate::vmm::ApiRequest;
use crate::vmm::action::{DriveUpdate, OpenedBacking, SnapshotCreate, VmmAction, VmmData};

/// Open connections at most. When all are taken, the one idle the longest makes room for a
/// new one; only when every connection is busy is the new one closed at once.
pub const MAX_CONNECTIONS: usize = 256;
/// A request must arrive completely within this time of its first byte, and a new
/// connection must start its first request within it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection with nothing in flight is closed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// A client that takes none of its pending responses for this long is disconnected.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the API waits for the vmm thread to answer one request.
const VMM_REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// Reading and answering on a connection pause while this much output waits for a client
/// that does not read its responses.
pub const MAX_PENDING_OUTPUT: usize = 1 << 20;
/// Unparsed input a connection may hold (pipelined requests wait in it while output is
/// pending).
const MAX_PENDING_INPUT: usize = http::MAX_HEAD_BYTES + MAX_PENDING_OUTPUT;

struct Connection {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// When the first byte of the request being received arrived.
    request_started: Option<Instant>,
    last_activity: Instant,
    opened: Instant,
    /// Whether any byte ever arrived: a connection that stays silent is closed early.
    heard_from: bool,
    /// When the client last took some of `output` (or output started waiting).
    last_write_progress: Instant,
    continue_sent: bool,
    /// No more requests are read; the connection closes once `output` is written.
    closing: bool,
    /// The peer closed its end or an I/O error occurred; drop as soon as possible.
    dead: bool,
}

impl Connection {
    fn new(stream: UnixStream) -> Self {
        Connection {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            request_started: None,
            last_activity: Instant::now(),
            opened: Instant::now(),
            heard_from: false,
            last_write_progress: Instant::now(),
            continue_sent: false,
            closing: false,
            dead: false,
        }
    }

    fn finished(&self) -> bool {
        self.dead || (self.closing && self.output.is_empty())
    }

    fn wants_input(&self) -> bool {
        !self.closing
            && !self.dead
            && self.output.len() < MAX_PENDING_OUTPUT
            && self.input.len() < MAX_PENDING_INPUT
    }

    /// Nothing received and nothing to send: closing it loses no request.
    fn is_idle(&self) -> bool {
        self.input.is_empty() && self.output.is_empty() && !self.closing && !self.dead
    }

    /// Adds a response to what the connection sends.
    fn queue_output(&mut self, bytes: &[u8]) {
        if self.output.is_empty() {
            self.last_write_progress = Instant::now();
        }
        self.output.extend_from_slice(bytes);
    }

    fn read_available(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    // Half-closed: answer what already arrived, then close.
                    self.closing = true;
                    return;
                }
                Ok(n) => {
                    if self.input.is_empty() {
                        self.request_started = Some(Instant::now());
                    }
                    self.input.extend_from_slice(&buf[..n]);
                    self.last_activity = Instant::now();
                    self.heard_from = true;
                    if self.input.len() >= MAX_PENDING_INPUT {
                        return;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.dead = true;
                    return;
                }
            }
        }
    }

    fn write_pending(&mut self) {
        while !self.output.is_empty() {
            match self.stream.write(&self.output) {
                Ok(0) => {
                    self.dead = true;
                    return;
                }
                Ok(n) => {
                    self.output.drain(..n);
                    self.last_activity = Instant::now();
                    self.last_write_progress = Instant::now();
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    // The client went away mid-response; nothing left to tell it.
                    self.dead = true;
                    return;
                }
            }
        }
    }

    fn refuse(&mut self, status: u16, message: &str) {
        self.queue_output(&Response::fault(status, message).encode(true));
        self.input.clear();
        self.closing = true;
    }
}

/// Sends actions to the vmm thread and waits for the answers.
struct VmmClient {
    requests: Sender<ApiRequest>,
    wakeup: EventFd,
}

impl VmmClient {
    fn call(&self, req: &Request) -> Response {
        let mut action = match router::route(&req.method, &req.path, &req.body) {
            Ok(a) => a,
            Err(e) => return Response::fault(400, &e.to_string()),
        };
        if let VmmAction::PatchDrive(update) = &mut action
            && let Err(refused) = self.open_new_backing(update)
        {
            return refused;
        }
        if let VmmAction::CreateSnapshot(request) = &mut action
            && let Err(refused) = self.create_snapshot_files(request)
        {
            return refused;
        }
        match self.exchange(action) {
            Ok(data) => data_response(data),
            Err(refused) => refused,
        }
    }

    /// Hands `action` to the vmm thread and waits for its answer; an error is the response.
    fn exchange(&self, action: VmmAction) -> Result<VmmData, Response> {
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        if self
            .requests
            .send(ApiRequest {
                action,
                reply: reply_tx,
            })
            .is_err()
            || self.wakeup.write(1).is_err()
        {
            METRICS.api_server.sync_response_fails.inc();
            return Err(Response::fault(503, "the VMM is shutting down"));
        }
        match reply_rx.recv_timeout(VMM_REPLY_TIMEOUT) {
            Ok(Ok(data)) => Ok(data),
            Ok(Err(message)) => Err(Response::fault(400, &message)),
            // The vmm thread stopped taking requests: ember is on its way out.
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                METRICS.api_server.sync_response_fails.inc();
                Err(Response::fault(503, "the VMM is shutting down"))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                METRICS.api_server.sync_response_fails.inc();
                Err(Response::fault(500, "the VMM did not answer in time"))
            }
        }
    }

    /// `PATCH /drives` with a new `path_on_host`: opens the file here, with the drive's
    /// access, since the vmm thread's filter allows it no `open`.
    fn open_new_backing(&self, update: &mut DriveUpdate) -> Result<(), Response> {
        let Some(path) = &update.path_on_host else {
            return Ok(());
        };
        let read_only = match self.exchange(VmmAction::GetDriveAccess(update.drive_id.clone()))? {
            VmmData::DriveAccess { read_only } => read_only,
            _ => return Err(Response::fault(500, "the VMM gave an unexpected answer")),
        };
        let (file, capacity) = open_backing(&update.drive_id, path, read_only).map_err(|e| {
            METRICS.patch_api_requests.drive_count.inc();
            METRICS.patch_api_requests.drive_fails.inc();
            Response::fault(400, &e.to_string())
        })?;
        update.backing = Some(OpenedBacking {
            file: Arc::new(file),
            capacity,
        });
        Ok(())
    }
}

impl VmmClient {
    /// `PUT /snapshot/create`: once the VMM says it would take the snapshot now, creates
    /// its two files here, since the vmm thread's filter allows it no `open`.
    fn create_snapshot_files(&self, request: &mut SnapshotCreate) -> Result<(), Response> {
        self.exchange(VmmAction::CheckSnapshotCreate(request.params.snapshot_type))?;
        let files = crate::vmm::controller::open_snapshot_files(&request.params).map_err(|e| {
            METRICS.put_api_requests.snapshot_create_count.inc();
            METRICS.put_api_requests.snapshot_create_fails.inc();
            Response::fault(400, &format!("cannot create the snapshot: {e}"))
        })?;
        request.files = Some(files);
        Ok(())
    }
}

fn data_response(data: VmmData) -> Response {
    let to_json = |v: Result<serde_json::Value, serde_json::Error>| match v {
        Ok(v) => Response::json(200, &v),
        Err(e) => Response::fault(500, &format!("cannot encode the answer: {e}")),
    };
    match data {
        VmmData::Empty => Response::no_content(),
        VmmData::InstanceInfo(info) => to_json(serde_json::to_value(info)),
        VmmData::Version(v) => Response::json(
            200,
            &serde_json::json!({
                "firecracker_version": v,
                "ember_version": crate::version::EMBER_VERSION,
            }),
        ),
        VmmData::MachineConfig(m) => to_json(serde_json::to_value(m)),
        VmmData::VmConfig(c) => to_json(c.full_json()),
        VmmData::Mmds(value) => Response::json(200, &value),
        VmmData::Prometheus(text) => Response::text(200, "text/plain; version=0.0.4", text),
        VmmData::DriveAccess { read_only } => {
            Response::json(200, &serde_json::json!({ "read_only": read_only }))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot start the API thread: {0}")]
    Thread(std::io::Error),
    #[error("{0}")]
    Seccomp(SeccompError),
}

/// Where the connections start in the API thread's poll set (after the listener and the
/// shutdown eventfd).
const FIRST_CONN: usize = 2;

/// The API thread, seen from the thread that started it.
pub struct ApiHandle {
    shutdown: EventFd,
    done: mpsc::Receiver<()>,
}

impl ApiHandle {
    /// Stops serving and removes the socket file; waits at most `limit` for that.
    pub fn close(self, limit: Duration) {
        if self.shutdown.write(1).is_ok() {
            let _ = self.done.recv_timeout(limit);
        }
    }
}

pub struct ApiServer {
    listener: UnixListener,
    max_payload: usize,
    vmm: VmmClient,
    conns: Vec<Connection>,
}

impl ApiServer {
    pub fn new(
        listener: UnixListener,
        max_payload: usize,
        requests: Sender<ApiRequest>,
        wakeup: EventFd,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(ApiServer {
            listener,
            max_payload,
            vmm: VmmClient { requests, wakeup },
            conns: Vec::new(),
        })
    }

    /// Runs the server on its own thread until [`ApiHandle::close`], under the API thread's
    /// seccomp filter, installed before the first connection is accepted. Returns once the
    /// filter is in place (or could not be installed: then the thread has ended). The
    /// thread owns the socket file and removes it when closed: the vmm thread, jailed,
    /// may not delete files.
    pub fn spawn(self, seccomp: &Filters, socket: SocketFile) -> Result<ApiHandle, SpawnError> {
        let (installed, outcome) = std::sync::mpsc::channel();
        let (done_tx, done) = std::sync::mpsc::channel();
        let shutdown = EventFd::new(libc::EFD_NONBLOCK).map_err(SpawnError::Thread)?;
        let shutdown_seen = shutdown.try_clone().map_err(SpawnError::Thread)?;
        let seccomp = seccomp.clone();
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                let result = seccomp.install(ThreadKind::Api);
                let ok = result.is_ok();
                let _ = installed.send(result);
                if ok {
                    self.run(&shutdown_seen);
                }
                socket.remove();
                let _ = done_tx.send(());
            })
            .map_err(SpawnError::Thread)?;
        match outcome.recv() {
            Ok(Ok(())) => Ok(ApiHandle { shutdown, done }),
            Ok(Err(e)) => Err(SpawnError::Seccomp(e)),
            Err(_) => Err(SpawnError::Thread(std::io::Error::other(
                "the API thread ended before it started serving",
            ))),
        }
    }

    fn run(mut self, shutdown: &EventFd) {
        loop {
            let mut fds = Vec::with_capacity(self.conns.len() + FIRST_CONN);
            fds.push(libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            fds.push(libc::pollfd {
                fd: shutdown.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            for c in &self.conns {
                let mut events = 0;
                if c.wants_input() {
                    events |= libc::POLLIN;
                }
                if !c.output.is_empty() {
                    events |= libc::POLLOUT;
                }
                fds.push(libc::pollfd {
                    fd: c.stream.as_raw_fd(),
                    events,
                    revents: 0,
                });
            }
            // A bounded wait so request timeouts are noticed without any traffic.
            // SAFETY: fds is a valid array of pollfd of the given length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 500) };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() != ErrorKind::Interrupted {
                    log::error!("API server: poll failed: {err}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            if fds[1].revents != 0 {
                return;
            }
            if fds[0].revents & libc::POLLIN != 0 {
                self.accept_all();
            }
            for (i, pfd) in fds.iter().enumerate().skip(FIRST_CONN) {
                if pfd.revents == 0 {
                    continue;
                }
                let conn = &mut self.conns[i - FIRST_CONN];
                if pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
                    && conn.wants_input()
                {
                    conn.read_available();
                }
                // Requests held back by the output limit are answered as soon as the client
                // has taken the earlier responses.
                while Self::serve(conn, self.max_payload, &self.vmm) {
                    conn.write_pending();
                    if !conn.output.is_empty() {
                        break;
                    }
                }
                conn.write_pending();
            }
            self.expire();
            self.conns.retain(|c| !c.finished());
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() >= MAX_CONNECTIONS && !self.evict_idle() {
                        METRICS.api_server.connections_refused.inc();
                        crate::rate_limited_log!(
                            log::Level::Warn,
                            "API server: {MAX_CONNECTIONS} connections are busy; closing a new one"
                        );
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    METRICS.api_server.connections_accepted.inc();
                    self.conns.push(Connection::new(stream));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("API server: accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Closes the connection idle the longest to make room for a new one; false when every
    /// connection has a request or a response in flight.
    fn evict_idle(&mut self) -> bool {
        let oldest = self
            .conns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_idle())
            .min_by_key(|(_, c)| c.last_activity)
            .map(|(i, _)| i);
        match oldest {
            Some(i) => {
                METRICS.api_server.idle_connections_closed.inc();
                self.conns.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// Answers the complete requests in the connection's input, in order, until its
    /// pending output reaches the limit; the rest waits until the client reads. True when
    /// it stopped at that limit with input left.
    fn serve(conn: &mut Connection, max_payload: usize, vmm: &VmmClient) -> bool {
        while !conn.input.is_empty() && !conn.dead {
            if conn.output.len() >= MAX_PENDING_OUTPUT {
                return true;
            }
            match http::parse(&conn.input, max_payload) {
                Ok(Parsed::Incomplete { expects_continue }) => {
                    if expects_continue && !conn.continue_sent {
                        conn.queue_output(CONTINUE);
                        conn.continue_sent = true;
                    }
                    if conn.closing {
                        // The peer closed with half a request: there is no rest to wait for.
                        METRICS.api_server.malformed_requests.inc();
                        conn.refuse(400, "the connection closed in the middle of a request");
                    }
                    return false;
                }
                Ok(Parsed::Complete(req, used)) => {
                    conn.input.drain(..used);
                    conn.continue_sent = false;
                    conn.request_started = (!conn.input.is_empty()).then(Instant::now);
                    let response = vmm.call(&req);
                    let close = req.close || conn.closing && conn.input.is_empty();
                    conn.queue_output(&response.encode(close));
                    if req.close {
                        conn.closing = true;
                        conn.input.clear();
                        return false;
                    }
                }
                Err(e) => {
                    if e.status() == 413 {
                        METRICS.api_server.requests_too_large.inc();
                    } else {
                        METRICS.api_server.malformed_requests.inc();
                    }
                    conn.refuse(e.status(), &e.to_string());
                    return false;
                }
            }
        }
        false
    }

    fn expire(&mut self) {
        for c in &mut self.conns {
            if c.dead {
                continue;
            }
            // A client that does not take its responses holds memory: let it go.
            if !c.output.is_empty() && c.last_write_progress.elapsed() > WRITE_TIMEOUT {
                METRICS.api_server.write_timeouts.inc();
                c.dead = true;
                continue;
            }
            if c.closing {
                continue;
            }
            if !c.heard_from && c.opened.elapsed() > REQUEST_TIMEOUT {
                // Connected and never said anything: it holds a slot others may need.
                METRICS.api_server.read_timeouts.inc();
                c.dead = true;
            } else if let Some(started) = c.request_started {
                if started.elapsed() > REQUEST_TIMEOUT {
                    METRICS.api_server.read_timeouts.inc();
                    c.refuse(
                        408,
                        &format!(
                            "the request did not arrive within {} s",
                            REQUEST_TIMEOUT.as_secs()
                        ),
                    );
                    c.write_pending();
                }
            } else if c.output.is_empty() && c.last_activity.elapsed() > IDLE_TIMEOUT {
                c.dead = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get_root() -> Request {
        Request {
            method: "GET".into(),
            path: "/".into(),
            body: Vec::new(),
            close: false,
        }
    }

    #[test]
    fn requests_during_shutdown_get_503() {
        // The vmm thread took the request and went away without answering.
        let (requests, taken) = mpsc::channel::<ApiRequest>();
        let vmm = VmmClient {
            requests,
            wakeup: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        };
        let stopping = std::thread::spawn(move || drop(taken.recv()));
        let answer = vmm.call(&get_root());
        stopping.join().unwrap();
        assert_eq!(answer.status, 503);
        // And once it stopped taking requests at all.
        assert_eq!(vmm.call(&get_root()).status, 503);
    }
}
