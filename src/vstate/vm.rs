//! The KVM VM: memory slots, in-kernel interrupt controllers and PIT.

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_START, KVM_TSS_START};
use crate::vstate::kvm::KvmContext;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot create the KVM VM: {0}")]
    Create(kvm_ioctls::Error),
    #[error("cannot set the TSS address: {0}")]
    TssAddress(kvm_ioctls::Error),
    #[error("cannot set the identity map address: {0}")]
    IdentityMap(kvm_ioctls::Error),
    #[error("cannot create the in-kernel interrupt controllers: {0}")]
    IrqChip(kvm_ioctls::Error),
    #[error("cannot create the in-kernel PIT: {0}")]
    Pit(kvm_ioctls::Error),
    #[error("guest memory needs {needed} memory slots, KVM offers {available}")]
    TooManySlots { needed: usize, available: usize },
    #[error("cannot register guest memory slot {slot}: {source}")]
    MemorySlot {
        slot: u32,
        source: kvm_ioctls::Error,
    },
}

pub struct Vm {
    pub fd: VmFd,
}

impl Vm {
    /// Creates the VM. The TSS and identity map must be set before any vCPU exists.
    pub fn new(kvm: &KvmContext) -> Result<Self, VmError> {
        let fd = kvm.kvm.create_vm().map_err(VmError::Create)?;
        fd.set_tss_address(KVM_TSS_START as usize)
            .map_err(VmError::TssAddress)?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_START)
            .map_err(VmError::IdentityMap)?;
        Ok(Vm { fd })
    }

    /// Creates the in-kernel IOAPIC/PIC/LAPICs and PIT. Call after the memory slots are
    /// registered: with an in-kernel irqchip present, each slot change waits for KVM to
    /// synchronise, which measured at several milliseconds per slot (docs/performance.md).
    pub fn create_interrupt_controllers(&self) -> Result<(), VmError> {
        let fd = &self.fd;
        fd.create_irq_chip().map_err(VmError::IrqChip)?;
        // The dummy speaker port keeps port 0x61 in the kernel, which Linux pokes while it
        // calibrates the TSC against the PIT.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(VmError::Pit)?;
        Ok(())
    }

    /// Registers every region of `mem` as a KVM memory slot, optionally with dirty logging.
    pub fn register_memory(
        &self,
        kvm: &KvmContext,
        mem: &GuestMemoryMmap,
        track_dirty_pages: bool,
    ) -> Result<(), VmError> {
        let available = kvm.kvm.get_nr_memslots();
        if mem.num_regions() > available {
            return Err(VmError::TooManySlots {
                needed: mem.num_regions(),
                available,
            });
        }
        let flags = if track_dirty_pages {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        for (slot, region) in mem.iter().enumerate() {
            let slot = slot as u32;
            let desc = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags,
            };
            // SAFETY: the region stays mapped for as long as the VM exists: the guest memory
            // object is kept alive by the VMM until after the VM fd is closed.
            unsafe { self.fd.set_user_memory_region(desc) }
                .map_err(|source| VmError::MemorySlot { slot, source })?;
        }
        Ok(())
    }
}
