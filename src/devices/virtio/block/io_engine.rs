//! The asynchronous I/O engine (`io_engine: "Async"`): requests go to the kernel through an
//! io_uring and complete later, so one slow request does not hold up the vmm thread. The
//! ring signals completions on an eventfd the vmm thread's event loop watches.

use std::fs::File;
use std::os::fd::AsRawFd;

use io_uring::{IoUring, opcode, squeue, types};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::request::RequestType;

/// What a request needs when its I/O completes.
#[derive(Clone, Copy, Debug)]
pub struct PendingRequest {
    pub head: u16,
    pub kind: RequestType,
    pub status: GuestAddress,
    /// Bytes the I/O must transfer to succeed.
    pub expected: u64,
}

struct InFlight {
    request: PendingRequest,
    // The kernel reads the iovec array until the request completes, so it lives here.
    _iovecs: Vec<libc::iovec>,
}

// SAFETY: the iovecs point into guest memory, which is shared by design and outlives the
// engine; they are only handed to the kernel, never dereferenced by another thread.
unsafe impl Send for InFlight {}

pub struct AsyncEngine {
    ring: IoUring,
    eventfd: EventFd,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("io_uring is not available on this host: {0}")]
    Unavailable(std::io::Error),
    #[error("cannot submit to the io_uring: {0}")]
    Submit(std::io::Error),
    #[error("the io_uring has no room for another request")]
    Full,
}

impl AsyncEngine {
    /// A ring with room for `depth` requests in flight (the queue size).
    pub fn new(depth: u16) -> Result<Self, EngineError> {
        let ring = IoUring::new(u32::from(depth)).map_err(EngineError::Unavailable)?;
        let eventfd = EventFd::new(libc::EFD_NONBLOCK).map_err(EngineError::Unavailable)?;
        ring.submitter()
            .register_eventfd(eventfd.as_raw_fd())
            .map_err(EngineError::Unavailable)?;
        Ok(AsyncEngine {
            ring,
            eventfd,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..usize::from(depth)).rev().collect(),
        })
    }

    /// Readable when completions are waiting.
    pub fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }

    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn push(&mut self, entry: squeue::Entry, inflight: InFlight) -> Result<(), EngineError> {
        let slot = self.free.pop().ok_or(EngineError::Full)?;
        let entry = entry.user_data(slot as u64);
        // SAFETY: the entry's buffers (iovec array and the guest memory it points to) stay
        // valid until its completion is reaped: the array is kept in `slots`.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            self.free.push(slot);
            return Err(EngineError::Full);
        }
        self.slots[slot] = Some(inflight);
        Ok(())
    }

    /// Hands everything pushed since the last call to the kernel in one system call.
    pub fn submit(&mut self) -> Result<(), EngineError> {
        self.ring.submit().map_err(EngineError::Submit)?;
        Ok(())
    }

    /// Starts a vectored read (`write == false`) or write at `offset`.
    pub fn submit_rw(
        &mut self,
        file: &File,
        write: bool,
        offset: u64,
        iovecs: Vec<libc::iovec>,
        request: PendingRequest,
    ) -> Result<(), EngineError> {
        let fd = types::Fd(file.as_raw_fd());
        let len = iovecs.len() as u32;
        let entry = if write {
            opcode::Writev::new(fd, iovecs.as_ptr(), len)
                .offset(offset)
                .build()
        } else {
            opcode::Readv::new(fd, iovecs.as_ptr(), len)
                .offset(offset)
                .build()
        };
        self.push(
            entry,
            InFlight {
                request,
                _iovecs: iovecs,
            },
        )
    }

    /// Starts an fsync that waits for every request submitted before it (IO_DRAIN), so a
    /// flush covers all writes the guest issued before the flush.
    pub fn submit_fsync(
        &mut self,
        file: &File,
        request: PendingRequest,
    ) -> Result<(), EngineError> {
        let entry = opcode::Fsync::new(types::Fd(file.as_raw_fd()))
            .build()
            .flags(squeue::Flags::IO_DRAIN);
        self.push(
            entry,
            InFlight {
                request,
                _iovecs: Vec::new(),
            },
        )
    }

    /// Completed requests with the kernel's result (bytes transferred, or an error).
    pub fn completions(&mut self) -> Vec<(PendingRequest, std::io::Result<u64>)> {
        let _ = self.eventfd.read();
        let mut done = Vec::new();
        for cqe in self.ring.completion() {
            let slot = cqe.user_data() as usize;
            let Some(inflight) = self.slots.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            self.free.push(slot);
            let result = if cqe.result() < 0 {
                Err(std::io::Error::from_raw_os_error(-cqe.result()))
            } else {
                Ok(cqe.result() as u64)
            };
            done.push((inflight.request, result));
        }
        done
    }

    /// Waits until every request in flight completed and returns them; used before the
    /// queue goes away (device reset), so no completion writes into a forgotten ring.
    pub fn drain(&mut self) -> Vec<(PendingRequest, std::io::Result<u64>)> {
        let mut all = Vec::new();
        while self.in_flight() > 0 {
            if let Err(e) = self.ring.submit_and_wait(1)
                && e.kind() != std::io::ErrorKind::Interrupted
            {
                log::warn!("io_uring: waiting for requests failed: {e}");
                break;
            }
            all.extend(self.completions());
        }
        all
    }
}
