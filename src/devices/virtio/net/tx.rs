//! Transmit: one descriptor chain from the guest becomes one frame on the TAP, written
//! straight from guest memory (no copy), behind a header ember checked.
//!
//! A chain is dropped (and counted) when it cannot be a frame: a device-writable
//! descriptor, a buffer outside guest memory, less than a header, more than the largest
//! frame, or a header asking for an offload the device did not offer.

use crate::memory::GuestMemoryMmap;
use virtio_queue::desc::split::Descriptor;
use vm_memory::GuestMemoryBackend;

use super::header::{self, NetHeader};
use super::tap::VNET_HDR_LEN;

/// The largest frame (without the header) the device takes from the guest or gives it:
/// 65562-byte buffers (virtio 1.2, 5.1.6.3.1) less the header, room for a 64 KiB TSO frame.
pub const MAX_FRAME_LEN: usize = 65_562 - VNET_HDR_LEN;

/// More pieces than `writev` takes (IOV_MAX) cannot be one frame.
const MAX_PIECES: usize = 1024;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum TxError {
    #[error("a transmit buffer is device-writable")]
    WritableBuffer,
    #[error("a transmit buffer at {addr:#x} ({len} bytes) is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("the chain holds {0} bytes, less than a virtio-net header")]
    TooShort(usize),
    #[error("the frame is {0} bytes, more than the {MAX_FRAME_LEN} a TAP takes")]
    TooLarge(usize),
    #[error("the chain has more than {MAX_PIECES} buffers")]
    TooManyPieces,
    #[error("{0}")]
    Header(#[from] header::HeaderError),
}

/// A frame ready for `writev`, in place in guest memory: when the guest's header passed the
/// checks unchanged (the usual case) the chain's buffers go to the TAP as they are;
/// otherwise ember's corrected header replaces the guest's.
pub struct TxFrame {
    /// The header as checked (and corrected) by ember.
    pub header: [u8; VNET_HDR_LEN],
    /// Whether `header` differs from the guest's bytes.
    header_changed: bool,
    /// The chain's buffers, header included, as (host address, length) in guest memory.
    pieces: Vec<libc::iovec>,
    /// Bytes after the header.
    pub len: usize,
}

impl TxFrame {
    pub fn new() -> Self {
        TxFrame {
            header: [0; VNET_HDR_LEN],
            header_changed: false,
            pieces: Vec::with_capacity(16),
            len: 0,
        }
    }

    /// The iovecs `writev` takes for this frame.
    pub fn iovecs(&self, out: &mut Vec<libc::iovec>) {
        out.clear();
        if !self.header_changed {
            out.extend_from_slice(&self.pieces);
            return;
        }
        out.push(libc::iovec {
            iov_base: self.header.as_ptr() as *mut libc::c_void,
            iov_len: VNET_HDR_LEN,
        });
        // The guest's buffers past its header.
        let mut skip = VNET_HDR_LEN;
        for p in &self.pieces {
            if skip >= p.iov_len {
                skip -= p.iov_len;
                continue;
            }
            out.push(libc::iovec {
                // SAFETY: `skip` < the piece's length.
                iov_base: unsafe { p.iov_base.cast::<u8>().add(skip) }.cast(),
                iov_len: p.iov_len - skip,
            });
            skip = 0;
        }
    }
}

impl TxFrame {
    /// Copies up to `max` bytes of the frame after its header into `out` (replacing what
    /// it held), for frames the device answers itself instead of sending.
    pub fn copy_frame(&self, out: &mut Vec<u8>, max: usize) {
        out.clear();
        let mut skip = VNET_HDR_LEN;
        for p in &self.pieces {
            if out.len() >= max {
                break;
            }
            if skip >= p.iov_len {
                skip -= p.iov_len;
                continue;
            }
            let n = (p.iov_len - skip).min(max - out.len());
            // SAFETY: the piece is a checked range of guest memory (see `gather`), and
            // `skip + n` <= its length. The guest may change the bytes meanwhile; the copy
            // is then of whatever it wrote, which only the guest's own answer depends on.
            let bytes = unsafe { std::slice::from_raw_parts(p.iov_base.cast::<u8>().add(skip), n) };
            out.extend_from_slice(bytes);
            skip = 0;
        }
    }
}

impl Default for TxFrame {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: the iovecs point into guest memory, which outlives every frame (the device holds
// the memory for as long as it holds queues) and is shared with the guest anyway.
unsafe impl Send for TxFrame {}

/// Reads the chain `descs` into `frame`, checking everything about it; `features` are the
/// ones the driver accepted (they decide which header flags it may use).
pub fn gather(
    descs: &[Descriptor],
    mem: &GuestMemoryMmap,
    features: u64,
    frame: &mut TxFrame,
) -> Result<(), TxError> {
    frame.pieces.clear();
    frame.len = 0;
    let mut guest_header = [0u8; VNET_HDR_LEN];
    let mut header_got = 0usize;
    let mut total = 0usize;
    for d in descs {
        if d.is_write_only() {
            return Err(TxError::WritableBuffer);
        }
        let len = d.len() as usize;
        if len == 0 {
            continue;
        }
        let outside = || TxError::OutsideMemory {
            addr: d.addr().0,
            len: d.len(),
        };
        // One contiguous host range: a buffer across two memory regions is refused too.
        let slice = mem.get_slice(d.addr(), len).map_err(|_| outside())?;
        total += len;
        if total > VNET_HDR_LEN + MAX_FRAME_LEN {
            return Err(TxError::TooLarge(total - VNET_HDR_LEN));
        }
        if frame.pieces.len() == MAX_PIECES {
            return Err(TxError::TooManyPieces);
        }
        let base = slice.ptr_guard().as_ptr();
        if header_got < VNET_HDR_LEN {
            let take = (VNET_HDR_LEN - header_got).min(len);
            // SAFETY: `take` <= the slice's length; the guest may change these bytes at any
            // time, which is why ember checks its own copy and sends that if it differs.
            unsafe {
                std::ptr::copy_nonoverlapping(base, guest_header[header_got..].as_mut_ptr(), take)
            };
            header_got += take;
        }
        frame.pieces.push(libc::iovec {
            iov_base: base.cast_mut().cast(),
            iov_len: len,
        });
    }
    if header_got < VNET_HDR_LEN {
        return Err(TxError::TooShort(total));
    }
    frame.len = total - VNET_HDR_LEN;
    let mut hdr = NetHeader::from_bytes(&guest_header);
    hdr.check_tx(features, frame.len)?;
    // The driver sets num_buffers to 0 on transmit; the TAP ignores it anyway.
    hdr.num_buffers = 0;
    frame.header = hdr.to_bytes();
    // The guest could rewrite its header between this check and the write: then the TAP
    // gets what the guest wrote last, which is the guest's own frame to spoil. What the
    // check protects (the device's own memory safety) does not depend on those bytes.
    frame.header_changed = frame.header != guest_header;
    Ok(())
}
