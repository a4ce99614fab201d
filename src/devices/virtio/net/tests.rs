//! The device against guest memory driven like a guest driver would (tests/virtq-driver)
//! and a datagram socket pair standing in for the TAP: each frame one datagram, as a TAP
//! reads and writes them.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use ember_virtq_driver::{Desc, QueueDriver};
use vm_memory::{Bytes, GuestAddress};

use super::*;

use crate::devices::virtio::test_utils::CountingInterrupt;

/// Guest memory: RX rings at 0, TX rings at 64 KiB, buffers from 1 MiB.
const MEM_SIZE: usize = 4 << 20;
const RX_RINGS: u64 = 0;
const TX_RINGS: u64 = 0x1_0000;
const BUFFERS: u64 = 0x10_0000;

struct Rig {
    mem: GuestMemoryMmap,
    rx: QueueDriver,
    tx: QueueDriver,
    net: Net,
    /// The host's end of the "TAP".
    host: OwnedFd,
    interrupt: Arc<CountingInterrupt>,
}

fn socket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into the array.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0);
    // SAFETY: both fds are fresh and ours.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn config() -> NetConfig {
    NetConfig {
        id: "eth0".into(),
        tap_name: "test-tap".into(),
        mac: [0x06, 0, 0xac, 0x10, 0, 2],
        mtu: None,
        rx_rate_limiter: None,
        tx_rate_limiter: None,
        mmds: None,
    }
}

impl Rig {
    fn new(features: u64) -> Self {
        Self::with_config(config(), features)
    }

    fn with_config(config: NetConfig, features: u64) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let rx = QueueDriver::new(&mem, RX_RINGS, 16);
        let tx = QueueDriver::new(&mem, TX_RINGS, 16);
        let (device_end, host) = socket_pair();
        let mut net = Net::with_tap(config, Tap::from_fd(device_end, "test-tap")).unwrap();
        let interrupt = Arc::new(CountingInterrupt(AtomicUsize::new(0), Mutex::new(vec![])));
        net.activate(
            mem.clone(),
            features | (1 << VIRTIO_F_VERSION_1),
            vec![rx.device_queue(), tx.device_queue()],
            interrupt.clone(),
        )
        .unwrap();
        Rig {
            mem,
            rx,
            tx,
            net,
            host,
            interrupt,
        }
    }

    /// A frame as the host sends it to the guest: header, then `payload`.
    fn host_send(&self, header: NetHeaderBytes, payload: &[u8]) {
        let mut frame = header.to_vec();
        frame.extend_from_slice(payload);
        // SAFETY: writes from a live buffer.
        let n = unsafe { libc::write(self.host.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        assert_eq!(n as usize, frame.len());
    }

    /// The next frame the guest sent, if any.
    fn host_receive(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 70_000];
        // SAFETY: reads into a live buffer.
        let n = unsafe { libc::read(self.host.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        (n >= 0).then(|| {
            buf.truncate(n as usize);
            buf
        })
    }

    fn tap_ready(&mut self) {
        let fd = self.net.tap.as_ref().unwrap().as_raw_fd();
        self.net.process_event(fd, EventSet::IN);
    }
}

type NetHeaderBytes = [u8; VNET_HDR_LEN];

fn write_buf(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) {
    mem.write_slice(bytes, GuestAddress(addr)).unwrap();
}

fn readable(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        write: false,
    }
}

fn writable(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        write: true,
    }
}

const MRG: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;

#[test]
fn config_space_announces_mac_link_and_mtu() {
    let r = Rig::new(0);
    let mut b = [0u8; 12];
    r.net.read_config(0, &mut b);
    assert_eq!(&b[..6], &[0x06, 0, 0xac, 0x10, 0, 2]);
    assert_eq!(
        u16::from_le_bytes([b[6], b[7]]),
        VIRTIO_NET_S_LINK_UP as u16
    );
    assert_eq!(r.net.device_features() & (1 << VIRTIO_NET_F_MTU), 0);
    let with_mtu = Rig::with_config(
        NetConfig {
            mtu: Some(9000),
            ..config()
        },
        0,
    );
    with_mtu.net.read_config(10, &mut b[..2]);
    assert_eq!(u16::from_le_bytes([b[0], b[1]]), 9000);
    assert_ne!(with_mtu.net.device_features() & (1 << VIRTIO_NET_F_MTU), 0);
}

