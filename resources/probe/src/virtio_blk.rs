//! A polling virtio-blk driver (virtio 1.x, 5.2) on the virtio-mmio transport: the device
//! initialisation of 3.1.1, then one request at a time on queue 0, each a chain of header,
//! data (if any) and status byte in the probe's own memory.

use core::ptr::{read_volatile, write_volatile};

use crate::line::Detail;
use crate::transport::Transport;
use crate::virtio_mmio::{DRIVER_OK, FAILED, FEATURES_OK};
use crate::virtq::{Buffer, MAX_SIZE, QueueError, Virtq};

const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const F_VERSION_1: u64 = 1 << 32;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// Written into the status byte before each request, to see whether the device wrote it.
const S_UNSET: u8 = 0xff;

pub const SECTOR_SIZE: usize = 512;
/// The device ID string's size in a GET_ID reply (5.2.6): NUL-padded, unterminated at 20.
pub const ID_LEN: usize = 20;
/// The data buffer: 8 sectors, enough for the largest request the checks make.
pub const DATA_SIZE: usize = 4096;
pub const DATA_WORDS: usize = DATA_SIZE / 8;
/// A capacity whose size in bytes does not fit in 64 bits is no real disk.
const MAX_CAPACITY: u64 = u64::MAX / SECTOR_SIZE as u64;
/// The longest chain a request needs: header, data, status.
const CHAIN_LEN: u32 = 3;
/// The offset of `capacity` in the block device's config space.
const CONFIG_CAPACITY: u64 = 0;

/// `struct virtio_blk_req` without data and status, which get their own buffers.
#[repr(C)]
#[derive(Clone, Copy)]
struct Header {
    kind: u32,
    reserved: u32,
    sector: u64,
}

/// What requests transfer, in memory the device reads and writes (guest-physical =
/// virtual). The data buffer is page aligned so a 4 KiB transfer is one page.
#[repr(C, align(4096))]
struct Dma {
    data: [u8; DATA_SIZE],
    header: Header,
    status: u8,
}

// Not zeroed (see layout.ld): header and status are written for each request, and the data
// buffer before each use.
#[unsafe(link_section = ".dma")]
static mut DMA: Dma = Dma {
    data: [0; DATA_SIZE],
    header: Header {
        kind: 0,
        reserved: 0,
        sector: 0,
    },
    status: 0,
};

/// Byte `i` of the data buffer. The buffer is accessed through raw pointers only, since the
/// device writes it behind the compiler's back; indexing panics beyond it.
pub fn data(i: usize) -> u8 {
    // SAFETY: a bounds-checked place in a static; no reference is created.
    unsafe { read_volatile(&raw const DMA.data[i]) }
}

/// Word `j` (bytes 8j..8j+8, little endian) of the data buffer: guest memory may be uncached
/// (ember starts the guest with CR0.CD set), so patterns are written and compared 8 bytes
/// at a time.
pub fn data_word(j: usize) -> u64 {
    assert!(j < DATA_WORDS);
    // SAFETY: in bounds (checked above) and 8-byte aligned (the buffer is page aligned).
    unsafe { read_volatile((&raw const DMA.data).cast::<u64>().add(j)) }
}

pub fn set_data_word(j: usize, value: u64) {
    assert!(j < DATA_WORDS);
    // SAFETY: as for `data_word`; the device owns the buffer only while a request is in flight.
    unsafe { write_volatile((&raw mut DMA.data).cast::<u64>().add(j), value) }
}

/// Fills `len` bytes from `start` with `value` (one `rep stosb`).
pub fn fill_data(start: usize, len: usize, value: u8) {
    assert!(start <= DATA_SIZE && len <= DATA_SIZE - start);
    // SAFETY: in bounds (checked above); no request is in flight.
    unsafe { core::ptr::write_bytes((&raw mut DMA.data).cast::<u8>().add(start), value, len) };
}

/// The data part of a request, as (start, length) in the data buffer.
enum Transfer {
    None,
    DeviceReads(usize, usize),
    DeviceWrites(usize, usize),
}

