//! virtio-vsock: stream sockets between the guest and host processes, carried over Unix
//! sockets on the host (virtio 1.2, 5.10).
//!
//! Host processes connect to the device's listening socket and ask for a guest port with
//! `CONNECT <port>\n`; guest connections to host port P go to the Unix socket
//! `<uds_path>_P`. See [`unix`] for the host side, [`connection`] for one connection's
//! state and credit, [`packet`] for the wire header.
//!
//! Everything runs on the vmm thread, without blocking: the transmit queue is always
//! drained (a packet is handled the moment it is taken, so one slow host socket never holds
//! up the others), and packets for the guest are produced only when a receive buffer is at
//! hand, so nothing waits in the device for the guest.
//!
//! Event sources: the listener and every host socket are watched edge-triggered (the
//! host sockets for both reading and writing, registered once and never modified). The
//! device remembers a socket's readiness until it meets EAGAIN, so reading that stopped
//! for lack of guest buffers or credit resumes when the guest gives some, without an
//! event. The deadline timer is level-triggered and re-armed after each expiry.
//!
//! A host socket that is done with is shut down at once (its process sees the end of the
//! stream) but closed only after the event loop stopped watching it: the loop removes a
//! source by its descriptor number, which must still name the same socket then.

pub mod connection;
pub mod packet;
pub mod unix;

use std::collections::{HashMap, VecDeque};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::memory::GuestMemoryMmap;
use event_manager::EventSet;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::timerfd::TimerFd;

use super::{
    ActivateError, VIRTIO_F_VERSION_1, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
    read_config_bytes,
};
use crate::metrics::{DeviceCounters, Group, METRICS, VsockMetrics};
use connection::{ConnError, ConnKey, Connection, MAX_PKT_LEN, RxPacket, State};
use packet::{
    EVENT_LEN, EVENT_TRANSPORT_RESET, HDR_LEN, HOST_CID, Header, OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, TYPE_STREAM,
    VIRTIO_VSOCK_F_STREAM,
};
use unix::{Handshake, HandshakeStep};

pub use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;

/// Entries in each queue.
pub const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const EVENT_QUEUE: usize = 2;

/// Connections (and host connections still in their handshake) at once; requests beyond
/// are refused.
pub const MAX_CONNECTIONS: usize = 1024;
/// RSTs for packets that belong to no connection, waiting for receive buffers; more are
/// dropped (a guest that floods the device with stray packets gets fewer answers).
const MAX_PENDING_REPLIES: usize = QUEUE_SIZE as usize;
/// How long a host process may take to send its `CONNECT` line.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the guest may take to answer a host process's connection request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Host ports for host-initiated connections are picked from here up, away from the
/// ports host services listen on.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("vsock: guest CID {0} is reserved; it must be 3 or more")]
    BadCid(u32),
    #[error("vsock: {0}")]
    Unix(#[from] unix::UnixError),
    #[error("vsock: cannot create a timer: {0}")]
    Timer(std::io::Error),
}

/// What the device is made from.
#[derive(Clone, Debug)]
pub struct VsockConfig {
    pub guest_cid: u32,
    /// Where host processes connect; guest connections to host port P go to
    /// `<uds_path>_P`.
    pub uds_path: PathBuf,
}

