//! The guest's serial console on the host: stdin feeds it, stdout shows it.
//!
//! Stdin is watched only when it can be polled (a terminal, pipe or socket). When the UART's
//! receive FIFO is full, stdin is taken off the event loop until the guest drains the FIFO,
//! so a guest that never reads its console cannot make the loop spin.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::terminal::Terminal;
use vmm_sys_util::timerfd::TimerFd;

use crate::devices::legacy::serial::SerialDevice;

/// True when `fd` is something epoll can watch: a terminal, FIFO or socket. Regular files
/// and /dev/null cannot be polled, and there is nothing to wait for on them anyway.
pub fn pollable(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: fstat writes only into the struct we pass.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    let kind = st.st_mode & libc::S_IFMT;
    // SAFETY: isatty only inspects the descriptor.
    let tty = unsafe { libc::isatty(fd.as_raw_fd()) } == 1;
    tty || kind == libc::S_IFIFO || kind == libc::S_IFSOCK
}

/// Puts a terminal on stdin into raw mode while the guest runs, so keystrokes (Ctrl+C
/// included) reach the guest as typed, and restores it however ember ends.
pub struct RawTerminal(bool);

impl RawTerminal {
    pub fn enter() -> Self {
        let stdin = std::io::stdin().lock();
        // SAFETY: isatty only inspects the descriptor.
        let tty = unsafe { libc::isatty(0) } == 1;
        RawTerminal(tty && stdin.set_raw_mode().is_ok())
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if self.0 {
            let _ = std::io::stdin().lock().set_canon_mode();
        }
    }
}

pub struct ConsoleInput {
    stdin: BorrowedFd<'static>,
    serial: Arc<Mutex<SerialDevice>>,
    input_drained: EventFd,
    watching_stdin: bool,
    stdin_closed: bool,
}

impl ConsoleInput {
    pub fn new(serial: Arc<Mutex<SerialDevice>>, input_drained: EventFd) -> Self {
        ConsoleInput {
            // SAFETY: fd 0 stays open for the life of the process.
            stdin: unsafe { BorrowedFd::borrow_raw(0) },
            serial,
            input_drained,
            watching_stdin: false,
            stdin_closed: false,
        }
    }

    fn watch_stdin(&mut self, ops: &mut EventOps, on: bool) {
        if on == self.watching_stdin || self.stdin_closed {
            return;
        }
        let ev = Events::new(&self.stdin, EventSet::IN);
        let r = if on { ops.add(ev) } else { ops.remove(ev) };
        match r {
            Ok(()) => self.watching_stdin = on,
            Err(e) => log::warn!("console: cannot change stdin watch: {e}"),
        }
    }

