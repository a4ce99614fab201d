//! Every device of the VM goes through here: one call places it (an MMIO window and an
//! interrupt line from [`resources`], or the platform's fixed ports for legacy devices),
//! connects its notifications and interrupt through the VM, puts it on its bus, and
//! records what announces it to the guest (a command-line word, a firmware-table entry)
//! and the event-loop handler that runs it.
//!
//! Adding a device kind (net, vsock, ...) means writing the device and calling
//! [`DeviceManager::attach_virtio`]; a transport other than virtio-mmio (virtio-pci) adds
//! one more attach function here.

pub mod resources;
pub mod virtio_handler;

mod legacy;
#[cfg(target_arch = "x86_64")]
pub mod pci;
pub mod snapshot;

use std::sync::{Arc, Mutex};

use crate::memory::GuestMemoryMmap;

use crate::arch::PlatformDevice;
use crate::devices::bus::{Bus, BusError};
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::mmio::{MMIO_WINDOW, MmioInterrupt, MmioTransport, NOTIFY_OFFSET};
use crate::devices::work_queue::WorkQueue;
use crate::metrics::{DeviceGroup, DeviceRegistration, METRICS};
use crate::vstate::vm::{IoEventFd, Vm, VmError};
use resources::{DeviceResources, DeviceSlot, ResourceError};
use virtio_handler::VirtioHandler;
use vmm_sys_util::eventfd::EventFd;

pub use legacy::LegacyDevices;

use super::Subscriber;

#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    #[error("{0}")]
    Resources(#[from] ResourceError),
    #[error("{0}")]
    Vm(#[from] VmError),
    #[error("cannot place a device on the bus: {0}")]
    Bus(#[from] BusError),
    #[error("cannot create {0}: {1}")]
    Io(&'static str, std::io::Error),
    #[cfg(target_arch = "x86_64")]
    #[error("{0}")]
    Pci(pci::PciAttachError),
    #[error("cannot duplicate an eventfd for {0}: {1}")]
    EventFd(String, std::io::Error),
    #[cfg(target_arch = "x86_64")]
    #[error("{0}")]
    Vfio(#[from] pci::VfioAttachError),
}

/// A virtio device as attached: what it is, where it sits.
struct AttachedVirtio {
    /// How logs name it: `drive "rootfs"`.
    label: String,
    device: Arc<Mutex<dyn VirtioDevice>>,
    placement: VirtioPlacement,
    /// The virtio-mmio transport (None on PCI), whose state a snapshot keeps.
    mmio: Option<Arc<Mutex<MmioTransport>>>,
    /// The mmio transport's queue notifications; a PCI function keeps its own, as they
    /// move with its BAR.
    _notifications: Vec<IoEventFd>,
    /// Keeps the device's own metrics in the flushes while it is attached.
    _metrics: Option<DeviceRegistration>,
}

pub struct DeviceManager {
    pub pio_bus: Bus,
    pub mmio_bus: Bus,
    resources: DeviceResources,
    /// What the firmware tables announce, in attach order.
    platform: Vec<PlatformDevice>,
    /// Kernel command-line words that announce devices, in attach order.
    cmdline: Vec<String>,
    handlers: Vec<Subscriber>,
    virtio: Vec<AttachedVirtio>,
    work: Arc<WorkQueue>,
    pub legacy: Option<LegacyDevices>,
    /// The PCI root complex with `--enable-pci`, where virtio devices then go.
    #[cfg(target_arch = "x86_64")]
    pci: Option<pci::PciBus>,
}

/// Where a virtio device sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtioPlacement {
    /// A virtio-mmio window and its interrupt line.
    Mmio(DeviceSlot),
    /// A PCI function on bus 0 (device number) with BAR 0 where ember placed it.
    Pci { device: u8, bar: u64 },
}

impl std::fmt::Display for VirtioPlacement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VirtioPlacement::Mmio(slot) => write!(f, "at {:#x}, IRQ {}", slot.base, slot.irq),
            VirtioPlacement::Pci { device, bar } => {
                write!(f, "at PCI 0000:00:{device:02x}.0, BAR 0 {bar:#x}, MSI-X")
            }
        }
    }
}

