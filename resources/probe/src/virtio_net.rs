//! A polling virtio-net driver (virtio 1.2, 5.1) on the virtio-mmio transport: the device
//! initialisation of 3.1.1 and 5.1.5, a receive queue (0) kept full of device-writable
//! buffers and a transmit queue (1) with a few frame buffers in flight, all in the probe's
//! own memory.
//!
//! Unlike the block driver, several chains are in flight at once: each chain is one
//! descriptor, and descriptor i is always buffer i of its queue, so a used id names the
//! buffer directly. Nothing from the device is trusted: a used index that runs ahead of
//! what is in flight, a used id that names a buffer the device does not own, a length
//! beyond the buffer or a `num_buffers` that cannot be make the device unusable.

use core::ptr::{copy_nonoverlapping, read_volatile, write_bytes, write_volatile};
use core::sync::atomic::{AtomicU16, Ordering, fence};

use crate::line::{Detail, Line};
use crate::phys;
use crate::timeout::Deadline;
use crate::virtio_mmio::{CONFIG, DRIVER_OK, FAILED, FEATURES_OK, Mmio};
use crate::virtq::{
    DESC_F_WRITE, Desc, MAX_SIZE as QUEUE_MAX, QueueError, Rings, USED_F_NO_NOTIFY,
};

// Feature bits (virtio 1.2, 5.1.3 and 6).
const F_MAC: u64 = 1 << 5;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;
const F_VERSION_1: u64 = 1 << 32;
/// What the driver accepts, if offered: nothing that changes frames (no offloads).
const ACCEPTED: u64 = F_VERSION_1 | F_MAC | F_STATUS | F_MRG_RXBUF;
/// `status` in the config space: the link is up.
const S_LINK_UP: u16 = 1;
/// Config space offsets: `mac` (6 bytes), then `status` (16 bits).
const CONFIG_MAC: u64 = 0;
const CONFIG_STATUS: u64 = 6;
/// The ConfigGeneration register (virtio 1.2, 4.2.2).
const CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_ATTEMPTS: u32 = 8;

const RX_QUEUE: u32 = 0;
const TX_QUEUE: u32 = 1;

/// `struct virtio_net_hdr_v1` (virtio 1.2, 5.1.6), in front of every frame both ways.
pub const HDR_LEN: usize = 12;
/// The header's `num_buffers` field.
const HDR_NUM_BUFFERS: usize = 10;
pub const ETH_HDR_LEN: usize = 14;
/// The largest frame without offloads: a 1500-byte MTU and the Ethernet header.
pub const MAX_FRAME: usize = 1514;

/// Receive memory, cut into 1 KiB buffers with VIRTIO_NET_F_MRG_RXBUF (so a full-size frame
/// spans two and the device must merge) or 2 KiB ones without it (at least the 1526 bytes
/// 5.1.6.3.1 asks for a whole frame and its header).
const RX_AREA: usize = 16 * 1024;
const RX_BUF_MERGEABLE: usize = 1024;
const RX_BUF_WHOLE: usize = 2048;
/// Transmit buffers: header and frame in one descriptor each.
pub const TX_SLOTS: usize = 8;
const TX_SLOT_SIZE: usize = 2048;
/// Where a received frame is put together from its buffers (without the header).
const FRAME_CAP: usize = 2048;

/// How long the device may take to return a transmit buffer, or to finish a frame it has
/// started returning: about 1.5-8 s, generous for a loaded host.
pub const REQUEST_TICKS: u64 = 1 << 33;

/// Everything shared with the device (guest-physical = virtual).
#[repr(C, align(4096))]
struct Dma {
    rings: [Rings; 2],
    rx: [u8; RX_AREA],
    tx: [[u8; TX_SLOT_SIZE]; TX_SLOTS],
    frame: [u8; FRAME_CAP],
}

const EMPTY_RINGS: Rings = crate::virtq::EMPTY;

// In .dma, which _start does not zero: the rings are zeroed by `Queue::new`, the buffers
// written before the device or the probe reads them. One network device is driven.
#[unsafe(link_section = ".dma")]
static mut DMA: Dma = Dma {
    rings: [EMPTY_RINGS, EMPTY_RINGS],
    rx: [0; RX_AREA],
    tx: [[0; TX_SLOT_SIZE]; TX_SLOTS],
    frame: [0; FRAME_CAP],
};

