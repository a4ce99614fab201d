//! The virtio-mmio transport, version 2 ("modern"): the register window through which a
//! driver discovers a device, negotiates features, sets up queues and reads configuration.
//! Queue notifications normally bypass it (one ioeventfd per queue on QueueNotify); a write
//! that does reach it is forwarded to the queue's eventfd.
//!
//! Register accesses run on vCPU threads; what they do beyond decoding registers is shared
//! with virtio-pci ([`TransportState`]).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::memory::GuestMemoryMmap;
use virtio_bindings::virtio_mmio as reg;
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use super::transport::{StatusWrite, TransportSnapshot, TransportState, TransportStateError};
use super::{VirtioDevice, VirtioInterrupt, VirtioInterruptType};
use crate::devices::bus::BusDevice;
use crate::devices::legacy::Line;
use crate::devices::work_queue::WorkQueue;
use crate::metrics::METRICS;

/// Size of one device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of QueueNotify, where the ioeventfds sit (one per queue, matching its index).
pub const NOTIFY_OFFSET: u64 = reg::VIRTIO_MMIO_QUEUE_NOTIFY as u64;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// "EMBR": the subsystem vendor id a driver may log.
const VENDOR_ID: u32 = 0x524d_4245;
const CONFIG_START: u64 = reg::VIRTIO_MMIO_CONFIG as u64;

/// The transport's interrupt: InterruptStatus bits the driver reads and acknowledges, and
/// the interrupt line that tells it to look. The line is raised with every new bit (an
/// edge each time) and lowered once the driver has acknowledged every bit, so a guest
/// that makes it level-triggered sees it held while anything is unacknowledged.
pub struct MmioInterrupt {
    status: AtomicU32,
    line: Box<dyn Line>,
}

