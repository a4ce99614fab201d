//! The device against guest memory driven like a guest driver would (tests/virtq-driver),
//! real Unix sockets in a temporary directory on the host side, and a real epoll set
//! maintained the way the vmm thread's handler maintains it (edge-triggered sources
//! re-registered whenever the device says they changed).

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use ember_virtq_driver::{Desc, QueueDriver};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent};

use super::connection::CONN_BUF_ALLOC;
use super::packet::*;
use super::*;

struct CountingInterrupt(AtomicUsize, Mutex<Vec<VirtioInterruptType>>);

impl VirtioInterrupt for CountingInterrupt {
    fn trigger(&self, kind: VirtioInterruptType) {
        self.0.fetch_add(1, Ordering::SeqCst);
        self.1.lock().unwrap().push(kind);
    }
}

const GUEST_CID: u32 = 3;
const MEM_SIZE: usize = 24 << 20;
const RX_RINGS: u64 = 0;
const TX_RINGS: u64 = 0x1_0000;
const EV_RINGS: u64 = 0x2_0000;
const EV_BUFS: u64 = 0x3_0000;
/// One receive buffer per descriptor index, 4 KiB of payload each, as Linux gives them.
const RX_BUFS: u64 = 0x10_0000;
const RX_STRIDE: u64 = 0x2000;
const RX_BUF_LEN: u32 = HDR_LEN as u32 + 4096;
/// One transmit buffer per descriptor index, room for a header and a largest payload.
const TX_BUFS: u64 = 0x40_0000;
const TX_STRIDE: u64 = 0x1_0100;
const QSIZE: u16 = 256;
/// How long a test waits for something that should happen before failing.
const PATIENCE: Duration = Duration::from_secs(10);

static DIRS: AtomicUsize = AtomicUsize::new(0);

