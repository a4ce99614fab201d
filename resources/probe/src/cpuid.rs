//! The `cpuid` check: what Linux reads to learn it is a guest and how many CPUs it has.

use crate::Boot;
use crate::cpu::cpuid;
use crate::line::Detail;

const LEAF_BASIC: u32 = 0;
const LEAF_FEATURES: u32 = 1;
const LEAF_TOPOLOGY: u32 = 0xb;
const TOPOLOGY_CORE_LEVEL: u32 = 1;
const FEATURES_ECX_HYPERVISOR: u32 = 1 << 31;

pub fn check(boot: &Boot, d: &mut Detail) -> bool {
    let Some(expected) = boot.cmdline.require_u64(b"probe.vcpus", d) else {
        return false;
    };
    let max_leaf = cpuid(LEAF_BASIC, 0).eax;
    let features = cpuid(LEAF_FEATURES, 0);
    let apic_id = features.ebx >> 24;
    let (vcpus, leaf) = if max_leaf >= LEAF_TOPOLOGY {
        let core_level = cpuid(LEAF_TOPOLOGY, TOPOLOGY_CORE_LEVEL);
        (core_level.ebx & 0xffff, LEAF_TOPOLOGY)
    } else {
        ((features.ebx >> 16) & 0xff, LEAF_FEATURES)
    };
    d.str(b"vcpus=")
        .dec(u64::from(vcpus))
        .str(b" apic_id=")
        .dec(u64::from(apic_id))
        .str(b" leaf=")
        .hex(u64::from(leaf));

    let mut ok = true;
    if features.ecx & FEATURES_ECX_HYPERVISOR == 0 {
        d.str(b" hypervisor bit clear");
        ok = false;
    }
    if apic_id != 0 {
        d.str(b" BSP APIC ID not 0");
        ok = false;
    }
    if u64::from(vcpus) != expected {
        d.str(b" expected vcpus=").dec(expected);
        ok = false;
    }
    ok
}
