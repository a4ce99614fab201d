//! TCP segment headers (RFC 9293) and their checksum.

use std::net::Ipv4Addr;

use super::ipv4::{PROTOCOL_TCP, checksum_add, checksum_finish};

/// Length of a TCP header without options.
pub const HEADER_LEN: usize = 20;
/// Length of the MSS option MMDS puts in its SYN-ACK.
pub const MSS_OPTION_LEN: usize = 4;

/// FIN flag.
pub const FIN: u8 = 0x01;
/// SYN flag.
pub const SYN: u8 = 0x02;
/// RST flag.
pub const RST: u8 = 0x04;
/// PSH flag.
pub const PSH: u8 = 0x08;
/// ACK flag.
pub const ACK: u8 = 0x10;

const OPTION_END: u8 = 0;
const OPTION_NOP: u8 = 1;
const OPTION_MSS: u8 = 2;

/// Errors of TCP parsing and building.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TcpError {
    /// Shorter than a header.
    #[error("TCP segment of {0} bytes is too short.")]
    TooShort(usize),
    /// Data offset below 5 words or past the segment end.
    #[error("TCP data offset of {0} words is invalid.")]
    BadDataOffset(u8),
    /// An option runs past the header or has an impossible length.
    #[error("Malformed TCP option.")]
    BadOption,
    /// Checksum mismatch.
    #[error("TCP checksum mismatch.")]
    BadChecksum,
    /// The output buffer cannot hold the segment.
    #[error("Buffer too small for the TCP segment.")]
    BufferTooSmall,
    /// A segment length does not fit the pseudo-header.
    #[error("TCP segment too large.")]
    TooLarge,
}

/// A parsed segment borrowing its payload.
#[derive(Debug, PartialEq, Eq)]
pub struct TcpSegment<'a> {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number (meaningful with [`ACK`]).
    pub ack: u32,
    /// Flag bits (the low 6; ECN bits are dropped).
    pub flags: u8,
    /// Advertised window (MMDS never negotiates scaling, so this is in bytes).
    pub window: u16,
    /// The MSS option, if present.
    pub mss: Option<u16>,
    /// Segment data.
    pub payload: &'a [u8],
}

impl TcpSegment<'_> {
    /// Whether all of `flags` are set.
    pub fn has(&self, flags: u8) -> bool {
        self.flags & flags == flags
    }

    /// Sequence space the segment occupies (data plus SYN and FIN).
    pub fn seq_len(&self) -> u32 {
        let data = u32::try_from(self.payload.len()).unwrap_or(u32::MAX);
        data.wrapping_add(u32::from(self.has(SYN)))
            .wrapping_add(u32::from(self.has(FIN)))
    }
}

/// Fields of a segment to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number.
    pub ack: u32,
    /// Flag bits.
    pub flags: u8,
    /// Advertised window.
    pub window: u16,
    /// MSS option to include (SYN-ACK only).
    pub mss: Option<u16>,
}

impl SegmentHeader {
    /// Header length including options.
    pub fn len(&self) -> usize {
        if self.mss.is_some() {
            HEADER_LEN + MSS_OPTION_LEN
        } else {
            HEADER_LEN
        }
    }

    /// Headers are never empty; present for API symmetry with `len`.
    pub fn is_empty(&self) -> bool {
        false
    }
}

fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, tcp_len: u16) -> u64 {
    let sum = checksum_add(0, &src.octets());
    let sum = checksum_add(sum, &dst.octets());
    checksum_add(sum, &[0, PROTOCOL_TCP, (tcp_len >> 8) as u8, tcp_len as u8])
}

/// Checksum of a whole segment (with its checksum field as is) under the pseudo-header;
/// zero for a segment whose checksum is right.
pub fn segment_checksum(src: Ipv4Addr, dst: Ipv4Addr, segment: &[u8]) -> Result<u16, TcpError> {
    let len = u16::try_from(segment.len()).map_err(|_| TcpError::TooLarge)?;
    Ok(checksum_finish(checksum_add(
        pseudo_header_sum(src, dst, len),
        segment,
    )))
}

