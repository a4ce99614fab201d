//! IPv4 headers (RFC 791) and the Internet checksum (RFC 1071).

use std::net::Ipv4Addr;

/// Length of an IPv4 header without options (the only kind MMDS accepts or sends).
pub const HEADER_LEN: usize = 20;
/// Protocol number of TCP.
pub const PROTOCOL_TCP: u8 = 6;

const DEFAULT_TTL: u8 = 64;
const FLAG_DONT_FRAGMENT: u16 = 0x4000;
const FLAG_MORE_FRAGMENTS: u16 = 0x2000;
const FRAGMENT_OFFSET_MASK: u16 = 0x1fff;

/// Errors of IPv4 parsing and building.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Ipv4Error {
    /// Shorter than a header.
    #[error("IPv4 packet of {0} bytes is too short.")]
    TooShort(usize),
    /// Version field is not 4.
    #[error("Not an IPv4 packet (version {0}).")]
    NotVersion4(u8),
    /// Options are legal IPv4 but nothing MMDS talks needs them.
    #[error("IPv4 header length {0} words is not supported (options or invalid).")]
    UnsupportedHeaderLength(u8),
    /// Total length disagrees with the header or the frame.
    #[error("IPv4 total length {0} is invalid.")]
    BadTotalLength(u16),
    /// MMDS never reassembles.
    #[error("IPv4 fragments are not supported.")]
    Fragmented,
    /// Header checksum mismatch.
    #[error("IPv4 header checksum mismatch.")]
    BadChecksum,
    /// Payload too large for the total length field.
    #[error("IPv4 payload of {0} bytes is too large.")]
    PayloadTooLarge(usize),
    /// The output buffer cannot hold the header.
    #[error("Buffer too small for an IPv4 header.")]
    BufferTooSmall,
}

/// A parsed packet borrowing its payload.
#[derive(Debug, PartialEq, Eq)]
pub struct Ipv4Packet<'a> {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Upper-layer protocol.
    pub protocol: u8,
    /// The payload, without any Ethernet padding past the total length.
    pub payload: &'a [u8],
}

/// Adds `data` to a one's-complement sum as big-endian 16-bit words (odd tail zero-padded).
pub fn checksum_add(mut sum: u64, data: &[u8]) -> u64 {
    let mut words = data.chunks_exact(2);
    for word in &mut words {
        if let [hi, lo] = word {
            sum = sum.wrapping_add(u64::from(u16::from_be_bytes([*hi, *lo])));
        }
    }
    if let [last] = words.remainder() {
        sum = sum.wrapping_add(u64::from(u16::from_be_bytes([*last, 0])));
    }
    sum
}

/// Folds a sum into the 16-bit checksum field value.
pub fn checksum_finish(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff).wrapping_add(sum >> 16);
    }
    // The loop leaves at most 16 bits.
    !(sum as u16)
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    checksum_finish(checksum_add(0, data))
}

/// Validates and splits a packet.
pub fn parse(bytes: &[u8]) -> Result<Ipv4Packet<'_>, Ipv4Error> {
    let head = bytes
        .first_chunk::<HEADER_LEN>()
        .ok_or(Ipv4Error::TooShort(bytes.len()))?;
    let version = head[0] >> 4;
    if version != 4 {
        return Err(Ipv4Error::NotVersion4(version));
    }
    let ihl = head[0] & 0x0f;
    if usize::from(ihl) * 4 != HEADER_LEN {
        return Err(Ipv4Error::UnsupportedHeaderLength(ihl));
    }
    let total_len = u16::from_be_bytes([head[2], head[3]]);
    if usize::from(total_len) < HEADER_LEN || usize::from(total_len) > bytes.len() {
        return Err(Ipv4Error::BadTotalLength(total_len));
    }
    let flags_fragment = u16::from_be_bytes([head[6], head[7]]);
    if flags_fragment & (FLAG_MORE_FRAGMENTS | FRAGMENT_OFFSET_MASK) != 0 {
        return Err(Ipv4Error::Fragmented);
    }
    if checksum(head) != 0 {
        return Err(Ipv4Error::BadChecksum);
    }
    let payload = bytes
        .get(HEADER_LEN..usize::from(total_len))
        .ok_or(Ipv4Error::BadTotalLength(total_len))?;
    Ok(Ipv4Packet {
        src: Ipv4Addr::from([head[12], head[13], head[14], head[15]]),
        dst: Ipv4Addr::from([head[16], head[17], head[18], head[19]]),
        protocol: head[9],
        payload,
    })
}