#[test]
fn generated_macs_are_stable_local_and_unicast() {
    let a = generated_mac("vm-1", "eth0");
    assert_eq!(a, generated_mac("vm-1", "eth0"));
    assert_ne!(a, generated_mac("vm-1", "eth1"));
    assert_ne!(a, generated_mac("vm-2", "eth0"));
    assert_eq!(a[0] & 0x03, 0x02, "locally administered, unicast: {a:02x?}");
}

#[test]
fn each_transmit_chain_becomes_one_frame_on_the_tap() {
    let mut r = Rig::new(0);
    // Header and frame split across three buffers, the header itself across two.
    let payload: Vec<u8> = (0..1500u32).map(|i| (i * 7) as u8).collect();
    let mut bytes = vec![0u8; VNET_HDR_LEN];
    bytes.extend_from_slice(&payload);
    write_buf(&r.mem, BUFFERS, &bytes[..5]);
    write_buf(&r.mem, BUFFERS + 0x1000, &bytes[5..700]);
    write_buf(&r.mem, BUFFERS + 0x2000, &bytes[700..]);
    r.tx.add_chain(
        &r.mem,
        &[
            readable(BUFFERS, 5),
            readable(BUFFERS + 0x1000, 695),
            readable(BUFFERS + 0x2000, (bytes.len() - 700) as u32),
        ],
    );
    r.net.process_queue(TX_QUEUE);
    let sent = r.host_receive().expect("a frame on the TAP");
    assert_eq!(sent.len(), VNET_HDR_LEN + payload.len());
    assert_eq!(&sent[VNET_HDR_LEN..], &payload[..]);
    assert_eq!(r.tx.take_used(&r.mem), vec![(0, 0)]);
    assert!(r.interrupt.0.load(Ordering::SeqCst) >= 1);
    assert_eq!(r.net.counters().tx_packets_count.total(), 1);
    assert_eq!(r.net.counters().tx_bytes_count.total(), 1500);
    assert!(r.host_receive().is_none(), "exactly one frame");
}

#[test]
fn hostile_transmit_chains_are_dropped_counted_and_returned() {
    let mut r = Rig::new(0);
    let gso_header = {
        let mut h = [0u8; VNET_HDR_LEN];
        h[0] = 1; // NEEDS_CSUM, not negotiated
        h[1] = 1; // TCPv4 segmentation, not negotiated
        h
    };
    write_buf(&r.mem, BUFFERS, &gso_header);
    let shapes: Vec<Vec<Desc>> = vec![
        // A device-writable buffer in a transmit chain.
        vec![writable(BUFFERS, 100)],
        // Outside guest memory.
        vec![readable(MEM_SIZE as u64 - 10, 100)],
        vec![readable(u64::MAX - 5, 100)],
        // Less than a header.
        vec![readable(BUFFERS, 11)],
        // Only empty buffers.
        vec![readable(BUFFERS, 0), readable(BUFFERS, 0)],
        // A header asking for offloads the driver did not accept.
        vec![readable(BUFFERS, 200)],
        // Larger than any frame.
        vec![
            readable(BUFFERS, 40_000),
            readable(BUFFERS + 0x1_0000, 40_000),
        ],
    ];
    for shape in &shapes {
        r.tx.add_chain(&r.mem, shape);
    }
    r.net.process_queue(TX_QUEUE);
    assert!(r.host_receive().is_none(), "nothing reached the TAP");
    let used = r.tx.take_used(&r.mem);
    assert_eq!(
        used.len(),
        shapes.len(),
        "every chain is returned: {used:?}"
    );
    assert!(used.iter().all(|&(_, len)| len == 0));
    assert_eq!(
        r.net.counters().tx_malformed_frames.total(),
        shapes.len() as u64
    );
    // The device goes on: a good frame after them is sent.
    write_buf(&r.mem, BUFFERS, &[0u8; 60]);
    r.tx.add_chain(&r.mem, &[readable(BUFFERS, 60)]);
    r.net.process_queue(TX_QUEUE);
    assert_eq!(r.host_receive().map(|f| f.len()), Some(60));
}

