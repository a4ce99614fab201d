//! The probe's own identity map, replacing the boot map (first GiB only) so it can reach RAM
//! above 1 GiB and device MMIO in the gap below 4 GiB, as Linux does once it runs.

use crate::cpu;
use crate::e820::{MMIO_GAP_END, MMIO_GAP_START};

const GIB: u64 = 1 << 30;
/// What the probe runs on until `identity_map`: ember's boot map for the 64-bit entry, the
/// PVH entry's own map otherwise. Both cover only the first GiB; nothing above can be read.
pub const BOOT_MAP_END: u64 = GIB;
const PAGE_2M: u64 = 1 << 21;
const ENTRIES: usize = 512;
/// Enough page directories for 16 GiB of 2 MiB pages; RAM above that stays unmapped.
pub const MAX_GIB: usize = 16;
/// Always map the MMIO gap, whatever the RAM size.
const MIN_GIB: usize = 4;

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const WRITE_THROUGH: u64 = 1 << 3;
const CACHE_DISABLE: u64 = 1 << 4;
const HUGE: u64 = 1 << 7;

#[repr(C, align(4096))]
struct Tables {
    pml4: [u64; ENTRIES],
    pdpt: [u64; ENTRIES],
    pd: [[u64; ENTRIES]; MAX_GIB],
}

// In a NOLOAD section that _start does not zero: every entry is written before CR3 points
// here, which is cheaper than zeroing 72 KiB and then writing most of it again.
#[unsafe(link_section = ".pagetables")]
static mut TABLES: Tables = Tables {
    pml4: [0; ENTRIES],
    pdpt: [0; ENTRIES],
    pd: [[0; ENTRIES]; MAX_GIB],
};

/// Identity-maps [0, top rounded up to 1 GiB) with 2 MiB pages (at least 4 GiB, at most
/// 16 GiB), the MMIO gap uncached, and switches to it. Returns the end of the map.
#[inline(never)]
pub fn identity_map(top: u64) -> u64 {
    let gib = (top.div_ceil(GIB) as usize).clamp(MIN_GIB, MAX_GIB);
    let tables = &raw mut TABLES;
    // SAFETY: the probe is single-threaded and nothing else refers to TABLES; the new map
    // keeps every address the probe uses (below 4 GiB) at the same place.
    unsafe {
        let pml4 = &raw mut (*tables).pml4;
        let pdpt = &raw mut (*tables).pdpt;
        for i in 0..ENTRIES {
            (*pml4)[i] = 0;
            (*pdpt)[i] = 0;
        }
        (*pml4)[0] = pdpt as u64 | PRESENT | WRITABLE;
        for g in 0..gib {
            let pd = &raw mut (*tables).pd[g];
            (*pdpt)[g] = pd as u64 | PRESENT | WRITABLE;
            let mut addr = g as u64 * GIB;
            for entry in (*pd).iter_mut() {
                let mut flags = PRESENT | WRITABLE | HUGE;
                if (MMIO_GAP_START..MMIO_GAP_END).contains(&addr) {
                    flags |= CACHE_DISABLE | WRITE_THROUGH;
                }
                *entry = addr | flags;
                addr += PAGE_2M;
            }
        }
        cpu::write_cr3(pml4 as u64);
    }
    gib as u64 * GIB
}
