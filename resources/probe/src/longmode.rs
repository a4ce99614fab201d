//! The `longmode` check: the CPU state the 64-bit boot protocol promises on entry.

use crate::cpu;
use crate::line::Detail;
use crate::phys;

const MSR_EFER: u32 = 0xc000_0080;
const EFER_LMA: u64 = 1 << 10;
const CR0_PE: u64 = 1 << 0;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
/// The L (64-bit code) bit of a segment descriptor.
const DESC_L: u64 = 1 << 53;

pub fn check(d: &mut Detail) -> bool {
    let efer = cpu::rdmsr(MSR_EFER);
    let cr0 = cpu::cr0();
    let cr4 = cpu::cr4();
    let cs = cpu::cs();
    d.str(b"efer=")
        .hex(efer)
        .str(b" cr0=")
        .hex(cr0)
        .str(b" cr4=")
        .hex(cr4)
        .str(b" cs=")
        .hex(u64::from(cs));

    let mut ok = true;
    if efer & EFER_LMA == 0 {
        d.str(b" EFER.LMA clear");
        ok = false;
    }
    if cr0 & (CR0_PE | CR0_PG) != CR0_PE | CR0_PG {
        d.str(b" CR0.PE/PG clear");
        ok = false;
    }
    if cr4 & CR4_PAE == 0 {
        d.str(b" CR4.PAE clear");
        ok = false;
    }
    // We run 64-bit code, so CS.L is set in the cached descriptor; check that the GDT the
    // VMM built says so too, since a guest reloading CS would get what the GDT says.
    let gdt = cpu::sgdt();
    let (base, limit) = (gdt.base, u64::from(gdt.limit));
    let index = u64::from(cs & !7);
    if index + 7 > limit || base >= 1 << 30 {
        d.str(b" CS outside GDT");
        ok = false;
    } else if phys::read_u64(base + index) & DESC_L == 0 {
        d.str(b" GDT CS.L clear");
        ok = false;
    }
    ok
}
