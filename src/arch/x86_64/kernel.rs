//! Loading the guest kernel, initrd and command line into guest memory.

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{self, BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::boot_params::low_ram_end;
use super::kernel_check::{self, KernelCheckError};
use super::layout::{CMDLINE_START, HIMEM_START};
use super::regs::BootProtocol;
use crate::host_file::HostFile;

/// Command-line capacity including the terminating NUL (Linux's COMMAND_LINE_SIZE on x86).
pub const CMDLINE_CAPACITY: usize = 2048;
/// The longest command line, without its NUL.
pub const CMDLINE_MAX_LEN: usize = CMDLINE_CAPACITY - 1;
/// Offset of the 64-bit entry point in a bzImage's protected-mode part.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("kernel image {0} is neither an ELF vmlinux nor a bzImage")]
    NotAKernel(String),
    #[error(transparent)]
    Unbootable(#[from] KernelCheckError),
    #[error("cannot load kernel image {path}: {reason}")]
    Load { path: String, reason: String },
    #[error(
        "initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x} after the kernel"
    )]
    InitrdTooLarge { path: String, size: u64, limit: u64 },
    #[error("cannot read initrd {0} into guest memory")]
    ReadInitrd(String),
    #[error("kernel command line is invalid: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("cannot write the kernel command line into guest memory: {0}")]
    WriteCmdline(loader::Error),
}

/// Where and how the loaded kernel is entered.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub entry: u64,
    pub protocol: BootProtocol,
    /// First guest address past the kernel image.
    pub end: u64,
    /// A bzImage's setup header, which the zero page starts from.
    pub setup_header: Option<setup_header>,
}

fn is_not_elf(e: &loader::Error) -> bool {
    matches!(
        e,
        loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber)
            | loader::Error::Elf(loader::elf::Error::ReadElfHeader)
    )
}

fn is_not_bzimage(e: &loader::Error) -> bool {
    use loader::bzimage::Error as B;
    matches!(
        e,
        loader::Error::Bzimage(
            B::InvalidBzImage | B::ReadBzImageHeader | B::SeekBzImageHeader | B::Underflow
        )
    )
}

/// Loads an ELF `vmlinux` (entered through its PVH note when it has one) or a bzImage.
pub fn load_kernel<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &mut HostFile,
) -> Result<LoadedKernel, KernelError> {
    // linux-loader loads much that cannot boot; refusing it here, with the reason, beats a
    // guest that spins or faults with nothing to say why.
    kernel_check::check_kernel(mem, kernel)?;
    let shown = kernel.shown.clone();
    let file = &mut kernel.file;
    let himem = Some(GuestAddress(HIMEM_START));
    let load_err = |e: loader::Error| KernelError::Load {
        path: shown.clone(),
        reason: e.to_string(),
    };
    match Elf::load(mem, None, file, himem) {
        Ok(result) => {
            let (entry, protocol) = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => (addr.raw_value(), BootProtocol::Pvh),
                _ => (result.kernel_load.raw_value(), BootProtocol::Linux64),
            };
            Ok(LoadedKernel {
                entry,
                protocol,
                end: result.kernel_end,
                setup_header: None,
            })
        }
        Err(e) if is_not_elf(&e) => match BzImage::load(mem, None, file, himem) {
            Ok(result) => Ok(LoadedKernel {
                entry: result.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET,
                protocol: BootProtocol::Linux64,
                end: result.kernel_end,
                setup_header: result.setup_header,
            }),
            Err(e) if is_not_bzimage(&e) => Err(KernelError::NotAKernel(shown)),
            Err(e) => Err(load_err(e)),
        },
        Err(e) => Err(load_err(e)),
    }
}

/// Places the initrd page-aligned at the top of RAM below the MMIO gap, as high as possible
/// so the kernel's own early allocations below it stay free. Returns (address, size).
pub fn load_initrd<M: GuestMemoryBackend>(
    mem: &M,
    initrd: &mut HostFile,
    mem_bytes: u64,
    kernel_end: u64,
) -> Result<(u64, u64), KernelError> {
    let shown = initrd.shown.clone();
    let size = initrd.size;
    let limit = low_ram_end(mem_bytes);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end)
        .ok_or_else(|| KernelError::InitrdTooLarge {
            path: shown.clone(),
            size,
            limit,
        })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut initrd.file, size as usize)
        .map_err(|_| KernelError::ReadInitrd(shown))?;
    Ok((addr, size))
}