/// One split virtqueue whose chains are single descriptors, several in flight.
struct Queue {
    rings: *mut Rings,
    size: u16,
    /// Our copy of the available index: the device may write the shared one.
    next_avail: u16,
    /// The used index up to which the driver has consumed the used ring.
    last_used: u16,
    /// Chains made available and not yet returned.
    in_flight: u16,
}

impl Queue {
    /// Zeroes `rings` and takes `size` entries of them, a power of 2 up to QUEUE_MAX.
    fn new(rings: *mut Rings, size: u16) -> Self {
        // SAFETY: the rings are the probe's own and no device has them yet.
        unsafe { write_bytes(rings, 0, 1) };
        Queue {
            rings,
            size,
            next_avail: 0,
            last_used: 0,
            in_flight: 0,
        }
    }

    fn areas(&self) -> (u64, u64, u64) {
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

    /// Describes buffer `id` in descriptor `id`. Only for buffers the device does not own.
    fn set_desc(&mut self, id: u16, addr: u64, len: u32, device_writes: bool) {
        let desc = Desc {
            addr,
            len,
            flags: if device_writes { DESC_F_WRITE } else { 0 },
            next: 0,
        };
        // SAFETY: id < size <= QUEUE_MAX; the device does not own the descriptor.
        unsafe { write_volatile(&raw mut (*self.rings).desc[usize::from(id)], desc) };
    }

    /// Puts chain `id` in the available ring; the device sees it after `kick`.
    fn publish(&mut self, id: u16) {
        let slot = usize::from(self.next_avail % self.size);
        // SAFETY: slot < size <= QUEUE_MAX.
        unsafe { write_volatile(&raw mut (*self.rings).avail.ring[slot], id) };
        self.next_avail = self.next_avail.wrapping_add(1);
        self.in_flight += 1;
    }

    /// Makes what was published visible; returns whether the device wants a notification.
    fn kick(&mut self) -> bool {
        let rings = self.rings;
        // SAFETY: atomics through raw pointers to aligned u16s in the rings.
        unsafe {
            // Release: the descriptors, the ring entries and the buffers before the index.
            AtomicU16::from_ptr(&raw mut (*rings).avail.idx)
                .store(self.next_avail, Ordering::Release);
            // The index must be visible before the flags are read (see virtq::submit).
            fence(Ordering::SeqCst);
            read_volatile(&raw const (*rings).used.flags) & USED_F_NO_NOTIFY == 0
        }
    }

    /// The next used element, if the device returned one: (id, len).
    fn poll_used(&mut self) -> Result<Option<(u32, u32)>, QueueError> {
        let rings = self.rings;
        // SAFETY: as in `kick`.
        let idx = unsafe { AtomicU16::from_ptr(&raw mut (*rings).used.idx) };
        // Acquire: the element and the buffer contents are read only after the index.
        let advanced = idx.load(Ordering::Acquire).wrapping_sub(self.last_used);
        if advanced == 0 {
            return Ok(None);
        }
        if advanced > self.in_flight {
            return Err(QueueError::UsedIdxJump(advanced));
        }
        let slot = usize::from(self.last_used % self.size);
        // SAFETY: slot < size <= QUEUE_MAX.
        let elem = unsafe { read_volatile(&raw const (*rings).used.ring[slot]) };
        self.last_used = self.last_used.wrapping_add(1);
        self.in_flight -= 1;
        Ok(Some((elem.id, elem.len)))
    }
}

pub enum NetError {
    /// An earlier failure left the device unusable.
    Unusable,
    /// The queue protocol broke (or a transmit buffer did not come back in time); with the
    /// queue's name and the device status read afterwards.
    Queue(&'static [u8], QueueError, u32),
    /// A used receive buffer that cannot be: (what, value).
    BadRx(&'static [u8], u64),
    /// No frame within the wait.
    Timeout,
}

impl NetError {
    pub fn describe(&self, d: &mut Detail) {
        match self {
            NetError::Unusable => {
                d.str(b"device unusable after an earlier failure");
            }
            NetError::Queue(queue, error, status) => {
                d.str(queue).str(b" queue: ");
                error.describe(d);
                d.str(b" status=").hex(u64::from(*status));
            }
            NetError::BadRx(what, value) => {
                d.str(b"receive buffer ").str(what).byte(b'=').dec(*value);
            }
            NetError::Timeout => {
                d.str(b"timeout");
            }
        }
    }
}

/// A frame taken from the receive queue, its bytes (without the header) in the frame buffer.
pub struct RxFrame {
    pub len: usize,
    pub num_buffers: u16,
    /// The frame was longer than the frame buffer holds: only its start is there.
    pub truncated: bool,
}

pub struct Net {
    mmio: Mmio,
    rx: Queue,
    tx: Queue,
    pub mac: [u8; 6],
    pub link_up: bool,
    pub mergeable: bool,
    rx_buf_size: usize,
    rx_count: u16,
    /// Bit i: receive buffer i is the device's.
    rx_posted: u32,
    tx_slots: u16,
    /// Bit i: transmit slot i is the device's.
    tx_busy: u32,
    broken: bool,
}

fn dma() -> *mut Dma {
    &raw mut DMA
}

fn rx_buffer(i: usize, size: usize) -> *mut u8 {
    // SAFETY: only an address is computed; callers keep i * size + size <= RX_AREA.
    unsafe { (&raw mut (*dma()).rx).cast::<u8>().add(i * size) }
}

fn tx_slot(i: usize) -> *mut u8 {
    // SAFETY: a bounds-checked place; no reference is created.
    unsafe { (&raw mut (*dma()).tx[i]).cast::<u8>() }
}

fn frame_buffer() -> *mut u8 {
    // SAFETY: only an address is taken.
    unsafe { (&raw mut (*dma()).frame).cast::<u8>() }
}

/// The last frame received, `len` bytes of it (at most what the frame buffer holds).
pub fn frame(len: usize) -> &'static [u8] {
    // SAFETY: the frame buffer is the probe's own, never the device's, and nothing writes it
    // while a caller holds this (the next `receive` does, and callers are done by then).
    unsafe { core::slice::from_raw_parts(frame_buffer(), len.min(FRAME_CAP)) }
}

/// The largest power of 2 up to min(`max`, QUEUE_MAX).
fn queue_size(max: u32) -> u16 {
    let limit = max.min(u32::from(QUEUE_MAX));
    if limit == 0 {
        return 0;
    }
    1 << (31 - limit.leading_zeros())
}

impl Net {
    /// Initialises the device at `base` (virtio 3.1.1, 5.1.5): features, both queues, MAC
    /// and link status, receive buffers, DRIVER_OK. On failure says why in `d` and marks the
    /// device FAILED.
    pub fn init(base: u64, d: &mut Detail) -> Option<Net> {
        let mmio = Mmio::new(base);
        let mut status = 0;
        let net = Self::handshake(mmio, base, &mut status, d);
        if net.is_none() {
            mmio.set_status(status | FAILED);
        }
        net
    }