fn temp_dir() -> PathBuf {
    let n = DIRS.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("ember-vsock-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A packet as the guest sees it.
#[derive(Debug)]
struct Pkt {
    hdr: Header,
    data: Vec<u8>,
}

struct Rig {
    dir: PathBuf,
    uds: PathBuf,
    mem: GuestMemoryMmap,
    rx: QueueDriver,
    tx: QueueDriver,
    ev: QueueDriver,
    dev: Vsock,
    interrupt: Arc<CountingInterrupt>,
    /// Next descriptor index of each queue, as the driver hands them out.
    rx_next: u16,
    tx_next: u16,
    /// Receive chains the device has not returned yet.
    rx_outstanding: usize,
    epoll: Epoll,
    watched: Vec<(RawFd, EventSet)>,
}

/// A header from the guest on its stream connection (guest port `src`, host port `dst`).
fn ghdr(op: u16, src: u32, dst: u32) -> Header {
    Header {
        src_cid: u64::from(GUEST_CID),
        dst_cid: HOST_CID,
        src_port: src,
        dst_port: dst,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: CONN_BUF_ALLOC,
        fwd_cnt: 0,
    }
}

impl Rig {
    fn new() -> Self {
        let dir = temp_dir();
        let uds = dir.join("v.sock");
        let dev = Vsock::new(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: uds.clone(),
        })
        .unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let rx = QueueDriver::new(&mem, RX_RINGS, QSIZE);
        let tx = QueueDriver::new(&mem, TX_RINGS, QSIZE);
        let ev = QueueDriver::new(&mem, EV_RINGS, 16);
        let interrupt = Arc::new(CountingInterrupt(AtomicUsize::new(0), Mutex::new(vec![])));
        let mut r = Rig {
            dir,
            uds,
            mem,
            rx,
            tx,
            ev,
            dev,
            interrupt,
            rx_next: 0,
            tx_next: 0,
            rx_outstanding: 0,
            epoll: Epoll::new().unwrap(),
            watched: Vec::new(),
        };
        r.dev
            .activate(
                r.mem.clone(),
                (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX),
                vec![
                    r.rx.device_queue(),
                    r.tx.device_queue(),
                    r.ev.device_queue(),
                ],
                r.interrupt.clone(),
            )
            .unwrap();
        r.watch();
        r
    }

    /// What the handler does after every call into the device.
    fn after_call(&mut self) {
        if self.dev.take_sources_changed() {
            self.watch();
        }
    }

    fn watch(&mut self) {
        for (fd, _) in std::mem::take(&mut self.watched) {
            // Must succeed: the device keeps what was watched open until now.
            self.epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())
                .unwrap_or_else(|e| panic!("fd {fd} closed while still watched: {e}"));
        }
        let sources = self.dev.event_sources();
        for &(fd, set) in &sources {
            self.epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(set, fd as u64))
                .unwrap();
        }
        self.watched = sources;
    }

    /// Runs the event loop until it has nothing more to do right now (or `wait_ms` pass
    /// without an event).
    fn pump_for(&mut self, wait_ms: i32) {
        let mut events = [EpollEvent::default(); 1];
        loop {
            let n = self.epoll.wait(wait_ms, &mut events).unwrap();
            if n == 0 {
                return;
            }
            let ev = events[0];
            self.dev
                .process_event(ev.fd(), EventSet::from_bits_truncate(ev.events()));
            self.after_call();
        }
    }

    fn pump(&mut self) {
        self.pump_for(0);
    }

    fn notify(&mut self, queue: usize) {
        self.dev.process_queue(queue);
        self.after_call();
    }

    /// Makes `n` more receive buffers available.
    fn give_rx(&mut self, n: usize) {
        for _ in 0..n {
            assert!(self.rx_outstanding < QSIZE as usize, "test gave too many");
            let addr = RX_BUFS + u64::from(self.rx_next) * RX_STRIDE;
            self.rx.add_chain(
                &self.mem,
                &[Desc {
                    addr,
                    len: RX_BUF_LEN,
                    write: true,
                }],
            );
            self.rx_next = (self.rx_next + 1) % QSIZE;
            self.rx_outstanding += 1;
        }
        self.notify(RX_QUEUE);
    }

    /// Packets the device put in the receive queue since the last call; the buffers are
    /// given back when `refill`.
    fn take_rx(&mut self, refill: bool) -> Vec<Pkt> {
        let used = self.rx.take_used(&self.mem);
        self.rx_outstanding -= used.len();
        let mut out = Vec::new();
        for &(id, len) in &used {
            assert!(len as usize >= HDR_LEN, "short packet {len}");
            let mut b = vec![0u8; len as usize];
            self.mem
                .read_slice(&mut b, GuestAddress(RX_BUFS + u64::from(id) * RX_STRIDE))
                .unwrap();
            let hdr = Header::parse(&b).unwrap();
            assert_eq!(hdr.len as usize, b.len() - HDR_LEN, "len matches {hdr:?}");
            out.push(Pkt {
                hdr,
                data: b[HDR_LEN..].to_vec(),
            });
        }
        if refill && !used.is_empty() {
            self.give_rx(used.len());
        }
        out
    }

    /// Pumps until the guest got at least one packet; returns what it got.
    fn wait_rx(&mut self) -> Vec<Pkt> {
        let until = Instant::now() + PATIENCE;
        loop {
            self.pump_for(10);
            let p = self.take_rx(true);
            if !p.is_empty() {
                return p;
            }
            assert!(Instant::now() < until, "no packet for the guest");
        }
    }

    /// The guest queues raw descriptors as one transmit chain.
    fn send_chain(&mut self, descs: &[Desc]) {
        self.tx.add_chain(&self.mem, descs);
        self.tx_next = (self.tx_next + descs.len() as u16) % QSIZE;
        self.notify(TX_QUEUE);
        let _ = self.tx.take_used(&self.mem);
    }

    /// The guest sends a packet: header and payload in two buffers, as Linux does.
    fn send(&mut self, mut hdr: Header, data: &[u8]) {
        hdr.len = data.len() as u32;
        let h = TX_BUFS + u64::from(self.tx_next) * TX_STRIDE;
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(h))
            .unwrap();
        let mut descs = vec![Desc {
            addr: h,
            len: HDR_LEN as u32,
            write: false,
        }];
        if !data.is_empty() {
            let d = TX_BUFS + u64::from((self.tx_next + 1) % QSIZE) * TX_STRIDE;
            self.mem.write_slice(data, GuestAddress(d)).unwrap();
            descs.push(Desc {
                addr: d,
                len: data.len() as u32,
                write: false,
            });
        }
        self.send_chain(&descs);
    }

    /// A host process connects to the device and asks for guest `port`; the guest accepts.
    /// Returns the host socket and the host port the device picked.
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut host = UnixStream::connect(&self.uds).unwrap();
        host.write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        let req = self.wait_rx();
        assert_eq!(req.len(), 1, "{req:?}");
        let h = req[0].hdr;
        assert_eq!(h.op, OP_REQUEST);
        assert_eq!(h.dst_port, port);
        self.send(ghdr(OP_RESPONSE, port, h.src_port), &[]);
        let line = read_line(self, &mut host);
        assert_eq!(line, format!("OK {}\n", h.src_port));
        (host, h.src_port)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Reads one line the device wrote to `host`, pumping the device meanwhile.
fn read_line(r: &mut Rig, host: &mut UnixStream) -> String {
    host.set_nonblocking(true).unwrap();
    let mut line = Vec::new();
    let until = Instant::now() + PATIENCE;
    loop {
        r.pump_for(5);
        let mut b = [0u8; 1];
        match host.read(&mut b) {
            Ok(1) => {
                line.push(b[0]);
                if b[0] == b'\n' {
                    return String::from_utf8(line).unwrap();
                }
            }
            Ok(_) => panic!("end of stream before a line: {line:?}"),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        assert!(Instant::now() < until, "no line");
    }
}

/// Reads exactly `n` bytes from `host`, pumping the device meanwhile.
fn host_read(r: &mut Rig, host: &mut UnixStream, n: usize) -> Vec<u8> {
    host.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    let until = Instant::now() + PATIENCE;
    while got.len() < n {
        r.pump_for(5);
        match host.read(&mut buf[..(n - got.len()).min(65536)]) {
            Ok(0) => panic!("end of stream after {} of {n} bytes", got.len()),
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        assert!(Instant::now() < until, "{} of {n} bytes", got.len());
    }
    got
}

/// True once `host` reads end of stream (or a reset), pumping meanwhile.
fn host_sees_eof(r: &mut Rig, host: &mut UnixStream) -> bool {
    host.set_nonblocking(true).unwrap();
    let until = Instant::now() + PATIENCE;
    let mut b = [0u8; 64];
    loop {
        r.pump_for(5);
        match host.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => return false,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => return true,
        }
        if Instant::now() > until {
            return false;
        }
    }
}

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + seed * 7 + i / 251) % 256) as u8)
        .collect()
}

