//! Wraps the probe ELF into a Linux/x86 bzImage (Documentation/arch/x86/boot.rst), for
//! ember's build script.
//!
//! The protected-mode part is the flat image of the ELF's PT_LOAD segments (what
//! `objcopy -O binary` produces), loaded at 1 MiB. The ELF starts with 0x200 bytes of
//! padding so that its _start lands on load address + 0x200, the 64-bit entry point of the
//! boot protocol. The real-mode part only carries the setup header: nothing runs it.

const LOAD_ADDR: u64 = 0x10_0000;
const ENTRY_64_OFFSET: u64 = 0x200;
/// Real-mode part = (SETUP_SECTS + 1) * 512 bytes.
const SETUP_SECTS: u8 = 1;
const SECTOR: usize = 512;
const PT_LOAD: u32 = 1;
const PAGE: u64 = 0x1000;
const LOADED_HIGH: u8 = 0x01;
const XLF_KERNEL_64: u16 = 0x01;
const BOOT_PROTOCOL: u16 = 0x020f;
const CMDLINE_SIZE: u32 = 2047;
/// Real-mode code after the header, for a loader that would enter at 0x200 in real mode:
/// cli; hlt; jmp back to hlt.
const REAL_MODE_STUB_AT: usize = 0x270;
const REAL_MODE_STUB: [u8; 4] = [0xfa, 0xf4, 0xeb, 0xfd];
const VERSION_STRING_AT: usize = 0x280;
const VERSION_STRING: &[u8] = b"ember-probe\0";

struct Segment<'a> {
    paddr: u64,
    memsz: u64,
    data: &'a [u8],
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, String> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| format!("truncated ELF at {at:#x}"))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, String> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
        .ok_or_else(|| format!("truncated ELF at {at:#x}"))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, String> {
    b.get(at..at + 8)
        .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
        .ok_or_else(|| format!("truncated ELF at {at:#x}"))
}

fn index(v: u64) -> Result<usize, String> {
    usize::try_from(v).map_err(|_| format!("{v:#x} does not fit in memory"))
}

/// The entry point and the PT_LOAD segments of a little-endian ELF64 file.
fn load_segments(elf: &[u8]) -> Result<(u64, Vec<Segment<'_>>), String> {
    if elf.len() < 0x40 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return Err("not a little-endian ELF64 file".into());
    }
    let entry = u64_at(elf, 0x18)?;
    let phoff = index(u64_at(elf, 0x20)?)?;
    let phentsize = usize::from(u16_at(elf, 0x36)?);
    let phnum = usize::from(u16_at(elf, 0x38)?);
    let mut segments = Vec::new();
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(elf, ph)? != PT_LOAD {
            continue;
        }
        let offset = index(u64_at(elf, ph + 0x08)?)?;
        let paddr = u64_at(elf, ph + 0x18)?;
        let filesz = index(u64_at(elf, ph + 0x20)?)?;
        let memsz = u64_at(elf, ph + 0x28)?;
        let data = elf
            .get(offset..offset + filesz)
            .ok_or_else(|| format!("segment {i} lies outside the file"))?;
        segments.push(Segment { paddr, memsz, data });
    }
    if segments.is_empty() {
        return Err("no PT_LOAD segment".into());
    }
    Ok((entry, segments))
}

/// The bytes from LOAD_ADDR to the end of the last file-backed byte, gaps zero-filled.
fn flatten(segments: &[Segment<'_>]) -> Result<Vec<u8>, String> {
    let mut flat = Vec::new();
    for s in segments {
        if s.paddr < LOAD_ADDR {
            return Err(format!(
                "segment at {:#x} is below the load address {LOAD_ADDR:#x}",
                s.paddr
            ));
        }
        if s.data.is_empty() {
            continue;
        }
        let at = index(s.paddr - LOAD_ADDR)?;
        if flat.len() < at + s.data.len() {
            flat.resize(at + s.data.len(), 0);
        }
        flat[at..at + s.data.len()].copy_from_slice(s.data);
    }
    Ok(flat)
}

fn setup_header(flat_len: usize, init_size: u32) -> Vec<u8> {
    let mut rm = vec![0u8; (usize::from(SETUP_SECTS) + 1) * SECTOR];
    let mut put = |at: usize, bytes: &[u8]| rm[at..at + bytes.len()].copy_from_slice(bytes);
    put(0x1f1, &[SETUP_SECTS]);
    // syssize, in 16-byte paragraphs.
    put(0x1f4, &(flat_len.div_ceil(16) as u32).to_le_bytes());
    put(0x1fa, &0xffffu16.to_le_bytes()); // vid_mode: normal
    put(0x1fe, &0xaa55u16.to_le_bytes()); // boot_flag
    // jmp short past the header.
    put(0x200, &[0xeb, (REAL_MODE_STUB_AT - 0x202) as u8]);
    put(0x202, b"HdrS");
    put(0x206, &BOOT_PROTOCOL.to_le_bytes());
    put(0x20c, &0x1000u16.to_le_bytes()); // start_sys_seg (obsolete)
    put(0x20e, &((VERSION_STRING_AT - 0x200) as u16).to_le_bytes()); // kernel_version
    put(0x211, &[LOADED_HIGH]);
    put(0x214, &(LOAD_ADDR as u32).to_le_bytes()); // code32_start
    put(0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    put(0x230, &(PAGE as u32).to_le_bytes()); // kernel_alignment (not relocatable)
    put(0x234, &[0]); // relocatable_kernel
    put(0x235, &[12]); // min_alignment, log2
    put(0x236, &XLF_KERNEL_64.to_le_bytes());
    put(0x238, &CMDLINE_SIZE.to_le_bytes());
    put(0x258, &LOAD_ADDR.to_le_bytes()); // pref_address
    put(0x260, &init_size.to_le_bytes());
    put(REAL_MODE_STUB_AT, &REAL_MODE_STUB);
    put(VERSION_STRING_AT, VERSION_STRING);
    rm
}

/// The bzImage for the probe ELF `elf`.
pub fn from_elf(elf: &[u8]) -> Result<Vec<u8>, String> {
    let (entry, segments) = load_segments(elf)?;
    if entry != LOAD_ADDR + ENTRY_64_OFFSET {
        return Err(format!(
            "entry {entry:#x} is not load address + {ENTRY_64_OFFSET:#x}"
        ));
    }
    if segments.iter().map(|s| s.paddr).min() != Some(LOAD_ADDR) {
        return Err(format!("the image does not start at {LOAD_ADDR:#x}"));
    }
    let flat = flatten(&segments)?;
    let mem_end = segments
        .iter()
        .map(|s| s.paddr + s.memsz)
        .max()
        .unwrap_or(LOAD_ADDR);
    let init_size = u32::try_from((mem_end - LOAD_ADDR).div_ceil(PAGE) * PAGE)
        .map_err(|_| "the image is larger than 4 GiB".to_string())?;
    let mut image = setup_header(flat.len(), init_size);
    image.extend_from_slice(&flat);
    Ok(image)
}