impl DeviceManager {
    pub fn new() -> Result<Self, DeviceManagerError> {
        Ok(DeviceManager {
            pio_bus: Bus::new(),
            mmio_bus: Bus::new(),
            resources: DeviceResources::new(),
            platform: Vec::new(),
            cmdline: Vec::new(),
            handlers: Vec::new(),
            virtio: Vec::new(),
            work: Arc::new(
                WorkQueue::new().map_err(|e| DeviceManagerError::Io("a work queue", e))?,
            ),
            legacy: None,
            #[cfg(target_arch = "x86_64")]
            pci: None,
        })
    }

    /// Attaches `device` with its transport: a PCI function when the VM has a PCI root
    /// complex, else virtio-mmio (see [`Self::connect_mmio`]); then an event-loop handler
    /// for its queue notifications and its metrics (`<kind>_<id>`). `id` is the client's
    /// name for it (`drive_id`), which logs and metrics use.
    pub fn attach_virtio(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        id: &str,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<VirtioPlacement, DeviceManagerError> {
        let (label, queues) = {
            let dev = device.lock().unwrap_or_else(|e| e.into_inner());
            (
                format!("{} {id:?}", kind_label(dev.device_type())),
                dev.queue_max_sizes().len(),
            )
        };
        // The handler waits on these; the transport gets copies to forward notify writes
        // that KVM did not take.
        let mut evts = Vec::with_capacity(queues);
        let mut transport_evts = Vec::with_capacity(queues);
        for _ in 0..queues {
            let evt = EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| DeviceManagerError::Io("a queue notification eventfd", e))?;
            transport_evts.push(
                evt.try_clone()
                    .map_err(|e| DeviceManagerError::EventFd(label.clone(), e))?,
            );
            evts.push(evt);
        }
        #[cfg(target_arch = "x86_64")]
        let on_pci = self.pci.is_some();
        #[cfg(not(target_arch = "x86_64"))]
        let on_pci = false;
        let (placement, notifications, mmio) = if on_pci {
            #[cfg(target_arch = "x86_64")]
            {
                let placement =
                    self.connect_pci(vm, mem, &label, device.clone(), transport_evts)?;
                (placement, Vec::new(), None)
            }
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!()
        } else {
            let slot = self.resources.allocate(MMIO_WINDOW)?;
            match self.connect_mmio(vm, mem, &label, device.clone(), slot, &evts, transport_evts) {
                Ok((regs, transport)) => (VirtioPlacement::Mmio(slot), regs, Some(transport)),
                Err(e) => {
                    self.resources.free(slot);
                    return Err(e);
                }
            }
        };
        self.handlers.push(Arc::new(Mutex::new(VirtioHandler::new(
            label.clone(),
            device.clone(),
            evts,
        ))));
        let metrics = device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .metrics()
            .map(|(kind, group)| {
                METRICS.register_device(DeviceGroup {
                    kind,
                    id: id.to_owned(),
                    group,
                })
            });
        self.virtio.push(AttachedVirtio {
            label,
            device,
            placement,
            mmio,
            _notifications: notifications,
            _metrics: metrics,
        });
        Ok(placement)
    }

    /// virtio-mmio: a 4 KiB window and an interrupt line, an ioeventfd per queue on
    /// QueueNotify (matching the queue index), the interrupt through the VM's interrupt
    /// controller, the `virtio_mmio.device=` word and the firmware table entry. Returns the
    /// notification registrations and the transport.
    #[allow(clippy::too_many_arguments)]
    fn connect_mmio(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        id: &str,
        device: Arc<Mutex<dyn VirtioDevice>>,
        slot: DeviceSlot,
        evts: &[EventFd],
        transport_evts: Vec<EventFd>,
    ) -> Result<(Vec<IoEventFd>, Arc<Mutex<MmioTransport>>), DeviceManagerError> {
        let handle = vm.handle();
        let mut registrations = Vec::with_capacity(evts.len());
        for (index, evt) in evts.iter().enumerate() {
            registrations.push(handle.ioeventfd(
                evt,
                slot.base + NOTIFY_OFFSET,
                Some(index as u32),
                id,
            )?);
        }
        let interrupt = Arc::new(MmioInterrupt::new(vm.interrupt_line(slot.irq, id)?));
        let transport = MmioTransport::new(
            device,
            mem.clone(),
            interrupt,
            transport_evts,
            self.work.clone(),
        );
        let transport = Arc::new(Mutex::new(transport));
        self.mmio_bus
            .insert(transport.clone(), slot.base, slot.len)?;
        // x86_64 kernels without ACPI find the device on the command line; arm64 kernels
        // find it in the device tree alone.
        #[cfg(target_arch = "x86_64")]
        self.cmdline.push(format!(
            "virtio_mmio.device=4K@{:#x}:{}",
            slot.base, slot.irq
        ));
        self.platform.push(PlatformDevice::VirtioMmio {
            base: slot.base,
            len: slot.len,
            irq: slot.irq,
        });
        Ok((registrations, transport))
    }

