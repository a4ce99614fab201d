//! Guest memory in a snapshot's memory file: region after region in guest address order,
//! as long as guest RAM. A full snapshot writes every page that is not zero (the rest stay
//! holes: reading them gives zeros); a diff snapshot writes only the pages written since
//! the last snapshot, at their place, and leaves everything else a hole, so
//! [`rebase`] can lay it over the full file it follows.
//!
//! A page counts as written when KVM's dirty log says the guest wrote it, or when the
//! VMM's own bitmap (vm-memory's, which every device write through guest memory marks)
//! says a device did.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::{GuestMemoryMmap, GuestRegionMmap};

pub const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("cannot write the snapshot memory file: {0}")]
    Write(std::io::Error),
    #[error("cannot read KVM's dirty page log of guest memory at {gpa:#x}: {source}")]
    DirtyLog { gpa: u64, source: std::io::Error },
    #[error("cannot read {what}: {source}")]
    Read {
        what: &'static str,
        source: std::io::Error,
    },
    #[error(
        "the snapshot memory file holds {have} bytes; the snapshot's guest memory needs {need}"
    )]
    TooSmall { have: u64, need: u64 },
    #[error(
        "the diff memory file is {diff} bytes and the base {base}; a diff applies only to the full snapshot of the same VM"
    )]
    SizeMismatch { base: u64, diff: u64 },
}

/// What marks a page written since the last snapshot, besides the VMM's bitmap: KVM's
/// dirty log of the region at a guest address (one bit per page, cleared as it is read).
pub trait DirtyLog {
    fn take(&self, guest_addr: u64, len: u64) -> std::io::Result<Vec<u64>>;
}

impl DirtyLog for crate::vstate::vm::Vm {
    fn take(&self, guest_addr: u64, _len: u64) -> std::io::Result<Vec<u64>> {
        self.dirty_log(guest_addr)
    }
}

fn write_at(file: &File, bytes: &[u8], offset: u64) -> Result<(), MemoryFileError> {
    file.write_all_at(bytes, offset)
        .map_err(MemoryFileError::Write)
}

/// The bytes of one region. The VM is paused and its devices quiesced, so nothing writes
/// them while they are read.
fn region_bytes(region: &GuestRegionMmap) -> &[u8] {
    // SAFETY: the region maps `len` bytes for as long as `region` lives, and no vCPU or
    // device writes them while the VM is paused.
    unsafe { std::slice::from_raw_parts(region.as_ptr(), region.len() as usize) }
}

