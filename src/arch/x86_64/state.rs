//! What a snapshot keeps of the CPU side of an x86_64 VM: each vCPU's architectural state
//! as KVM holds it, the in-kernel interrupt controllers and PIT, and the kvmclock.
//!
//! KVM documents ordering constraints between these calls; the orders below follow them:
//! saving reads the MP state first (reading it may deliver pending INIT/SIPI events into
//! the other state) and the vCPU events last; restoring writes CPUID first (it decides
//! which MSRs and XSAVE features exist), the special registers before the local APIC (the
//! APIC base lives in them), the MSRs after the local APIC (the TSC deadline timer lives
//! in both) and the vCPU events last (pending exceptions and interrupts apply to the
//! state above). The FPU state is part of the XSAVE area, which KVM_CAP_XSAVE (required)
//! guarantees, so it is not read separately.

use kvm_bindings::{
    CpuId, KVM_CLOCK_REALTIME, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, Msrs, kvm_clock_data,
    kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read the {what} of vCPU {index}: {source}")]
    SaveVcpu {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot restore the {what} of vCPU {index}: {source}")]
    RestoreVcpu {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: KVM on this host refuses MSR {msr:#x} of the snapshot")]
    MsrRefused { index: u8, msr: u32 },
    #[error(
        "vCPU {index} ran at {saved} kHz when the snapshot was taken; this host's KVM cannot scale its TSC to that ({source})"
    )]
    TscFrequency {
        index: u8,
        saved: u32,
        source: kvm_ioctls::Error,
    },
    #[error("cannot read the VM's {what}: {source}")]
    SaveVm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot restore the VM's {what}: {source}")]
    RestoreVm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot list the MSRs KVM saves: {0}")]
    MsrList(kvm_ioctls::Error),
}

/// One vCPU as KVM holds it.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    /// Absent where KVM has no KVM_CAP_XCRS (a host without XSAVE).
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// The guest TSC's frequency, where KVM can tell it.
    pub tsc_khz: Option<u32>,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
}

/// The MSRs worth saving on this host: every one KVM lists (KVM_GET_MSR_INDEX_LIST).
pub fn msrs_to_save(kvm: &Kvm) -> Result<Vec<u32>, StateError> {
    let mut list = kvm
        .get_msr_index_list()
        .map_err(StateError::MsrList)?
        .as_slice()
        .to_vec();
    list.sort_unstable();
    list.dedup();
    Ok(list)
}

/// Reads `wanted` MSRs, leaving out those this vCPU does not have (KVM stops at the first
/// one it cannot read and says how many it read).
fn read_msrs(fd: &VcpuFd, index: u8, wanted: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut read = Vec::with_capacity(wanted.len());
    let mut rest = wanted;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError::SaveVcpu {
            index,
            what: "MSRs",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(|source| StateError::SaveVcpu {
                index,
                what: "MSRs",
                source,
            })?;
        read.extend_from_slice(&msrs.as_slice()[..n]);
        // Entry `n` is one this vCPU cannot read: skip it and go on after it.
        rest = rest.get(n + 1..).unwrap_or(&[]);
    }
    Ok(read)
}

/// Reads vCPU `index`'s state. The vCPU must be out of the guest with its last exit
/// completed (see `Vcpu::complete_pending_exit`).
pub fn save_vcpu(fd: &VcpuFd, index: u8, msr_list: &[u32]) -> Result<VcpuState, StateError> {
    let save = |what| {
        move |source| StateError::SaveVcpu {
            index,
            what,
            source,
        }
    };
    let mp_state = fd.get_mp_state().map_err(save("MP state"))?;
    let regs = fd.get_regs().map_err(save("registers"))?;
    let sregs = fd.get_sregs().map_err(save("special registers"))?;
    let xsave = fd.get_xsave().map_err(save("XSAVE area"))?;
    // A host without XSAVE answers with no XCRs at all, and refuses to have any set.
    let xcrs = match fd.get_xcrs() {
        Ok(x) if x.nr_xcrs > 0 => Some(x),
        Ok(_) => None,
        Err(e) if e.errno() == libc::EINVAL || e.errno() == libc::ENOTTY => None,
        Err(e) => return Err(save("extended control registers")(e)),
    };
    let debugregs = fd.get_debug_regs().map_err(save("debug registers"))?;
    let lapic = fd.get_lapic().map_err(save("local APIC"))?;
    let tsc_khz = fd.get_tsc_khz().ok();
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(save("CPUID"))?
        .as_slice()
        .to_vec();
    let msrs = read_msrs(fd, index, msr_list)?;
    let vcpu_events = fd.get_vcpu_events().map_err(save("pending events"))?;
    Ok(VcpuState {
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        tsc_khz,
        msrs,
        vcpu_events,
    })
}

