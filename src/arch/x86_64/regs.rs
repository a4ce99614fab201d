//! Register, segment and page-table state for entering a kernel.
//!
//! The Linux 64-bit boot protocol enters the kernel in long mode with paging on, flat
//! segments from a GDT and `rsi` pointing at the zero page. The PVH protocol enters in 32-bit
//! protected mode with paging off and `ebx` pointing at the start info.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
};

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write the boot GDT into guest memory")]
    Gdt,
    #[error("cannot write the boot IDT into guest memory")]
    Idt,
    #[error("cannot write the boot page tables into guest memory")]
    PageTables,
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Which boot protocol the vCPU is entered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// Linux 64-bit boot protocol: long mode, `rsi` = zero page.
    Linux64,
    /// PVH: 32-bit protected mode, paging off, `ebx` = start info.
    Pvh,
}

/// Packs a GDT descriptor from the (flags, base, limit) triple the CPU manuals use, flags
/// being the access byte in bits 0-7 and the granularity nibble in bits 12-15.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Unpacks a GDT descriptor into the segment register form KVM takes.
pub fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let flags = ((entry >> 40) & 0xf0ff) as u16;
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = (flags >> 15) & 1;
    // With 4 KiB granularity the limit counts pages; KVM wants the byte limit.
    let limit = if g == 1 {
        (limit_raw << 12) | 0xfff
    } else {
        limit_raw
    };
    let present = ((flags >> 7) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: u16::from(table_index) * 8,
        type_: (flags & 0xf) as u8,
        present,
        dpl: ((flags >> 5) & 0x3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: g as u8,
        avl: ((flags >> 12) & 1) as u8,
        padding: 0,
        // An absent segment must be marked unusable or VM entry fails.
        unusable: u8::from(present == 0),
    }
}

/// The boot GDT: null, code, data, TSS. 64-bit boot uses a long-mode code segment; PVH a
/// flat 32-bit one.
pub fn boot_gdt(protocol: BootProtocol) -> [u64; 4] {
    let (code, tss) = match protocol {
        BootProtocol::Linux64 => (gdt_entry(0xa09b, 0, 0xfffff), gdt_entry(0x808b, 0, 0xfffff)),
        // The PVH ABI asks for a 32-bit TSS with base 0 and limit 0x67 (byte granular).
        BootProtocol::Pvh => (gdt_entry(0xc09b, 0, 0xfffff), gdt_entry(0x008b, 0, 0x67)),
    };
    [gdt_entry(0, 0, 0), code, gdt_entry(0xc093, 0, 0xfffff), tss]
}

fn write_gdt_idt<M: GuestMemoryBackend>(mem: &M, gdt: &[u64]) -> Result<(), RegsError> {
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|_| RegsError::Gdt)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| RegsError::Idt)
}

/// Identity-maps the first 1 GiB with 2 MiB pages, which covers everything the boot
/// protocol places (zero page, command line, kernel, initrd below 1 GiB is the kernel's job
/// to reach after it builds its own tables).
pub fn write_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<u64, RegsError> {
    let w = |val: u64, addr: u64| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(|_| RegsError::PageTables)
    };
    // Present | writable.
    w(PDPTE_START | 0x03, PML4_START)?;
    w(PDE_START | 0x03, PDPTE_START)?;
    for i in 0..512u64 {
        // Present | writable | page size (2 MiB).
        w((i << 21) | 0x83, PDE_START + i * 8)?;
    }
    Ok(PML4_START)
}

/// Writes the GDT, IDT and (for 64-bit boot) page tables, and fills `sregs` for entry.
pub fn setup_sregs<M: GuestMemoryBackend>(
    mem: &M,
    protocol: BootProtocol,
    sregs: &mut kvm_sregs,
) -> Result<(), RegsError> {
    let gdt = boot_gdt(protocol);
    write_gdt_idt(mem, &gdt)?;

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;

    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    match protocol {
        BootProtocol::Linux64 => {
            sregs.cr3 = write_page_tables(mem)?;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        BootProtocol::Pvh => {
            // Protected mode, paging off: the PVH entry builds its own tables.
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(())
}

/// General registers at kernel entry. `boot_info` is the zero page (64-bit) or the PVH
/// start info.
pub fn boot_regs(protocol: BootProtocol, entry: u64, boot_info: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        // Bit 1 is reserved and reads as one; interrupts stay off.
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match protocol {
        BootProtocol::Linux64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = boot_info;
        }
        BootProtocol::Pvh => regs.rbx = boot_info,
    }
    regs
}

/// FPU state at reset as Linux expects it: x87 control word 0x37f, SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn gdt_entry_packing() {
        // Known encodings of the flat 64-bit code and data descriptors.
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0x808b, 0, 0xfffff), 0x008f_8b00_0000_ffff);
        assert_eq!(
            gdt_entry(0x0093, 0x1234_5678, 0xabcde),
            0x120a_9334_5678_bcde
        );
    }

    #[test]
    fn segments_decode_from_gdt() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(
            (code.selector, code.type_, code.l, code.db, code.present),
            (8, 0xb, 1, 0, 1)
        );
        assert_eq!(
            (code.s, code.g, code.limit, code.unusable),
            (1, 1, 0xffff_ffff, 0)
        );
        let data = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!(
            (data.selector, data.type_, data.db, data.l),
            (0x10, 3, 1, 0)
        );
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn long_mode_sregs_and_tables_in_memory() {
        let m = mem();
        let mut sregs = kvm_sregs::default();
        setup_sregs(&m, BootProtocol::Linux64, &mut sregs).unwrap();
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cs.l, 1);
        assert_eq!(sregs.gdt.limit, 31);

        // GDT read back from guest memory.
        for (i, want) in boot_gdt(BootProtocol::Linux64).iter().enumerate() {
            let got: u64 = m
                .read_obj(GuestAddress(BOOT_GDT_START + 8 * i as u64))
                .unwrap();
            assert_eq!(got, *want);
        }
        // Page tables: PML4 -> PDPT -> PD, PD maps 512 2 MiB pages 1:1.
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let pdpt: u64 = m.read_obj(GuestAddress(PDPTE_START)).unwrap();
        assert_eq!(pdpt, PDE_START | 3);
        for i in [0u64, 1, 255, 511] {
            let pde: u64 = m.read_obj(GuestAddress(PDE_START + i * 8)).unwrap();
            assert_eq!(pde, (i << 21) | 0x83, "PDE {i}");
        }
    }

    #[test]
    fn pvh_sregs_are_protected_mode_without_paging() {
        let m = mem();
        let mut sregs = kvm_sregs::default();
        setup_sregs(&m, BootProtocol::Pvh, &mut sregs).unwrap();
        assert_eq!(sregs.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!(sregs.efer, 0);
        assert_eq!((sregs.cs.l, sregs.cs.db), (0, 1));
        assert_eq!(
            (sregs.tr.base, sregs.tr.limit, sregs.tr.type_),
            (0, 0x67, 0xb)
        );
    }

    #[test]
    fn entry_registers() {
        let r = boot_regs(BootProtocol::Linux64, 0x100200, 0x7000);
        assert_eq!(
            (r.rip, r.rsi, r.rsp, r.rflags),
            (0x100200, 0x7000, BOOT_STACK_POINTER, 2)
        );
        let r = boot_regs(BootProtocol::Pvh, 0x1000000, 0x6000);
        assert_eq!((r.rip, r.rbx, r.rsi), (0x1000000, 0x6000, 0));
    }
}