/// Validates (checksum included) and parses a segment carried from `src` to `dst`.
pub fn parse(src: Ipv4Addr, dst: Ipv4Addr, bytes: &[u8]) -> Result<TcpSegment<'_>, TcpError> {
    let head = bytes
        .first_chunk::<HEADER_LEN>()
        .ok_or(TcpError::TooShort(bytes.len()))?;
    let data_offset = head[12] >> 4;
    let header_len = usize::from(data_offset) * 4;
    if header_len < HEADER_LEN {
        return Err(TcpError::BadDataOffset(data_offset));
    }
    let (header, payload) = bytes
        .split_at_checked(header_len)
        .ok_or(TcpError::BadDataOffset(data_offset))?;
    if segment_checksum(src, dst, bytes)? != 0 {
        return Err(TcpError::BadChecksum);
    }
    Ok(TcpSegment {
        src_port: u16::from_be_bytes([head[0], head[1]]),
        dst_port: u16::from_be_bytes([head[2], head[3]]),
        seq: u32::from_be_bytes([head[4], head[5], head[6], head[7]]),
        ack: u32::from_be_bytes([head[8], head[9], head[10], head[11]]),
        flags: head[13] & 0x3f,
        window: u16::from_be_bytes([head[14], head[15]]),
        mss: parse_mss(header.get(HEADER_LEN..).unwrap_or_default())?,
        payload,
    })
}

fn parse_mss(mut options: &[u8]) -> Result<Option<u16>, TcpError> {
    let mut mss = None;
    while let Some((&kind, rest)) = options.split_first() {
        match kind {
            OPTION_END => break,
            OPTION_NOP => options = rest,
            _ => {
                let len = usize::from(*rest.first().ok_or(TcpError::BadOption)?);
                if len < 2 {
                    return Err(TcpError::BadOption);
                }
                let (option, tail) = options.split_at_checked(len).ok_or(TcpError::BadOption)?;
                if kind == OPTION_MSS {
                    match option {
                        [_, 4, hi, lo] => mss = Some(u16::from_be_bytes([*hi, *lo])),
                        _ => return Err(TcpError::BadOption),
                    }
                }
                options = tail;
            }
        }
    }
    Ok(mss)
}