/// Collects the guest's OP_RW bytes from host port `local` until `n` arrived, crediting
/// the device generously; other packets for the connection are returned too.
fn guest_read(r: &mut Rig, local: u32, n: usize) -> (Vec<u8>, Vec<Pkt>) {
    let mut data = Vec::new();
    let mut other = Vec::new();
    let until = Instant::now() + PATIENCE;
    while data.len() < n {
        r.pump_for(5);
        for p in r.take_rx(true) {
            assert_eq!(p.hdr.src_port, local, "{:?}", p.hdr);
            if p.hdr.op == OP_RW {
                data.extend_from_slice(&p.data);
            } else {
                other.push(p);
            }
        }
        assert!(Instant::now() < until, "{} of {n} bytes", data.len());
    }
    (data, other)
}

#[test]
fn config_space_features_and_queues() {
    let r = Rig::new();
    let mut b = [0u8; 8];
    r.dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), u64::from(GUEST_CID));
    assert_eq!(r.dev.device_type(), 19);
    assert_eq!(r.dev.queue_max_sizes(), &[256, 256, 256]);
    let f = r.dev.device_features();
    assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0);
    assert_ne!(f & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
    assert!(matches!(
        Vsock::new(VsockConfig {
            guest_cid: 2,
            uds_path: r.dir.join("x")
        }),
        Err(VsockError::BadCid(2))
    ));
    // The path is taken by a live listener: refused.
    assert!(matches!(
        Vsock::new(VsockConfig {
            guest_cid: 3,
            uds_path: r.uds.clone()
        }),
        Err(VsockError::Unix(unix::UnixError::InUse { .. }))
    ));
}

