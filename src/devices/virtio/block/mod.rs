//! virtio-blk: a guest disk backed by a host file.
//!
//! The device runs on the vmm thread: the guest's queue notification arrives as an
//! ioeventfd, requests are carried out with positional vectored I/O straight between the
//! file and guest memory, and completion raises the device's interrupt through an irqfd.
//!
//! A queue the driver has broken (an available index the ring cannot hold) is not looked at
//! again until the driver resets the device: the device reports DEVICE_NEEDS_RESET and
//! raises one configuration change interrupt (virtio 1.2, 2.1.2), so a guest that keeps
//! notifying a broken queue costs one check per notification, not a log line each.

pub mod io_engine;
pub mod request;

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use crate::memory::GuestMemoryMmap;
use event_manager::EventSet;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateError, VIRTIO_F_VERSION_1, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
    read_config_bytes,
};
use crate::config::rate_limiter::RateLimiterConfig;
use crate::host_file::{self, Accept, Access, HostFileError};
use crate::metrics::{BlockMetrics, DeviceCounters, Group, METRICS};
use crate::rate_limiter::{RateLimiter, TokenType};
use io_engine::{AsyncEngine, PendingRequest};
use request::{
    ID_BYTES, Request, RequestType, SECTOR_SIZE, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
};

pub use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO};
pub use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
/// Descriptors may point at a table of further descriptors (virtio 1.2, 2.7.5.3), and the
/// driver publishes when it wants interrupts and notifications (2.7.10).
pub use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
/// Queue size offered to the guest.
pub const QUEUE_SIZE: u16 = 256;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("drive {id:?}: {source}")]
    Open { id: String, source: HostFileError },
    #[error("drive {id:?}: cannot create the rate limiter's timer: {source}")]
    RateLimiter { id: String, source: std::io::Error },
}

/// What the device is made from.
#[derive(Clone, Debug)]
pub struct BlockConfig {
    pub id: String,
    pub path: String,
    pub read_only: bool,
    /// Offer FLUSH (cache_type "Writeback"); with "Unsafe" the guest is not told to flush.
    pub flush: bool,
    /// Use an io_uring (io_engine "Async") when the host has one.
    pub async_io: bool,
    /// Bandwidth and operation limits.
    pub rate_limiter: Option<RateLimiterConfig>,
}

struct ActiveQueue {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
}

pub struct Block {
    config: BlockConfig,
    file: File,
    capacity: u64,
    config_space: [u8; 8],
    generation: u32,
    active: Option<ActiveQueue>,
    engine: Option<AsyncEngine>,
    limiter: RateLimiter,
    /// Reused for every chain, so a request costs no allocation.
    descs: Vec<Descriptor>,
    metrics: DriveMetrics,
    /// The driver broke the queue: it is not used again until the driver resets the device,
    /// and the device status shows DEVICE_NEEDS_RESET meanwhile.
    needs_reset: bool,
}

/// This drive's counters, summed into `block` as they are counted.
type DriveMetrics = DeviceCounters<BlockMetrics>;

/// Opens a backing file (or block device) with the guest's access, without blocking;
/// returns it with its size in sectors.
pub fn open_backing(id: &str, path: &str, read_only: bool) -> Result<(File, u64), BlockError> {
    let access = if read_only {
        Access::ReadOnly
    } else {
        Access::ReadWrite
    };
    let f = host_file::open(
        "backing file",
        Path::new(path),
        access,
        Accept::FileOrBlockDevice,
    )
    .map_err(|source| BlockError::Open {
        id: id.to_owned(),
        source,
    })?;
    let len = f.size;
    if !len.is_multiple_of(SECTOR_SIZE) {
        log::warn!(
            "drive {id:?}: {} is {len} bytes, not a multiple of 512; the last {} bytes are not visible to the guest",
            f.shown,
            len % SECTOR_SIZE
        );
    }
    Ok((f.file, len / SECTOR_SIZE))
}

