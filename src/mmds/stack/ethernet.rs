//! Ethernet II framing.

/// Length of the Ethernet II header.
pub const HEADER_LEN: usize = 14;
/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;

/// A MAC address.
pub type MacAddr = [u8; 6];

/// Errors of Ethernet framing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EthernetError {
    /// Shorter than a header.
    #[error("Ethernet frame of {0} bytes is shorter than its header.")]
    TooShort(usize),
    /// The output buffer cannot hold the header.
    #[error("Buffer too small for an Ethernet header.")]
    BufferTooSmall,
}

/// A parsed frame borrowing its payload.
#[derive(Debug, PartialEq, Eq)]
pub struct EthernetFrame<'a> {
    /// Destination MAC.
    pub dst: MacAddr,
    /// Source MAC.
    pub src: MacAddr,
    /// EtherType (VLAN tags are not understood and show up as their TPID).
    pub ethertype: u16,
    /// Everything after the header.
    pub payload: &'a [u8],
}

/// Splits a frame into header fields and payload.
pub fn parse(frame: &[u8]) -> Result<EthernetFrame<'_>, EthernetError> {
    let (head, payload) = frame
        .split_first_chunk::<HEADER_LEN>()
        .ok_or(EthernetError::TooShort(frame.len()))?;
    let (dst, rest) = head
        .split_first_chunk::<6>()
        .ok_or(EthernetError::TooShort(0))?;
    let (src, ethertype) = rest
        .split_first_chunk::<6>()
        .ok_or(EthernetError::TooShort(0))?;
    let ethertype = ethertype
        .first_chunk::<2>()
        .map(|b| u16::from_be_bytes(*b))
        .ok_or(EthernetError::TooShort(0))?;
    Ok(EthernetFrame {
        dst: *dst,
        src: *src,
        ethertype,
        payload,
    })
}

/// Writes a header at the start of `buf`; returns its length.
pub fn write_header(
    buf: &mut [u8],
    dst: MacAddr,
    src: MacAddr,
    ethertype: u16,
) -> Result<usize, EthernetError> {
    let head = buf
        .first_chunk_mut::<HEADER_LEN>()
        .ok_or(EthernetError::BufferTooSmall)?;
    let mut bytes = [0u8; HEADER_LEN];
    bytes[..6].copy_from_slice(&dst);
    bytes[6..12].copy_from_slice(&src);
    bytes[12..].copy_from_slice(&ethertype.to_be_bytes());
    *head = bytes;
    Ok(HEADER_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut buf = [0u8; 20];
        buf[14..].copy_from_slice(b"abcdef");
        let dst = [1, 2, 3, 4, 5, 6];
        let src = [7, 8, 9, 10, 11, 12];
        assert_eq!(write_header(&mut buf, dst, src, ETHERTYPE_ARP), Ok(14));
        assert_eq!(&buf[12..14], &[0x08, 0x06]);
        let frame = parse(&buf).unwrap();
        assert_eq!(frame.dst, dst);
        assert_eq!(frame.src, src);
        assert_eq!(frame.ethertype, ETHERTYPE_ARP);
        assert_eq!(frame.payload, b"abcdef");
    }

    #[test]
    fn short_input() {
        assert_eq!(parse(&[0; 13]), Err(EthernetError::TooShort(13)));
        assert_eq!(parse(&[0; 14]).unwrap().payload, &[] as &[u8]);
        assert_eq!(
            write_header(&mut [0; 13], [0; 6], [0; 6], 0),
            Err(EthernetError::BufferTooSmall)
        );
    }
}
