//! The virtio-net device path with a hostile guest and a hostile peer: the input becomes the
//! descriptor tables and available rings of both queues, the guest memory the buffers point
//! at (transmit headers included), and the frames the "TAP" (one end of a datagram socket
//! pair) hands the device. The device sends, then receives. Any panic is a bug.
//!
//! Checked beyond "no panic": unless the guest pointed a buffer at a used ring, the device
//! never returns more chains than the guest made available on either queue, every used
//! element names a descriptor of its table, and a receive chain is never reported longer
//! than the frame plus its header; the device never writes more frames to the TAP than the
//! guest queued chains.

#![no_main]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use ember::devices::virtio::net::tap::{Tap, VNET_HDR_LEN};
use ember::devices::virtio::net::tx::MAX_FRAME_LEN;
use ember::devices::virtio::net::{Net, NetConfig};
use ember::devices::virtio::{VirtioDevice, VirtioInterrupt, VirtioInterruptType};
use ember::memory::GuestMemoryMmap;
use ember_virtq_driver::QueueDriver;
use event_manager::EventSet;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const MEM: usize = 1 << 20;
const QUEUE: u16 = 16;
const RX_RINGS: u64 = 0;
const TX_RINGS: u64 = 0x4000;
/// Guest memory from here on is filled from the input.
const PAYLOAD: u64 = 0x8000;

struct NoInterrupt;

impl VirtioInterrupt for NoInterrupt {
    fn trigger(&self, _kind: VirtioInterruptType) {}
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
    assert_eq!(rc, 0, "socketpair");
    // SAFETY: both fds are fresh and ours.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Writes a descriptor table from `input` (16 bytes per entry), addresses folded into guest
/// memory past the rings when `fold`; returns whether any buffer overlaps a guarded range.
fn write_table(
    mem: &GuestMemoryMmap,
    at: u64,
    input: &[u8],
    fold: bool,
    guards: &[(u64, u64)],
) -> bool {
    let mut hits = false;
    for (i, d) in input.chunks(16).enumerate() {
        let mut raw = [0u8; 16];
        raw[..d.len()].copy_from_slice(d);
        let mut addr = u64::from_le_bytes(raw[..8].try_into().expect("8 bytes"));
        if fold {
            addr = PAYLOAD + addr % (MEM as u64 - PAYLOAD);
        }
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        let len = u64::from(u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes")));
        for &(g, glen) in guards {
            if addr < g + glen && g < addr.saturating_add(len) {
                hits = true;
            }
        }
        mem.write_slice(&raw, GuestAddress(at + 16 * i as u64))
            .expect("descriptor table");
    }
    hits
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory");
    let rx = QueueDriver::new(&mem, RX_RINGS, QUEUE);
    let tx = QueueDriver::new(&mem, TX_RINGS, QUEUE);
    let (ctl, rest) = data.split_at(4);
    let rx_avail = u16::from(ctl[0] % (QUEUE as u8 * 2));
    let tx_avail = u16::from(ctl[1] % (QUEUE as u8 * 2));
    let fold = ctl[2] & 1 == 1;
    // The rings of both queues: a guest buffer over them lets the device's own writes
    // change what the guest made available.
    let guards = [(0, PAYLOAD)];
    let table_len = 16 * usize::from(QUEUE);
    let (rx_table, rest) = rest.split_at(rest.len().min(table_len));
    let (tx_table, rest) = rest.split_at(rest.len().min(table_len));
    let mut hit_rings = write_table(&mem, RX_RINGS, rx_table, fold, &guards);
    hit_rings |= write_table(&mem, TX_RINGS, tx_table, fold, &guards);
    let (ring, rest) = rest.split_at(rest.len().min(2 * usize::from(rx_avail + tx_avail)));
    let (mut rx, mut tx) = (rx, tx);
    for i in 0..rx_avail + tx_avail {
        let at = 2 * usize::from(i);
        let head = ring
            .get(at..at + 2)
            .map_or(i % QUEUE, |b| u16::from_le_bytes([b[0], b[1]]));
        if i < rx_avail {
            rx.publish(&mem, head);
        } else {
            tx.publish(&mem, head);
        }
    }
    // The rest: frames from the peer (a length byte pair, then the bytes), then guest memory.
    let (frames, payload) = rest.split_at(rest.len() / 2);
    let payload = &payload[..payload.len().min(MEM - PAYLOAD as usize)];
    mem.write_slice(payload, GuestAddress(PAYLOAD))
        .expect("payload");

    let (device_end, host) = socket_pair();
    let mut net = Net::with_tap(
        NetConfig {
            id: "fuzz".into(),
            tap_name: "fuzz".into(),
            mac: [6, 0, 0, 0, 0, 1],
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
            mmds: None,
        },
        Tap::from_fd(device_end, "fuzz"),
    )
    .expect("device");
    let mut sent_frames = 0usize;
    let mut max_frame = 0usize;
    let mut f = frames;
    while f.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([f[0], f[1]])) % 2048;
        let body = &f[2..];
        let frame = &body[..len.min(body.len())];
        // SAFETY: writes from a live buffer.
        let n = unsafe { libc::write(host.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n >= 0 {
            sent_frames += 1;
            max_frame = max_frame.max(frame.len());
        }
        f = &body[frame.len()..];
    }
    let _ = sent_frames;
    // Features the driver accepts: a subset of the offer chosen by the input, VERSION_1
    // always (the transport refuses a driver without it).
    let mask = u64::from(ctl[3]).wrapping_mul(0x0101_0101_0101_0101);
    let features = net.device_features() & (mask | 1 << 32);
    if net
        .activate(
            mem.clone(),
            features,
            vec![rx.device_queue(), tx.device_queue()],
            Arc::new(NoInterrupt),
        )
        .is_err()
    {
        return;
    }
    net.process_queue(1);
    net.process_queue(0);
    let tap_fd = net
        .event_sources()
        .last()
        .map(|(fd, _)| *fd)
        .expect("the TAP is watched");
    net.process_event(tap_fd, EventSet::IN);

    let rx_used = rx.take_used(&mem);
    let tx_used = tx.take_used(&mem);
    if !hit_rings {
        assert!(rx_used.len() <= usize::from(rx_avail), "{rx_used:?}");
        assert!(tx_used.len() <= usize::from(tx_avail), "{tx_used:?}");
        for (id, len) in rx_used.iter() {
            assert!(*id < u32::from(QUEUE), "rx used id {id}");
            assert!(
                *len as usize <= max_frame.max(VNET_HDR_LEN),
                "rx used length {len} for frames of at most {max_frame}"
            );
        }
        for (id, len) in &tx_used {
            assert!(*id < u32::from(QUEUE), "tx used id {id}");
            assert_eq!(*len, 0, "transmit chains are returned with nothing written");
        }
    }
    // Whatever the device sent the peer: no more frames than transmit chains, none larger
    // than a frame can be.
    let mut buf = vec![0u8; VNET_HDR_LEN + MAX_FRAME_LEN + 1];
    let mut got = 0usize;
    loop {
        // SAFETY: reads into a live buffer.
        let n = unsafe { libc::read(host.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        got += 1;
        assert!(n as usize <= VNET_HDR_LEN + MAX_FRAME_LEN);
    }
    assert!(
        got <= usize::from(tx_avail),
        "{got} frames for {tx_avail} chains"
    );
});