/// Writes `header` and `payload` at the start of `buf` with the checksum for `src` to
/// `dst`; returns the segment length.
pub fn write(
    buf: &mut [u8],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    header: &SegmentHeader,
    payload: &[u8],
) -> Result<usize, TcpError> {
    let header_len = header.len();
    let total = header_len
        .checked_add(payload.len())
        .ok_or(TcpError::TooLarge)?;
    let out = buf.get_mut(..total).ok_or(TcpError::BufferTooSmall)?;
    let (head, data) = out.split_at_mut(header_len);
    data.copy_from_slice(payload);
    let mut bytes = [0u8; HEADER_LEN + MSS_OPTION_LEN];
    bytes[0..2].copy_from_slice(&header.src_port.to_be_bytes());
    bytes[2..4].copy_from_slice(&header.dst_port.to_be_bytes());
    bytes[4..8].copy_from_slice(&header.seq.to_be_bytes());
    bytes[8..12].copy_from_slice(&header.ack.to_be_bytes());
    // Header lengths are 20 or 24: 5 or 6 words.
    bytes[12] = ((header_len / 4) as u8) << 4;
    bytes[13] = header.flags;
    bytes[14..16].copy_from_slice(&header.window.to_be_bytes());
    if let Some(mss) = header.mss {
        bytes[20] = OPTION_MSS;
        bytes[21] = 4;
        bytes[22..24].copy_from_slice(&mss.to_be_bytes());
    }
    let template = bytes.get(..header_len).ok_or(TcpError::BufferTooSmall)?;
    head.copy_from_slice(template);
    let sum = segment_checksum(src, dst, out)?;
    let field = out.get_mut(16..18).ok_or(TcpError::BufferTooSmall)?;
    field.copy_from_slice(&sum.to_be_bytes());
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const MMDS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

    fn header(flags: u8, mss: Option<u16>) -> SegmentHeader {
        SegmentHeader {
            src_port: 40000,
            dst_port: 80,
            seq: 0xdead_beef,
            ack: 0x0102_0304,
            flags,
            window: 1234,
            mss,
        }
    }

    #[test]
    fn round_trip() {
        let mut buf = [0u8; 100];
        let len = write(&mut buf, GUEST, MMDS, &header(SYN, Some(1460)), b"").unwrap();
        assert_eq!(len, 24);
        assert_eq!(buf[12], 0x60);
        let seg = parse(GUEST, MMDS, &buf[..len]).unwrap();
        assert_eq!(seg.src_port, 40000);
        assert_eq!(seg.dst_port, 80);
        assert_eq!(seg.seq, 0xdead_beef);
        assert_eq!(seg.ack, 0x0102_0304);
        assert_eq!(seg.flags, SYN);
        assert_eq!(seg.window, 1234);
        assert_eq!(seg.mss, Some(1460));
        assert_eq!(seg.seq_len(), 1);

        let len = write(
            &mut buf,
            GUEST,
            MMDS,
            &header(ACK | PSH | FIN, None),
            b"odd",
        )
        .unwrap();
        assert_eq!(len, 23);
        let seg = parse(GUEST, MMDS, &buf[..len]).unwrap();
        assert_eq!(seg.payload, b"odd");
        assert_eq!(seg.mss, None);
        assert!(seg.has(ACK | FIN));
        assert!(!seg.has(SYN));
        assert_eq!(seg.seq_len(), 4);
    }

    #[test]
    fn checksum_covers_pseudo_header() {
        let mut buf = [0u8; 40];
        let len = write(&mut buf, GUEST, MMDS, &header(ACK, None), b"data").unwrap();
        assert_eq!(
            parse(Ipv4Addr::new(10, 0, 0, 3), MMDS, &buf[..len]),
            Err(TcpError::BadChecksum)
        );
        let mut corrupt = buf;
        corrupt[21] ^= 0x40;
        assert_eq!(
            parse(GUEST, MMDS, &corrupt[..len]),
            Err(TcpError::BadChecksum)
        );
        assert!(parse(GUEST, MMDS, &buf[..len]).is_ok());
    }

    #[test]
    fn options() {
        assert_eq!(parse_mss(&[]), Ok(None));
        assert_eq!(parse_mss(&[1, 1, 2, 4, 5, 0xb4]), Ok(Some(1460)));
        // Window scale, SACK-permitted and timestamps are skipped.
        assert_eq!(
            parse_mss(&[3, 3, 7, 4, 2, 8, 10, 0, 0, 0, 0, 0, 0, 0, 0, 2, 4, 2, 0]),
            Ok(Some(512))
        );
        assert_eq!(parse_mss(&[0, 2, 4]), Ok(None));
        assert_eq!(parse_mss(&[2]), Err(TcpError::BadOption));
        assert_eq!(parse_mss(&[2, 4, 5]), Err(TcpError::BadOption));
        assert_eq!(parse_mss(&[2, 3, 5]), Err(TcpError::BadOption));
        assert_eq!(parse_mss(&[8, 1]), Err(TcpError::BadOption));
        assert_eq!(parse_mss(&[8, 0, 1]), Err(TcpError::BadOption));
    }

    #[test]
    fn malformed_headers() {
        let mut buf = [0u8; 40];
        let len = write(&mut buf, GUEST, MMDS, &header(ACK, None), b"").unwrap();
        assert_eq!(parse(GUEST, MMDS, &buf[..19]), Err(TcpError::TooShort(19)));
        let mut bad = buf;
        bad[12] = 0x40;
        assert_eq!(
            parse(GUEST, MMDS, &bad[..len]),
            Err(TcpError::BadDataOffset(4))
        );
        let mut bad = buf;
        bad[12] = 0xf0;
        assert_eq!(
            parse(GUEST, MMDS, &bad[..len]),
            Err(TcpError::BadDataOffset(15))
        );
        assert_eq!(
            write(&mut [0; 23], GUEST, MMDS, &header(SYN, Some(1)), b""),
            Err(TcpError::BufferTooSmall)
        );
    }
}
