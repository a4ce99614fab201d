//! How any part of the VMM asks the VM to stop: a flag every vCPU checks before it enters
//! the guest again, plus an eventfd that wakes the vmm thread to finish the job.
//!
//! The flag matters for the vCPU that asked: after a guest's reset write it must not run the
//! guest one more time (Linux falls back to a triple fault if the reset seems to fail).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, thiserror::Error)]
#[error("cannot create the stop eventfd: {0}")]
pub struct StopSignalError(std::io::Error);

struct Shared {
    stopping: AtomicBool,
    guest_reset: AtomicBool,
}

#[derive(Clone)]
pub struct StopSignal {
    shared: Arc<Shared>,
    evt: Arc<EventFd>,
}

impl StopSignal {
    pub fn new() -> Result<Self, StopSignalError> {
        Ok(StopSignal {
            shared: Arc::new(Shared {
                stopping: AtomicBool::new(false),
                guest_reset: AtomicBool::new(false),
            }),
            evt: Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(StopSignalError)?),
        })
    }

    /// The guest asked to reset (or power off): a clean end of the VM.
    pub fn guest_reset(&self) {
        self.shared.guest_reset.store(true, Ordering::SeqCst);
        self.request();
    }

    /// Something (a vCPU fault, the VMM) wants the VM stopped.
    pub fn request(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // A full eventfd counter still wakes the loop, so a failed write loses nothing.
        let _ = self.evt.write(1);
    }

    pub fn is_stopping(&self) -> bool {
        self.shared.stopping.load(Ordering::SeqCst)
    }

    pub fn was_guest_reset(&self) -> bool {
        self.shared.guest_reset.load(Ordering::SeqCst)
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_sets_both_flags_and_wakes() {
        let s = StopSignal::new().unwrap();
        let clone = s.clone();
        assert!(!s.is_stopping());
        clone.guest_reset();
        assert!(s.is_stopping() && s.was_guest_reset());
        assert_eq!(s.eventfd().read().unwrap(), 1);
    }

    #[test]
    fn request_is_not_a_reset() {
        let s = StopSignal::new().unwrap();
        s.request();
        assert!(s.is_stopping() && !s.was_guest_reset());
    }
}
