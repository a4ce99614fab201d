//! Refusing kernel images that cannot boot, before anything is loaded.
//!
//! linux-loader copies whatever the file describes and trusts the rest: an ELF built for
//! another machine, a truncated bzImage or a segment that lands on ember's boot structures
//! load "fine", and the guest then spins or faults with nothing that says why. This reads
//! the headers itself and names the problem, the file and the numbers, so a bad
//! `kernel_image_path` is a configuration error (exit code 3) instead of a dead guest.
//!
//! Field offsets follow Documentation/arch/x86/boot.rst (bzImage) and the ELF-64 object
//! file format (vmlinux). Every number comes from the file, so nothing here trusts one:
//! arithmetic saturates or is checked, and allocations are bounded by header field widths.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::HIMEM_START;
use crate::host_file::HostFile;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS32: u8 = 1;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ELFDATA2MSB: u8 = 2;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const EHDR_SIZE: u64 = 64;
const PHDR_SIZE: u64 = 56;

// The bzImage setup header, as offsets into the file.
const SETUP_SECTS: usize = 0x1f1;
const SYSSIZE: usize = 0x1f4;
const HEADER: usize = 0x202;
const VERSION: usize = 0x206;
const LOADFLAGS: usize = 0x211;
const CODE32_START: usize = 0x214;
const KERNEL_ALIGNMENT: usize = 0x230;
const RELOCATABLE_KERNEL: usize = 0x234;
const XLOADFLAGS: usize = 0x236;
const PREF_ADDRESS: usize = 0x258;
const INIT_SIZE: usize = 0x260;
/// Everything up to and including `init_size`.
const SETUP_HEADER_END: usize = INIT_SIZE + 4;
const HDRS_MAGIC: &[u8; 4] = b"HdrS";
const LOADED_HIGH: u8 = 0x01;
const XLF_KERNEL_64: u16 = 0x01;
/// `xloadflags`, and with it XLF_KERNEL_64, exists from boot protocol 2.12 on.
const MIN_BOOT_PROTOCOL: u16 = 0x020c;
/// Below 2.04 `syssize` is only two bytes wide.
const WIDE_SYSSIZE_PROTOCOL: u16 = 0x0204;
/// A `setup_sects` of 0 means 4, for kernels older than the field.
const DEFAULT_SETUP_SECTS: u64 = 4;
const SECTOR: u64 = 512;
const PARAGRAPH: u64 = 16;

#[derive(Debug, thiserror::Error)]
pub enum KernelCheckError {
    #[error("cannot read kernel image {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error(
        "kernel image {path} is {}; ember boots 64-bit (ELFCLASS64) x86-64 kernels",
        class_name(*.class)
    )]
    ElfClass { path: String, class: u8 },
    #[error(
        "kernel image {path} is {}; x86-64 kernels are little-endian",
        encoding_name(*.data)
    )]
    ElfEncoding { path: String, data: u8 },
    #[error(
        "kernel image {path} is an ELF for machine {machine} ({}), not x86-64",
        machine_name(*.machine)
    )]
    ElfMachine { path: String, machine: u16 },
    #[error("kernel image {path} is truncated: its {part} ends at byte {end}, the file has {len}")]
    ElfTruncated {
        path: String,
        part: String,
        end: u64,
        len: u64,
    },
    #[error("kernel image {path} is a malformed ELF: {reason}")]
    ElfMalformed { path: String, reason: String },
    #[error(
        "kernel image {path} is an ELF with no loadable segment (no PT_LOAD with bytes in the file): there is nothing to boot"
    )]
    NoLoadableSegment { path: String },
    #[error(
        "kernel image {path}: segment {index} at {start:#x}..{end:#x} lies below 1 MiB, where ember keeps its boot structures"
    )]
    SegmentBelowHimem {
        path: String,
        index: usize,
        start: u64,
        end: u64,
    },
    #[error(
        "kernel image {path}: segment {index} at {start:#x}..{end:#x} is not inside guest RAM ({ram})"
    )]
    SegmentOutsideRam {
        path: String,
        index: usize,
        start: u64,
        end: u64,
        ram: String,
    },
    #[error(
        "kernel image {path}: its entry point {entry:#x} is not inside any segment loaded from the file"
    )]
    EntryOutsideSegments { path: String, entry: u64 },
    #[error(
        "kernel image {path} is truncated: its header announces {announced} bytes, the file has {len}"
    )]
    BzImageTruncated {
        path: String,
        announced: u64,
        len: u64,
    },
    #[error(
        "kernel image {path} is a bzImage with no kernel after its {setup_size}-byte setup (syssize is 0)"
    )]
    BzImageEmpty { path: String, setup_size: u64 },
    #[error(
        "kernel image {path} uses boot protocol {}.{:02}; ember needs 2.12 or later, which announces a 64-bit entry point",
        .version >> 8,
        .version & 0xff
    )]
    BootProtocolTooOld { path: String, version: u16 },
    #[error(
        "kernel image {path} does not set LOADED_HIGH in its loadflags ({loadflags:#04x}): it wants to be loaded at 0x10000, below 1 MiB, where ember keeps its boot structures"
    )]
    NotLoadedHigh { path: String, loadflags: u8 },
    #[error(
        "kernel image {path} has no 64-bit entry point (XLF_KERNEL_64 is clear in its xloadflags, {xloadflags:#06x}); ember enters a bzImage in 64-bit mode"
    )]
    No64BitEntry { path: String, xloadflags: u16 },
    #[error(
        "kernel image {path}: its {what} at {start:#x}..{end:#x} lies below 1 MiB, where ember keeps its boot structures"
    )]
    BzImageBelowHimem {
        path: String,
        what: &'static str,
        start: u64,
        end: u64,
    },
    #[error(
        "kernel image {path}: its {what} at {start:#x}..{end:#x} is not inside guest RAM ({ram})"
    )]
    BzImageOutsideRam {
        path: String,
        what: &'static str,
        start: u64,
        end: u64,
        ram: String,
    },
}

