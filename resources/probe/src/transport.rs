//! A virtio device's transport, MMIO or PCI: the driver code above it (virtio_blk) is the
//! same for both, as virtio 1.2 intends.

use crate::line::Detail;
use crate::timeout::{self, Deadline};
use crate::virtio_mmio::{ACKNOWLEDGE, DRIVER, Mmio, POLL_GAP_TICKS};
use crate::virtio_pci::PciTransport;

/// How long a reset may take to show: about 0.4-2 s, far more than any device needs.
const RESET_TICKS: u64 = 1 << 31;
/// Config space reads retried while the configuration generation keeps changing.
const CONFIG_ATTEMPTS: u32 = 8;

#[derive(Clone, Copy)]
pub enum Transport {
    Mmio(Mmio),
    Pci(PciTransport),
}

impl Transport {
    pub fn status(&self) -> u32 {
        match self {
            Transport::Mmio(m) => m.status(),
            Transport::Pci(p) => p.status(),
        }
    }

    pub fn set_status(&self, status: u32) {
        match self {
            Transport::Mmio(m) => m.set_status(status),
            Transport::Pci(p) => p.set_status(status),
        }
    }

    /// The first steps of device initialisation (virtio 1.2, 3.1.1 steps 1-3): reset,
    /// then ACKNOWLEDGE and DRIVER, recorded in `status`. On failure says why in `d`.
    pub fn begin_init(&self, status: &mut u32, d: &mut Detail) -> bool {
        if !self.reset() {
            d.str(b"reset not completed: status=")
                .hex(u64::from(self.status()));
            return false;
        }
        for bit in [ACKNOWLEDGE, DRIVER] {
            *status |= bit;
            self.set_status(*status);
        }
        true
    }

    /// Writing 0 resets the device; the reset is complete once the status reads 0
    /// (virtio 2.4.2).
    pub fn reset(&self) -> bool {
        self.set_status(0);
        let mut deadline = Deadline::after(RESET_TICKS);
        while self.status() != 0 {
            if deadline.expired() {
                return false;
            }
            timeout::delay(POLL_GAP_TICKS);
        }
        true
    }

    pub fn device_features(&self) -> u64 {
        match self {
            Transport::Mmio(m) => m.device_features(),
            Transport::Pci(p) => p.device_features(),
        }
    }

    pub fn set_driver_features(&self, features: u64) {
        match self {
            Transport::Mmio(m) => m.set_driver_features(features),
            Transport::Pci(p) => p.set_driver_features(features),
        }
    }

    pub fn select_queue(&self, index: u32) -> (u32, u32) {
        match self {
            Transport::Mmio(m) => m.select_queue(index),
            Transport::Pci(p) => p.select_queue(index),
        }
    }

    /// False when the queue could not be given its interrupt (PCI: no MSI-X vector).
    pub fn activate_queue(&self, size: u16, desc: u64, driver: u64, device: u64) -> bool {
        match self {
            Transport::Mmio(m) => {
                m.activate_queue(size, desc, driver, device);
                true
            }
            Transport::Pci(p) => p.activate_queue(size, desc, driver, device),
        }
    }

    pub fn notify(&self, queue: u32) {
        match self {
            Transport::Mmio(m) => m.notify(queue),
            Transport::Pci(p) => p.notify(queue),
        }
    }

    pub fn take_used_interrupt(&self, patient: bool) -> bool {
        match self {
            Transport::Mmio(m) => m.take_used_interrupt(patient),
            Transport::Pci(p) => p.take_used_interrupt(patient),
        }
    }

    fn config_generation(&self) -> u32 {
        match self {
            Transport::Mmio(m) => m.config_generation(),
            Transport::Pci(p) => p.config_generation(),
        }
    }

    fn config_u32(&self, offset: u64) -> u32 {
        match self {
            Transport::Mmio(m) => m.config_u32(offset),
            Transport::Pci(p) => p.config_u32(offset),
        }
    }

    /// A 64-bit config field at `offset`, read as two 32-bit halves (the spec requires
    /// 32-bit accesses for it) between two reads of the configuration generation, again if
    /// the generation changed in between: then the halves may not belong together.
    pub fn config_u64(&self, offset: u64) -> Option<u64> {
        for _ in 0..CONFIG_ATTEMPTS {
            let generation = self.config_generation();
            let low = self.config_u32(offset);
            let high = self.config_u32(offset + 4);
            if self.config_generation() == generation {
                return Some((u64::from(high) << 32) | u64::from(low));
            }
        }
        None
    }
}
