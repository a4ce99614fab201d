//! The virtio-net header in front of every frame (virtio 1.2, 5.1.6): what the driver may
//! ask of the device on transmit, given the features it accepted.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP,
};

use super::tap::VNET_HDR_LEN;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("the header asks for checksum offload, which the driver did not accept")]
    ChecksumNotNegotiated,
    #[error("the header's checksum at {start}+{offset} lies outside the {len}-byte frame")]
    ChecksumOutsideFrame { start: u16, offset: u16, len: usize },
    #[error("the header asks for segmentation type {0:#x}, which the driver did not accept")]
    GsoNotNegotiated(u8),
    #[error("the header asks for segmentation without checksum offload")]
    GsoWithoutChecksum,
    #[error("the header's segment size is 0")]
    GsoSizeZero,
    #[error("the header's header length {hdr_len} is beyond the {len}-byte frame")]
    HdrLenOutsideFrame { hdr_len: u16, len: usize },
}

/// `struct virtio_net_hdr_v1`, little endian on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

fn le16(b: &[u8; VNET_HDR_LEN], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

impl NetHeader {
    pub fn from_bytes(b: &[u8; VNET_HDR_LEN]) -> Self {
        NetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le16(b, 2),
            gso_size: le16(b, 4),
            csum_start: le16(b, 6),
            csum_offset: le16(b, 8),
            num_buffers: le16(b, 10),
        }
    }

    pub fn to_bytes(self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    /// Checks a transmit header against the accepted `features` and the frame's length
    /// (bytes after the header), and clears flags a driver may not set on transmit. The TAP
    /// acts on what passes, so a header that lies about lengths stops here.
    pub fn check_tx(&mut self, features: u64, frame_len: usize) -> Result<(), HeaderError> {
        let accepted = |bit: u32| features & (1u64 << bit) != 0;
        // DATA_VALID and RSC_INFO mean something only on receive (5.1.6.2.1).
        self.flags &= VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
        if self.flags != 0 {
            if !accepted(VIRTIO_NET_F_CSUM) {
                return Err(HeaderError::ChecksumNotNegotiated);
            }
            let end = usize::from(self.csum_start) + usize::from(self.csum_offset) + 2;
            if end > frame_len {
                return Err(HeaderError::ChecksumOutsideFrame {
                    start: self.csum_start,
                    offset: self.csum_offset,
                    len: frame_len,
                });
            }
        }
        let gso = self.gso_type & !(VIRTIO_NET_HDR_GSO_ECN as u8);
        if u32::from(gso) == VIRTIO_NET_HDR_GSO_NONE {
            if self.gso_type != gso {
                // ECN without a segmentation type.
                return Err(HeaderError::GsoNotNegotiated(self.gso_type));
            }
            return Ok(());
        }
        let needed = match u32::from(gso) {
            VIRTIO_NET_HDR_GSO_TCPV4 => VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_HDR_GSO_TCPV6 => VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_HDR_GSO_UDP => VIRTIO_NET_F_HOST_UFO,
            _ => return Err(HeaderError::GsoNotNegotiated(self.gso_type)),
        };
        // ECN marking on segments (HOST_ECN) is not offered.
        if !accepted(needed) || self.gso_type != gso {
            return Err(HeaderError::GsoNotNegotiated(self.gso_type));
        }
        if self.flags == 0 {
            return Err(HeaderError::GsoWithoutChecksum);
        }
        if self.gso_size == 0 {
            return Err(HeaderError::GsoSizeZero);
        }
        if usize::from(self.hdr_len) > frame_len {
            return Err(HeaderError::HdrLenOutsideFrame {
                hdr_len: self.hdr_len,
                len: frame_len,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u64 = (1 << VIRTIO_NET_F_CSUM)
        | (1 << VIRTIO_NET_F_HOST_TSO4)
        | (1 << VIRTIO_NET_F_HOST_TSO6)
        | (1 << VIRTIO_NET_F_HOST_UFO);

    #[test]
    fn bytes_round_trip_little_endian() {
        let h = NetHeader {
            flags: 1,
            gso_type: 4,
            hdr_len: 0x0102,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };
        let b = h.to_bytes();
        assert_eq!(&b[2..4], &[0x02, 0x01]);
        assert_eq!(NetHeader::from_bytes(&b), h);
    }

    #[test]
    fn transmit_headers_are_checked_against_features_and_length() {
        let mut plain = NetHeader::default();
        assert_eq!(plain.check_tx(0, 60), Ok(()));
        // Receive-only flags are cleared, not refused.
        let mut rx_flags = NetHeader {
            flags: 2,
            ..NetHeader::default()
        };
        assert_eq!(rx_flags.check_tx(0, 60), Ok(()));
        assert_eq!(rx_flags.flags, 0);
        let csum = NetHeader {
            flags: 1,
            csum_start: 34,
            csum_offset: 6,
            ..NetHeader::default()
        };
        assert_eq!(
            csum.clone().check_tx(0, 60),
            Err(HeaderError::ChecksumNotNegotiated)
        );
        assert_eq!(csum.clone().check_tx(ALL, 60), Ok(()));
        // The checksum field must lie inside the frame.
        assert!(matches!(
            csum.clone().check_tx(ALL, 41),
            Err(HeaderError::ChecksumOutsideFrame { .. })
        ));
        let tso = NetHeader {
            flags: 1,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 0,
        };
        assert_eq!(tso.clone().check_tx(ALL, 9000), Ok(()));
        assert_eq!(
            tso.clone().check_tx(1 << VIRTIO_NET_F_CSUM, 9000),
            Err(HeaderError::GsoNotNegotiated(1))
        );
        assert_eq!(
            NetHeader { flags: 0, ..tso }.check_tx(ALL, 9000),
            Err(HeaderError::GsoWithoutChecksum)
        );
        assert_eq!(
            NetHeader { gso_size: 0, ..tso }.check_tx(ALL, 9000),
            Err(HeaderError::GsoSizeZero)
        );
        assert!(matches!(
            NetHeader {
                hdr_len: 9001,
                ..tso
            }
            .check_tx(ALL, 9000),
            Err(HeaderError::HdrLenOutsideFrame { .. })
        ));
        assert!(matches!(
            NetHeader {
                gso_type: 0x80 | 1,
                ..tso
            }
            .check_tx(ALL, 9000),
            Err(HeaderError::GsoNotNegotiated(_))
        ));
        assert!(matches!(
            NetHeader { gso_type: 9, ..tso }.check_tx(ALL, 9000),
            Err(HeaderError::GsoNotNegotiated(9))
        ));
    }
}
