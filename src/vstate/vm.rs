//! The KVM VM and what is registered with it: memory slots, interrupt controllers, irqfds
//! and ioeventfds.
//!
//! Registrations are handles ([`Irqfd`], [`IoEventFd`]) that undo themselves when dropped,
//! and memory slots get their numbers from an allocator, so devices come and go without
//! anyone computing a number from an index. Every handle and the [`Vm`] share one
//! [`VmShared`], which holds the VM fd and, after it, the guest memory registered in its
//! slots: the fd is closed before the memory it maps is unmapped, however the VM ends.

use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{IoEventAddress, NoDatamatch, VcpuFd, VmFd};
use vm_allocator::IdAllocator;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use kvm_bindings::{KVM_IRQ_ROUTING_MSI, KvmIrqRouting, kvm_irq_routing_msi, kvm_msi};

use crate::arch;
use crate::config::Irqchip;
use crate::devices::legacy::Line;
use crate::devices::legacy::ioapic::{Ioapic, IoapicPin, MsiSink};
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
    #[error("cannot create vCPU {0}: {1}")]
    CreateVcpu(u8, kvm_ioctls::Error),
    #[error("cannot create an eventfd for {0}: {1}")]
    EventFd(&'static str, std::io::Error),
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
}

pub struct Vm {
    shared: Arc<VmShared>,
    /// ember's I/O APIC, with the split irqchip.
    ioapic: Option<Arc<Mutex<Ioapic>>>,
    /// Set once the interrupt controllers exist: memory comes first (see
    /// [`Vm::create_interrupt_controllers`]).
    irqchip_created: bool,
    slots: IdAllocator,
    /// How many slots KVM offers.
    nr_slots: usize,
}

impl Vm {
    /// Creates the VM with what the architecture needs before any vCPU exists.
    pub fn new(kvm: &KvmContext) -> Result<Self, VmError> {
        let fd = kvm.kvm.create_vm().map_err(VmError::Create)?;
        arch::setup_vm(&fd)?;
        let nr_slots = kvm.kvm.get_nr_memslots();
        let last = u32::try_from(nr_slots).unwrap_or(u32::MAX).max(1) - 1;
        Ok(Vm {
            shared: Arc::new(VmShared {
                fd,
                memory: Mutex::new(Vec::new()),
            }),
            ioapic: None,
            irqchip_created: false,
            slots: IdAllocator::new(0, last).map_err(|_| VmError::TooManySlots {
                needed: 1,
                available: nr_slots,
            })?,
            nr_slots,
        })
    }

    /// Creates the in-kernel interrupt controllers (and the arch's timers). Call after the
    /// memory slots are registered: with an in-kernel irqchip present, each slot change
    /// waits for KVM to synchronise, which measured at several milliseconds per slot
    /// (docs/performance.md).
    pub fn create_interrupt_controllers(&mut self, irqchip: Irqchip) -> Result<(), VmError> {
        arch::create_interrupt_controllers(&self.shared.fd, irqchip)?;
        self.irqchip_created = true;
        if irqchip == Irqchip::Split {
            self.ioapic = Some(Arc::new(Mutex::new(Ioapic::new(
                0,
                Box::new(KvmMsiSink(self.shared.clone())),
            ))));
        }
        Ok(())
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

    /// Registers every region of `mem` in a slot of its own, optionally with dirty logging.
    /// The VM keeps `mem` mapped for as long as its fd is open.
    pub fn register_memory(
        &mut self,
        mem: &GuestMemoryMmap,
        track_dirty_pages: bool,
    ) -> Result<(), VmError> {
        if self.irqchip_created {
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
            let slot = self
                .slots
                .allocate_id()
                .map_err(|_| VmError::TooManySlots {
                    needed: mem.num_regions(),
                    available: self.nr_slots,
                })?;
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
        }
        Ok(())
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
        let at = IoEventAddress::Mmio(addr);
        let r = match datamatch {
            Some(v) => self.shared.fd.register_ioevent(&evt, &at, v),
            None => self.shared.fd.register_ioevent(&evt, &at, NoDatamatch),
        };
        r.map_err(|source| VmError::IoEvent {
            what: what.to_owned(),
            addr,
            source,
        })?;
        Ok(IoEventFd {
            vm: self.shared.clone(),
            evt,
            addr,
            datamatch,
        })
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
        let mut table = KvmIrqRouting::new(routes.len())
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        for (entry, &(gsi, address, data)) in table.as_mut_slice().iter_mut().zip(routes) {
            let (address_lo, address_hi) = halves(address);
            entry.gsi = gsi;
            entry.type_ = KVM_IRQ_ROUTING_MSI;
            entry.u.msi = kvm_irq_routing_msi {
                address_lo,
                address_hi,
                data,
                ..Default::default()
            };
        }
        self.0
            .fd
            .set_gsi_routing(&table)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// An MSI address as KVM's structures take it: low and high 32 bits.
fn halves(address: u64) -> (u32, u32) {
    (address as u32, (address >> 32) as u32)
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

    #[test]
    fn memory_after_the_irqchip_is_refused() {
        let mut vm = vm();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        vm.create_interrupt_controllers(Irqchip::Split).unwrap();
        assert!(matches!(
            vm.register_memory(&mem, false),
            Err(VmError::MemoryAfterIrqchip)
        ));
    }

    #[test]
    fn slots_come_from_the_allocator_and_memory_stays_mapped() {
        let mut vm = vm();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(1 << 30), 1 << 20),
        ])
        .unwrap();
        vm.register_memory(&mem, false).unwrap();
        assert!(vm.slots.is_allocated(0) && vm.slots.is_allocated(1));
        assert!(!vm.slots.is_allocated(2));
        let mem2 = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(2 << 30), 1 << 20)]).unwrap();
        vm.register_memory(&mem2, false).unwrap();
        assert!(
            vm.slots.is_allocated(2),
            "a second registration takes the next slot"
        );
        assert_eq!(vm.shared.memory.lock().unwrap().len(), 2);
    }

    #[test]
    fn overlapping_slot_is_refused_with_its_number() {
        let mut vm = vm();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        vm.register_memory(&mem, false).unwrap();
        let err = vm.register_memory(&mem, false).unwrap_err();
        assert!(matches!(err, VmError::MemorySlot { slot: 1, .. }), "{err}");
    }

    #[test]
    fn irqfd_and_ioeventfd_register_and_release() {
        let mut vm = vm();
        vm.create_interrupt_controllers(crate::config::Irqchip::Kernel)
            .unwrap();
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
}
