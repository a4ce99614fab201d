//! The arm64 `Image` and where a guest's boot pieces go (the kernel's
//! Documentation/arch/arm64/booting.rst): the kernel `text_offset` bytes above a 2 MiB
//! aligned base, with `image_size` bytes (its BSS included) free from there; the device tree
//! (at most 2 MiB, 8-byte aligned) and the initrd anywhere else in RAM. ember puts the
//! kernel at the start of RAM and the device tree in the last 2 MiB, with the initrd just
//! below it, so the kernel has the most room to grow into.

use super::layout::FDT_MAX_LEN;

/// The header's size and where its fields are (booting.rst, "Call the kernel image").
pub const HEADER_LEN: usize = 64;
const TEXT_OFFSET_AT: usize = 8;
const IMAGE_SIZE_AT: usize = 16;
const FLAGS_AT: usize = 24;
const MAGIC_AT: usize = 56;
const MAGIC: u32 = 0x644d_5241; // "ARM\x64"
/// Kernels before 3.17 have image_size 0 and a text_offset of 0x80000 whatever the field
/// says (booting.rst).
const LEGACY_TEXT_OFFSET: u64 = 0x8_0000;
/// Bit 0 of the flags: the kernel is big-endian.
const FLAG_BIG_ENDIAN: u64 = 1;
const PAGE: u64 = 4096;
const TWO_MIB: u64 = 2 << 20;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error(
        "kernel image {0} is not an arm64 Image (no \"ARM\\x64\" magic at byte 56){hint}",
        hint = if *.1 { "; it looks gzip-compressed: boot the uncompressed Image (gunzip it)" } else { "" }
    )]
    NotAnImage(String, bool),
    #[error("kernel image {0} is big-endian; ember runs little-endian guests")]
    BigEndian(String),
    #[error(
        "guest memory is too small: the kernel needs up to {kernel_end:#x}, the initrd \
         ({initrd} bytes) and the device tree must fit below {ram_end:#x}"
    )]
    TooSmall {
        kernel_end: u64,
        initrd: u64,
        ram_end: u64,
    },
}

/// What the Image header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageHeader {
    pub text_offset: u64,
    /// The memory the kernel needs from its load address, BSS included (0: unknown).
    pub image_size: u64,
}

impl ImageHeader {
    pub fn parse(header: &[u8; HEADER_LEN], shown: &str) -> Result<Self, ImageError> {
        let u64_at =
            |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap_or_default());
        let magic = u32::from_le_bytes(
            header[MAGIC_AT..MAGIC_AT + 4]
                .try_into()
                .unwrap_or_default(),
        );
        if magic != MAGIC {
            let gzip = header.starts_with(&[0x1f, 0x8b]);
            return Err(ImageError::NotAnImage(shown.to_owned(), gzip));
        }
        let image_size = u64_at(IMAGE_SIZE_AT);
        if image_size != 0 && u64_at(FLAGS_AT) & FLAG_BIG_ENDIAN != 0 {
            return Err(ImageError::BigEndian(shown.to_owned()));
        }
        let text_offset = if image_size == 0 {
            LEGACY_TEXT_OFFSET
        } else {
            u64_at(TEXT_OFFSET_AT)
        };
        Ok(ImageHeader {
            text_offset,
            image_size,
        })
    }
}

/// Where the boot pieces go in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The kernel's load address, also its entry point.
    pub kernel: u64,
    /// The device tree's address.
    pub fdt: u64,
    /// The initrd's address, if there is one.
    pub initrd: Option<u64>,
}