struct ActiveQueues {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    event: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// What a watched host socket belongs to.
#[derive(Clone, Copy)]
enum Owner {
    Handshake,
    Conn(ConnKey),
}

/// A chain the guest gave for the device to write into, checked: device-writable buffers
/// inside guest memory.
struct WritableChain {
    head: u16,
    ranges: Vec<(GuestAddress, usize)>,
    capacity: usize,
}

/// Why a transmit chain could not be taken as a packet.
#[derive(Debug, thiserror::Error)]
enum TxError {
    #[error("a transmit buffer is device-writable")]
    WritableBuffer,
    #[error("a transmit buffer at {addr:#x} ({len} bytes) is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("the chain holds {0} bytes, less than a header")]
    ShortHeader(usize),
    /// The header is readable: the guest is answered with an RST.
    #[error("{why} (op {}, len {})", .hdr.op, .hdr.len)]
    Refused { hdr: Header, why: &'static str },
}

pub struct Vsock {
    config: VsockConfig,
    listener: UnixListener,
    config_space: [u8; 8],
    active: Option<ActiveQueues>,
    /// A queue's rings were found inconsistent: no queue is touched until the driver
    /// resets the device (DEVICE_NEEDS_RESET).
    broken: bool,
    conns: HashMap<ConnKey, Connection>,
    handshakes: HashMap<RawFd, Handshake>,
    by_fd: HashMap<RawFd, Owner>,
    /// Connections with something for the guest, served in turn.
    rx_work: VecDeque<ConnKey>,
    /// RSTs answering packets that belong to no connection.
    replies: VecDeque<Header>,
    /// Host sockets done with, shut down, still watched by the event loop.
    retired: Vec<UnixStream>,
    /// Host sockets the event loop has been told to stop watching; closed on the next
    /// round, once it has.
    unwatched: Vec<UnixStream>,
    sources_changed: bool,
    timer: TimerFd,
    /// The deadline the timer is set for.
    timer_set_for: Option<Instant>,
    next_local_port: u32,
    /// At most this many connections and handshakes at once ([`MAX_CONNECTIONS`]; tests
    /// lower it).
    max_connections: usize,
    /// A TRANSPORT_RESET event waits for an event-queue buffer.
    reset_event_pending: bool,
    /// Payload of the packet being transmitted.
    tx_payload: Vec<u8>,
    /// Payload of the packet being received.
    rx_payload: Vec<u8>,
    metrics: DeviceCounters<VsockMetrics>,
}

impl Vsock {
    /// Listens at `config.uds_path` for host processes.
    pub fn new(config: VsockConfig) -> Result<Self, VsockError> {
        if config.guest_cid < 3 {
            return Err(VsockError::BadCid(config.guest_cid));
        }
        let listener = unix::listen(&config.uds_path)?;
        let timer = TimerFd::new().map_err(|e| VsockError::Timer(e.into()))?;
        Ok(Vsock {
            config_space: u64::from(config.guest_cid).to_le_bytes(),
            config,
            listener,
            active: None,
            broken: false,
            conns: HashMap::new(),
            handshakes: HashMap::new(),
            by_fd: HashMap::new(),
            rx_work: VecDeque::new(),
            replies: VecDeque::new(),
            retired: Vec::new(),
            unwatched: Vec::new(),
            sources_changed: false,
            timer,
            timer_set_for: None,
            next_local_port: FIRST_LOCAL_PORT,
            max_connections: MAX_CONNECTIONS,
            reset_event_pending: false,
            tx_payload: Vec::with_capacity(MAX_PKT_LEN as usize),
            rx_payload: vec![0; MAX_PKT_LEN as usize],
            metrics: DeviceCounters::new(&METRICS.vsock),
        })
    }

    pub fn guest_cid(&self) -> u32 {
        self.config.guest_cid
    }

    pub fn uds_path(&self) -> &std::path::Path {
        &self.config.uds_path
    }

    /// The device's counters alone (tests read them).
    pub fn counters(&self) -> &VsockMetrics {
        self.metrics.own()
    }

    /// Open connections, established or not (host handshakes not counted).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Bytes the device holds for either direction: guest bytes waiting for host sockets
    /// (at most the advertised buffer per connection). Host bytes never wait in the
    /// device: they stay in the host socket until the guest has room.
    pub fn buffered_bytes(&self) -> usize {
        self.conns.values().map(Connection::buffered).sum()
    }

    /// Tells the guest every connection is gone (after a snapshot is restored, say): all
    /// connections are dropped and a TRANSPORT_RESET event is sent, now or as soon as the
    /// driver gives an event buffer. The driver then reads the guest CID again.
    pub fn send_transport_reset(&mut self) {
        self.drop_connections();
        self.reset_event_pending = true;
        self.process_event_queue();
    }

    fn guest_cid64(&self) -> u64 {
        u64::from(self.config.guest_cid)
    }

    /// Closes every connection and pending handshake; the listener stays.
    fn drop_connections(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove_conn(key);
        }
        let fds: Vec<RawFd> = self.handshakes.keys().copied().collect();
        for fd in fds {
            if let Some(h) = self.handshakes.remove(&fd) {
                self.by_fd.remove(&fd);
                self.retire(h.stream);
            }
        }
        self.rx_work.clear();
        self.replies.clear();
    }