fn class_name(class: u8) -> String {
    match class {
        ELFCLASS32 => "a 32-bit ELF (ELFCLASS32)".to_owned(),
        _ => format!("an ELF of unknown class {class}"),
    }
}

fn encoding_name(data: u8) -> String {
    match data {
        ELFDATA2MSB => "a big-endian ELF (ELFDATA2MSB)".to_owned(),
        _ => format!("an ELF with unknown data encoding {data}"),
    }
}

/// The machines a kernel image meant for another host is most likely built for.
fn machine_name(machine: u16) -> &'static str {
    match machine {
        3 => "i386",
        8 => "MIPS",
        20 => "PowerPC",
        21 => "PowerPC64",
        22 => "s390",
        40 => "ARM",
        43 => "SPARC64",
        183 => "aarch64",
        243 => "RISC-V",
        258 => "LoongArch",
        _ => "unknown",
    }
}

/// Positional reads: the check never moves the file offset the loader works from.
trait ReadAt {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

/// Refuses `kernel` if it is an ELF or a bzImage that cannot boot in `mem`. Anything else
/// passes: the loader then says that it is neither.
pub fn check_kernel<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &HostFile,
) -> Result<(), KernelCheckError> {
    check_image(mem, &kernel.file, kernel.size, &kernel.shown)
}

fn check_image<M: GuestMemoryBackend, R: ReadAt + ?Sized>(
    mem: &M,
    file: &R,
    len: u64,
    shown: &str,
) -> Result<(), KernelCheckError> {
    let image = Image { file, len, shown };
    let mut magic = [0u8; 4];
    let n = image.read_prefix(&mut magic)?;
    if n == magic.len() && &magic == ELF_MAGIC {
        return check_elf(mem, &image);
    }
    // The same test linux-loader uses to take a file for a bzImage.
    let mut header = [0u8; SETUP_HEADER_END];
    let n = image.read_prefix(&mut header)?;
    if n >= HEADER + 4 && header[HEADER..HEADER + 4] == HDRS_MAGIC[..] {
        return check_bzimage(mem, &image, &header);
    }
    Ok(())
}

struct Image<'a, R: ?Sized> {
    file: &'a R,
    len: u64,
    shown: &'a str,
}

impl<R: ReadAt + ?Sized> Image<'_, R> {
    fn path(&self) -> String {
        self.shown.to_owned()
    }

    fn read_err(&self, source: io::Error) -> KernelCheckError {
        KernelCheckError::Read {
            path: self.path(),
            source,
        }
    }

    /// Fills as much of `buf` as the file has from its start (the rest stays zero); returns
    /// how many bytes that was.
    fn read_prefix(&self, buf: &mut [u8]) -> Result<usize, KernelCheckError> {
        let n = usize::try_from(self.len).map_or(buf.len(), |len| len.min(buf.len()));
        self.file
            .read_exact_at(&mut buf[..n], 0)
            .map_err(|e| self.read_err(e))?;
        Ok(n)
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    let mut v = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        v.copy_from_slice(s);
    }
    u16::from_le_bytes(v)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        v.copy_from_slice(s);
    }
    u32::from_le_bytes(v)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        v.copy_from_slice(s);
    }
    u64::from_le_bytes(v)
}

/// Whether all of `start..end` is guest RAM; the range may span adjacent regions but not
/// a hole such as the MMIO gap.
fn in_ram<M: GuestMemoryBackend>(mem: &M, start: u64, end: u64) -> bool {
    let Some(len) = end.checked_sub(start).and_then(|l| usize::try_from(l).ok()) else {
        return false;
    };
    mem.address_in_range(GuestAddress(start)) && mem.check_range(GuestAddress(start), len)
}

