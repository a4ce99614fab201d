//! A virtio device's transport, MMIO or PCI: the driver code above it (virtio_blk) is the
//! same for both, as virtio 1.2 intends.

use crate::line::Detail;
use crate::virtio_mmio::Mmio;
use crate::virtio_pci::PciTransport;

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

    pub fn begin_init(&self, status: &mut u32, d: &mut Detail) -> bool {
        match self {
            Transport::Mmio(m) => m.begin_init(status, d),
            Transport::Pci(p) => p.begin_init(status, d),
        }
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

    pub fn config_u64(&self, offset: u64) -> Option<u64> {
        match self {
            Transport::Mmio(m) => m.config_u64(offset),
            Transport::Pci(p) => p.config_u64(offset),
        }
    }
}
