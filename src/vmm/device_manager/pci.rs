//! The PCI root complex (`--enable-pci`): its configuration mechanisms and BAR windows on
//! the buses, and its entry in the firmware tables.

use std::sync::{Arc, Mutex};

use crate::memory::GuestMemoryMmap;
use vm_allocator::{AddressAllocator, AllocPolicy};
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceManager, DeviceManagerError, VirtioPlacement};
use crate::arch::layout::{
    PCI_ECAM_LEN, PCI_ECAM_START, PCI_INTX_GSI_FIRST, PCI_INTX_GSI_LAST, PCI_MMIO32_END,
    PCI_MMIO32_START, pci_mmio64_window,
};
use crate::arch::{PciIntx, PciWindows, PlatformDevice};
use crate::config::VfioConfig;
use crate::devices::pci::BarKind;
use crate::devices::pci::config_access::{EcamWindow, PORT_IO_LEN, PortIoConfig};
use crate::devices::pci::msix::VectorSink;
use crate::devices::pci::root::{BarWindow, PciRoot};
use crate::devices::vfio::{
    GatedVector, HostContainer, IntxLine, PassthroughVector, VfioPciFunction, map_guest_memory,
};
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::pci::{BAR_SIZE, Notifications, VirtioPciFunction};
use crate::vstate::vm::{LevelIrq, Vm};

/// The root complex and where its functions' BARs go (the 64-bit window: guests of any
/// size have room there, and the 32-bit window stays free for passthrough devices whose
/// BARs only decode below 4 GiB).
pub(super) struct PciBus {
    pub(super) root: Arc<PciRoot>,
    bars: AddressAllocator,
    /// The 32-bit window, for passed-through BARs that only decode below 4 GiB.
    bars32: AddressAllocator,
    /// The INTx GSIs not yet wired to a function, lowest first.
    intx_gsis: Vec<u32>,
    /// The wired ones' connections to the interrupt controller.
    intx_lines: Vec<LevelIrq>,
    /// The IOMMU address space of the passed-through functions; after `root` so the
    /// functions (which hold the container too) go first.
    _vfio: Option<HostContainer>,
}