/// Guest RAM as error messages show it, so the user sees what the kernel missed.
fn describe_ram<M: GuestMemoryBackend>(mem: &M) -> String {
    let ranges: Vec<String> = mem
        .iter()
        .map(|r| {
            let start = r.start_addr().0;
            format!("{start:#x}..{:#x}", start.saturating_add(r.len()))
        })
        .collect();
    if ranges.is_empty() {
        "none".to_owned()
    } else {
        ranges.join(" and ")
    }
}

fn check_elf<M: GuestMemoryBackend, R: ReadAt + ?Sized>(
    mem: &M,
    image: &Image<'_, R>,
) -> Result<(), KernelCheckError> {
    let path = || image.path();
    let truncated = |part: String, end: u64| KernelCheckError::ElfTruncated {
        path: path(),
        part,
        end,
        len: image.len,
    };
    let malformed = |reason: String| KernelCheckError::ElfMalformed {
        path: path(),
        reason,
    };
    let mut ehdr = [0u8; EHDR_SIZE as usize];
    let n = image.read_prefix(&mut ehdr)?;
    // Class and byte order first: they decide how the rest of the header reads, and a
    // 32-bit header is shorter than a 64-bit one.
    if n > 4 && ehdr[4] != ELFCLASS64 {
        return Err(KernelCheckError::ElfClass {
            path: path(),
            class: ehdr[4],
        });
    }
    if n > 5 && ehdr[5] != ELFDATA2LSB {
        return Err(KernelCheckError::ElfEncoding {
            path: path(),
            data: ehdr[5],
        });
    }
    if n >= 20 && u16_at(&ehdr, 18) != EM_X86_64 {
        return Err(KernelCheckError::ElfMachine {
            path: path(),
            machine: u16_at(&ehdr, 18),
        });
    }
    if n < ehdr.len() {
        return Err(truncated("ELF header".to_owned(), EHDR_SIZE));
    }
    let entry = u64_at(&ehdr, 0x18);
    let phoff = u64_at(&ehdr, 0x20);
    let phentsize = u16_at(&ehdr, 0x36);
    let phnum = u16_at(&ehdr, 0x38);
    if phnum == 0 {
        return Err(KernelCheckError::NoLoadableSegment { path: path() });
    }
    if u64::from(phentsize) != PHDR_SIZE {
        return Err(malformed(format!(
            "its program header entries are {phentsize} bytes, not {PHDR_SIZE}"
        )));
    }
    if phoff < EHDR_SIZE {
        return Err(malformed(format!(
            "its program headers start at byte {phoff}, inside the ELF header"
        )));
    }
    // At most 65535 entries of 56 bytes: under 4 MiB whatever the file says.
    let table_len = u64::from(phnum) * PHDR_SIZE;
    let table_end = phoff.saturating_add(table_len);
    if table_end > image.len {
        return Err(truncated("program header table".to_owned(), table_end));
    }
    let mut table = vec![0u8; usize::from(phnum) * PHDR_SIZE as usize];
    image
        .file
        .read_exact_at(&mut table, phoff)
        .map_err(|e| image.read_err(e))?;

    // Where the file's bytes land: the entry point has to be among them.
    let mut loaded: Vec<(u64, u64)> = Vec::new();
    for (index, ph) in table.chunks_exact(PHDR_SIZE as usize).enumerate() {
        if u32_at(ph, 0) != PT_LOAD {
            continue;
        }
        let offset = u64_at(ph, 0x08);
        let paddr = u64_at(ph, 0x18);
        let filesz = u64_at(ph, 0x20);
        let memsz = u64_at(ph, 0x28);
        if filesz > memsz {
            return Err(malformed(format!(
                "segment {index} has {filesz} bytes in the file but only {memsz} in memory"
            )));
        }
        if memsz == 0 {
            continue;
        }
        if filesz > 0 {
            let file_end = offset.saturating_add(filesz);
            if file_end > image.len {
                return Err(truncated(format!("segment {index}"), file_end));
            }
        }
        // A segment with no bytes in the file (bss) still takes its memory once the
        // kernel runs, so it has to fit just the same.
        let end = paddr.saturating_add(memsz);
        if paddr < HIMEM_START {
            return Err(KernelCheckError::SegmentBelowHimem {
                path: path(),
                index,
                start: paddr,
                end,
            });
        }
        if !in_ram(mem, paddr, end) {
            return Err(KernelCheckError::SegmentOutsideRam {
                path: path(),
                index,
                start: paddr,
                end,
                ram: describe_ram(mem),
            });
        }
        if filesz > 0 {
            loaded.push((paddr, paddr.saturating_add(filesz)));
        }
    }
    if loaded.is_empty() {
        return Err(KernelCheckError::NoLoadableSegment { path: path() });
    }
    // Entering zero-filled memory (a segment's bss) runs no code either.
    if !loaded
        .iter()
        .any(|&(start, end)| (start..end).contains(&entry))
    {
        return Err(KernelCheckError::EntryOutsideSegments {
            path: path(),
            entry,
        });
    }
    Ok(())
}

