//! The KVM VM and what is registered with it: memory slots, interrupt controllers, irqfds
//! and ioeventfds.
//!
//! Registrations are handles ([`Irqfd`], [`IoEventFd`]) that undo themselves when dropped,
//! and memory slots get their numbers from an allocator, so devices come and go without
//! anyone computing a number from an index. Every handle and the [`Vm`] share one
//! [`VmShared`], which holds the VM fd and, after it, the guest memory registered in its
//! slots: the fd is closed before the memory it maps is unmapped, however the VM ends.

use std::sync::{Arc, Mutex};

use crate::memory::GuestMemoryMmap;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{DeviceFd, IoEventAddress, NoDatamatch, VcpuFd, VmFd};
use vm_allocator::IdAllocator;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MmapRegion};
use vmm_sys_util::eventfd::EventFd;

use kvm_bindings::{KvmIrqRouting, kvm_msi};

use crate::arch;
use crate::config::Irqchip;
use crate::devices::legacy::Line;
use crate::devices::legacy::ioapic::{EventfdLevelSource, Ioapic, IoapicPin, MsiSink};
use crate::vstate::gsi_routes::{GsiRoutes, GsiRoutesError, MsiMessage};
use crate::vstate::kvm::KvmContext;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot create the KVM VM: {0}")]
    Create(kvm_ioctls::Error),
    #[error("{0}")]
    Arch(#[from] arch::ArchVmError),
    #[error("guest memory needs {needed} memory slots, KVM offers {available}")]
    TooManySlots { needed: usize, available: usize },
    #[error("cannot register guest memory slot {slot}: {source}")]
    MemorySlot {
        slot: u32,
        source: kvm_ioctls::Error,
    },
    #[error(
        "guest memory must be registered before the interrupt controllers are created (a \
         slot added after KVM's irqchip costs milliseconds)"
    )]
    MemoryAfterIrqchip,
    #[error("cannot create KVM's VFIO device: {0}")]
    VfioDevice(kvm_ioctls::Error),
    #[error("cannot create vCPU {0}: {1}")]
    CreateVcpu(u8, kvm_ioctls::Error),
    #[cfg(target_arch = "aarch64")]
    #[error("cannot ask KVM for its preferred vCPU target: {0}")]
    PreferredTarget(kvm_ioctls::Error),
    #[error("cannot create an eventfd for {0}: {1}")]
    EventFd(&'static str, std::io::Error),
    #[error("{what}: {source}")]
    MsiGsi {
        what: String,
        source: GsiRoutesError,
    },
    #[error("cannot connect {what} to interrupt {gsi}: {source}")]
    Irqfd {
        what: String,
        gsi: u32,
        source: kvm_ioctls::Error,
    },
    #[error("cannot register {what}'s notification at {addr:#x} with KVM: {source}")]
    IoEvent {
        what: String,
        addr: u64,
        source: kvm_ioctls::Error,
    },
}

/// The VM fd and the memory its slots map, in that order: fields drop in declaration
/// order, so the fd (and with it KVM's use of the memory) goes first.
pub struct VmShared {
    fd: VmFd,
    memory: Mutex<Vec<GuestMemoryMmap>>,
    /// Memory slot numbers: guest RAM's, then device memory mapped while the VM runs.
    slots: Mutex<IdAllocator>,
    /// How many slots KVM offers.
    nr_slots: usize,
    /// KVM's GSI routing table, which every route change replaces whole.
    routes: Mutex<GsiRoutes>,
    /// Guest RAM's slots: (guest address, length, slot), for the dirty log.
    ram_slots: Mutex<Vec<(u64, u64, u32)>>,
}