/// Puts `state` into a vCPU just created for it.
pub fn restore_vcpu(fd: &VcpuFd, index: u8, state: &VcpuState) -> Result<(), StateError> {
    let restore = |what| {
        move |source| StateError::RestoreVcpu {
            index,
            what,
            source,
        }
    };
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| StateError::RestoreVcpu {
        index,
        what: "CPUID",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    fd.set_cpuid2(&cpuid).map_err(restore("CPUID"))?;
    if let Some(saved) = state.tsc_khz
        && fd.get_tsc_khz().ok() != Some(saved)
    {
        fd.set_tsc_khz(saved)
            .map_err(|source| StateError::TscFrequency {
                index,
                saved,
                source,
            })?;
    }
    fd.set_mp_state(state.mp_state)
        .map_err(restore("MP state"))?;
    fd.set_regs(&state.regs).map_err(restore("registers"))?;
    fd.set_sregs(&state.sregs)
        .map_err(restore("special registers"))?;
    // SAFETY: the area came from KVM_GET_XSAVE of the same size; KVM checks its contents.
    unsafe { fd.set_xsave(&state.xsave) }.map_err(restore("XSAVE area"))?;
    if let Some(xcrs) = &state.xcrs {
        fd.set_xcrs(xcrs)
            .map_err(restore("extended control registers"))?;
    }
    fd.set_debug_regs(&state.debugregs)
        .map_err(restore("debug registers"))?;
    fd.set_lapic(&state.lapic).map_err(restore("local APIC"))?;
    let msrs = Msrs::from_entries(&state.msrs).map_err(|_| StateError::RestoreVcpu {
        index,
        what: "MSRs",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let set = fd.set_msrs(&msrs).map_err(restore("MSRs"))?;
    if let Some(refused) = state.msrs.get(set) {
        return Err(StateError::MsrRefused {
            index,
            msr: refused.index,
        });
    }
    fd.set_vcpu_events(&state.vcpu_events)
        .map_err(restore("pending events"))?;
    Ok(())
}

/// KVM's own devices of an in-kernel irqchip VM: both 8259s, the I/O APIC and the PIT.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KernelIrqchipState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
}

/// The VM-wide state KVM holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    pub clock: kvm_clock_data,
    /// With the in-kernel irqchip; the split irqchip's I/O APIC is one of ember's devices.
    pub irqchip: Option<KernelIrqchipState>,
}

const PIC_MASTER: u32 = 0;
const PIC_SLAVE: u32 = 1;
const IOAPIC: u32 = 2;

/// Reads the VM's clock and, with `kernel_irqchip`, KVM's interrupt controllers and PIT.
pub fn save_vm(fd: &VmFd, kernel_irqchip: bool) -> Result<VmState, StateError> {
    let save = |what| move |source| StateError::SaveVm { what, source };
    let irqchip = if kernel_irqchip {
        let chip = |chip_id, what| {
            let mut c = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            fd.get_irqchip(&mut c).map_err(save(what)).map(|()| c)
        };
        Some(KernelIrqchipState {
            pic_master: chip(PIC_MASTER, "master 8259")?,
            pic_slave: chip(PIC_SLAVE, "slave 8259")?,
            ioapic: chip(IOAPIC, "I/O APIC")?,
            pit: fd.get_pit2().map_err(save("PIT"))?,
        })
    } else {
        None
    };
    let clock = fd.get_clock().map_err(save("kvmclock"))?;
    Ok(VmState { clock, irqchip })
}

/// Puts `state` into a VM made with the same irqchip, its vCPUs created. With
/// `clock_realtime` kvmclock is advanced by the wall-clock time since the snapshot.
pub fn restore_vm(fd: &VmFd, state: &VmState, clock_realtime: bool) -> Result<(), StateError> {
    let restore = |what| move |source| StateError::RestoreVm { what, source };
    if let Some(chips) = &state.irqchip {
        let mut pit = chips.pit;
        // The speaker port stays a dummy, as the VM was made.
        pit.flags |= KVM_PIT_SPEAKER_DUMMY;
        fd.set_pit2(&pit).map_err(restore("PIT"))?;
        fd.set_irqchip(&chips.pic_master)
            .map_err(restore("master 8259"))?;
        fd.set_irqchip(&chips.pic_slave)
            .map_err(restore("slave 8259"))?;
        fd.set_irqchip(&chips.ioapic).map_err(restore("I/O APIC"))?;
    }
    // By default the guest's clock goes on from where it stood: the flags that would make
    // KVM add the time the VM spent saved are cleared.
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        flags: if clock_realtime {
            state.clock.flags & KVM_CLOCK_REALTIME
        } else {
            0
        },
        realtime: state.clock.realtime,
        ..Default::default()
    };
    fd.set_clock(&clock).map_err(restore("kvmclock"))?;
    Ok(())
}

