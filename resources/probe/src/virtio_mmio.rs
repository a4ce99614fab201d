//! The virtio-mmio transport, version 2 (virtio 1.x, 4.2 "Virtio Over MMIO"): register access,
//! reset, feature negotiation, queue registration, config space and interrupt status.
//!
//! Every register access is an MMIO exit into the VMM and costs microseconds, so registers are
//! read only where the spec asks for it or where the probe checks the device. All control
//! registers are accessed 32 bits wide and aligned, as 4.2.2.2 requires.

use crate::phys;
use crate::timeout::{self, Deadline};
use crate::transport::Transport;

/// "virt" in little endian.
pub const MAGIC: u32 = 0x7472_6976;
/// The modern transport; 1 is the legacy one, which the probe does not drive.
pub const VERSION_MODERN: u32 = 2;

pub const MAGIC_VALUE: u64 = 0x000;
pub const VERSION: u64 = 0x004;
pub const DEVICE_ID: u64 = 0x008;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
/// Each a Low register with its High one 4 bytes above.
const QUEUE_DESC: u64 = 0x080;
const QUEUE_DRIVER: u64 = 0x090;
const QUEUE_DEVICE: u64 = 0x0a0;
const CONFIG_GENERATION: u64 = 0x0fc;
/// Device-specific configuration space.
pub const CONFIG: u64 = 0x100;

// Device status bits (virtio 2.1).
pub const ACKNOWLEDGE: u32 = 1;
pub const DRIVER: u32 = 2;
pub const DRIVER_OK: u32 = 4;
pub const FEATURES_OK: u32 = 8;
pub const FAILED: u32 = 0x80;

/// InterruptStatus bit 0: the device used a buffer. Bit 1 is a configuration change; the
/// others are undefined, to be ignored and never acknowledged (4.2.2.2).
const INTERRUPT_USED_BUFFER: u32 = 1 << 0;
const INTERRUPT_DEFINED: u32 = 0b11;

/// How long an interrupt may take to show: about 0.4-2 s, far more than any
/// device needs, short enough that a silent one does not stall the run.
pub const INTERRUPT_TICKS: u64 = 1 << 31;
/// Between two reads of a polled register: each is a VM exit of tens of microseconds, and
/// back-to-back exits would keep the host busy for nothing.
pub const POLL_GAP_TICKS: u64 = 1 << 17;

#[derive(Clone, Copy)]
pub struct Mmio {
    base: u64,
}

impl Mmio {
    /// `base` must lie in the probe's identity map (the uncached MMIO gap).
    pub fn new(base: u64) -> Self {
        Mmio { base }
    }

    pub fn read(&self, reg: u64) -> u32 {
        phys::read_u32(self.base + reg)
    }

    pub fn write(&self, reg: u64, value: u32) {
        phys::write_u32(self.base + reg, value)
    }

    pub fn status(&self) -> u32 {
        self.read(STATUS)
    }

    /// Status bits are only ever added, so `status` is the whole new value (virtio 2.1.1).
    pub fn set_status(&self, status: u32) {
        self.write(STATUS, status)
    }

    /// See [`Transport::begin_init`].
    pub fn begin_init(&self, status: &mut u32, d: &mut crate::line::Detail) -> bool {
        Transport::Mmio(*self).begin_init(status, d)
    }

    /// See [`Transport::reset`].
    pub fn reset(&self) -> bool {
        Transport::Mmio(*self).reset()
    }

    pub fn config_generation(&self) -> u32 {
        self.read(CONFIG_GENERATION)
    }

    /// 32 bits of the device-specific configuration space at `offset`.
    pub fn config_u32(&self, offset: u64) -> u32 {
        self.read(CONFIG + offset)
    }

    /// All 64 feature bits the device offers: DeviceFeaturesSel must be written before each
    /// read of DeviceFeatures.
    pub fn device_features(&self) -> u64 {
        self.write(DEVICE_FEATURES_SEL, 0);
        let low = self.read(DEVICE_FEATURES);
        self.write(DEVICE_FEATURES_SEL, 1);
        let high = self.read(DEVICE_FEATURES);
        (u64::from(high) << 32) | u64::from(low)
    }

    pub fn set_driver_features(&self, features: u64) {
        self.write(DRIVER_FEATURES_SEL, 0);
        self.write(DRIVER_FEATURES, features as u32);
        self.write(DRIVER_FEATURES_SEL, 1);
        self.write(DRIVER_FEATURES, (features >> 32) as u32);
    }

    /// Selects queue `index` and returns (QueueReady, QueueNumMax). A ready queue is in use;
    /// a QueueNumMax of 0 means there is no such queue (4.2.3.2).
    pub fn select_queue(&self, index: u32) -> (u32, u32) {
        self.write(QUEUE_SEL, index);
        (self.read(QUEUE_READY), self.read(QUEUE_NUM_MAX))
    }

    /// Registers the selected queue's size and split-ring areas, then marks it ready. The
    /// addresses must not change once QueueReady is set, so this is the last step.
    pub fn activate_queue(&self, size: u16, desc: u64, driver: u64, device: u64) {
        self.write(QUEUE_NUM, u32::from(size));
        for (reg, addr) in [
            (QUEUE_DESC, desc),
            (QUEUE_DRIVER, driver),
            (QUEUE_DEVICE, device),
        ] {
            self.write(reg, addr as u32);
            self.write(reg + 4, (addr >> 32) as u32);
        }
        self.write(QUEUE_READY, 1);
    }

    /// Without VIRTIO_F_NOTIFICATION_DATA the value written is the queue index.
    pub fn notify(&self, queue: u32) {
        self.write(QUEUE_NOTIFY, queue);
    }

    /// Waits for InterruptStatus to report a used buffer, then acknowledges what it reports.
    /// Call after seeing the used ring advance: the device sets the bit when it notifies,
    /// which the spec puts after the used ring update, so it may show a little later.
    /// `patient` false reads once, for a device that has already missed an interrupt.
    pub fn take_used_interrupt(&self, patient: bool) -> bool {
        let mut deadline = Deadline::after(if patient { INTERRUPT_TICKS } else { 0 });
        loop {
            let status = self.read(INTERRUPT_STATUS);
            if status & INTERRUPT_USED_BUFFER != 0 {
                self.write(INTERRUPT_ACK, status & INTERRUPT_DEFINED);
                return true;
            }
            if !patient || deadline.expired() {
                return false;
            }
            timeout::delay(POLL_GAP_TICKS);
        }
    }
}
