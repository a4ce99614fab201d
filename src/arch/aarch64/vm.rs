//! What an arm64 VM needs from KVM around its vCPUs: the vGIC, created before them and
//! initialised after.

use kvm_ioctls::VmFd;

use super::fdt::GicVersion;
use super::gic::{Gic, GicError};
use crate::config::Irqchip;

#[derive(Debug, thiserror::Error)]
pub enum ArchVmError {
    #[error("{0}")]
    Gic(#[from] GicError),
    #[error(
        "irqchip \"{}\" is x86_64's; on arm64 it is \"kernel\" (KVM's GIC, v3 if the host \
         has it, else v2), \"gicv3\" or \"gicv2\"",
        .0.name()
    )]
    NotOnThisArch(Irqchip),
    #[error("this host's KVM emulates neither a GICv3 ({v3}) nor a GICv2 ({v2})")]
    NoGic { v3: GicError, v2: GicError },
}

/// The interrupt controllers KVM keeps for this VM.
pub type InterruptControllers = Gic;

/// Nothing to do before the vCPUs on arm64.
pub fn setup_vm(_fd: &VmFd) -> Result<(), ArchVmError> {
    Ok(())
}

/// Creates the vGIC `irqchip` asks for (`Kernel`: GICv3 if KVM can, else GICv2) and
/// returns which one it is.
pub fn create_interrupt_controllers(
    fd: &VmFd,
    irqchip: Irqchip,
) -> Result<(Irqchip, InterruptControllers), ArchVmError> {
    let gic = match irqchip {
        Irqchip::GicV3 => Gic::create(fd, GicVersion::V3)?,
        Irqchip::GicV2 => Gic::create(fd, GicVersion::V2)?,
        Irqchip::Kernel => match Gic::create(fd, GicVersion::V3) {
            Ok(gic) => gic,
            Err(v3) => {
                Gic::create(fd, GicVersion::V2).map_err(|v2| ArchVmError::NoGic { v3, v2 })?
            }
        },
        Irqchip::Split => return Err(ArchVmError::NotOnThisArch(irqchip)),
    };
    let resolved = match gic.version {
        GicVersion::V3 => Irqchip::GicV3,
        GicVersion::V2 => Irqchip::GicV2,
    };
    Ok((resolved, gic))
}

/// Initialises the vGIC once every vCPU exists.
pub fn finish_interrupt_controllers(gic: &InterruptControllers) -> Result<(), ArchVmError> {
    Ok(gic.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::kvm::KvmContext;

    #[test]
    fn kernel_picks_a_gic_the_host_has_and_names_it() {
        let kvm = KvmContext::open().unwrap();
        let vm = kvm.kvm.create_vm().unwrap();
        let (chip, gic) = create_interrupt_controllers(&vm, Irqchip::Kernel).unwrap();
        assert!(matches!(chip, Irqchip::GicV3 | Irqchip::GicV2), "{chip:?}");
        assert_eq!(
            chip == Irqchip::GicV3,
            gic.version == GicVersion::V3,
            "the name follows what was made"
        );
        // A second vGIC in the same VM is refused by KVM, with the generation named.
        let again = match chip {
            Irqchip::GicV3 => Irqchip::GicV3,
            _ => Irqchip::GicV2,
        };
        let e = create_interrupt_controllers(&vm, again).err().unwrap();
        assert!(e.to_string().contains("GIC"), "{e}");
        // x86_64's irqchip is refused by name.
        let vm2 = kvm.kvm.create_vm().unwrap();
        let e = create_interrupt_controllers(&vm2, Irqchip::Split)
            .err()
            .unwrap();
        assert!(e.to_string().contains("\"split\" is x86_64's"), "{e}");
    }
}