/// (1) A host process connects, the guest accepts, bytes flow both ways exactly, and the
/// host closing is told to the guest.
#[test]
fn host_initiated_connection_carries_data_both_ways() {
    let mut r = Rig::new();
    r.give_rx(64);
    let mut host = UnixStream::connect(&r.uds).unwrap();
    host.write_all(b"CONNECT 1234\n").unwrap();
    let req = r.wait_rx();
    assert_eq!(req.len(), 1, "{req:?}");
    let h = req[0].hdr;
    assert_eq!(
        (h.op, h.src_cid, h.dst_cid, h.dst_port, h.type_),
        (OP_REQUEST, 2, u64::from(GUEST_CID), 1234, TYPE_STREAM)
    );
    assert!(
        h.src_port >= 1 << 30,
        "an ephemeral host port: {}",
        h.src_port
    );
    assert_eq!(h.buf_alloc, CONN_BUF_ALLOC);
    let local = h.src_port;
    r.send(ghdr(OP_RESPONSE, 1234, local), &[]);
    assert_eq!(read_line(&mut r, &mut host), format!("OK {local}\n"));
    // From now on the event loop must also report when the host can take more: the
    // socket is watched for writing, which it was not during the handshake.
    r.pump();
    let writable: Vec<_> = r
        .watched
        .iter()
        .filter(|(_, set)| set.contains(EventSet::OUT))
        .collect();
    assert_eq!(writable.len(), 1, "{:?}", r.watched);

    // Host to guest.
    let to_guest = pattern(1, 100_000);
    host.write_all(&to_guest).unwrap();
    let (got, other) = guest_read(&mut r, local, to_guest.len());
    assert!(other.is_empty(), "{other:?}");
    assert_eq!(got, to_guest);

    // Guest to host, in packets of up to 64 KiB.
    let to_host = pattern(2, 150_000);
    for chunk in to_host.chunks(60_000) {
        r.send(ghdr(OP_RW, 1234, local), chunk);
    }
    assert_eq!(host_read(&mut r, &mut host, to_host.len()), to_host);
    assert_eq!(r.dev.counters().tx_bytes_count.total(), 150_000);
    assert_eq!(r.dev.counters().rx_bytes_count.total(), 100_000);

    // The host closes: the guest is told it gets and takes nothing more.
    drop(host);
    let mut pkts = r.wait_rx();
    // Credit for what the host took may come first.
    pkts.retain(|p| p.hdr.op != OP_CREDIT_UPDATE);
    if pkts.is_empty() {
        pkts = r.wait_rx();
    }
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(pkts[0].hdr.op, OP_SHUTDOWN, "{pkts:?}");
    assert_eq!(pkts[0].hdr.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    // The guest acknowledges with an RST (as Linux does); the connection is gone.
    r.send(ghdr(OP_RST, 1234, local), &[]);
    r.pump();
    assert_eq!(r.dev.connection_count(), 0);
    assert!(r.take_rx(true).is_empty(), "no answer to an RST");
}

/// A host that only shuts its writing side still gets the guest's bytes; the connection
/// ends when the guest is done too.
#[test]
fn a_host_half_close_leaves_the_other_direction_open() {
    let mut r = Rig::new();
    r.give_rx(16);
    let (mut host, local) = r.host_connect(80);
    host.write_all(b"request").unwrap();
    host.shutdown(Shutdown::Write).unwrap();
    let (got, other) = guest_read(&mut r, local, 7);
    assert_eq!(got, b"request");
    let mut ops: Vec<(u16, u32)> = other.iter().map(|p| (p.hdr.op, p.hdr.flags)).collect();
    if ops.is_empty() {
        ops = r
            .wait_rx()
            .iter()
            .map(|p| (p.hdr.op, p.hdr.flags))
            .collect();
    }
    assert_eq!(ops, vec![(OP_SHUTDOWN, SHUTDOWN_SEND)]);
    r.send(ghdr(OP_RW, 80, local), b"response");
    assert_eq!(host_read(&mut r, &mut host, 8), b"response");
    // The guest closes: the host reads the end, the guest gets the final RST.
    r.send(
        Header {
            flags: SHUTDOWN_RCV | SHUTDOWN_SEND,
            ..ghdr(OP_SHUTDOWN, 80, local)
        },
        &[],
    );
    assert!(host_sees_eof(&mut r, &mut host));
    let pkts = r.wait_rx();
    assert_eq!(pkts.iter().map(|p| p.hdr.op).collect::<Vec<_>>(), [OP_RST]);
    assert_eq!(r.dev.connection_count(), 0);
}

/// (2) The guest connects to `<uds>_5000` where a host service listens; to a port nobody
/// listens on it gets an RST.
#[test]
fn guest_initiated_connection_reaches_the_host_service() {
    let mut r = Rig::new();
    r.give_rx(64);
    let service = UnixListener::bind(format!("{}_5000", r.uds.display())).unwrap();
    r.send(ghdr(OP_REQUEST, 7777, 5000), &[]);
    let pkts = r.wait_rx();
    let h = pkts[0].hdr;
    assert_eq!(
        (h.op, h.src_cid, h.src_port, h.dst_cid, h.dst_port),
        (OP_RESPONSE, 2, 5000, u64::from(GUEST_CID), 7777)
    );
    let (mut host, _) = service.accept().unwrap();

    let to_host = pattern(3, 70_000);
    r.send(ghdr(OP_RW, 7777, 5000), &to_host[..50_000]);
    r.send(ghdr(OP_RW, 7777, 5000), &to_host[50_000..]);
    assert_eq!(host_read(&mut r, &mut host, to_host.len()), to_host);

    let to_guest = pattern(4, 33_333);
    host.write_all(&to_guest).unwrap();
    let (got, _) = guest_read(&mut r, 5000, to_guest.len());
    assert_eq!(got, to_guest);

    // The guest closes; the host sees the end, the guest gets its RST.
    r.send(
        Header {
            flags: SHUTDOWN_RCV | SHUTDOWN_SEND,
            ..ghdr(OP_SHUTDOWN, 7777, 5000)
        },
        &[],
    );
    assert!(host_sees_eof(&mut r, &mut host));
    let pkts = r.wait_rx();
    assert_eq!(pkts[0].hdr.op, OP_RST);
    assert_eq!(r.dev.connection_count(), 0);

    // Nobody listens on 5001.
    r.send(ghdr(OP_REQUEST, 7778, 5001), &[]);
    let pkts = r.wait_rx();
    let h = pkts[0].hdr;
    assert_eq!(
        (h.op, h.src_port, h.dst_port, h.dst_cid),
        (OP_RST, 5001, 7778, u64::from(GUEST_CID))
    );
    assert_eq!(r.dev.counters().connect_fails.total(), 1);
    assert_eq!(r.dev.connection_count(), 0);
}

/// (3) The device never sends more than the guest's credit; as the guest consumes (its
/// fwd_cnt in CREDIT_UPDATE), the rest comes, in order.
#[test]
fn host_to_guest_respects_the_guests_credit() {
    const GUEST_BUF: u32 = 4096;
    let mut r = Rig::new();
    r.give_rx(64);
    let service = UnixListener::bind(format!("{}_6000", r.uds.display())).unwrap();
    r.send(
        Header {
            buf_alloc: GUEST_BUF,
            ..ghdr(OP_REQUEST, 1000, 6000)
        },
        &[],
    );
    assert_eq!(r.wait_rx()[0].hdr.op, OP_RESPONSE);
    let (host, _) = service.accept().unwrap();
    let data = pattern(5, 100 * 1024);
    let writer = {
        let data = data.clone();
        let mut host = host.try_clone().unwrap();
        std::thread::spawn(move || host.write_all(&data).unwrap())
    };
    let mut got = Vec::new();
    let mut fwd_cnt = 0u32;
    let until = Instant::now() + PATIENCE;
    while got.len() < data.len() {
        // Twice: nothing more comes until the guest consumes, however long it waits.
        for _ in 0..2 {
            r.pump_for(5);
            for p in r.take_rx(true) {
                match p.hdr.op {
                    OP_RW => got.extend_from_slice(&p.data),
                    // The device may ask when it has data and no credit.
                    OP_CREDIT_REQUEST => {}
                    op => panic!("unexpected op {op}"),
                }
                let in_flight = got.len() as u32 - fwd_cnt;
                assert!(
                    in_flight <= GUEST_BUF,
                    "{in_flight} bytes unconsumed, credit {GUEST_BUF}"
                );
            }
        }
        // The guest's application read everything: it tells the device.
        fwd_cnt = got.len() as u32;
        r.send(
            Header {
                buf_alloc: GUEST_BUF,
                fwd_cnt,
                ..ghdr(OP_CREDIT_UPDATE, 1000, 6000)
            },
            &[],
        );
        assert!(
            Instant::now() < until,
            "{} of {} bytes",
            got.len(),
            data.len()
        );
    }
    writer.join().unwrap();
    assert_eq!(got, data);
    assert!(
        r.dev.counters().rx_packets_count.total() >= (100 * 1024 / 4096) as u64,
        "never more than 4 KiB at a time"
    );
    drop(host);
}

/// (4) A guest that gives no receive buffers: the device reads nothing more from the host
/// socket, whose writer ends up blocked; nothing accumulates in the device.
#[test]
fn a_guest_that_stops_reading_does_not_grow_host_memory() {
    let mut r = Rig::new();
    r.give_rx(4);
    let (mut host, _local) = r.host_connect(99);
    // The guest takes its four buffers' worth, then gives no more.
    host.set_nonblocking(true).unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    let mut written = 0usize;
    let mut blocked_rounds = 0;
    while written < 10 << 20 && blocked_rounds < 20 {
        match host.write(&chunk) {
            Ok(n) => {
                written += n;
                blocked_rounds = 0;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => blocked_rounds += 1,
            Err(e) => panic!("{e}"),
        }
        r.pump_for(1);
        let _ = r.take_rx(false);
        assert_eq!(r.dev.buffered_bytes(), 0);
    }
    assert!(
        written < 10 << 20,
        "the host wrote all 10 MiB: the device kept reading"
    );
    assert!(blocked_rounds >= 20, "the host writer blocks");
    // What the guest got is its four buffers; the rest waits in the host socket.
    assert_eq!(r.dev.counters().rx_bytes_count.total(), 4 * 4096);
    // Buffers again: reading resumes without a new host event.
    r.give_rx(8);
    r.pump();
    let p = r.take_rx(false);
    assert_eq!(p.len(), 8);
    assert!(p.iter().all(|p| p.hdr.op == OP_RW && p.data.len() == 4096));
}

/// The other direction: a host service that does not read holds guest bytes in the device
/// only up to the credit the device advertised.
#[test]
fn guest_to_host_buffering_is_bounded_by_the_advertised_credit() {
    let mut r = Rig::new();
    r.give_rx(32);
    let service = UnixListener::bind(format!("{}_7000", r.uds.display())).unwrap();
    r.send(ghdr(OP_REQUEST, 1, 7000), &[]);
    assert_eq!(r.wait_rx()[0].hdr.op, OP_RESPONSE);
    let (mut host, _) = service.accept().unwrap();
    // The guest sends within its credit as the device reports it.
    let mut sent = 0u32;
    let mut fwd_cnt = 0u32;
    let chunk = pattern(6, 32 * 1024);
    loop {
        r.pump();
        for p in r.take_rx(true) {
            assert_ne!(p.hdr.op, OP_RST, "reset although within credit");
            assert_eq!(p.hdr.buf_alloc, CONN_BUF_ALLOC);
            fwd_cnt = p.hdr.fwd_cnt;
        }
        let free = CONN_BUF_ALLOC - (sent - fwd_cnt);
        if free < chunk.len() as u32 {
            break;
        }
        r.send(ghdr(OP_RW, 1, 7000), &chunk);
        sent += chunk.len() as u32;
        assert!(r.dev.buffered_bytes() <= CONN_BUF_ALLOC as usize);
        assert!(sent < 64 << 20, "the device never ran out of room");
    }
    assert!(r.dev.buffered_bytes() > 0, "the host socket filled up");
    // The host reads: the device forwards what waited, and credits the guest.
    let all = host_read(&mut r, &mut host, sent as usize);
    assert!(all.chunks(chunk.len()).all(|c| c == chunk));
    assert_eq!(r.dev.buffered_bytes(), 0);
    let updates: Vec<_> = r.take_rx(true);
    let last = updates.last().map(|p| p.hdr.fwd_cnt).unwrap_or(fwd_cnt);
    assert!(
        sent - last < CONN_BUF_ALLOC / 4 + chunk.len() as u32,
        "the guest heard of the freed room: sent {sent}, fwd_cnt {last}"
    );
}

/// (5) Many host connections at once, each with its own bytes.
#[test]
fn sixty_four_parallel_host_connections() {
    const N: usize = 64;
    const LEN: usize = 20_000;
    let mut r = Rig::new();
    r.give_rx(256);
    let mut hosts = Vec::new();
    for i in 0..N {
        let mut h = UnixStream::connect(&r.uds).unwrap();
        h.write_all(format!("CONNECT {}\n", 2000 + i).as_bytes())
            .unwrap();
        hosts.push(h);
    }
    // Every request reaches the guest; it accepts them all.
    let mut local = vec![0u32; N];
    let mut seen = 0;
    let until = Instant::now() + PATIENCE;
    while seen < N {
        r.pump_for(5);
        for p in r.take_rx(true) {
            assert_eq!(p.hdr.op, OP_REQUEST);
            let i = (p.hdr.dst_port - 2000) as usize;
            local[i] = p.hdr.src_port;
            seen += 1;
        }
        assert!(Instant::now() < until, "{seen} requests");
    }
    let mut ports = local.clone();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), N, "distinct host ports");
    for (i, &l) in local.iter().enumerate() {
        r.send(ghdr(OP_RESPONSE, 2000 + i as u32, l), &[]);
    }
    for (i, h) in hosts.iter_mut().enumerate() {
        assert_eq!(read_line(&mut r, h), format!("OK {}\n", local[i]));
    }
    // All hosts write at once; the guest echoes each connection's bytes back.
    for (i, h) in hosts.iter_mut().enumerate() {
        h.write_all(&pattern(100 + i, LEN)).unwrap();
    }
    let mut got = vec![Vec::new(); N];
    let until = Instant::now() + PATIENCE;
    while got.iter().any(|g| g.len() < LEN) {
        r.pump_for(5);
        for p in r.take_rx(true) {
            assert_eq!(p.hdr.op, OP_RW, "{:?}", p.hdr);
            let i = (p.hdr.dst_port - 2000) as usize;
            assert_eq!(p.hdr.src_port, local[i]);
            got[i].extend_from_slice(&p.data);
            r.send(ghdr(OP_RW, p.hdr.dst_port, p.hdr.src_port), &p.data);
        }
        assert!(Instant::now() < until, "data did not all arrive");
    }
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g, &pattern(100 + i, LEN), "connection {i}");
    }
    for (i, h) in hosts.iter_mut().enumerate() {
        assert_eq!(host_read(&mut r, h, LEN), pattern(100 + i, LEN), "echo {i}");
    }
    assert_eq!(r.dev.connection_count(), N);
}