/// Places a kernel of `file_len` bytes with `header` and an initrd of `initrd_len` bytes
/// (0: none) in RAM `(start, length)`; `start` is 2 MiB aligned.
pub fn place(
    ram: (u64, u64),
    header: ImageHeader,
    file_len: u64,
    initrd_len: u64,
) -> Result<Placement, ImageError> {
    let (start, len) = ram;
    let ram_end = start + len;
    let kernel = start.next_multiple_of(TWO_MIB) + header.text_offset;
    // An old kernel without image_size: its file, and as much again for BSS and tables.
    let footprint = if header.image_size == 0 {
        file_len * 2
    } else {
        header.image_size.max(file_len)
    };
    let kernel_end = kernel + footprint;
    let too_small = ImageError::TooSmall {
        kernel_end,
        initrd: initrd_len,
        ram_end,
    };
    let fdt = ram_end
        .checked_sub(FDT_MAX_LEN)
        .filter(|&f| f >= kernel_end)
        .ok_or(too_small.clone())?;
    let initrd = if initrd_len == 0 {
        None
    } else {
        let at = fdt
            .checked_sub(initrd_len)
            .map(|a| a & !(PAGE - 1))
            .filter(|&a| a >= kernel_end)
            .ok_or(too_small)?;
        Some(at)
    };
    Ok(Placement {
        kernel,
        fdt,
        initrd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(text_offset: u64, image_size: u64, flags: u64) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[TEXT_OFFSET_AT..TEXT_OFFSET_AT + 8].copy_from_slice(&text_offset.to_le_bytes());
        h[IMAGE_SIZE_AT..IMAGE_SIZE_AT + 8].copy_from_slice(&image_size.to_le_bytes());
        h[FLAGS_AT..FLAGS_AT + 8].copy_from_slice(&flags.to_le_bytes());
        h[MAGIC_AT..MAGIC_AT + 4].copy_from_slice(&MAGIC.to_le_bytes());
        h
    }

    #[test]
    fn the_header_says_where_and_how_much() {
        let h = ImageHeader::parse(&header(0, 0x200_0000, 0b1010), "Image").unwrap();
        assert_eq!((h.text_offset, h.image_size), (0, 0x200_0000));
        // No image_size: the old fixed text_offset, flags not yet defined.
        let old = ImageHeader::parse(&header(0x1234, 0, 1), "Image").unwrap();
        assert_eq!(old.text_offset, 0x8_0000);
        assert_eq!(
            ImageHeader::parse(&header(0, 0x100_0000, 1), "Image"),
            Err(ImageError::BigEndian("Image".into()))
        );
        let mut gz = [0u8; HEADER_LEN];
        gz[..2].copy_from_slice(&[0x1f, 0x8b]);
        let e = ImageHeader::parse(&gz, "vmlinuz").unwrap_err();
        assert!(e.to_string().contains("gunzip"), "{e}");
        let e = ImageHeader::parse(&[0u8; HEADER_LEN], "bzImage").unwrap_err();
        assert_eq!(e, ImageError::NotAnImage("bzImage".into(), false));
    }

    #[test]
    fn kernel_first_device_tree_last_initrd_below_it() {
        let ram = (0x8000_0000, 256 << 20);
        let h = ImageHeader {
            text_offset: 0,
            image_size: 40 << 20,
        };
        let p = place(ram, h, 30 << 20, 6_000_000).unwrap();
        assert_eq!(p.kernel, 0x8000_0000);
        assert_eq!(p.fdt, 0x8000_0000 + (254 << 20));
        let initrd = p.initrd.unwrap();
        assert_eq!(initrd % PAGE, 0);
        assert!(initrd + 6_000_000 <= p.fdt && initrd >= p.kernel + (40 << 20));
        assert_eq!(place(ram, h, 30 << 20, 0).unwrap().initrd, None);
        // No room between the kernel's footprint and the device tree.
        let e = place((0x8000_0000, 64 << 20), h, 30 << 20, 30 << 20).unwrap_err();
        assert!(matches!(e, ImageError::TooSmall { .. }), "{e}");
        let e = place((0x8000_0000, 40 << 20), h, 30 << 20, 0).unwrap_err();
        assert!(matches!(e, ImageError::TooSmall { .. }), "{e}");
    }
}