    /// Stops using a host socket: shut now, closed once the event loop forgot it.
    fn retire(&mut self, stream: UnixStream) {
        unix::shutdown(&stream, Shutdown::Both);
        self.retired.push(stream);
        self.sources_changed = true;
    }

    fn remove_conn(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            self.by_fd.remove(&conn.stream().as_raw_fd());
            self.metrics.inc(|m| &m.conns_removed);
            self.retire(conn.into_stream());
        }
    }

    fn add_conn(&mut self, conn: Connection, new_socket: bool) {
        let key = conn.key;
        self.by_fd
            .insert(conn.stream().as_raw_fd(), Owner::Conn(key));
        self.conns.insert(key, conn);
        self.metrics.inc(|m| &m.conns_added);
        if new_socket {
            self.sources_changed = true;
        }
        self.schedule(key);
    }

    /// Puts a connection in line for the receive queue if it has something for the guest.
    fn schedule(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get_mut(&key)
            && !c.queued
            && c.has_rx_work()
        {
            c.queued = true;
            self.rx_work.push_back(key);
        }
    }

    fn kill(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get_mut(&key) {
            if c.state() != State::Killed {
                self.metrics.inc(|m| &m.conns_killed);
            }
            c.kill();
        }
        self.schedule(key);
    }

    /// Answers `hdr` with an RST: through its connection if it has one (which ends it),
    /// else on its own.
    fn refuse(&mut self, hdr: &Header) {
        if hdr.op == OP_RST {
            // Never answered: two ends could otherwise reset each other forever.
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if self.addressed_to_us(hdr) && self.conns.contains_key(&key) {
            self.kill(key);
            return;
        }
        if self.replies.len() < MAX_PENDING_REPLIES {
            self.replies.push_back(hdr.reset_reply(self.guest_cid64()));
            self.metrics.inc(|m| &m.rst_replies);
        } else {
            self.metrics.inc(|m| &m.replies_dropped);
        }
    }

    fn addressed_to_us(&self, hdr: &Header) -> bool {
        hdr.src_cid == self.guest_cid64() && hdr.dst_cid == HOST_CID && hdr.type_ == TYPE_STREAM
    }

    fn count_connections(&self) -> usize {
        self.conns.len() + self.handshakes.len()
    }

    /// A host port no connection uses, for a host-initiated connection.
    fn alloc_local_port(&mut self) -> Option<u32> {
        for _ in 0..=self.max_connections {
            let p = self.next_local_port;
            self.next_local_port = p.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|k| k.local_port == p) {
                return Some(p);
            }
        }
        None
    }

    // ----- guest to host -----