impl Block {
    /// Opens the backing file once, for the life of the VM, with the guest's access.
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        let (file, capacity) = open_backing(&config.id, &config.path, config.read_only)?;
        let engine = if config.async_io {
            match AsyncEngine::new(QUEUE_SIZE) {
                Ok(e) => Some(e),
                Err(e) => {
                    log::warn!(
                        "drive {:?}: {e}; falling back to io_engine \"Sync\"",
                        config.id
                    );
                    None
                }
            }
        } else {
            None
        };
        let limiter = match &config.rate_limiter {
            Some(rl) => RateLimiter::new(rl),
            None => RateLimiter::unlimited(),
        }
        .map_err(|source| BlockError::RateLimiter {
            id: config.id.clone(),
            source,
        })?;
        Ok(Block {
            config,
            file,
            capacity,
            config_space: capacity.to_le_bytes(),
            generation: 0,
            active: None,
            metrics: DeviceCounters::new(&METRICS.block),
            engine,
            limiter,
            descs: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            needs_reset: false,
        })
    }

    /// Replaces the backing file of a running drive (`PATCH /drives`): requests from now on
    /// go to the new file, the capacity follows it, and the guest is told its configuration
    /// changed.
    pub fn swap_backing(&mut self, path: &str) -> Result<(), BlockError> {
        let (file, capacity) = open_backing(&self.config.id, path, self.config.read_only)?;
        self.swap_backing_file(file, capacity, path);
        Ok(())
    }

    /// Replaces the backing file with `file` (opened by [`open_backing`] with this drive's
    /// access) of `capacity` sectors, found at `path`.
    pub fn swap_backing_file(&mut self, file: File, capacity: u64, path: &str) {
        // Requests in flight still use the old file: let them finish before it is closed.
        self.finish_in_flight();
        self.file = file;
        self.config.path = path.to_owned();
        self.capacity = capacity;
        self.config_space = capacity.to_le_bytes();
        self.generation = self.generation.wrapping_add(1);
        if let Some(active) = &self.active {
            active.interrupt.trigger(VirtioInterruptType::Config);
        }
        log::info!(
            "drive {:?}: now backed by {path} ({capacity} sectors)",
            self.config.id
        );
    }

    /// New rate limits from `PATCH /drives`: buckets given are replaced, others kept.
    pub fn update_rate_limiter(&mut self, config: &RateLimiterConfig) {
        self.limiter.update_buckets(config);
    }

    /// The rate limiter's timer, readable when a throttled queue may run again.
    pub fn limiter_fd(&self) -> RawFd {
        self.limiter.as_raw_fd()
    }

    /// The limiter's timer fired: run the queue again.
    pub fn process_limiter_event(&mut self) {
        if let Err(e) = self.limiter.event_handler() {
            log::debug!("drive {:?}: {e}", self.config.id);
        }
        self.process_queue();
    }

    /// Takes one operation and the request's bytes from the limiter; false (and nothing
    /// taken) when the request must wait.
    fn admit(limiter: &mut RateLimiter, descs: &[Descriptor]) -> bool {
        let bytes: u64 = descs
            .get(1..descs.len().saturating_sub(1))
            .unwrap_or(&[])
            .iter()
            .map(|d| u64::from(d.len()))
            .sum();
        if !limiter.consume(1, TokenType::Ops) {
            return false;
        }
        if bytes > 0 && !limiter.consume(bytes, TokenType::Bytes) {
            limiter.manual_replenish(1, TokenType::Ops);
            return false;
        }
        true
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn id(&self) -> &str {
        &self.config.id
    }

    /// The engine's completion eventfd, when requests run asynchronously.
    pub fn completion_eventfd(&self) -> Option<&EventFd> {
        self.engine.as_ref().map(AsyncEngine::eventfd)
    }

    /// True when requests go through the io_uring.
    pub fn is_async(&self) -> bool {
        self.engine.is_some()
    }

    /// Handles everything the guest queued; raises the interrupt once if anything completed.
    /// A queue found broken is left alone from then on, until the driver resets the device.
    pub fn process_queue(&mut self) {
        if self.needs_reset {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut completed = false;
        let mut broken = None;
        // Passes in a row in which the ring said more was available and none could be taken.
        let mut empty_passes = 0u32;
        loop {
            if self.limiter.is_blocked() {
                // The limiter's timer runs the queue again when tokens are back.
                break;
            }
            let mut popped = 0usize;
            loop {
                let chain = match pop_chain(&mut active.queue, &active.mem) {
                    Ok(Some(chain)) => chain,
                    Ok(None) => break,
                    Err(e) => {
                        broken = Some(e.to_string());
                        break;
                    }
                };
                popped += 1;
                let head = chain.head_index();
                self.descs.clear();
                self.descs.extend(chain);
                let descs = &self.descs;
                if !Self::admit(&mut self.limiter, descs) {
                    // Leave the request in the ring for when the limiter allows it.
                    active.queue.go_to_previous_position();
                    self.metrics.inc(|m| &m.rate_limiter_throttled);
                    break;
                }
                let backend = Backend {
                    file: &self.file,
                    config: &self.config,
                    capacity: self.capacity,
                    engine: self.engine.as_mut(),
                    metrics: &self.metrics,
                };
                if let Outcome::Done(used) = execute(backend, &active.mem, head, descs) {
                    if let Err(e) = active.queue.add_used(&active.mem, head, used) {
                        crate::rate_limited_log!(
                            log::Level::Warn,
                            "drive {:?}: cannot return a request: {e}",
                            self.config.id
                        );
                    }
                    completed = true;
                }
            }
            if broken.is_some() || self.limiter.is_blocked() {
                break;
            }
            // Closes the race with a guest that queued more just as we finished.
            match active.queue.enable_notification(&active.mem) {
                // More is available but nothing could be taken. Once, that is a guest that
                // published just after the ring was read: look again. Twice in a row, the
                // ring cannot be read: stop rather than spin.
                Ok(true) if popped == 0 => {
                    empty_passes += 1;
                    if empty_passes > 1 {
                        broken = Some("the available ring cannot be read".to_owned());
                        break;
                    }
                }
                Ok(true) => empty_passes = 0,
                Ok(false) => break,
                Err(e) => {
                    broken = Some(e.to_string());
                    break;
                }
            }
        }
        if let Some(engine) = self.engine.as_mut() {
            // One system call for everything this pass queued.
            if let Err(e) = engine.submit() {
                crate::rate_limited_log!(
                    log::Level::Warn,
                    "drive {:?}: cannot submit to the io_uring: {e}",
                    self.config.id
                );
            }
        }
        if completed {
            notify(active);
        }
        if let Some(why) = broken {
            self.queue_broken(&why);
        }
    }

    /// The driver broke the queue (virtio 1.2, 2.1.2): stop using it until the driver resets
    /// the device, report DEVICE_NEEDS_RESET (see [`VirtioDevice::needs_reset`]) and tell the
    /// driver with one configuration change interrupt. Requests already taken still
    /// complete. Counted and logged once per breakage, however often the guest notifies.
    fn queue_broken(&mut self, why: &str) {
        self.needs_reset = true;
        self.metrics.inc(|m| &m.queue_broken);
        crate::rate_limited_log!(
            log::Level::Warn,
            "drive {:?}: the guest broke its queue ({why}); ignoring it until the driver resets the device",
            self.config.id
        );
        if let Some(active) = &self.active {
            active.interrupt.trigger(VirtioInterruptType::Config);
        }
    }

    /// Waits for every request in flight and returns them to the guest (if it still has
    /// a queue), so nothing the device started writes guest memory afterwards.
    fn finish_in_flight(&mut self) {
        if let Some(engine) = self.engine.as_mut()
            && engine.in_flight() > 0
        {
            let done = engine.drain();
            self.complete_async(done);
        }
    }

    /// Returns requests the io_uring finished to the guest.
    pub fn process_completions(&mut self) {
        let Some(engine) = self.engine.as_mut() else {
            return;
        };
        let done = engine.completions();
        self.complete_async(done);
    }

    fn complete_async(&mut self, done: Vec<(PendingRequest, std::io::Result<u64>)>) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if done.is_empty() {
            return;
        }
        for (req, result) in done {
            let (status, data_written) = match result {
                Ok(n) if n == req.expected => {
                    count_success(&self.metrics, req.kind, n);
                    let written = if req.kind == RequestType::In {
                        n as u32
                    } else {
                        0
                    };
                    (VIRTIO_BLK_S_OK, written)
                }
                Ok(n) => io_failed(
                    &self.config,
                    &self.metrics,
                    "transfer",
                    std::io::Error::other(format!("{n} of {} bytes", req.expected)),
                ),
                Err(e) => io_failed(&self.config, &self.metrics, "request", e),
            };
            let used = match active.mem.write_obj(status, req.status) {
                Ok(()) => data_written + 1,
                Err(_) => data_written,
            };
            if let Err(e) = active.queue.add_used(&active.mem, req.head, used) {
                crate::rate_limited_log!(
                    log::Level::Warn,
                    "drive {:?}: cannot return a request: {e}",
                    self.config.id
                );
            }
        }
        notify(active);
    }
}