impl MmioInterrupt {
    pub fn new(line: Box<dyn Line>) -> Self {
        MmioInterrupt {
            status: AtomicU32::new(0),
            line,
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    fn ack(&self, bits: u32) {
        if self.status.fetch_and(!bits, Ordering::SeqCst) & !bits == 0 {
            self.line.lower();
            // A bit set between the two steps raised the line before it was lowered here:
            // raise it again so it is not lost.
            if self.status.load(Ordering::SeqCst) != 0 && self.line.raise().is_err() {
                METRICS.vmm.interrupt_errors.inc();
            }
        }
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.line.lower();
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger(&self, kind: VirtioInterruptType) {
        let bit = match kind {
            VirtioInterruptType::Config => reg::VIRTIO_MMIO_INT_CONFIG,
            VirtioInterruptType::Queue(_) => reg::VIRTIO_MMIO_INT_VRING,
        };
        self.status.fetch_or(bit, Ordering::SeqCst);
        if self.line.raise().is_err() {
            // Only a full eventfd counter fails, and that interrupt is pending anyway.
            METRICS.vmm.interrupt_errors.inc();
        }
    }
}

/// A virtio-mmio device as a snapshot keeps it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MmioSnapshot {
    pub transport: TransportSnapshot,
    pub interrupt_status: u32,
}

pub struct MmioTransport {
    state: TransportState,
    interrupt: Arc<MmioInterrupt>,
    queue_evts: Vec<EventFd>,
}

impl MmioTransport {
    /// `queue_evts` are the eventfds the device's event handler waits on, one per queue;
    /// `work` runs what must not run on a vCPU thread.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        interrupt: Arc<MmioInterrupt>,
        queue_evts: Vec<EventFd>,
        work: Arc<WorkQueue>,
    ) -> Self {
        MmioTransport {
            state: TransportState::new(device, mem, work),
            interrupt,
            queue_evts,
        }
    }

    /// The transport's state and its pending interrupt bits, for a snapshot.
    pub fn save_state(&self) -> MmioSnapshot {
        MmioSnapshot {
            transport: self.state.save_state(),
            interrupt_status: self.interrupt.status(),
        }
    }

    /// Puts a freshly attached transport in a saved state. The interrupt bits come back
    /// without a new edge: the interrupt controllers' saved state already holds the one
    /// that announced them.
    pub fn restore_state(&mut self, saved: &MmioSnapshot) -> Result<(), TransportStateError> {
        self.state
            .restore_state(&saved.transport, self.interrupt.clone())?;
        self.interrupt
            .status
            .store(saved.interrupt_status, Ordering::SeqCst);
        Ok(())
    }

    fn read_reg(&mut self, offset: u32) -> u32 {
        let s = &self.state;
        let selected = s.queue(s.queue_select as usize);
        match offset {
            reg::VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            reg::VIRTIO_MMIO_VERSION => VERSION,
            reg::VIRTIO_MMIO_DEVICE_ID => s.device().device_type(),
            reg::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            reg::VIRTIO_MMIO_DEVICE_FEATURES => s.device_features_word(),
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX => selected.map_or(0, |q| u32::from(q.max_size())),
            reg::VIRTIO_MMIO_QUEUE_READY => selected.map_or(0, |q| u32::from(q.ready())),
            reg::VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            reg::VIRTIO_MMIO_STATUS => s.device_status(),
            reg::VIRTIO_MMIO_CONFIG_GENERATION => s.config_generation(),
            _ => {
                METRICS.vmm.guest_errors.inc();
                crate::rate_limited_log!(
                    log::Level::Debug,
                    "virtio-mmio: read of unknown register {offset:#x}"
                );
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u32, value: u32) {
        let s = &mut self.state;
        match offset {
            reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL => s.device_features_select = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES => s.set_driver_features_word(value),
            reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL => s.driver_features_select = value,
            reg::VIRTIO_MMIO_QUEUE_SEL => s.queue_select = value,
            reg::VIRTIO_MMIO_QUEUE_NUM => s.with_queue_in_setup(|q| q.set_size(value as u16)),
            reg::VIRTIO_MMIO_QUEUE_READY => s.set_queue_ready(value),
            reg::VIRTIO_MMIO_QUEUE_NOTIFY => {
                // Only reached when no ioeventfd took the write (an index without a queue,
                // or no ioeventfd): forward it.
                if let Some(evt) = self.queue_evts.get(value as usize) {
                    let _ = evt.write(1);
                }
            }
            reg::VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            reg::VIRTIO_MMIO_STATUS => {
                if s.set_status(value, self.interrupt.clone()) == StatusWrite::Reset {
                    self.interrupt.clear();
                }
            }
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW => {
                s.with_queue_in_setup(|q| q.set_desc_table_address(Some(value), None))
            }
            reg::VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                s.with_queue_in_setup(|q| q.set_desc_table_address(None, Some(value)))
            }
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                s.with_queue_in_setup(|q| q.set_avail_ring_address(Some(value), None))
            }
            reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                s.with_queue_in_setup(|q| q.set_avail_ring_address(None, Some(value)))
            }
            reg::VIRTIO_MMIO_QUEUE_USED_LOW => {
                s.with_queue_in_setup(|q| q.set_used_ring_address(Some(value), None))
            }
            reg::VIRTIO_MMIO_QUEUE_USED_HIGH => {
                s.with_queue_in_setup(|q| q.set_used_ring_address(None, Some(value)))
            }
            _ => {
                METRICS.vmm.guest_errors.inc();
                crate::rate_limited_log!(
                    log::Level::Debug,
                    "virtio-mmio: ignored write of {value:#x} to {offset:#x}"
                );
            }
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_START {
            self.state.read_device_config(offset - CONFIG_START, data);
            return;
        }
        // Registers below the configuration space are 32 bits wide and aligned.
        if data.len() != 4 || !offset.is_multiple_of(4) {
            METRICS.vmm.guest_errors.inc();
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset as u32).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_START {
            self.state.write_device_config(offset - CONFIG_START, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            METRICS.vmm.guest_errors.inc();
            return;
        };
        if !offset.is_multiple_of(4) {
            METRICS.vmm.guest_errors.inc();
            return;
        }
        self.write_reg(offset as u32, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{FakeDevice, run_work_on_a_thread};
    use crate::devices::virtio::{VIRTIO_F_VERSION_1, status};
    use crate::vstate::vm::Vm;
    use vm_memory::GuestAddress;

    /// A line that records what was done to it: +1 raised, -1 lowered.
    #[derive(Clone, Default)]
    struct RecordedLine(Arc<Mutex<Vec<i8>>>);

    impl Line for RecordedLine {
        fn raise(&self) -> std::io::Result<()> {
            self.0.lock().unwrap().push(1);
            Ok(())
        }
        fn lower(&self) {
            self.0.lock().unwrap().push(-1);
        }
    }

    #[test]
    fn the_line_is_raised_per_interrupt_and_lowered_once_all_are_acknowledged() {
        let line = RecordedLine::default();
        let irq = MmioInterrupt::new(Box::new(line.clone()));
        irq.trigger(VirtioInterruptType::Queue(0));
        irq.trigger(VirtioInterruptType::Config);
        assert_eq!(*line.0.lock().unwrap(), vec![1, 1]);
        // Acknowledging one of two bits keeps the line high.
        irq.ack(reg::VIRTIO_MMIO_INT_VRING);
        assert_eq!(*line.0.lock().unwrap(), vec![1, 1]);
        // The last one lowers it.
        irq.ack(reg::VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(*line.0.lock().unwrap(), vec![1, 1, -1]);
        assert_eq!(irq.status(), 0);
        // A reset lowers it too.
        irq.trigger(VirtioInterruptType::Queue(0));
        irq.clear();
        assert_eq!(*line.0.lock().unwrap(), vec![1, 1, -1, 1, -1]);
    }

    /// The transport with a fake device, the queue's eventfd, and a thread standing in for
    /// the vmm thread (it runs the work queue until the test ends).
    struct Setup {
        t: MmioTransport,
        dev: Arc<Mutex<FakeDevice>>,
        evt: EventFd,
        vmm: std::thread::ThreadId,
        _vm: Vm,
    }

    fn transport() -> Setup {
        let dev = Arc::new(Mutex::new(FakeDevice::new(&[16])));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let vm = Vm::with_irqfds_for_tests();
        let irq = Arc::new(MmioInterrupt::new(Box::new(vm.irqfd(5, "test").unwrap())));
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let work = Arc::new(WorkQueue::new().unwrap());
        let vmm_id = run_work_on_a_thread(work.clone());
        let t = MmioTransport::new(dev.clone(), mem, irq, vec![evt.try_clone().unwrap()], work);
        Setup {
            t,
            dev,
            evt,
            vmm: vmm_id,
            _vm: vm,
        }
    }

    fn r(t: &mut MmioTransport, off: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(off), &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u32, v: u32) {
        t.write(u64::from(off), &v.to_le_bytes());
    }

    /// Drives the spec's initialisation sequence up to FEATURES_OK with `features`.
    fn negotiate(t: &mut MmioTransport, features: u64) {
        w(t, reg::VIRTIO_MMIO_STATUS, status::ACKNOWLEDGE);
        w(
            t,
            reg::VIRTIO_MMIO_STATUS,
            status::ACKNOWLEDGE | status::DRIVER,
        );
        w(t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w(t, reg::VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        w(t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(t, reg::VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        w(
            t,
            reg::VIRTIO_MMIO_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport) {
        w(t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
        w(t, reg::VIRTIO_MMIO_QUEUE_NUM, 16);
        w(t, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000);
        w(t, reg::VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
        w(t, reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2000);
        w(t, reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
        w(t, reg::VIRTIO_MMIO_QUEUE_USED_LOW, 0x3000);
        w(t, reg::VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
        w(t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
    }

    fn running() -> Setup {
        let mut s = transport();
        negotiate(&mut s.t, 1 << VIRTIO_F_VERSION_1);
        setup_queue(&mut s.t);
        w(&mut s.t, reg::VIRTIO_MMIO_STATUS, 0xf);
        s
    }

    #[test]
    fn a_running_transport_restores_into_a_fresh_one_and_its_device_resumes_its_queues() {
        let s = running();
        s.dev.lock().unwrap().progress = (5, 4);
        s.t.interrupt.trigger(VirtioInterruptType::Queue(0));
        let saved = s.t.save_state();
        assert!(saved.transport.activated);
        assert_eq!(saved.transport.status, 0xf);
        assert_eq!(saved.interrupt_status, reg::VIRTIO_MMIO_INT_VRING);
        let q = saved.transport.queues[0].0;
        assert_eq!(
            (q.next_avail, q.next_used),
            (5, 4),
            "the device's positions"
        );
        assert_eq!(
            (q.desc_table, q.avail_ring, q.used_ring, q.size),
            (0x1000, 0x2000, 0x3000, 16)
        );

        // Through the state file's encoding, into a transport just attached.
        let back: MmioSnapshot =
            serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();
        assert_eq!(back, saved);
        let mut fresh = transport();
        fresh.t.restore_state(&back).unwrap();
        assert_eq!(r(&mut fresh.t, reg::VIRTIO_MMIO_STATUS), 0xf);
        assert_eq!(r(&mut fresh.t, reg::VIRTIO_MMIO_QUEUE_READY), 1);
        assert_eq!(
            r(&mut fresh.t, reg::VIRTIO_MMIO_INTERRUPT_STATUS),
            reg::VIRTIO_MMIO_INT_VRING
        );
        let dev = fresh.dev.lock().unwrap();
        assert_eq!(dev.activated_with, Some((1 << VIRTIO_F_VERSION_1, 1)));
        let q = dev.activated_queues[0];
        assert_eq!((q.next_avail, q.next_used, q.desc_table), (5, 4, 0x1000));
        drop(dev);

        // A device that does not match what was saved is refused, not half-restored.
        let other = Arc::new(Mutex::new(FakeDevice::new(&[16, 16])));
        let mut t = MmioTransport::new(
            other.clone(),
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
            Arc::new(MmioInterrupt::new(Box::new(RecordedLine::default()))),
            vec![],
            Arc::new(WorkQueue::new().unwrap()),
        );
        let e = t.restore_state(&back).unwrap_err().to_string();
        assert!(e.contains("1 queues for a device with 2"), "{e}");
        assert!(other.lock().unwrap().activated_with.is_none());
    }

    #[test]
    fn identity_registers() {
        let Setup { mut t, .. } = transport();
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_MAGIC_VALUE), MAGIC);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_VERSION), 2);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_DEVICE_ID), 2);
        w(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            r(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES),
            1,
            "VERSION_1 is bit 0 of the high half"
        );
        w(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES), 1 << 5);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
        // Narrow or unaligned register accesses read as zero and write nothing.
        let mut b = [0xffu8; 2];
        t.read(0x000, &mut b);
        assert_eq!(b, [0, 0]);
    }

    #[test]
    fn full_handshake_activates_with_negotiated_features() {
        let mut s = transport();
        negotiate(&mut s.t, 1 << VIRTIO_F_VERSION_1);
        assert_ne!(
            r(&mut s.t, reg::VIRTIO_MMIO_STATUS) & status::FEATURES_OK,
            0
        );
        setup_queue(&mut s.t);
        assert_eq!(r(&mut s.t, reg::VIRTIO_MMIO_QUEUE_READY), 1);
        w(&mut s.t, reg::VIRTIO_MMIO_STATUS, 0xf);
        assert_eq!(r(&mut s.t, reg::VIRTIO_MMIO_STATUS), 0xf);
        assert_eq!(
            s.dev.lock().unwrap().activated_with,
            Some((1 << VIRTIO_F_VERSION_1, 1))
        );
        // Queue registers are frozen after DRIVER_OK.
        w(&mut s.t, reg::VIRTIO_MMIO_QUEUE_NUM, 8);
        assert_eq!(s.t.state.queues[0].size(), 16);
    }

    #[test]
    fn features_without_version_1_or_unoffered_are_refused() {
        for features in [0u64, (1 << VIRTIO_F_VERSION_1) | (1 << 7)] {
            let mut s = transport();
            negotiate(&mut s.t, features);
            assert_eq!(
                r(&mut s.t, reg::VIRTIO_MMIO_STATUS) & status::FEATURES_OK,
                0,
                "features {features:#x}"
            );
            w(&mut s.t, reg::VIRTIO_MMIO_STATUS, 0xf);
            assert!(s.dev.lock().unwrap().activated_with.is_none());
        }
    }

    #[test]
    fn invalid_queue_is_not_activated() {
        let mut s = transport();
        negotiate(&mut s.t, 1 << VIRTIO_F_VERSION_1);
        w(&mut s.t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
        w(&mut s.t, reg::VIRTIO_MMIO_QUEUE_NUM, 16);
        // Rings outside guest memory.
        w(&mut s.t, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, 0xffff_0000);
        w(&mut s.t, reg::VIRTIO_MMIO_QUEUE_DESC_HIGH, 0x10);
        w(&mut s.t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
        w(&mut s.t, reg::VIRTIO_MMIO_STATUS, 0xf);
        assert!(s.dev.lock().unwrap().activated_with.is_none());
        let st = r(&mut s.t, reg::VIRTIO_MMIO_STATUS);
        assert_ne!(st & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(st & status::DRIVER_OK, 0);
    }

    #[test]
    fn reset_runs_on_the_vmm_thread_and_returns_to_initial_state() {
        let mut s = running();
        s.t.interrupt.trigger(VirtioInterruptType::Queue(0));
        w(&mut s.t, reg::VIRTIO_MMIO_STATUS, 0);
        assert_eq!(r(&mut s.t, reg::VIRTIO_MMIO_STATUS), 0);
        assert_eq!(r(&mut s.t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        assert_eq!(
            r(&mut s.t, reg::VIRTIO_MMIO_QUEUE_READY),
            0,
            "queues dropped"
        );
        {
            let dev = s.dev.lock().unwrap();
            assert_eq!(dev.resets, 1);
            assert_eq!(
                dev.io_thread,
                Some(s.vmm),
                "the reset ran on the vmm thread"
            );
        }
        // The device can be set up again.
        negotiate(&mut s.t, 1 << VIRTIO_F_VERSION_1);
        setup_queue(&mut s.t);
        w(&mut s.t, reg::VIRTIO_MMIO_STATUS, 0xf);
        assert!(s.dev.lock().unwrap().activated_with.is_some());
    }

    /// A running device that gave up on its queues shows DEVICE_NEEDS_RESET on top of what
    /// the driver set, until the driver resets it.
    #[test]
    fn device_needing_reset_shows_in_status_until_reset() {
        let mut s = running();
        assert_eq!(r(&mut s.t, reg::VIRTIO_MMIO_STATUS), 0xf);
        s.dev.lock().unwrap().broken = true;
        assert_eq!(
            r(&mut s.t, reg::VIRTIO_MMIO_STATUS),
            0xf | status::DEVICE_NEEDS_RESET
        );
        w(&mut s.t, reg::VIRTIO_MMIO_STATUS, 0);
        assert_eq!(r(&mut s.t, reg::VIRTIO_MMIO_STATUS), 0);
        assert!(!s.dev.lock().unwrap().broken, "the device was reset");
        negotiate(&mut s.t, 1 << VIRTIO_F_VERSION_1);
        setup_queue(&mut s.t);
        w(&mut s.t, reg::VIRTIO_MMIO_STATUS, 0xf);
        assert_eq!(r(&mut s.t, reg::VIRTIO_MMIO_STATUS), 0xf);
    }

    #[test]
    fn queue_ready_zero_after_driver_ok_stops_the_queue_and_reads_back_zero() {
        let mut s = running();
        assert_eq!(r(&mut s.t, reg::VIRTIO_MMIO_QUEUE_READY), 1);
        w(&mut s.t, reg::VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(r(&mut s.t, reg::VIRTIO_MMIO_QUEUE_READY), 0);
        let dev = s.dev.lock().unwrap();
        assert_eq!(dev.stopped, vec![0]);
        assert_eq!(dev.io_thread, Some(s.vmm));
        drop(dev);
        // Without VIRTIO_F_RING_RESET the queue cannot be revived while running.
        w(&mut s.t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(r(&mut s.t, reg::VIRTIO_MMIO_QUEUE_READY), 0);
    }

    #[test]
    fn status_bits_cannot_be_taken_back_and_failed_is_kept() {
        let Setup { mut t, .. } = transport();
        w(
            &mut t,
            reg::VIRTIO_MMIO_STATUS,
            status::ACKNOWLEDGE | status::DRIVER,
        );
        w(&mut t, reg::VIRTIO_MMIO_STATUS, status::ACKNOWLEDGE);
        assert_ne!(
            r(&mut t, reg::VIRTIO_MMIO_STATUS) & status::DEVICE_NEEDS_RESET,
            0
        );
        let Setup { mut t, .. } = transport();
        w(
            &mut t,
            reg::VIRTIO_MMIO_STATUS,
            status::ACKNOWLEDGE | status::FAILED,
        );
        assert_eq!(
            r(&mut t, reg::VIRTIO_MMIO_STATUS),
            status::ACKNOWLEDGE | status::FAILED
        );
    }

    #[test]
    fn interrupt_ack_and_notify_forwarding_and_config() {
        let Setup { mut t, evt, .. } = transport();
        t.interrupt.trigger(VirtioInterruptType::Queue(0));
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 1);
        t.interrupt.trigger(VirtioInterruptType::Config);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 3);
        w(&mut t, reg::VIRTIO_MMIO_INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 2);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(evt.read().unwrap(), 1);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 7); // no such queue: ignored
        let mut cap = [0u8; 8];
        t.read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 0x1234);
    }
}