/// One request of virtio 5.2.6: its type, sector and data.
pub struct Request {
    kind: u32,
    sector: u64,
    transfer: Transfer,
}

impl Request {
    /// Reads sectors from `sector` into `len` bytes of the data buffer from `start`.
    pub fn read(sector: u64, start: usize, len: usize) -> Self {
        Request {
            kind: T_IN,
            sector,
            transfer: Transfer::DeviceWrites(start, len),
        }
    }

    /// Writes `len` bytes of the data buffer from `start` to the sectors from `sector`.
    pub fn write(sector: u64, start: usize, len: usize) -> Self {
        Request {
            kind: T_OUT,
            sector,
            transfer: Transfer::DeviceReads(start, len),
        }
    }

    /// No data, and sector 0 as 5.2.6.1 requires.
    pub fn flush() -> Self {
        Request {
            kind: T_FLUSH,
            sector: 0,
            transfer: Transfer::None,
        }
    }

    /// The device ID string into the first ID_LEN bytes of the data buffer.
    pub fn get_id() -> Self {
        Request {
            kind: T_GET_ID,
            sector: 0,
            transfer: Transfer::DeviceWrites(0, ID_LEN),
        }
    }
}

pub enum RequestError {
    /// An earlier request left the device unusable.
    Unusable,
    /// The queue failed; with the device status read afterwards.
    Queue(QueueError, u32),
}

impl RequestError {
    pub fn describe(&self, d: &mut Detail) {
        match self {
            RequestError::Unusable => {
                d.str(b"device unusable after an earlier failure");
            }
            RequestError::Queue(error, status) => {
                error.describe(d);
                d.str(b" status=").hex(u64::from(*status));
            }
        }
    }
}

/// A request's status byte by name: `ok`, `ioerr`, `unsupp`, `unset` (not written), or hex.
pub fn describe_status(d: &mut Detail, status: u8) {
    match status {
        S_OK => d.str(b"ok"),
        S_IOERR => d.str(b"ioerr"),
        S_UNSUPP => d.str(b"unsupp"),
        S_UNSET => d.str(b"unset"),
        other => d.hex_byte(other),
    };
}

pub struct Blk {
    mmio: Transport,
    queue: Virtq,
    pub capacity: u64,
    pub read_only: bool,
    pub flush: bool,
    pub queue_max: u32,
    /// Requests the device completed, and the used-buffer interrupts that came with them.
    pub requests: u64,
    pub acks: u64,
    /// A request timed out or the device broke the queue protocol: send no more.
    broken: bool,
    /// After one missing interrupt, later ones are not waited for.
    interrupt_missed: bool,
}

impl Blk {
    /// Initialises the device behind `mmio` (virtio 3.1.1) and sets up queue 0. On failure
    /// says why in `d` and marks the device FAILED, as 3.1.1 recommends. `slot` (below
    /// MAX_QUEUES) picks the device's own rings.
    pub fn init(mmio: Transport, slot: usize, d: &mut Detail) -> Option<Blk> {
        let mut status = 0;
        let blk = Self::handshake(mmio, slot, &mut status, d);
        if blk.is_none() {
            mmio.set_status(status | FAILED);
        }
        blk
    }