    fn forward_stdin(&mut self, ops: &mut EventOps) {
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let room = serial.input_capacity();
        if room == 0 {
            drop(serial);
            self.watch_stdin(ops, false);
            return;
        }
        let mut buf = [0u8; 64];
        let want = room.min(buf.len());
        // SAFETY: reads at most `want` bytes into our buffer.
        let n = unsafe { libc::read(self.stdin.as_raw_fd(), buf.as_mut_ptr().cast(), want) };
        match n {
            0 => {
                drop(serial);
                self.watch_stdin(ops, false);
                self.stdin_closed = true;
            }
            n if n > 0 => {
                serial.enqueue_input(&buf[..n as usize]);
            }
            _ => {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::WouldBlock
                    && err.kind() != std::io::ErrorKind::Interrupted
                {
                    log::warn!("console: stdin read failed, no more guest input: {err}");
                    drop(serial);
                    self.watch_stdin(ops, false);
                    self.stdin_closed = true;
                }
            }
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.input_drained.as_raw_fd() {
            let _ = self.input_drained.read();
            self.watch_stdin(ops, true);
        } else if events.fd() == self.stdin.as_raw_fd() {
            if events
                .event_set()
                .intersects(EventSet::HANG_UP | EventSet::ERROR)
                && !events.event_set().contains(EventSet::IN)
            {
                self.watch_stdin(ops, false);
                self.stdin_closed = true;
                return;
            }
            self.forward_stdin(ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // init runs again when the handler comes back after a pause, with nothing watched.
        self.watching_stdin = false;
        if let Err(e) = ops.add(Events::new(&self.input_drained, EventSet::IN)) {
            log::warn!("console: cannot watch the serial FIFO: {e}");
        }
        if pollable(self.stdin) {
            self.watch_stdin(ops, true);
        } else {
            log::debug!("console: stdin cannot be polled; the guest gets no console input");
        }
    }
}

/// The host side of the console's output: stdout, opened so that writing never blocks the
/// vmm thread. Pipes, FIFOs and terminals get a descriptor of their own with O_NONBLOCK
/// (reopened through /proc, so the flag does not leak to whoever shares ember's stdout);
/// sockets are written with MSG_DONTWAIT; regular files never block.
pub struct HostOutput {
    fd: std::os::fd::OwnedFd,
    socket: bool,
}

/// What one write attempt did.
enum Wrote {
    Bytes(usize),
    WouldBlock,
    Failed(std::io::Error),
}

impl HostOutput {
    pub fn stdout() -> std::io::Result<Self> {
        use std::os::fd::{FromRawFd, OwnedFd};
        // SAFETY: fstat writes only into the struct we pass.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(1, &mut st) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let kind = st.st_mode & libc::S_IFMT;
        if kind == libc::S_IFIFO || kind == libc::S_IFCHR {
            let path = c"/proc/self/fd/1";
            // SAFETY: open reads the NUL-terminated path; the result is checked.
            let fd = unsafe {
                libc::open(
                    path.as_ptr(),
                    libc::O_WRONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY,
                )
            };
            if fd >= 0 {
                // SAFETY: `fd` was just opened and is owned by nothing else.
                return Ok(HostOutput {
                    fd: unsafe { OwnedFd::from_raw_fd(fd) },
                    socket: false,
                });
            }
            log::debug!(
                "console: cannot reopen stdout non-blocking ({}); writing it as it is",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: dup of our own stdout; the copy is owned here.
        let fd = unsafe { libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 3) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(HostOutput {
            // SAFETY: `fd` was just created and is owned by nothing else.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            socket: kind == libc::S_IFSOCK,
        })
    }

    fn write(&self, buf: &[u8]) -> Wrote {
        let fd = self.fd.as_raw_fd();
        loop {
            // SAFETY: writes at most buf.len() bytes from our buffer.
            let n = unsafe {
                if self.socket {
                    libc::send(
                        fd,
                        buf.as_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                } else {
                    libc::write(fd, buf.as_ptr().cast(), buf.len())
                }
            };
            if n >= 0 {
                return Wrote::Bytes(n as usize);
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => return Wrote::WouldBlock,
                _ => return Wrote::Failed(e),
            }
        }
    }
}

impl AsRawFd for HostOutput {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// Moves guest console output from its buffer to the host, on the vmm thread. When the
/// host does not take it (a full pipe), the writer waits for it to become writable while
/// the buffer holds the rest (and drops what does not fit, see `OutputBuffer`).
///
/// Output is written in batches: the first byte after a quiet spell goes out at once and
/// opens a short window; everything the guest prints in the window goes out in one write
/// when it closes. A guest printing a line byte by byte would otherwise wake the vmm
/// thread, and whoever reads ember's stdout, once per byte.
pub struct ConsoleWriter {
    buffer: Arc<crate::devices::legacy::serial::OutputBuffer>,
    out: HostOutput,
    batch_timer: TimerFd,
    batch_pending: bool,
    watching_out: bool,
    /// The host end is gone (EPIPE, EIO): output is dropped from now on.
    broken: bool,
}

/// Bytes handed to one write: enough to keep up with any guest.
const WRITE_CHUNK: usize = 64 * 1024;

/// How long output may wait to be batched: short against what a person at a console or a
/// test reading it notices, long against one byte's trip through the UART.
const BATCH_DELAY: std::time::Duration = std::time::Duration::from_millis(4);

impl ConsoleWriter {
    pub fn new(
        buffer: Arc<crate::devices::legacy::serial::OutputBuffer>,
        out: HostOutput,
    ) -> std::io::Result<Self> {
        Ok(ConsoleWriter {
            buffer,
            out,
            batch_timer: TimerFd::new()?,
            batch_pending: false,
            watching_out: false,
            broken: false,
        })
    }

    /// Output arrived. After a quiet spell it goes out at once (a prompt or a first boot
    /// line is not delayed) and a batch window opens; while the window is open, output
    /// waits for the timer. If the timer cannot be armed, everything is written at once.
    fn output_arrived(&mut self, ops: &mut EventOps) {
        if self.batch_pending {
            return;
        }
        self.flush(ops);
        match self.batch_timer.reset(BATCH_DELAY, None) {
            Ok(()) => self.batch_pending = true,
            Err(e) => log::debug!("console: cannot arm the batch timer ({e}); writing at once"),
        }
    }

    /// The batch window closed: write what it gathered, and keep batching while the guest
    /// keeps printing.
    fn batch_due(&mut self, ops: &mut EventOps) {
        self.batch_pending = false;
        if !self.buffer.is_empty() {
            self.output_arrived(ops);
        }
    }

    /// Writes what the host takes now; true when the host would block with output left.
    fn write_some(&mut self) -> bool {
        loop {
            if self.broken {
                let dropped = self.buffer.drain_into(usize::MAX, |b| b.len());
                crate::metrics::METRICS
                    .uart
                    .output_dropped_bytes
                    .add(dropped as u64);
                if dropped == 0 {
                    return false;
                }
                continue;
            }
            let mut blocked = false;
            let mut failed = None;
            let out = &self.out;
            let taken = self.buffer.drain_into(WRITE_CHUNK, |chunk| {
                if chunk.is_empty() {
                    return 0;
                }
                match out.write(chunk) {
                    Wrote::Bytes(n) => n,
                    Wrote::WouldBlock => {
                        blocked = true;
                        0
                    }
                    Wrote::Failed(e) => {
                        failed = Some(e);
                        0
                    }
                }
            });
            if let Some(e) = failed {
                log::warn!("console: the host no longer takes guest output ({e}); dropping it");
                self.broken = true;
                continue;
            }
            if blocked {
                return true;
            }
            if taken == 0 {
                return false;
            }
        }
    }

    fn flush(&mut self, ops: &mut EventOps) {
        let blocked = self.write_some();
        if blocked != self.watching_out {
            let ev = Events::new(&self.out, EventSet::OUT);
            let r = if blocked { ops.add(ev) } else { ops.remove(ev) };
            match r {
                Ok(()) => self.watching_out = blocked,
                Err(e) => log::debug!("console: cannot change the stdout watch: {e}"),
            }
        }
    }

    /// At exit: hands the host what is left, waiting at most `limit` for it to take it.
    pub fn finish(&mut self, limit: std::time::Duration) {
        let deadline = std::time::Instant::now() + limit;
        while self.write_some() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let mut p = libc::pollfd {
                fd: self.out.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut p, 1, ms.max(1)) };
        }
    }
}

impl MutEventSubscriber for ConsoleWriter {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.buffer.eventfd().as_raw_fd() {
            let _ = self.buffer.eventfd().read();
            self.output_arrived(ops);
        } else if fd == self.batch_timer.as_raw_fd() {
            let _ = self.batch_timer.wait();
            self.batch_due(ops);
        } else {
            self.flush(ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // init runs again when the handler comes back after a pause, with nothing watched;
        // output that arrived meanwhile goes out with the next batch.
        self.watching_out = false;
        self.batch_pending = false;
        for fd in [
            self.buffer.eventfd().as_raw_fd(),
            self.batch_timer.as_raw_fd(),
        ] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, 0, EventSet::IN)) {
                log::error!("console: cannot watch guest output: {e}");
            }
        }
        if !self.buffer.is_empty() {
            self.output_arrived(ops);
        }
    }
}