/// (6) Hostile and mistaken packets: answered with RST where an answer makes sense, never
/// a panic, and the device goes on working.
#[test]
fn bad_packets_are_refused_and_the_device_goes_on() {
    let mut r = Rig::new();
    r.give_rx(64);
    let guest = u64::from(GUEST_CID);

    // Unusable chains: no header to answer.
    r.send_chain(&[Desc {
        addr: TX_BUFS,
        len: 20,
        write: false,
    }]);
    r.send_chain(&[Desc {
        addr: TX_BUFS,
        len: 100,
        write: true,
    }]);
    r.send_chain(&[Desc {
        addr: MEM_SIZE as u64 - 10,
        len: 100,
        write: false,
    }]);
    r.send_chain(&[Desc {
        addr: u64::MAX - 5,
        len: 100,
        write: false,
    }]);
    r.pump();
    assert!(r.take_rx(true).is_empty());
    assert_eq!(r.dev.counters().malformed_packets.total(), 4);

    let expect_rst = |r: &mut Rig, src_cid: u64, src: u32, dst: u32| {
        let p = r.wait_rx();
        assert_eq!(p.len(), 1, "{p:?}");
        let h = p[0].hdr;
        assert_eq!(
            (h.op, h.src_cid, h.dst_cid, h.src_port, h.dst_port),
            (OP_RST, src_cid, guest, src, dst)
        );
    };
    // Data for a connection that does not exist.
    r.send(ghdr(OP_RW, 10, 20), b"hello");
    expect_rst(&mut r, 2, 20, 10);
    // A type the device does not support.
    r.send(
        Header {
            type_: 2,
            ..ghdr(OP_REQUEST, 11, 21)
        },
        &[],
    );
    expect_rst(&mut r, 2, 21, 11);
    // Another CID than the host's.
    r.send(
        Header {
            dst_cid: 5,
            ..ghdr(OP_REQUEST, 12, 22)
        },
        &[],
    );
    expect_rst(&mut r, 5, 22, 12);
    // A source CID that is not the guest's.
    r.send(
        Header {
            src_cid: 77,
            ..ghdr(OP_REQUEST, 13, 23)
        },
        &[],
    );
    expect_rst(&mut r, 2, 23, 13);
    // An unknown op.
    r.send(ghdr(99, 14, 24), &[]);
    expect_rst(&mut r, 2, 24, 14);
    // Longer than the largest packet, and longer than its chain.
    r.send_chain(&[Desc {
        addr: TX_BUFS + 0x10_0000,
        len: HDR_LEN as u32,
        write: false,
    }]);
    let mut h = ghdr(OP_RW, 15, 25);
    h.len = MAX_PKT_LEN + 1;
    r.mem
        .write_slice(&h.to_bytes(), GuestAddress(TX_BUFS + 0x10_0000))
        .unwrap();
    r.send_chain(&[Desc {
        addr: TX_BUFS + 0x10_0000,
        len: HDR_LEN as u32 + 100,
        write: false,
    }]);
    h.len = 500;
    r.mem
        .write_slice(&h.to_bytes(), GuestAddress(TX_BUFS + 0x10_0000))
        .unwrap();
    r.send_chain(&[Desc {
        addr: TX_BUFS + 0x10_0000,
        len: HDR_LEN as u32 + 100,
        write: false,
    }]);
    let p = r.wait_rx();
    let ops: Vec<u16> = p.iter().map(|p| p.hdr.op).collect();
    // The first of those three carries a zeroed header of type 0: refused too.
    assert!(ops.iter().all(|&op| op == OP_RST), "{ops:?}");
    // An RST for nothing is not answered.
    r.send(ghdr(OP_RST, 16, 26), &[]);
    r.pump();
    assert!(r.take_rx(true).is_empty());

    // A guest that sends beyond its credit on a live connection is reset, and the host
    // sees the end.
    let service = UnixListener::bind(format!("{}_8000", r.uds.display())).unwrap();
    r.send(ghdr(OP_REQUEST, 30, 8000), &[]);
    assert_eq!(r.wait_rx()[0].hdr.op, OP_RESPONSE);
    let (mut host, _) = service.accept().unwrap();
    let chunk = vec![1u8; 64 * 1024];
    let mut reset = false;
    for _ in 0..64 {
        r.send(ghdr(OP_RW, 30, 8000), &chunk);
        assert!(r.dev.buffered_bytes() <= CONN_BUF_ALLOC as usize);
        r.pump();
        if r.take_rx(true).iter().any(|p| p.hdr.op == OP_RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "a guest ignoring its credit is reset");
    assert_eq!(r.dev.counters().credit_violations.total(), 1);
    assert_eq!(r.dev.connection_count(), 0);
    assert_eq!(r.dev.buffered_bytes(), 0);
    // What the host reads ends: the bytes before the reset, then end of stream.
    host.set_nonblocking(true).unwrap();
    let mut sink = vec![0u8; 1 << 20];
    let until = Instant::now() + PATIENCE;
    loop {
        match host.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(_) => break,
        }
        assert!(Instant::now() < until, "no end of stream");
    }

    // A RESPONSE out of turn on a live connection resets it.
    r.send(ghdr(OP_REQUEST, 31, 8000), &[]);
    assert_eq!(r.wait_rx()[0].hdr.op, OP_RESPONSE);
    let (mut host, _) = service.accept().unwrap();
    r.send(ghdr(OP_RESPONSE, 31, 8000), &[]);
    expect_rst(&mut r, 2, 8000, 31);
    assert!(host_sees_eof(&mut r, &mut host));

    // Still working.
    r.send(ghdr(OP_REQUEST, 32, 8000), &[]);
    assert_eq!(r.wait_rx()[0].hdr.op, OP_RESPONSE);
    let (mut host, _) = service.accept().unwrap();
    r.send(ghdr(OP_RW, 32, 8000), b"still here");
    assert_eq!(host_read(&mut r, &mut host, 10), b"still here");
    assert!(!r.dev.needs_reset());
}

