//! The virtio-mmio transport, version 2 ("modern"): the register window through which a
//! driver discovers a device, negotiates features, sets up queues and reads configuration.
//! Queue notifications normally bypass it (one ioeventfd per queue on QueueNotify); a write
//! that does reach it is forwarded to the queue's eventfd.
//!
//! Register accesses run on vCPU threads. A reset or a stopped queue may have to wait for
//! host I/O in flight, so those run on the vmm thread through the [`WorkQueue`]; the vCPU
//! waits, and the driver sees the effect complete when its write returns.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_mmio as reg;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{VIRTIO_F_VERSION_1, VirtioDevice, VirtioInterrupt, VirtioInterruptType, status};
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

pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<MmioInterrupt>,
    queue_evts: Vec<EventFd>,
    work: Arc<WorkQueue>,
    queues: Vec<Queue>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
    activated: bool,
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
        let queues = Self::fresh_queues(&device);
        MmioTransport {
            device,
            mem,
            interrupt,
            queue_evts,
            work,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        }
    }

    fn fresh_queues(device: &Arc<Mutex<dyn VirtioDevice>>) -> Vec<Queue> {
        let dev = device.lock().unwrap_or_else(|e| e.into_inner());
        dev.queue_max_sizes()
            .iter()
            // Sizes come from our own device models, which use powers of two up to 256.
            .filter_map(|&max| Queue::new(max).ok())
            .collect()
    }

    fn device(&self) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue registers may change only while the driver sets the device up.
    fn queue_setup_allowed(&self) -> bool {
        self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0
    }

    /// Runs `f` on the device, on the vmm thread, and waits for it.
    fn on_vmm_thread(&self, f: impl FnOnce(&mut dyn VirtioDevice) + Send + 'static) {
        let device = self.device.clone();
        self.work.run(move || {
            let mut dev = device.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut *dev);
        });
    }

    /// Returns the transport and device to their initial state; the backend stays. The
    /// device's part (waiting for its I/O) is done before the driver's write returns, so
    /// Status reads 0 only once nothing touches guest memory any more.
    fn reset(&mut self) {
        if self.activated {
            self.on_vmm_thread(|dev| dev.reset());
        }
        self.activated = false;
        self.queues = Self::fresh_queues(&self.device);
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt.clear();
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // A driver only ever adds bits; anything else is a driver bug, which the device
        // answers by asking for a reset.
        if value & self.status != self.status {
            self.status |= status::DEVICE_NEEDS_RESET;
            return;
        }
        let new = value & !self.status;
        if new & status::FEATURES_OK != 0 {
            let offered = self.device().device_features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if !ok {
                // Leaving FEATURES_OK clear tells the driver the features were refused.
                self.status |= value & !status::FEATURES_OK;
                return;
            }
        }
        if new & status::DRIVER_OK != 0 && !self.activate() {
            self.status |= (value & !status::DRIVER_OK) | status::DEVICE_NEEDS_RESET;
            return;
        }
        self.status |= value;
    }

    fn activate(&mut self) -> bool {
        if self.status & status::FEATURES_OK == 0 {
            return false;
        }
        if let Some(i) = self
            .queues
            .iter()
            .position(|q| q.ready() && !q.is_valid(&self.mem))
        {
            METRICS.vmm.guest_errors.inc();
            crate::rate_limited_log!(
                log::Level::Debug,
                "virtio: queue {i} set up with invalid addresses or size"
            );
            return false;
        }
        // The device gets its own copies; the transport keeps its view for the registers.
        let queues: Vec<Queue> = self
            .queues
            .iter()
            .filter_map(|q| Queue::try_from(q.state()).ok())
            .collect();
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        let result =
            self.device()
                .activate(self.mem.clone(), self.driver_features, queues, interrupt);
        match result {
            Ok(()) => {
                self.activated = true;
                true
            }
            Err(e) => {
                METRICS.vmm.guest_errors.inc();
                crate::rate_limited_log!(
                    log::Level::Debug,
                    "virtio: cannot activate the device: {e}"
                );
                false
            }
        }
    }

    /// QueueReady: 1 during set-up makes the queue usable; 0 at any time stops it (virtio
    /// 1.2, 4.2.2.2: "to stop using the queue the driver MUST write zero ... and MUST read
    /// the value back"), and reads back 0 once the device no longer uses it.
    fn set_queue_ready(&mut self, value: u32) {
        let index = self.queue_select as usize;
        let running = self.activated;
        let Some(q) = self.selected_queue() else {
            return;
        };
        if value == 0 {
            let was_ready = q.ready();
            q.set_ready(false);
            if running && was_ready {
                self.on_vmm_thread(move |dev| dev.stop_queue(index));
            }
        } else if value == 1 && !running {
            q.set_ready(true);
        }
    }

    /// Status as the driver reads it: what it set, plus DEVICE_NEEDS_RESET when the
    /// transport refused a step or the running device gave up on a queue.
    fn device_status(&self) -> u32 {
        if self.activated && self.device().needs_reset() {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    fn read_reg(&mut self, offset: u32) -> u32 {
        match offset {
            reg::VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            reg::VIRTIO_MMIO_VERSION => VERSION,
            reg::VIRTIO_MMIO_DEVICE_ID => self.device().device_type(),
            reg::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            reg::VIRTIO_MMIO_DEVICE_FEATURES => {
                let f = self.device().device_features();
                match self.device_features_select {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            reg::VIRTIO_MMIO_QUEUE_READY => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.ready())),
            reg::VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            reg::VIRTIO_MMIO_STATUS => self.device_status(),
            reg::VIRTIO_MMIO_CONFIG_GENERATION => self
                .config_generation
                .wrapping_add(self.device().config_generation()),
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
        let setup = self.queue_setup_allowed();
        match offset {
            reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES => {
                if self.status & status::FEATURES_OK == 0 {
                    let v = u64::from(value);
                    match self.driver_features_select {
                        0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                        1 => {
                            self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32)
                        }
                        _ => {}
                    }
                }
            }
            reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            reg::VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            reg::VIRTIO_MMIO_QUEUE_NUM if setup => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(value as u16);
                }
            }
            reg::VIRTIO_MMIO_QUEUE_READY => self.set_queue_ready(value),
            reg::VIRTIO_MMIO_QUEUE_NOTIFY => {
                // Only reached when no ioeventfd took the write (an index without a queue,
                // or no ioeventfd): forward it.
                if let Some(evt) = self.queue_evts.get(value as usize) {
                    let _ = evt.write(1);
                }
            }
            reg::VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            reg::VIRTIO_MMIO_STATUS => self.set_status(value),
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW if setup => {
                self.with_queue(|q| q.set_desc_table_address(Some(value), None))
            }
            reg::VIRTIO_MMIO_QUEUE_DESC_HIGH if setup => {
                self.with_queue(|q| q.set_desc_table_address(None, Some(value)))
            }
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW if setup => {
                self.with_queue(|q| q.set_avail_ring_address(Some(value), None))
            }
            reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH if setup => {
                self.with_queue(|q| q.set_avail_ring_address(None, Some(value)))
            }
            reg::VIRTIO_MMIO_QUEUE_USED_LOW if setup => {
                self.with_queue(|q| q.set_used_ring_address(Some(value), None))
            }
            reg::VIRTIO_MMIO_QUEUE_USED_HIGH if setup => {
                self.with_queue(|q| q.set_used_ring_address(None, Some(value)))
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

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_START {
            self.device().read_config(offset - CONFIG_START, data);
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
            self.device().write_config(offset - CONFIG_START, data);
            self.config_generation = self.config_generation.wrapping_add(1);
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
    use crate::devices::virtio::ActivateError;
    use crate::vstate::kvm::KvmContext;
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

    /// A device that records what the transport told it.
    #[derive(Default)]
    struct FakeDevice {
        activated_with: Option<(u64, usize)>,
        resets: usize,
        stopped: Vec<usize>,
        config: [u8; 8],
        /// Which thread ran the last reset or queue stop.
        io_thread: Option<std::thread::ThreadId>,
        /// The device gave up on its queues until reset.
        broken: bool,
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn device_features(&self) -> u64 {
            (1 << VIRTIO_F_VERSION_1) | (1 << 5)
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            features: u64,
            queues: Vec<Queue>,
            _interrupt: Arc<dyn VirtioInterrupt>,
        ) -> Result<(), ActivateError> {
            self.activated_with = Some((features, queues.len()));
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.activated_with = None;
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
        let dev = Arc::new(Mutex::new(FakeDevice {
            config: 0x1234u64.to_le_bytes(),
            ..Default::default()
        }));
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut vm = Vm::new(&KvmContext::open().unwrap()).unwrap();
        vm.create_interrupt_controllers(crate::config::Irqchip::Kernel)
            .unwrap();
        let irq = Arc::new(MmioInterrupt::new(Box::new(vm.irqfd(5, "test").unwrap())));
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let work = Arc::new(WorkQueue::new().unwrap());
        let runner = work.clone();
        let vmm = std::thread::spawn(move || {
            loop {
                let mut p = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(runner.eventfd()),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut p, 1, 5000) } <= 0 {
                    return;
                }
                runner.run_pending();
            }
        });
        let vmm_id = vmm.thread().id();
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
        assert_eq!(s.t.queues[0].size(), 16);
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
