//! One guest TCP connection to the MMDS HTTP server (passive open only).
//!
//! Deliberately small: in-order delivery only (the guest retransmits anything dropped),
//! go-back-N retransmission, no window scaling, SACK or timestamps, and one HTTP response
//! in flight at a time so host memory per connection stays bounded by the request limit
//! plus one response.

use std::net::Ipv4Addr;
use std::ops::Range;
use std::time::{Duration, Instant};

use super::ethernet::MacAddr;
use super::tcp::{ACK, FIN, PSH, RST, SYN, SegmentHeader, TcpSegment};
use crate::mmds::Mmds;
use crate::mmds::guest_http::{self, MAX_REQUEST_SIZE, Parsed};

/// MSS announced to the guest and upper bound on segment payloads.
pub const OUR_MSS: u16 = 1460;
/// RFC 9293 default when the SYN carries no MSS option.
const DEFAULT_PEER_MSS: u16 = 536;
/// Floor on the peer's MSS so a hostile guest cannot make every byte cost a frame.
const MIN_PEER_MSS: u16 = 64;
/// First retransmission timeout; doubled on every expiry.
pub const INITIAL_RTO: Duration = Duration::from_millis(500);
const MAX_RTO: Duration = Duration::from_secs(8);
/// Expiries tolerated before the connection is reset.
pub const MAX_RETRIES: u32 = 6;
/// How long a connection whose FIN was acknowledged waits for the guest's FIN.
pub const FIN_WAIT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// SYN-ACK sent (or due), waiting for its acknowledgment.
    SynReceived,
    /// Handshake done; closing is tracked by the FIN fields.
    Established,
}

/// A segment to emit: its header and the range of the response buffer it carries.
#[derive(Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// Header fields.
    pub header: SegmentHeader,
    /// Payload bytes, as a range of [`Connection::tx_bytes`].
    pub payload: Range<usize>,
}

enum Plan {
    Rst,
    SynAck,
    Data { offset: usize, len: usize },
    Fin,
    Ack,
}