#[test]
fn bad_connect_lines_close_the_host_socket() {
    let mut r = Rig::new();
    r.give_rx(8);
    for line in [&b"HELLO 1\n"[..], b"CONNECT x\n", &[b'7'; 40]] {
        let mut host = UnixStream::connect(&r.uds).unwrap();
        host.write_all(line).unwrap();
        assert!(host_sees_eof(&mut r, &mut host), "{line:?}");
    }
    // A host that goes away before its line.
    drop(UnixStream::connect(&r.uds).unwrap());
    r.pump_for(20);
    assert!(r.take_rx(true).is_empty(), "the guest heard nothing");
    assert_eq!(r.dev.counters().handshake_fails.total(), 4);
    // A line split over two writes is fine, and bytes right after it are the first data.
    let mut host = UnixStream::connect(&r.uds).unwrap();
    host.write_all(b"CONN").unwrap();
    r.pump_for(5);
    host.write_all(b"ECT 42\nearly").unwrap();
    let p = r.wait_rx();
    assert_eq!((p[0].hdr.op, p[0].hdr.dst_port), (OP_REQUEST, 42));
    let local = p[0].hdr.src_port;
    r.send(ghdr(OP_RESPONSE, 42, local), &[]);
    assert_eq!(read_line(&mut r, &mut host), format!("OK {local}\n"));
    let (got, _) = guest_read(&mut r, local, 5);
    assert_eq!(got, b"early");
}