    fn handshake(mmio: Mmio, base: u64, status: &mut u32, d: &mut Detail) -> Option<Net> {
        if !mmio.begin_init(status, d) {
            return None;
        }
        let offered = mmio.device_features();
        for (bit, name) in [
            (F_VERSION_1, b"VIRTIO_F_VERSION_1".as_slice()),
            (F_MAC, b"VIRTIO_NET_F_MAC"),
        ] {
            if offered & bit == 0 {
                d.str(name).str(b" not offered: features=").hex(offered);
                return None;
            }
        }
        let accepted = offered & ACCEPTED;
        mmio.set_driver_features(accepted);
        *status |= FEATURES_OK;
        mmio.set_status(*status);
        let got = mmio.status();
        if got & FEATURES_OK == 0 {
            d.str(b"FEATURES_OK not accepted: status=")
                .hex(u64::from(got));
            return None;
        }

        let mut rx = set_up_queue(mmio, RX_QUEUE, d)?;
        let tx = set_up_queue(mmio, TX_QUEUE, d)?;

        let Some((mac, net_status)) = read_config(mmio, base, offered & F_STATUS != 0) else {
            d.str(b"config generation keeps changing");
            return None;
        };
        let link_up = net_status & S_LINK_UP != 0;

        // Receive buffers are made available before DRIVER_OK (5.1.5) and announced after
        // it: no notification may come earlier (3.1.1).
        let mergeable = accepted & F_MRG_RXBUF != 0;
        let rx_buf_size = if mergeable {
            RX_BUF_MERGEABLE
        } else {
            RX_BUF_WHOLE
        };
        let rx_count = ((RX_AREA / rx_buf_size) as u16).min(rx.size);
        for id in 0..rx_count {
            let addr = rx_buffer(usize::from(id), rx_buf_size) as u64;
            rx.set_desc(id, addr, rx_buf_size as u32, true);
            rx.publish(id);
        }
        let tx_slots = (TX_SLOTS as u16).min(tx.size);
        let notify_rx = rx.kick();

        *status |= DRIVER_OK;
        mmio.set_status(*status);
        let got = mmio.status();
        if got != *status {
            d.str(b"status=")
                .hex(u64::from(got))
                .str(b" after DRIVER_OK");
            return None;
        }
        if notify_rx {
            mmio.notify(RX_QUEUE);
        }
        Some(Net {
            mmio,
            rx,
            tx,
            mac,
            link_up,
            mergeable,
            rx_buf_size,
            rx_count,
            rx_posted: (1u32 << rx_count) - 1,
            tx_slots,
            tx_busy: 0,
            broken: false,
        })
    }