impl VmShared {
    fn slots(&self) -> std::sync::MutexGuard<'_, IdAllocator> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn allocate_slot(&self, needed: usize) -> Result<u32, VmError> {
        self.slots()
            .allocate_id()
            .map_err(|_| VmError::TooManySlots {
                needed,
                available: self.nr_slots,
            })
    }

    fn routes(&self) -> std::sync::MutexGuard<'_, GsiRoutes> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pushes `routes` (held locked by the caller, so two changes cannot interleave).
    fn push_routes(&self, routes: &GsiRoutes) -> std::io::Result<()> {
        let entries = routes.table();
        let mut table = KvmIrqRouting::new(entries.len())
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        table.as_mut_slice().copy_from_slice(&entries);
        self.fd
            .set_gsi_routing(&table)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

pub struct Vm {
    shared: Arc<VmShared>,
    /// ember's I/O APIC, with the split irqchip.
    ioapic: Option<Arc<Mutex<Ioapic>>>,
    /// The interrupt controllers as created (None before): memory comes first (see
    /// [`Vm::create_interrupt_controllers`]).
    irqchip: Option<(Irqchip, arch::InterruptControllers)>,
}

impl Vm {
    /// Creates the VM with what the architecture needs before any vCPU exists.
    pub fn new(kvm: &KvmContext) -> Result<Self, VmError> {
        let fd = kvm.kvm.create_vm().map_err(VmError::Create)?;
        arch::setup_vm(&fd)?;
        let nr_slots = kvm.kvm.get_nr_memslots();
        let last = u32::try_from(nr_slots).unwrap_or(u32::MAX).max(1) - 1;
        let slots = IdAllocator::new(0, last).map_err(|_| VmError::TooManySlots {
            needed: 1,
            available: nr_slots,
        })?;
        Ok(Vm {
            shared: Arc::new(VmShared {
                fd,
                memory: Mutex::new(Vec::new()),
                slots: Mutex::new(slots),
                nr_slots,
                routes: Mutex::new(GsiRoutes::split_irqchip()),
                ram_slots: Mutex::new(Vec::new()),
            }),
            ioapic: None,
            irqchip: None,
        })
    }

    /// Creates the in-kernel interrupt controllers (and the arch's timers). Call after the
    /// memory slots are registered: with an in-kernel irqchip present, each slot change
    /// waits for KVM to synchronise, which measured at several milliseconds per slot
    /// (docs/performance.md).
    pub fn create_interrupt_controllers(&mut self, irqchip: Irqchip) -> Result<(), VmError> {
        let (irqchip, controllers) = arch::create_interrupt_controllers(&self.shared.fd, irqchip)?;
        self.irqchip = Some((irqchip, controllers));
        #[cfg(target_arch = "x86_64")]
        if irqchip == Irqchip::Kernel {
            *self.shared.routes() = GsiRoutes::in_kernel_irqchip();
        }
        if irqchip == Irqchip::Split {
            self.ioapic = Some(Arc::new(Mutex::new(Ioapic::new(
                0,
                Box::new(KvmMsiSink(self.shared.clone())),
            ))));
        }
        Ok(())
    }

    /// The KVM VM itself, for saving and restoring the state KVM keeps of it.
    pub fn fd(&self) -> &kvm_ioctls::VmFd {
        &self.shared.fd
    }

    /// The interrupt controllers as created (on arm64 "kernel" becomes the GIC KVM had).
    pub fn irqchip(&self) -> Option<Irqchip> {
        self.irqchip.as_ref().map(|(i, _)| *i)
    }

    /// Finishes the interrupt controllers once every vCPU exists (arm64's vGIC sizes its
    /// per-vCPU state then).
    pub fn finish_interrupt_controllers(&self) -> Result<(), VmError> {
        if let Some((_, controllers)) = &self.irqchip {
            arch::finish_interrupt_controllers(controllers)?;
        }
        Ok(())
    }

    /// KVM's preferred vCPU target on this host, which every vCPU is initialised with.
    #[cfg(target_arch = "aarch64")]
    pub fn preferred_target(&self) -> Result<kvm_bindings::kvm_vcpu_init, VmError> {
        let mut init = kvm_bindings::kvm_vcpu_init::default();
        self.shared
            .fd
            .get_preferred_target(&mut init)
            .map_err(VmError::PreferredTarget)?;
        Ok(init)
    }

    /// ember's I/O APIC (split irqchip), for the MMIO bus and the vCPUs' EOIs.
    pub fn ioapic(&self) -> Option<Arc<Mutex<Ioapic>>> {
        self.ioapic.clone()
    }

    /// Interrupt line `gsi` for a device: a pin of ember's I/O APIC, or with the in-kernel
    /// irqchip an irqfd.
    pub fn interrupt_line(&self, gsi: u32, what: &str) -> Result<Box<dyn Line>, VmError> {
        match &self.ioapic {
            Some(ioapic) => Ok(Box::new(IoapicPin::new(ioapic.clone(), gsi))),
            None => Ok(Box::new(self.irqfd(gsi, what)?)),
        }
    }

    /// A level-triggered line that a source drives through eventfds, as the host kernel
    /// drives a passed-through function's INTx: `trigger` asserts it, and the guest's EOI
    /// releases it and signals `resample` (the source asserts again if it still needs
    /// service). With the in-kernel irqchip KVM does both (a resampling irqfd); with the
    /// split irqchip ember's I/O APIC does, from an event-loop subscriber.
    pub fn level_irq(
        &self,
        gsi: u32,
        trigger: &EventFd,
        resample: &EventFd,
        what: &str,
    ) -> Result<LevelIrq, VmError> {
        let clone = |e: &EventFd| {
            e.try_clone()
                .map_err(|e| VmError::EventFd("a level-triggered line", e))
        };
        match &self.ioapic {
            Some(ioapic) => {
                ioapic
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .set_resample(gsi as usize, clone(resample)?);
                Ok(LevelIrq::Split(Arc::new(Mutex::new(EventfdLevelSource {
                    what: what.to_owned(),
                    trigger: clone(trigger)?,
                    pin: IoapicPin::new(ioapic.clone(), gsi),
                }))))
            }
            None => {
                self.shared
                    .fd
                    .register_irqfd_with_resample(trigger, resample, gsi)
                    .map_err(|source| VmError::Irqfd {
                        what: what.to_owned(),
                        gsi,
                        source,
                    })?;
                Ok(LevelIrq::Kernel(Irqfd {
                    vm: self.shared.clone(),
                    evt: clone(trigger)?,
                    gsi,
                }))
            }
        }
    }

    /// Registers every region of `mem` in a slot of its own, optionally with dirty logging.
    /// The VM keeps `mem` mapped for as long as its fd is open.
    pub fn register_memory(
        &mut self,
        mem: &GuestMemoryMmap,
        track_dirty_pages: bool,
    ) -> Result<(), VmError> {
        if self.irqchip.is_some() {
            return Err(VmError::MemoryAfterIrqchip);
        }
        let flags = if track_dirty_pages {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        // Keep the mapping alive before KVM learns about it.
        self.shared
            .memory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(mem.clone());
        for region in mem.iter() {
            let slot = self.shared.allocate_slot(mem.num_regions())?;
            let desc = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags,
            };
            // SAFETY: the region is mapped for at least as long as the VM fd is open: a
            // clone of `mem` sits in `VmShared::memory`, which drops after `VmShared::fd`.
            unsafe { self.shared.fd.set_user_memory_region(desc) }
                .map_err(|source| VmError::MemorySlot { slot, source })?;
            self.shared
                .ram_slots
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((region.start_addr().0, region.len(), slot));
        }
        Ok(())
    }

    /// KVM's dirty log of the guest RAM region at `gpa` (one bit per page written by the
    /// guest since the last call), which it clears as it answers. Only for memory
    /// registered with dirty page tracking.
    pub fn dirty_log(&self, gpa: u64) -> std::io::Result<Vec<u64>> {
        let found = self
            .shared
            .ram_slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(start, _, _)| *start == gpa)
            .copied();
        let (_, len, slot) = found.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no guest RAM slot starts at {gpa:#x}"),
            )
        })?;
        self.shared
            .fd
            .get_dirty_log(slot, len as usize)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    pub fn create_vcpu(&self, index: u8) -> Result<VcpuFd, VmError> {
        self.shared
            .fd
            .create_vcpu(u64::from(index))
            .map_err(|e| VmError::CreateVcpu(index, e))
    }

    /// An interrupt line: writing to its eventfd raises interrupt `gsi` in the guest.
    pub fn irqfd(&self, gsi: u32, what: &str) -> Result<Irqfd, VmError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::EventFd("an irqfd", e))?;
        self.shared
            .fd
            .register_irqfd(&evt, gsi)
            .map_err(|source| VmError::Irqfd {
                what: what.to_owned(),
                gsi,
                source,
            })?;
        Ok(Irqfd {
            vm: self.shared.clone(),
            evt,
            gsi,
        })
    }

    /// An MSI vector for a device: a GSI of its own with an irqfd on it. Its route (the
    /// message the guest programs) is set with [`MsiVector::route`]; until then a trigger
    /// delivers nothing.
    pub fn msi_vector(&self, what: &str) -> Result<MsiVector, VmError> {
        let gsi = self
            .shared
            .routes()
            .allocate()
            .map_err(|source| VmError::MsiGsi {
                what: what.to_owned(),
                source,
            })?;
        let irqfd = match self.irqfd(gsi, what) {
            Ok(irqfd) => irqfd,
            Err(e) => {
                self.shared.routes().free(gsi);
                return Err(e);
            }
        };
        Ok(MsiVector {
            irqfd,
            connected: Mutex::new(true),
        })
    }

    /// A guest write of `datamatch` (any value when None) to MMIO address `addr` signals
    /// the returned eventfd inside KVM, without a VM exit.
    pub fn ioeventfd(
        &self,
        addr: u64,
        datamatch: Option<u32>,
        what: &str,
    ) -> Result<IoEventFd, VmError> {
        let evt =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::EventFd("an ioeventfd", e))?;
        self.handle().ioeventfd(&evt, addr, datamatch, what)
    }

    /// What a device needs to change its own registrations while the VM runs.
    pub fn handle(&self) -> VmHandle {
        VmHandle(self.shared.clone())
    }
}