    /// Handles every packet the guest queued.
    pub fn process_tx(&mut self) {
        if self.broken {
            return;
        }
        let mut returned = false;
        let mut payload = std::mem::take(&mut self.tx_payload);
        let mut ranges: Vec<(GuestAddress, usize)> = Vec::new();
        'chains: loop {
            let mut popped = 0usize;
            loop {
                let parsed = {
                    let Some(active) = self.active.as_mut() else {
                        break 'chains;
                    };
                    let chain = match pop_chain(&mut active.tx, &active.mem) {
                        Ok(Some(chain)) => chain,
                        Ok(None) => break,
                        Err(e) => {
                            self.queue_broken(&e.to_string());
                            break 'chains;
                        }
                    };
                    popped += 1;
                    let head = chain.head_index();
                    let parsed = read_packet(chain, &active.mem, &mut ranges, &mut payload);
                    // The packet is copied out: the chain goes back at once.
                    if let Err(e) = active.tx.add_used(&active.mem, head, 0) {
                        crate::rate_limited_log!(
                            log::Level::Warn,
                            "vsock: cannot return a transmit chain: {e}"
                        );
                    }
                    parsed
                };
                returned = true;
                match parsed {
                    Ok(hdr) => self.handle_packet(&hdr, &payload),
                    Err(TxError::Refused { hdr, why }) => {
                        self.metrics.inc(|m| &m.malformed_packets);
                        crate::rate_limited_log!(
                            log::Level::Warn,
                            "vsock: refused a guest packet: {why} (op {}, len {})",
                            hdr.op,
                            hdr.len
                        );
                        self.refuse(&hdr);
                    }
                    Err(e) => {
                        self.metrics.inc(|m| &m.malformed_packets);
                        crate::rate_limited_log!(
                            log::Level::Warn,
                            "vsock: dropped a transmit chain: {e}"
                        );
                    }
                }
            }
            let Some(active) = self.active.as_mut() else {
                break;
            };
            match active.tx.enable_notification(&active.mem) {
                // More is available, yet nothing could be taken: the ring is broken.
                Ok(true) if popped == 0 => {
                    self.queue_broken("transmit");
                    break;
                }
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    self.queue_broken(&e.to_string());
                    break;
                }
            }
        }
        self.tx_payload = payload;
        if let Some(active) = self.active.as_mut() {
            if self.broken {
                active.interrupt.trigger(VirtioInterruptType::Config);
            } else if returned && active.tx.needs_notification(&active.mem).unwrap_or(true) {
                active
                    .interrupt
                    .trigger(VirtioInterruptType::Queue(TX_QUEUE as u16));
            }
        }
        self.process_rx();
    }

    fn handle_packet(&mut self, hdr: &Header, payload: &[u8]) {
        self.metrics.inc(|m| &m.tx_packets_count);
        if !self.addressed_to_us(hdr) {
            self.metrics.inc(|m| &m.malformed_packets);
            crate::rate_limited_log!(
                log::Level::Warn,
                "vsock: refused a guest packet from CID {} to CID {} of type {}",
                hdr.src_cid,
                hdr.dst_cid,
                hdr.type_
            );
            self.refuse(hdr);
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if hdr.op == OP_REQUEST {
            self.guest_connect(hdr, key);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            self.refuse(hdr);
            return;
        };
        if hdr.op == OP_RST {
            self.remove_conn(key);
            return;
        }
        conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        let failed = match hdr.op {
            OP_RESPONSE if conn.state() == State::LocalInit => conn.accept_response().err(),
            OP_SHUTDOWN => {
                conn.peer_shutdown(hdr.flags);
                None
            }
            OP_RW => {
                self.metrics
                    .add(|m| &m.tx_bytes_count, payload.len() as u64);
                conn.write_from_guest(payload).err()
            }
            OP_CREDIT_UPDATE => None,
            OP_CREDIT_REQUEST => {
                conn.credit_requested_by_peer();
                None
            }
            // A RESPONSE out of turn, or an unknown op.
            _ => Some(ConnError::NotEstablished),
        };
        if let Some(e) = failed {
            match &e {
                ConnError::Host(_) => self.metrics.inc(|m| &m.tx_write_fails),
                ConnError::CreditExceeded { .. } => self.metrics.inc(|m| &m.credit_violations),
                _ => self.metrics.inc(|m| &m.malformed_packets),
            }
            crate::rate_limited_log!(
                log::Level::Warn,
                "vsock: connection {}:{} reset (op {}): {e}",
                key.local_port,
                key.peer_port,
                hdr.op
            );
            self.kill(key);
            return;
        }
        self.schedule(key);
    }

    /// The guest's OP_REQUEST to host port `hdr.dst_port`.
    fn guest_connect(&mut self, hdr: &Header, key: ConnKey) {
        if self.conns.contains_key(&key) {
            // A second request for a live connection: the guest lost track of it.
            self.kill(key);
            return;
        }
        if self.count_connections() >= self.max_connections {
            self.metrics.inc(|m| &m.conns_refused);
            self.refuse(hdr);
            return;
        }
        let path = unix::service_path(&self.config.uds_path, hdr.dst_port);
        match unix::connect(&path) {
            Ok(stream) => {
                let conn = Connection::guest_initiated(stream, key, hdr);
                self.add_conn(conn, true);
            }
            Err(e) => {
                self.metrics.inc(|m| &m.connect_fails);
                crate::rate_limited_log!(log::Level::Debug, "vsock: guest connection: {e}");
                self.refuse(hdr);
            }
        }
    }

    // ----- host to guest -----

    /// Fills the guest's receive buffers with what connections have for it.
    pub fn process_rx(&mut self) {
        if self.broken || self.active.is_none() {
            return;
        }
        let guest_cid = self.guest_cid64();
        let mut buf = std::mem::take(&mut self.rx_payload);
        let mut chain: Option<WritableChain> = None;
        let mut returned = false;
        loop {
            if self.replies.is_empty() && self.rx_work.is_empty() {
                break;
            }
            if chain.is_none() {
                chain = self.take_writable_chain(RX_QUEUE, HDR_LEN, &mut returned);
            }
            let Some(c) = chain.as_ref() else {
                break;
            };
            let payload_cap = c.capacity - HDR_LEN;
            let packet = if let Some(hdr) = self.replies.pop_front() {
                Some((hdr, 0))
            } else {
                let Some(key) = self.rx_work.pop_front() else {
                    break;
                };
                let Some(conn) = self.conns.get_mut(&key) else {
                    continue;
                };
                conn.queued = false;
                let packet = match conn.next_rx(payload_cap, &mut buf) {
                    RxPacket::Control { op, flags } => {
                        Some((conn.header(guest_cid, op, flags, 0), 0))
                    }
                    RxPacket::Data(n) => Some((conn.header(guest_cid, OP_RW, 0, n as u32), n)),
                    RxPacket::Nothing => None,
                };
                if conn.finished() {
                    self.remove_conn(key);
                } else if conn.has_rx_work() {
                    conn.queued = true;
                    self.rx_work.push_back(key);
                    if packet.is_none() {
                        // Data is due, and this buffer has no room past a header: the
                        // guest gets it back empty rather than the device spinning on it.
                        if let (Some(c), Some(active)) = (chain.take(), self.active.as_mut()) {
                            let _ = active.rx.add_used(&active.mem, c.head, 0);
                            self.metrics.inc(|m| &m.rx_malformed_chains);
                            returned = true;
                        }
                    }
                }
                packet
            };
            let Some((hdr, len)) = packet else {
                continue;
            };
            let (Some(c), Some(active)) = (chain.take(), self.active.as_mut()) else {
                break;
            };
            let written = write_to_chain(&active.mem, &c, &hdr.to_bytes(), &buf[..len]);
            if let Err(e) = active.rx.add_used(&active.mem, c.head, written as u32) {
                crate::rate_limited_log!(
                    log::Level::Warn,
                    "vsock: cannot return a receive chain: {e}"
                );
            }
            returned = true;
            self.metrics.inc(|m| &m.rx_packets_count);
            if len > 0 {
                self.metrics.add(|m| &m.rx_bytes_count, len as u64);
            }
        }
        self.rx_payload = buf;
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if chain.is_some() {
            // Taken last and not used: the guest's buffer stays available.
            active.rx.go_to_previous_position();
        }
        if self.broken {
            active.interrupt.trigger(VirtioInterruptType::Config);
        } else if returned && active.rx.needs_notification(&active.mem).unwrap_or(true) {
            active
                .interrupt
                .trigger(VirtioInterruptType::Queue(RX_QUEUE as u16));
        }
    }

    /// The next usable chain of queue `index` with room for `min` bytes; chains that are
    /// not usable are returned empty. None when the queue has none (or is broken).
    fn take_writable_chain(
        &mut self,
        index: usize,
        min: usize,
        returned: &mut bool,
    ) -> Option<WritableChain> {
        let mut retried = false;
        loop {
            let active = self.active.as_mut()?;
            let queue = if index == RX_QUEUE {
                &mut active.rx
            } else {
                &mut active.event
            };
            match pop_chain(queue, &active.mem) {
                Ok(Some(chain)) => {
                    let head = chain.head_index();
                    match writable_chain(chain, &active.mem, min) {
                        Some(c) => return Some(c),
                        None => {
                            let _ = queue.add_used(&active.mem, head, 0);
                            *returned = true;
                            self.metrics.inc(|m| &m.rx_malformed_chains);
                            crate::rate_limited_log!(
                                log::Level::Warn,
                                "vsock: the guest offered an unusable buffer (head {head})"
                            );
                        }
                    }
                }
                Ok(None) => match queue.enable_notification(&active.mem) {
                    // Added meanwhile: once more. A ring that claims chains it cannot give
                    // a second time is broken.
                    Ok(true) if !retried => retried = true,
                    Ok(true) => {
                        self.queue_broken("receive");
                        return None;
                    }
                    Ok(false) => return None,
                    Err(e) => {
                        self.queue_broken(&e.to_string());
                        return None;
                    }
                },
                Err(e) => {
                    self.queue_broken(&e.to_string());
                    return None;
                }
            }
        }
    }

    /// Sends a waiting TRANSPORT_RESET if the driver gave an event buffer.
    fn process_event_queue(&mut self) {
        if !self.reset_event_pending || self.broken || self.active.is_none() {
            return;
        }
        let mut returned = false;
        let chain = self.take_writable_chain(EVENT_QUEUE, EVENT_LEN, &mut returned);
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if let Some(c) = chain {
            let written =
                write_to_chain(&active.mem, &c, &EVENT_TRANSPORT_RESET.to_le_bytes(), &[]);
            let _ = active.event.add_used(&active.mem, c.head, written as u32);
            self.reset_event_pending = false;
            returned = true;
        }
        if self.broken {
            active.interrupt.trigger(VirtioInterruptType::Config);
        } else if returned && active.event.needs_notification(&active.mem).unwrap_or(true) {
            active
                .interrupt
                .trigger(VirtioInterruptType::Queue(EVENT_QUEUE as u16));
        }
    }

    /// A queue's rings are inconsistent: stop using the device until the driver resets it.
    fn queue_broken(&mut self, what: &str) {
        if !self.broken {
            self.metrics.inc(|m| &m.queue_broken);
            log::warn!(
                "vsock: the guest's {what} queue is broken; the device stops until the driver \
                 resets it"
            );
        }
        self.broken = true;
    }

    // ----- host events -----

    fn accept_all(&mut self) {
        loop {
            match unix::accept(&self.listener) {
                Ok(Some(stream)) => {
                    if self.count_connections() >= self.max_connections {
                        // Never watched: closing it at once is safe.
                        self.metrics.inc(|m| &m.conns_refused);
                        drop(stream);
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    self.handshakes.insert(
                        fd,
                        Handshake {
                            stream,
                            deadline: Instant::now() + HANDSHAKE_TIMEOUT,
                        },
                    );
                    self.by_fd.insert(fd, Owner::Handshake);
                    self.sources_changed = true;
                    // The line may be there already.
                    self.handshake_ready(fd);
                }
                Ok(None) => break,
                Err(e) => {
                    crate::rate_limited_log!(log::Level::Warn, "vsock: accept failed: {e}");
                    break;
                }
            }
        }
    }

    fn handshake_ready(&mut self, fd: RawFd) {
        let Some(h) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let step = h.poll();
        if step == HandshakeStep::Pending {
            return;
        }
        let Some(h) = self.handshakes.remove(&fd) else {
            return;
        };
        self.by_fd.remove(&fd);
        match step {
            HandshakeStep::Port(port) => self.host_connect(h.stream, port),
            HandshakeStep::Failed(why) => {
                self.metrics.inc(|m| &m.handshake_fails);
                crate::rate_limited_log!(log::Level::Debug, "vsock: host connection: {why}");
                self.retire(h.stream);
            }
            HandshakeStep::Pending => {}
        }
    }

    /// A host process asked for guest port `port`.
    fn host_connect(&mut self, stream: UnixStream, port: u32) {
        if self.active.is_none() || self.broken {
            // No driver to ask.
            self.metrics.inc(|m| &m.handshake_fails);
            self.retire(stream);
            return;
        }
        let Some(local_port) = self.alloc_local_port() else {
            self.metrics.inc(|m| &m.conns_refused);
            self.retire(stream);
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        let conn = Connection::host_initiated(stream, key, Instant::now() + REQUEST_TIMEOUT);
        // The socket was watched for reading only during the handshake; a connection's is
        // watched for writing too (to flush what the host could not take at once), so the
        // loop must register it again.
        self.add_conn(conn, true);
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        let late: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(&fd, _)| fd)
            .collect();
        for fd in late {
            if let Some(h) = self.handshakes.remove(&fd) {
                self.by_fd.remove(&fd);
                self.metrics.inc(|m| &m.handshake_fails);
                self.retire(h.stream);
            }
        }
        let late: Vec<ConnKey> = self
            .conns
            .values()
            .filter(|c| c.deadline.is_some_and(|d| d <= now))
            .map(|c| c.key)
            .collect();
        for key in late {
            self.kill(key);
        }
        // Setting the timer again also clears its expiry, which would otherwise keep it
        // readable.
        self.timer_set_for = None;
        self.rearm_timer(true);
    }

    fn rearm_timer(&mut self, force: bool) {
        let next = self
            .handshakes
            .values()
            .map(|h| h.deadline)
            .chain(self.conns.values().filter_map(|c| c.deadline))
            .min();
        if next == self.timer_set_for && !force {
            return;
        }
        let after = match next {
            Some(t) => t
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
            None => Duration::ZERO,
        };
        if let Err(e) = self.timer.reset(after, None) {
            log::warn!("vsock: cannot set the deadline timer: {e}");
        }
        self.timer_set_for = next;
    }

    /// Work after every entry from the event loop or a queue notification.
    fn settle(&mut self) {
        self.process_rx();
        self.rearm_timer(false);
    }
}

/// The next available chain; an error when the ring cannot be read.
fn pop_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, virtio_queue::Error> {
    Ok(queue.iter(mem)?.next())
}

/// Checks a chain the device writes into: device-writable buffers inside guest memory,
/// `min` bytes at least.
fn writable_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    min: usize,
) -> Option<WritableChain> {
    let head = chain.head_index();
    let mut ranges = Vec::new();
    let mut capacity = 0usize;
    for d in chain {
        let len = d.len() as usize;
        if !d.is_write_only() || !mem.check_range(d.addr(), len) {
            return None;
        }
        if len > 0 {
            ranges.push((d.addr(), len));
            capacity = capacity.saturating_add(len);
        }
    }
    (capacity >= min).then_some(WritableChain {
        head,
        ranges,
        capacity,
    })
}

