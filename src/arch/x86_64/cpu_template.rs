//! Static CPU templates (`machine-config.cpu_template`): feature ceilings on the CPUID a
//! guest sees, so that hosts of one vendor but different generations show a workload (or
//! a snapshot) the same instruction set. A template only clears feature bits; it never
//! announces one the host lacks. The names are those orchestrators already send; each is
//! an approximation of the instance family it is named after, and docs/configuration.md
//! lists exactly what each one hides.

use kvm_bindings::kvm_cpuid_entry2;

use super::cpuid::{Vendor, vendor};
use crate::config::machine_config::CpuTemplate;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuTemplateError {
    #[error(
        "machine-config.cpu_template {template:?} is for {needs} hosts; this host's CPU is {host}"
    )]
    Vendor {
        template: CpuTemplate,
        needs: &'static str,
        host: &'static str,
    },
    #[error("machine-config.cpu_template {0:?} is an arm64 template")]
    OtherArch(CpuTemplate),
}

#[derive(Clone, Copy)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// Bits a template clears in one register of one leaf (and subleaf).
struct Mask {
    function: u32,
    index: u32,
    reg: Reg,
    clear: u32,
}

const fn mask(function: u32, index: u32, reg: Reg, clear: u32) -> Mask {
    Mask {
        function,
        index,
        reg,
        clear,
    }
}

const fn bits(list: &[u32]) -> u32 {
    let mut out = 0;
    let mut i = 0;
    while i < list.len() {
        out |= 1 << list[i];
        i += 1;
    }
    out
}

/// Leaf 1 ECX: host-management features no guest of these families sees (DTES64,
/// MONITOR, DS-CPL, VMX, SMX, EIST, TM2, CNXT-ID, SDBG, xTPR, PDCM, DCA).
const HOST_FEATURES_ECX: u32 = bits(&[2, 3, 4, 5, 6, 7, 8, 10, 11, 14, 15, 18]);
/// Leaf 7 EBX: SGX, HLE, RTM, RDT monitoring and allocation, MPX, processor trace.
const LEAF7_EBX_PLATFORM: u32 = bits(&[2, 4, 11, 12, 14, 15, 25]);
/// Leaf 7 EBX: every AVX-512 subset (F, DQ, IFMA, PF, ER, CD, BW, VL) and PCOMMIT.
const LEAF7_EBX_AVX512: u32 = bits(&[16, 17, 21, 22, 26, 27, 28, 30, 31]);
/// Leaf 7 EBX: RDSEED, ADX, SMAP, CLFLUSHOPT, CLWB (Broadwell and Skylake additions).
const LEAF7_EBX_LATER: u32 = bits(&[18, 19, 20, 23, 24]);
/// Leaf 7 EBX: SHA extensions.
const LEAF7_EBX_SHA: u32 = bits(&[29]);
/// Leaf 7 EBX: BMI1, AVX2, BMI2, INVPCID (Haswell additions).
const LEAF7_EBX_HASWELL: u32 = bits(&[3, 5, 8, 10]);
/// Leaf 7 EDX: everything but the speculation-control enumeration (MD_CLEAR, IBRS/IBPB,
/// STIBP, L1D_FLUSH, ARCH_CAPABILITIES, SSBD), which a guest needs to protect itself.
const LEAF7_EDX_ALL_BUT_MITIGATIONS: u32 = !bits(&[10, 26, 27, 28, 29, 31]);
/// Leaf 0xD subleaf 0 EAX: state components beyond x87, SSE and AVX (MPX, AVX-512, PKRU,
/// AMX).
const XSAVE_BEYOND_AVX: u32 = bits(&[3, 4, 5, 6, 7, 9, 17, 18]);
/// Leaf 0xD subleaf 1 EAX: XSAVEC, XGETBV with ECX=1, XSAVES.
const XSAVE_COMPACT: u32 = bits(&[1, 2, 3]);
/// Leaf 0x8000_0001 EDX: 1 GiB pages.
const EXT_EDX_1G_PAGES: u32 = bits(&[26]);
/// Leaf 0x8000_0001 ECX: SVM.
const EXT_ECX_SVM: u32 = bits(&[2]);
/// Leaf 1 ECX: FMA, MOVBE (Haswell additions).
const LEAF1_ECX_HASWELL: u32 = bits(&[12, 22]);
/// Leaf 0x8000_0001 ECX: LZCNT, PREFETCHW (Haswell and Broadwell additions).
const EXT_ECX_HASWELL: u32 = bits(&[5, 8]);

