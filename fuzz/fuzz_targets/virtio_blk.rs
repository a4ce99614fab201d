//! The virtio-blk device path with a hostile guest: the input becomes the guest's descriptor
//! table, available ring and request headers, and the device runs its queue, with or
//! without EVENT_IDX and with the synchronous or the io_uring engine. Any panic is a bug.
//!
//! Checked beyond "no panic": unless the guest pointed a writable buffer at its own rings, the
//! device never returns more chains than the guest made available and every used element
//! names a descriptor of the table; and the backing file never grows (no write lands past
//! the end of the disk).

#![no_main]

#[path = "shared/disk.rs"]
mod disk;

use std::sync::Arc;

use disk::{DISK_SECTORS, disk};
use ember::devices::virtio::VirtioDevice;
use ember::devices::virtio::block::{Block, BlockConfig, VIRTIO_RING_F_EVENT_IDX};
use ember::devices::virtio::{VirtioInterrupt, VirtioInterruptType};
use ember::memory::GuestMemoryMmap;
use ember_virtq_driver::QueueDriver;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 1 << 20;
const QUEUE: u16 = 16;
/// Guest memory from here on is filled from the input: headers, data, status bytes.
const PAYLOAD: u64 = 0x8000;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory");
    let driver = QueueDriver::new(&mem, 0, QUEUE);
    // Descriptor table (16 x 16 bytes) straight from the input; addresses are folded into
    // guest memory half the time so the device gets past the range checks.
    let (ctl, rest) = data.split_at(2);
    let avail = u16::from(ctl[0] % (QUEUE as u8 * 2));
    let fold = ctl[1] & 1 == 1;
    // The other control bits pick what a driver may negotiate and the host may offer:
    // EVENT_IDX interrupt suppression, and the io_uring engine instead of synchronous I/O.
    let event_idx = ctl[1] & 2 == 2;
    let async_io = ctl[1] & 4 == 4;
    let table_len = 16 * usize::from(QUEUE);
    // A hostile guest may point a device-writable buffer at its own rings; the device then
    // writes disk data over descriptors, available entries or used elements, and what the
    // rings say afterwards is the guest's doing, not the device's.
    let rings_end = driver.end();
    let mut buffers_hit_rings = false;
    let (table, rest) = rest.split_at(rest.len().min(table_len));
    for (i, d) in table.chunks(16).enumerate() {
        let mut raw = [0u8; 16];
        raw[..d.len()].copy_from_slice(d);
        let mut addr = u64::from_le_bytes(raw[..8].try_into().expect("8 bytes"));
        if fold {
            addr = PAYLOAD + addr % (MEM as u64 - PAYLOAD);
        }
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        let len = u64::from(u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes")));
        let writable = u16::from_le_bytes([raw[12], raw[13]]) & 2 != 0;
        // The rings start at 0, so a buffer overlaps them when it starts below their end.
        if writable && addr < rings_end && len > 0 {
            buffers_hit_rings = true;
        }
        mem.write_slice(&raw, GuestAddress(16 * i as u64))
            .expect("descriptor table");
    }
    // Available ring entries from the input too.
    let (ring, rest) = rest.split_at(rest.len().min(2 * usize::from(avail)));
    let mut d = driver;
    for i in 0..avail {
        let at = 2 * usize::from(i);
        let head = ring
            .get(at..at + 2)
            .map_or(i, |b| u16::from_le_bytes([b[0], b[1]]));
        d.publish(&mem, head);
    }
    let payload = &rest[..rest.len().min(MEM - PAYLOAD as usize)];
    mem.write_slice(payload, GuestAddress(PAYLOAD))
        .expect("payload");

    let mut block = Block::new(BlockConfig {
        id: "fuzz".into(),
        path: disk().into(),
        read_only: false,
        flush: true,
        async_io,
        rate_limiter: None,
    })
    .expect("open the disk");
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    block
        .activate(
            mem.clone(),
            if event_idx {
                1 << VIRTIO_RING_F_EVENT_IDX
            } else {
                0
            },
            vec![d.device_queue()],
            Arc::new(EventFdInterrupt(irq)),
        )
        .expect("activate");
    block.process_queue();
    // io_uring requests complete later: wait for all of them, as a pause would.
    block.quiesce();

    let used = d.take_used(&mem);
    if !buffers_hit_rings {
        assert!(
            used.len() <= usize::from(avail),
            "{} used for {avail} available",
            used.len()
        );
        for (id, _) in &used {
            assert!(*id < u32::from(QUEUE), "used id {id} is not a descriptor");
        }
    }
    let size = std::fs::metadata(disk()).expect("disk metadata").len();
    assert_eq!(size, DISK_SECTORS * 512, "the disk grew");
});

/// The device's interrupt as a plain eventfd the caller can watch.
struct EventFdInterrupt(EventFd);

impl VirtioInterrupt for EventFdInterrupt {
    fn trigger(&self, _kind: VirtioInterruptType) {
        let _ = self.0.write(1);
    }
}
