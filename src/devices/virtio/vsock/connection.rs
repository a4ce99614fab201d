//! One stream connection between a guest port and a host Unix socket: its state, its
//! credit accounting both ways (virtio 1.2, 5.10.6.3), and the order in which it has
//! things to tell the guest.
//!
//! Guest to host: bytes are written to the host socket at once; what the socket does not
//! take waits in `tx_buf`, which the credit the device advertises (`CONN_BUF_ALLOC`, less
//! what waits) bounds. A guest that sends beyond its credit is reset.
//! Host to guest: bytes are read from the host socket only straight into a receive buffer
//! the guest gave, and only as far as the guest's credit allows, so nothing of that
//! direction waits in the device: a guest that stops reading leaves the bytes in the host
//! socket, whose writer then blocks.

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::packet::{
    HOST_CID, Header, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST,
    OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::unix;

/// The receive buffer each connection advertises to the guest: the most guest bytes that
/// can wait in the device for one connection's host socket.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;

/// The largest payload of one packet, either way.
pub const MAX_PKT_LEN: u32 = 64 * 1024;

/// Bytes forwarded to the host between unsolicited credit updates: small enough that the
/// guest never stalls on a stale view while the host keeps reading (its view stays above
/// `CONN_BUF_ALLOC` less this less what waits), large enough to cost one packet per 64 KiB.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;

/// How long a guest has to finish a connection whose host socket is gone entirely.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection by its two ports (the CIDs are fixed: the host's and the guest's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// The host-side port: what the guest connected to, or the one the device picked.
    pub local_port: u32,
    /// The guest-side port.
    pub peer_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// A host process asked; the guest has not answered the REQUEST yet.
    LocalInit,
    Established,
    /// Given up: an RST is due to the guest, the host socket is shut down.
    Killed,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("the guest sent {len} bytes with {free} bytes of credit")]
    CreditExceeded { len: usize, free: usize },
    #[error("the guest sent data after shutting down its sending side")]
    DataAfterShutdown,
    #[error("the guest sent data on a connection not established")]
    NotEstablished,
    #[error("the host socket failed: {0}")]
    Host(std::io::Error),
}

/// What a connection puts in one receive buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum RxPacket {
    /// A packet without payload.
    Control { op: u16, flags: u32 },
    /// OP_RW with this many bytes, read into the caller's buffer.
    Data(usize),
    /// Nothing to send now.
    Nothing,
}

/// Control packets due to the guest.
#[derive(Default)]
struct Pending {
    rst: bool,
    request: bool,
    response: bool,
    credit_update: bool,
    credit_request: bool,
    /// OP_SHUTDOWN flags not sent yet.
    shutdown: u32,
}

pub struct Connection {
    pub key: ConnKey,
    stream: UnixStream,
    state: State,
    /// The guest's receive buffer and what it consumed of it, from its latest header.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    tx_cnt: Wrapping<u32>,
    /// Bytes received from the guest.
    rx_cnt: Wrapping<u32>,
    /// Bytes of those the host socket took.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as the guest last heard it.
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Guest bytes the host socket has not taken yet.
    tx_buf: VecDeque<u8>,
    /// The host socket was reported readable and has not said EAGAIN since.
    host_readable: bool,
    /// The host process closed its socket (both directions).
    host_hup: bool,
    /// The host will send nothing more (its read side reached end of file).
    host_eof: bool,
    host_wr_shut: bool,
    host_rd_shut: bool,
    peer_shut_send: bool,
    peer_shut_rcv: bool,
    pending: Pending,
    /// OP_SHUTDOWN flags the guest has been sent.
    shutdown_sent: u32,
    /// A credit request went out and no credit came since.
    credit_requested: bool,
    /// When the connection is given up unless something happens first.
    pub deadline: Option<Instant>,
    /// In the device's list of connections with something for the guest.
    pub queued: bool,
}

impl Connection {
    fn new(stream: UnixStream, key: ConnKey, state: State) -> Self {
        Connection {
            key,
            stream,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            tx_buf: VecDeque::new(),
            // Assumed until the socket says otherwise: a readiness edge from before the
            // event loop watched it is not missed, at the cost of one EAGAIN.
            host_readable: true,
            host_hup: false,
            host_eof: false,
            host_wr_shut: false,
            host_rd_shut: false,
            peer_shut_send: false,
            peer_shut_rcv: false,
            pending: Pending::default(),
            shutdown_sent: 0,
            credit_requested: false,
            deadline: None,
            queued: false,
        }
    }

    /// A host process asked for guest port `key.peer_port`: a REQUEST is due, and the
    /// guest has until `deadline` to answer.
    pub fn host_initiated(stream: UnixStream, key: ConnKey, deadline: Instant) -> Self {
        let mut c = Self::new(stream, key, State::LocalInit);
        c.pending.request = true;
        c.deadline = Some(deadline);
        c
    }