/// Writes `head` then `body` into the chain's buffers; returns the bytes written.
fn write_to_chain(mem: &GuestMemoryMmap, c: &WritableChain, head: &[u8], body: &[u8]) -> usize {
    let mut written = 0;
    let mut parts = [head, body];
    for &(addr, len) in &c.ranges {
        let mut at = 0usize;
        for part in parts.iter_mut() {
            if at == len {
                break;
            }
            let n = part.len().min(len - at);
            if n == 0 {
                continue;
            }
            // Checked when taken; guest memory does not shrink under a running VM.
            if mem
                .write_slice(&part[..n], addr.unchecked_add(at as u64))
                .is_err()
            {
                return written;
            }
            *part = &part[n..];
            at += n;
            written += n;
        }
    }
    written
}

/// Copies a transmit chain's packet out of guest memory: its header, and for OP_RW its
/// payload into `payload`.
fn read_packet(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    ranges: &mut Vec<(GuestAddress, usize)>,
    payload: &mut Vec<u8>,
) -> Result<Header, TxError> {
    ranges.clear();
    payload.clear();
    let mut total = 0usize;
    for d in chain {
        if d.is_write_only() {
            return Err(TxError::WritableBuffer);
        }
        let len = d.len() as usize;
        if !mem.check_range(d.addr(), len) {
            return Err(TxError::OutsideMemory {
                addr: d.addr().0,
                len: d.len(),
            });
        }
        if len > 0 {
            ranges.push((d.addr(), len));
            total = total.saturating_add(len);
        }
    }
    if total < HDR_LEN {
        return Err(TxError::ShortHeader(total));
    }
    let mut raw = [0u8; HDR_LEN];
    read_from_ranges(mem, ranges, 0, &mut raw);
    let hdr = Header::parse(&raw).map_err(|_| TxError::ShortHeader(total))?;
    if hdr.op != OP_RW {
        // Only data carries a payload; what else a chain holds is not looked at.
        return Ok(hdr);
    }
    if hdr.len > MAX_PKT_LEN {
        return Err(TxError::Refused {
            hdr,
            why: "payload longer than the largest packet",
        });
    }
    let len = hdr.len as usize;
    if total - HDR_LEN < len {
        return Err(TxError::Refused {
            hdr,
            why: "payload longer than the chain",
        });
    }
    payload.resize(len, 0);
    read_from_ranges(mem, ranges, HDR_LEN, payload);
    Ok(hdr)
}

