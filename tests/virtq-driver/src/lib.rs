//! The driver side of a split virtqueue, for exercising ember's device models without a
//! guest: unit tests, the block benchmark and the fuzz targets put descriptor chains into
//! guest memory the way a guest driver would and read the used ring back. A crate of its
//! own so none of it is in ember's library.

use std::sync::atomic::{Ordering, fence};

use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

pub const VRING_DESC_F_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
pub const VRING_DESC_F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

/// One descriptor as a driver describes it: address, length, device-writable or not.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// A split queue of `size` entries laid out at `base` (descriptor table, avail ring, used
/// ring, each 4 KiB aligned).
pub struct QueueDriver {
    pub size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl QueueDriver {
    /// Where the used ring starts and how many bytes it spans (flags, idx, elements,
    /// avail_event).
    pub fn used_ring(&self) -> (u64, u64) {
        (self.used.0, 6 + 8 * u64::from(self.size))
    }
}

fn page_align(x: u64) -> u64 {
    (x + 0xfff) & !0xfff
}

impl QueueDriver {
    pub fn new<B: Bitmap>(mem: &GuestMemoryMmap<B>, base: u64, size: u16) -> Self {
        let desc = GuestAddress(base);
        let avail = GuestAddress(page_align(base + 16 * u64::from(size)));
        let used = GuestAddress(page_align(avail.0 + 6 + 2 * u64::from(size)));
        // Zeroed rings: idx 0, no flags.
        let _ = mem.write_obj(0u32, avail);
        let _ = mem.write_obj(0u32, used);
        QueueDriver {
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// The first guest address past the rings.
    pub fn end(&self) -> u64 {
        page_align(self.used.0 + 6 + 8 * u64::from(self.size))
    }

    /// A device-side queue set up the way a driver would through the transport.
    pub fn device_queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("power-of-two queue size");
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc.0 as u32), Some((self.desc.0 >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail.0 as u32), Some((self.avail.0 >> 32) as u32));
        q.set_used_ring_address(Some(self.used.0 as u32), Some((self.used.0 >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Writes a raw descriptor at table index `index` (for hostile shapes: loops, bad next).
    pub fn write_raw<B: Bitmap>(
        &self,
        mem: &GuestMemoryMmap<B>,
        index: u16,
        d: Desc,
        flags: u16,
        next: u16,
    ) {
        let at = self.desc.unchecked_add(16 * u64::from(index));
        let mut flags = flags;
        if d.write {
            flags |= VRING_DESC_F_WRITE;
        }
        let _ = mem.write_obj(d.addr, at);
        let _ = mem.write_obj(d.len, at.unchecked_add(8));
        let _ = mem.write_obj(flags, at.unchecked_add(12));
        let _ = mem.write_obj(next, at.unchecked_add(14));
    }

    /// Sets `used_event` (EVENT_IDX): the driver wants an interrupt once the used index
    /// passes this value.
    pub fn set_used_event<B: Bitmap>(&self, mem: &GuestMemoryMmap<B>, value: u16) {
        let at = self.avail.unchecked_add(4 + 2 * u64::from(self.size));
        let _ = mem.write_obj(value, at);
    }

    /// Makes `head` available to the device.
    pub fn publish<B: Bitmap>(&mut self, mem: &GuestMemoryMmap<B>, head: u16) {
        let slot = self.avail_idx % self.size;
        let _ = mem.write_obj(head, self.avail.unchecked_add(4 + 2 * u64::from(slot)));
        fence(Ordering::Release);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let _ = mem.write_obj(self.avail_idx, self.avail.unchecked_add(2));
    }

    /// Adds a chain of `descs` and makes it available; returns its head index.
    pub fn add_chain<B: Bitmap>(&mut self, mem: &GuestMemoryMmap<B>, descs: &[Desc]) -> u16 {
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let last = i + 1 == descs.len();
            let next = (index + 1) % self.size;
            self.write_raw(
                mem,
                index,
                *d,
                if last { 0 } else { VRING_DESC_F_NEXT },
                next,
            );
        }
        self.next_desc = (head + descs.len() as u16) % self.size;
        self.publish(mem, head);
        head
    }

    /// Used elements (head id, length) the device returned since the last call.
    pub fn take_used<B: Bitmap>(&mut self, mem: &GuestMemoryMmap<B>) -> Vec<(u32, u32)> {
        let idx: u16 = mem
            .read_obj(self.used.unchecked_add(2))
            .unwrap_or(self.used_seen);
        fence(Ordering::Acquire);
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = self.used_seen % self.size;
            let at = self.used.unchecked_add(4 + 8 * u64::from(slot));
            let id: u32 = mem.read_obj(at).unwrap_or(u32::MAX);
            let len: u32 = mem.read_obj(at.unchecked_add(4)).unwrap_or(0);
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}