/// A request the guest never answers (and a handshake never finished) times out.
#[test]
fn unanswered_requests_time_out() {
    let mut r = Rig::new();
    r.give_rx(8);
    let mut host = UnixStream::connect(&r.uds).unwrap();
    host.write_all(b"CONNECT 5\n").unwrap();
    let mut silent = UnixStream::connect(&r.uds).unwrap();
    let p = r.wait_rx();
    assert_eq!(p[0].hdr.op, OP_REQUEST);
    let local = p[0].hdr.src_port;
    let started = Instant::now();
    let p = r.wait_rx();
    assert!(started.elapsed() >= REQUEST_TIMEOUT - Duration::from_millis(100));
    assert_eq!(
        (p[0].hdr.op, p[0].hdr.src_port, p[0].hdr.dst_port),
        (OP_RST, local, 5)
    );
    assert!(host_sees_eof(&mut r, &mut host));
    assert!(host_sees_eof(&mut r, &mut silent));
    assert_eq!(r.dev.connection_count(), 0);
}

/// A guest that refuses a host connection: the host socket is closed without an OK.
#[test]
fn a_refused_request_closes_the_host_socket() {
    let mut r = Rig::new();
    r.give_rx(8);
    let mut host = UnixStream::connect(&r.uds).unwrap();
    host.write_all(b"CONNECT 9\n").unwrap();
    let p = r.wait_rx();
    r.send(ghdr(OP_RST, 9, p[0].hdr.src_port), &[]);
    assert!(host_sees_eof(&mut r, &mut host));
    assert_eq!(r.dev.connection_count(), 0);
}

#[test]
fn transport_reset_drops_connections_and_tells_the_guest() {
    let mut r = Rig::new();
    r.give_rx(8);
    let (mut host, _) = r.host_connect(1);
    // No event buffer yet: the event waits for one.
    r.dev.send_transport_reset();
    r.after_call();
    assert!(host_sees_eof(&mut r, &mut host));
    assert_eq!(r.dev.connection_count(), 0);
    r.ev.add_chain(
        &r.mem,
        &[Desc {
            addr: EV_BUFS,
            len: 4,
            write: true,
        }],
    );
    r.mem
        .write_obj(0xffff_ffffu32, GuestAddress(EV_BUFS))
        .unwrap();
    r.notify(EVENT_QUEUE);
    assert_eq!(r.ev.take_used(&r.mem), vec![(0, 4)]);
    let id: u32 = r.mem.read_obj(GuestAddress(EV_BUFS)).unwrap();
    assert_eq!(id, EVENT_TRANSPORT_RESET);
    assert!(
        r.interrupt
            .1
            .lock()
            .unwrap()
            .contains(&VirtioInterruptType::Queue(EVENT_QUEUE as u16))
    );
    // Connections work again afterwards.
    let (mut host, local) = r.host_connect(2);
    r.send(ghdr(OP_RW, 2, local), b"x");
    assert_eq!(host_read(&mut r, &mut host, 1), b"x");
}

