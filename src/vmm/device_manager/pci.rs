//! The PCI root complex (`--enable-pci`): its configuration mechanisms and BAR windows on
//! the buses, and its entry in the firmware tables.

use std::sync::{Arc, Mutex};

use super::{DeviceManager, DeviceManagerError};
use crate::arch::layout::{
    PCI_ECAM_LEN, PCI_ECAM_START, PCI_MMIO32_END, PCI_MMIO32_START, pci_mmio64_window,
};
use crate::arch::{PciWindows, PlatformDevice};
use crate::devices::pci::config_access::{EcamWindow, PORT_IO_LEN, PortIoConfig};
use crate::devices::pci::root::{BarWindow, PciRoot};

/// The port the configuration mechanism's CONFIG_ADDRESS register sits at.
const PCI_CONFIG_PORT: u64 = 0xcf8;

impl DeviceManager {
    /// Attaches a PCI root complex with its host bridge, for a guest of `mem_bytes` of RAM
    /// (the 64-bit BAR window starts above it).
    pub fn attach_pci_root(&mut self, mem_bytes: u64) -> Result<(), DeviceManagerError> {
        let root = Arc::new(PciRoot::new());
        self.pio_bus.insert(
            Arc::new(Mutex::new(PortIoConfig::new(root.clone()))),
            PCI_CONFIG_PORT,
            PORT_IO_LEN,
        )?;
        self.mmio_bus.insert(
            Arc::new(Mutex::new(EcamWindow::new(root.clone()))),
            PCI_ECAM_START,
            PCI_ECAM_LEN,
        )?;
        let mmio32 = (PCI_MMIO32_START, PCI_MMIO32_END - PCI_MMIO32_START);
        let mmio64 = pci_mmio64_window(mem_bytes);
        for (start, len) in [mmio32, mmio64] {
            self.mmio_bus.insert(
                Arc::new(Mutex::new(BarWindow::new(root.clone(), start))),
                start,
                len,
            )?;
        }
        self.platform.push(PlatformDevice::PciRoot(PciWindows {
            ecam: (PCI_ECAM_START, PCI_ECAM_LEN),
            mmio32,
            mmio64,
        }));
        self.pci = Some(root);
        Ok(())
    }
}
