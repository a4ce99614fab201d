#!/usr/bin/env python3
"""Wraps the probe ELF into a Linux/x86 bzImage (Documentation/arch/x86/boot.rst).

usage: mkbzimage.py PROBE_ELF OUT_BZIMAGE

The protected-mode part is the flat image of the ELF's PT_LOAD segments (what
`objcopy -O binary` produces), loaded at 1 MiB. The ELF starts with 0x200 bytes of padding
so that its _start lands on load address + 0x200, the 64-bit entry point of the boot
protocol. The real-mode part only carries the setup header: nothing runs it.
"""

import os
import struct
import sys

LOAD_ADDR = 0x100000
ENTRY_64_OFFSET = 0x200
SETUP_SECTS = 1  # real-mode part = (SETUP_SECTS + 1) * 512 bytes
SECTOR = 512
PT_LOAD = 1
PAGE = 0x1000

LOADED_HIGH = 0x01
XLF_KERNEL_64 = 0x01
BOOT_PROTOCOL = 0x020F
CMDLINE_SIZE = 2047
# Real-mode code after the header, for a loader that would enter at 0x200 in real mode:
# cli; hlt; jmp back to hlt.
REAL_MODE_STUB_AT = 0x270
REAL_MODE_STUB = bytes([0xFA, 0xF4, 0xEB, 0xFD])
VERSION_STRING_AT = 0x280
VERSION_STRING = b"ember-probe\0"


def fail(msg):
    sys.exit(f"mkbzimage.py: {msg}")


def load_segments(elf):
    """Returns (entry, [(paddr, filesz, memsz, data)]) for the PT_LOAD segments."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        fail("not a little-endian ELF64 file")
    (entry, phoff) = struct.unpack_from("<QQ", elf, 0x18)
    (phentsize, phnum) = struct.unpack_from("<HH", elf, 0x36)
    segments = []
    for i in range(phnum):
        (p_type, _flags, offset, _vaddr, paddr, filesz, memsz, _align) = struct.unpack_from(
            "<IIQQQQQQ", elf, phoff + i * phentsize
        )
        if p_type == PT_LOAD:
            segments.append((paddr, filesz, memsz, elf[offset : offset + filesz]))
    if not segments:
        fail("no PT_LOAD segment")
    return entry, segments


def flatten(segments):
    """The bytes from LOAD_ADDR to the end of the last file-backed byte, gaps zero-filled."""
    file_end = max(paddr + filesz for (paddr, filesz, _, _) in segments if filesz)
    flat = bytearray(file_end - LOAD_ADDR)
    for paddr, filesz, _, data in segments:
        if paddr < LOAD_ADDR:
            fail(f"segment at {paddr:#x} is below the load address {LOAD_ADDR:#x}")
        flat[paddr - LOAD_ADDR : paddr - LOAD_ADDR + filesz] = data
    return bytes(flat)


def setup_header(flat_len, init_size):
    real_mode = bytearray((SETUP_SECTS + 1) * SECTOR)

    def put(fmt, offset, value):
        struct.pack_into("<" + fmt, real_mode, offset, value)

    put("B", 0x1F1, SETUP_SECTS)
    put("I", 0x1F4, (flat_len + 15) // 16)  # syssize, in 16-byte paragraphs
    put("H", 0x1FA, 0xFFFF)  # vid_mode: normal
    put("H", 0x1FE, 0xAA55)  # boot_flag
    put("H", 0x200, 0xEB | ((REAL_MODE_STUB_AT - 0x202) << 8))  # jmp short past the header
    put("4s", 0x202, b"HdrS")
    put("H", 0x206, BOOT_PROTOCOL)
    put("H", 0x20C, 0x1000)  # start_sys_seg (obsolete)
    put("H", 0x20E, VERSION_STRING_AT - 0x200)  # kernel_version
    put("B", 0x211, LOADED_HIGH)
    put("I", 0x214, LOAD_ADDR)  # code32_start
    put("I", 0x22C, 0x7FFFFFFF)  # initrd_addr_max
    put("I", 0x230, PAGE)  # kernel_alignment (irrelevant: not relocatable)
    put("B", 0x234, 0)  # relocatable_kernel
    put("B", 0x235, 12)  # min_alignment, log2
    put("H", 0x236, XLF_KERNEL_64)
    put("I", 0x238, CMDLINE_SIZE)
    put("Q", 0x258, LOAD_ADDR)  # pref_address
    put("I", 0x260, init_size)
    real_mode[REAL_MODE_STUB_AT : REAL_MODE_STUB_AT + len(REAL_MODE_STUB)] = REAL_MODE_STUB
    real_mode[VERSION_STRING_AT : VERSION_STRING_AT + len(VERSION_STRING)] = VERSION_STRING
    return bytes(real_mode)


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: mkbzimage.py PROBE_ELF OUT_BZIMAGE")
    elf_path, out_path = sys.argv[1:]
    with open(elf_path, "rb") as f:
        elf = f.read()
    entry, segments = load_segments(elf)
    if entry != LOAD_ADDR + ENTRY_64_OFFSET:
        fail(f"entry {entry:#x} is not load address + {ENTRY_64_OFFSET:#x}")
    if min(paddr for (paddr, _, _, _) in segments) != LOAD_ADDR:
        fail(f"the image does not start at {LOAD_ADDR:#x}")
    flat = flatten(segments)
    mem_end = max(paddr + memsz for (paddr, _, memsz, _) in segments)
    init_size = (mem_end - LOAD_ADDR + PAGE - 1) // PAGE * PAGE
    image = setup_header(len(flat), init_size) + flat
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(image)
    # Atomic replace, so a concurrent reader never sees half a file.
    os.replace(tmp, out_path)


if __name__ == "__main__":
    main()
