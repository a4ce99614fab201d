//! CPUID as the guest sees it: the host's, as KVM supports it, made consistent with the
//! microVM's vCPU count and topology.
//!
//! Linux sizes its per-CPU structures and scheduler domains from these leaves, so they must
//! agree with the MP table: one package, `vcpu_count` logical processors, one or two threads
//! per core, APIC IDs equal to vCPU indices.

use kvm_bindings::{KVM_CPUID_FLAG_SIGNIFCANT_INDEX, kvm_cpuid_entry2};

const LEAF_VENDOR: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_EXT_ADDR_SIZES: u32 = 0x8000_0008;
const LEAF_EXT_APIC_ID: u32 = 0x8000_001e;
/// The hypervisor range's first leaf: its EAX is the range's last leaf.
const LEAF_HYPERVISOR_BASE: u32 = 0x4000_0000;
/// The timing leaf hypervisors publish: TSC and local APIC bus frequencies in kHz.
const LEAF_HYPERVISOR_TIMING: u32 = 0x4000_0010;
/// KVM's local APIC timer counts at 1 GHz.
const KVM_APIC_BUS_KHZ: u32 = 1_000_000;

const ECX_HYPERVISOR: u32 = 1 << 31;
/// The LAPIC timer's TSC-deadline mode. KVM emulates it in the in-kernel LAPIC (ember
/// requires KVM_CAP_TSC_DEADLINE_TIMER) but leaves the bit for the VMM to set: without it
/// Linux programs the LAPIC timer in one-shot mode, which costs it a calibration at boot.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EDX_HTT: u32 = 1 << 28;

/// Topology level types in leaves 0xB and 0x1F, ECX[15:8].
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// The guest's CPU topology.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    pub vcpu_count: u8,
    pub threads_per_core: u8,
}

impl Topology {
    pub fn new(vcpu_count: u8, smt: bool) -> Self {
        let threads_per_core = if smt && vcpu_count > 1 { 2 } else { 1 };
        Topology {
            vcpu_count,
            threads_per_core,
        }
    }

    fn cores(&self) -> u32 {
        u32::from(self.vcpu_count) / u32::from(self.threads_per_core)
    }

    /// Bits of the APIC ID that number threads within a core.
    fn smt_shift(&self) -> u32 {
        u32::from(self.threads_per_core)
            .next_power_of_two()
            .trailing_zeros()
    }

