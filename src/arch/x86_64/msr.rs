//! Model-specific registers set on every vCPU before it first runs.

use kvm_bindings::{Msrs, kvm_msr_entry};

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back: without this a guest that honours MTRRs
/// would run everything uncached.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    #[error("cannot build the MSR list: {0}")]
    Build(vmm_sys_util::fam::Error),
}

/// The MSRs and values a vCPU starts with: syscall MSRs cleared (the kernel programs them),
/// TSC at zero, fast strings on, MTRRs on with write-back default.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
}

pub fn boot_msrs() -> Result<Msrs, MsrError> {
    Msrs::from_entries(&boot_msr_entries()).map_err(MsrError::Build)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_msrs_cover_syscall_tsc_and_mtrr() {
        let msrs = boot_msrs().unwrap();
        let get = |i| {
            msrs.as_slice()
                .iter()
                .find(|e| e.index == i)
                .map(|e| e.data)
        };
        assert_eq!(get(MSR_MTRR_DEF_TYPE), Some(0x806));
        assert_eq!(get(MSR_IA32_MISC_ENABLE), Some(1));
        assert_eq!(get(MSR_LSTAR), Some(0));
        assert_eq!(msrs.as_slice().len(), 11);
    }
}
