//! What the kernel reads at entry: the e820 memory map, the Linux zero page and the PVH
//! start info.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::layout::{
    CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_START, PVH_INFO_START, PVH_MEMMAP_START,
    ZERO_PAGE_START, ram_ranges,
};

pub const E820_RAM: u32 = 1;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    #[error("guest memory of {0} bytes is too small to hold the kernel and its boot data")]
    MemoryTooSmall(u64),
    #[error("cannot write the zero page: {0}")]
    ZeroPage(linux_loader::configurator::Error),
    #[error("cannot write the PVH start info: {0}")]
    Pvh(linux_loader::configurator::Error),
}

/// One memory-map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The guest's memory map: low RAM up to the EBDA, then RAM from 1 MiB to the end of
/// memory or the MMIO gap, then RAM above 4 GiB. The EBDA and BIOS area between is left out,
/// which the kernel treats as reserved, so the MP table there stays untouched.
pub fn e820_map(mem_bytes: u64) -> Result<Vec<E820Entry>, BootParamsError> {
    if mem_bytes <= HIMEM_START {
        return Err(BootParamsError::MemoryTooSmall(mem_bytes));
    }
    let mut map = vec![E820Entry {
        addr: 0,
        size: EBDA_START,
        kind: E820_RAM,
    }];
    for (start, size) in ram_ranges(mem_bytes) {
        let (addr, end) = if start == 0 {
            (HIMEM_START, size)
        } else {
            (start, start + size)
        };
        map.push(E820Entry {
            addr,
            size: end - addr,
            kind: E820_RAM,
        });
    }
    Ok(map)
}

/// The end of RAM below the MMIO gap, where the initrd goes.
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_GAP_START)
}

/// Inputs of the Linux zero page.
pub struct LinuxBootInfo {
    pub mem_bytes: u64,
    /// Length of the command line without its NUL.
    pub cmdline_len: usize,
    /// (guest address, size) of the initrd.
    pub initrd: Option<(u64, u64)>,
    /// The bzImage's own setup header, which the zero page must start from.
    pub setup_header: Option<setup_header>,
    /// Where the ACPI RSDP is (boot protocol 2.14 `acpi_rsdp_addr`).
    pub rsdp_addr: Option<u64>,
}

/// Builds the zero page.
pub fn zero_page(info: &LinuxBootInfo) -> Result<boot_params, BootParamsError> {
    let mut params = boot_params::default();
    if let Some(hdr) = info.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.ext_cmd_line_ptr = (CMDLINE_START >> 32) as u32;
    params.hdr.cmdline_size = info.cmdline_len as u32;
    if info.setup_header.is_none() {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    let map = e820_map(info.mem_bytes)?;
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    params.acpi_rsdp_addr = info.rsdp_addr.unwrap_or(0);
    Ok(params)
}

/// Writes the zero page at [`ZERO_PAGE_START`] and returns its address.
pub fn write_zero_page<M: GuestMemoryBackend>(
    mem: &M,
    info: &LinuxBootInfo,
) -> Result<u64, BootParamsError> {
    let params = zero_page(info)?;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootParamsError::ZeroPage)?;
    Ok(ZERO_PAGE_START)
}