/// A device's hold on the VM, to move its registrations (a BAR the guest moved).
#[derive(Clone)]
pub struct VmHandle(Arc<VmShared>);

impl VmHandle {
    /// Like [`Vm::ioeventfd`], for an eventfd the caller already has (and keeps waiting
    /// on): the same eventfd can be registered at a new address when the old registration
    /// is dropped.
    pub fn ioeventfd(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: Option<u32>,
        what: &str,
    ) -> Result<IoEventFd, VmError> {
        let evt = evt
            .try_clone()
            .map_err(|e| VmError::EventFd("an ioeventfd", e))?;
        let at = IoEventAddress::Mmio(addr);
        let r = match datamatch {
            Some(v) => self.0.fd.register_ioevent(&evt, &at, v),
            None => self.0.fd.register_ioevent(&evt, &at, NoDatamatch),
        };
        r.map_err(|source| VmError::IoEvent {
            what: what.to_owned(),
            addr,
            source,
        })?;
        Ok(IoEventFd {
            vm: self.0.clone(),
            evt,
            addr,
            datamatch,
        })
    }
}

impl VmHandle {
    /// Maps `mapping` (device memory: a passed-through BAR) into the guest at `gpa`, where
    /// guest accesses reach it without a VM exit, until the returned slot is dropped. Unlike
    /// guest RAM this happens while the VM runs (the guest places BARs): with the split
    /// irqchip a slot change is cheap.
    pub fn map_memory(
        &self,
        gpa: u64,
        mapping: Arc<MmapRegion<()>>,
    ) -> Result<MemorySlot, VmError> {
        let slot = self.0.allocate_slot(1)?;
        let desc = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: gpa,
            memory_size: mapping.size() as u64,
            userspace_addr: mapping.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: `mapping` stays mapped while the slot exists: the returned MemorySlot
        // holds it and removes the slot before letting it go.
        if let Err(source) = unsafe { self.0.fd.set_user_memory_region(desc) } {
            let _ = self.0.slots().free_id(slot);
            return Err(VmError::MemorySlot { slot, source });
        }
        Ok(MemorySlot {
            vm: self.0.clone(),
            slot,
            gpa,
            mapping,
        })
    }

