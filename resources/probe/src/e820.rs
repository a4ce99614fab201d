//! The `e820` check: the RAM map is exactly what ember promises for `probe.mem_mib`.

use crate::Boot;
use crate::bootinfo::BootInfo;
use crate::bootparams::E820_MAX_ENTRIES;
use crate::line::Detail;
use crate::startinfo::MEMMAP_MAX_ENTRIES;

const MIB: u64 = 1 << 20;
/// Low RAM ends where the EBDA (and ember's MP table) begins.
const LOW_RAM_END: u64 = 0x9_fc00;
const HIGH_RAM_START: u64 = 0x10_0000;
/// Start of the MMIO gap below 4 GiB; RAM that does not fit below it continues at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 1 << 32;

/// The RAM ranges (start, end) ember must report for a guest of `mem_mib` MiB.
fn expected_ram(mem_mib: u64) -> Option<([(u64, u64); 3], usize)> {
    let bytes = mem_mib.checked_mul(MIB)?;
    let mut ranges = [(0, LOW_RAM_END), (HIGH_RAM_START, bytes), (0, 0)];
    if bytes <= MMIO_GAP_START {
        return Some((ranges, 2));
    }
    ranges[1].1 = MMIO_GAP_START;
    ranges[2] = (
        MMIO_GAP_END,
        MMIO_GAP_END.checked_add(bytes - MMIO_GAP_START)?,
    );
    Some((ranges, 3))
}

fn describe_ram(info: &BootInfo, d: &mut Detail) {
    let mut first = true;
    for e in info.ram_ranges() {
        if !first {
            d.byte(b' ');
        }
        first = false;
        d.range(e.addr, e.addr.wrapping_add(e.size));
    }
    if first {
        d.str(b"none");
    }
}

/// The map's entry count if it is more than the probe reads.
fn too_many_entries(info: &BootInfo, d: &mut Detail) -> bool {
    match info {
        BootInfo::ZeroPage(zp) if zp.e820_raw_len() > E820_MAX_ENTRIES => {
            d.str(b"e820_entries=").dec(u64::from(zp.e820_raw_len()));
            true
        }
        BootInfo::StartInfo(si) if si.memmap_raw_len() > MEMMAP_MAX_ENTRIES => {
            d.str(b"memmap_entries=")
                .dec(u64::from(si.memmap_raw_len()));
            true
        }
        _ => false,
    }
}

/// The RAM map, from the zero page's e820 table or the PVH start info's memory map.
pub fn check(boot: &Boot, d: &mut Detail) -> bool {
    let Some(info) = boot.require_info(d) else {
        return false;
    };
    if too_many_entries(&info, d) {
        return false;
    }
    let Some(mem_mib) = boot.cmdline.require_u64(b"probe.mem_mib", d) else {
        d.str(b"; got ");
        describe_ram(&info, d);
        return false;
    };
    let Some((want, want_len)) = expected_ram(mem_mib) else {
        d.str(b"probe.mem_mib too large");
        return false;
    };

    let mut matches = true;
    let mut count = 0;
    let mut total: u64 = 0;
    for e in info.ram_ranges() {
        let end = e.addr.wrapping_add(e.size);
        match want.get(count) {
            Some(&(start, want_end)) if count < want_len && start == e.addr && want_end == end => {}
            _ => matches = false,
        }
        count += 1;
        total = total.wrapping_add(e.size);
    }
    if matches && count == want_len {
        d.str(b"ram_mib=").dec(total / MIB);
        return true;
    }
    d.str(b"got ");
    describe_ram(&info, d);
    d.str(b" want");
    for &(start, end) in &want[..want_len] {
        d.byte(b' ').range(start, end);
    }
    false
}
