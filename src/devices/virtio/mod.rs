//! virtio devices and their MMIO transport (virtio 1.2, "Virtio Over MMIO", version 2).

pub mod block;
pub mod driver;
pub mod mmio;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Feature bits shared by every device.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// Interrupt status bits (virtio 1.2, 4.2.2).
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG_CHANGE: u32 = 2;

/// A device's interrupt line: the status register the driver reads through the transport
/// and the irqfd KVM turns into the guest interrupt.
pub struct VirtioInterrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl VirtioInterrupt {
    pub fn new(irqfd: EventFd) -> Self {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Sets `bits` in the interrupt status and raises the line.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            log::warn!("virtio: cannot raise the interrupt: {e}");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledges `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {0} is not valid (size or ring addresses)")]
    BadQueue(usize),
}

/// What the transport needs from a device model.
pub trait VirtioDevice: Send {
    /// The virtio device type (2 for block).
    fn device_type(&self) -> u32;
    /// Largest size of each of the device's queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers.
    fn device_features(&self) -> u64;
    /// Reads from the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to the device-specific configuration space (ignored by read-only configs).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver finished setting up (DRIVER_OK): the device may start using the queues.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError>;
    /// The driver reset the device: drop the queues, keep the backend.
    fn reset(&mut self);
    /// Counts changes the device made to its own configuration space, so the driver can
    /// tell a torn read (virtio 1.2, 4.2.2 ConfigGeneration).
    fn config_generation(&self) -> u32 {
        0
    }
}

/// Copies the bytes of `config` at `offset` into `data`; out-of-range bytes read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, 100, &mut d);
        assert_eq!(d, [0; 4]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn interrupt_status_set_and_acked() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = VirtioInterrupt::new(evt.try_clone().unwrap());
        irq.trigger(INT_USED_RING);
        assert_eq!(irq.status(), INT_USED_RING);
        assert_eq!(evt.read().unwrap(), 1);
        irq.trigger(INT_CONFIG_CHANGE);
        irq.ack(INT_USED_RING);
        assert_eq!(irq.status(), INT_CONFIG_CHANGE);
    }
}
