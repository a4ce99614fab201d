//! A vCPU's state at boot (booting.rst, "CPU mode"): initialised with KVM's preferred
//! target and PSCI 0.2, so the guest starts and stops its CPUs through PSCI calls KVM
//! answers; the boot vCPU at the kernel's entry in EL1h with interrupts masked and x0 the
//! device tree's address; the others powered off until the guest's CPU_ON.

use kvm_bindings::{
    KVM_ARM_VCPU_POWER_OFF, KVM_ARM_VCPU_PSCI_0_2, KVM_REG_ARM_CORE, KVM_REG_ARM64_SYSREG,
    KVM_REG_SIZE_U64, PSR_A_BIT, PSR_D_BIT, PSR_F_BIT, PSR_I_BIT, PSR_MODE_EL1h, kvm_regs,
    kvm_vcpu_init, user_pt_regs,
};
use kvm_ioctls::VcpuFd;

use super::layout::mpidr_affinity;

/// The register-ID space of arm64 (KVM_REG_ARM64 in the kernel's uapi).
const KVM_REG_ARM64: u64 = 0x6000_0000_0000_0000;
/// EL1h with debug, SError, IRQ and FIQ masked.
const BOOT_PSTATE: u64 = (PSR_MODE_EL1h | PSR_A_BIT | PSR_F_BIT | PSR_I_BIT | PSR_D_BIT) as u64;
/// MPIDR_EL1's encoding (op0 3, op1 0, CRn 0, CRm 0, op2 5) and its affinity bits.
const MPIDR_EL1: u64 =
    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM64_SYSREG as u64 | (3 << 14) | 5;
const MPIDR_AFFINITY: u64 = 0xff_00ff_ffff;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM gave it MPIDR affinity {found:#x}, not the {expected:#x} the device tree names")]
    Mpidr { found: u64, expected: u64 },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

/// The ID of a core register at `offset` bytes into `struct kvm_regs`.
fn core_reg(offset: usize) -> u64 {
    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | u64::from(KVM_REG_ARM_CORE) | (offset / 4) as u64
}

fn pc_reg() -> u64 {
    core_reg(std::mem::offset_of!(kvm_regs, regs) + std::mem::offset_of!(user_pt_regs, pc))
}

/// Initialises vCPU `index` from `preferred` (KVM's preferred target for this host).
pub fn init(fd: &VcpuFd, index: u8, preferred: &kvm_vcpu_init) -> Result<(), RegsError> {
    let mut init = *preferred;
    init.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
    if index > 0 {
        init.features[0] |= 1 << KVM_ARM_VCPU_POWER_OFF;
    }
    fd.vcpu_init(&init).map_err(kvm("initialise the vCPU"))?;
    // The device tree was written with the affinity KVM gives each vCPU: check it.
    let mut mpidr = [0u8; 8];
    fd.get_one_reg(MPIDR_EL1, &mut mpidr)
        .map_err(kvm("read MPIDR_EL1"))?;
    let found = u64::from_le_bytes(mpidr) & MPIDR_AFFINITY;
    let expected = mpidr_affinity(index);
    if found != expected {
        return Err(RegsError::Mpidr { found, expected });
    }
    Ok(())
}

/// Points the boot vCPU at the kernel: pc = entry, x0 = the device tree, EL1h, masked.
pub fn set_boot_registers(fd: &VcpuFd, entry: u64, fdt: u64) -> Result<(), RegsError> {
    let regs = std::mem::offset_of!(kvm_regs, regs);
    let pstate = core_reg(regs + std::mem::offset_of!(user_pt_regs, pstate));
    let x0 = core_reg(regs + std::mem::offset_of!(user_pt_regs, regs));
    fd.set_one_reg(pstate, &BOOT_PSTATE.to_le_bytes())
        .map_err(kvm("set PSTATE"))?;
    fd.set_one_reg(pc_reg(), &entry.to_le_bytes())
        .map_err(kvm("set the PC"))?;
    fd.set_one_reg(x0, &fdt.to_le_bytes())
        .map_err(kvm("set x0"))?;
    Ok(())
}

/// The vCPU's program counter, 0 if it cannot be read.
pub fn program_counter(fd: &VcpuFd) -> u64 {
    let mut pc = [0u8; 8];
    match fd.get_one_reg(pc_reg(), &mut pc) {
        Ok(_) => u64::from_le_bytes(pc),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Irqchip;
    use crate::vstate::kvm::KvmContext;
    use crate::vstate::vm::Vm;

    fn reg(fd: &VcpuFd, id: u64) -> u64 {
        let mut b = [0u8; 8];
        fd.get_one_reg(id, &mut b).unwrap();
        u64::from_le_bytes(b)
    }

    #[test]
    fn vcpus_get_psci_the_device_tree_s_mpidr_and_the_boot_registers() {
        let mut vm = Vm::new(&KvmContext::open().unwrap()).unwrap();
        vm.create_interrupt_controllers(Irqchip::Kernel).unwrap();
        let target = vm.preferred_target().unwrap();
        let fds: Vec<VcpuFd> = (0..3)
            .map(|i| {
                let fd = vm.create_vcpu(i).unwrap();
                // init checks MPIDR against mpidr_affinity(i).
                init(&fd, i, &target).unwrap();
                fd
            })
            .collect();
        vm.finish_interrupt_controllers().unwrap();
        // The second and third wait, powered off, for the guest's PSCI CPU_ON.
        let state = |fd: &VcpuFd| fd.get_mp_state().unwrap().mp_state;
        assert_eq!(state(&fds[1]), kvm_bindings::KVM_MP_STATE_STOPPED);
        assert_eq!(state(&fds[2]), kvm_bindings::KVM_MP_STATE_STOPPED);
        assert_eq!(state(&fds[0]), kvm_bindings::KVM_MP_STATE_RUNNABLE);
        set_boot_registers(&fds[0], 0x8000_0000, 0x8fe0_0000).unwrap();
        let regs = std::mem::offset_of!(kvm_regs, regs);
        assert_eq!(program_counter(&fds[0]), 0x8000_0000);
        assert_eq!(
            reg(
                &fds[0],
                core_reg(regs + std::mem::offset_of!(user_pt_regs, regs))
            ),
            0x8fe0_0000,
            "x0 holds the device tree's address"
        );
        assert_eq!(
            reg(
                &fds[0],
                core_reg(regs + std::mem::offset_of!(user_pt_regs, pstate))
            ),
            0x3c5,
            "EL1h, DAIF masked"
        );
    }
}