/// Writes a header (DF set, TTL 64) for a payload of `payload_len` bytes at the start of
/// `buf`; returns its length.
pub fn write_header(
    buf: &mut [u8],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    payload_len: usize,
    identification: u16,
) -> Result<usize, Ipv4Error> {
    let total_len = payload_len
        .checked_add(HEADER_LEN)
        .and_then(|len| u16::try_from(len).ok())
        .ok_or(Ipv4Error::PayloadTooLarge(payload_len))?;
    let head = buf
        .first_chunk_mut::<HEADER_LEN>()
        .ok_or(Ipv4Error::BufferTooSmall)?;
    let mut bytes = [0u8; HEADER_LEN];
    bytes[0] = 0x45;
    bytes[2..4].copy_from_slice(&total_len.to_be_bytes());
    bytes[4..6].copy_from_slice(&identification.to_be_bytes());
    bytes[6..8].copy_from_slice(&FLAG_DONT_FRAGMENT.to_be_bytes());
    bytes[8] = DEFAULT_TTL;
    bytes[9] = protocol;
    bytes[12..16].copy_from_slice(&src.octets());
    bytes[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&bytes);
    bytes[10..12].copy_from_slice(&sum.to_be_bytes());
    *head = bytes;
    Ok(HEADER_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const DST: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

    fn packet(payload: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; HEADER_LEN + payload.len()];
        write_header(&mut buf, SRC, DST, PROTOCOL_TCP, payload.len(), 7).unwrap();
        buf[HEADER_LEN..].copy_from_slice(payload);
        buf
    }

    #[test]
    fn rfc1071_example() {
        assert_eq!(
            checksum_add(0, &[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0x2_ddf0
        );
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
        assert_eq!(checksum(&[0xab]), !0xab00);
    }

    #[test]
    fn known_header_checksum() {
        // A classic capture: 45 00 00 73 00 00 40 00 40 11 [b8 61] c0 a8 00 01 c0 a8 00 c7.
        let header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&header), 0xb861);
        let mut buf = [0u8; 20];
        write_header(
            &mut buf,
            Ipv4Addr::new(192, 168, 0, 1),
            Ipv4Addr::new(192, 168, 0, 199),
            17,
            0x73 - 20,
            0,
        )
        .unwrap();
        assert_eq!(buf, {
            let mut h = header;
            h[10] = 0xb8;
            h[11] = 0x61;
            h
        });
    }

    #[test]
    fn round_trip_trims_padding() {
        let mut bytes = packet(b"hello");
        bytes.extend_from_slice(&[0; 10]);
        let parsed = parse(&bytes).unwrap();
        assert_eq!(parsed.src, SRC);
        assert_eq!(parsed.dst, DST);
        assert_eq!(parsed.protocol, PROTOCOL_TCP);
        assert_eq!(parsed.payload, b"hello");
    }

    #[test]
    fn rejects_malformed() {
        let good = packet(b"data");
        assert_eq!(parse(&good[..19]), Err(Ipv4Error::TooShort(19)));

        let mut bad = good.clone();
        bad[0] = 0x65;
        assert_eq!(parse(&bad), Err(Ipv4Error::NotVersion4(6)));

        for ihl in [0u8, 4, 6, 15] {
            let mut bad = good.clone();
            bad[0] = 0x40 | ihl;
            assert_eq!(parse(&bad), Err(Ipv4Error::UnsupportedHeaderLength(ihl)));
        }

        let mut bad = good.clone();
        bad[3] = 0xff;
        assert!(matches!(parse(&bad), Err(Ipv4Error::BadTotalLength(_))));
        let mut bad = good.clone();
        bad[3] = 10;
        assert!(matches!(parse(&bad), Err(Ipv4Error::BadTotalLength(10))));

        for fragment in [[0x20, 0], [0, 1], [0x40, 8]] {
            let mut bad = good.clone();
            bad[6..8].copy_from_slice(&fragment);
            assert_eq!(parse(&bad), Err(Ipv4Error::Fragmented));
        }

        let mut bad = good.clone();
        bad[8] ^= 1;
        assert_eq!(parse(&bad), Err(Ipv4Error::BadChecksum));
    }

    #[test]
    fn write_errors() {
        assert_eq!(
            write_header(&mut [0; 19], SRC, DST, 6, 0, 0),
            Err(Ipv4Error::BufferTooSmall)
        );
        assert_eq!(
            write_header(&mut [0; 20], SRC, DST, 6, 65516, 0),
            Err(Ipv4Error::PayloadTooLarge(65516))
        );
    }
}