    fn usable(&self) -> Result<(), NetError> {
        if self.broken {
            return Err(NetError::Unusable);
        }
        Ok(())
    }

    fn fail(&mut self, error: NetError) -> NetError {
        self.broken = true;
        error
    }

    fn queue_error(&mut self, queue: &'static [u8], error: QueueError) -> NetError {
        let status = self.mmio.status();
        self.fail(NetError::Queue(queue, error, status))
    }

    /// Takes back the transmit buffers the device has returned.
    fn reap_tx(&mut self) -> Result<(), NetError> {
        loop {
            match self.tx.poll_used() {
                Ok(None) => return Ok(()),
                Ok(Some((id, _len))) => {
                    // The used length of a transmit buffer means nothing (the device wrote
                    // nothing); Linux ignores it too.
                    if id >= u32::from(self.tx_slots) || self.tx_busy & (1 << id) == 0 {
                        let size = self.tx.size;
                        return Err(self.queue_error(b"transmit", QueueError::UsedId(id, size)));
                    }
                    self.tx_busy &= !(1 << id);
                }
                Err(e) => return Err(self.queue_error(b"transmit", e)),
            }
        }
    }

    fn free_tx_slot(&self) -> Option<u16> {
        (0..self.tx_slots).find(|&i| self.tx_busy & (1 << i) == 0)
    }

    /// Transmit buffers the device still holds.
    pub fn tx_in_flight(&self) -> u32 {
        self.tx_busy.count_ones()
    }

    /// Writes a frame from our MAC to `dst` of `ethertype` with `parts` as its payload
    /// (truncated to MAX_PAYLOAD) into a free transmit slot and makes it available, without
    /// notifying. Returns the slot, or None if all are in flight.
    fn queue_frame(&mut self, dst: &[u8; 6], ethertype: u16, parts: &[&[u8]]) -> Option<u16> {
        let slot = self.free_tx_slot()?;
        let buf = tx_slot(usize::from(slot));
        let mut eth = [0u8; HDR_LEN + ETH_HDR_LEN];
        eth[HDR_LEN..HDR_LEN + 6].copy_from_slice(dst);
        eth[HDR_LEN + 6..HDR_LEN + 12].copy_from_slice(&self.mac);
        eth[HDR_LEN + 12..].copy_from_slice(&ethertype.to_be_bytes());
        let mut len = eth.len();
        // SAFETY: the slot is not the device's (its bit is clear); every copy stays within
        // HDR_LEN + MAX_FRAME < TX_SLOT_SIZE bytes of it.
        unsafe {
            copy_nonoverlapping(eth.as_ptr(), buf, len);
            for part in parts {
                let n = part.len().min(HDR_LEN + MAX_FRAME - len);
                copy_nonoverlapping(part.as_ptr(), buf.add(len), n);
                len += n;
            }
        }
        self.tx.set_desc(slot, buf as u64, len as u32, false);
        self.tx.publish(slot);
        self.tx_busy |= 1 << slot;
        Some(slot)
    }

