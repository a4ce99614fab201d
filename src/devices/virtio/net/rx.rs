//! Receive: frames from the TAP go into the receive chains the guest made available.
//!
//! Chains are taken from the queue into a reserve before a frame is read, each checked once
//! (device-writable buffers inside guest memory), and the TAP is read straight into the
//! reserved buffers (`readv`); what does not fit lands in a bounce buffer behind them and is
//! copied into further chains. A frame is returned to the guest only when the reserve holds
//! all of it, so a frame is never half delivered and a chain never taken back. With
//! `VIRTIO_NET_F_MRG_RXBUF` a frame may span several chains (their count goes in the first
//! header's `num_buffers`); without it, each frame takes exactly one chain.

use std::collections::VecDeque;

use crate::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::tap::VNET_HDR_LEN;

/// Where `num_buffers` sits in the virtio-net header.
const NUM_BUFFERS_AT: usize = 10;

/// A receive chain held by the device until a frame fills it.
struct ReservedChain {
    head: u16,
    /// How many of the reserve's ranges belong to this chain (the next ones in order).
    ranges: usize,
    capacity: usize,
}

/// What happened to one frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Written into this many chains.
    Delivered { chains: u16 },
    /// The guest has not made room for it yet; the frame waits.
    NoRoom,
    /// Without mergeable buffers, the next chain is smaller than the frame: the frame
    /// cannot be delivered and is dropped (the chain stays for smaller ones).
    TooLarge,
}

#[derive(Default)]
pub struct RxReserve {
    chains: VecDeque<ReservedChain>,
    /// (guest address, length) of every reserved chain's buffers, chain after chain.
    ranges: VecDeque<(GuestAddress, usize)>,
    capacity: usize,
    /// Chains the guest made unusable (a readable buffer, a buffer outside its memory, no
    /// room at all), returned to it empty.
    pub bad_chains: u64,
    /// Chains taken from the queue so far, usable or not.
    pub popped: u64,
}

impl RxReserve {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many chains wait in the reserve. They are the last usable ones taken from the
    /// queue; a chain the guest made unusable after them was answered at once, which a
    /// snapshot then answers a second time (a driver bug either way).
    pub fn len(&self) -> usize {
        self.chains.len()
    }