/// What every template hides.
const COMMON: &[Mask] = &[
    mask(0x1, 0, Reg::Ecx, HOST_FEATURES_ECX),
    mask(0x7, 0, Reg::Ebx, LEAF7_EBX_PLATFORM | LEAF7_EBX_AVX512),
    mask(0x7, 0, Reg::Ecx, u32::MAX),
    mask(0x7, 0, Reg::Edx, LEAF7_EDX_ALL_BUT_MITIGATIONS),
    mask(0x7, 1, Reg::Eax, u32::MAX),
    mask(0xd, 0, Reg::Eax, XSAVE_BEYOND_AVX),
    mask(0x8000_0001, 0, Reg::Edx, EXT_EDX_1G_PAGES),
];

/// T2 and T2S (Intel, Haswell-class): no Broadwell or later features, no compact XSAVE.
const T2: &[Mask] = &[
    mask(0x7, 0, Reg::Ebx, LEAF7_EBX_LATER | LEAF7_EBX_SHA),
    mask(0xd, 1, Reg::Eax, XSAVE_COMPACT),
];

/// T2CL (Intel, Cascade Lake-class without AVX-512): keeps RDSEED, ADX, SMAP, CLFLUSHOPT,
/// CLWB and compact XSAVE.
const T2CL: &[Mask] = &[mask(0x7, 0, Reg::Ebx, LEAF7_EBX_SHA)];

/// T2A (AMD, Milan-class without what Intel T2 guests lack): keeps SHA and the Broadwell
/// additions, hides SVM.
const T2A: &[Mask] = &[mask(0x8000_0001, 0, Reg::Ecx, EXT_ECX_SVM)];

/// C3 (Intel, Ivy Bridge-class): T2 without the Haswell additions (AVX2, BMI, FMA, MOVBE,
/// INVPCID, LZCNT, PREFETCHW).
const C3: &[Mask] = &[
    mask(
        0x7,
        0,
        Reg::Ebx,
        LEAF7_EBX_LATER | LEAF7_EBX_SHA | LEAF7_EBX_HASWELL,
    ),
    mask(0xd, 1, Reg::Eax, XSAVE_COMPACT),
    mask(0x1, 0, Reg::Ecx, LEAF1_ECX_HASWELL),
    mask(0x8000_0001, 0, Reg::Ecx, EXT_ECX_HASWELL),
];

fn vendor_name(v: Vendor) -> &'static str {
    match v {
        Vendor::Intel => "Intel",
        Vendor::Amd => "AMD",
        Vendor::Other => "neither Intel nor AMD",
    }
}