    fn kick_tx(&mut self) {
        if self.tx.kick() {
            self.mmio.notify(TX_QUEUE);
        }
    }

    /// Sends one frame, waiting for a free slot if needed; returns its slot.
    pub fn send(
        &mut self,
        dst: &[u8; 6],
        ethertype: u16,
        parts: &[&[u8]],
    ) -> Result<u16, NetError> {
        self.usable()?;
        let mut deadline = Deadline::after(REQUEST_TICKS);
        loop {
            self.reap_tx()?;
            if let Some(slot) = self.queue_frame(dst, ethertype, parts) {
                self.kick_tx();
                return Ok(slot);
            }
            if deadline.expired() {
                return Err(self.queue_error(b"transmit", QueueError::Timeout));
            }
        }
    }

    /// Waits until the device has returned transmit slot `slot`.
    pub fn wait_sent(&mut self, slot: u16) -> Result<(), NetError> {
        self.usable()?;
        let mut deadline = Deadline::after(REQUEST_TICKS);
        loop {
            self.reap_tx()?;
            if self.tx_busy & (1 << slot) == 0 {
                return Ok(());
            }
            if deadline.expired() {
                return Err(self.queue_error(b"transmit", QueueError::Timeout));
            }
        }
    }

    /// Queues up to `count` frames at once, the i-th (counting from `first`) with the
    /// payload `make(i)` writes into the line it is given, and notifies once. Returns how
    /// many were queued: as many as there are free slots.
    pub fn send_batch(
        &mut self,
        dst: &[u8; 6],
        ethertype: u16,
        first: u64,
        count: u64,
        mut make: impl FnMut(u64, &mut Line<64>),
    ) -> Result<u64, NetError> {
        self.usable()?;
        self.reap_tx()?;
        let mut queued = 0;
        while queued < count && self.free_tx_slot().is_some() {
            let mut payload = Line::<64>::new();
            make(first + queued, &mut payload);
            self.queue_frame(dst, ethertype, &[payload.as_bytes()]);
            queued += 1;
        }
        if queued > 0 {
            self.kick_tx();
        }
        Ok(queued)
    }

    /// Waits for every transmit buffer to come back.
    pub fn drain_tx(&mut self) -> Result<(), NetError> {
        self.usable()?;
        let mut deadline = Deadline::after(REQUEST_TICKS);
        loop {
            self.reap_tx()?;
            if self.tx_busy == 0 {
                return Ok(());
            }
            if deadline.expired() {
                return Err(self.queue_error(b"transmit", QueueError::Timeout));
            }
        }
    }

    /// The next used receive buffer, checked: (id, len).
    fn take_rx(&mut self) -> Result<Option<(u16, usize)>, NetError> {
        let (id, len) = match self.rx.poll_used() {
            Ok(Some(used)) => used,
            Ok(None) => return Ok(None),
            Err(e) => return Err(self.queue_error(b"receive", e)),
        };
        if id >= u32::from(self.rx_count) || self.rx_posted & (1 << id) == 0 {
            let size = self.rx.size;
            return Err(self.queue_error(b"receive", QueueError::UsedId(id, size)));
        }
        let id = id as u16;
        self.rx_posted &= !(1 << id);
        if len as usize > self.rx_buf_size {
            return Err(self.fail(NetError::BadRx(b"len", u64::from(len))));
        }
        Ok(Some((id, len as usize)))
    }

    /// Gives receive buffer `id` back to the device (announced by `kick_rx`).
    fn repost_rx(&mut self, id: u16) {
        self.rx.publish(id);
        self.rx_posted |= 1 << id;
    }

    fn kick_rx(&mut self) {
        if self.rx.kick() {
            self.mmio.notify(RX_QUEUE);
        }
    }