fn is_zero(page: &[u8]) -> bool {
    // SAFETY: reinterpreting initialised bytes as u64 words is always valid; align_to
    // gives the unaligned ends separately.
    let (head, words, tail) = unsafe { page.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Writes the pages `keep` selects, runs of neighbours in one write, at their offsets
/// from `base` in the file.
fn write_pages(
    file: &File,
    bytes: &[u8],
    base: u64,
    keep: impl Fn(usize, &[u8]) -> bool,
) -> Result<u64, MemoryFileError> {
    let page = PAGE_SIZE as usize;
    let mut written = 0u64;
    let mut run_start: Option<usize> = None;
    let pages = bytes.len().div_ceil(page);
    for i in 0..=pages {
        let wanted = i < pages && {
            let end = ((i + 1) * page).min(bytes.len());
            keep(i, &bytes[i * page..end])
        };
        match (wanted, run_start) {
            (true, None) => run_start = Some(i),
            (false, Some(start)) => {
                let end = (i * page).min(bytes.len());
                write_at(
                    file,
                    &bytes[start * page..end],
                    base + (start * page) as u64,
                )?;
                written += (end - start * page) as u64;
                run_start = None;
            }
            _ => {}
        }
    }
    Ok(written)
}

/// The total length of guest RAM, which is the memory file's length.
pub fn total_len(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// Gives `file` guest memory's length, then has `write` fill in each region at its offset
/// in the file; returns the bytes written.
fn write_regions(
    mem: &GuestMemoryMmap,
    file: &File,
    mut write: impl FnMut(&GuestRegionMmap, u64) -> Result<u64, MemoryFileError>,
) -> Result<u64, MemoryFileError> {
    file.set_len(total_len(mem))
        .map_err(MemoryFileError::Write)?;
    let mut offset = 0;
    let mut written = 0;
    for region in mem.iter() {
        written += write(region, offset)?;
        offset += region.len();
    }
    Ok(written)
}

/// The pages the VMM wrote in `region` (vm-memory marks them where pages are tracked).
fn vmm_bitmap(region: &GuestRegionMmap) -> &crate::memory::DirtyBitmap {
    std::ops::Deref::deref(region).bitmap()
}

/// KVM's log of the pages the guest wrote in `region`, cleared as it is read.
fn take_dirty_log(
    log: &dyn DirtyLog,
    region: &GuestRegionMmap,
) -> Result<Vec<u64>, MemoryFileError> {
    let gpa = region.start_addr().0;
    log.take(gpa, region.len())
        .map_err(|source| MemoryFileError::DirtyLog { gpa, source })
}

/// Writes every page of guest memory that is not zero into `file` (empty, as the API
/// opens it) and forgets what was written before it: the next diff starts here. Returns
/// the bytes written.
pub fn write_full(
    mem: &GuestMemoryMmap,
    file: &File,
    dirty_log: Option<&dyn DirtyLog>,
) -> Result<u64, MemoryFileError> {
    write_regions(mem, file, |region, offset| {
        let written = write_pages(file, region_bytes(region), offset, |_, p| !is_zero(p))?;
        vmm_bitmap(region).reset();
        if let Some(log) = dirty_log {
            take_dirty_log(log, region)?;
        }
        Ok(written)
    })
}

/// Writes the pages written since the last snapshot (or since the VM started) into `file`
/// at their places; the file gets guest memory's length with holes elsewhere. Returns the
/// bytes written.
pub fn write_diff(
    mem: &GuestMemoryMmap,
    file: &File,
    dirty_log: &dyn DirtyLog,
) -> Result<u64, MemoryFileError> {
    write_regions(mem, file, |region, offset| {
        let kvm = take_dirty_log(dirty_log, region)?;
        let vmm = vmm_bitmap(region);
        let dirty = |page: usize| {
            kvm.get(page / 64)
                .is_some_and(|w| w & (1 << (page % 64)) != 0)
                || vmm.page_dirty(page)
        };
        let written = write_pages(file, region_bytes(region), offset, |i, _| dirty(i))?;
        vmm.reset();
        Ok(written)
    })
}

/// Checks that a memory file holds the `need` bytes a snapshot's guest memory maps from it.
pub fn check_len(file: &File, need: u64) -> Result<(), MemoryFileError> {
    let have = file
        .metadata()
        .map_err(|source| MemoryFileError::Read {
            what: "the snapshot memory file",
            source,
        })?
        .len();
    if have < need {
        return Err(MemoryFileError::TooSmall { have, need });
    }
    Ok(())
}

/// Lays a diff memory file over the full one it follows: every range the diff holds data
/// in is copied to the same place in `base`; its holes leave `base` as it is. The diff must
/// sit on a file system that reports holes (ext4, xfs, btrfs, tmpfs do).
pub fn rebase(base: &File, diff: &File) -> Result<u64, MemoryFileError> {
    let read_err = |what| move |source| MemoryFileError::Read { what, source };
    let base_len = base
        .metadata()
        .map_err(read_err("the base memory file"))?
        .len();
    let diff_len = diff
        .metadata()
        .map_err(read_err("the diff memory file"))?
        .len();
    if base_len != diff_len {
        return Err(MemoryFileError::SizeMismatch {
            base: base_len,
            diff: diff_len,
        });
    }
    let seek = |offset: u64, whence| {
        // SAFETY: lseek on an open descriptor; the result is checked.
        let r = unsafe { libc::lseek(diff.as_raw_fd(), offset as libc::off_t, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // No data after `offset`: the rest of the file is a hole.
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(MemoryFileError::Read {
                what: "the diff memory file's layout",
                source: e,
            });
        }
        Ok(Some(r as u64))
    };
    let mut copied = 0;
    let mut offset = 0;
    let mut buf = vec![0u8; 1 << 20];
    while offset < diff_len {
        let Some(data) = seek(offset, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(data, libc::SEEK_HOLE)?
            .unwrap_or(diff_len)
            .min(diff_len);
        let mut at = data;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            diff.read_exact_at(&mut buf[..n], at)
                .map_err(read_err("the diff memory file"))?;
            base.write_all_at(&buf[..n], at)
                .map_err(MemoryFileError::Write)?;
            at += n as u64;
            copied += n as u64;
        }
        offset = end;
    }
    base.sync_all().map_err(MemoryFileError::Write)?;
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use vm_memory::{Bytes, GuestAddress};

    /// A dirty log that reports what the test says and then forgets it, as KVM's does.
    #[derive(Default)]
    struct FakeLog(RefCell<Vec<(u64, u64)>>);

    impl DirtyLog for FakeLog {
        fn take(&self, gpa: u64, len: u64) -> std::io::Result<Vec<u64>> {
            let mut bits = vec![0u64; (len / PAGE_SIZE).div_ceil(64) as usize];
            self.0.borrow_mut().retain(|&(page_gpa, _)| {
                if page_gpa >= gpa && page_gpa < gpa + len {
                    let page = ((page_gpa - gpa) / PAGE_SIZE) as usize;
                    bits[page / 64] |= 1 << (page % 64);
                    false
                } else {
                    true
                }
            });
            Ok(bits)
        }
    }

    fn mem() -> GuestMemoryMmap {
        crate::memory::tracked_memory(&[
            (GuestAddress(0), 64 << 10),
            (GuestAddress(1 << 20), 32 << 10),
        ])
        .unwrap()
    }

    fn tmp(name: &str) -> (std::path::PathBuf, File) {
        let path =
            std::env::temp_dir().join(format!("ember-snapmem-{}-{name}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        (path, f)
    }

    fn contents(f: &File) -> Vec<u8> {
        let mut v = vec![0u8; f.metadata().unwrap().len() as usize];
        f.read_exact_at(&mut v, 0).unwrap();
        v
    }

    #[test]
    fn a_diff_over_its_full_snapshot_gives_the_memory_at_the_diff() {
        let mem = mem();
        let log = FakeLog::default();
        mem.write_obj(0x11u8, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0x22u8, GuestAddress((1 << 20) + 0x10))
            .unwrap();
        let (p1, full) = tmp("full");
        write_full(&mem, &full, Some(&log)).unwrap();
        let at_full = contents(&full);
        assert_eq!(at_full.len(), (96 << 10) as usize);
        assert_eq!(at_full[0x1000], 0x11);
        assert_eq!(
            at_full[(64 << 10) + 0x10],
            0x22,
            "second region follows the first"
        );

        // After the full snapshot: a device write (the VMM's bitmap) and a guest write
        // (KVM's log, faked: the host address is written directly, as the guest would).
        mem.write_obj(0x33u8, GuestAddress(0x3000)).unwrap();
        let host = mem
            .get_host_address(GuestAddress((1 << 20) + 0x2000))
            .unwrap();
        // SAFETY: a byte inside the test's own guest memory.
        unsafe { *host = 0x44 };
        log.0.borrow_mut().push(((1 << 20) + 0x2000, 1));
        // A page zeroed since the full snapshot must reach the diff as zeros.
        mem.write_obj(0u8, GuestAddress(0x1000)).unwrap();
        let (p2, diff) = tmp("diff");
        let written = write_diff(&mem, &diff, &log).unwrap();
        assert_eq!(written, 3 * PAGE_SIZE, "three pages changed");

        rebase(&full, &diff).unwrap();
        let merged = contents(&full);
        assert_eq!(merged[0x1000], 0);
        assert_eq!(merged[0x3000], 0x33);
        assert_eq!(merged[(64 << 10) + 0x2000], 0x44);
        assert_eq!(
            merged[(64 << 10) + 0x10],
            0x22,
            "untouched pages keep the base's"
        );

        // A second diff right after holds nothing: both logs were consumed.
        let (p3, empty) = tmp("empty");
        assert_eq!(write_diff(&mem, &empty, &log).unwrap(), 0);
        for p in [p1, p2, p3] {
            let _ = std::fs::remove_file(p);
        }
    }

    #[test]
    fn a_full_snapshot_leaves_zero_pages_as_holes_and_short_files_are_named() {
        let mem = mem();
        mem.write_obj(0x55u8, GuestAddress(0x2000)).unwrap();
        let (p, full) = tmp("sparse");
        assert_eq!(write_full(&mem, &full, None).unwrap(), PAGE_SIZE);
        assert!(check_len(&full, 96 << 10).is_ok());
        let e = check_len(&full, 1 << 30).unwrap_err().to_string();
        assert!(
            e.contains("holds 98304 bytes") && e.contains("needs 1073741824"),
            "{e}"
        );
        let (p2, other) = tmp("other");
        other.set_len(4096).unwrap();
        assert!(matches!(
            rebase(&full, &other),
            Err(MemoryFileError::SizeMismatch { .. })
        ));
        let _ = std::fs::remove_file(p);
        let _ = std::fs::remove_file(p2);
    }
}
