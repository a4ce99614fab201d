//! What an x86_64 VM needs from KVM before its vCPUs exist: the TSS and identity-map pages
//! KVM uses to emulate real mode, and the interrupt controllers and timer.

use kvm_bindings::{KVM_CAP_SPLIT_IRQCHIP, KVM_PIT_SPEAKER_DUMMY, kvm_enable_cap, kvm_pit_config};
use kvm_ioctls::VmFd;

use super::layout::{KVM_IDENTITY_MAP_START, KVM_TSS_START};
use crate::config::Irqchip;
use crate::devices::legacy::ioapic::PINS as IOAPIC_PINS;

#[derive(Debug, thiserror::Error)]
pub enum ArchVmError {
    #[error("cannot set the TSS address: {0}")]
    TssAddress(kvm_ioctls::Error),
    #[error("cannot set the identity map address: {0}")]
    IdentityMap(kvm_ioctls::Error),
    #[error("cannot create the in-kernel interrupt controllers: {0}")]
    IrqChip(kvm_ioctls::Error),
    #[error("cannot create the in-kernel PIT: {0}")]
    Pit(kvm_ioctls::Error),
    #[error("cannot enable KVM's split irqchip (local APICs only): {0}")]
    SplitIrqChip(kvm_ioctls::Error),
    #[error("irqchip \"{}\" is arm64's; on x86_64 it is \"split\" or \"kernel\"", .0.name())]
    NotOnThisArch(Irqchip),
}

/// The TSS and identity map must be set before any vCPU exists.
pub fn setup_vm(fd: &VmFd) -> Result<(), ArchVmError> {
    fd.set_tss_address(KVM_TSS_START as usize)
        .map_err(ArchVmError::TssAddress)?;
    fd.set_identity_map_address(KVM_IDENTITY_MAP_START)
        .map_err(ArchVmError::IdentityMap)?;
    Ok(())
}

/// KVM keeps nothing ember must finish after the vCPUs on x86_64.
pub type InterruptControllers = ();

/// Creates the interrupt controllers KVM keeps: with [`Irqchip::Split`] only the local
/// APICs (ember brings the I/O APIC; there is no PIC and no PIT: Linux uses the local APIC
/// timer and the TSC), with [`Irqchip::Kernel`] the I/O APIC, both PICs and the PIT too.
/// Returns the irqchip as created (the same).
pub fn create_interrupt_controllers(
    fd: &VmFd,
    irqchip: Irqchip,
) -> Result<(Irqchip, InterruptControllers), ArchVmError> {
    match irqchip {
        Irqchip::Split => {
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_SPLIT_IRQCHIP,
                ..Default::default()
            };
            // The GSIs KVM reserves for the I/O APIC's pins (its EOI routes).
            cap.args[0] = IOAPIC_PINS as u64;
            fd.enable_cap(&cap).map_err(ArchVmError::SplitIrqChip)?;
            return Ok((irqchip, ()));
        }
        Irqchip::Kernel => {}
        Irqchip::GicV2 | Irqchip::GicV3 => return Err(ArchVmError::NotOnThisArch(irqchip)),
    }
    fd.create_irq_chip().map_err(ArchVmError::IrqChip)?;
    // The dummy speaker port keeps port 0x61 in the kernel, which Linux pokes while it
    // calibrates the TSC against the PIT.
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    fd.create_pit2(pit).map_err(ArchVmError::Pit)?;
    Ok((irqchip, ()))
}

/// Nothing to finish on x86_64.
pub fn finish_interrupt_controllers(_: &InterruptControllers) -> Result<(), ArchVmError> {
    Ok(())
}
