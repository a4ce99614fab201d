//! The entropy device against guest memory driven as a guest driver would
//! (tests/virtq-driver).

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ember_virtq_driver::{Desc, QueueDriver};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::config::rate_limiter::TokenBucketConfig;

use crate::devices::virtio::test_utils::CountingInterrupt;

const MEM_SIZE: usize = 4 << 20;
const RINGS: u64 = 0;
const BUFFERS: u64 = 0x10_0000;

struct Rig {
    mem: GuestMemoryMmap,
    queue: QueueDriver,
    rng: Rng,
    interrupt: Arc<CountingInterrupt>,
}

impl Rig {
    fn new(limiter: Option<RateLimiterConfig>) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let queue = QueueDriver::new(&mem, RINGS, 16);
        let mut rng = Rng::new(limiter.as_ref()).unwrap();
        let interrupt = Arc::new(CountingInterrupt(AtomicUsize::new(0), Mutex::new(vec![])));
        rng.activate(
            mem.clone(),
            1 << VIRTIO_F_VERSION_1,
            vec![queue.device_queue()],
            interrupt.clone(),
        )
        .unwrap();
        Rig {
            mem,
            queue,
            rng,
            interrupt,
        }
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }
}

fn writable(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        write: true,
    }
}

#[test]
fn requests_are_filled_with_random_bytes_across_their_buffers() {
    let mut r = Rig::new(None);
    r.queue.add_chain(
        &r.mem,
        &[writable(BUFFERS, 16), writable(BUFFERS + 0x1000, 4080)],
    );
    r.queue.add_chain(&r.mem, &[writable(BUFFERS + 0x2000, 64)]);
    r.rng.process_queue(0);
    assert_eq!(r.queue.take_used(&r.mem), vec![(0, 4096), (2, 64)]);
    let first = [r.read(BUFFERS, 16), r.read(BUFFERS + 0x1000, 4080)].concat();
    let second = r.read(BUFFERS + 0x2000, 64);
    // Zero-filled memory left as it was would be all zeros; random bytes take every value.
    let distinct: std::collections::BTreeSet<u8> = first.iter().copied().collect();
    assert!(
        distinct.len() > 200,
        "{} distinct byte values",
        distinct.len()
    );
    assert_ne!(&first[..64], &second[..], "two requests got the same bytes");
    assert!(r.interrupt.0.load(Ordering::SeqCst) >= 1);
    assert_eq!(r.rng.counters().entropy_bytes.total(), 4096 + 64);
    assert_eq!(r.rng.counters().entropy_event_count.total(), 2);
}

#[test]
fn a_chain_with_a_readable_buffer_is_returned_empty() {
    let mut r = Rig::new(None);
    r.queue.add_chain(
        &r.mem,
        &[
            Desc {
                addr: BUFFERS,
                len: 16,
                write: false,
            },
            writable(BUFFERS + 0x1000, 16),
        ],
    );
    r.queue.add_chain(&r.mem, &[writable(BUFFERS + 0x2000, 8)]);
    r.rng.process_queue(0);
    assert_eq!(r.queue.take_used(&r.mem), vec![(0, 0), (2, 8)]);
    assert_eq!(r.rng.counters().invalid_requests.total(), 1);
    assert_eq!(r.read(BUFFERS + 0x1000, 16), vec![0; 16]);
}

#[test]
fn a_huge_request_gets_at_most_the_cap() {
    let mut r = Rig::new(None);
    r.queue
        .add_chain(&r.mem, &[writable(BUFFERS, (MAX_REQUEST_BYTES * 2) as u32)]);
    r.rng.process_queue(0);
    assert_eq!(
        r.queue.take_used(&r.mem),
        vec![(0, MAX_REQUEST_BYTES as u32)]
    );
}

/// With a bandwidth bucket of 100 bytes per 100 ms, a second 100-byte request waits for
/// the refill and is answered when the limiter's timer fires.
#[test]
fn the_rate_limiter_holds_requests_until_tokens_return() {
    let mut r = Rig::new(Some(RateLimiterConfig {
        bandwidth: Some(TokenBucketConfig {
            size: 100,
            one_time_burst: None,
            refill_time: 100,
        }),
        ops: None,
    }));
    r.queue.add_chain(&r.mem, &[writable(BUFFERS, 100)]);
    r.queue
        .add_chain(&r.mem, &[writable(BUFFERS + 0x1000, 100)]);
    r.rng.process_queue(0);
    assert_eq!(r.queue.take_used(&r.mem), vec![(0, 100)]);
    assert_eq!(r.rng.counters().rate_limiter_throttled.total(), 1);
    // Nothing more until the timer fires.
    r.rng.process_queue(0);
    assert!(r.queue.take_used(&r.mem).is_empty());
    std::thread::sleep(Duration::from_millis(150));
    let fd = r.rng.limiter.as_raw_fd();
    r.rng.process_event(fd, EventSet::IN);
    assert_eq!(r.queue.take_used(&r.mem), vec![(1, 100)]);
}

#[test]
fn a_broken_ring_stops_the_device_until_reset() {
    let mut r = Rig::new(None);
    // An available index far past the queue size: the ring cannot be read.
    for _ in 0..23 {
        r.queue.publish(&r.mem, 0);
    }
    r.rng.process_queue(0);
    assert!(r.rng.needs_reset());
    assert!(
        r.interrupt
            .1
            .lock()
            .unwrap()
            .contains(&VirtioInterruptType::Config)
    );
    r.rng.reset();
    assert!(!r.rng.needs_reset());
}
