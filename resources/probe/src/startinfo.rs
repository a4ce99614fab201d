//! The PVH start info (`struct hvm_start_info`, Xen's arch-x86/hvm/start_info.h) the VMM
//! hands over in `ebx` when it enters the probe through its PVH note.

use crate::bootparams::E820Entry;
use crate::line::Detail;
use crate::paging::BOOT_MAP_END;
use crate::phys;

const MAGIC: u64 = 0x00;
const VERSION: u64 = 0x04;
const NR_MODULES: u64 = 0x0c;
const MODLIST_PADDR: u64 = 0x10;
const CMDLINE_PADDR: u64 = 0x18;
const RSDP_PADDR: u64 = 0x20;
const MEMMAP_PADDR: u64 = 0x28;
const MEMMAP_ENTRIES: u64 = 0x30;
/// Version 1, the first with the memory map.
const START_INFO_SIZE: u64 = 0x38;

const START_INFO_MAGIC: u32 = 0x336e_c578;
const MIN_VERSION: u32 = 1;
/// `struct hvm_memmap_table_entry`: u64 addr, u64 size, u32 type, u32 reserved.
const MEMMAP_ENTRY_SIZE: u64 = 24;
/// `struct hvm_modlist_entry`: u64 paddr, u64 size, u64 cmdline_paddr, u64 reserved.
const MODLIST_ENTRY_SIZE: u64 = 32;
/// PVH sets no limit; the zero page's e820 table holds as many, which is plenty.
pub const MEMMAP_MAX_ENTRIES: u32 = 128;
const PAGE_SIZE: u64 = 4096;

#[derive(Clone, Copy)]
pub struct StartInfo {
    pub addr: u64,
}

impl StartInfo {
    pub fn cmdline_addr(&self) -> u64 {
        phys::read_u64(self.addr + CMDLINE_PADDR)
    }

    /// The ACPI RSDP's address, 0 if the VMM gave none.
    pub fn rsdp_addr(&self) -> u64 {
        phys::read_u64(self.addr + RSDP_PADDR)
    }

    fn memmap_addr(&self) -> u64 {
        phys::read_u64(self.addr + MEMMAP_PADDR)
    }

    pub fn memmap_raw_len(&self) -> u32 {
        phys::read_u32(self.addr + MEMMAP_ENTRIES)
    }

    /// Number of memory map entries, clamped like the zero page's e820 table.
    pub fn memmap_len(&self) -> u32 {
        self.memmap_raw_len().min(MEMMAP_MAX_ENTRIES)
    }

    pub fn memmap_entry(&self, index: u32) -> E820Entry {
        let at = self.memmap_addr() + u64::from(index) * MEMMAP_ENTRY_SIZE;
        E820Entry {
            addr: phys::read_u64(at),
            size: phys::read_u64(at + 8),
            kind: phys::read_u32(at + 16),
        }
    }

    fn nr_modules(&self) -> u32 {
        phys::read_u32(self.addr + NR_MODULES)
    }

    fn modlist_addr(&self) -> u64 {
        phys::read_u64(self.addr + MODLIST_PADDR)
    }

    /// The first module, which is where the VMM puts the initrd, as (address, size).
    pub fn first_module(&self) -> Option<(u64, u64)> {
        if self.nr_modules() == 0 {
            return None;
        }
        let at = self.modlist_addr();
        Some((phys::read_u64(at), phys::read_u64(at + 8)))
    }

    /// The start info's page, the memory map and the module list: the VMM's, not to write.
    pub fn areas(&self) -> [(u64, u64); 3] {
        let page = self.addr & !(PAGE_SIZE - 1);
        let memmap = self.memmap_addr();
        let modlist = self.modlist_addr();
        let modules = u64::from(self.nr_modules()) * MODLIST_ENTRY_SIZE;
        [
            (page, page + PAGE_SIZE),
            (
                memmap,
                memmap.saturating_add(u64::from(self.memmap_raw_len()) * MEMMAP_ENTRY_SIZE),
            ),
            (modlist, modlist.saturating_add(modules)),
        ]
    }
}

/// Whether [addr, addr + len) can be read through the boot identity map.
fn readable(addr: u64, len: u64) -> bool {
    addr <= BOOT_MAP_END && len <= BOOT_MAP_END - addr
}

/// The `pvh` check: `ebx` points at a start info with the magic number and a version that
/// has the memory map, whose memory map and module list the boot identity map reaches.
/// Returns the start info only if it is safe to read.
pub fn check(addr: u64, d: &mut Detail) -> Option<StartInfo> {
    d.str(b"at=").hex(addr);
    if addr == 0 {
        d.str(b" ebx is 0");
        return None;
    }
    if !readable(addr, START_INFO_SIZE) {
        d.str(b" outside the boot identity map");
        return None;
    }
    let magic = phys::read_u32(addr + MAGIC);
    if magic != START_INFO_MAGIC {
        d.str(b" magic=").hex(u64::from(magic));
        return None;
    }
    let version = phys::read_u32(addr + VERSION);
    d.str(b" version=").dec(u64::from(version));
    if version < MIN_VERSION {
        d.str(b" too old");
        return None;
    }
    let info = StartInfo { addr };
    let memmap_len = u64::from(info.memmap_raw_len()) * MEMMAP_ENTRY_SIZE;
    if !readable(info.memmap_addr(), memmap_len) {
        d.str(b" memmap at=")
            .hex(info.memmap_addr())
            .str(b" outside the boot identity map");
        return None;
    }
    if info.nr_modules() > 0 && !readable(info.modlist_addr(), MODLIST_ENTRY_SIZE) {
        d.str(b" modlist at=")
            .hex(info.modlist_addr())
            .str(b" outside the boot identity map");
        return None;
    }
    Some(info)
}