#[derive(Debug, thiserror::Error)]
pub enum VfioAttachError {
    #[error(
        "VFIO device {0:?}: passed-through functions sit on the PCI bus; start ember with \
         --enable-pci"
    )]
    NeedsPci(String),
    #[error("VFIO device {id:?}: {source}")]
    Host {
        id: String,
        source: crate::devices::vfio::VfioHostError,
    },
    #[error("VFIO: {0}")]
    Dma(std::io::Error),
    #[error("VFIO device {id:?}: {source}")]
    Function {
        id: String,
        source: crate::devices::vfio::VfioFunctionError,
    },
    #[error("VFIO device {id:?}: {source}")]
    Bus {
        id: String,
        source: crate::devices::pci::PciRootError,
    },
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
        self.resources
            .take_irqs(PCI_INTX_GSI_FIRST, PCI_INTX_GSI_LAST)?;
        let mmio32 = (PCI_MMIO32_START, PCI_MMIO32_END - PCI_MMIO32_START);
        let bars32 = AddressAllocator::new(mmio32.0, mmio32.1)
            .map_err(|e| DeviceManagerError::Pci(PciAttachError::BarSpace(e)))?;
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
        self.pci = Some(PciBus {
            root,
            bars,
            bars32,
            intx_gsis: (PCI_INTX_GSI_FIRST..=PCI_INTX_GSI_LAST).collect(),
            intx_lines: Vec::new(),
            _vfio: None,
        });
        Ok(())
    }

    /// Passes `devices` through: opens them (each host problem named before anything is
    /// mapped), maps guest RAM for their DMA, and puts each on the bus with its memory BARs
    /// in the windows (32-bit BARs in the 32-bit one), one MSI-X vector per vector it has,
    /// and its INTx pin on a GSI of its own while there is one.
    pub fn attach_vfio(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        devices: &[VfioConfig],
    ) -> Result<(), DeviceManagerError> {
        let Some(first) = devices.first() else {
            return Ok(());
        };
        let Some(bus) = self.pci.as_mut() else {
            return Err(VfioAttachError::NeedsPci(first.id.clone()).into());
        };
        let host = |id: &str| {
            let id = id.to_owned();
            move |source| VfioAttachError::Host { id, source }
        };
        let container = HostContainer::open(&vm.handle()).map_err(host(&first.id))?;
        let mut opened = Vec::with_capacity(devices.len());
        for d in devices {
            opened.push((d, container.open_function(d.sbdf).map_err(host(&d.id))?));
        }
        map_guest_memory(&container, mem).map_err(VfioAttachError::Dma)?;
        for (d, function) in opened {
            let label = format!("VFIO device {:?} ({})", d.id, d.sbdf);
            let (bars64, bars32, gsis) = (&mut bus.bars, &mut bus.bars32, &mut bus.intx_gsis);
            let place = |kind: BarKind, size: u64| {
                let window = match kind {
                    BarKind::Memory64 { .. } => &mut *bars64,
                    _ => &mut *bars32,
                };
                window
                    .allocate(size, size, AllocPolicy::FirstMatch)
                    .map(|r| r.start())
                    .map_err(|e| e.to_string())
            };
            let vectors = |n: usize| {
                (0..n)
                    .map(|_| {
                        let vector = vm.msi_vector(&label).map_err(|e| e.to_string())?;
                        let eventfd = vector.eventfd().try_clone().map_err(|e| e.to_string())?;
                        Ok(PassthroughVector {
                            sink: Box::new(GatedVector(vector)),
                            eventfd,
                        })
                    })
                    .collect::<Result<Vec<_>, String>>()
            };
            let mut wired: Option<(u8, u32, LevelIrq)> = None;
            let intx = |pin: u8| {
                let line = wire_intx(vm, &label, gsis.first().copied())?;
                gsis.remove(0);
                wired = Some((pin, line.0.gsi, line.1));
                Some(line.0)
            };
            let function = VfioPciFunction::new(
                &label,
                Arc::new(function),
                Box::new(vm.handle()),
                place,
                vectors,
                intx,
            )
            .map_err(|source| VfioAttachError::Function {
                id: d.id.clone(),
                source,
            })?;
            let slot = bus
                .root
                .add(Arc::new(Mutex::new(function)))
                .map_err(|source| VfioAttachError::Bus {
                    id: d.id.clone(),
                    source,
                })?;
            match wired {
                Some((pin, gsi, line)) => {
                    log::info!(
                        "{label} passed through as PCI 00:{slot:02x}.0, INT{} on GSI {gsi}",
                        char::from(b'A' + pin - 1)
                    );
                    if let LevelIrq::Split(source) = &line {
                        self.handlers.push(source.clone());
                    }
                    bus.intx_lines.push(line);
                    self.platform
                        .push(PlatformDevice::PciIntx(PciIntx { slot, pin, gsi }));
                }
                None => log::info!("{label} passed through as PCI 00:{slot:02x}.0"),
            }
        }
        bus._vfio = Some(container);
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

/// Connects a passed-through function's INTx to `gsi` (None: every INTx GSI is taken, and
/// the guest sees no pin). A function without INTx still works through MSI or MSI-X.
fn wire_intx(vm: &Vm, label: &str, gsi: Option<u32>) -> Option<(IntxLine, LevelIrq)> {
    let Some(gsi) = gsi else {
        log::warn!(
            "{label}: no INTx line left (GSIs {PCI_INTX_GSI_FIRST}-{PCI_INTX_GSI_LAST} are \
             taken): the guest sees no interrupt pin, so its driver must use MSI or MSI-X"
        );
        return None;
    };
    let wire = || -> Result<(IntxLine, LevelIrq), String> {
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string());
        let (trigger, resample) = (eventfd()?, eventfd()?);
        let level = vm
            .level_irq(gsi, &trigger, &resample, label)
            .map_err(|e| e.to_string())?;
        Ok((
            IntxLine {
                gsi,
                trigger,
                resample,
            },
            level,
        ))
    };
    match wire() {
        Ok(wired) => Some(wired),
        Err(e) => {
            log::warn!(
                "{label}: cannot wire its INTx line to GSI {gsi}: {e}; the guest sees no pin"
            );
            None
        }
    }
}
