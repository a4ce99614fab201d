//! Where things live in guest physical memory (DESIGN.md "x86_64 guest memory map").

/// Boot GDT and IDT.
pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
/// Initial stack pointer of the boot vCPU; grows down into free low memory.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Boot page tables: an identity map of the first 1 GiB with 2 MiB pages.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// PVH start info and its memory map, for kernels entered through the PVH note.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Start of the extended BIOS data area; the MP table lives here and RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables: the RSDP here, where the legacy scan of 0xe0000-0xfffff finds it, and the
/// other tables after it, up to 1 MiB. The e820 map leaves this range out of RAM.
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = HIMEM_START;
/// Where the kernel is loaded (the boot protocol's high memory).
pub const HIMEM_START: u64 = 0x10_0000;
/// The MMIO gap below 4 GiB: no RAM here.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// RAM beyond the gap starts here.
pub const HIGH_RAM_START: u64 = MMIO_GAP_END;
/// The range the device manager hands virtio-mmio windows out of (4 KiB each).
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_END: u64 = 0xe000_0000;
/// The PCI root complex (`--enable-pci`): the 32-bit window its functions' BARs are placed
/// in (the part of the MMIO gap below the virtio-mmio windows), and ECAM for bus 0 right
/// after the virtio-mmio windows. MCFG and the DSDT's host bridge describe both.
pub const PCI_MMIO32_START: u64 = MMIO_GAP_START;
pub const PCI_MMIO32_END: u64 = VIRTIO_MMIO_START;
pub const PCI_ECAM_START: u64 = VIRTIO_MMIO_END;
/// One bus: 32 devices x 8 functions x 4 KiB.
pub const PCI_ECAM_LEN: u64 = 1 << 20;
/// The 64-bit window for large BARs: from the first 1 GiB boundary above guest RAM (and
/// never below 4 GiB), this long. 64 GiB holds any BAR an edge accelerator has while
/// staying far below the 40 physical address bits of the smallest hosts.
pub const PCI_MMIO64_LEN: u64 = 64 << 30;
/// Interrupt lines the device manager hands to devices: the IOAPIC pins above the PC's
/// fixed ones (0-4), up to the last of its 24 pins.
pub const DEVICE_IRQ_FIRST: u32 = 5;
pub const DEVICE_IRQ_LAST: u32 = 23;
/// With the PCI root complex, the last four of those are PCI INTx lines (as a PC's PIRQ
/// lines sit at 16-23): level-triggered, active low, never an ISA IRQ, and described to the
/// guest by the host bridge's `_PRT`. Virtio devices on the PCI bus use MSI-X instead.
pub const PCI_INTX_GSI_FIRST: u32 = 20;
pub const PCI_INTX_GSI_LAST: u32 = 23;

/// The PC's legacy devices: the console UART (COM1), the i8042 keyboard controller.
pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_DATA_PORT: u64 = 0x60;
pub const I8042_COMMAND_PORT: u64 = 0x64;
pub const I8042_IRQ: u32 = 1;
/// Interrupt controllers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// The ACPI power-management registers (port I/O): sleep control, sleep status, reset.
pub const PM_PORT_START: u64 = 0x600;

// Device windows and the legacy devices stay clear of RAM and of each other.
const _: () = assert!(VIRTIO_MMIO_START >= MMIO_GAP_START && VIRTIO_MMIO_END <= IOAPIC_START);
const _: () = assert!(PCI_MMIO32_END <= VIRTIO_MMIO_START);
const _: () =
    assert!(PCI_ECAM_START >= VIRTIO_MMIO_END && PCI_ECAM_START + PCI_ECAM_LEN <= IOAPIC_START);
const _: () = assert!(DEVICE_IRQ_FIRST > COM1_IRQ && DEVICE_IRQ_FIRST > I8042_IRQ);
const _: () = assert!(
    PCI_INTX_GSI_FIRST >= 16
        && PCI_INTX_GSI_FIRST <= PCI_INTX_GSI_LAST
        && PCI_INTX_GSI_LAST <= DEVICE_IRQ_LAST
);
/// KVM needs three pages for the TSS and one for the identity map of real-mode emulation,
/// placed just below the BIOS area at the top of the 32-bit space where no RAM is.
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
pub const KVM_TSS_START: u64 = 0xfffb_d000;

// The boot stack grows down from between the zero page and the page tables.
const _: () =
    assert!(BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000);

/// The guest RAM ranges for `mem_bytes` of memory: everything below the MMIO gap, and the
/// rest from 4 GiB up.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (HIGH_RAM_START, mem_bytes - MMIO_GAP_START),
        ]
    }
}

/// The PCI root's 64-bit window for `mem_bytes` of guest RAM: (start, length).
pub fn pci_mmio64_window(mem_bytes: u64) -> (u64, u64) {
    let ram_end = ram_ranges(mem_bytes)
        .last()
        .map_or(0, |&(start, len)| start + len);
    let start = ram_end.max(HIGH_RAM_START).next_multiple_of(1 << 30);
    (start, PCI_MMIO64_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_split_around_gap() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_ranges(3 << 30), vec![(0, 3 << 30)]);
        assert_eq!(
            ram_ranges(3584 << 20),
            vec![(0, MMIO_GAP_START), (HIGH_RAM_START, 512 << 20)]
        );
    }

    #[test]
    fn pci_64_bit_window_sits_above_ram() {
        assert_eq!(pci_mmio64_window(128 << 20), (4 << 30, 64 << 30));
        // 3.5 GiB of RAM ends at 4.5 GiB: the window starts at the next GiB.
        assert_eq!(pci_mmio64_window(3584 << 20).0, 5 << 30);
        assert_eq!(pci_mmio64_window(4 << 30).0, 5 << 30);
        assert_eq!(pci_mmio64_window(3 << 30).0, 4 << 30);
    }

    #[test]
    fn fixed_areas_do_not_overlap() {
        let areas = [
            (BOOT_GDT_START, 0x20),
            (BOOT_IDT_START, 8),
            (PVH_INFO_START, 0x40),
            (PVH_MEMMAP_START, 0x40 * 20),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x1000),
            (CMDLINE_START, 2048),
            (EBDA_START, 1024),
            (ACPI_START, ACPI_END - ACPI_START),
        ];
        for (i, a) in areas.iter().enumerate() {
            for b in &areas[i + 1..] {
                assert!(
                    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                    "{a:x?} overlaps {b:x?}"
                );
            }
        }
    }
}
