//! Where things live in an arm64 guest's physical memory (docs/aarch64.md "Memory map").
//!
//! Devices sit below 1 GiB, RAM starts at 2 GiB as on Firecracker's arm64 machines, so a
//! guest of any size has one contiguous RAM range and the device windows never move.

/// The GIC distributor (64 KiB for GICv3; GICv2 uses its first 4 KiB).
pub const GIC_DIST_START: u64 = 0x0800_0000;
pub const GIC_DIST_LEN: u64 = 0x1_0000;
/// GICv2's CPU interface (8 KiB of a 64 KiB slot).
pub const GIC_CPU_START: u64 = 0x0801_0000;
pub const GIC_CPU_LEN: u64 = 0x2000;
/// GICv3's redistributors: two 64 KiB frames (RD and SGI) per vCPU, from here up.
pub const GIC_REDIST_START: u64 = 0x080a_0000;
pub const GIC_REDIST_LEN_PER_CPU: u64 = 0x2_0000;
/// Where the redistributors must end, which bounds the vCPU count (251).
pub const GIC_REDIST_END: u64 = SERIAL_START;
/// The console UART: a 16550 on the MMIO bus, byte-wide registers (ns16550a, reg-shift 0).
pub const SERIAL_START: u64 = 0x0a00_0000;
pub const SERIAL_LEN: u64 = 0x1000;
/// A PL031 real-time clock.
pub const RTC_START: u64 = 0x0a00_1000;
pub const RTC_LEN: u64 = 0x1000;
/// The range the device manager hands virtio-mmio windows out of (4 KiB each).
pub const VIRTIO_MMIO_START: u64 = 0x0a01_0000;
pub const VIRTIO_MMIO_END: u64 = 0x0c00_0000;
/// RAM.
pub const RAM_START: u64 = 0x8000_0000;

/// Interrupts are GSIs, which KVM's vGIC maps to shared peripheral interrupts: GSI n is
/// SPI n (INTID 32 + n), as the device tree names them. The UART and the RTC have fixed
/// lines; devices get the others.
pub const SERIAL_IRQ: u32 = 0;
pub const RTC_IRQ: u32 = 1;
pub const DEVICE_IRQ_FIRST: u32 = 2;
pub const DEVICE_IRQ_LAST: u32 = GIC_SPIS - 1;
/// SPIs the vGIC is set up with (its interrupt count less the 32 private ones, in a
/// multiple of 32 as the GIC requires).
pub const GIC_SPIS: u32 = 96;

/// The device tree goes in the last 2 MiB of RAM (the boot protocol's limit on its size),
/// 8-byte aligned as it requires; the initrd goes right below it.
pub const FDT_MAX_LEN: u64 = 2 << 20;

// The device ranges stay apart and below RAM.
const _: () = assert!(GIC_DIST_START + GIC_DIST_LEN <= GIC_CPU_START);
const _: () = assert!(GIC_CPU_START + GIC_CPU_LEN <= GIC_REDIST_START);
const _: () = assert!(SERIAL_START + SERIAL_LEN <= RTC_START);
const _: () = assert!(RTC_START + RTC_LEN <= VIRTIO_MMIO_START);
const _: () = assert!(VIRTIO_MMIO_END <= RAM_START);

/// The guest RAM ranges for `mem_bytes` of memory: one, from [`RAM_START`].
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    vec![(RAM_START, mem_bytes)]
}

/// How many vCPUs the redistributor range has room for.
pub const fn max_vcpus_for_gicv3() -> u64 {
    (GIC_REDIST_END - GIC_REDIST_START) / GIC_REDIST_LEN_PER_CPU
}

/// The affinity fields KVM gives vCPU `index` in its MPIDR_EL1 (Aff0 the low four bits,
/// Aff1 the next eight), which the device tree's cpu nodes carry in their `reg`.
pub fn mpidr_affinity(index: u8) -> u64 {
    let i = u64::from(index);
    (i & 0xf) | ((i >> 4) << 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_is_one_range_from_2_gib() {
        assert_eq!(ram_ranges(256 << 20), vec![(0x8000_0000, 256 << 20)]);
        assert_eq!(ram_ranges(8 << 30), vec![(0x8000_0000, 8 << 30)]);
    }

    #[test]
    fn the_redistributors_fit_every_vcpu_ember_allows() {
        // Room for 251 vCPUs: ember refuses more with GICv3 (GICv2 stops at 8).
        assert_eq!(max_vcpus_for_gicv3(), 251);
        assert_eq!(mpidr_affinity(0), 0);
        assert_eq!(mpidr_affinity(15), 15);
        assert_eq!(mpidr_affinity(16), 0x100);
        assert_eq!(mpidr_affinity(35), 0x203);
    }
}
