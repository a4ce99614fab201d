//! The guest-facing network stack of MMDS: pure functions over frames, no host I/O.
//!
//! The net device asks [`MmdsStack::is_for_mmds`] about every frame the guest transmits;
//! frames for MMDS go to [`MmdsStack::receive_frame`] instead of the TAP, and the device
//! injects what [`MmdsStack::write_next_frame`] produces into the guest's RX queue.

pub mod arp;
pub mod connection;
pub mod ethernet;
pub mod ipv4;
pub mod tcp;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::net::Ipv4Addr;
use std::time::Instant;

use self::arp::ArpPacket;
use self::connection::Connection;
use self::ethernet::{ETHERTYPE_ARP, ETHERTYPE_IPV4, MacAddr};
use self::tcp::{ACK, RST, SYN, SegmentHeader, TcpSegment};
use super::Mmds;

/// MAC address MMDS answers from: locally administered, unicast.
pub const MMDS_MAC: MacAddr = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];
/// The HTTP port MMDS listens on.
pub const MMDS_TCP_PORT: u16 = 80;
/// Concurrent connections; SYNs beyond this are refused with a RST.
pub const MAX_CONNECTIONS: usize = 30;
/// Smallest buffer [`MmdsStack::write_next_frame`] writes into: headers of a SYN-ACK plus
/// one byte, so every kind of reply fits (data segments shrink to the buffer).
pub const MIN_FRAME_BUFFER: usize =
    ethernet::HEADER_LEN + ipv4::HEADER_LEN + tcp::HEADER_LEN + tcp::MSS_OPTION_LEN + 1;
/// Replies not tied to a connection (ARP replies, RSTs) waiting to be sent; more are dropped.
const MAX_CONTROL_FRAMES: usize = 64;