/// Applies `template` to the CPUID list KVM supports, before per-vCPU normalisation.
pub fn apply(
    entries: &mut Vec<kvm_cpuid_entry2>,
    template: CpuTemplate,
) -> Result<(), CpuTemplateError> {
    let (needs, masks) = match template {
        CpuTemplate::None => return Ok(()),
        CpuTemplate::V1N1 => return Err(CpuTemplateError::OtherArch(template)),
        CpuTemplate::T2 | CpuTemplate::T2S => (Vendor::Intel, T2),
        CpuTemplate::T2CL => (Vendor::Intel, T2CL),
        CpuTemplate::C3 => (Vendor::Intel, C3),
        CpuTemplate::T2A => (Vendor::Amd, T2A),
    };
    let host = vendor(entries);
    if host != needs {
        return Err(CpuTemplateError::Vendor {
            template,
            needs: vendor_name(needs),
            host: vendor_name(host),
        });
    }
    for m in COMMON.iter().chain(masks) {
        for e in entries
            .iter_mut()
            .filter(|e| e.function == m.function && e.index == m.index)
        {
            let reg = match m.reg {
                Reg::Eax => &mut e.eax,
                Reg::Ebx => &mut e.ebx,
                Reg::Ecx => &mut e.ecx,
                Reg::Edx => &mut e.edx,
            };
            *reg &= !m.clear;
        }
    }
    // The save areas of hidden XSAVE components are not described either.
    entries.retain(|e| {
        !(e.function == 0xd
            && e.index >= 2
            && e.index < 32
            && XSAVE_BEYOND_AVX & (1 << e.index) != 0)
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, value: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: value,
            ebx: value,
            ecx: value,
            edx: value,
            ..Default::default()
        }
    }

    /// A host that has every feature bit, with the given vendor string.
    fn host(vendor: &[u8; 12]) -> Vec<kvm_cpuid_entry2> {
        let word =
            |i: usize| u32::from_le_bytes([vendor[i], vendor[i + 1], vendor[i + 2], vendor[i + 3]]);
        let mut v = vec![kvm_cpuid_entry2 {
            function: 0,
            eax: 0xd,
            ebx: word(0),
            edx: word(4),
            ecx: word(8),
            ..Default::default()
        }];
        for (f, i) in [
            (1, 0),
            (7, 0),
            (7, 1),
            (0xd, 0),
            (0xd, 1),
            (0xd, 2),
            (0xd, 5),
            (0xd, 9),
            (0x8000_0001, 0),
        ] {
            v.push(entry(f, i, u32::MAX));
        }
        v
    }

    fn get(v: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *v.iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    #[test]
    fn t2_hides_avx512_and_later_features_but_keeps_avx2_and_mitigations() {
        let mut v = host(b"GenuineIntel");
        apply(&mut v, CpuTemplate::T2).unwrap();
        let l7 = get(&v, 7, 0);
        assert_eq!(l7.ebx & (1 << 16), 0, "AVX512F");
        assert_eq!(l7.ebx & (1 << 18), 0, "RDSEED");
        assert_ne!(l7.ebx & (1 << 5), 0, "AVX2 kept");
        assert_eq!(l7.ecx, 0);
        assert_eq!(l7.edx, bits(&[10, 26, 27, 28, 29, 31]));
        assert_eq!(get(&v, 0xd, 0).eax, !XSAVE_BEYOND_AVX);
        assert!(
            v.iter()
                .all(|e| !(e.function == 0xd && (e.index == 5 || e.index == 9)))
        );
        assert!(
            v.iter().any(|e| e.function == 0xd && e.index == 2),
            "AVX state kept"
        );
        assert_eq!(get(&v, 1, 0).ecx & (1 << 5), 0, "VMX");
        assert_ne!(get(&v, 1, 0).ecx & (1 << 12), 0, "FMA kept");
    }

    #[test]
    fn c3_also_hides_haswell_features() {
        let mut v = host(b"GenuineIntel");
        apply(&mut v, CpuTemplate::C3).unwrap();
        assert_eq!(get(&v, 7, 0).ebx & LEAF7_EBX_HASWELL, 0);
        assert_eq!(get(&v, 1, 0).ecx & LEAF1_ECX_HASWELL, 0);
        assert_eq!(get(&v, 0x8000_0001, 0).ecx & EXT_ECX_HASWELL, 0);
    }

    #[test]
    fn t2cl_keeps_broadwell_and_skylake_additions() {
        let mut v = host(b"GenuineIntel");
        apply(&mut v, CpuTemplate::T2CL).unwrap();
        let l7 = get(&v, 7, 0);
        assert_eq!(l7.ebx & LEAF7_EBX_LATER, LEAF7_EBX_LATER);
        assert_eq!(l7.ebx & LEAF7_EBX_AVX512, 0);
        assert_eq!(get(&v, 0xd, 1).eax & XSAVE_COMPACT, XSAVE_COMPACT);
    }

    #[test]
    fn t2a_is_for_amd_and_hides_svm() {
        let mut v = host(b"AuthenticAMD");
        apply(&mut v, CpuTemplate::T2A).unwrap();
        assert_eq!(get(&v, 0x8000_0001, 0).ecx & EXT_ECX_SVM, 0);
        assert_ne!(get(&v, 7, 0).ebx & LEAF7_EBX_SHA, 0);
        let mut intel = host(b"GenuineIntel");
        assert_eq!(
            apply(&mut intel, CpuTemplate::T2A),
            Err(CpuTemplateError::Vendor {
                template: CpuTemplate::T2A,
                needs: "AMD",
                host: "Intel"
            })
        );
        let mut amd = host(b"AuthenticAMD");
        assert!(apply(&mut amd, CpuTemplate::T2).is_err());
    }

    #[test]
    fn none_changes_nothing_and_v1n1_is_refused() {
        let mut v = host(b"GenuineIntel");
        let before: Vec<_> = v
            .iter()
            .map(|e| (e.function, e.index, e.eax, e.ebx, e.ecx, e.edx))
            .collect();
        apply(&mut v, CpuTemplate::None).unwrap();
        let after: Vec<_> = v
            .iter()
            .map(|e| (e.function, e.index, e.eax, e.ebx, e.ecx, e.edx))
            .collect();
        assert_eq!(before, after);
        assert_eq!(
            apply(&mut v, CpuTemplate::V1N1),
            Err(CpuTemplateError::OtherArch(CpuTemplate::V1N1))
        );
    }
}