    /// Forgets every reserved chain (the queue was reset or stopped).
    pub fn clear(&mut self) {
        self.chains.clear();
        self.ranges.clear();
        self.capacity = 0;
    }

    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }

    /// Takes chains from the queue until the reserve holds at least `bytes` (and at least
    /// one chain), or the queue has no more.
    pub fn reserve(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap, bytes: usize) {
        while (self.chains.is_empty() || self.capacity < bytes) && self.take_chain(queue, mem) {}
    }

    /// The reserved buffers as host iovecs, in order, for reading a frame straight into
    /// them: all of them (`mergeable`) or the first chain's. Stops early at `max` iovecs or
    /// at a buffer that is not one contiguous host range (it spans two memory regions);
    /// returns how many bytes the iovecs cover, which are the frame's first bytes.
    pub fn iovecs(
        &self,
        mem: &GuestMemoryMmap,
        mergeable: bool,
        max: usize,
        out: &mut Vec<libc::iovec>,
    ) -> usize {
        out.clear();
        let ranges = match (mergeable, self.chains.front()) {
            (_, None) => 0,
            (true, Some(_)) => self.ranges.len(),
            (false, Some(first)) => first.ranges,
        };
        let mut covered = 0;
        for &(addr, len) in self.ranges.iter().take(ranges.min(max)) {
            let Ok(slice) = mem.get_slice(addr, len) else {
                break;
            };
            // Written by the kernel behind vm-memory's back: marked here so a diff snapshot
            // knows these pages changed.
            vm_memory::bitmap::Bitmap::mark_dirty(slice.bitmap(), 0, len);
            out.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: len,
            });
            covered += len;
        }
        covered
    }

    /// Takes the next usable chain from the queue into the reserve; false when the queue
    /// has none. Unusable chains are returned to the guest with nothing written.
    fn take_chain(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        // An error (a ring that cannot be read) looks like an empty queue here; the caller
        // tells the two apart when the queue says more is available.
        while let Ok(Some(chain)) = queue.iter(mem).map(|mut i| i.next()) {
            self.popped += 1;
            let head = chain.head_index();
            let first_range = self.ranges.len();
            let mut capacity = 0usize;
            let mut usable = true;
            for d in chain {
                let len = d.len() as usize;
                if !d.is_write_only() || !mem.check_range(d.addr(), len) {
                    usable = false;
                    break;
                }
                if len > 0 {
                    self.ranges.push_back((d.addr(), len));
                    capacity = capacity.saturating_add(len);
                }
            }
            if !usable || capacity < VNET_HDR_LEN {
                self.ranges.truncate(first_range);
                self.bad_chains += 1;
                crate::rate_limited_log!(
                    log::Level::Warn,
                    "net: the guest offered an unusable receive buffer (head {head})"
                );
                let _ = queue.add_used(mem, head, 0);
                continue;
            }
            self.chains.push_back(ReservedChain {
                head,
                ranges: self.ranges.len() - first_range,
                capacity,
            });
            self.capacity = self.capacity.saturating_add(capacity);
            return true;
        }
        false
    }

    /// Writes `bytes` at `offset` of the frame that fills the reserve from its front.
    fn write_in_place(&self, mem: &GuestMemoryMmap, mut offset: usize, mut bytes: &[u8]) {
        for &(addr, len) in &self.ranges {
            if bytes.is_empty() {
                return;
            }
            if offset >= len {
                offset -= len;
                continue;
            }
            let n = (len - offset).min(bytes.len());
            // Checked when reserved; guest memory does not shrink under a running VM.
            let _ = mem.write_slice(&bytes[..n], addr.unchecked_add(offset as u64));
            bytes = &bytes[n..];
            offset = 0;
        }
    }

    /// Completes the frame `frame` (virtio-net header first) in the reserved chains, taking
    /// more from the queue as needed, and returns them to the guest as used. Its first
    /// `in_place` bytes are already in the reserve's first buffers (read there); the rest
    /// are taken from `frame` at the same offsets. `frame` is modified: its `num_buffers`
    /// field is set (in guest memory too when the header is in place).
    pub fn deliver(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        frame: &mut [u8],
        in_place: usize,
        mergeable: bool,
    ) -> Delivery {
        let need = frame.len();
        let chains = if mergeable {
            while self.capacity < need {
                if !self.take_chain(queue, mem) {
                    return Delivery::NoRoom;
                }
            }
            let mut covered = 0usize;
            let mut count = 0usize;
            for c in &self.chains {
                covered += c.capacity;
                count += 1;
                if covered >= need {
                    break;
                }
            }
            count
        } else {
            if self.chains.is_empty() && !self.take_chain(queue, mem) {
                return Delivery::NoRoom;
            }
            match self.chains.front() {
                Some(c) if c.capacity >= need => 1,
                _ => return Delivery::TooLarge,
            }
        };
        // At most the queue size, so it fits.
        let num_buffers = chains as u16;
        if need >= VNET_HDR_LEN {
            let field = NUM_BUFFERS_AT..NUM_BUFFERS_AT + 2;
            frame[field.clone()].copy_from_slice(&num_buffers.to_le_bytes());
            if in_place > NUM_BUFFERS_AT {
                let end = field.end.min(in_place);
                self.write_in_place(mem, NUM_BUFFERS_AT, &frame[NUM_BUFFERS_AT..end]);
            }
        }
        let mut offset = 0usize;
        for _ in 0..chains {
            let Some(chain) = self.chains.pop_front() else {
                break;
            };
            self.capacity -= chain.capacity;
            let mut written = 0usize;
            for _ in 0..chain.ranges {
                let Some((addr, len)) = self.ranges.pop_front() else {
                    break;
                };
                let n = len.min(need - offset);
                // Only what is not in place yet is copied.
                let from = offset.max(in_place).min(offset + n);
                let ok = from == offset + n
                    || mem
                        .write_slice(
                            &frame[from..offset + n],
                            addr.unchecked_add((from - offset) as u64),
                        )
                        .is_ok();
                // Checked when reserved; guest memory does not shrink under a running VM.
                if n > 0 && ok {
                    offset += n;
                    written += n;
                }
            }
            // At most the frame's length, which a TAP read bounds far below 4 GiB.
            let used = u32::try_from(written).unwrap_or(u32::MAX);
            let _ = queue.add_used(mem, chain.head, used);
        }
        Delivery::Delivered {
            chains: num_buffers,
        }
    }
}