    /// Bits of the APIC ID that number logical processors within the package.
    fn package_shift(&self) -> u32 {
        u32::from(self.vcpu_count)
            .next_power_of_two()
            .trailing_zeros()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Vendor {
    Intel,
    Amd,
    Other,
}

pub(crate) fn vendor(entries: &[kvm_cpuid_entry2]) -> Vendor {
    let Some(e) = entries.iter().find(|e| e.function == LEAF_VENDOR) else {
        return Vendor::Other;
    };
    let mut id = [0u8; 12];
    id[..4].copy_from_slice(&e.ebx.to_le_bytes());
    id[4..8].copy_from_slice(&e.edx.to_le_bytes());
    id[8..].copy_from_slice(&e.ecx.to_le_bytes());
    match &id {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// Adds the subleaves of leaf 0xB the topology needs when KVM did not list them (some hosts
/// report only subleaf 0), so the guest can count its vCPUs from leaf 0xB.
fn ensure_topology_subleaves(entries: &mut Vec<kvm_cpuid_entry2>) {
    let max_basic = entries
        .iter()
        .find(|e| e.function == LEAF_VENDOR)
        .map_or(0, |e| e.eax);
    if max_basic < LEAF_TOPOLOGY {
        return;
    }
    for index in 0..3 {
        if !entries
            .iter()
            .any(|e| e.function == LEAF_TOPOLOGY && e.index == index)
        {
            entries.push(kvm_cpuid_entry2 {
                function: LEAF_TOPOLOGY,
                index,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            });
        }
    }
}

/// Rewrites `entries` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `vcpu_index`.
pub fn normalize(entries: &mut Vec<kvm_cpuid_entry2>, vcpu_index: u8, topo: Topology) {
    ensure_topology_subleaves(entries);
    let vendor = vendor(entries);
    let apic_id = u32::from(vcpu_index);
    let count = u32::from(topo.vcpu_count);
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((count & 0xff) << 16);
                e.ecx |= ECX_HYPERVISOR | ECX_TSC_DEADLINE;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS if vendor == Vendor::Intel => {
                let cache_level = (e.eax >> 5) & 0x7;
                if e.eax & 0x1f == 0 {
                    continue; // no more caches
                }
                let sharing = match cache_level {
                    1 | 2 => u32::from(topo.threads_per_core),
                    _ => count,
                };
                e.eax &= 0x3fff;
                e.eax |= ((sharing - 1) & 0xfff) << 14;
                e.eax |= ((topo.cores() - 1) & 0x3f) << 26;
            }
            LEAF_PMU => {
                // A virtual PMU is not something ember promises; guests must not rely on one.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = topo.smt_shift();
                        e.ebx = u32::from(topo.threads_per_core);
                        e.ecx = (LEVEL_TYPE_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = topo.package_shift();
                        e.ebx = count;
                        e.ecx = (LEVEL_TYPE_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            LEAF_EXT_ADDR_SIZES if vendor == Vendor::Amd => {
                // NC (cores - 1) and the APIC ID size in bits.
                e.ecx = (e.ecx & !0xf0ff) | (count - 1) | (topo.package_shift() << 12);
            }
            LEAF_EXT_APIC_ID if vendor == Vendor::Amd => {
                e.eax = apic_id;
                let core_id = (apic_id >> topo.smt_shift()) & 0xff;
                e.ebx = (e.ebx & !0xffff) | ((u32::from(topo.threads_per_core) - 1) << 8) | core_id;
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

/// Publishes the guest's TSC frequency (`tsc_khz`, what KVM runs the guest's TSC at) and the
/// local APIC bus frequency in the hypervisor timing leaf 0x4000_0010, as hypervisors do,
/// so a guest without a PIT to calibrate against can read them. Only when the hypervisor
/// range is there (KVM's signature leaf); the range's last leaf is raised to include it.
pub fn publish_tsc_frequency(entries: &mut Vec<kvm_cpuid_entry2>, tsc_khz: u32) {
    let Some(base) = entries
        .iter_mut()
        .find(|e| e.function == LEAF_HYPERVISOR_BASE)
    else {
        return;
    };
    base.eax = base.eax.max(LEAF_HYPERVISOR_TIMING);
    entries.retain(|e| e.function != LEAF_HYPERVISOR_TIMING);
    entries.push(kvm_cpuid_entry2 {
        function: LEAF_HYPERVISOR_TIMING,
        eax: tsc_khz,
        ebx: KVM_APIC_BUS_KHZ,
        ..Default::default()
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn intel() -> Vec<kvm_cpuid_entry2> {
        let mut v = entry(0, 0);
        v.eax = 0x1f;
        v.ebx = u32::from_le_bytes(*b"Genu");
        v.edx = u32::from_le_bytes(*b"ineI");
        v.ecx = u32::from_le_bytes(*b"ntel");
        let mut f1 = entry(1, 0);
        f1.ebx = 0xff00_0800; // stale APIC ID, CLFLUSH size 8
        f1.edx = EDX_HTT;
        let mut l1d = entry(4, 0);
        l1d.eax = (1 << 5) | 1 | (7 << 14) | (63 << 26);
        let mut l3 = entry(4, 3);
        l3.eax = (3 << 5) | 3 | (15 << 14);
        let mut pmu = entry(0xa, 0);
        pmu.eax = 0x0730_0805;
        vec![
            v,
            f1,
            l1d,
            l3,
            pmu,
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
        ]
    }

    fn find(v: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *v.iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    #[test]
    fn feature_leaf_carries_apic_id_count_and_hypervisor_bit() {
        let mut v = intel();
        normalize(&mut v, 3, Topology::new(4, false));
        let f1 = find(&v, 1, 0);
        assert_eq!(f1.ebx >> 24, 3);
        assert_eq!((f1.ebx >> 16) & 0xff, 4);
        assert_eq!(f1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(f1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(f1.ecx & ECX_TSC_DEADLINE, 0, "TSC-deadline timer offered");
        assert_ne!(f1.edx & EDX_HTT, 0);

        let mut v = intel();
        normalize(&mut v, 0, Topology::new(1, false));
        assert_eq!(find(&v, 1, 0).edx & EDX_HTT, 0);
    }

    #[test]
    fn topology_leaf_matches_vcpu_count() {
        for (count, smt) in [(1, false), (4, false), (6, true), (32, true)] {
            let mut v = intel();
            normalize(&mut v, 1, Topology::new(count, smt));
            let smt_level = find(&v, 0xb, 0);
            let core_level = find(&v, 0xb, 1);
            let threads = if smt { 2 } else { 1 };
            assert_eq!(smt_level.ebx, threads);
            assert_eq!(smt_level.ecx, 1 << 8);
            assert_eq!(core_level.ebx, u32::from(count), "count {count}");
            assert_eq!(core_level.ecx, (2 << 8) | 1);
            assert!(1u32 << core_level.eax >= u32::from(count));
            assert_eq!(core_level.edx, 1);
            assert_eq!(find(&v, 0xb, 2).ecx, 2, "terminating level");
        }
    }

    #[test]
    fn missing_topology_subleaves_added() {
        let mut v = intel();
        v.retain(|e| !(e.function == 0xb && e.index > 0));
        normalize(&mut v, 0, Topology::new(3, false));
        let core_level = find(&v, 0xb, 1);
        assert_eq!(core_level.ebx, 3);
        assert_eq!(core_level.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
        // A CPU whose max basic leaf is below 0xB gets none.
        let mut v = intel();
        v.retain(|e| e.function != 0xb);
        v[0].eax = 0xa;
        normalize(&mut v, 0, Topology::new(3, false));
        assert!(v.iter().all(|e| e.function != 0xb));
    }

    #[test]
    fn cache_sharing_and_pmu() {
        let mut v = intel();
        normalize(&mut v, 0, Topology::new(8, true));
        let l1 = find(&v, 4, 0);
        assert_eq!(
            (l1.eax >> 14) & 0xfff,
            1,
            "L1 shared by the two threads of a core"
        );
        assert_eq!(l1.eax >> 26, 3, "four cores");
        assert_eq!(l1.eax & 0x3fff, (1 << 5) | 1, "cache type/level kept");
        let l3 = find(&v, 4, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 7);
        assert_eq!(find(&v, 0xa, 0).eax, 0);
    }

    #[test]
    fn amd_core_count() {
        let mut v0 = entry(0, 0);
        v0.ebx = u32::from_le_bytes(*b"Auth");
        v0.edx = u32::from_le_bytes(*b"enti");
        v0.ecx = u32::from_le_bytes(*b"cAMD");
        let mut sizes = entry(0x8000_0008, 0);
        sizes.ecx = 0xffff_ffff;
        let mut v = vec![v0, sizes, entry(0x8000_001e, 0)];
        normalize(&mut v, 2, Topology::new(4, false));
        let s = find(&v, 0x8000_0008, 0);
        assert_eq!(s.ecx & 0xff, 3);
        assert_eq!((s.ecx >> 12) & 0xf, 2);
        assert_eq!(find(&v, 0x8000_001e, 0).eax, 2);
    }

    #[test]
    fn tsc_frequency_goes_into_the_hypervisor_timing_leaf() {
        let mut v = intel();
        let mut base = entry(LEAF_HYPERVISOR_BASE, 0);
        base.eax = 0x4000_0001;
        v.push(base);
        publish_tsc_frequency(&mut v, 2_594_006);
        assert_eq!(
            find(&v, LEAF_HYPERVISOR_BASE, 0).eax,
            LEAF_HYPERVISOR_TIMING
        );
        let t = find(&v, LEAF_HYPERVISOR_TIMING, 0);
        assert_eq!((t.eax, t.ebx), (2_594_006, 1_000_000));
        // Again (a second vCPU's copy): still one timing leaf.
        publish_tsc_frequency(&mut v, 2_594_006);
        assert_eq!(
            v.iter()
                .filter(|e| e.function == LEAF_HYPERVISOR_TIMING)
                .count(),
            1
        );
        // Without KVM's range nothing is added.
        let mut bare = intel();
        publish_tsc_frequency(&mut bare, 1);
        assert!(bare.iter().all(|e| e.function != LEAF_HYPERVISOR_TIMING));
    }
}
