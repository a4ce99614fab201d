//! One split virtqueue (virtio 1.2, 2.7) in the probe's own memory, with one request in flight at
//! a time: the driver writes a descriptor chain, publishes its head in the available ring,
//! and polls the used ring until the device returns it.
//!
//! The rings are shared with the device, so nothing read from them is trusted: a used index
//! that runs ahead of what was submitted or an unknown chain id ends the queue's use instead
//! of being followed.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{AtomicU16, Ordering, fence};

use crate::line::Detail;
use crate::timeout::Deadline;
use crate::virtio;

/// The probe never has more than one 3-descriptor chain in flight; 16 entries are plenty.
pub const MAX_SIZE: u16 = 16;
const DESC_F_NEXT: u16 = 1;
pub(crate) const DESC_F_WRITE: u16 = 2;
/// In the used ring's flags: the device asks not to be notified (virtio 1.2, "Available Buffer
/// Notification Suppression").
pub(crate) const USED_F_NO_NOTIFY: u16 = 1;
/// How long a device may take for one request: about 1.5-8 s, generous for a loaded host.
const REQUEST_TICKS: u64 = 1 << 33;

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Desc {
    pub(crate) addr: u64,
    pub(crate) len: u32,
    pub(crate) flags: u16,
    pub(crate) next: u16,
}

/// The driver area. `used_event` would follow the ring; without VIRTIO_F_EVENT_IDX it is
/// unused, and for a queue smaller than MAX_SIZE it falls inside `ring` anyway.
#[repr(C)]
pub(crate) struct Avail {
    pub(crate) flags: u16,
    pub(crate) idx: u16,
    pub(crate) ring: [u16; MAX_SIZE as usize],
    pub(crate) used_event: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct UsedElem {
    pub(crate) id: u32,
    pub(crate) len: u32,
}

/// The device area (4-byte aligned through `UsedElem`).
#[repr(C)]
pub(crate) struct Used {
    pub(crate) flags: u16,
    pub(crate) idx: u16,
    pub(crate) ring: [UsedElem; MAX_SIZE as usize],
    pub(crate) avail_event: u16,
}

/// All three areas in one page: the descriptor table first (16-byte alignment), the driver
/// area (2) and device area (4) after it.
#[repr(C, align(4096))]
pub(crate) struct Rings {
    pub(crate) desc: [Desc; MAX_SIZE as usize],
    pub(crate) avail: Avail,
    pub(crate) used: Used,
}

/// One set of rings per device: a device keeps its queue after the probe is done with it
/// (the probe does not reset it, see `blkcheck::run`), so no two devices may share rings.
pub const MAX_QUEUES: usize = virtio::MAX_DEVICES;

pub(crate) const EMPTY: Rings = Rings {
    desc: [Desc {
        addr: 0,
        len: 0,
        flags: 0,
        next: 0,
    }; MAX_SIZE as usize],
    avail: Avail {
        flags: 0,
        idx: 0,
        ring: [0; MAX_SIZE as usize],
        used_event: 0,
    },
    used: Used {
        flags: 0,
        idx: 0,
        ring: [UsedElem { id: 0, len: 0 }; MAX_SIZE as usize],
        avail_event: 0,
    },
};

// In a NOLOAD section that _start does not zero: `Virtq::new` zeroes the rings it takes.
#[unsafe(link_section = ".dma")]
static mut RINGS: [Rings; MAX_QUEUES] = [EMPTY; MAX_QUEUES];

/// One buffer of a request: guest-physical address, length, and who writes it.
pub struct Buffer {
    pub addr: u64,
    pub len: u32,
    pub device_writes: bool,
}

pub enum QueueError {
    /// The used ring did not advance in time.
    Timeout,
    /// The used index moved by more than the one chain in flight.
    UsedIdxJump(u16),
    /// The used element names a chain that was not submitted: (id, queue size).
    UsedId(u32, u16),
}

impl QueueError {
    pub fn describe(&self, d: &mut Detail) {
        match *self {
            QueueError::Timeout => d.str(b"timeout"),
            QueueError::UsedIdxJump(by) => d.str(b"used idx jumped by ").dec(u64::from(by)),
            QueueError::UsedId(id, size) => {
                d.str(b"used id=").dec(u64::from(id));
                d.str(if id >= u32::from(size) {
                    b" out of range".as_slice()
                } else {
                    b" not submitted"
                })
            }
        };
    }
}

pub struct Virtq {
    rings: *mut Rings,
    size: u16,
    /// Our copy of the available index: the device may write the shared one.
    next_avail: u16,
    /// The used index up to which the driver has consumed the used ring.
    last_used: u16,
}

impl Virtq {
    /// Zeroes ring set `slot` (below MAX_QUEUES; one per device) and takes `size` entries of
    /// it, a power of 2 of at most MAX_SIZE.
    pub fn new(slot: usize, size: u16) -> Self {
        // SAFETY: the probe is single-threaded and no device has these rings yet (each device
        // gets its own slot); indexing is bounds-checked and creates no reference.
        let rings = unsafe { &raw mut RINGS[slot] };
        // SAFETY: as above.
        unsafe { core::ptr::write_bytes(rings, 0, 1) };
        Virtq {
            rings,
            size,
            next_avail: 0,
            last_used: 0,
        }
    }