    /// KVM's VFIO pseudo-device, which tells KVM about passed-through groups (so it can
    /// keep DMA coherent where the IOMMU does not).
    pub fn create_vfio_device(&self) -> Result<DeviceFd, VmError> {
        let mut device = kvm_bindings::kvm_create_device {
            type_: kvm_bindings::kvm_device_type_KVM_DEV_TYPE_VFIO,
            fd: 0,
            flags: 0,
        };
        self.0
            .fd
            .create_device(&mut device)
            .map_err(VmError::VfioDevice)
    }
}

/// Host memory mapped into the guest by [`VmHandle::map_memory`]; dropping it removes the
/// slot, then unmaps the memory if nothing else holds it.
pub struct MemorySlot {
    vm: Arc<VmShared>,
    slot: u32,
    gpa: u64,
    mapping: Arc<MmapRegion<()>>,
}

impl MemorySlot {
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    pub fn size(&self) -> u64 {
        self.mapping.size() as u64
    }
}

impl Drop for MemorySlot {
    fn drop(&mut self) {
        let desc = kvm_userspace_memory_region {
            slot: self.slot,
            guest_phys_addr: self.gpa,
            memory_size: 0,
            userspace_addr: self.mapping.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: a size of 0 deletes the slot; KVM no longer touches the mapping after.
        // Fails only when the VM is gone, which removed the slot anyway.
        let _ = unsafe { self.vm.fd.set_user_memory_region(desc) };
        let _ = self.vm.slots().free_id(self.slot);
    }
}

/// The I/O APIC's messages go to KVM: `KVM_SIGNAL_MSI` for interrupts, and the routing
/// table that tells KVM which vectors' EOIs to report (split irqchip).
struct KvmMsiSink(Arc<VmShared>);

impl MsiSink for KvmMsiSink {
    fn signal_msi(&self, address: u64, data: u32) -> std::io::Result<()> {
        let (address_lo, address_hi) = halves(address);
        let msi = kvm_msi {
            address_lo,
            address_hi,
            data,
            ..Default::default()
        };
        // 0 (not delivered: the destination's APIC is off) is not an error of ours.
        self.0
            .fd
            .signal_msi(msi)
            .map(|_| ())
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    fn set_routes(&self, routes: &[(u32, u64, u32)]) -> std::io::Result<()> {
        let pins: Vec<(u32, MsiMessage)> = routes
            .iter()
            .map(|&(gsi, address, data)| (gsi, MsiMessage { address, data }))
            .collect();
        let mut table = self.0.routes();
        table.set_pin_messages(&pins);
        self.0.push_routes(&table)
    }
}

/// An MSI address as KVM's structures take it: low and high 32 bits.
fn halves(address: u64) -> (u32, u32) {
    (address as u32, (address >> 32) as u32)
}

#[cfg(test)]
impl Vm {
    /// A VM whose interrupt controller takes irqfds, for tests: KVM's in-kernel irqchip on
    /// x86_64; on arm64 the vGIC, initialised with one vCPU (it takes irqfds only then).
    pub fn with_irqfds_for_tests() -> Vm {
        let mut vm = Vm::new(&crate::vstate::kvm::KvmContext::open().unwrap()).unwrap();
        vm.create_interrupt_controllers(Irqchip::Kernel).unwrap();
        #[cfg(target_arch = "aarch64")]
        {
            // The vCPU lives with the VM; its fd is not needed.
            let fd = vm.create_vcpu(0).unwrap();
            let target = vm.preferred_target().unwrap();
            crate::arch::init_vcpu(&fd, 0, &target).unwrap();
            vm.finish_interrupt_controllers().unwrap();
        }
        vm
    }
}

/// A line from [`Vm::level_irq`].
pub enum LevelIrq {
    /// KVM's resampling irqfd, unregistered when dropped.
    Kernel(Irqfd),
    /// ember's I/O APIC pin, raised by this subscriber on the event loop.
    Split(Arc<Mutex<EventfdLevelSource>>),
}

/// A registered irqfd; dropping it disconnects it from the VM.
pub struct Irqfd {
    vm: Arc<VmShared>,
    evt: EventFd,
    gsi: u32,
}

impl Irqfd {
    /// Raises the interrupt.
    pub fn trigger(&self) -> std::io::Result<()> {
        self.evt.write(1)
    }

    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

impl Drop for Irqfd {
    fn drop(&mut self) {
        // Fails only if the VM is already gone, which undid the registration anyway.
        let _ = self.vm.fd.unregister_irqfd(&self.evt, self.gsi);
    }
}

/// An MSI or MSI-X vector: an irqfd on a GSI whose KVM route is the message the guest
/// programmed. Dropping it disconnects the irqfd and removes the route.
pub struct MsiVector {
    irqfd: Irqfd,
    /// Whether the irqfd is connected to its GSI. A source that signals the eventfd itself
    /// (a VFIO device) is held off while the guest masks the vector by disconnecting it:
    /// the eventfd keeps counting, and KVM delivers what is pending when it is connected
    /// again.
    connected: Mutex<bool>,
}

impl MsiVector {
    /// Routes the vector to `message`, or (None) nowhere, pushing KVM's table if this
    /// changes it. Every route change replaces KVM's whole table, so vCPUs reprogramming
    /// vectors are serialised on the table's lock.
    pub fn route(&self, message: Option<MsiMessage>) -> std::io::Result<()> {
        let vm = &self.irqfd.vm;
        let mut routes = vm.routes();
        if routes.set_msi(self.irqfd.gsi, message) {
            vm.push_routes(&routes)?;
        }
        Ok(())
    }