/// Writes the PVH start info (with the same memory map and an initrd module) and returns its
/// address, which the kernel receives in `ebx`.
pub fn write_pvh_start_info<M: GuestMemoryBackend>(
    mem: &M,
    mem_bytes: u64,
    initrd: Option<(u64, u64)>,
    rsdp_addr: Option<u64>,
) -> Result<u64, BootParamsError> {
    let map: Vec<hvm_memmap_table_entry> = e820_map(mem_bytes)?
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        rsdp_paddr: rsdp_addr.unwrap_or(0),
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    params.set_sections(&map, GuestAddress(PVH_MEMMAP_START));
    if let Some((addr, size)) = initrd {
        use linux_loader::loader::elf::start_info::hvm_modlist_entry;
        let module = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        let modlist_addr =
            PVH_MEMMAP_START + (map.len() * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        info.nr_modules = 1;
        info.modlist_paddr = modlist_addr;
        params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
        params.set_sections(&map, GuestAddress(PVH_MEMMAP_START));
        params.set_modules(&[module], GuestAddress(modlist_addr));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(BootParamsError::Pvh)?;
    Ok(PVH_INFO_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::HIGH_RAM_START;
    use crate::memory::GuestMemoryMmap;
    use vm_memory::Bytes;

    const MIB: u64 = 1 << 20;

    #[test]
    fn e820_small_guest() {
        let map = e820_map(128 * MIB).unwrap();
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: EBDA_START,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: HIMEM_START,
                    size: 128 * MIB - HIMEM_START,
                    kind: E820_RAM
                },
            ]
        );
    }

    #[test]
    fn e820_crosses_mmio_gap() {
        let map = e820_map(3584 * MIB).unwrap();
        assert_eq!(map.len(), 3);
        assert_eq!(map[1].addr + map[1].size, MMIO_GAP_START);
        assert_eq!(
            map[2],
            E820Entry {
                addr: HIGH_RAM_START,
                size: 512 * MIB,
                kind: E820_RAM
            }
        );
        let total: u64 = map.iter().map(|e| e.size).sum();
        assert_eq!(total, 3584 * MIB - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn e820_refuses_tiny_memory() {
        assert!(matches!(
            e820_map(MIB),
            Err(BootParamsError::MemoryTooSmall(_))
        ));
    }

    #[test]
    fn zero_page_read_back() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (64 * MIB) as usize)]).unwrap();
        let info = LinuxBootInfo {
            mem_bytes: 64 * MIB,
            cmdline_len: 42,
            initrd: Some((0x300_0000, 0x1234)),
            setup_header: None,
            rsdp_addr: Some(0xe_0000),
        };
        assert_eq!(write_zero_page(&mem, &info).unwrap(), ZERO_PAGE_START);
        let at = |off: u64| GuestAddress(ZERO_PAGE_START + off);
        // Offsets from the boot protocol (Documentation/arch/x86/boot.rst, zero-page.rst).
        assert_eq!(mem.read_obj::<u16>(at(0x1fe)).unwrap(), 0xaa55);
        assert_eq!(mem.read_obj::<u32>(at(0x202)).unwrap(), 0x5372_6448);
        assert_eq!(mem.read_obj::<u8>(at(0x210)).unwrap(), 0xff);
        assert_eq!(mem.read_obj::<u32>(at(0x218)).unwrap(), 0x300_0000);
        assert_eq!(mem.read_obj::<u32>(at(0x21c)).unwrap(), 0x1234);
        assert_eq!(
            mem.read_obj::<u32>(at(0x228)).unwrap(),
            CMDLINE_START as u32
        );
        assert_eq!(mem.read_obj::<u32>(at(0x238)).unwrap(), 42);
        assert_eq!(mem.read_obj::<u8>(at(0x1e8)).unwrap(), 2);
        assert_eq!(mem.read_obj::<u64>(at(0x070)).unwrap(), 0xe_0000);
        let e820 = |i: u64, field: u64| at(0x2d0 + 20 * i + field);
        assert_eq!(mem.read_obj::<u64>(e820(0, 0)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u64>(e820(0, 8)).unwrap(), EBDA_START);
        assert_eq!(mem.read_obj::<u32>(e820(0, 16)).unwrap(), E820_RAM);
        assert_eq!(mem.read_obj::<u64>(e820(1, 0)).unwrap(), HIMEM_START);
        assert_eq!(
            mem.read_obj::<u64>(e820(1, 8)).unwrap(),
            64 * MIB - HIMEM_START
        );
    }

    #[test]
    fn zero_page_keeps_bzimage_header() {
        let hdr = setup_header {
            setup_sects: 7,
            version: 0x020f,
            kernel_alignment: 0x20_0000,
            ..Default::default()
        };
        let p = zero_page(&LinuxBootInfo {
            mem_bytes: 64 * MIB,
            cmdline_len: 1,
            initrd: None,
            setup_header: Some(hdr),
            rsdp_addr: None,
        })
        .unwrap();
        assert_eq!((p.hdr.setup_sects, p.hdr.version), (7, 0x020f));
        assert_eq!({ p.hdr.kernel_alignment }, 0x20_0000);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
    }

    #[test]
    fn pvh_start_info_read_back() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (64 * MIB) as usize)]).unwrap();
        let addr = write_pvh_start_info(&mem, 64 * MIB, Some((0x200_0000, 0x500)), Some(0xe_0000))
            .unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(addr)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(info.memmap_entries, 2);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.rsdp_paddr, 0xe_0000);
        let e: hvm_memmap_table_entry = mem.read_obj(GuestAddress(info.memmap_paddr + 24)).unwrap();
        assert_eq!(
            (e.addr, e.size, e.type_),
            (HIMEM_START, 64 * MIB - HIMEM_START, E820_RAM)
        );
        let m: linux_loader::loader::elf::start_info::hvm_modlist_entry =
            mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((m.paddr, m.size), (0x200_0000, 0x500));
    }
}