#[test]
fn reset_drops_connections_keeps_the_listener() {
    let mut r = Rig::new();
    r.give_rx(8);
    let (mut host, _) = r.host_connect(1);
    r.dev.reset();
    r.after_call();
    assert!(host_sees_eof(&mut r, &mut host));
    assert_eq!(r.dev.connection_count(), 0);
    // Reactivated, the listener still takes host processes.
    r.rx = QueueDriver::new(&r.mem, RX_RINGS, QSIZE);
    r.tx = QueueDriver::new(&r.mem, TX_RINGS, QSIZE);
    r.ev = QueueDriver::new(&r.mem, EV_RINGS, 16);
    (r.rx_next, r.tx_next, r.rx_outstanding) = (0, 0, 0);
    r.dev
        .activate(
            r.mem.clone(),
            1 << VIRTIO_F_VERSION_1,
            vec![
                r.rx.device_queue(),
                r.tx.device_queue(),
                r.ev.device_queue(),
            ],
            r.interrupt.clone(),
        )
        .unwrap();
    r.give_rx(8);
    let (mut host, local) = r.host_connect(3);
    r.send(ghdr(OP_RW, 3, local), b"again");
    assert_eq!(host_read(&mut r, &mut host, 5), b"again");
}

#[test]
fn a_broken_ring_stops_the_device_until_reset() {
    let mut r = Rig::new();
    // An available index far past the queue size: the ring cannot be read.
    for _ in 0..300 {
        r.tx.publish(&r.mem, 0);
    }
    r.notify(TX_QUEUE);
    assert!(r.dev.needs_reset());
    assert!(
        r.interrupt
            .1
            .lock()
            .unwrap()
            .contains(&VirtioInterruptType::Config)
    );
    let before = r.interrupt.0.load(Ordering::SeqCst);
    for _ in 0..100 {
        r.notify(TX_QUEUE);
        r.notify(RX_QUEUE);
    }
    assert_eq!(r.interrupt.0.load(Ordering::SeqCst), before);
    r.dev.reset();
    assert!(!r.dev.needs_reset());
}

#[test]
fn connections_beyond_the_maximum_are_refused() {
    const MAX: usize = 40;
    let mut r = Rig::new();
    r.dev.max_connections = MAX;
    r.give_rx(256);
    // Fill the device with guest connections to one service.
    let service = UnixListener::bind(format!("{}_9000", r.uds.display())).unwrap();
    service.set_nonblocking(true).unwrap();
    let mut accepted = Vec::new();
    for port in 0..MAX as u32 {
        r.send(ghdr(OP_REQUEST, 100_000 + port, 9000), &[]);
        if let Ok((s, _)) = service.accept() {
            accepted.push(s);
        }
        let _ = r.take_rx(true);
    }
    while let Ok((s, _)) = service.accept() {
        accepted.push(s);
    }
    assert_eq!(r.dev.connection_count(), MAX);
    assert_eq!(accepted.len(), MAX);
    r.pump();
    let _ = r.take_rx(true);
    r.send(ghdr(OP_REQUEST, 99, 9000), &[]);
    let p = r.wait_rx();
    assert_eq!((p[0].hdr.op, p[0].hdr.dst_port), (OP_RST, 99));
    assert_eq!(r.dev.counters().conns_refused.total(), 1);
    // A host process is turned away too.
    let mut host = UnixStream::connect(&r.uds).unwrap();
    assert!(host_sees_eof(&mut r, &mut host));
}

/// A host process that reads only after the guest sent more than its socket holds: what
/// waited in the device reaches it once the socket has room again (the device learns that
/// from the event loop, so a host-initiated connection's socket must be watched for
/// writing once the handshake is over).
#[test]
fn a_host_initiated_connection_flushes_when_the_host_catches_up() {
    let mut r = Rig::new();
    r.give_rx(64);
    let mut host = UnixStream::connect(&r.uds).unwrap();
    // The device takes the connection before its line comes, as an event loop usually does.
    r.pump();
    host.write_all(b"CONNECT 77\n").unwrap();
    let req = r.wait_rx();
    let local = req[0].hdr.src_port;
    r.send(ghdr(OP_RESPONSE, 77, local), &[]);
    assert_eq!(read_line(&mut r, &mut host), format!("OK {local}\n"));
    // More than a Unix socket's default buffer (about 208 KiB), less than the 256 KiB the
    // device holds beyond it.
    let to_host = pattern(3, 380_000);
    for chunk in to_host.chunks(20_000) {
        r.send(ghdr(OP_RW, 77, local), chunk);
    }
    assert!(r.dev.buffered_bytes() > 0, "the host socket took it all");
    assert_eq!(host_read(&mut r, &mut host, to_host.len()), to_host);
    assert_eq!(r.dev.buffered_bytes(), 0);
}