/// Writes the command line at [`CMDLINE_START`] and returns its length without the NUL.
pub fn load_cmdline<M: GuestMemoryBackend>(mem: &M, args: &str) -> Result<usize, KernelError> {
    let cmdline = Cmdline::try_from(args, CMDLINE_CAPACITY).map_err(KernelError::Cmdline)?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(KernelError::WriteCmdline)?;
    Ok(args.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_file::{self, Accept, Access};
    use crate::memory::GuestMemoryMmap;
    use std::io::Write;
    use std::path::Path;
    use vm_memory::Bytes;

    fn open(p: &Path) -> HostFile {
        host_file::open("kernel", p, Access::ReadOnly, Accept::RegularFile).unwrap()
    }

    fn mem(bytes: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), bytes)]).unwrap()
    }

    fn temp_file(name: &str, contents: &[u8]) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("ember-kernel-test-{}-{name}", std::process::id()));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(contents)
            .unwrap();
        path
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let m = mem(16 << 20);
        for (name, data) in [
            ("empty", &b""[..]),
            ("text", &b"hello, this is not a kernel"[..]),
            ("zeros", &[0u8; 4096][..]),
        ] {
            let p = temp_file(name, data);
            let err = load_kernel(&m, &mut open(&p)).unwrap_err();
            assert!(matches!(err, KernelError::NotAKernel(_)), "{name}: {err}");
            std::fs::remove_file(p).unwrap();
        }
    }

    /// A minimal bzImage: one setup sector plus the boot sector, then a tiny payload.
    fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; 1024];
        img[0x1f1] = 1; // setup_sects
        let syssize = payload.len().div_ceil(16) as u32;
        img[0x1f4..0x1f8].copy_from_slice(&syssize.to_le_bytes());
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = 1; // LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&(HIMEM_START as u32).to_le_bytes());
        img[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // XLF_KERNEL_64
        img[0x258..0x260].copy_from_slice(&HIMEM_START.to_le_bytes()); // pref_address
        img[0x260..0x264].copy_from_slice(&0x1000u32.to_le_bytes()); // init_size
        img.extend_from_slice(payload);
        img
    }

    #[test]
    fn unbootable_kernel_refused_before_anything_is_loaded() {
        let m = mem(16 << 20);
        let mut img = fake_bzimage(b"PAYLOAD!");
        img[0x236] = 0; // no 64-bit entry point
        let p = temp_file("bz-no64", &img);
        let err = load_kernel(&m, &mut open(&p)).unwrap_err();
        std::fs::remove_file(p).unwrap();
        assert!(matches!(err, KernelError::Unbootable(_)), "{err}");
        assert!(
            err.to_string().contains("has no 64-bit entry point"),
            "{err}"
        );
        let mut got = [0u8; 8];
        m.read_slice(&mut got, GuestAddress(HIMEM_START)).unwrap();
        assert_eq!(got, [0u8; 8]);
    }

    #[test]
    fn bzimage_loaded_at_himem_with_64bit_entry() {
        let m = mem(16 << 20);
        let p = temp_file("bz", &fake_bzimage(b"PAYLOAD!"));
        let k = load_kernel(&m, &mut open(&p)).unwrap();
        std::fs::remove_file(p).unwrap();
        assert_eq!(k.entry, HIMEM_START + 0x200);
        assert_eq!(k.protocol, BootProtocol::Linux64);
        assert_eq!(k.setup_header.map(|h| h.setup_sects), Some(1));
        let mut got = [0u8; 8];
        m.read_slice(&mut got, GuestAddress(HIMEM_START)).unwrap();
        assert_eq!(&got, b"PAYLOAD!");
    }

    #[test]
    fn initrd_at_top_of_low_ram_page_aligned() {
        let m = mem(16 << 20);
        let p = temp_file("initrd", &[0xab; 5000]);
        let mut f = open(&p);
        let (addr, size) = load_initrd(&m, &mut f, 16 << 20, 0x20_0000).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 16 << 20 && addr + size + 4096 > 16 << 20);
        assert_eq!(m.read_obj::<u8>(GuestAddress(addr + 4999)).unwrap(), 0xab);
        // Too big to fit above the kernel.
        let err = load_initrd(&m, &mut f, 16 << 20, (16 << 20) - 4096).unwrap_err();
        assert!(matches!(err, KernelError::InitrdTooLarge { .. }), "{err}");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn cmdline_written_with_nul_and_bounded() {
        let m = mem(1 << 20);
        assert_eq!(load_cmdline(&m, "console=ttyS0 probe.x=1").unwrap(), 23);
        let mut buf = [0u8; 24];
        m.read_slice(&mut buf, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&buf, b"console=ttyS0 probe.x=1\0");
        assert!(load_cmdline(&m, &"a".repeat(CMDLINE_CAPACITY)).is_err());
    }
}
