//! ARP for IPv4 over Ethernet (RFC 826).

use std::net::Ipv4Addr;

use super::ethernet::MacAddr;

/// Length of an Ethernet/IPv4 ARP packet.
pub const PACKET_LEN: usize = 28;
/// ARP request operation.
pub const OP_REQUEST: u16 = 1;
/// ARP reply operation.
pub const OP_REPLY: u16 = 2;

const HTYPE_ETHERNET: u16 = 1;
const PTYPE_IPV4: u16 = 0x0800;

/// Errors of ARP parsing and building.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArpError {
    /// Shorter than an Ethernet/IPv4 ARP packet.
    #[error("ARP packet of {0} bytes is too short.")]
    TooShort(usize),
    /// Other hardware or protocol types.
    #[error("ARP packet is not for IPv4 over Ethernet.")]
    Unsupported,
    /// The output buffer cannot hold the packet.
    #[error("Buffer too small for an ARP packet.")]
    BufferTooSmall,
}

/// An Ethernet/IPv4 ARP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArpPacket {
    /// [`OP_REQUEST`] or [`OP_REPLY`] (others are parsed and ignored by callers).
    pub operation: u16,
    /// Sender hardware address.
    pub sender_mac: MacAddr,
    /// Sender protocol address.
    pub sender_ip: Ipv4Addr,
    /// Target hardware address.
    pub target_mac: MacAddr,
    /// Target protocol address.
    pub target_ip: Ipv4Addr,
}

fn field<const N: usize>(bytes: &[u8], at: usize) -> Result<[u8; N], ArpError> {
    bytes
        .get(at..)
        .and_then(|rest| rest.first_chunk::<N>())
        .copied()
        .ok_or(ArpError::TooShort(bytes.len()))
}

/// Parses the ARP payload of an Ethernet frame (trailing padding is ignored).
pub fn parse(bytes: &[u8]) -> Result<ArpPacket, ArpError> {
    if bytes.len() < PACKET_LEN {
        return Err(ArpError::TooShort(bytes.len()));
    }
    let htype = u16::from_be_bytes(field(bytes, 0)?);
    let ptype = u16::from_be_bytes(field(bytes, 2)?);
    let [hlen, plen] = field(bytes, 4)?;
    if htype != HTYPE_ETHERNET || ptype != PTYPE_IPV4 || hlen != 6 || plen != 4 {
        return Err(ArpError::Unsupported);
    }
    Ok(ArpPacket {
        operation: u16::from_be_bytes(field(bytes, 6)?),
        sender_mac: field(bytes, 8)?,
        sender_ip: Ipv4Addr::from(field::<4>(bytes, 14)?),
        target_mac: field(bytes, 18)?,
        target_ip: Ipv4Addr::from(field::<4>(bytes, 24)?),
    })
}

impl ArpPacket {
    /// The reply `our_mac` owes to this packet if it asks for `our_ip`.
    pub fn reply_from(&self, our_mac: MacAddr, our_ip: Ipv4Addr) -> Option<ArpPacket> {
        (self.operation == OP_REQUEST && self.target_ip == our_ip).then_some(ArpPacket {
            operation: OP_REPLY,
            sender_mac: our_mac,
            sender_ip: our_ip,
            target_mac: self.sender_mac,
            target_ip: self.sender_ip,
        })
    }

    /// Writes the packet at the start of `buf`; returns its length.
    pub fn write(&self, buf: &mut [u8]) -> Result<usize, ArpError> {
        let out = buf
            .first_chunk_mut::<PACKET_LEN>()
            .ok_or(ArpError::BufferTooSmall)?;
        let mut bytes = [0u8; PACKET_LEN];
        bytes[0..2].copy_from_slice(&HTYPE_ETHERNET.to_be_bytes());
        bytes[2..4].copy_from_slice(&PTYPE_IPV4.to_be_bytes());
        bytes[4] = 6;
        bytes[5] = 4;
        bytes[6..8].copy_from_slice(&self.operation.to_be_bytes());
        bytes[8..14].copy_from_slice(&self.sender_mac);
        bytes[14..18].copy_from_slice(&self.sender_ip.octets());
        bytes[18..24].copy_from_slice(&self.target_mac);
        bytes[24..28].copy_from_slice(&self.target_ip.octets());
        *out = bytes;
        Ok(PACKET_LEN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A request from 10.0.0.2 (02:00:00:00:00:02) asking who has 169.254.169.254.
    const REQUEST: [u8; 28] = [
        0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01, 0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 10, 0,
        0, 2, 0, 0, 0, 0, 0, 0, 169, 254, 169, 254,
    ];
    const MMDS_MAC: MacAddr = [6, 1, 0x23, 0x45, 0x67, 1];
    const MMDS_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

    #[test]
    fn parse_request_and_reply() {
        let request = parse(&REQUEST).unwrap();
        assert_eq!(request.operation, OP_REQUEST);
        assert_eq!(request.sender_ip, Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(request.target_ip, MMDS_IP);
        let reply = request.reply_from(MMDS_MAC, MMDS_IP).unwrap();
        let mut buf = [0u8; 30];
        assert_eq!(reply.write(&mut buf), Ok(28));
        assert_eq!(&buf[6..8], &[0, 2]);
        assert_eq!(&buf[8..14], &MMDS_MAC);
        assert_eq!(&buf[14..18], &[169, 254, 169, 254]);
        assert_eq!(&buf[18..24], &[2, 0, 0, 0, 0, 2]);
        assert_eq!(&buf[24..28], &[10, 0, 0, 2]);
        assert_eq!(parse(&buf).unwrap(), reply);
    }

    #[test]
    fn no_reply_for_others() {
        let request = parse(&REQUEST).unwrap();
        assert!(
            request
                .reply_from(MMDS_MAC, Ipv4Addr::new(169, 254, 1, 1))
                .is_none()
        );
        let reply = ArpPacket {
            operation: OP_REPLY,
            ..request
        };
        assert!(reply.reply_from(MMDS_MAC, MMDS_IP).is_none());
    }

    #[test]
    fn malformed() {
        assert_eq!(parse(&REQUEST[..27]), Err(ArpError::TooShort(27)));
        let mut other = REQUEST;
        other[5] = 16;
        assert_eq!(parse(&other), Err(ArpError::Unsupported));
        let mut other = REQUEST;
        other[3] = 0xdd;
        assert_eq!(parse(&other), Err(ArpError::Unsupported));
        assert_eq!(
            parse(&REQUEST).unwrap().write(&mut [0; 27]),
            Err(ArpError::BufferTooSmall)
        );
    }
}