    /// Sends the message the vector is routed to.
    pub fn trigger(&self) -> std::io::Result<()> {
        self.irqfd.trigger()
    }

    pub fn gsi(&self) -> u32 {
        self.irqfd.gsi
    }

    /// The irqfd, for a source that signals it itself (a VFIO device).
    pub fn eventfd(&self) -> &EventFd {
        self.irqfd.eventfd()
    }

    /// Connects the irqfd to its GSI or disconnects it (see [`MsiVector::connected`]).
    /// Connecting an eventfd that was signalled meanwhile delivers that interrupt at once.
    pub fn connect(&self, on: bool) -> std::io::Result<()> {
        let mut connected = self.connected.lock().unwrap_or_else(|e| e.into_inner());
        if *connected == on {
            return Ok(());
        }
        let fd = &self.irqfd.vm.fd;
        let r = if on {
            fd.register_irqfd(&self.irqfd.evt, self.irqfd.gsi)
        } else {
            fd.unregister_irqfd(&self.irqfd.evt, self.irqfd.gsi)
        };
        r.map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        *connected = on;
        Ok(())
    }
}

impl Drop for MsiVector {
    fn drop(&mut self) {
        let vm = &self.irqfd.vm;
        let mut routes = vm.routes();
        let had_route = routes.set_msi(self.irqfd.gsi, None);
        routes.free(self.irqfd.gsi);
        // Fails only if the VM is already gone.
        if had_route {
            let _ = vm.push_routes(&routes);
        }
    }
}

/// A registered ioeventfd; dropping it removes it from the VM.
pub struct IoEventFd {
    vm: Arc<VmShared>,
    evt: EventFd,
    addr: u64,
    datamatch: Option<u32>,
}

impl IoEventFd {
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

impl Drop for IoEventFd {
    fn drop(&mut self) {
        let at = IoEventAddress::Mmio(self.addr);
        let _ = match self.datamatch {
            Some(v) => self.vm.fd.unregister_ioevent(&self.evt, &at, v),
            None => self.vm.fd.unregister_ioevent(&self.evt, &at, NoDatamatch),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn vm() -> Vm {
        Vm::new(&KvmContext::open().unwrap()).unwrap()
    }

    /// KVM's I/O APIC state: whether pin `gsi`'s input is asserted (its IRR bit).
    #[cfg(target_arch = "x86_64")]
    fn kernel_ioapic_irr(vm: &Vm, gsi: u32) -> bool {
        let mut chip = kvm_bindings::kvm_irqchip {
            chip_id: kvm_bindings::KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        vm.shared.fd.get_irqchip(&mut chip).unwrap();
        // SAFETY: chip_id says the union holds the I/O APIC's state.
        let ioapic = unsafe { chip.chip.ioapic };
        ioapic.irr & (1 << gsi) != 0
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn a_level_line_is_a_resampling_irqfd_or_a_pin_of_ember_s_ioapic() {
        let trigger = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let resample = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        // In-kernel irqchip: KVM asserts the pin itself (held in IRR while the guest has
        // it masked, as a level does), and the registration goes when dropped.
        let mut kernel = vm();
        kernel
            .create_interrupt_controllers(Irqchip::Kernel)
            .unwrap();
        let line = kernel.level_irq(21, &trigger, &resample, "test").unwrap();
        assert!(matches!(line, LevelIrq::Kernel(_)));
        assert!(!kernel_ioapic_irr(&kernel, 21));
        trigger.write(1).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while !kernel_ioapic_irr(&kernel, 21) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(kernel_ioapic_irr(&kernel, 21), "KVM asserted pin 21");
        drop(line);
        assert!(
            kernel.level_irq(21, &trigger, &resample, "again").is_ok(),
            "the first registration was removed"
        );
        // Split irqchip: a subscriber for the event loop drives ember's pin.
        let mut split = vm();
        split.create_interrupt_controllers(Irqchip::Split).unwrap();
        let line = split.level_irq(21, &trigger, &resample, "test").unwrap();
        assert!(matches!(line, LevelIrq::Split(_)));
    }

    #[test]
    fn memory_after_the_irqchip_is_refused() {
        let mut vm = vm();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        vm.create_interrupt_controllers(Irqchip::default()).unwrap();
        assert!(matches!(
            vm.register_memory(&mem, false),
            Err(VmError::MemoryAfterIrqchip)
        ));
    }

    #[test]
    fn slots_come_from_the_allocator_and_memory_stays_mapped() {
        let mut vm = vm();
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(1 << 30), 1 << 20),
        ])
        .unwrap();
        vm.register_memory(&mem, false).unwrap();
        assert!(vm.shared.slots().is_allocated(0) && vm.shared.slots().is_allocated(1));
        assert!(!vm.shared.slots().is_allocated(2));
        let mem2 = GuestMemoryMmap::from_ranges(&[(GuestAddress(2 << 30), 1 << 20)]).unwrap();
        vm.register_memory(&mem2, false).unwrap();
        assert!(
            vm.shared.slots().is_allocated(2),
            "a second registration takes the next slot"
        );
        assert_eq!(vm.shared.memory.lock().unwrap().len(), 2);
    }

    #[test]
    fn overlapping_slot_is_refused_with_its_number() {
        let mut vm = vm();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        vm.register_memory(&mem, false).unwrap();
        let err = vm.register_memory(&mem, false).unwrap_err();
        assert!(matches!(err, VmError::MemorySlot { slot: 1, .. }), "{err}");
    }

    #[test]
    fn irqfd_and_ioeventfd_register_and_release() {
        let vm = Vm::with_irqfds_for_tests();
        let irq = vm.irqfd(5, "test").unwrap();
        irq.trigger().unwrap();
        // The same eventfd cannot be registered twice on one GSI; after the handle is
        // dropped a new one on the same GSI registers fine.
        let again = vm.irqfd(5, "test").unwrap();
        drop(irq);
        drop(again);
        let io = vm.ioeventfd(0xd000_0050, Some(0), "test").unwrap();
        // A second registration of the same address and value is refused by KVM...
        assert!(vm.ioeventfd(0xd000_0050, Some(0), "test").is_err());
        drop(io);
        // ...and allowed once the first handle is gone.
        vm.ioeventfd(0xd000_0050, Some(0), "test").unwrap();
    }

    #[test]
    fn device_memory_maps_at_run_time_and_its_slot_is_given_back() {
        let mut vm = vm();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        vm.register_memory(&mem, false).unwrap();
        vm.create_interrupt_controllers(Irqchip::default()).unwrap();
        let bar = Arc::new(MmapRegion::<()>::new(0x2000).unwrap());
        let handle = vm.handle();
        let slot = handle.map_memory(0x1_0000_0000, bar.clone()).unwrap();
        assert_eq!((slot.gpa(), slot.size()), (0x1_0000_0000, 0x2000));
        assert!(vm.shared.slots().is_allocated(1));
        // Overlapping guest RAM is refused, and the slot number is not lost.
        assert!(handle.map_memory(0, bar.clone()).is_err());
        assert!(!vm.shared.slots().is_allocated(2));
        // Moved: dropped at the old address, mapped at the new one with the same number.
        drop(slot);
        assert!(!vm.shared.slots().is_allocated(1));
        let moved = handle.map_memory(0x2_0000_0000, bar).unwrap();
        assert!(vm.shared.slots().is_allocated(1));
        drop(moved);
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn msi_vectors_route_trigger_and_give_their_gsi_back() {
        for irqchip in [Irqchip::Kernel, Irqchip::Split] {
            let mut vm = vm();
            vm.create_interrupt_controllers(irqchip).unwrap();
            let a = vm.msi_vector("test").unwrap();
            let b = vm.msi_vector("test").unwrap();
            assert_eq!((a.gsi(), b.gsi()), (24, 25));
            let m = MsiMessage {
                address: 0xfee0_0000,
                data: 0x45,
            };
            // KVM takes the table with the pins' routes and both vectors'.
            a.route(Some(m)).unwrap();
            b.route(Some(MsiMessage { data: 0x46, ..m })).unwrap();
            a.trigger().unwrap();
            let routed: Vec<u32> = vm.shared.routes().table().iter().map(|e| e.gsi).collect();
            assert!(routed.contains(&24) && routed.contains(&25), "{routed:?}");
            a.route(None).unwrap();
            drop(a);
            let again = vm.msi_vector("test").unwrap();
            assert_eq!(
                again.gsi(),
                24,
                "{irqchip:?}: a dropped vector's GSI is reused"
            );
        }
    }
}
