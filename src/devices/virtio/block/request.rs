//! A virtio-blk request as the guest wrote it: a descriptor chain of a header, data buffers
//! and a status byte. Everything here comes from an untrusted guest, so every field and
//! every address is checked before the device acts on it.

use crate::memory::GuestMemoryMmap;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

pub const SECTOR_SIZE: u64 = 512;
/// The GET_ID answer is at most this long (virtio 1.2, 5.2.6).
pub const ID_BYTES: usize = 20;

pub use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};

pub const VIRTIO_BLK_S_OK: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK as u8;
pub const VIRTIO_BLK_S_IOERR: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;
pub const VIRTIO_BLK_S_UNSUPP: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;

const HEADER_LEN: u32 = 16;
/// The used ring reports the bytes written as a u32, the status byte included: a request
/// may carry at most this much data.
pub const MAX_DATA_LEN: u64 = u32::MAX as u64 - 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            other => RequestType::Unsupported(other),
        }
    }
}

/// Why a chain cannot be carried out.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the chain is shorter than a header and a status descriptor")]
    TooShort,
    #[error("the header descriptor is device-writable or shorter than 16 bytes")]
    BadHeader,
    #[error("the status descriptor is read-only or empty")]
    BadStatus,
    #[error("a descriptor points outside guest memory")]
    OutsideMemory,
    #[error("a data descriptor has the wrong direction for the request")]
    WrongDirection,
    #[error("the data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    #[error("sectors {first}..{end} are past the end of the disk ({capacity} sectors)")]
    PastEnd { first: u64, end: u64, capacity: u64 },
    #[error("the data buffers add up to more than a request may carry")]
    TooLarge,
}

/// A parsed, checked request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestType,
    pub sector: u64,
    /// Data buffers in guest memory, in chain order.
    pub data: Vec<(GuestAddress, u32)>,
    pub data_len: u64,
    pub status: GuestAddress,
}

/// The status byte's address if the chain has a usable one, so even a request that is
/// otherwise malformed can be answered with an error.
pub fn status_address(descs: &[Descriptor], mem: &GuestMemoryMmap) -> Option<GuestAddress> {
    let last = descs.last()?;
    (descs.len() >= 2 && last.is_write_only() && last.len() >= 1 && mem.check_range(last.addr(), 1))
        .then(|| last.addr())
}