    /// Waits up to `ticks` for a frame; puts it (without the header) in the frame buffer and
    /// gives its buffers back. `Err(Timeout)` when none came.
    pub fn receive(&mut self, ticks: u64) -> Result<RxFrame, NetError> {
        self.usable()?;
        let mut deadline = Deadline::after(ticks);
        let (first, first_len) = loop {
            if let Some(used) = self.take_rx()? {
                break used;
            }
            if deadline.expired() {
                return Err(NetError::Timeout);
            }
        };
        if first_len < HDR_LEN {
            return Err(self.fail(NetError::BadRx(b"len", first_len as u64)));
        }
        let base = rx_buffer(usize::from(first), self.rx_buf_size);
        // SAFETY: the buffer is ours again (returned through the used ring) and holds at least
        // HDR_LEN bytes; the field is 2-byte aligned.
        let num_buffers =
            u16::from_le(unsafe { read_volatile(base.add(HDR_NUM_BUFFERS).cast::<u16>()) });
        let max_buffers = if self.mergeable { self.rx_count } else { 1 };
        if num_buffers > max_buffers {
            return Err(self.fail(NetError::BadRx(b"num_buffers", u64::from(num_buffers))));
        }
        let mut len = 0usize;
        let mut truncated = false;
        let mut piece = (first, first_len, HDR_LEN);
        let mut taken = 1u16;
        loop {
            let (id, used_len, skip) = piece;
            let n = used_len - skip;
            let room = FRAME_CAP - len;
            if n > room {
                truncated = true;
            }
            // SAFETY: the buffer is ours again and `used_len` is within it (checked by
            // take_rx); the copy stays within the frame buffer.
            unsafe {
                copy_nonoverlapping(
                    rx_buffer(usize::from(id), self.rx_buf_size).add(skip),
                    frame_buffer().add(len),
                    n.min(room),
                )
            };
            len += n.min(room);
            self.repost_rx(id);
            // num_buffers 0 is wrong, but the frame is still one buffer: the caller reports it.
            if taken >= num_buffers {
                break;
            }
            // The device returns a frame's buffers together; the rest follow at once.
            let mut deadline = Deadline::after(REQUEST_TICKS);
            let next = loop {
                if let Some(used) = self.take_rx()? {
                    break used;
                }
                if deadline.expired() {
                    self.kick_rx();
                    return Err(self.fail(NetError::BadRx(b"num_buffers", u64::from(num_buffers))));
                }
            };
            piece = (next.0, next.1, 0);
            taken += 1;
        }
        self.kick_rx();
        Ok(RxFrame {
            len,
            num_buffers,
            truncated,
        })
    }
}

/// Selects queue `index`, checks it is not in use and large enough, and registers a fresh
/// ring of the largest power-of-2 size up to min(QueueNumMax, QUEUE_MAX) for it.
fn set_up_queue(mmio: Mmio, index: u32, d: &mut Detail) -> Option<Queue> {
    let (ready, max) = mmio.select_queue(index);
    if ready != 0 {
        d.str(b"queue ")
            .dec(u64::from(index))
            .str(b" ready after reset");
        return None;
    }
    // Room for a full-size frame in 1 KiB receive buffers, and for a few in flight.
    if max < 4 {
        d.str(b"queue ")
            .dec(u64::from(index))
            .str(b" qmax=")
            .dec(u64::from(max))
            .str(b" too small");
        return None;
    }
    // SAFETY: only an address is taken; index is 0 or 1. The probe is single-threaded and
    // no device has these rings yet.
    let rings = unsafe { &raw mut (*dma()).rings[index as usize] };
    let queue = Queue::new(rings, queue_size(max));
    let (desc, driver, device) = queue.areas();
    mmio.activate_queue(queue.size, desc, driver, device);
    Some(queue)
}

/// The MAC and, if the device offers VIRTIO_NET_F_STATUS, the link status (otherwise the
/// link counts as up, 5.1.4), read between two equal reads of ConfigGeneration. Each field
/// is read with accesses of its own width, as 4.2.2.2 requires for the config space.
fn read_config(mmio: Mmio, base: u64, has_status: bool) -> Option<([u8; 6], u16)> {
    for _ in 0..CONFIG_ATTEMPTS {
        let generation = mmio.read(CONFIG_GENERATION);
        let mut mac = [0u8; 6];
        for (i, byte) in mac.iter_mut().enumerate() {
            *byte = phys::read_u8(base + CONFIG + CONFIG_MAC + i as u64);
        }
        let status = if has_status {
            phys::read_u16(base + CONFIG + CONFIG_STATUS)
        } else {
            S_LINK_UP
        };
        if mmio.read(CONFIG_GENERATION) == generation {
            return Some((mac, status));
        }
    }
    None
}
