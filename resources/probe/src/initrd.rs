//! The `initrd` check, run only when the test passes `probe.initrd_size`: the initrd is where
//! the boot protocol says, whole, and holds what the test put there.

use crate::Boot;
use crate::line::Detail;
use crate::phys;

/// The byte tests fill their initrds with.
const FILL: u8 = 0x5a;
const PAGE_SIZE: u64 = 4096;

/// Needs the probe's own identity map (run after `memory`): the initrd sits at the top of RAM
/// below the MMIO gap, far above the boot map's first GiB.
pub fn check(boot: &Boot, expected: u64, d: &mut Detail) -> bool {
    let Some(info) = boot.require_info(d) else {
        return false;
    };
    let Some((addr, size)) = info.initrd() else {
        d.str(b"no initrd");
        return false;
    };
    let end = addr.saturating_add(size);
    d.str(b"at=").hex(addr).str(b" size=").dec(size);

    let mut ok = true;
    if size != expected {
        d.str(b" expected size=").dec(expected);
        ok = false;
    }
    if !addr.is_multiple_of(PAGE_SIZE) {
        d.str(b" not page aligned");
        ok = false;
    }
    if !info
        .ram_ranges()
        .any(|e| e.addr <= addr && end <= e.addr.saturating_add(e.size))
    {
        d.str(b" not inside RAM");
        return false;
    }
    if end > boot.mapped_top {
        d.str(b" beyond the probe's identity map");
        return false;
    }
    if size > 0 {
        let (first, last) = (phys::read_u8(addr), phys::read_u8(end - 1));
        if first != FILL {
            d.str(b" first byte=").hex_byte(first);
            ok = false;
        }
        if last != FILL {
            d.str(b" last byte=").hex_byte(last);
            ok = false;
        }
    }
    ok
}