    /// Guest-physical addresses of the descriptor table, driver area and device area
    /// (physical = virtual in the identity map).
    pub fn areas(&self) -> (u64, u64, u64) {
        let rings = self.rings;
        // SAFETY: only addresses are taken.
        unsafe {
            (
                (&raw const (*rings).desc) as u64,
                (&raw const (*rings).avail) as u64,
                (&raw const (*rings).used) as u64,
            )
        }
    }

    /// Writes `chain` as descriptors 0.. and makes it available. Returns whether the device
    /// wants a notification. `chain` has at most MAX_SIZE buffers (the caller's are 2 or 3).
    pub fn submit(&mut self, chain: &[Buffer]) -> bool {
        let rings = self.rings;
        // SAFETY: the device does not own descriptors between requests (the last one came
        // back through the used ring), and the indices are below MAX_SIZE.
        unsafe {
            for (i, buffer) in chain.iter().enumerate() {
                let last = i + 1 == chain.len();
                let mut flags = if last { 0 } else { DESC_F_NEXT };
                if buffer.device_writes {
                    flags |= DESC_F_WRITE;
                }
                let desc = Desc {
                    addr: buffer.addr,
                    len: buffer.len,
                    flags,
                    next: if last { 0 } else { i as u16 + 1 },
                };
                write_volatile(&raw mut (*rings).desc[i], desc);
            }
            let slot = usize::from(self.next_avail % self.size);
            write_volatile(&raw mut (*rings).avail.ring[slot], 0);
            self.next_avail = self.next_avail.wrapping_add(1);
            // Release: the device must see the chain (and the data buffers) before the index.
            AtomicU16::from_ptr(&raw mut (*rings).avail.idx)
                .store(self.next_avail, Ordering::Release);
            // The index store must be visible before the flags are read, or the device could
            // miss the chain after asking for no notification (a store-load fence; without
            // SSE2 it is a locked `or`, which the instruction emulator also runs).
            fence(Ordering::SeqCst);
            read_volatile(&raw const (*rings).used.flags) & USED_F_NO_NOTIFY == 0
        }
    }

    /// Polls the used ring until the device returns the chain submitted last. The used
    /// length is ignored, as Linux does: devices have long set it loosely (see the block
    /// device's legacy notes in virtio 1.2).
    pub fn wait_used(&mut self) -> Result<(), QueueError> {
        let rings = self.rings;
        let mut deadline = Deadline::after(REQUEST_TICKS);
        // SAFETY: the used ring is ours to read; atomics through a raw pointer to aligned u16.
        let idx = unsafe { AtomicU16::from_ptr(&raw mut (*rings).used.idx) };
        loop {
            // Acquire: the used element and the data are read only after the index.
            let advanced = idx.load(Ordering::Acquire).wrapping_sub(self.last_used);
            match advanced {
                0 if deadline.expired() => return Err(QueueError::Timeout),
                0 => {}
                1 => break,
                _ => return Err(QueueError::UsedIdxJump(advanced)),
            }
        }
        let slot = usize::from(self.last_used % self.size);
        self.last_used = self.last_used.wrapping_add(1);
        // SAFETY: slot < size <= MAX_SIZE.
        let id = unsafe { read_volatile(&raw const (*rings).used.ring[slot].id) };
        // The chain always starts at descriptor 0.
        if id != 0 {
            return Err(QueueError::UsedId(id, self.size));
        }
        Ok(())
    }
}