/// Parses a chain's descriptors against a disk of `capacity` sectors.
pub fn parse(
    descs: &[Descriptor],
    mem: &GuestMemoryMmap,
    capacity: u64,
) -> Result<Request, RequestError> {
    let Some(header) = descs.first().filter(|_| descs.len() >= 2) else {
        return Err(RequestError::TooShort);
    };
    if header.is_write_only() || header.len() < HEADER_LEN {
        return Err(RequestError::BadHeader);
    }
    let status = status_address(descs, mem).ok_or(RequestError::BadStatus)?;
    let kind_raw: u32 = mem
        .read_obj(header.addr())
        .map_err(|_| RequestError::OutsideMemory)?;
    let sector: u64 = mem
        .read_obj(
            header
                .addr()
                .checked_add(8)
                .ok_or(RequestError::OutsideMemory)?,
        )
        .map_err(|_| RequestError::OutsideMemory)?;
    let kind = RequestType::from(kind_raw);

    let mut data = Vec::with_capacity(descs.len() - 2);
    let mut data_len: u64 = 0;
    for d in &descs[1..descs.len() - 1] {
        let wants_write = match kind {
            RequestType::In | RequestType::GetId => true,
            RequestType::Out => false,
            // Flush carries no data; unknown types are answered UNSUPP regardless.
            RequestType::Flush | RequestType::Unsupported(_) => d.is_write_only(),
        };
        if d.is_write_only() != wants_write {
            return Err(RequestError::WrongDirection);
        }
        if !mem.check_range(d.addr(), d.len() as usize) {
            return Err(RequestError::OutsideMemory);
        }
        data_len = data_len
            .checked_add(u64::from(d.len()))
            .filter(|&n| n <= MAX_DATA_LEN)
            .ok_or(RequestError::TooLarge)?;
        data.push((d.addr(), d.len()));
    }
    if matches!(kind, RequestType::In | RequestType::Out) {
        if !data_len.is_multiple_of(SECTOR_SIZE) {
            return Err(RequestError::UnalignedLength(data_len));
        }
        let end = sector
            .checked_add(data_len / SECTOR_SIZE)
            .ok_or(RequestError::TooLarge)?;
        if end > capacity {
            return Err(RequestError::PastEnd {
                first: sector,
                end,
                capacity,
            });
        }
    }
    Ok(Request {
        kind,
        sector,
        data,
        data_len,
        status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::split::Descriptor;

    const WRITE: u16 = 2; // VRING_DESC_F_WRITE

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn header(m: &GuestMemoryMmap, kind: u32, sector: u64) -> Descriptor {
        m.write_obj(kind, GuestAddress(0x1000)).unwrap();
        m.write_obj(sector, GuestAddress(0x1008)).unwrap();
        Descriptor::new(0x1000, 16, 0, 0)
    }

    fn status() -> Descriptor {
        Descriptor::new(0x3000, 1, WRITE, 0)
    }

    #[test]
    fn well_formed_read_and_write() {
        let m = mem();
        let read = [
            header(&m, VIRTIO_BLK_T_IN, 4),
            Descriptor::new(0x4000, 1024, WRITE, 0),
            status(),
        ];
        let r = parse(&read, &m, 8).unwrap();
        assert_eq!((r.kind, r.sector, r.data_len), (RequestType::In, 4, 1024));
        assert_eq!(r.status, GuestAddress(0x3000));
        let write = [
            header(&m, VIRTIO_BLK_T_OUT, 0),
            Descriptor::new(0x4000, 512, 0, 0),
            Descriptor::new(0x5000, 512, 0, 0),
            status(),
        ];
        assert_eq!(parse(&write, &m, 8).unwrap().data.len(), 2);
        let flush = [header(&m, VIRTIO_BLK_T_FLUSH, 0), status()];
        assert_eq!(parse(&flush, &m, 8).unwrap().kind, RequestType::Flush);
    }

    #[test]
    fn hostile_chains_refused() {
        let m = mem();
        let h = header(&m, VIRTIO_BLK_T_IN, 0);
        let cases: Vec<(Vec<Descriptor>, RequestError)> = vec![
            (vec![h], RequestError::TooShort),
            (vec![], RequestError::TooShort),
            (
                vec![Descriptor::new(0x1000, 16, WRITE, 0), status()],
                RequestError::BadHeader,
            ),
            (
                vec![Descriptor::new(0x1000, 8, 0, 0), status()],
                RequestError::BadHeader,
            ),
            (
                vec![h, Descriptor::new(0x3000, 1, 0, 0)],
                RequestError::BadStatus,
            ),
            (
                vec![h, Descriptor::new(0x3000, 0, WRITE, 0)],
                RequestError::BadStatus,
            ),
            (
                vec![h, Descriptor::new(1 << 30, 1, WRITE, 0)],
                RequestError::BadStatus,
            ),
            (
                vec![h, Descriptor::new(0x4000, 512, 0, 0), status()],
                RequestError::WrongDirection,
            ),
            (
                vec![h, Descriptor::new(0xff000, 0x2000, WRITE, 0), status()],
                RequestError::OutsideMemory,
            ),
            (
                vec![h, Descriptor::new(0x4000, 100, WRITE, 0), status()],
                RequestError::UnalignedLength(100),
            ),
        ];
        for (chain, want) in cases {
            assert_eq!(parse(&chain, &m, 8), Err(want.clone()), "{want}");
        }
        // The header lives at one address, so sector cases are built one at a time.
        let data = Descriptor::new(0x4000, 1024, WRITE, 0);
        let chain = [header(&m, VIRTIO_BLK_T_IN, 7), data, status()];
        assert_eq!(
            parse(&chain, &m, 8),
            Err(RequestError::PastEnd {
                first: 7,
                end: 9,
                capacity: 8
            })
        );
        let chain = [header(&m, VIRTIO_BLK_T_IN, u64::MAX), data, status()];
        assert_eq!(parse(&chain, &m, 8), Err(RequestError::TooLarge));
        // A header outside memory.
        let chain = [Descriptor::new(u64::MAX - 4, 16, 0, 0), status()];
        assert_eq!(parse(&chain, &m, 8), Err(RequestError::OutsideMemory));
    }

    #[test]
    fn data_that_would_overflow_the_used_length_is_refused() {
        // Two 3 GiB buffers in a 7 GiB guest: each is valid memory, together they carry
        // more than the used ring's 32-bit length can report.
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 7 << 30)]).unwrap();
        let big = Descriptor::new(1 << 30, 3 << 30, WRITE, 0);
        let big2 = Descriptor::new(4 << 30, 3 << 30, WRITE, 0);
        let chain = [header(&m, VIRTIO_BLK_T_IN, 0), big, big2, status()];
        assert_eq!(parse(&chain, &m, u64::MAX), Err(RequestError::TooLarge));
        // One of them alone fits.
        let chain = [header(&m, VIRTIO_BLK_T_IN, 0), big, status()];
        assert_eq!(parse(&chain, &m, u64::MAX).unwrap().data_len, 3 << 30);
    }

    #[test]
    fn status_address_even_for_bad_requests() {
        let m = mem();
        let chain = [Descriptor::new(0x1000, 4, 0, 0), status()];
        assert_eq!(status_address(&chain, &m), Some(GuestAddress(0x3000)));
        assert_eq!(status_address(&chain[..1], &m), None);
    }
}