#[test]
fn a_frame_spans_mergeable_buffers_with_its_count_in_the_header() {
    let mut r = Rig::new(MRG);
    for i in 0..4u64 {
        r.rx.add_chain(&r.mem, &[writable(BUFFERS + i * 0x1000, 1536)]);
    }
    let payload: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    r.host_send([0; VNET_HDR_LEN], &payload);
    r.tap_ready();
    let used = r.rx.take_used(&r.mem);
    assert_eq!(used, vec![(0, 1536), (1, 3012 - 1536)]);
    let mut got = vec![0u8; 3012];
    r.mem
        .read_slice(&mut got[..1536], GuestAddress(BUFFERS))
        .unwrap();
    r.mem
        .read_slice(&mut got[1536..], GuestAddress(BUFFERS + 0x1000))
        .unwrap();
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2, "num_buffers");
    assert_eq!(&got[VNET_HDR_LEN..], &payload[..]);
    assert_eq!(r.net.counters().rx_packets_count.total(), 1);
    assert_eq!(r.net.counters().rx_bytes_count.total(), 3000);
    assert_eq!(
        *r.interrupt.1.lock().unwrap(),
        vec![VirtioInterruptType::Queue(0)]
    );
}

/// The guest's bytes of a used receive chain made of one buffer at `addr`.
fn read_guest(mem: &GuestMemoryMmap, addr: u64, len: u32) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

#[test]
fn a_run_of_large_frames_is_read_in_place_across_mergeable_buffers() {
    // The first frame is read into one reserved buffer and continues through the bounce
    // buffer; the second finds enough buffers reserved to be read in place whole.
    let mut r = Rig::new(MRG);
    for i in 0..6u64 {
        r.rx.add_chain(&r.mem, &[writable(BUFFERS + i * 0x1000, 1536)]);
    }
    let first: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let second: Vec<u8> = (0..2900u32).map(|i| (i % 241) as u8 ^ 0x5a).collect();
    r.host_send([0xff; VNET_HDR_LEN], &first);
    r.host_send([0xff; VNET_HDR_LEN], &second);
    r.tap_ready();
    let used = r.rx.take_used(&r.mem);
    assert_eq!(
        used,
        vec![(0, 1536), (1, 3012 - 1536), (2, 1536), (3, 2912 - 1536)]
    );
    for (payload, chain) in [(&first, 0u64), (&second, 2)] {
        let mut got = read_guest(&r.mem, BUFFERS + chain * 0x1000, 1536);
        got.extend(read_guest(
            &r.mem,
            BUFFERS + (chain + 1) * 0x1000,
            (payload.len() + VNET_HDR_LEN - 1536) as u32,
        ));
        assert_eq!(&got[..10], &[0xff; 10], "the host's header as it came");
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2, "num_buffers");
        assert_eq!(&got[VNET_HDR_LEN..], &payload[..]);
    }
    assert_eq!(r.net.counters().rx_packets_count.total(), 2);
    assert_eq!(r.net.counters().rx_bytes_count.total(), 5900);
}