fn check_bzimage<M: GuestMemoryBackend, R: ReadAt + ?Sized>(
    mem: &M,
    image: &Image<'_, R>,
    header: &[u8; SETUP_HEADER_END],
) -> Result<(), KernelCheckError> {
    let path = || image.path();
    let version = u16_at(header, VERSION);
    let setup_sects = match header[SETUP_SECTS] {
        0 => DEFAULT_SETUP_SECTS,
        n => u64::from(n),
    };
    // The real-mode part is the boot sector plus the setup sectors.
    let setup_size = (setup_sects + 1) * SECTOR;
    let mut syssize = u32_at(header, SYSSIZE);
    if version < WIDE_SYSSIZE_PROTOCOL {
        syssize &= 0xffff;
    }
    let code_size = u64::from(syssize) * PARAGRAPH;
    let announced = setup_size + code_size;
    // syssize counts whole paragraphs, so a last partial paragraph may be missing from the
    // file (ember's own probe bzImage is built so); anything shorter lacks kernel code.
    let truncated = match image.len.checked_sub(setup_size) {
        None => true,
        Some(payload) => payload.saturating_add(PARAGRAPH - 1) < code_size,
    };
    // Checked before any other field, which a file this short may not even hold.
    if truncated {
        return Err(KernelCheckError::BzImageTruncated {
            path: path(),
            announced,
            len: image.len,
        });
    }
    if image.len == setup_size {
        return Err(KernelCheckError::BzImageEmpty {
            path: path(),
            setup_size,
        });
    }
    if version < MIN_BOOT_PROTOCOL {
        return Err(KernelCheckError::BootProtocolTooOld {
            path: path(),
            version,
        });
    }
    let loadflags = header[LOADFLAGS];
    if loadflags & LOADED_HIGH == 0 {
        return Err(KernelCheckError::NotLoadedHigh {
            path: path(),
            loadflags,
        });
    }
    let xloadflags = u16_at(header, XLOADFLAGS);
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(KernelCheckError::No64BitEntry {
            path: path(),
            xloadflags,
        });
    }

    // The loader copies everything after the setup to code32_start.
    let load_address = u64::from(u32_at(header, CODE32_START));
    let code_end = load_address.saturating_add(image.len - setup_size);
    check_bz_range(mem, image, "protected-mode code", load_address, code_end)?;

    // boot.rst, init_size: the kernel needs init_size bytes from its runtime start address
    // before it has looked at the memory map, so all of them have to be RAM.
    let init_size = u64::from(u32_at(header, INIT_SIZE));
    if init_size > 0 {
        let pref_address = u64_at(header, PREF_ADDRESS);
        let start = if header[RELOCATABLE_KERNEL] != 0 {
            let alignment = u64::from(u32_at(header, KERNEL_ALIGNMENT));
            align_up(load_address.max(pref_address), alignment)
        } else if pref_address != 0 {
            pref_address
        } else {
            // pref_address is a preference only "if nonzero"; without one the kernel
            // runs where it was loaded.
            load_address
        };
        check_bz_range(
            mem,
            image,
            "boot-time memory (init_size from its runtime start address)",
            start,
            start.saturating_add(init_size),
        )?;
    }
    Ok(())
}

fn align_up(value: u64, alignment: u64) -> u64 {
    if alignment <= 1 {
        return value;
    }
    value.div_ceil(alignment).saturating_mul(alignment)
}