/// The next chain the driver made available, if any. Unlike `pop_descriptor_chain`, says
/// when the ring is broken (an available index more than the queue size ahead) instead of
/// logging it, so the caller decides what a guest's repeated mistake costs.
fn pop_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, virtio_queue::Error> {
    Ok(queue.iter(mem)?.next())
}

/// Raises the used-buffer interrupt unless the driver, through EVENT_IDX, asked not to be
/// told yet. A ring the device cannot read is answered with an interrupt: better one too
/// many than a driver waiting forever.
fn notify(active: &mut ActiveQueue) {
    if active.queue.needs_notification(&active.mem).unwrap_or(true) {
        active.interrupt.trigger(VirtioInterruptType::Queue(0));
    }
}

/// What a request runs against.
struct Backend<'a> {
    file: &'a File,
    config: &'a BlockConfig,
    capacity: u64,
    engine: Option<&'a mut AsyncEngine>,
    metrics: &'a DriveMetrics,
}

/// Whether a request finished now or went to the io_uring.
enum Outcome {
    /// Finished; this many bytes were written into guest buffers.
    Done(u32),
    /// In flight; it completes through `process_completions`.
    Submitted,
}

fn count_success(metrics: &DriveMetrics, kind: RequestType, bytes: u64) {
    match kind {
        RequestType::In => {
            metrics.inc(|m| &m.read_count);
            metrics.add(|m| &m.read_bytes, bytes);
        }
        RequestType::Out => {
            metrics.inc(|m| &m.write_count);
            metrics.add(|m| &m.write_bytes, bytes);
        }
        RequestType::Flush => metrics.inc(|m| &m.flush_count),
        _ => {}
    }
}

/// Carries out one chain, or hands it to the io_uring.
fn execute(
    backend: Backend<'_>,
    mem: &GuestMemoryMmap,
    head: u16,
    descs: &[Descriptor],
) -> Outcome {
    let Backend {
        file,
        config,
        capacity,
        engine,
        metrics,
    } = backend;
    let req = match request::parse(descs, mem, capacity) {
        Ok(r) => r,
        Err(e) => {
            metrics.inc(|m| &m.invalid_reqs_count);
            crate::rate_limited_log!(log::Level::Debug, "drive {:?}: bad request: {e}", config.id);
            // Answer through the status byte if the chain has one; otherwise nothing can
            // be said to the guest, and the chain is returned with nothing written.
            return Outcome::Done(match request::status_address(descs, mem) {
                Some(addr) if mem.write_obj(VIRTIO_BLK_S_IOERR, addr).is_ok() => 1,
                _ => 0,
            });
        }
    };
    let read_only_write = req.kind == RequestType::Out && config.read_only;
    if let Some(engine) = engine
        && !read_only_write
        && matches!(
            req.kind,
            RequestType::In | RequestType::Out | RequestType::Flush
        )
    {
        let pending = PendingRequest {
            head,
            kind: req.kind,
            status: req.status,
            expected: if req.kind == RequestType::Flush {
                0
            } else {
                req.data_len
            },
        };
        let submitted = match req.kind {
            RequestType::Flush => engine.submit_fsync(file, pending),
            _ => match guest_iovecs(mem, &req) {
                Ok(iovecs) => engine.submit_rw(
                    file,
                    req.kind == RequestType::Out,
                    req.sector * SECTOR_SIZE,
                    iovecs,
                    pending,
                ),
                Err(e) => {
                    let (status, _) = io_failed(config, metrics, "request", e);
                    return Outcome::Done(write_status(mem, &req, status, 0));
                }
            },
        };
        return match submitted {
            Ok(()) => Outcome::Submitted,
            Err(e) => {
                let (status, _) = io_failed(
                    config,
                    metrics,
                    "submission",
                    std::io::Error::other(e.to_string()),
                );
                Outcome::Done(write_status(mem, &req, status, 0))
            }
        };
    }
    let (status, data_written) = match req.kind {
        RequestType::In => match transfer(file, mem, &req, Direction::Read) {
            Ok(()) => {
                count_success(metrics, req.kind, req.data_len);
                (VIRTIO_BLK_S_OK, req.data_len as u32)
            }
            Err(e) => io_failed(config, metrics, "read", e),
        },
        RequestType::Out if config.read_only => {
            metrics.inc(|m| &m.invalid_reqs_count);
            (VIRTIO_BLK_S_IOERR, 0)
        }
        RequestType::Out => match transfer(file, mem, &req, Direction::Write) {
            Ok(()) => {
                count_success(metrics, req.kind, req.data_len);
                (VIRTIO_BLK_S_OK, 0)
            }
            Err(e) => io_failed(config, metrics, "write", e),
        },
        RequestType::Flush => match file.sync_all() {
            Ok(()) => {
                count_success(metrics, req.kind, 0);
                (VIRTIO_BLK_S_OK, 0)
            }
            Err(e) => io_failed(config, metrics, "flush", e),
        },
        RequestType::GetId => {
            let mut id = [0u8; ID_BYTES];
            let n = config.id.len().min(ID_BYTES);
            id[..n].copy_from_slice(&config.id.as_bytes()[..n]);
            let mut written = 0u32;
            let mut rest = &id[..];
            for (addr, len) in &req.data {
                let take = rest.len().min(*len as usize);
                if mem.write_slice(&rest[..take], *addr).is_err() {
                    break;
                }
                written += take as u32;
                rest = &rest[take..];
            }
            (VIRTIO_BLK_S_OK, written)
        }
        RequestType::Unsupported(t) => {
            metrics.inc(|m| &m.invalid_reqs_count);
            crate::rate_limited_log!(
                log::Level::Debug,
                "drive {:?}: unsupported request type {t}",
                config.id
            );
            (VIRTIO_BLK_S_UNSUPP, 0)
        }
    };
    Outcome::Done(write_status(mem, &req, status, data_written))
}

