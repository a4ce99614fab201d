//! Host stdin feeds the guest's serial console.
//!
//! Stdin is watched only when it can be polled (a terminal, pipe or socket). When the UART's
//! receive FIFO is full, stdin is taken off the event loop until the guest drains the FIFO,
//! so a guest that never reads its console cannot make the loop spin.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::terminal::Terminal;

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