    /// The guest's REQUEST `hdr` was connected to a host socket: a RESPONSE is due.
    pub fn guest_initiated(stream: UnixStream, key: ConnKey, hdr: &Header) -> Self {
        let mut c = Self::new(stream, key, State::Established);
        c.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        c.pending.response = true;
        c
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// Guest bytes waiting for the host socket.
    pub fn buffered(&self) -> usize {
        self.tx_buf.len()
    }

    /// True once the connection has nothing more to do: its RST went out.
    pub fn finished(&self) -> bool {
        self.state == State::Killed && !self.pending.rst
    }

    /// What the guest can still take: its buffer less what was sent and not consumed.
    pub fn peer_credit(&self) -> u32 {
        // A guest claiming to have consumed more than it got gets nothing until it makes
        // sense again: the wrapped difference is then larger than any buffer.
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Every guest header carries its credit (virtio 1.2, 5.10.6.3).
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
        self.refresh();
    }

    /// The guest answered the REQUEST: tells the host process the port it was given.
    pub fn accept_response(&mut self) -> Result<(), ConnError> {
        self.state = State::Established;
        self.deadline = None;
        let line = format!("OK {}\n", self.key.local_port);
        // A fresh socket has room for a short line; less is as good as a failure.
        match unix::send(self.stream.as_raw_fd(), line.as_bytes()) {
            Ok(n) if n == line.len() => {
                self.refresh();
                Ok(())
            }
            Ok(_) => Err(ConnError::Host(ErrorKind::WriteZero.into())),
            Err(e) => Err(ConnError::Host(e)),
        }
    }

    /// Gives the connection up: the host socket is shut at once (its process sees end of
    /// file now), the guest is sent an RST.
    pub fn kill(&mut self) {
        if self.state == State::Killed {
            return;
        }
        self.state = State::Killed;
        self.pending = Pending {
            rst: true,
            ..Pending::default()
        };
        self.tx_buf = VecDeque::new();
        self.deadline = None;
        unix::shutdown(&self.stream, Shutdown::Both);
    }

    /// The guest's OP_SHUTDOWN.
    pub fn peer_shutdown(&mut self, flags: u32) {
        if flags & SHUTDOWN_SEND != 0 {
            self.peer_shut_send = true;
        }
        if flags & SHUTDOWN_RCV != 0 {
            self.peer_shut_rcv = true;
        }
        self.refresh();
    }

    /// The guest asked for our credit.
    pub fn credit_requested_by_peer(&mut self) {
        if self.state != State::Killed {
            self.pending.credit_update = true;
        }
    }

    /// Guest bytes for the host socket (OP_RW).
    pub fn write_from_guest(&mut self, data: &[u8]) -> Result<(), ConnError> {
        if self.state != State::Established {
            return Err(ConnError::NotEstablished);
        }
        if self.peer_shut_send {
            return Err(ConnError::DataAfterShutdown);
        }
        // What waits is exactly what the guest sent and the host has not taken: the guest
        // may not have more than our buffer outstanding.
        let free = CONN_BUF_ALLOC as usize - self.tx_buf.len().min(CONN_BUF_ALLOC as usize);
        if data.len() > free {
            return Err(ConnError::CreditExceeded {
                len: data.len(),
                free,
            });
        }
        self.rx_cnt += Wrapping(data.len() as u32);
        let mut written = 0;
        if self.tx_buf.is_empty() && !data.is_empty() {
            match unix::send(self.stream.as_raw_fd(), data) {
                Ok(n) => written = n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(ConnError::Host(e)),
            }
            self.fwd_cnt += Wrapping(written as u32);
        }
        self.tx_buf.extend(&data[written..]);
        self.refresh();
        Ok(())
    }

    /// Writes what waits for the host socket, as far as it takes it.
    fn flush(&mut self) -> Result<(), ConnError> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match unix::send(self.stream.as_raw_fd(), front) {
                Ok(0) => break,
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(ConnError::Host(e)),
            }
        }
        if self.tx_buf.is_empty() && self.tx_buf.capacity() > MAX_PKT_LEN as usize {
            // An idle connection keeps no large buffer.
            self.tx_buf = VecDeque::new();
        }
        Ok(())
    }

    /// The event loop reported the host socket ready.
    pub fn host_event(&mut self, readable: bool, writable: bool, hangup: bool) {
        if self.state == State::Killed {
            return;
        }
        if readable || hangup {
            self.host_readable = true;
        }
        if hangup {
            self.host_hup = true;
            if self.state == State::LocalInit {
                // The host process gave up waiting for the guest.
                self.kill();
                return;
            }
        }
        if (writable || hangup) && self.flush().is_err() {
            self.kill();
            return;
        }
        self.refresh();
    }

    fn wants_data(&self) -> bool {
        self.state == State::Established
            && self.host_readable
            && !self.host_eof
            && !self.peer_shut_rcv
            && self.peer_credit() > 0
    }

    /// Whether the connection has something for the guest.
    pub fn has_rx_work(&self) -> bool {
        let p = &self.pending;
        p.rst
            || (self.state != State::Killed
                && (p.request
                    || p.response
                    || p.credit_update
                    || p.credit_request
                    || p.shutdown != 0
                    || self.wants_data()))
    }

    /// Settles what follows from the flags: half-closes of the host socket, packets due,
    /// and the end of a connection both sides are done with.
    fn refresh(&mut self) {
        if self.state != State::Established {
            return;
        }
        if self.peer_shut_send && self.tx_buf.is_empty() && !self.host_wr_shut {
            unix::shutdown(&self.stream, Shutdown::Write);
            self.host_wr_shut = true;
        }
        if self.peer_shut_rcv && !self.host_rd_shut {
            unix::shutdown(&self.stream, Shutdown::Read);
            self.host_rd_shut = true;
        }
        if !self.peer_shut_send
            && (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD
        {
            self.pending.credit_update = true;
        }
        if self.host_readable
            && !self.host_eof
            && !self.peer_shut_rcv
            && self.peer_credit() == 0
            && !self.credit_requested
        {
            self.pending.credit_request = true;
            self.credit_requested = true;
        }
        if self.host_eof {
            // A host that only shut its writing side may still read: the guest is told it
            // will get nothing more and may go on sending. A host that closed entirely is
            // gone both ways, and the guest has a while to say goodbye.
            let want = SHUTDOWN_SEND | if self.host_hup { SHUTDOWN_RCV } else { 0 };
            self.pending.shutdown |= want & !self.shutdown_sent;
            if self.host_hup && self.deadline.is_none() {
                self.deadline = Some(Instant::now() + SHUTDOWN_TIMEOUT);
            }
        }
        let guest_to_host_done = self.peer_shut_send && self.tx_buf.is_empty();
        let host_to_guest_done =
            self.peer_shut_rcv || (self.host_eof && self.shutdown_sent & SHUTDOWN_SEND != 0);
        if guest_to_host_done && host_to_guest_done {
            self.kill();
        }
    }

    /// The next packet for the guest, given a receive buffer with room for `payload_cap`
    /// bytes after the header; data is read into `buf`.
    pub fn next_rx(&mut self, payload_cap: usize, buf: &mut [u8]) -> RxPacket {
        if self.pending.rst {
            self.pending.rst = false;
            return RxPacket::Control {
                op: OP_RST,
                flags: 0,
            };
        }
        if self.state == State::Killed {
            return RxPacket::Nothing;
        }
        let control =
            |p: &mut bool, op: u16| std::mem::take(p).then_some(RxPacket::Control { op, flags: 0 });
        if let Some(p) = control(&mut self.pending.request, OP_REQUEST)
            .or_else(|| control(&mut self.pending.response, OP_RESPONSE))
            .or_else(|| control(&mut self.pending.credit_update, OP_CREDIT_UPDATE))
            .or_else(|| control(&mut self.pending.credit_request, OP_CREDIT_REQUEST))
        {
            return p;
        }
        if self.wants_data() && payload_cap > 0 {
            let n = payload_cap
                .min(self.peer_credit() as usize)
                .min(MAX_PKT_LEN as usize)
                .min(buf.len());
            match unix::recv(self.stream.as_raw_fd(), &mut buf[..n], 0) {
                Ok(0) => {
                    self.host_eof = true;
                    self.refresh();
                }
                Ok(n) => {
                    self.tx_cnt += Wrapping(n as u32);
                    return RxPacket::Data(n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => self.host_readable = false,
                Err(_) => {
                    self.kill();
                    self.pending.rst = false;
                    return RxPacket::Control {
                        op: OP_RST,
                        flags: 0,
                    };
                }
            }
        }
        if self.pending.shutdown != 0 {
            let flags = std::mem::take(&mut self.pending.shutdown);
            self.shutdown_sent |= flags;
            // Sending it may finish the connection: its RST follows.
            self.refresh();
            return RxPacket::Control {
                op: OP_SHUTDOWN,
                flags,
            };
        }
        RxPacket::Nothing
    }

    /// The header of a packet from this connection to the guest `guest_cid`, with the
    /// device's credit, which the guest thereby hears of.
    pub fn header(&mut self, guest_cid: u64, op: u16, flags: u32, len: u32) -> Header {
        if op != OP_RST {
            self.last_fwd_cnt_sent = self.fwd_cnt;
            self.pending.credit_update = false;
        }
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }
}