/// Writes the status byte; returns the used length (data written plus the status byte, if
/// it could be written).
fn write_status(mem: &GuestMemoryMmap, req: &Request, status: u8, data_written: u32) -> u32 {
    match mem.write_obj(status, req.status) {
        Ok(()) => data_written + 1,
        Err(_) => data_written,
    }
}

fn io_failed(
    config: &BlockConfig,
    metrics: &DriveMetrics,
    what: &str,
    e: std::io::Error,
) -> (u8, u32) {
    metrics.inc(|m| &m.io_errors);
    crate::rate_limited_log!(
        log::Level::Warn,
        "drive {:?}: {what} failed: {e}",
        config.id
    );
    (VIRTIO_BLK_S_IOERR, 0)
}

#[derive(Clone, Copy)]
enum Direction {
    Read,
    Write,
}

/// One `preadv`/`pwritev` between the file and every data buffer of the request, repeated
/// for short transfers.
/// One positional read or write into (or from) `iovecs` at `offset`; returns what the
/// system call returned. A single buffer, the common case, uses `pread`/`pwrite`, which
/// measured a little cheaper than the vectored calls.
///
/// # Safety
/// Every iovec must describe memory that is valid for the whole call.
unsafe fn positional_io(file: &File, iovecs: &[libc::iovec], offset: u64, dir: Direction) -> isize {
    let fd = file.as_raw_fd();
    let off = offset as libc::off_t;
    let count = iovecs.len().min(libc::UIO_MAXIOV as usize) as i32;
    // SAFETY: upheld by the caller.
    unsafe {
        match (dir, iovecs) {
            (Direction::Read, [one]) => libc::pread(fd, one.iov_base, one.iov_len, off),
            (Direction::Write, [one]) => libc::pwrite(fd, one.iov_base, one.iov_len, off),
            (Direction::Read, _) => libc::preadv(fd, iovecs.as_ptr(), count, off),
            (Direction::Write, _) => libc::pwritev(fd, iovecs.as_ptr(), count, off),
        }
    }
}

/// Host addresses of a request's data buffers, checked to lie in guest memory.
fn guest_iovecs(mem: &GuestMemoryMmap, req: &Request) -> std::io::Result<Vec<libc::iovec>> {
    let mut iovecs = Vec::with_capacity(req.data.len());
    for (addr, len) in &req.data {
        let slice = mem
            .get_slice(*addr, *len as usize)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EFAULT))?;
        if req.kind == RequestType::In {
            // The host kernel fills it behind vm-memory's back: a diff snapshot must still
            // know these pages changed.
            vm_memory::bitmap::Bitmap::mark_dirty(slice.bitmap(), 0, *len as usize);
        }
        iovecs.push(libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: *len as usize,
        });
    }
    Ok(iovecs)
}

