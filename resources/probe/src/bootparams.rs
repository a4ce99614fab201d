//! The Linux zero page (`struct boot_params`) the VMM hands over in `rsi`.

use crate::line::Detail;
use crate::paging::BOOT_MAP_END;
use crate::phys;

const BOOT_FLAG: u64 = 0x1fe;
const HEADER: u64 = 0x202;
const CMD_LINE_PTR: u64 = 0x228;
const CMDLINE_SIZE: u64 = 0x238;
const EXT_CMD_LINE_PTR: u64 = 0x0c8;
const RAMDISK_IMAGE: u64 = 0x218;
const RAMDISK_SIZE: u64 = 0x21c;
const EXT_RAMDISK_IMAGE: u64 = 0x0c0;
const EXT_RAMDISK_SIZE: u64 = 0x0c4;
const E820_ENTRIES: u64 = 0x1e8;
const ACPI_RSDP_ADDR: u64 = 0x070;
const E820_TABLE: u64 = 0x2d0;

const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HEADER_MAGIC: u32 = u32::from_le_bytes(*b"HdrS");
const E820_ENTRY_SIZE: u64 = 20;
pub const E820_MAX_ENTRIES: u8 = 128;
const PAGE_SIZE: u64 = 4096;

#[derive(Clone, Copy)]
pub struct ZeroPage {
    pub addr: u64,
}

#[derive(Clone, Copy)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

pub const E820_RAM: u32 = 1;

impl ZeroPage {
    /// Full 64-bit command line address (`ext_cmd_line_ptr` holds the high half).
    pub fn cmdline_addr(&self) -> u64 {
        let low = u64::from(phys::read_u32(self.addr + CMD_LINE_PTR));
        let high = u64::from(phys::read_u32(self.addr + EXT_CMD_LINE_PTR));
        (high << 32) | low
    }

    pub fn cmdline_size(&self) -> u32 {
        phys::read_u32(self.addr + CMDLINE_SIZE)
    }

    /// The initrd as (address, size), each with its `ext_` high half; None if both are 0.
    pub fn initrd(&self) -> Option<(u64, u64)> {
        let read = |low, high| {
            (u64::from(phys::read_u32(self.addr + high)) << 32)
                | u64::from(phys::read_u32(self.addr + low))
        };
        let addr = read(RAMDISK_IMAGE, EXT_RAMDISK_IMAGE);
        let size = read(RAMDISK_SIZE, EXT_RAMDISK_SIZE);
        (addr != 0 || size != 0).then_some((addr, size))
    }

    /// The ACPI RSDP's address (boot protocol 2.14), 0 if the VMM gave none.
    pub fn rsdp_addr(&self) -> u64 {
        phys::read_u64(self.addr + ACPI_RSDP_ADDR)
    }

    /// Number of e820 entries, clamped to what the table can hold.
    pub fn e820_len(&self) -> u8 {
        phys::read_u8(self.addr + E820_ENTRIES).min(E820_MAX_ENTRIES)
    }

    pub fn e820_raw_len(&self) -> u8 {
        phys::read_u8(self.addr + E820_ENTRIES)
    }

    pub fn e820_entry(&self, index: u8) -> E820Entry {
        let at = self.addr + E820_TABLE + u64::from(index) * E820_ENTRY_SIZE;
        E820Entry {
            addr: phys::read_u64(at),
            size: phys::read_u64(at + 8),
            kind: phys::read_u32(at + 16),
        }
    }
}

/// The `zeropage` check: `rsi` points at a page-aligned `boot_params` with the setup header's
/// magic numbers. Returns the zero page only if it is safe to read.
pub fn check(addr: u64, d: &mut Detail) -> Option<ZeroPage> {
    d.str(b"at=").hex(addr);
    if addr == 0 {
        d.str(b" rsi is 0");
        return None;
    }
    if !addr.is_multiple_of(PAGE_SIZE) {
        d.str(b" not page aligned");
        return None;
    }
    if addr >= BOOT_MAP_END - PAGE_SIZE {
        d.str(b" outside the boot identity map");
        return None;
    }
    let boot_flag = phys::read_u16(addr + BOOT_FLAG);
    let header = phys::read_u32(addr + HEADER);
    if boot_flag != BOOT_FLAG_MAGIC {
        d.str(b" boot_flag=").hex(u64::from(boot_flag));
        return None;
    }
    if header != HEADER_MAGIC {
        d.str(b" header=").hex(u64::from(header));
        return None;
    }
    Some(ZeroPage { addr })
}
