//! The `memory` check: every RAM range the e820 map reports is really there, distinct from
//! the others (no aliasing), and reachable through the probe's own page tables.

use crate::Boot;
use crate::bootinfo::BootInfo;
use crate::e820::MMIO_GAP_END;
use crate::line::Detail;
use crate::{paging, phys};

/// "PROBE" in the high bytes; xor-ed with the address so no two probed words hold the same
/// value, which is what exposes two addresses backed by the same host memory.
const PATTERN: u64 = 0x5052_4f42_4500_0000;
const WORD: u64 = 8;
/// Real-mode IVT/BDA and ember's GDT/IDT live in the first page.
const LOW_PAGE_END: u64 = 0x1000;
/// The boot page tables.
const BOOT_TABLES: (u64, u64) = (0x9000, 0xc000);
/// EBDA (ember's MP table) up to the end of the BIOS area.
const EBDA_TO_1M: (u64, u64) = (0x9_fc00, 0x10_0000);

unsafe extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

/// Memory that holds something of the VMM's or the probe's and must not be written.
struct Protected {
    ranges: [(u64, u64); 9],
}

impl Protected {
    fn new(boot: &Boot, info: &BootInfo) -> Self {
        let cmdline = boot.cmdline.as_bytes();
        let cmdline_start = cmdline.as_ptr() as u64;
        // The zero page, or the PVH start info's page, memory map and module list.
        let [info_a, info_b, info_c] = info.areas();
        // The initrd usually ends at the end of RAM below the gap, on the word probed there;
        // the initrd check reads its last byte afterwards.
        let initrd = info
            .initrd()
            .map_or((0, 0), |(start, size)| (start, start.saturating_add(size)));
        Protected {
            ranges: [
                (0, LOW_PAGE_END),
                info_a,
                info_b,
                info_c,
                initrd,
                BOOT_TABLES,
                (cmdline_start, cmdline_start + cmdline.len() as u64 + 1),
                EBDA_TO_1M,
                (
                    (&raw const __image_start) as u64,
                    (&raw const __image_end) as u64,
                ),
            ],
        }
    }

    fn overlaps(&self, addr: u64) -> bool {
        self.ranges
            .iter()
            .any(|&(start, end)| addr < end && start < addr + WORD)
    }
}

/// The words probed in one RAM range: its last word, and its first one if it lies above
/// 4 GiB (where a wrong guest-to-host mapping would show first).
fn targets(start: u64, end: u64) -> [Option<u64>; 2] {
    if end.saturating_sub(start) < WORD {
        return [None, None];
    }
    let first = (start >= MMIO_GAP_END && start != end - WORD).then_some(start);
    [Some(end - WORD), first]
}

pub fn check(boot: &mut Boot, d: &mut Detail) -> bool {
    let Some(info) = boot.require_info(d) else {
        // Later checks may still need MMIO in the gap.
        boot.mapped_top = paging::identity_map(0);
        return false;
    };
    let top = info
        .ram_ranges()
        .map(|e| e.addr.saturating_add(e.size))
        .max()
        .unwrap_or(0);
    let mapped_top = paging::identity_map(top);
    boot.mapped_top = mapped_top;
    let protected = Protected::new(boot, &info);

    let usable = |addr: u64| addr + WORD <= mapped_top && !protected.overlaps(addr);
    let mut ranges = 0;
    let mut skipped = 0;
    // Write everything first, then read back: a range aliasing another would now show the
    // other's pattern.
    for e in info.ram_ranges() {
        ranges += 1;
        for addr in targets(e.addr, e.addr.saturating_add(e.size))
            .into_iter()
            .flatten()
        {
            if usable(addr) {
                phys::write_u64(addr, PATTERN ^ addr);
            } else {
                skipped += 1;
            }
        }
    }
    d.str(b"ranges=").dec(ranges).str(b" top=").hex(top);
    if skipped > 0 {
        d.str(b" skipped=").dec(skipped);
    }
    if ranges == 0 {
        d.str(b" no RAM in e820");
        return false;
    }
    let mut ok = true;
    for e in info.ram_ranges() {
        for addr in targets(e.addr, e.addr.saturating_add(e.size))
            .into_iter()
            .flatten()
        {
            if !usable(addr) {
                continue;
            }
            let got = phys::read_u64(addr);
            if got != PATTERN ^ addr {
                if ok {
                    d.str(b" mismatch at ").hex(addr).str(b" got ").hex(got);
                }
                ok = false;
            }
        }
    }
    ok
}