/// Who made this host's CPU and which model it is, as CPUID says: a snapshot restores only
/// on the same kind of CPU, since its guest was shown this one's features.
pub fn host_cpu_identity() -> String {
    // CPUID exists on every x86_64 CPU; leaves 0 and 1 always do.
    let (vendor, signature) = {
        let leaf0 = std::arch::x86_64::__cpuid(0);
        let leaf1 = std::arch::x86_64::__cpuid(1);
        let mut v = Vec::with_capacity(12);
        for r in [leaf0.ebx, leaf0.edx, leaf0.ecx] {
            v.extend_from_slice(&r.to_le_bytes());
        }
        (String::from_utf8_lossy(&v).into_owned(), leaf1.eax)
    };
    let family = (signature >> 8) & 0xf;
    let ext_family = (signature >> 20) & 0xff;
    let model = (signature >> 4) & 0xf;
    let ext_model = (signature >> 16) & 0xf;
    let family = if family == 0xf {
        family + ext_family
    } else {
        family
    };
    let model = if family >= 6 {
        (ext_model << 4) | model
    } else {
        model
    };
    format!("{vendor} family {family:#x} model {model:#x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::kvm::KvmContext;
    use crate::vstate::vm::Vm;

    #[test]
    fn a_vcpu_state_survives_a_save_into_a_new_vm() {
        let kvm = KvmContext::open().unwrap();
        let msr_list = msrs_to_save(&kvm.kvm).unwrap();
        let mut vm = Vm::new(&kvm).unwrap();
        vm.create_interrupt_controllers(crate::config::Irqchip::Kernel)
            .unwrap();
        let fd = vm.create_vcpu(0).unwrap();
        fd.set_cpuid2(&kvm.supported_cpuid().unwrap()).unwrap();
        let mut regs = fd.get_regs().unwrap();
        regs.rax = 0x1234_5678_9abc_def0;
        regs.rip = 0xfff0;
        fd.set_regs(&regs).unwrap();
        let mut sregs = fd.get_sregs().unwrap();
        sregs.cr4 |= 1 << 9; // OSFXSR
        fd.set_sregs(&sregs).unwrap();
        let state = save_vcpu(&fd, 0, &msr_list).unwrap();
        assert!(!state.msrs.is_empty());
        assert!(state.cpuid.len() > 4);

        // Through the snapshot's encoding and into a vCPU of another VM.
        let json = serde_json::to_vec(&state).unwrap();
        let back: VcpuState = serde_json::from_slice(&json).unwrap();
        let mut vm2 = Vm::new(&kvm).unwrap();
        vm2.create_interrupt_controllers(crate::config::Irqchip::Kernel)
            .unwrap();
        let fd2 = vm2.create_vcpu(0).unwrap();
        restore_vcpu(&fd2, 0, &back).unwrap();
        assert_eq!(fd2.get_regs().unwrap().rax, 0x1234_5678_9abc_def0);
        assert_eq!(fd2.get_regs().unwrap().rip, 0xfff0);
        assert_ne!(fd2.get_sregs().unwrap().cr4 & (1 << 9), 0);
        let again = save_vcpu(&fd2, 0, &msr_list).unwrap();
        assert_eq!(again.msrs.len(), state.msrs.len());
        assert_eq!(again.cpuid.len(), state.cpuid.len());
        assert_eq!(again.lapic.regs[..0x40], state.lapic.regs[..0x40]);
    }

    #[test]
    fn the_kernel_irqchip_and_clock_survive_a_save_into_a_new_vm() {
        let kvm = KvmContext::open().unwrap();
        let mut vm = Vm::new(&kvm).unwrap();
        vm.create_interrupt_controllers(crate::config::Irqchip::Kernel)
            .unwrap();
        let state = save_vm(vm.fd(), true).unwrap();
        let chips = state.irqchip.as_ref().unwrap();
        assert_eq!(chips.ioapic.chip_id, IOAPIC);
        let json = serde_json::to_vec(&state).unwrap();
        let back: VmState = serde_json::from_slice(&json).unwrap();
        let mut vm2 = Vm::new(&kvm).unwrap();
        vm2.create_interrupt_controllers(crate::config::Irqchip::Kernel)
            .unwrap();
        restore_vm(vm2.fd(), &back, false).unwrap();
        let after = save_vm(vm2.fd(), true).unwrap();
        // The clock goes on from the saved value, not from the new VM's zero.
        assert!(after.clock.clock >= state.clock.clock);
        // Split irqchip VMs have no KVM devices to save.
        let mut split = Vm::new(&kvm).unwrap();
        split
            .create_interrupt_controllers(crate::config::Irqchip::Split)
            .unwrap();
        assert!(save_vm(split.fd(), false).unwrap().irqchip.is_none());
    }

    #[test]
    fn host_identity_names_a_vendor() {
        let id = host_cpu_identity();
        assert!(
            id.starts_with("GenuineIntel") || id.starts_with("AuthenticAMD") || id.len() > 12,
            "{id}"
        );
        assert!(id.contains(" family 0x"), "{id}");
    }
}