#[test]
fn a_frame_partly_read_in_place_waits_whole_for_more_buffers() {
    let mut r = Rig::new(MRG);
    r.rx.add_chain(&r.mem, &[writable(BUFFERS, 100)]);
    let payload: Vec<u8> = (0..250u32).map(|i| i as u8).collect();
    r.host_send([0; VNET_HDR_LEN], &payload);
    r.tap_ready();
    assert!(r.rx.take_used(&r.mem).is_empty(), "never half delivered");
    assert_eq!(r.net.counters().no_rx_avail_buffer.total(), 1);
    r.rx.add_chain(&r.mem, &[writable(BUFFERS + 0x1000, 100)]);
    r.rx.add_chain(&r.mem, &[writable(BUFFERS + 0x2000, 100)]);
    r.net.process_queue(RX_QUEUE);
    let used = r.rx.take_used(&r.mem);
    assert_eq!(used, vec![(0, 100), (1, 100), (2, 62)]);
    let mut got = read_guest(&r.mem, BUFFERS, 100);
    got.extend(read_guest(&r.mem, BUFFERS + 0x1000, 100));
    got.extend(read_guest(&r.mem, BUFFERS + 0x2000, 62));
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
    assert_eq!(&got[VNET_HDR_LEN..], &payload[..]);
    assert_eq!(r.net.counters().rx_fails.total(), 0);
}

#[test]
fn num_buffers_is_set_in_place_when_the_header_spans_buffers() {
    let mut r = Rig::new(MRG);
    write_buf(&r.mem, BUFFERS, &[0xee; 0x300]);
    // One chain: 11 bytes, 1 byte, then the rest: num_buffers straddles the first two.
    r.rx.add_chain(
        &r.mem,
        &[
            writable(BUFFERS, 11),
            writable(BUFFERS + 0x100, 1),
            writable(BUFFERS + 0x200, 64),
        ],
    );
    let mut header = [0u8; VNET_HDR_LEN];
    header[10..].copy_from_slice(&[0xab, 0xcd]);
    r.host_send(header, b"straddled");
    r.tap_ready();
    assert_eq!(r.rx.take_used(&r.mem), vec![(0, 12 + 9)]);
    let low = read_guest(&r.mem, BUFFERS + 10, 1)[0];
    let high = read_guest(&r.mem, BUFFERS + 0x100, 2);
    assert_eq!([low, high[0]], 1u16.to_le_bytes(), "num_buffers");
    assert_eq!(high[1], 0xee, "nothing written past the 1-byte buffer");
    assert_eq!(read_guest(&r.mem, BUFFERS + 0x200, 9), b"straddled");
}

#[test]
fn frames_wait_in_the_tap_until_the_guest_makes_room() {
    let mut r = Rig::new(MRG);
    r.host_send([0; VNET_HDR_LEN], b"first frame");
    r.host_send([0; VNET_HDR_LEN], b"second frame");
    r.tap_ready();
    assert!(r.rx.take_used(&r.mem).is_empty());
    assert_eq!(r.net.counters().no_rx_avail_buffer.total(), 1);
    assert_eq!(r.net.counters().rx_fails.total(), 0, "nothing dropped");
    // Readiness again without buffers: still nothing taken, no loop.
    r.tap_ready();
    assert_eq!(r.net.counters().no_rx_avail_buffer.total(), 2);
    // Buffers arrive with a notification: both frames, in order.
    r.rx.add_chain(&r.mem, &[writable(BUFFERS, 100)]);
    r.rx.add_chain(&r.mem, &[writable(BUFFERS + 0x1000, 100)]);
    r.net.process_queue(RX_QUEUE);
    let used = r.rx.take_used(&r.mem);
    assert_eq!(used, vec![(0, 12 + 11), (1, 12 + 12)]);
    let mut second = [0u8; 12];
    r.mem
        .read_slice(&mut second, GuestAddress(BUFFERS + 0x1000 + 12))
        .unwrap();
    assert_eq!(&second, b"second frame");
}

