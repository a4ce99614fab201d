//! Termination signals (SIGTERM, SIGINT, SIGHUP) arrive as events on the vmm thread through
//! a signalfd, so stopping the VM on a signal is ordinary code, not a signal handler.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use crate::metrics::METRICS;
use crate::stop::StopSignal;

const TERMINATION_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("cannot block termination signals: {0}")]
    Block(std::io::Error),
    #[error("cannot create a signalfd: {0}")]
    SignalFd(std::io::Error),
}

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset only write the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in TERMINATION_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks the termination signals in the calling thread and every thread it starts later.
/// Call before spawning any thread, so only the signalfd ever sees them.
pub fn block_termination_signals() -> Result<(), SignalError> {
    let set = termination_set();
    // SAFETY: the set is valid; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(SignalError::Block(std::io::Error::from_raw_os_error(rc)));
    }
    Ok(())
}

/// Reads termination signals and stops the VM; remembers the first signal for the exit code.
pub struct SignalHandler {
    fd: OwnedFd,
    stop: StopSignal,
    received: Arc<AtomicI32>,
}

impl SignalHandler {
    pub fn new(stop: StopSignal, received: Arc<AtomicI32>) -> Result<Self, SignalError> {
        let set = termination_set();
        // SAFETY: creates a new fd from a valid set; the result is checked.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(SignalError::SignalFd(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(SignalHandler { fd, stop, received })
    }
}

impl MutEventSubscriber for SignalHandler {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        loop {
            // SAFETY: reads one siginfo into a buffer of exactly its size.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    (&mut info as *mut libc::signalfd_siginfo).cast(),
                    std::mem::size_of::<libc::signalfd_siginfo>(),
                )
            };
            if n != std::mem::size_of::<libc::signalfd_siginfo>() as isize {
                break;
            }
            let signo = info.ssi_signo as i32;
            match signo {
                libc::SIGTERM => METRICS.signals.sigterm.inc(),
                libc::SIGINT => METRICS.signals.sigint.inc(),
                libc::SIGHUP => METRICS.signals.sighup.inc(),
                _ => {}
            }
            log::info!("received signal {signo}; stopping the microVM");
            let _ = self
                .received
                .compare_exchange(0, signo, Ordering::SeqCst, Ordering::SeqCst);
            self.stop.request();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            log::error!("cannot watch for termination signals: {e}");
        }
    }
}
