//! Privileged x86 instructions the checks need, one thin wrapper each.

use core::arch::asm;

pub const PORT_I8042_DATA: u16 = 0x60;
/// Commands when written, the status register when read.
pub const PORT_I8042_COMMAND: u16 = 0x64;

#[inline(always)]
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O touches no memory of ours. Not `nomem`: a port access must stay
    // ordered with the memory accesses around it (a device may read what we just wrote).
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nostack, preserves_flags)) };
}

#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for outb.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nostack, preserves_flags)) };
    value
}

#[inline(always)]
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for outb.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags))
    };
}

#[inline(always)]
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for outb.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nostack, preserves_flags))
    };
    value
}

#[inline(always)]
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: only called for architectural MSRs that exist in long mode.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

#[inline(always)]
pub fn cr0() -> u64 {
    let value: u64;
    // SAFETY: reading a control register has no side effects.
    unsafe { asm!("mov {}, cr0", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

#[inline(always)]
pub fn cr4() -> u64 {
    let value: u64;
    // SAFETY: reading a control register has no side effects.
    unsafe { asm!("mov {}, cr4", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

#[inline(always)]
pub fn cs() -> u16 {
    let value: u16;
    // SAFETY: reading a segment selector has no side effects.
    unsafe { asm!("mov {:x}, cs", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// The pseudo-descriptor `sgdt`/`lidt` use.
#[repr(C, packed)]
pub struct DescriptorTable {
    pub limit: u16,
    pub base: u64,
}

pub fn sgdt() -> DescriptorTable {
    let mut table = DescriptorTable { limit: 0, base: 0 };
    // SAFETY: sgdt stores 10 bytes into `table`, which is exactly that size.
    unsafe { asm!("sgdt [{}]", in(reg) &raw mut table, options(nostack, preserves_flags)) };
    table
}

/// Switches to the page tables at `pml4`, which must identity-map the running code, its
/// stack and data.
pub unsafe fn write_cr3(pml4: u64) {
    // SAFETY: the caller guarantees the new tables map everything in use identically.
    unsafe { asm!("mov cr3, {}", in(reg) pml4, options(nostack, preserves_flags)) };
}

/// The time-stamp counter: the only clock the probe has (no timer, interrupts off).
#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc only reads the counter, and CPL 0 may always run it (CR4.TSD or not).
    unsafe { core::arch::x86_64::_rdtsc() }
}

pub struct CpuidResult {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
}

pub fn cpuid(leaf: u32, subleaf: u32) -> CpuidResult {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    CpuidResult {
        eax: r.eax,
        ebx: r.ebx,
        ecx: r.ecx,
    }
}
