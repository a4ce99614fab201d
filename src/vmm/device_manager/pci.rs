//! The PCI root complex (`--enable-pci`): its configuration mechanisms and BAR windows on
//! the buses, and its entry in the firmware tables.

use std::sync::{Arc, Mutex};

use vm_allocator::{AddressAllocator, AllocPolicy};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceManager, DeviceManagerError, VirtioPlacement};
use crate::arch::layout::{
    PCI_ECAM_LEN, PCI_ECAM_START, PCI_MMIO32_END, PCI_MMIO32_START, pci_mmio64_window,
};
use crate::arch::{PciWindows, PlatformDevice};
use crate::devices::pci::config_access::{EcamWindow, PORT_IO_LEN, PortIoConfig};
use crate::devices::pci::msix::VectorSink;
use crate::devices::pci::root::{BarWindow, PciRoot};
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::pci::{BAR_SIZE, Notifications, VirtioPciFunction};
use crate::vstate::vm::Vm;

/// The root complex and where its functions' BARs go (the 64-bit window: guests of any
/// size have room there, and the 32-bit window stays free for passthrough devices whose
/// BARs only decode below 4 GiB).
pub(super) struct PciBus {
    pub(super) root: Arc<PciRoot>,
    bars: AddressAllocator,
}

#[derive(Debug, thiserror::Error)]
pub enum PciAttachError {
    #[error("no room for another BAR in the PCI window: {0}")]
    BarSpace(vm_allocator::Error),
    #[error("{0}")]
    Function(#[from] crate::devices::virtio::pci::VirtioPciError),
    #[error("{0}")]
    Bus(#[from] crate::devices::pci::PciRootError),
}

/// The port the configuration mechanism's CONFIG_ADDRESS register sits at.
const PCI_CONFIG_PORT: u64 = 0xcf8;

impl DeviceManager {
    /// Attaches a PCI root complex with its host bridge, for a guest of `mem_bytes` of RAM
    /// (the 64-bit BAR window starts above it).
    pub fn attach_pci_root(&mut self, mem_bytes: u64) -> Result<(), DeviceManagerError> {
        let root = Arc::new(PciRoot::new());
        let mmio64 = pci_mmio64_window(mem_bytes);
        let bars = AddressAllocator::new(mmio64.0, mmio64.1)
            .map_err(|e| DeviceManagerError::Pci(PciAttachError::BarSpace(e)))?;
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
        self.pci = Some(PciBus { root, bars });
        Ok(())
    }

    /// virtio-pci: a function in the next free slot with BAR 0 in the 64-bit window, one
    /// MSI-X vector (a KVM route and irqfd) per queue plus one for configuration changes;
    /// the function registers its queue notifications wherever the guest decodes BAR 0.
    pub(super) fn connect_pci(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        label: &str,
        device: Arc<Mutex<dyn VirtioDevice>>,
        transport_evts: Vec<EventFd>,
    ) -> Result<VirtioPlacement, DeviceManagerError> {
        let queues = transport_evts.len();
        let mut vectors: Vec<Box<dyn VectorSink>> = Vec::with_capacity(queues + 1);
        for _ in 0..=queues {
            vectors.push(Box::new(vm.msi_vector(label)?));
        }
        let Some(bus) = self.pci.as_mut() else {
            unreachable!("connect_pci is only called with a PCI bus");
        };
        let range = bus
            .bars
            .allocate(BAR_SIZE, BAR_SIZE, AllocPolicy::FirstMatch)
            .map_err(|e| DeviceManagerError::Pci(PciAttachError::BarSpace(e)))?;
        let function = VirtioPciFunction::new(
            device,
            mem.clone(),
            self.work.clone(),
            range.start(),
            vectors,
            transport_evts,
            Some(Notifications::new(vm.handle(), label.to_owned())),
        );
        let added = function
            .map_err(PciAttachError::from)
            .and_then(|f| Ok(bus.root.add(Arc::new(Mutex::new(f)))?));
        match added {
            Ok(device) => Ok(VirtioPlacement::Pci {
                device,
                bar: range.start(),
            }),
            Err(e) => {
                let _ = bus.bars.free(&range);
                Err(DeviceManagerError::Pci(e))
            }
        }
    }
}