/// Fills `out` from the bytes the ranges hold, starting `offset` bytes in.
fn read_from_ranges(
    mem: &GuestMemoryMmap,
    ranges: &[(GuestAddress, usize)],
    mut offset: usize,
    out: &mut [u8],
) {
    let mut done = 0;
    for &(addr, len) in ranges {
        if done == out.len() {
            return;
        }
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = (len - offset).min(out.len() - done);
        // Checked when taken; a failure leaves zeros, which the guest wrote as good as.
        let _ = mem.read_slice(&mut out[done..done + n], addr.unchecked_add(offset as u64));
        done += n;
        offset = 0;
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_VSOCK_F_STREAM)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // guest_cid is read-only (virtio 1.2, 5.10.4).
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let mut queues = queues.into_iter();
        let (Some(mut rx), Some(mut tx), Some(mut event)) =
            (queues.next(), queues.next(), queues.next())
        else {
            return Err(ActivateError::BadQueue(EVENT_QUEUE));
        };
        for (index, q) in [(RX_QUEUE, &rx), (TX_QUEUE, &tx), (EVENT_QUEUE, &event)] {
            if !q.ready() {
                return Err(ActivateError::BadQueue(index));
            }
        }
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for q in [&mut rx, &mut tx, &mut event] {
            q.set_event_idx(event_idx);
        }
        self.active = Some(ActiveQueues {
            mem,
            rx,
            tx,
            event,
            interrupt,
        });
        // The guest may have queued packets before it said DRIVER_OK.
        self.process_tx();
        self.process_event_queue();
        self.settle();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.broken = false;
        self.reset_event_pending = false;
        self.drop_connections();
        self.rearm_timer(false);
    }

    fn needs_reset(&self) -> bool {
        self.broken
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            RX_QUEUE => {}
            TX_QUEUE => self.process_tx(),
            EVENT_QUEUE => self.process_event_queue(),
            _ => {}
        }
        self.settle();
    }

    fn stop_queue(&mut self, _index: usize) {
        // Every queue is needed to carry a connection: stopping one ends them all.
        self.active = None;
        self.drop_connections();
        self.rearm_timer(false);
    }

    fn saved_queues(&self) -> Vec<virtio_queue::QueueState> {
        // Chains are answered as they are taken; none is held.
        match &self.active {
            Some(a) => vec![a.rx.state(), a.tx.state(), a.event.state()],
            None => Vec::new(),
        }
    }

    fn event_sources(&self) -> Vec<(RawFd, EventSet)> {
        let mut v = Vec::with_capacity(2 + self.handshakes.len() + self.conns.len());
        v.push((
            self.listener.as_raw_fd(),
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        ));
        v.push((self.timer.as_raw_fd(), EventSet::IN));
        for &fd in self.handshakes.keys() {
            v.push((fd, EventSet::IN | EventSet::EDGE_TRIGGERED));
        }
        for c in self.conns.values() {
            v.push((
                c.stream().as_raw_fd(),
                EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
            ));
        }
        v
    }

    fn process_event(&mut self, fd: RawFd, events: EventSet) {
        if fd == self.listener.as_raw_fd() {
            self.accept_all();
        } else if fd == self.timer.as_raw_fd() {
            self.on_timer();
        } else {
            match self.by_fd.get(&fd).copied() {
                Some(Owner::Handshake) => self.handshake_ready(fd),
                Some(Owner::Conn(key)) => {
                    let hangup = events.intersects(EventSet::HANG_UP | EventSet::ERROR);
                    let readable = events.intersects(EventSet::IN | EventSet::READ_HANG_UP);
                    let writable = events.contains(EventSet::OUT);
                    if let Some(c) = self.conns.get_mut(&key) {
                        let was = c.state();
                        c.host_event(readable, writable, hangup);
                        if was != State::Killed && c.state() == State::Killed {
                            self.metrics.inc(|m| &m.conns_killed);
                        }
                    }
                    self.schedule(key);
                }
                // A socket already given up; the loop stops watching it shortly.
                None => {}
            }
        }
        self.settle();
    }

    fn take_sources_changed(&mut self) -> bool {
        // The loop has re-read the sources since these were retired: closing them now
        // cannot pull a reused descriptor number out from under it.
        self.unwatched.clear();
        if !std::mem::take(&mut self.sources_changed) {
            return false;
        }
        self.unwatched = std::mem::take(&mut self.retired);
        true
    }

    fn quiesce(&mut self) {
        // Nothing runs behind the vmm thread's back: every chain is answered as it is
        // taken. Connections stay; the host sockets wait unwatched while the VM is paused.
    }

    fn metrics(&self) -> Option<(&'static str, Arc<dyn Group>)> {
        Some(("vsock", self.metrics.group()))
    }
}

#[cfg(test)]
mod tests;