/// `a` is before `b` in sequence space.
fn seq_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// Sequence arithmetic on lengths bounded by buffer sizes far below 2^32.
fn seq_len(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// State of one connection.
#[derive(Debug)]
pub struct Connection {
    peer_mac: MacAddr,
    peer_ip: Ipv4Addr,
    peer_port: u16,
    local_port: u16,
    state: State,

    irs: u32,
    rcv_nxt: u32,
    request: Vec<u8>,
    peer_fin: bool,
    advertised_zero: bool,

    iss: u32,
    snd_una: u32,
    snd_nxt: u32,
    snd_max: u32,
    snd_wnd: u16,
    peer_mss: usize,
    /// The response being delivered; `tx_seq` is the sequence number of its first byte.
    tx: Vec<u8>,
    tx_seq: u32,

    close_requested: bool,
    fin_seq: Option<u32>,
    fin_sent: bool,
    need_ack: bool,
    send_rst: bool,
    closed: bool,

    rto: Duration,
    retries: u32,
    probe: bool,
    deadline: Option<Instant>,
    linger_until: Option<Instant>,
}

impl Connection {
    /// A connection for a guest SYN; its SYN-ACK is the first thing [`Self::next_segment`]
    /// returns.
    pub fn new(peer_mac: MacAddr, peer_ip: Ipv4Addr, syn: &TcpSegment, iss: u32) -> Self {
        let peer_mss = syn
            .mss
            .unwrap_or(DEFAULT_PEER_MSS)
            .clamp(MIN_PEER_MSS, OUR_MSS);
        Self {
            peer_mac,
            peer_ip,
            peer_port: syn.src_port,
            local_port: syn.dst_port,
            state: State::SynReceived,
            irs: syn.seq,
            rcv_nxt: syn.seq.wrapping_add(1),
            request: Vec::new(),
            peer_fin: false,
            advertised_zero: false,
            iss,
            snd_una: iss,
            snd_nxt: iss,
            snd_max: iss,
            snd_wnd: syn.window,
            peer_mss: usize::from(peer_mss),
            tx: Vec::new(),
            tx_seq: iss.wrapping_add(1),
            close_requested: false,
            fin_seq: None,
            fin_sent: false,
            need_ack: false,
            send_rst: false,
            closed: false,
            rto: INITIAL_RTO,
            retries: 0,
            probe: false,
            deadline: None,
            linger_until: None,
        }
    }

    /// Whether this connection is the one of the guest's `ip`:`port`.
    pub fn matches(&self, ip: Ipv4Addr, port: u16) -> bool {
        self.peer_ip == ip && self.peer_port == port
    }

    /// Where replies go.
    pub fn peer(&self) -> (MacAddr, Ipv4Addr) {
        (self.peer_mac, self.peer_ip)
    }

    /// Follows the guest if its MAC changes mid-connection.
    pub fn set_peer_mac(&mut self, mac: MacAddr) {
        self.peer_mac = mac;
    }

    /// Bytes of the response buffer.
    pub fn tx_bytes(&self, range: Range<usize>) -> &[u8] {
        self.tx.get(range).unwrap_or_default()
    }

    /// Bytes held for this connection (request plus response), for memory-bound checks.
    pub fn buffered(&self) -> usize {
        self.request.len().saturating_add(self.tx.len())
    }

    /// Nothing more will be sent or accepted: the stack can forget this connection.
    pub fn is_done(&self) -> bool {
        if self.send_rst {
            return false;
        }
        self.closed || (self.fin_acked() && self.peer_fin && !self.need_ack)
    }

    /// When [`Self::on_timer`] next has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        match (self.deadline, self.linger_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether [`Self::next_segment`] has something to emit.
    pub fn has_output(&self) -> bool {
        self.plan(usize::MAX).is_some()
    }

    /// Handles one guest segment addressed to this connection.
    pub fn on_segment(&mut self, seg: &TcpSegment, mmds: &mut Mmds, now: Instant) {
        if self.closed || self.send_rst {
            return;
        }
        if seg.has(RST) {
            if self.in_receive_window(seg.seq) {
                self.closed = true;
            }
            return;
        }
        if seg.has(SYN) {
            if self.state == State::SynReceived && seg.seq == self.irs && !seg.has(ACK) {
                // Our SYN-ACK was lost: send it again now.
                self.snd_nxt = self.iss;
            } else {
                // RFC 5961 challenge ACK: a stale peer will answer with a RST.
                self.need_ack = true;
            }
            return;
        }
        if !seg.has(ACK) {
            return;
        }
        self.process_ack(seg, now);
        if self.state == State::SynReceived {
            return;
        }
        self.process_data(seg);
        self.serve(mmds, now);
        self.arm_persist(now);
    }

    /// Runs expired timers: retransmission (go-back-N), zero-window probing, and giving up
    /// on a guest that never sends its FIN.
    pub fn on_timer(&mut self, now: Instant) {
        if self.closed || self.send_rst {
            return;
        }
        if self.linger_until.is_some_and(|until| now >= until) {
            self.closed = true;
            return;
        }
        match self.deadline {
            Some(deadline) if now >= deadline => {}
            _ => return,
        }
        self.deadline = None;
        self.retries = self.retries.saturating_add(1);
        if self.retries > MAX_RETRIES {
            self.send_rst = true;
            return;
        }
        self.rto = self.rto.checked_mul(2).unwrap_or(MAX_RTO).min(MAX_RTO);
        // Either a persist timer (nothing unacknowledged, zero window) or a retransmission;
        // a lost window probe is resent too, so a zero window never stalls without a timer.
        self.probe = true;
        if self.snd_una != self.snd_max {
            self.snd_nxt = self.snd_una;
            self.fin_sent = false;
        }
    }

    /// Emits the next segment, carrying at most `max_payload` bytes of data.
    pub fn next_segment(&mut self, now: Instant, max_payload: usize) -> Option<Outgoing> {
        let plan = self.plan(max_payload)?;
        let mut flags = ACK;
        let mut seq = self.snd_nxt;
        let mut mss = None;
        let mut payload = 0..0;
        match plan {
            Plan::Rst => {
                self.send_rst = false;
                self.closed = true;
                flags = RST | ACK;
                seq = self.snd_max;
            }
            Plan::SynAck => {
                flags = SYN | ACK;
                seq = self.iss;
                mss = Some(OUR_MSS);
                self.advance(1, now);
            }
            Plan::Data { offset, len } => {
                flags |= PSH;
                payload = offset..offset.saturating_add(len);
                self.probe = false;
                self.advance(seq_len(len), now);
            }
            Plan::Fin => {
                flags |= FIN;
                self.fin_seq = Some(seq);
                self.fin_sent = true;
                self.advance(1, now);
            }
            Plan::Ack => {}
        }
        self.need_ack = false;
        let window = self.window();
        self.advertised_zero = window == 0;
        Some(Outgoing {
            header: SegmentHeader {
                src_port: self.local_port,
                dst_port: self.peer_port,
                seq,
                ack: self.rcv_nxt,
                flags,
                window,
                mss,
            },
            payload,
        })
    }

    fn plan(&self, max_payload: usize) -> Option<Plan> {
        if self.send_rst {
            return Some(Plan::Rst);
        }
        if self.closed {
            return None;
        }
        if self.state == State::SynReceived {
            return (self.snd_nxt == self.iss).then_some(Plan::SynAck);
        }
        let sent = self.sent_offset();
        if let Some(offset) = sent.filter(|offset| *offset < self.tx.len()) {
            let len = self.sendable(offset, max_payload);
            if len > 0 {
                return Some(Plan::Data { offset, len });
            }
        }
        if self.close_requested
            && !self.fin_sent
            && !self.fin_acked()
            && sent.is_some_and(|offset| offset >= self.tx.len())
        {
            return Some(Plan::Fin);
        }
        self.need_ack.then_some(Plan::Ack)
    }

    /// Offset in `tx` of the next byte to send, if `snd_nxt` is inside the response.
    fn sent_offset(&self) -> Option<usize> {
        let offset = usize::try_from(self.snd_nxt.wrapping_sub(self.tx_seq)).ok()?;
        (offset <= self.tx.len()).then_some(offset)
    }

    fn sendable(&self, offset: usize, max_payload: usize) -> usize {
        let remaining = self.tx.len().saturating_sub(offset);
        let in_flight = self.snd_nxt.wrapping_sub(self.snd_una) as usize;
        let mut window = usize::from(self.snd_wnd).saturating_sub(in_flight);
        if window == 0 && self.probe && in_flight == 0 {
            window = 1;
        }
        remaining.min(window).min(self.peer_mss).min(max_payload)
    }

    fn advance(&mut self, len: u32, now: Instant) {
        self.snd_nxt = self.snd_nxt.wrapping_add(len);
        if seq_lt(self.snd_max, self.snd_nxt) {
            self.snd_max = self.snd_nxt;
        }
        if self.deadline.is_none() {
            self.deadline = now.checked_add(self.rto);
        }
    }

    fn window(&self) -> u16 {
        u16::try_from(MAX_REQUEST_SIZE.saturating_sub(self.request.len())).unwrap_or(u16::MAX)
    }

    fn in_receive_window(&self, seq: u32) -> bool {
        seq.wrapping_sub(self.rcv_nxt) < u32::from(self.window().max(1))
    }

    fn fin_acked(&self) -> bool {
        self.fin_seq
            .is_some_and(|fin| self.snd_una == fin.wrapping_add(1))
    }

    fn process_ack(&mut self, seg: &TcpSegment, now: Instant) {
        let acked = seg.ack.wrapping_sub(self.snd_una);
        if acked > self.snd_max.wrapping_sub(self.snd_una) {
            // Acknowledges nothing we ever sent (old duplicate or bogus).
            return;
        }
        self.snd_wnd = seg.window;
        if acked == 0 {
            return;
        }
        self.snd_una = seg.ack;
        if seq_lt(self.snd_nxt, self.snd_una) {
            // A late ACK covered data we were about to retransmit.
            self.snd_nxt = self.snd_una;
        }
        self.state = State::Established;
        self.retries = 0;
        self.rto = INITIAL_RTO;
        self.probe = false;
        self.deadline = if self.snd_una == self.snd_max {
            None
        } else {
            now.checked_add(self.rto)
        };
        let acked_data = self.snd_una.wrapping_sub(self.tx_seq) as usize;
        if !self.tx.is_empty() && acked_data >= self.tx.len() && !seq_lt(self.snd_una, self.tx_seq)
        {
            self.tx_seq = self.tx_seq.wrapping_add(seq_len(self.tx.len()));
            self.tx = Vec::new();
        }
        if self.fin_acked() {
            self.fin_sent = true;
            if !self.peer_fin {
                self.linger_until = now.checked_add(FIN_WAIT_TIMEOUT);
            }
        }
    }

    fn process_data(&mut self, seg: &TcpSegment) {
        let fin = seg.has(FIN);
        if seg.payload.is_empty() && !fin {
            return;
        }
        // Every data or FIN segment is acknowledged, duplicates and out-of-order ones
        // included, so the guest learns what to retransmit.
        self.need_ack = true;
        if self.peer_fin {
            return;
        }
        let behind = self.rcv_nxt.wrapping_sub(seg.seq) as usize;
        let Some(fresh) = seg.payload.get(behind..) else {
            return;
        };
        let room = MAX_REQUEST_SIZE.saturating_sub(self.request.len());
        let take = fresh.len().min(room);
        self.request
            .extend_from_slice(fresh.get(..take).unwrap_or_default());
        self.rcv_nxt = self.rcv_nxt.wrapping_add(seq_len(take));
        if fin && take == fresh.len() {
            self.rcv_nxt = self.rcv_nxt.wrapping_add(1);
            self.peer_fin = true;
        }
    }

    /// Answers the next buffered request once the previous response is fully acknowledged.
    fn serve(&mut self, mmds: &mut Mmds, now: Instant) {
        if self.tx.is_empty()
            && !self.close_requested
            && !self.request.is_empty()
            && let Parsed::Complete(reply) = guest_http::handle(&self.request, mmds, now)
        {
            let consumed = reply.consumed.min(self.request.len());
            self.request.drain(..consumed);
            self.tx = reply.response;
            self.tx_seq = self.snd_nxt;
            self.close_requested = reply.close;
            if self.advertised_zero {
                self.need_ack = true;
            }
        }
        if self.peer_fin && self.tx.is_empty() {
            self.close_requested = true;
        }
    }

    /// A zero window with data waiting needs a timer, or a lost window update would stall
    /// the connection forever.
    fn arm_persist(&mut self, now: Instant) {
        let waiting = self
            .sent_offset()
            .is_some_and(|offset| offset < self.tx.len());
        if self.deadline.is_none() && waiting && self.snd_nxt == self.snd_una && self.snd_wnd == 0 {
            self.deadline = now.checked_add(self.rto);
        }
    }
}
