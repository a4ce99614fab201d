//! The virtio-mmio transport, version 2 ("modern"): the register window through which a
//! driver discovers a device, negotiates features, sets up queues and reads configuration.
//! Queue notifications normally bypass it (an ioeventfd on QueueNotify); a write that does
//! reach it is forwarded to the queue's eventfd.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{VIRTIO_F_VERSION_1, VirtioDevice, VirtioInterrupt, status};
use crate::devices::bus::BusDevice;

/// Size of one device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of QueueNotify, where the ioeventfd sits.
pub const NOTIFY_OFFSET: u64 = 0x050;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// "EMBR": the subsystem vendor id a driver may log.
const VENDOR_ID: u32 = 0x524d_4245;
const CONFIG_START: u64 = 0x100;

pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queue_evts: Vec<EventFd>,
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
    /// `queue_evts` are the eventfds the device's event handler waits on, one per queue.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        queue_evts: Vec<EventFd>,
    ) -> Self {
        let queues = Self::fresh_queues(&device);
        MmioTransport {
            device,
            mem,
            interrupt,
            queue_evts,
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

    /// Returns the transport and device to their initial state; the backend stays.
    fn reset(&mut self) {
        if self.activated {
            self.device().reset();
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
            log::warn!("virtio: queue {i} set up with invalid addresses or size");
            return false;
        }
        // The device gets its own copies; the transport keeps its view for the registers.
        let queues: Vec<Queue> = self
            .queues
            .iter()
            .filter_map(|q| Queue::try_from(q.state()).ok())
            .collect();
        let result = self
            .device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .activate(
                self.mem.clone(),
                self.driver_features,
                queues,
                self.interrupt.clone(),
            );
        match result {
            Ok(()) => {
                self.activated = true;
                true
            }
            Err(e) => {
                log::warn!("virtio: cannot activate the device: {e}");
                false
            }
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device().device_type(),
            0x00c => VENDOR_ID,
            0x010 => {
                let f = self.device().device_features();
                match self.device_features_select {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x034 => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            0x044 => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.ready())),
            0x060 => self.interrupt.status(),
            0x070 => self.status,
            0x0fc => self
                .config_generation
                .wrapping_add(self.device().config_generation()),
            _ => {
                log::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        let setup = self.queue_setup_allowed();
        match offset {
            0x014 => self.device_features_select = value,
            0x020 => {
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
            0x024 => self.driver_features_select = value,
            0x030 => self.queue_select = value,
            0x038 if setup => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(value as u16);
                }
            }
            0x044 if setup => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            0x050 => {
                // Only reached when the ioeventfd did not take the write (another value
                // than queue 0, or no ioeventfd): forward it.
                if let Some(evt) = self.queue_evts.get(value as usize) {
                    let _ = evt.write(1);
                }
            }
            0x064 => self.interrupt.ack(value),
            0x070 => self.set_status(value),
            0x080 if setup => self.with_queue(|q| q.set_desc_table_address(Some(value), None)),
            0x084 if setup => self.with_queue(|q| q.set_desc_table_address(None, Some(value))),
            0x090 if setup => self.with_queue(|q| q.set_avail_ring_address(Some(value), None)),
            0x094 if setup => self.with_queue(|q| q.set_avail_ring_address(None, Some(value))),
            0x0a0 if setup => self.with_queue(|q| q.set_used_ring_address(Some(value), None)),
            0x0a4 if setup => self.with_queue(|q| q.set_used_ring_address(None, Some(value))),
            _ => log::debug!("virtio-mmio: ignored write of {value:#x} to {offset:#x}"),
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
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_START {
            self.device().write_config(offset - CONFIG_START, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::ActivateError;
    use vm_memory::GuestAddress;

    /// A device that records what the transport told it.
    #[derive(Default)]
    struct FakeDevice {
        activated_with: Option<(u64, usize)>,
        resets: usize,
        config: [u8; 8],
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
            _interrupt: Arc<VirtioInterrupt>,
        ) -> Result<(), ActivateError> {
            self.activated_with = Some((features, queues.len()));
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.activated_with = None;
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<FakeDevice>>, EventFd) {
        let dev = Arc::new(Mutex::new(FakeDevice {
            config: 0x1234u64.to_le_bytes(),
            ..Default::default()
        }));
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irq = Arc::new(VirtioInterrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ));
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(dev.clone(), mem, irq, vec![evt.try_clone().unwrap()]);
        (t, dev, evt)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Drives the spec's initialisation sequence up to FEATURES_OK with `features`.
    fn negotiate(t: &mut MmioTransport, features: u64) {
        w(t, 0x070, status::ACKNOWLEDGE);
        w(t, 0x070, status::ACKNOWLEDGE | status::DRIVER);
        w(t, 0x024, 0);
        w(t, 0x020, features as u32);
        w(t, 0x024, 1);
        w(t, 0x020, (features >> 32) as u32);
        w(
            t,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport) {
        w(t, 0x030, 0);
        w(t, 0x038, 16);
        w(t, 0x080, 0x1000);
        w(t, 0x084, 0);
        w(t, 0x090, 0x2000);
        w(t, 0x094, 0);
        w(t, 0x0a0, 0x3000);
        w(t, 0x0a4, 0);
        w(t, 0x044, 1);
    }

    #[test]
    fn identity_registers() {
        let (mut t, _, _) = transport();
        assert_eq!(r(&mut t, 0x000), MAGIC);
        assert_eq!(r(&mut t, 0x004), 2);
        assert_eq!(r(&mut t, 0x008), 2);
        w(&mut t, 0x014, 1);
        assert_eq!(r(&mut t, 0x010), 1, "VERSION_1 is bit 0 of the high half");
        w(&mut t, 0x014, 0);
        assert_eq!(r(&mut t, 0x010), 1 << 5);
        assert_eq!(r(&mut t, 0x034), 16);
        // Narrow or unaligned register accesses read as zero and write nothing.
        let mut b = [0xffu8; 2];
        t.read(0x000, &mut b);
        assert_eq!(b, [0, 0]);
    }

    #[test]
    fn full_handshake_activates_with_negotiated_features() {
        let (mut t, dev, _) = transport();
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        assert_ne!(r(&mut t, 0x070) & status::FEATURES_OK, 0);
        setup_queue(&mut t);
        assert_eq!(r(&mut t, 0x044), 1);
        w(&mut t, 0x070, 0xf); // ACK|DRIVER|FEATURES_OK|DRIVER_OK
        assert_eq!(r(&mut t, 0x070), 0xf);
        assert_eq!(
            dev.lock().unwrap().activated_with,
            Some((1 << VIRTIO_F_VERSION_1, 1))
        );
        // Queue registers are frozen after DRIVER_OK.
        w(&mut t, 0x038, 8);
        assert_eq!(t.queues[0].size(), 16);
    }

    #[test]
    fn features_without_version_1_or_unoffered_are_refused() {
        for features in [0u64, (1 << VIRTIO_F_VERSION_1) | (1 << 7)] {
            let (mut t, dev, _) = transport();
            negotiate(&mut t, features);
            assert_eq!(
                r(&mut t, 0x070) & status::FEATURES_OK,
                0,
                "features {features:#x}"
            );
            w(&mut t, 0x070, 0xf);
            assert!(dev.lock().unwrap().activated_with.is_none());
        }
    }

    #[test]
    fn invalid_queue_is_not_activated() {
        let (mut t, dev, _) = transport();
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        w(&mut t, 0x030, 0);
        w(&mut t, 0x038, 16);
        // Rings outside guest memory.
        w(&mut t, 0x080, 0xffff_0000);
        w(&mut t, 0x084, 0x10);
        w(&mut t, 0x044, 1);
        w(&mut t, 0x070, 0xf);
        assert!(dev.lock().unwrap().activated_with.is_none());
        assert_ne!(r(&mut t, 0x070) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(r(&mut t, 0x070) & status::DRIVER_OK, 0);
    }

    #[test]
    fn reset_returns_to_initial_state_and_keeps_backend() {
        let (mut t, dev, _) = transport();
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        setup_queue(&mut t);
        w(&mut t, 0x070, 0xf);
        t.interrupt.trigger(1);
        w(&mut t, 0x070, 0);
        assert_eq!(r(&mut t, 0x070), 0);
        assert_eq!(r(&mut t, 0x060), 0);
        assert_eq!(r(&mut t, 0x044), 0, "queues dropped");
        assert_eq!(dev.lock().unwrap().resets, 1);
        // The device can be set up again.
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        setup_queue(&mut t);
        w(&mut t, 0x070, 0xf);
        assert!(dev.lock().unwrap().activated_with.is_some());
    }

    #[test]
    fn status_bits_cannot_be_taken_back_and_failed_is_kept() {
        let (mut t, _, _) = transport();
        w(&mut t, 0x070, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, 0x070, status::ACKNOWLEDGE);
        assert_ne!(r(&mut t, 0x070) & status::DEVICE_NEEDS_RESET, 0);
        let (mut t, _, _) = transport();
        w(&mut t, 0x070, status::ACKNOWLEDGE | status::FAILED);
        assert_eq!(r(&mut t, 0x070), status::ACKNOWLEDGE | status::FAILED);
    }

    #[test]
    fn interrupt_ack_and_notify_forwarding_and_config() {
        let (mut t, _, evt) = transport();
        t.interrupt.trigger(1);
        assert_eq!(r(&mut t, 0x060), 1);
        w(&mut t, 0x064, 1);
        assert_eq!(r(&mut t, 0x060), 0);
        w(&mut t, 0x050, 0);
        assert_eq!(evt.read().unwrap(), 1);
        w(&mut t, 0x050, 7); // no such queue: ignored
        let mut cap = [0u8; 8];
        t.read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 0x1234);
    }
}