fn check_bz_range<M: GuestMemoryBackend, R: ReadAt + ?Sized>(
    mem: &M,
    image: &Image<'_, R>,
    what: &'static str,
    start: u64,
    end: u64,
) -> Result<(), KernelCheckError> {
    if start < HIMEM_START {
        return Err(KernelCheckError::BzImageBelowHimem {
            path: image.path(),
            what,
            start,
            end,
        });
    }
    if !in_ram(mem, start, end) {
        return Err(KernelCheckError::BzImageOutsideRam {
            path: image.path(),
            what,
            start,
            end,
            ram: describe_ram(mem),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestMemoryMmap;

    const MIB: u64 = 1 << 20;
    const ELF_PATH: &str = "/x/vmlinux";
    const BZ_PATH: &str = "/x/bzImage";

    impl ReadAt for [u8] {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
            let src = self
                .get(start..start.saturating_add(buf.len()))
                .ok_or(io::ErrorKind::UnexpectedEof)?;
            buf.copy_from_slice(src);
            Ok(())
        }
    }

    fn mem(ranges: &[(u64, u64)]) -> GuestMemoryMmap {
        let ranges: Vec<(GuestAddress, usize)> = ranges
            .iter()
            .map(|&(start, len)| (GuestAddress(start), len as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    fn ram_16m() -> GuestMemoryMmap {
        mem(&[(0, 16 * MIB)])
    }

    fn check(m: &GuestMemoryMmap, img: &[u8], path: &str) -> Result<(), KernelCheckError> {
        check_image(m, img, img.len() as u64, path)
    }

    fn message(m: &GuestMemoryMmap, img: &[u8], path: &str) -> String {
        check(m, img, path).unwrap_err().to_string()
    }

    fn put(img: &mut [u8], at: usize, bytes: &[u8]) {
        img[at..at + bytes.len()].copy_from_slice(bytes);
    }

    #[derive(Clone, Copy)]
    struct Seg {
        p_type: u32,
        paddr: u64,
        filesz: u64,
        memsz: u64,
    }

    const fn load(paddr: u64, filesz: u64, memsz: u64) -> Seg {
        Seg {
            p_type: PT_LOAD,
            paddr,
            filesz,
            memsz,
        }
    }

    const PT_NOTE: u32 = 4;
    const VALID_ENTRY: u64 = 0x10_0010;

    /// A little-endian ELF64 x86-64 executable: the header, the program headers, then each
    /// segment's bytes in order.
    fn elf(entry: u64, segs: &[Seg]) -> Vec<u8> {
        let mut img = vec![0u8; 64 + 56 * segs.len()];
        put(&mut img, 0, b"\x7fELF");
        img[4] = ELFCLASS64;
        img[5] = ELFDATA2LSB;
        img[6] = 1; // EI_VERSION
        put(&mut img, 16, &2u16.to_le_bytes()); // ET_EXEC
        put(&mut img, 18, &EM_X86_64.to_le_bytes());
        put(&mut img, 20, &1u32.to_le_bytes());
        put(&mut img, 24, &entry.to_le_bytes());
        put(&mut img, 32, &64u64.to_le_bytes()); // e_phoff
        put(&mut img, 52, &64u16.to_le_bytes()); // e_ehsize
        put(&mut img, 54, &56u16.to_le_bytes());
        put(&mut img, 56, &(segs.len() as u16).to_le_bytes());
        for (i, s) in segs.iter().enumerate() {
            let ph = 64 + 56 * i;
            let offset = img.len() as u64;
            put(&mut img, ph, &s.p_type.to_le_bytes());
            put(&mut img, ph + 8, &offset.to_le_bytes());
            put(&mut img, ph + 16, &s.paddr.to_le_bytes());
            put(&mut img, ph + 24, &s.paddr.to_le_bytes());
            put(&mut img, ph + 32, &s.filesz.to_le_bytes());
            put(&mut img, ph + 40, &s.memsz.to_le_bytes());
            img.resize(img.len() + s.filesz as usize, 0xcc);
        }
        img
    }

    /// Text at 1 MiB, a bss-only segment after it and a note, like a vmlinux.
    fn valid_elf() -> Vec<u8> {
        elf(
            VALID_ENTRY,
            &[
                load(0x10_0000, 0x100, 0x2000),
                load(0x20_0000, 0, 0x1000),
                Seg {
                    p_type: PT_NOTE,
                    paddr: 0,
                    filesz: 8,
                    memsz: 8,
                },
            ],
        )
    }

    #[test]
    fn valid_elf_passes() {
        check(&ram_16m(), &valid_elf(), ELF_PATH).unwrap();
    }

    #[test]
    fn neither_elf_nor_bzimage_is_left_to_the_loader() {
        for img in [&b""[..], b"\x7fEL", b"hello", &[0u8; 4096]] {
            check(&ram_16m(), img, ELF_PATH).unwrap();
        }
    }

    #[test]
    fn elf_without_loadable_segment() {
        let m = ram_16m();
        let want = "kernel image /x/vmlinux is an ELF with no loadable segment";
        // Only a note and a bss-only PT_LOAD: nothing from the file reaches memory.
        let img = elf(
            VALID_ENTRY,
            &[
                Seg {
                    p_type: PT_NOTE,
                    paddr: 0,
                    filesz: 8,
                    memsz: 8,
                },
                load(0x10_0000, 0, 0x1000),
            ],
        );
        assert!(message(&m, &img, ELF_PATH).starts_with(want));
        // No program headers at all.
        assert!(message(&m, &elf(VALID_ENTRY, &[]), ELF_PATH).starts_with(want));
    }

    #[test]
    fn truncated_elf() {
        let m = ram_16m();
        let img = valid_elf();
        // The text segment's bytes start after the header and three program headers.
        let seg_end = 64 + 3 * 56 + 0x100;
        assert_eq!(
            message(&m, &img[..seg_end - 1], ELF_PATH),
            format!(
                "kernel image /x/vmlinux is truncated: its segment 0 ends at byte {seg_end}, \
                 the file has {}",
                seg_end - 1
            )
        );
        assert_eq!(
            message(&m, &img[..100], ELF_PATH),
            "kernel image /x/vmlinux is truncated: its program header table ends at byte 232, \
             the file has 100"
        );
        assert_eq!(
            message(&m, &img[..40], ELF_PATH),
            "kernel image /x/vmlinux is truncated: its ELF header ends at byte 64, the file has 40"
        );
    }

    #[test]
    fn segment_below_1mib() {
        let img = elf(
            VALID_ENTRY,
            &[
                load(0x10_0000, 0x100, 0x100),
                load(0x30_0000, 0x10, 0x10),
                load(0x8_0000, 0x10, 0x1_0000),
            ],
        );
        assert_eq!(
            message(&ram_16m(), &img, ELF_PATH),
            "kernel image /x/vmlinux: segment 2 at 0x80000..0x90000 lies below 1 MiB, \
             where ember keeps its boot structures"
        );
        // A segment that starts below 1 MiB and reaches past it is refused just the same.
        let img = elf(VALID_ENTRY, &[load(0xf_f000, 0x2000, 0x2000)]);
        assert!(message(&ram_16m(), &img, ELF_PATH).contains("segment 0 at 0xff000..0x101000"));
    }

    #[test]
    fn segment_outside_ram() {
        // Past the end of RAM.
        let img = elf(VALID_ENTRY, &[load(0x10_0000, 0x100, 16 * MIB)]);
        assert_eq!(
            message(&ram_16m(), &img, ELF_PATH),
            "kernel image /x/vmlinux: segment 0 at 0x100000..0x1100000 is not inside guest RAM \
             (0x0..0x1000000)"
        );
        // RAM in two parts around a gap, as around the MMIO gap: a segment in either part
        // fits, one across the gap does not.
        let split = mem(&[(0, 16 * MIB), (32 * MIB, 16 * MIB)]);
        let img = elf(
            VALID_ENTRY,
            &[load(0x10_0000, 0x100, 0x100), load(40 * MIB, 0x100, MIB)],
        );
        check(&split, &img, ELF_PATH).unwrap();
        let img = elf(
            VALID_ENTRY,
            &[
                load(0x10_0000, 0x100, 0x100),
                load(15 * MIB, 0x100, 2 * MIB),
            ],
        );
        assert_eq!(
            message(&split, &img, ELF_PATH),
            "kernel image /x/vmlinux: segment 1 at 0xf00000..0x1100000 is not inside guest RAM \
             (0x0..0x1000000 and 0x2000000..0x3000000)"
        );
        // Bss takes memory too, and an address that wraps the address space fits nowhere.
        for seg in [load(20 * MIB, 0, MIB), load(u64::MAX - 0xfff, 0, 0x2000)] {
            let img = elf(VALID_ENTRY, &[load(0x10_0000, 0x100, 0x100), seg]);
            let msg = message(&ram_16m(), &img, ELF_PATH);
            assert!(msg.contains("segment 1 at"), "{msg}");
            assert!(msg.contains("is not inside guest RAM"), "{msg}");
        }
    }

    #[test]
    fn entry_outside_loaded_segments() {
        let m = ram_16m();
        let segs = [load(0x10_0000, 0x100, 0x2000), load(0x20_0000, 0, 0x1000)];
        // Nowhere near a segment, in a segment's bss, in a bss-only segment.
        for entry in [0x50_0000, 0x10_0100, 0x20_0000] {
            assert_eq!(
                message(&m, &elf(entry, &segs), ELF_PATH),
                format!(
                    "kernel image /x/vmlinux: its entry point {entry:#x} is not inside any \
                     segment loaded from the file"
                )
            );
        }
        check(&m, &elf(0x10_00ff, &segs), ELF_PATH).unwrap();
    }

    #[test]
    fn elf_of_wrong_class_or_byte_order() {
        let m = ram_16m();
        let mut img = valid_elf();
        img[4] = ELFCLASS32;
        assert_eq!(
            message(&m, &img, ELF_PATH),
            "kernel image /x/vmlinux is a 32-bit ELF (ELFCLASS32); ember boots 64-bit \
             (ELFCLASS64) x86-64 kernels"
        );
        // A 32-bit header is shorter than a 64-bit one: still named for what it is.
        assert!(message(&m, &img[..52], ELF_PATH).contains("is a 32-bit ELF"));
        img[4] = 7;
        assert!(message(&m, &img, ELF_PATH).contains("is an ELF of unknown class 7"));
        let mut img = valid_elf();
        img[5] = ELFDATA2MSB;
        assert_eq!(
            message(&m, &img, ELF_PATH),
            "kernel image /x/vmlinux is a big-endian ELF (ELFDATA2MSB); x86-64 kernels are \
             little-endian"
        );
    }

    #[test]
    fn elf_for_another_machine() {
        let mut img = valid_elf();
        put(&mut img, 18, &183u16.to_le_bytes());
        assert_eq!(
            message(&ram_16m(), &img, ELF_PATH),
            "kernel image /x/vmlinux is an ELF for machine 183 (aarch64), not x86-64"
        );
        put(&mut img, 18, &3u16.to_le_bytes());
        assert!(message(&ram_16m(), &img, ELF_PATH).contains("machine 3 (i386)"));
    }

    #[test]
    fn malformed_elf() {
        let m = ram_16m();
        let mut img = valid_elf();
        put(&mut img, 54, &32u16.to_le_bytes());
        assert!(message(&m, &img, ELF_PATH).contains("program header entries are 32 bytes"));
        let mut img = valid_elf();
        put(&mut img, 32, &8u64.to_le_bytes());
        assert!(message(&m, &img, ELF_PATH).contains("inside the ELF header"));
        let img = elf(VALID_ENTRY, &[load(0x10_0000, 0x100, 0x10)]);
        assert!(
            message(&m, &img, ELF_PATH).contains("segment 0 has 256 bytes in the file but only 16")
        );
        // A program header table at an absurd offset is not read, let alone allocated.
        let mut img = valid_elf();
        put(&mut img, 32, &(u64::MAX - 8).to_le_bytes());
        assert!(message(&m, &img, ELF_PATH).contains("program header table ends at byte"));
    }

    /// A bzImage as Linux builds it: one setup sector after the boot sector, protocol 2.15,
    /// 64-bit entry, loaded high at 1 MiB, not relocatable, `payload` after the setup.
    fn bzimage(payload: &[u8], init_size: u32) -> Vec<u8> {
        let mut img = vec![0u8; 1024];
        img[SETUP_SECTS] = 1;
        put(
            &mut img,
            SYSSIZE,
            &(payload.len().div_ceil(16) as u32).to_le_bytes(),
        );
        put(&mut img, 0x1fe, &0xaa55u16.to_le_bytes());
        put(&mut img, HEADER, b"HdrS");
        put(&mut img, VERSION, &0x020fu16.to_le_bytes());
        img[LOADFLAGS] = LOADED_HIGH;
        put(&mut img, CODE32_START, &(HIMEM_START as u32).to_le_bytes());
        put(&mut img, KERNEL_ALIGNMENT, &0x1000u32.to_le_bytes());
        put(&mut img, XLOADFLAGS, &XLF_KERNEL_64.to_le_bytes());
        put(&mut img, PREF_ADDRESS, &HIMEM_START.to_le_bytes());
        put(&mut img, INIT_SIZE, &init_size.to_le_bytes());
        img.extend_from_slice(payload);
        img
    }

    fn valid_bzimage() -> Vec<u8> {
        bzimage(&[0x90; 4096], 0x10_0000)
    }

    /// Linux's own layout: relocatable, 2 MiB aligned, preferring 16 MiB.
    fn relocatable(mut img: Vec<u8>) -> Vec<u8> {
        img[RELOCATABLE_KERNEL] = 1;
        put(&mut img, KERNEL_ALIGNMENT, &0x20_0000u32.to_le_bytes());
        put(&mut img, PREF_ADDRESS, &0x100_0000u64.to_le_bytes());
        img
    }

    #[test]
    fn valid_bzimages_pass() {
        let m = mem(&[(0, 64 * MIB)]);
        check(&m, &valid_bzimage(), BZ_PATH).unwrap();
        check(&m, &relocatable(valid_bzimage()), BZ_PATH).unwrap();
        // syssize rounds up to whole paragraphs: a last partial one is not truncation.
        check(&m, &bzimage(&[0x90; 4100], 0x10_0000), BZ_PATH).unwrap();
        // Trailing bytes (a signature appended to a signed kernel) are fine too.
        let mut img = valid_bzimage();
        img.extend_from_slice(&[0u8; 600]);
        check(&m, &img, BZ_PATH).unwrap();
    }

    #[test]
    fn truncated_bzimage() {
        let m = ram_16m();
        let img = valid_bzimage();
        let announced = img.len();
        for len in [announced - 16, 1024, 1000, 0x210] {
            assert_eq!(
                message(&m, &img[..len], BZ_PATH),
                format!(
                    "kernel image /x/bzImage is truncated: its header announces {announced} \
                     bytes, the file has {len}"
                )
            );
        }
        // setup_sects 0 means 4: the real-mode part alone is 2560 bytes.
        let mut img = valid_bzimage();
        img[SETUP_SECTS] = 0;
        assert!(message(&m, &img, BZ_PATH).contains("announces 6656 bytes, the file has 5120"));
        // A header that announces no kernel at all.
        let mut img = bzimage(&[], 0x10_0000);
        assert_eq!(img.len(), 1024);
        assert_eq!(
            message(&m, &img, BZ_PATH),
            "kernel image /x/bzImage is a bzImage with no kernel after its 1024-byte setup \
             (syssize is 0)"
        );
        // Below protocol 2.04 only the low half of syssize counts.
        put(&mut img, SYSSIZE, &0x0001_0000u32.to_le_bytes());
        put(&mut img, VERSION, &0x0203u16.to_le_bytes());
        assert!(message(&m, &img, BZ_PATH).contains("syssize is 0"));
    }

    #[test]
    fn bzimage_older_than_2_12() {
        let mut img = valid_bzimage();
        put(&mut img, VERSION, &0x020bu16.to_le_bytes());
        assert_eq!(
            message(&ram_16m(), &img, BZ_PATH),
            "kernel image /x/bzImage uses boot protocol 2.11; ember needs 2.12 or later, which \
             announces a 64-bit entry point"
        );
        put(&mut img, VERSION, &0x020cu16.to_le_bytes());
        check(&ram_16m(), &img, BZ_PATH).unwrap();
    }

    #[test]
    fn bzimage_without_64bit_entry() {
        let mut img = valid_bzimage();
        // Every other xloadflags bit set, XLF_KERNEL_64 clear.
        put(&mut img, XLOADFLAGS, &0x1eu16.to_le_bytes());
        assert_eq!(
            message(&ram_16m(), &img, BZ_PATH),
            "kernel image /x/bzImage has no 64-bit entry point (XLF_KERNEL_64 is clear in its \
             xloadflags, 0x001e); ember enters a bzImage in 64-bit mode"
        );
    }

    #[test]
    fn bzimage_not_loaded_high() {
        let mut img = valid_bzimage();
        img[LOADFLAGS] = 0x80; // CAN_USE_HEAP alone
        assert_eq!(
            message(&ram_16m(), &img, BZ_PATH),
            "kernel image /x/bzImage does not set LOADED_HIGH in its loadflags (0x80): it wants \
             to be loaded at 0x10000, below 1 MiB, where ember keeps its boot structures"
        );
    }

    #[test]
    fn bzimage_loaded_below_1mib() {
        let mut img = valid_bzimage();
        put(&mut img, CODE32_START, &0x1_0000u32.to_le_bytes());
        assert_eq!(
            message(&ram_16m(), &img, BZ_PATH),
            "kernel image /x/bzImage: its protected-mode code at 0x10000..0x11000 lies below \
             1 MiB, where ember keeps its boot structures"
        );
    }

    #[test]
    fn bzimage_code_outside_ram() {
        let m = mem(&[(0, 2 * MIB)]);
        let img = bzimage(&vec![0x90; 2 * MIB as usize], 0x1000);
        assert_eq!(
            message(&m, &img, BZ_PATH),
            "kernel image /x/bzImage: its protected-mode code at 0x100000..0x300000 is not \
             inside guest RAM (0x0..0x200000)"
        );
    }

    #[test]
    fn bzimage_init_size_beyond_ram() {
        let m = ram_16m();
        let img = bzimage(&[0x90; 4096], 15 * MIB as u32 + 1);
        assert_eq!(
            message(&m, &img, BZ_PATH),
            "kernel image /x/bzImage: its boot-time memory (init_size from its runtime start \
             address) at 0x100000..0x1000001 is not inside guest RAM (0x0..0x1000000)"
        );
        check(&m, &bzimage(&[0x90; 4096], 15 * MIB as u32), BZ_PATH).unwrap();
    }

    #[test]
    fn relocatable_bzimage_runs_from_pref_address() {
        // 8 MiB from the load address would fit in 16 MiB; a relocatable kernel first moves
        // up to its pref_address (16 MiB here), so it needs RAM up to 24 MiB.
        let img = relocatable(bzimage(&[0x90; 4096], 8 * MIB as u32));
        assert!(
            message(&ram_16m(), &img, BZ_PATH).contains("at 0x1000000..0x1800000 is not inside")
        );
        check(&mem(&[(0, 24 * MIB)]), &img, BZ_PATH).unwrap();
        // Loaded above pref_address, it aligns up to kernel_alignment instead.
        let mut img = img;
        put(&mut img, CODE32_START, &0x110_0000u32.to_le_bytes());
        assert!(
            message(&mem(&[(0, 24 * MIB)]), &img, BZ_PATH)
                .contains("at 0x1200000..0x1a00000 is not inside")
        );
        // Not relocatable: it runs at pref_address, whatever the load address.
        let mut img = valid_bzimage();
        put(&mut img, PREF_ADDRESS, &0x8_0000u64.to_le_bytes());
        assert!(message(&ram_16m(), &img, BZ_PATH).contains(
            "its boot-time memory (init_size from its runtime start address) at 0x80000..0x180000 \
             lies below 1 MiB"
        ));
    }

    #[test]
    fn checks_the_file_through_positional_reads() {
        let path = std::env::temp_dir().join(format!(
            "ember-kernel-check-test-{}-machine",
            std::process::id()
        ));
        let mut img = valid_elf();
        put(&mut img, 18, &183u16.to_le_bytes());
        std::fs::write(&path, &img).unwrap();
        let file = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let err = check_image(&ram_16m(), &file, img.len() as u64, "/y/vmlinux").unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel image /y/vmlinux is an ELF for machine 183 (aarch64), not x86-64"
        );
        // A file shorter than its size said (cut under ember) is a read error, no panic.
        let short = std::env::temp_dir().join(format!(
            "ember-kernel-check-test-{}-short",
            std::process::id()
        ));
        std::fs::write(&short, &valid_elf()[..10]).unwrap();
        let file = File::open(&short).unwrap();
        std::fs::remove_file(&short).unwrap();
        let err = check_image(&ram_16m(), &file, 4096, "/y/vmlinux").unwrap_err();
        assert!(matches!(err, KernelCheckError::Read { .. }), "{err}");
    }
}