    /// Kernel command-line words that announce the devices, in attach order.
    pub fn cmdline_words(&self) -> &[String] {
        &self.cmdline
    }

    /// Every device the firmware tables announce, in attach order.
    pub fn platform_devices(&self) -> &[PlatformDevice] {
        &self.platform
    }

    /// The devices' event-loop handlers, for the controller to register (once).
    pub fn take_handlers(&mut self) -> Vec<Subscriber> {
        std::mem::take(&mut self.handlers)
    }

    /// Work vCPUs hand the vmm thread (device resets); the event loop runs it.
    pub fn work_queue(&self) -> Arc<WorkQueue> {
        self.work.clone()
    }

    /// Waits until no device still writes guest memory (the VM pauses).
    pub fn quiesce(&self) {
        for v in &self.virtio {
            v.device.lock().unwrap_or_else(|e| e.into_inner()).quiesce();
        }
    }

    /// Where each virtio device sits, by id, for the log.
    pub fn describe(&self) -> Vec<String> {
        self.virtio
            .iter()
            .map(|v| format!("{} {}", v.label, v.placement))
            .collect()
    }
}

/// What logs call a device of virtio type `device_type`, in the words of the API.
fn kind_label(device_type: u32) -> &'static str {
    use virtio_bindings::virtio_ids::{VIRTIO_ID_BLOCK, VIRTIO_ID_NET, VIRTIO_ID_VSOCK};
    match device_type {
        VIRTIO_ID_BLOCK => "drive",
        VIRTIO_ID_NET => "network interface",
        VIRTIO_ID_VSOCK => "vsock",
        _ => "virtio device",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::{DEVICE_IRQ_FIRST, VIRTIO_MMIO_START};
    use crate::devices::virtio::{ActivateError, VirtioInterrupt};
    use crate::metrics::{BlockMetrics, DeviceCounters};
    #[cfg(target_arch = "x86_64")]
    use crate::vstate::kvm::KvmContext;
    use virtio_queue::Queue;
    use vm_memory::GuestAddress;

    struct TwoQueues(DeviceCounters<BlockMetrics>);

    impl VirtioDevice for TwoQueues {
        fn device_type(&self) -> u32 {
            1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[8, 8]
        }
        fn device_features(&self) -> u64 {
            1 << 32
        }
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            _features: u64,
            _queues: Vec<Queue>,
            _interrupt: Arc<dyn VirtioInterrupt>,
        ) -> Result<(), ActivateError> {
            Ok(())
        }
        fn reset(&mut self) {}
        fn process_queue(&mut self, _index: usize) {}
        fn stop_queue(&mut self, _index: usize) {}
        fn metrics(&self) -> Option<(&'static str, Arc<dyn crate::metrics::Group>)> {
            Some(("twoqueues", self.0.group()))
        }
    }

    impl TwoQueues {
        fn new() -> Arc<Mutex<Self>> {
            Arc::new(Mutex::new(TwoQueues(DeviceCounters::new(&METRICS.block))))
        }
    }

    #[test]
    fn one_attach_call_places_connects_and_announces_a_device() {
        let vm = Vm::with_irqfds_for_tests();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut dm = DeviceManager::new().unwrap();
        let mmio = |p: VirtioPlacement| match p {
            VirtioPlacement::Mmio(slot) => slot,
            other => panic!("{other:?}"),
        };
        let a = mmio(dm.attach_virtio(&vm, &mem, "a", TwoQueues::new()).unwrap());
        let b = mmio(dm.attach_virtio(&vm, &mem, "b", TwoQueues::new()).unwrap());
        assert_eq!((a.base, a.irq), (VIRTIO_MMIO_START, DEVICE_IRQ_FIRST));
        assert_eq!(
            (b.base, b.irq),
            (VIRTIO_MMIO_START + 0x1000, DEVICE_IRQ_FIRST + 1)
        );
        // x86_64 kernels may find them on the command line; arm64's use the device tree.
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            dm.cmdline_words(),
            [
                format!("virtio_mmio.device=4K@{:#x}:{}", a.base, a.irq),
                format!("virtio_mmio.device=4K@{:#x}:{}", b.base, b.irq),
            ]
        );
        #[cfg(not(target_arch = "x86_64"))]
        assert!(dm.cmdline_words().is_empty());
        assert_eq!(
            dm.platform_devices()[1],
            PlatformDevice::VirtioMmio {
                base: b.base,
                len: 0x1000,
                irq: b.irq
            }
        );
        let handlers = dm.take_handlers();
        assert_eq!(handlers.len(), 2);
        // The transport answers on the bus at its window: the magic value.
        let mut magic = [0u8; 4];
        assert!(dm.mmio_bus.read(b.base, &mut magic));
        assert_eq!(&magic, b"virt");
        // Each queue got its own ioeventfd: registering queue 1's again is refused.
        assert!(
            vm.ioeventfd(a.base + NOTIFY_OFFSET, Some(1), "again")
                .is_err()
        );
        // Each device's metrics are flushed under its own name while it is attached.
        let flushed = METRICS.flush_json();
        assert!(flushed["twoqueues_a"]["read_count"].is_u64(), "{flushed:?}");
        assert!(flushed["twoqueues_b"].is_object());
        drop(dm);
        let flushed = METRICS.flush_json();
        assert!(flushed.get("twoqueues_a").is_none(), "{flushed:?}");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn with_a_pci_bus_virtio_devices_become_functions_whose_notifications_follow_bar_0() {
        let mut vm = Vm::new(&KvmContext::open().unwrap()).unwrap();
        vm.create_interrupt_controllers(crate::config::Irqchip::Split)
            .unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut dm = DeviceManager::new().unwrap();
        dm.attach_pci_root(1 << 20).unwrap();
        // Ids of their own: the metrics registry is shared with the other tests.
        let a = dm
            .attach_virtio(&vm, &mem, "pci-a", TwoQueues::new())
            .unwrap();
        let b = dm
            .attach_virtio(&vm, &mem, "pci-b", TwoQueues::new())
            .unwrap();
        let bar = 1 << 32;
        assert_eq!(a, VirtioPlacement::Pci { device: 1, bar });
        assert_eq!(
            b,
            VirtioPlacement::Pci {
                device: 2,
                bar: bar + crate::devices::virtio::pci::BAR_SIZE
            }
        );
        // No command-line words and no virtio-mmio entries: PCI enumeration finds them.
        assert!(dm.cmdline_words().is_empty());
        assert_eq!(dm.platform_devices().len(), 1);
        assert_eq!(dm.take_handlers().len(), 2);
        let root = dm.pci.as_ref().unwrap().root.clone();
        let mut id = [0u8; 4];
        root.config_read(0, 1, 0, 0, &mut id);
        assert_eq!(id, [0xf4, 0x1a, 0x41, 0x10], "0x1040 + type 1");
        // KVM refuses a second ioeventfd at an address that has one.
        let notify = |base: u64| base + 0x3000 + 4;
        let taken = |addr: u64| vm.ioeventfd(addr, None, "probe").is_err();
        assert!(!taken(notify(bar)), "no notifications before memory decode");
        root.config_write(0, 1, 0, 4, &2u16.to_le_bytes());
        assert!(
            taken(notify(bar)),
            "decode on: queue 1's notification is in KVM"
        );
        // The guest moves BAR 0: the notifications move with it.
        let moved = bar + (1 << 20);
        root.config_write(0, 1, 0, 0x10, &(moved as u32 | 4).to_le_bytes());
        root.config_write(0, 1, 0, 0x14, &((moved >> 32) as u32).to_le_bytes());
        assert!(!taken(notify(bar)));
        assert!(taken(notify(moved)));
        // Decode off: none left.
        root.config_write(0, 1, 0, 4, &0u16.to_le_bytes());
        assert!(!taken(notify(moved)));
    }
}
