//! The packet header every vsock message starts with (virtio 1.2, 5.10.6: `struct
//! virtio_vsock_hdr`), and the constants of the wire protocol. virtio-bindings does not
//! carry the vsock definitions, so they are spelled out here.

/// Bytes in a header on the wire.
pub const HDR_LEN: usize = 44;

/// The host's address (virtio 1.2, 5.10.4: CID 2 is the host).
pub const HOST_CID: u64 = 2;

/// Stream sockets: the only type the device supports.
pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// OP_SHUTDOWN flags: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// OP_SHUTDOWN flags: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;

/// Feature bit: stream sockets (virtio 1.2, 5.10.3).
pub const VIRTIO_VSOCK_F_STREAM: u32 = 0;

/// The only event the device sends (virtio 1.2, 5.10.6.7).
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// Bytes of `struct virtio_vsock_event` on the event queue.
pub const EVENT_LEN: usize = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("the packet holds {0} bytes, less than a {HDR_LEN}-byte header")]
    ShortHeader(usize),
}

/// `struct virtio_vsock_hdr`, little-endian on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

fn u16_at(b: &[u8; HDR_LEN], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8; HDR_LEN], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8; HDR_LEN], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

impl Header {
    /// Reads a header from the first bytes of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Self, PacketError> {
        let b: &[u8; HDR_LEN] = bytes
            .get(..HDR_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(PacketError::ShortHeader(bytes.len()))?;
        Ok(Header {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            type_: u16_at(b, 28),
            op: u16_at(b, 30),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        })
    }

    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The RST that answers `self` when there is no connection to carry it: addressed back
    /// to where `self` came from, the guest being `guest_cid` whatever `self` claims.
    pub fn reset_reply(&self, guest_cid: u64) -> Header {
        Header {
            src_cid: self.dst_cid,
            dst_cid: guest_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            len: 0,
            type_: self.type_,
            op: OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_at_the_spec_offsets() {
        let h = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0xaabb_ccdd,
            dst_port: 1234,
            len: 77,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: SHUTDOWN_SEND,
            buf_alloc: 0x4_0000,
            fwd_cnt: 9,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&b[8..16], &2u64.to_le_bytes());
        assert_eq!(&b[20..24], &1234u32.to_le_bytes());
        assert_eq!(&b[24..28], &77u32.to_le_bytes());
        assert_eq!(&b[28..30], &1u16.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(&b[36..40], &0x4_0000u32.to_le_bytes());
        assert_eq!(&b[40..44], &9u32.to_le_bytes());
        assert_eq!(Header::parse(&b), Ok(h));
        assert_eq!(Header::parse(&b[..43]), Err(PacketError::ShortHeader(43)));
    }

    #[test]
    fn a_reset_reply_goes_back_to_the_sender() {
        let h = Header {
            src_cid: 99,
            dst_cid: 2,
            src_port: 5,
            dst_port: 6,
            type_: 7,
            op: OP_REQUEST,
            len: 10,
            ..Default::default()
        };
        let r = h.reset_reply(3);
        assert_eq!(
            (r.src_cid, r.dst_cid, r.src_port, r.dst_port, r.op, r.len),
            (2, 3, 6, 5, OP_RST, 0)
        );
        assert_eq!(r.type_, 7);
    }
}
