//! The PVH entry (feature `pvh`, built as probe-pvh.elf): the Xen ELF note that announces it
//! and the 32-bit code that takes the CPU from where PVH leaves it to where the 64-bit boot
//! protocol would have, so the rest of the probe runs unchanged.
//!
//! PVH enters in 32-bit protected mode with paging off, flat segments from a GDT the probe
//! knows nothing about, `ebx` = start info and no stack. The stub sets a stack, builds an
//! identity map of the first GiB (what ember's boot map covers on the 64-bit entry), enables
//! long mode, loads its own GDT with a 64-bit code segment and joins the 64-bit entry at
//! `start64`, which zeroes .bss and calls `probe_main`.

use core::mem::{offset_of, size_of};

/// `XEN_ELFNOTE_PHYS32_ENTRY`: the note's descriptor is the 32-bit physical entry address.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

const MSR_EFER: u32 = 0xc000_0080;
const EFER_LME: u32 = 1 << 8;
const CR0_PG: u32 = 1 << 31;
const CR4_PAE: u32 = 1 << 5;

/// Flat 64-bit code (L set) and flat data, both with the accessed bit already set so the
/// CPU never writes the GDT. The selectors match ember's boot GDT, so `longmode` prints
/// `cs=0x8` on either entry.
const GDT_CODE64: u64 = 0x00af_9b00_0000_ffff;
const GDT_DATA: u64 = 0x00cf_9300_0000_ffff;
const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;

const ENTRIES: usize = 512;
const PRESENT_WRITABLE: u32 = 0x3;
/// Present, writable, 2 MiB page.
const HUGE_PAGE: u32 = 0x83;
const PAGE_2M: u32 = 1 << 21;

/// One GiB of 2 MiB pages. Separate from paging.rs's tables: `identity_map` rewrites those
/// while switching to them, so they cannot be the ones in use.
#[repr(C, align(4096))]
struct BootTables {
    pml4: [u64; ENTRIES],
    pdpt: [u64; ENTRIES],
    pd: [u64; ENTRIES],
}

// NOLOAD and not zeroed by start64 (that runs later, on these very tables): the stub zeroes
// them itself.
#[unsafe(link_section = ".pagetables")]
static mut BOOT_TABLES: BootTables = BootTables {
    pml4: [0; ENTRIES],
    pdpt: [0; ENTRIES],
    pd: [0; ENTRIES],
};

// The note is not allocated (linker-pvh.ld): it lives only in the file, where loaders look.
// The 32-bit code is assembled as such (.code32) and may only use 32-bit addresses, which
// the probe's are (it sits at 1 MiB). Numeric labels are kept off 0 and 1: LLVM's Intel
// syntax reads `1b` as a binary number.
core::arch::global_asm!(
    ".section .pvhnote, \"\", @note",
    ".balign 4",
    "    .long 4",
    "    .long 4",
    "    .long {note_type}",
    "    .asciz \"Xen\"",
    "    .long pvh_start",
    //
    ".section .rodata.pvh, \"a\"",
    ".balign 8",
    "pvh_gdt:",
    "    .quad 0",
    "    .quad {gdt_code}",
    "    .quad {gdt_data}",
    "pvh_gdt_end:",
    // lgdt reads a 16-bit limit and a 32-bit base in 32-bit mode, 64-bit in 64-bit mode.
    "pvh_gdt_ptr:",
    "    .word pvh_gdt_end - pvh_gdt - 1",
    "    .quad pvh_gdt",
    //
    ".section .text.pvh, \"ax\"",
    ".global pvh_start",
    ".code32",
    "pvh_start:",
    "    mov esp, offset __stack_top",
    "    cld",
    // PML4[0] -> PDPT, PDPT[0] -> PD, PD[i] -> i * 2 MiB. Zero all three first: the upper
    // halves of the PD entries and every other entry must read as 0.
    "    mov edi, offset {tables}",
    "    xor eax, eax",
    "    mov ecx, {tables_dwords}",
    "    rep stosd",
    "    mov dword ptr [{tables} + {pml4}], offset {tables} + {pdpt} + {table_flags}",
    "    mov dword ptr [{tables} + {pdpt}], offset {tables} + {pd} + {table_flags}",
    "    mov edi, offset {tables} + {pd}",
    "    mov eax, {page_flags}",
    "2:",
    "    mov dword ptr [edi], eax",
    "    add eax, {page_2m}",
    "    add edi, 8",
    "    cmp edi, offset {tables} + {pd} + {pd_bytes}",
    "    jb 2b",
    // Long mode: PAE, CR3, EFER.LME, then paging on activates it (in compatibility mode
    // until CS is a 64-bit segment).
    "    lgdt [pvh_gdt_ptr]",
    "    mov eax, cr4",
    "    or eax, {cr4_pae}",
    "    mov cr4, eax",
    "    mov eax, offset {tables}",
    "    mov cr3, eax",
    "    mov ecx, {msr_efer}",
    "    rdmsr",
    "    or eax, {efer_lme}",
    "    wrmsr",
    "    mov eax, cr0",
    "    or eax, {cr0_pg}",
    "    mov cr0, eax",
    "    ljmp {code}, offset pvh_start64",
    ".code64",
    "pvh_start64:",
    // The data segment caches still hold the descriptors of the VMM's GDT.
    "    mov eax, {data}",
    "    mov ds, eax",
    "    mov es, eax",
    "    mov fs, eax",
    "    mov gs, eax",
    "    mov ss, eax",
    // The upper halves of the registers are undefined after the switch: the 32-bit moves
    // zero them.
    "    mov r12d, ebx",
    "    mov r13d, {pvh}",
    "    jmp start64",
    note_type = const XEN_ELFNOTE_PHYS32_ENTRY,
    gdt_code = const GDT_CODE64,
    gdt_data = const GDT_DATA,
    tables = sym BOOT_TABLES,
    tables_dwords = const size_of::<BootTables>() / 4,
    pml4 = const offset_of!(BootTables, pml4),
    pdpt = const offset_of!(BootTables, pdpt),
    pd = const offset_of!(BootTables, pd),
    pd_bytes = const ENTRIES * 8,
    table_flags = const PRESENT_WRITABLE,
    page_flags = const HUGE_PAGE,
    page_2m = const PAGE_2M,
    cr4_pae = const CR4_PAE,
    msr_efer = const MSR_EFER,
    efer_lme = const EFER_LME,
    cr0_pg = const CR0_PG,
    code = const CODE_SELECTOR,
    data = const DATA_SELECTOR,
    pvh = const crate::ENTRY_PVH,
);
