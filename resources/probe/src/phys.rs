//! Access to guest-physical memory through the identity map (physical = virtual).
//!
//! Reads and writes are volatile: the memory belongs to the VMM's world (zero page, tables it
//! wrote, RAM we probe), and the compiler must not merge or drop any access.

use core::ptr::{read_volatile, write_volatile};

pub fn read_u8(addr: u64) -> u8 {
    // SAFETY: callers only pass addresses inside the current identity map.
    unsafe { read_volatile(addr as *const u8) }
}

pub fn read_u16(addr: u64) -> u16 {
    // SAFETY: as for read_u8; x86 allows unaligned access.
    unsafe { read_volatile(addr as *const u16) }
}

pub fn read_u32(addr: u64) -> u32 {
    // SAFETY: as for read_u16.
    unsafe { read_volatile(addr as *const u32) }
}

pub fn read_u64(addr: u64) -> u64 {
    // SAFETY: as for read_u16.
    unsafe { read_volatile(addr as *const u64) }
}

pub fn write_u32(addr: u64, value: u32) {
    // SAFETY: callers only write device registers or memory the probe owns.
    unsafe { write_volatile(addr as *mut u32, value) }
}

pub fn write_u64(addr: u64, value: u64) {
    // SAFETY: callers only write RAM that holds nothing of the probe's or the VMM's.
    unsafe { write_volatile(addr as *mut u64, value) }
}

/// Sum of `len` bytes modulo 256, as the MP spec's checksums use.
pub fn byte_sum(addr: u64, len: u64) -> u8 {
    let mut sum: u8 = 0;
    let mut a = addr;
    while a < addr + len {
        sum = sum.wrapping_add(read_u8(a));
        a += 1;
    }
    sum
}
