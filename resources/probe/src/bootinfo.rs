//! What the boot protocol hands over, whichever way the probe was entered: the Linux zero
//! page (64-bit entry) or the PVH start info (PVH entry). Both carry what the later checks
//! read, the command line, the memory map and the initrd, so those checks work on either.

use crate::bootparams::{E820_RAM, E820Entry, ZeroPage};
use crate::startinfo::StartInfo;

const PAGE_SIZE: u64 = 4096;

/// How the probe was entered.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Linux 64-bit boot protocol: long mode, `rsi` = zero page.
    Linux64,
    /// PVH: 32-bit protected mode through the ELF note, `ebx` = start info.
    Pvh,
}

#[derive(Clone, Copy)]
pub enum BootInfo {
    ZeroPage(ZeroPage),
    StartInfo(StartInfo),
}

impl BootInfo {
    /// Number of memory map entries, clamped to what the probe reads.
    pub fn map_len(&self) -> u32 {
        match self {
            BootInfo::ZeroPage(zp) => u32::from(zp.e820_len()),
            BootInfo::StartInfo(si) => si.memmap_len(),
        }
    }

    pub fn map_entry(&self, index: u32) -> E820Entry {
        match self {
            // index < map_len() <= 128: the cast is lossless.
            BootInfo::ZeroPage(zp) => zp.e820_entry(index as u8),
            BootInfo::StartInfo(si) => si.memmap_entry(index),
        }
    }

    /// Type-1 (RAM) entries, in table order.
    pub fn ram_ranges(&self) -> impl Iterator<Item = E820Entry> + '_ {
        (0..self.map_len())
            .map(|i| self.map_entry(i))
            .filter(|e| e.kind == E820_RAM)
    }

    /// The initrd as (address, size): the zero page's ramdisk fields, or PVH module 0.
    pub fn initrd(&self) -> Option<(u64, u64)> {
        match self {
            BootInfo::ZeroPage(zp) => zp.initrd(),
            BootInfo::StartInfo(si) => si.first_module(),
        }
    }

    /// Where the VMM says the ACPI RSDP is; 0 if it did not say.
    pub fn rsdp_addr(&self) -> u64 {
        match self {
            BootInfo::ZeroPage(zp) => zp.rsdp_addr(),
            BootInfo::StartInfo(si) => si.rsdp_addr(),
        }
    }

    /// Where the boot data itself lies, as (start, end) ranges; unused ones are empty.
    pub fn areas(&self) -> [(u64, u64); 3] {
        match self {
            BootInfo::ZeroPage(zp) => [(zp.addr, zp.addr + PAGE_SIZE), (0, 0), (0, 0)],
            BootInfo::StartInfo(si) => si.areas(),
        }
    }
}