    /// The steps of `init`; `status` tracks what the driver has set so far.
    fn handshake(mmio: Transport, slot: usize, status: &mut u32, d: &mut Detail) -> Option<Blk> {
        if !mmio.begin_init(status, d) {
            return None;
        }
        let offered = mmio.device_features();
        if offered & F_VERSION_1 == 0 {
            d.str(b"VIRTIO_F_VERSION_1 not offered: features=")
                .hex(offered);
            return None;
        }
        mmio.set_driver_features(offered & (F_VERSION_1 | F_RO | F_FLUSH));
        *status |= FEATURES_OK;
        mmio.set_status(*status);
        // The device clears FEATURES_OK if it cannot work with the features accepted.
        let got = mmio.status();
        if got & FEATURES_OK == 0 {
            d.str(b"FEATURES_OK not accepted: status=")
                .hex(u64::from(got));
            return None;
        }

        let (ready, queue_max) = mmio.select_queue(0);
        if ready != 0 {
            d.str(b"queue 0 ready after reset");
            return None;
        }
        // A power of 2 (the split ring's rule), room for one chain.
        let limit = queue_max.min(u32::from(MAX_SIZE));
        if limit < CHAIN_LEN.next_power_of_two() {
            d.str(b"qmax=")
                .dec(u64::from(queue_max))
                .str(b" too small for a 3-buffer request");
            return None;
        }
        let size = 1 << (31 - limit.leading_zeros());
        let queue = Virtq::new(slot, size);
        let (desc, driver, device) = queue.areas();
        if !mmio.activate_queue(size, desc, driver, device) {
            d.str(b"queue 0 refused its MSI-X vector");
            return None;
        }

        let Some(capacity) = mmio.config_u64(CONFIG_CAPACITY) else {
            d.str(b"config generation keeps changing");
            return None;
        };
        if capacity > MAX_CAPACITY {
            d.str(b"cap=").hex(capacity).str(b" impossible");
            return None;
        }
        *status |= DRIVER_OK;
        mmio.set_status(*status);
        // Anything else now (DEVICE_NEEDS_RESET, a lost bit) means the device gave up.
        let got = mmio.status();
        if got != *status {
            d.str(b"status=")
                .hex(u64::from(got))
                .str(b" after DRIVER_OK");
            return None;
        }
        Some(Blk {
            mmio,
            queue,
            capacity,
            read_only: offered & F_RO != 0,
            flush: offered & F_FLUSH != 0,
            queue_max,
            requests: 0,
            acks: 0,
            broken: false,
            interrupt_missed: false,
        })
    }

    /// Sends one request and waits for it. Returns the status byte the device wrote (or
    /// S_UNSET if it wrote none). Every completion should come with a used-buffer interrupt;
    /// `requests` and `acks` count both.
    #[inline(never)]
    pub fn request(&mut self, request: Request) -> Result<u8, RequestError> {
        let Request {
            kind,
            sector,
            transfer,
        } = request;
        if self.broken {
            return Err(RequestError::Unusable);
        }
        let dma = &raw mut DMA;
        // SAFETY: no request is in flight, so the device does not touch these; no reference
        // to the static is created.
        let (header, data, status) = unsafe {
            write_volatile(
                &raw mut (*dma).header,
                Header {
                    kind,
                    reserved: 0,
                    sector,
                },
            );
            write_volatile(&raw mut (*dma).status, S_UNSET);
            (
                &raw const (*dma).header as u64,
                &raw const (*dma).data as u64,
                &raw const (*dma).status as u64,
            )
        };
        let header = Buffer {
            addr: header,
            len: size_of::<Header>() as u32,
            device_writes: false,
        };
        let status_buffer = Buffer {
            addr: status,
            len: 1,
            device_writes: true,
        };
        let data_buffer = |start: usize, len: usize, device_writes| {
            assert!(start <= DATA_SIZE && len <= DATA_SIZE - start);
            Buffer {
                addr: data + start as u64,
                len: len as u32,
                device_writes,
            }
        };
        let notify = match transfer {
            Transfer::None => self.queue.submit(&[header, status_buffer]),
            Transfer::DeviceReads(start, len) => {
                self.queue
                    .submit(&[header, data_buffer(start, len, false), status_buffer])
            }
            Transfer::DeviceWrites(start, len) => {
                self.queue
                    .submit(&[header, data_buffer(start, len, true), status_buffer])
            }
        };
        if notify {
            self.mmio.notify(0);
        }
        if let Err(error) = self.queue.wait_used() {
            self.broken = true;
            return Err(RequestError::Queue(error, self.mmio.status()));
        }
        self.requests += 1;
        if self.mmio.take_used_interrupt(!self.interrupt_missed) {
            self.acks += 1;
        } else {
            self.interrupt_missed = true;
        }
        // SAFETY: the device has returned the chain; the byte is ours again.
        Ok(unsafe { read_volatile(&raw const (*dma).status) })
    }
}