fn transfer(
    file: &File,
    mem: &GuestMemoryMmap,
    req: &Request,
    dir: Direction,
) -> std::io::Result<()> {
    let mut iovecs = guest_iovecs(mem, req)?;
    let mut offset = req.sector * SECTOR_SIZE;
    let mut remaining: &mut [libc::iovec] = &mut iovecs;
    while !remaining.is_empty() {
        // SAFETY: every iovec points into guest memory checked above to hold its length,
        // and the mapping outlives the call.
        let n = unsafe { positional_io(file, remaining, offset, dir) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            // The file shrank under the guest.
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        }
        offset += n as u64;
        let mut n = n as usize;
        while let Some(first) = remaining.first_mut() {
            if n < first.iov_len {
                // SAFETY: advancing within the same buffer.
                first.iov_base = unsafe { first.iov_base.cast::<u8>().add(n).cast() };
                first.iov_len -= n;
                break;
            }
            n -= first.iov_len;
            remaining = &mut remaining[1..];
        }
    }
    Ok(())
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX);
        if self.config.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        if self.config.flush {
            f |= 1 << VIRTIO_BLK_F_FLUSH;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn metrics(&self) -> Option<(&'static str, Arc<dyn Group>)> {
        Some(("block", self.metrics.group()))
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The block configuration the device offers is read-only.
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        mut queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let mut queue = queues.pop().ok_or(ActivateError::BadQueue(0))?;
        if !queue.ready() {
            return Err(ActivateError::BadQueue(0));
        }
        // With EVENT_IDX the driver says when it wants an interrupt, which saves most of
        // them under load.
        queue.set_event_idx(features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        self.active = Some(ActiveQueue {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        // Requests in flight finish into the old rings before they are forgotten.
        self.finish_in_flight();
        self.active = None;
        self.needs_reset = false;
    }

    fn needs_reset(&self) -> bool {
        self.needs_reset
    }

    fn rate_limiter_states(&self) -> Vec<crate::rate_limiter::RateLimiterState> {
        vec![self.limiter.save_state()]
    }

    fn restore_rate_limiters(&mut self, saved: &[crate::rate_limiter::RateLimiterState]) {
        if let Some(s) = saved.first() {
            self.limiter.restore_state(s);
        }
    }

    fn saved_queues(&self) -> Vec<virtio_queue::QueueState> {
        // After quiesce nothing is in flight: every request taken has been answered.
        self.active
            .as_ref()
            .map(|a| vec![a.queue.state()])
            .unwrap_or_default()
    }

    fn config_generation(&self) -> u32 {
        self.generation
    }

    fn process_queue(&mut self, _index: usize) {
        Block::process_queue(self);
    }

    fn stop_queue(&mut self, _index: usize) {
        // The device has one queue: stopping it is a reset of the queue side.
        self.finish_in_flight();
        self.active = None;
    }

    fn event_sources(&self) -> Vec<(RawFd, EventSet)> {
        let mut v = vec![(self.limiter.as_raw_fd(), EventSet::IN)];
        if let Some(engine) = &self.engine {
            v.push((engine.eventfd().as_raw_fd(), EventSet::IN));
        }
        v
    }

    fn process_event(&mut self, fd: RawFd, _events: EventSet) {
        if fd == self.limiter.as_raw_fd() {
            self.process_limiter_event();
        } else if self
            .engine
            .as_ref()
            .is_some_and(|e| fd == e.eventfd().as_raw_fd())
        {
            self.process_completions();
        }
    }

    fn quiesce(&mut self) {
        self.finish_in_flight();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_virtq_driver::{Desc, QueueDriver, VRING_DESC_F_NEXT};
    use request::*;
    use std::io::Write;
    use vm_memory::GuestAddress;

    const HDR: u64 = 0x10_000;

    /// An interrupt the test can watch: each trigger writes the eventfd.
    struct EventFdInterrupt(EventFd);

    impl VirtioInterrupt for EventFdInterrupt {
        fn trigger(&self, _kind: VirtioInterruptType) {
            self.0.write(1).unwrap();
        }
    }
    const DATA: u64 = 0x20_000;
    const STATUS: u64 = 0x30_000;
    const SECTORS: u64 = 16;

    struct Rig {
        mem: GuestMemoryMmap,
        driver: QueueDriver,
        block: Block,
        irq: EventFd,
        path: std::path::PathBuf,
    }

    fn disk_byte(i: u64) -> u8 {
        (i * 7 % 251) as u8
    }

    fn rig(name: &str, read_only: bool) -> Rig {
        rig_with(name, read_only, false)
    }

    fn rig_with(name: &str, read_only: bool, async_io: bool) -> Rig {
        let path = std::env::temp_dir().join(format!("ember-blk-{}-{name}", std::process::id()));
        let mut f = File::create(&path).unwrap();
        let contents: Vec<u8> = (0..SECTORS * SECTOR_SIZE).map(disk_byte).collect();
        f.write_all(&contents).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let driver = QueueDriver::new(&mem, 0, 16);
        let mut block = Block::new(BlockConfig {
            id: "data_disk".into(),
            path: path.display().to_string(),
            read_only,
            flush: true,
            async_io,
            rate_limiter: None,
        })
        .unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        block
            .activate(
                mem.clone(),
                0,
                vec![driver.device_queue()],
                Arc::new(EventFdInterrupt(irq.try_clone().unwrap())),
            )
            .unwrap();
        Rig {
            mem,
            driver,
            block,
            irq,
            path,
        }
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    impl Rig {
        /// Puts a request (header, data descriptors, status) in the ring without running
        /// the device; returns its head index.
        fn queue_request(&mut self, kind: u32, sector: u64, data: &[Desc]) -> u16 {
            self.mem.write_obj(kind, GuestAddress(HDR)).unwrap();
            self.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let header = Desc {
                addr: HDR,
                len: 16,
                write: false,
            };
            let status = Desc {
                addr: STATUS,
                len: 1,
                write: true,
            };
            let mut chain = vec![header];
            chain.extend_from_slice(data);
            chain.push(status);
            self.driver.add_chain(&self.mem, &chain)
        }

        /// Submits header + data descriptors + status; returns (used len, status byte).
        fn submit(&mut self, kind: u32, sector: u64, data: &[Desc]) -> (u32, u8) {
            let head = self.queue_request(kind, sector, data);
            self.block.process_queue();
            self.wait_async();
            let used = self.driver.take_used(&self.mem);
            assert_eq!(used.len(), 1, "one chain returned");
            assert_eq!(used[0].0, u32::from(head));
            (used[0].1, self.mem.read_obj(GuestAddress(STATUS)).unwrap())
        }

        /// With the io_uring engine, waits until nothing is in flight.
        fn wait_async(&mut self) {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while self
                .block
                .engine
                .as_ref()
                .is_some_and(|e| e.in_flight() > 0)
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "io_uring request never completed"
                );
                std::thread::sleep(std::time::Duration::from_micros(200));
                self.block.process_completions();
            }
        }

        fn file(&self) -> Vec<u8> {
            std::fs::read(&self.path).unwrap()
        }
    }

    fn data(len: u32, write: bool) -> Desc {
        Desc {
            addr: DATA,
            len,
            write,
        }
    }

    #[test]
    fn read_write_flush_and_get_id() {
        check_read_write_flush_and_get_id(rig("rw", false));
    }

    #[test]
    fn async_engine_read_write_flush_and_get_id() {
        let r = rig_with("rw-async", false, true);
        if !r.block.is_async() {
            eprintln!("skipped: io_uring is not available on this host");
            return;
        }
        check_read_write_flush_and_get_id(r);
    }

    #[test]
    fn async_engine_read_only_bounds_and_reset_drain() {
        let mut r = rig_with("ro-async", true, true);
        if !r.block.is_async() {
            eprintln!("skipped: io_uring is not available on this host");
            return;
        }
        assert_eq!(
            r.submit(VIRTIO_BLK_T_OUT, 1, &[data(512, false)]).1,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            r.submit(VIRTIO_BLK_T_IN, SECTORS, &[data(512, true)]).1,
            VIRTIO_BLK_S_IOERR
        );
        // A request in flight when the driver resets still completes into its ring.
        r.queue_request(VIRTIO_BLK_T_IN, 0, &[data(512, true)]);
        r.block.process_queue();
        r.block.reset();
        assert_eq!(r.block.engine.as_ref().map(AsyncEngine::in_flight), Some(0));
        assert_eq!(r.driver.take_used(&r.mem).len(), 1);
    }

    fn check_read_write_flush_and_get_id(mut r: Rig) {
        assert_eq!(r.block.capacity(), SECTORS);
        let (used, status) = r.submit(VIRTIO_BLK_T_IN, 2, &[data(1024, true)]);
        assert_eq!((used, status), (1025, VIRTIO_BLK_S_OK));
        let mut got = vec![0u8; 1024];
        r.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        let want: Vec<u8> = (1024..2048).map(disk_byte).collect();
        assert_eq!(got, want);
        assert!(r.irq.read().unwrap() >= 1, "interrupt raised");

        // Two data buffers in one request land contiguously on disk.
        r.mem.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
        r.mem
            .write_slice(&[0xbb; 512], GuestAddress(DATA + 0x1000))
            .unwrap();
        let (used, status) = r.submit(
            VIRTIO_BLK_T_OUT,
            5,
            &[
                data(512, false),
                Desc {
                    addr: DATA + 0x1000,
                    len: 512,
                    write: false,
                },
            ],
        );
        assert_eq!((used, status), (1, VIRTIO_BLK_S_OK));
        let f = r.file();
        assert!(f[5 * 512..6 * 512].iter().all(|&b| b == 0xaa));
        assert!(f[6 * 512..7 * 512].iter().all(|&b| b == 0xbb));
        assert_eq!(f[7 * 512], disk_byte(7 * 512), "neighbour untouched");

        assert_eq!(r.submit(VIRTIO_BLK_T_FLUSH, 0, &[]), (1, VIRTIO_BLK_S_OK));
        let (used, status) = r.submit(VIRTIO_BLK_T_GET_ID, 0, &[data(20, true)]);
        assert_eq!((used, status), (21, VIRTIO_BLK_S_OK));
        let mut id = [0u8; 20];
        r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..9], b"data_disk");
        assert_eq!(id[9..], [0; 11]);
        assert_eq!(r.submit(42, 0, &[]), (1, VIRTIO_BLK_S_UNSUPP));
    }

    #[test]
    fn read_only_and_bounds() {
        let mut r = rig("ro", true);
        assert_ne!(r.block.device_features() & (1 << VIRTIO_BLK_F_RO), 0);
        let before = r.file();
        assert_eq!(
            r.submit(VIRTIO_BLK_T_OUT, 1, &[data(512, false)]).1,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(r.file(), before, "read-only disk unchanged");
        assert_eq!(
            r.submit(VIRTIO_BLK_T_IN, SECTORS, &[data(512, true)]).1,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            r.submit(VIRTIO_BLK_T_IN, SECTORS - 1, &[data(1024, true)])
                .1,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            r.submit(VIRTIO_BLK_T_IN, SECTORS - 1, &[data(512, true)]).1,
            VIRTIO_BLK_S_OK
        );
    }

    #[test]
    fn hostile_chains_answered_without_harm() {
        let mut r = rig("hostile", false);
        let before = r.file();
        // Not a multiple of 512, outside memory, wrong direction.
        assert_eq!(
            r.submit(VIRTIO_BLK_T_IN, 0, &[data(100, true)]).1,
            VIRTIO_BLK_S_IOERR
        );
        let outside = Desc {
            addr: (1 << 20) - 256,
            len: 512,
            write: true,
        };
        assert_eq!(
            r.submit(VIRTIO_BLK_T_IN, 0, &[outside]).1,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            r.submit(VIRTIO_BLK_T_OUT, 0, &[data(512, true)]).1,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(r.file(), before);

        // A read-only status descriptor: nothing can be written back, the chain still returns.
        let head = r.driver.add_chain(
            &r.mem,
            &[
                Desc {
                    addr: HDR,
                    len: 16,
                    write: false,
                },
                Desc {
                    addr: STATUS,
                    len: 1,
                    write: false,
                },
            ],
        );
        r.block.process_queue();
        assert_eq!(r.driver.take_used(&r.mem), vec![(u32::from(head), 0)]);

        // A descriptor that points at itself: the chain ends at the queue size, no hang.
        r.driver.write_raw(
            &r.mem,
            3,
            Desc {
                addr: HDR,
                len: 16,
                write: false,
            },
            VRING_DESC_F_NEXT,
            3,
        );
        r.driver.publish(&r.mem, 3);
        r.block.process_queue();
        assert_eq!(r.driver.take_used(&r.mem).len(), 1);
        // The device keeps working afterwards.
        assert_eq!(
            r.submit(VIRTIO_BLK_T_IN, 0, &[data(512, true)]).1,
            VIRTIO_BLK_S_OK
        );
    }

    #[test]
    fn event_idx_suppresses_interrupts_the_driver_did_not_ask_for() {
        let mut r = rig("event-idx", false);
        let queue = r.driver.device_queue();
        r.block
            .activate(
                r.mem.clone(),
                (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX),
                vec![queue],
                Arc::new(EventFdInterrupt(r.irq.try_clone().unwrap())),
            )
            .unwrap();
        // "Interrupt me once the used index passes 100": the first completion is silent.
        r.driver.set_used_event(&r.mem, 100);
        assert_eq!(
            r.submit(VIRTIO_BLK_T_IN, 0, &[data(512, true)]).1,
            VIRTIO_BLK_S_OK
        );
        assert!(
            r.irq.read().is_err(),
            "interrupt raised against the driver's wish"
        );
        // "Once it passes 1": the second completion (index 1 -> 2) interrupts.
        r.driver.set_used_event(&r.mem, 1);
        assert_eq!(
            r.submit(VIRTIO_BLK_T_IN, 0, &[data(512, true)]).1,
            VIRTIO_BLK_S_OK
        );
        assert_eq!(r.irq.read().unwrap(), 1);
    }

    #[test]
    fn indirect_descriptor_table() {
        let mut r = rig("indirect", false);
        // The chain lives in a table at 0x40000; the ring holds one indirect descriptor.
        let table = QueueDriver::new(&r.mem, 0x40_000, 4);
        r.mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(HDR)).unwrap();
        r.mem.write_obj(1u64, GuestAddress(HDR + 8)).unwrap();
        table.write_raw(
            &r.mem,
            0,
            Desc {
                addr: HDR,
                len: 16,
                write: false,
            },
            VRING_DESC_F_NEXT,
            1,
        );
        table.write_raw(&r.mem, 1, data(512, true), VRING_DESC_F_NEXT, 2);
        table.write_raw(
            &r.mem,
            2,
            Desc {
                addr: STATUS,
                len: 1,
                write: true,
            },
            0,
            0,
        );
        r.driver.write_raw(
            &r.mem,
            0,
            Desc {
                addr: 0x40_000,
                len: 48,
                write: false,
            },
            4,
            0,
        );
        r.driver.publish(&r.mem, 0);
        r.block.process_queue();
        assert_eq!(r.driver.take_used(&r.mem), vec![(0, 513)]);
        assert_eq!(
            r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            VIRTIO_BLK_S_OK
        );
        let mut got = [0u8; 512];
        r.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got[0], disk_byte(512));
    }

    #[test]
    fn broken_available_ring_does_not_hang_the_device() {
        let mut r = rig("broken-avail", false);
        // An available index far beyond what the queue can hold.
        r.mem.write_obj(1000u16, GuestAddress(0x1000 + 2)).unwrap();
        let start = std::time::Instant::now();
        r.block.process_queue();
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
        assert!(r.driver.take_used(&r.mem).is_empty());
    }

    /// An interrupt that remembers why it was raised.
    #[derive(Default)]
    struct RecordingInterrupt(std::sync::Mutex<Vec<VirtioInterruptType>>);

    impl VirtioInterrupt for RecordingInterrupt {
        fn trigger(&self, kind: VirtioInterruptType) {
            self.0.lock().unwrap().push(kind);
        }
    }

    impl RecordingInterrupt {
        fn take(&self) -> Vec<VirtioInterruptType> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    /// Activates the rig's device again on fresh rings, with an interrupt the test reads.
    fn activate_recording(r: &mut Rig) -> Arc<RecordingInterrupt> {
        r.driver = QueueDriver::new(&r.mem, 0, 16);
        let irq = Arc::new(RecordingInterrupt::default());
        r.block
            .activate(
                r.mem.clone(),
                1 << VIRTIO_F_VERSION_1,
                vec![r.driver.device_queue()],
                irq.clone(),
            )
            .unwrap();
        irq
    }

    /// A guest that breaks its queue and keeps notifying costs one count, one log line and
    /// one configuration interrupt, not one per notification: the device leaves the queue
    /// alone and asks for a reset (DEVICE_NEEDS_RESET), and works again after one.
    #[test]
    fn broken_queue_is_left_alone_until_reset() {
        let mut r = rig("needs-reset", false);
        r.block.reset();
        let irq = activate_recording(&mut r);
        // A good request first: the device works.
        assert_eq!(
            r.submit(VIRTIO_BLK_T_IN, 0, &[data(512, true)]).1,
            VIRTIO_BLK_S_OK
        );
        assert_eq!(irq.take(), vec![VirtioInterruptType::Queue(0)]);
        assert!(!r.block.needs_reset());

        // 16 + 7 entries ahead of what the device has taken: more than the ring holds.
        r.mem
            .write_obj(1u16 + 16 + 7, GuestAddress(0x1000 + 2))
            .unwrap();
        r.block.process_queue();
        assert!(r.block.needs_reset(), "the device must ask for a reset");
        assert_eq!(r.block.metrics.own().queue_broken.total(), 1);
        assert_eq!(
            irq.take(),
            vec![VirtioInterruptType::Config],
            "one configuration change interrupt"
        );

        // The guest makes the ring sane again with one real request (available index 2):
        // the device must not look at the queue any more, however often it is notified.
        r.queue_request(VIRTIO_BLK_T_IN, 0, &[data(512, true)]);
        for _ in 0..1000 {
            r.block.process_queue();
        }
        assert!(
            r.driver.take_used(&r.mem).is_empty(),
            "a queue awaiting reset was processed"
        );
        assert_eq!(
            r.block.metrics.own().queue_broken.total(),
            1,
            "counted (and logged) again"
        );
        assert!(irq.take().is_empty(), "interrupt raised again");
        assert!(r.block.needs_reset());

        // Reset and set up again: the device works.
        r.block.reset();
        assert!(!r.block.needs_reset());
        let irq = activate_recording(&mut r);
        assert_eq!(
            r.submit(VIRTIO_BLK_T_IN, 1, &[data(512, true)]).1,
            VIRTIO_BLK_S_OK
        );
        let mut got = [0u8; 512];
        r.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got[0], disk_byte(512));
        assert_eq!(irq.take(), vec![VirtioInterruptType::Queue(0)]);
        assert_eq!(r.block.metrics.own().queue_broken.total(), 1);
    }

    #[test]
    fn host_io_error_becomes_ioerr() {
        let mut r = rig("eio", false);
        // Swap the backing file for a read-only handle: the host write fails.
        r.block.file = File::open(&r.path).unwrap();
        assert_eq!(
            r.submit(VIRTIO_BLK_T_OUT, 0, &[data(512, false)]).1,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            r.submit(VIRTIO_BLK_T_IN, 0, &[data(512, true)]).1,
            VIRTIO_BLK_S_OK
        );
    }

    #[test]
    fn rate_limiter_holds_requests_until_tokens_return() {
        let mut r = rig("limited", false);
        // One operation per 30 ms, no burst.
        r.block.update_rate_limiter(&RateLimiterConfig {
            bandwidth: None,
            ops: Some(crate::config::rate_limiter::TokenBucketConfig {
                size: 1,
                one_time_burst: None,
                refill_time: 30,
            }),
        });
        assert_eq!(
            r.submit(VIRTIO_BLK_T_IN, 0, &[data(512, true)]).1,
            VIRTIO_BLK_S_OK
        );
        // The next request waits in the ring: nothing returned, the limiter's timer armed.
        r.queue_request(VIRTIO_BLK_T_IN, 0, &[data(512, true)]);
        r.block.process_queue();
        assert!(
            r.driver.take_used(&r.mem).is_empty(),
            "throttled request returned early"
        );
        // When the timer fires the request goes through.
        let mut fds = [libc::pollfd {
            fd: r.block.limiter_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: polling one valid descriptor.
        assert_eq!(
            unsafe { libc::poll(fds.as_mut_ptr(), 1, 2000) },
            1,
            "limiter timer never fired"
        );
        r.block.process_limiter_event();
        assert_eq!(r.driver.take_used(&r.mem).len(), 1);
    }

    /// The bandwidth limit holds over real time: 96 KiB of reads through a 16 KiB bucket
    /// refilled every 50 ms must take at least the 250 ms of refill the 80 KiB beyond the
    /// first bucket need, and not much longer.
    #[test]
    fn bandwidth_limit_holds_over_time() {
        let mut r = rig("bandwidth", false);
        r.block.update_rate_limiter(&RateLimiterConfig {
            bandwidth: Some(crate::config::rate_limiter::TokenBucketConfig {
                size: 16 * 1024,
                one_time_burst: None,
                refill_time: 50,
            }),
            ops: None,
        });
        const REQUESTS: usize = 24;
        const IN_RING: usize = 4; // 3 descriptors each in a 16-entry table
        let started = std::time::Instant::now();
        let (mut queued, mut done) = (0usize, 0usize);
        while done < REQUESTS {
            while queued - done < IN_RING && queued < REQUESTS {
                r.queue_request(VIRTIO_BLK_T_IN, 0, &[data(4096, true)]);
                queued += 1;
            }
            r.block.process_queue();
            let used = r.driver.take_used(&r.mem);
            assert!(used.iter().all(|&(_, len)| len == 4097), "{used:?}");
            done += used.len();
            if used.is_empty() {
                // Throttled: the limiter's timer says when tokens are back.
                let mut fds = [libc::pollfd {
                    fd: r.block.limiter_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                }];
                // SAFETY: polling one valid descriptor.
                let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, 2000) };
                assert_eq!(
                    ready, 1,
                    "throttled with no timer armed after {done} requests"
                );
                r.block.process_limiter_event();
                done += r.driver.take_used(&r.mem).len();
            }
        }
        let took = started.elapsed();
        assert!(
            took >= std::time::Duration::from_millis(240),
            "96 KiB went through a 16 KiB/50 ms limit in {took:?}"
        );
        assert!(
            took <= std::time::Duration::from_secs(3),
            "the limited drive stalled: {took:?}"
        );
    }

    #[test]
    fn swap_backing_changes_capacity_and_notifies() {
        let mut r = rig("swap", false);
        let other = r.path.with_extension("other");
        std::fs::write(&other, vec![0x77u8; 4 * 512]).unwrap();
        let _ = r.irq.read();
        r.block.swap_backing(other.to_str().unwrap()).unwrap();
        assert_eq!(r.block.capacity(), 4);
        let mut cap = [0u8; 8];
        r.block.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 4);
        assert_eq!(r.block.config_generation(), 1);
        assert_eq!(r.irq.read().unwrap(), 1, "config-change interrupt");
        let (_, status) = r.submit(VIRTIO_BLK_T_IN, 3, &[data(512, true)]);
        assert_eq!(status, VIRTIO_BLK_S_OK);
        let mut got = [0u8; 512];
        r.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert!(got.iter().all(|&b| b == 0x77));
        assert!(r.block.swap_backing("/nonexistent/disk").is_err());
        assert_eq!(r.block.capacity(), 4, "a failed swap keeps the old file");
        std::fs::remove_file(other).unwrap();
    }

    #[test]
    fn inactive_or_reset_device_ignores_notifications() {
        let mut r = rig("reset", false);
        r.block.reset();
        r.driver.add_chain(
            &r.mem,
            &[Desc {
                addr: HDR,
                len: 16,
                write: false,
            }],
        );
        r.block.process_queue();
        assert!(r.driver.take_used(&r.mem).is_empty());
    }
}
