//! What the transports' and devices' tests share: a device that records what its transport
//! told it, an interrupt that counts what it was asked to raise, and a thread standing in
//! for the vmm thread.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::memory::GuestMemoryMmap;
use virtio_queue::Queue;

use super::{
    ActivateError, VIRTIO_F_VERSION_1, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
};
use crate::devices::work_queue::WorkQueue;

/// An interrupt that counts its triggers and records their kinds.
#[derive(Default)]
pub struct CountingInterrupt(pub AtomicUsize, pub Mutex<Vec<VirtioInterruptType>>);

impl VirtioInterrupt for CountingInterrupt {
    fn trigger(&self, kind: VirtioInterruptType) {
        self.0.fetch_add(1, Ordering::SeqCst);
        self.1.lock().unwrap_or_else(|e| e.into_inner()).push(kind);
    }
}

/// A block-typed device that records what the transport told it.
pub struct FakeDevice {
    pub sizes: Vec<u16>,
    pub activated_with: Option<(u64, usize)>,
    /// The interrupt the device was activated with.
    pub interrupt: Option<Arc<dyn VirtioInterrupt>>,
    pub resets: usize,
    pub stopped: Vec<usize>,
    pub config: [u8; 8],
    /// Which thread ran the last reset or queue stop.
    pub io_thread: Option<std::thread::ThreadId>,
    /// The device gave up on its queues until reset.
    pub broken: bool,
    /// The queues it was last activated with.
    pub activated_queues: Vec<virtio_queue::QueueState>,
    /// (next_avail, next_used) the running device reports for its queues in a snapshot.
    pub progress: (u16, u16),
}

impl FakeDevice {
    /// A device with queues of these maximum sizes and 0x1234 in its configuration space.
    pub fn new(sizes: &[u16]) -> Self {
        FakeDevice {
            sizes: sizes.to_vec(),
            activated_with: None,
            interrupt: None,
            resets: 0,
            stopped: Vec::new(),
            config: 0x1234u64.to_le_bytes(),
            io_thread: None,
            broken: false,
            activated_queues: Vec::new(),
            progress: (0, 0),
        }
    }
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn device_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << 5)
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        self.activated_with = Some((features, queues.len()));
        self.activated_queues = queues.iter().map(Queue::state).collect();
        self.interrupt = Some(interrupt);
        Ok(())
    }
    fn saved_queues(&self) -> Vec<virtio_queue::QueueState> {
        self.activated_queues
            .iter()
            .map(|q| virtio_queue::QueueState {
                next_avail: self.progress.0,
                next_used: self.progress.1,
                ..*q
            })
            .collect()
    }
    fn reset(&mut self) {
        self.resets += 1;
        self.activated_with = None;
        self.interrupt = None;
        self.broken = false;
        self.io_thread = Some(std::thread::current().id());
    }
    fn needs_reset(&self) -> bool {
        self.broken
    }
    fn process_queue(&mut self, _index: usize) {}
    fn stop_queue(&mut self, index: usize) {
        self.stopped.push(index);
        self.io_thread = Some(std::thread::current().id());
    }
}

/// Runs `work` on a thread of its own until nothing arrives for 5 s; returns its id.
pub fn run_work_on_a_thread(work: Arc<WorkQueue>) -> std::thread::ThreadId {
    let vmm = std::thread::spawn(move || {
        loop {
            let mut p = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(work.eventfd()),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut p, 1, 5000) } <= 0 {
                return;
            }
            work.run_pending();
        }
    });
    vmm.thread().id()
}