/// Why a guest frame was dropped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StackError {
    /// Bad Ethernet header.
    #[error(transparent)]
    Ethernet(#[from] ethernet::EthernetError),
    /// Bad ARP packet.
    #[error(transparent)]
    Arp(#[from] arp::ArpError),
    /// Bad or unsupported IPv4 packet.
    #[error(transparent)]
    Ipv4(#[from] ipv4::Ipv4Error),
    /// Bad TCP segment.
    #[error(transparent)]
    Tcp(#[from] tcp::TcpError),
    /// Not addressed to MMDS (the device should not have passed it in).
    #[error("Frame is not addressed to MMDS.")]
    NotForMmds,
    /// IPv4 traffic for MMDS other than TCP.
    #[error("IPv4 protocol {0} is not served by MMDS.")]
    UnsupportedProtocol(u8),
    /// Too many replies already waiting.
    #[error("MMDS reply queue is full.")]
    QueueFull,
}

/// Counters of the stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmdsStackStats {
    /// Frames passed to [`MmdsStack::receive_frame`].
    pub frames_received: u64,
    /// Frames dropped as malformed, unsupported or unanswerable.
    pub frames_dropped: u64,
    /// Frames written by [`MmdsStack::write_next_frame`].
    pub frames_sent: u64,
    /// ARP replies queued.
    pub arp_replies: u64,
    /// Connections accepted.
    pub connections_opened: u64,
    /// SYNs refused because [`MAX_CONNECTIONS`] were open.
    pub connections_refused: u64,
    /// RST segments sent (refusals, unknown connections, abandoned connections).
    pub resets_sent: u64,
}

enum Control {
    Arp {
        dst_mac: MacAddr,
        packet: ArpPacket,
    },
    Rst {
        dst_mac: MacAddr,
        dst_ip: Ipv4Addr,
        header: SegmentHeader,
    },
}

/// The MMDS endpoint of one net device.
pub struct MmdsStack {
    ip: Ipv4Addr,
    mac: MacAddr,
    connections: Vec<Connection>,
    control: VecDeque<Control>,
    next_connection: usize,
    ip_identification: u16,
    fixed_isn: Option<u32>,
    stats: MmdsStackStats,
}

impl MmdsStack {
    /// A stack answering for `ipv4` from `mac` (normally [`MMDS_MAC`]).
    pub fn new(ipv4: Ipv4Addr, mac: MacAddr) -> Self {
        Self {
            ip: ipv4,
            mac,
            connections: Vec::new(),
            control: VecDeque::new(),
            next_connection: 0,
            ip_identification: 0,
            fixed_isn: None,
            stats: MmdsStackStats::default(),
        }
    }

    /// Makes initial sequence numbers predictable so a fuzzer can complete handshakes.
    /// Never use outside fuzzing and tests.
    #[doc(hidden)]
    pub fn set_fixed_isn(&mut self, isn: u32) {
        self.fixed_isn = Some(isn);
    }

    /// Counters so far.
    pub fn stats(&self) -> MmdsStackStats {
        self.stats
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// Cheap test of a guest TX frame: an ARP request for the MMDS address, or any IPv4
    /// packet to it. Such frames belong to MMDS and must not reach the TAP.
    pub fn is_for_mmds(&self, frame: &[u8]) -> bool {
        let ethertype = frame.get(12..14);
        let octets = self.ip.octets();
        if ethertype == Some(&ETHERTYPE_ARP.to_be_bytes()[..]) {
            // Operation at 20..22, target protocol address at 38..42.
            frame.get(20..22) == Some(&arp::OP_REQUEST.to_be_bytes()[..])
                && frame.get(38..42) == Some(&octets[..])
        } else if ethertype == Some(&ETHERTYPE_IPV4.to_be_bytes()[..]) {
            frame.get(30..34) == Some(&octets[..])
        } else {
            false
        }
    }

    /// Consumes one guest frame; malformed or unanswerable frames are counted and dropped.
    pub fn receive_frame(&mut self, frame: &[u8], mmds: &mut Mmds, now: Instant) {
        self.stats.frames_received = self.stats.frames_received.wrapping_add(1);
        self.run_timers(now);
        if let Err(err) = self.dispatch(frame, mmds, now) {
            self.stats.frames_dropped = self.stats.frames_dropped.wrapping_add(1);
            log::debug!("MMDS dropped a guest frame: {err}");
        }
        self.reap();
    }

    /// Whether a reply is ready. Expired timers are not considered: when
    /// [`Self::next_timer`] has passed, call [`Self::write_next_frame`] regardless.
    pub fn pending_frame(&self) -> bool {
        !self.control.is_empty() || self.connections.iter().any(Connection::has_output)
    }

    /// Earliest instant at which [`Self::write_next_frame`] may have new work (retransmission,
    /// window probe or connection expiry).
    pub fn next_timer(&self) -> Option<Instant> {
        self.connections
            .iter()
            .filter_map(Connection::next_deadline)
            .min()
    }

    /// Writes the next reply Ethernet frame for the guest into `buf` and returns its length.
    ///
    /// Data segments are sized to fit `buf`, so nothing is ever truncated. A `buf` shorter
    /// than [`MIN_FRAME_BUFFER`] gets nothing and leaves every reply queued.
    pub fn write_next_frame(&mut self, buf: &mut [u8], now: Instant) -> Option<usize> {
        self.run_timers(now);
        if buf.len() < MIN_FRAME_BUFFER {
            return None;
        }
        let written = match self.control.pop_front() {
            Some(control) => self.write_control(buf, control),
            None => self.write_connection_frame(buf, now),
        };
        self.reap();
        if written.is_some() {
            self.stats.frames_sent = self.stats.frames_sent.wrapping_add(1);
        }
        written
    }

    fn dispatch(&mut self, frame: &[u8], mmds: &mut Mmds, now: Instant) -> Result<(), StackError> {
        let eth = ethernet::parse(frame)?;
        match eth.ethertype {
            ETHERTYPE_ARP => {
                let request = arp::parse(eth.payload)?;
                let reply = request
                    .reply_from(self.mac, self.ip)
                    .ok_or(StackError::NotForMmds)?;
                self.queue(Control::Arp {
                    dst_mac: eth.src,
                    packet: reply,
                })?;
                self.stats.arp_replies = self.stats.arp_replies.wrapping_add(1);
                Ok(())
            }
            ETHERTYPE_IPV4 => {
                let packet = ipv4::parse(eth.payload)?;
                if packet.dst != self.ip {
                    return Err(StackError::NotForMmds);
                }
                if packet.protocol != ipv4::PROTOCOL_TCP {
                    return Err(StackError::UnsupportedProtocol(packet.protocol));
                }
                let segment = tcp::parse(packet.src, packet.dst, packet.payload)?;
                self.handle_segment(eth.src, packet.src, &segment, mmds, now)
            }
            _ => Err(StackError::NotForMmds),
        }
    }

    fn handle_segment(
        &mut self,
        mac: MacAddr,
        ip: Ipv4Addr,
        seg: &TcpSegment,
        mmds: &mut Mmds,
        now: Instant,
    ) -> Result<(), StackError> {
        if seg.dst_port == MMDS_TCP_PORT {
            if let Some(connection) = self
                .connections
                .iter_mut()
                .find(|c| c.matches(ip, seg.src_port))
            {
                connection.set_peer_mac(mac);
                connection.on_segment(seg, mmds, now);
                return Ok(());
            }
            if seg.has(SYN) && !seg.has(ACK) && !seg.has(RST) {
                if self.connections.len() < MAX_CONNECTIONS {
                    let isn = self.fixed_isn.unwrap_or_else(random_u32);
                    self.connections.push(Connection::new(mac, ip, seg, isn));
                    self.stats.connections_opened = self.stats.connections_opened.wrapping_add(1);
                    return Ok(());
                }
                self.stats.connections_refused = self.stats.connections_refused.wrapping_add(1);
            }
        }
        self.queue_reset(mac, ip, seg)
    }

    /// RFC 9293 reset generation for a segment no connection wants.
    fn queue_reset(
        &mut self,
        mac: MacAddr,
        ip: Ipv4Addr,
        seg: &TcpSegment,
    ) -> Result<(), StackError> {
        if seg.has(RST) {
            return Ok(());
        }
        let (seq, ack, flags) = if seg.has(ACK) {
            (seg.ack, 0, RST)
        } else {
            (0, seg.seq.wrapping_add(seg.seq_len()), RST | ACK)
        };
        self.queue(Control::Rst {
            dst_mac: mac,
            dst_ip: ip,
            header: SegmentHeader {
                src_port: seg.dst_port,
                dst_port: seg.src_port,
                seq,
                ack,
                flags,
                window: 0,
                mss: None,
            },
        })
    }

    fn queue(&mut self, control: Control) -> Result<(), StackError> {
        if self.control.len() >= MAX_CONTROL_FRAMES {
            return Err(StackError::QueueFull);
        }
        self.control.push_back(control);
        Ok(())
    }

    fn run_timers(&mut self, now: Instant) {
        for connection in &mut self.connections {
            connection.on_timer(now);
        }
    }

    fn reap(&mut self) {
        self.connections.retain(|c| !c.is_done());
    }

    fn write_control(&mut self, buf: &mut [u8], control: Control) -> Option<usize> {
        let result = match control {
            Control::Arp { dst_mac, packet } => write_arp(buf, self.mac, dst_mac, &packet),
            Control::Rst {
                dst_mac,
                dst_ip,
                header,
            } => {
                self.stats.resets_sent = self.stats.resets_sent.wrapping_add(1);
                let ident = self.next_identification();
                write_tcp(buf, self.mac, dst_mac, self.ip, dst_ip, ident, &header, &[])
            }
        };
        self.written(result)
    }

    fn write_connection_frame(&mut self, buf: &mut [u8], now: Instant) -> Option<usize> {
        let count = self.connections.len();
        let max_payload = buf
            .len()
            .saturating_sub(ethernet::HEADER_LEN + ipv4::HEADER_LEN + tcp::HEADER_LEN);
        for step in 0..count {
            let index = self.next_connection.wrapping_add(step).checked_rem(count)?;
            let Some(connection) = self.connections.get_mut(index) else {
                continue;
            };
            let Some(out) = connection.next_segment(now, max_payload) else {
                continue;
            };
            // Round robin keeps one large response from starving the other connections.
            self.next_connection = index.wrapping_add(1);
            if out.header.flags & RST != 0 {
                self.stats.resets_sent = self.stats.resets_sent.wrapping_add(1);
            }
            let ident = self.next_identification();
            let connection = self.connections.get(index)?;
            let (dst_mac, dst_ip) = connection.peer();
            let result = write_tcp(
                buf,
                self.mac,
                dst_mac,
                self.ip,
                dst_ip,
                ident,
                &out.header,
                connection.tx_bytes(out.payload),
            );
            return self.written(result);
        }
        None
    }

    fn written(&mut self, result: Result<usize, StackError>) -> Option<usize> {
        match result {
            Ok(len) => Some(len),
            Err(err) => {
                // Unreachable with MIN_FRAME_BUFFER enforced; the segment is lost, and
                // retransmission covers data.
                log::warn!("MMDS could not build a reply frame: {err}");
                None
            }
        }
    }

    fn next_identification(&mut self) -> u16 {
        self.ip_identification = self.ip_identification.wrapping_add(1);
        self.ip_identification
    }
}

fn write_arp(
    buf: &mut [u8],
    src_mac: MacAddr,
    dst_mac: MacAddr,
    packet: &ArpPacket,
) -> Result<usize, StackError> {
    let head = ethernet::write_header(buf, dst_mac, src_mac, ETHERTYPE_ARP)?;
    let body = packet.write(buf.get_mut(head..).unwrap_or_default())?;
    Ok(head.saturating_add(body))
}

#[allow(clippy::too_many_arguments)]
fn write_tcp(
    buf: &mut [u8],
    src_mac: MacAddr,
    dst_mac: MacAddr,
    src_ip: Ipv4Addr,
    dst_ip: Ipv4Addr,
    identification: u16,
    header: &SegmentHeader,
    payload: &[u8],
) -> Result<usize, StackError> {
    const IP_START: usize = ethernet::HEADER_LEN;
    const TCP_START: usize = IP_START + ipv4::HEADER_LEN;
    let tcp_len = tcp::write(
        buf.get_mut(TCP_START..).unwrap_or_default(),
        src_ip,
        dst_ip,
        header,
        payload,
    )?;
    ipv4::write_header(
        buf.get_mut(IP_START..).unwrap_or_default(),
        src_ip,
        dst_ip,
        ipv4::PROTOCOL_TCP,
        tcp_len,
        identification,
    )?;
    ethernet::write_header(buf, dst_mac, src_mac, ETHERTYPE_IPV4)?;
    Ok(TCP_START.saturating_add(tcp_len))
}

/// Initial sequence numbers must be unpredictable (RFC 6528) so a guest process cannot
/// spoof into another's connection.
fn random_u32() -> u32 {
    let mut bytes = [0u8; 4];
    if super::token::fill_random(&mut bytes).is_ok() {
        return u32::from_ne_bytes(bytes);
    }
    // The standard hasher is keyed from the OS's randomness once per process.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(Instant::now().elapsed().as_nanos());
    hasher.finish() as u32
}