#[test]
fn without_mergeable_buffers_a_frame_too_large_for_the_chain_is_dropped() {
    let mut r = Rig::new(0);
    r.rx.add_chain(&r.mem, &[writable(BUFFERS, 100)]);
    r.host_send([0; VNET_HDR_LEN], &[7u8; 200]);
    r.host_send([0; VNET_HDR_LEN], &[8u8; 50]);
    r.tap_ready();
    // The large one is dropped and counted; the chain takes the next one.
    assert_eq!(r.rx.take_used(&r.mem), vec![(0, 62)]);
    assert_eq!(r.net.counters().rx_fails.total(), 1);
    let mut hdr = [0u8; 12];
    r.mem.read_slice(&mut hdr, GuestAddress(BUFFERS)).unwrap();
    assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1, "num_buffers");
}

#[test]
fn hostile_receive_chains_are_returned_empty_and_counted() {
    let mut r = Rig::new(MRG);
    // A readable buffer, one outside memory, one too small for a header, then a good one.
    r.rx.add_chain(&r.mem, &[readable(BUFFERS, 100)]);
    r.rx.add_chain(&r.mem, &[writable(MEM_SIZE as u64 - 8, 100)]);
    r.rx.add_chain(&r.mem, &[writable(BUFFERS, 4)]);
    r.rx.add_chain(&r.mem, &[writable(BUFFERS + 0x1000, 100)]);
    r.host_send([0; VNET_HDR_LEN], b"hello");
    r.tap_ready();
    let used = r.rx.take_used(&r.mem);
    assert_eq!(used, vec![(0, 0), (1, 0), (2, 0), (3, 17)]);
    assert_eq!(r.net.counters().rx_malformed_chains.total(), 3);
    assert_eq!(r.net.counters().rx_packets_count.total(), 1);
}

#[test]
fn a_vanished_peer_fails_frames_without_stopping_the_device() {
    let mut r = Rig::new(0);
    let host = std::mem::replace(&mut r.host, socket_pair().0);
    drop(host);
    write_buf(&r.mem, BUFFERS, &[0u8; 60]);
    r.tx.add_chain(&r.mem, &[readable(BUFFERS, 60)]);
    r.net.process_queue(TX_QUEUE);
    assert_eq!(r.tx.take_used(&r.mem), vec![(0, 0)]);
    assert_eq!(r.net.counters().tx_fails.total(), 1);
    assert_eq!(r.net.counters().tap_write_fails.total(), 1);
}

#[test]
fn reset_forgets_the_queues_and_reactivation_works() {
    let mut r = Rig::new(MRG);
    r.rx.add_chain(&r.mem, &[writable(BUFFERS, 100)]);
    r.net.reset();
    r.host_send([0; VNET_HDR_LEN], b"after reset");
    r.tap_ready();
    assert!(r.rx.take_used(&r.mem).is_empty(), "no queues after reset");
    let rx = QueueDriver::new(&r.mem, RX_RINGS, 16);
    let tx = QueueDriver::new(&r.mem, TX_RINGS, 16);
    r.rx = rx;
    r.tx = tx;
    r.net
        .activate(
            r.mem.clone(),
            MRG | (1 << VIRTIO_F_VERSION_1),
            vec![r.rx.device_queue(), r.tx.device_queue()],
            r.interrupt.clone(),
        )
        .unwrap();
    r.rx.add_chain(&r.mem, &[writable(BUFFERS, 100)]);
    r.net.process_queue(RX_QUEUE);
    assert_eq!(r.rx.take_used(&r.mem), vec![(0, 12 + 11)]);
}

#[test]
fn offloads_follow_what_the_guest_accepted() {
    assert_eq!(Net::tap_offloads(0), 0);
    assert_eq!(
        Net::tap_offloads(1 << VIRTIO_NET_F_GUEST_TSO4),
        0,
        "TSO needs CSUM"
    );
    let all = (1 << VIRTIO_NET_F_GUEST_CSUM)
        | (1 << VIRTIO_NET_F_GUEST_TSO4)
        | (1 << VIRTIO_NET_F_GUEST_TSO6)
        | (1 << VIRTIO_NET_F_GUEST_UFO);
    assert_eq!(
        Net::tap_offloads(all),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO
    );
}

#[test]
fn a_broken_ring_stops_the_device_until_reset() {
    let mut r = Rig::new(MRG);
    // An available index far past the queue size: the ring cannot be read.
    for _ in 0..23 {
        r.tx.publish(&r.mem, 0);
    }
    r.net.process_queue(TX_QUEUE);
    assert!(r.net.needs_reset());
    assert!(
        r.interrupt
            .1
            .lock()
            .unwrap()
            .contains(&VirtioInterruptType::Config)
    );
    // Further notifications do nothing (and do not spin).
    let before = r.interrupt.0.load(Ordering::SeqCst);
    for _ in 0..100 {
        r.net.process_queue(TX_QUEUE);
        r.net.process_queue(RX_QUEUE);
    }
    assert_eq!(r.interrupt.0.load(Ordering::SeqCst), before);
    r.net.reset();
    assert!(!r.net.needs_reset());
}

/// An ARP request from the guest's MAC (06:00:ac:10:00:02, 172.16.0.2) for `target`.
fn arp_request(target: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x06, 0, 0xac, 0x10, 0, 2]);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&[0x06, 0, 0xac, 0x10, 0, 2, 172, 16, 0, 2]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f
}

/// With the metadata service on the interface, the guest's frames for its address are
/// answered by the device (an ARP reply from the service's MAC lands in the receive
/// queue) and never reach the TAP; other frames still do.
#[test]
fn frames_for_the_metadata_service_are_answered_by_the_device() {
    let shared = Arc::new(Mutex::new(
        crate::mmds::Mmds::new(crate::mmds::MmdsConfig {
            network_interfaces: vec!["eth0".into()],
            ..Default::default()
        })
        .unwrap(),
    ));
    let mut r = Rig::with_config(
        NetConfig {
            mmds: Some(shared),
            ..config()
        },
        0,
    );
    r.rx.add_chain(&r.mem, &[writable(BUFFERS + 0x8000, 1536)]);
    let mut chain = vec![0u8; VNET_HDR_LEN];
    chain.extend_from_slice(&arp_request([169, 254, 169, 254]));
    write_buf(&r.mem, BUFFERS, &chain);
    r.tx.add_chain(&r.mem, &[readable(BUFFERS, chain.len() as u32)]);
    r.net.process_queue(TX_QUEUE);
    assert!(r.host_receive().is_none(), "the request reached the TAP");
    assert_eq!(r.tx.take_used(&r.mem), vec![(0, 0)]);
    let used = r.rx.take_used(&r.mem);
    assert_eq!(used.len(), 1, "one reply: {used:?}");
    let mut reply = vec![0u8; used[0].1 as usize];
    r.mem
        .read_slice(&mut reply, GuestAddress(BUFFERS + 0x8000))
        .unwrap();
    let arp = &reply[VNET_HDR_LEN..];
    assert_eq!(&arp[..6], &[0x06, 0, 0xac, 0x10, 0, 2], "to the guest");
    assert_eq!(
        &arp[6..12],
        &crate::mmds::stack::MMDS_MAC,
        "from the service"
    );
    assert_eq!(&arp[12..14], &[0x08, 0x06]);
    assert_eq!(&arp[20..22], &[0, 2], "an ARP reply");
    assert_eq!(
        &arp[28..32],
        &[169, 254, 169, 254],
        "for the service's address"
    );

    // An ARP request for another address goes to the TAP as before.
    let other = arp_request([172, 16, 0, 1]);
    let mut chain = vec![0u8; VNET_HDR_LEN];
    chain.extend_from_slice(&other);
    write_buf(&r.mem, BUFFERS, &chain);
    r.tx.add_chain(&r.mem, &[readable(BUFFERS, chain.len() as u32)]);
    r.net.process_queue(TX_QUEUE);
    assert_eq!(
        r.host_receive().map(|f| f[VNET_HDR_LEN..].to_vec()),
        Some(other)
    );
}
