//! Guest RAM: host memory mapped per region, later registered as KVM memory slots.

use std::fs::File;

use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap, RefSlice, WithBitmapSlice};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::layout::ram_ranges;
use crate::config::HugePages;

/// Guest RAM as ember maps it. With dirty page tracking, every write the VMM makes
/// through it (a device filling a buffer, the kernel loader) marks its pages in a bitmap,
/// which with KVM's dirty log says what a diff snapshot must hold.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<DirtyBitmap>;
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<DirtyBitmap>;

/// vm-memory's page bitmap where dirty pages are tracked, nothing elsewhere: a VM that
/// never takes a diff snapshot pays nothing for it on its I/O path (a bitmap always
/// present cost 10-15 % of 4 KiB block throughput, docs/performance.md).
#[derive(Debug, Default)]
pub struct DirtyBitmap(Option<AtomicBitmap>);

impl DirtyBitmap {
    /// A bitmap for `len` bytes of guest memory, or none when not `tracking`.
    pub fn new(len: usize, tracking: bool) -> Self {
        DirtyBitmap(tracking.then(|| AtomicBitmap::with_len(len)))
    }

    /// Whether page `index` of the region was written since the last [`Self::reset`].
    pub fn page_dirty(&self, index: usize) -> bool {
        self.0.as_ref().is_some_and(|b| b.is_bit_set(index))
    }

    pub fn reset(&self) {
        if let Some(b) = &self.0 {
            b.reset();
        }
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyBitmap {
    type S = Option<RefSlice<'a, AtomicBitmap>>;
}

impl Bitmap for DirtyBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if let Some(b) = &self.0 {
            b.mark_dirty(offset, len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.0.as_ref().is_some_and(|b| b.dirty_at(offset))
    }

    fn slice_at(&self, offset: usize) -> Option<RefSlice<'_, AtomicBitmap>> {
        self.0.as_ref().map(|b| b.slice_at(offset))
    }
}

/// Memory made without saying (`from_ranges`, in tests and benchmarks) tracks nothing.
impl NewBitmap for DirtyBitmap {
    fn with_len(_len: usize) -> Self {
        DirtyBitmap(None)
    }
}

/// One region of guest RAM: where it sits in the guest and how long it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RamRegion {
    pub guest_addr: u64,
    pub len: u64,
}

/// The regions of `mem`, in address order.
pub fn ram_regions(mem: &GuestMemoryMmap) -> Vec<RamRegion> {
    mem.iter()
        .map(|r| RamRegion {
            guest_addr: r.start_addr().0,
            len: r.len(),
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("mem_size_mib {requested_mib} is more than this host's {host_mib} MiB of RAM")]
    MoreThanHost { requested_mib: u64, host_mib: u64 },
    #[error("cannot map {size_mib} MiB of guest memory at {addr:#x} with {pages}: {source}{hint}")]
    Map {
        addr: u64,
        size_mib: u64,
        pages: &'static str,
        source: vm_memory::mmap::MmapRegionError,
        hint: &'static str,
    },
    #[error("guest memory regions are inconsistent: {0}")]
    Regions(vm_memory::GuestRegionCollectionError),
}

/// Total host RAM in bytes.
pub fn host_ram_bytes() -> u64 {
    // SAFETY: sysinfo fills the struct we pass and touches nothing else.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return u64::MAX;
    }
    (info.totalram as u64).saturating_mul(u64::from(info.mem_unit))
}

/// Maps guest RAM of `mem_bytes`, split around the MMIO gap. Ordinary pages are reserved
/// lazily (`MAP_NORESERVE`): the guest's footprint on the host is what it touches. With
/// `track_dirty_pages`, the VMM's own writes are marked (see [`DirtyBitmap`]).
pub fn create_guest_memory(
    mem_bytes: u64,
    huge_pages: HugePages,
    track_dirty_pages: bool,
) -> Result<GuestMemoryMmap, MemoryError> {
    let host = host_ram_bytes();
    if mem_bytes > host {
        return Err(MemoryError::MoreThanHost {
            requested_mib: mem_bytes >> 20,
            host_mib: host >> 20,
        });
    }
    let mut regions = Vec::new();
    for (addr, size) in ram_ranges(mem_bytes) {
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        let pages = match huge_pages {
            HugePages::Hugetlbfs2M => {
                // Without MAP_NORESERVE the kernel reserves the huge pages now, so a pool too
                // small fails here with a clear error instead of faulting the guest later.
                flags &= !libc::MAP_NORESERVE;
                flags |= libc::MAP_HUGETLB | libc::MAP_HUGE_2MB;
                "2 MiB huge pages"
            }
            HugePages::None | HugePages::Transparent => "4 KiB pages",
        };
        let region = MmapRegionBuilder::new_with_bitmap(
            size as usize,
            DirtyBitmap::new(size as usize, track_dirty_pages),
        )
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(flags)
        .with_hugetlbfs(huge_pages == HugePages::Hugetlbfs2M)
        .build()
        .map_err(|source| MemoryError::Map {
            addr,
            size_mib: size >> 20,
            pages,
            source,
            hint: if huge_pages == HugePages::Hugetlbfs2M {
                " (are enough 2 MiB pages reserved in /proc/sys/vm/nr_hugepages?)"
            } else {
                ""
            },
        })?;
        keep_out_of_core_dumps(region.as_ptr(), size, addr);
        if huge_pages == HugePages::Transparent {
            // SAFETY: the range is the mapping we just created. A failed hint is harmless.
            unsafe {
                libc::madvise(region.as_ptr().cast(), size as usize, libc::MADV_HUGEPAGE);
            }
        }
        // `new` only fails when the region would wrap the address space; ram_ranges never does.
        if let Some(r) = GuestRegionMmap::new(region, GuestAddress(addr)) {
            regions.push(r);
        }
    }
    vm_memory::GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Regions)
}

/// Anonymous guest memory at `ranges`, for tests and benchmarks that need the VMM's
/// writes marked (`from_ranges` memory tracks nothing).
pub fn tracked_memory(ranges: &[(GuestAddress, usize)]) -> Result<GuestMemoryMmap, MemoryError> {
    let mut regions = Vec::with_capacity(ranges.len());
    for &(addr, size) in ranges {
        let region = MmapRegionBuilder::new_with_bitmap(size, DirtyBitmap::new(size, true))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .build()
            .map_err(|source| MemoryError::Map {
                addr: addr.0,
                size_mib: (size >> 20) as u64,
                pages: "4 KiB pages",
                source,
                hint: "",
            })?;
        if let Some(r) = GuestRegionMmap::new(region, addr) {
            regions.push(r);
        }
    }
    vm_memory::GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Regions)
}

/// Lets the kernel back `mem` with transparent huge pages where it can. A failed hint is
/// harmless.
pub fn advise_huge_pages(mem: &GuestMemoryMmap) {
    for r in mem.iter() {
        // SAFETY: the range is one of guest memory's own mappings.
        unsafe {
            libc::madvise(r.as_ptr().cast(), r.len() as usize, libc::MADV_HUGEPAGE);
        }
    }
}

/// Keeps guest RAM out of core dumps: a process killed by a signal (a seccomp violation
/// ends in SIGSYS) would otherwise write the guest's memory, and its secrets, to disk. A
/// failed hint is logged, not fatal.
fn keep_out_of_core_dumps(ptr: *mut u8, size: u64, addr: u64) {
    // SAFETY: the caller passes a mapping it just created, of `size` bytes.
    if unsafe { libc::madvise(ptr.cast(), size as usize, libc::MADV_DONTDUMP) } != 0 {
        log::warn!(
            "guest RAM at {addr:#x} may appear in core dumps: MADV_DONTDUMP failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Maps guest RAM from a snapshot's memory file, region after region as `regions` lay
/// them out in it, private and copy-on-write: nothing is read until the guest touches a
/// page, so mapping costs the same for any guest size, and the guest's writes never reach
/// the file.
pub fn map_memory_file(
    file: &File,
    regions: &[RamRegion],
    track_dirty_pages: bool,
) -> Result<GuestMemoryMmap, MemoryError> {
    let mut mapped = Vec::with_capacity(regions.len());
    let mut offset = 0u64;
    for r in regions {
        let map_err = |source| MemoryError::Map {
            addr: r.guest_addr,
            size_mib: r.len >> 20,
            pages: "the memory file",
            source,
            hint: "",
        };
        let dup = file
            .try_clone()
            .map_err(|e| map_err(vm_memory::mmap::MmapRegionError::Mmap(e)))?;
        let region = MmapRegionBuilder::new_with_bitmap(
            r.len as usize,
            DirtyBitmap::new(r.len as usize, track_dirty_pages),
        )
        .with_file_offset(FileOffset::new(dup, offset))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        .build()
        .map_err(map_err)?;
        keep_out_of_core_dumps(region.as_ptr(), r.len, r.guest_addr);
        if let Some(region) = GuestRegionMmap::new(region, GuestAddress(r.guest_addr)) {
            mapped.push(region);
        }
        offset += r.len;
    }
    vm_memory::GuestMemoryMmap::from_regions(mapped).map_err(MemoryError::Regions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn regions_follow_layout() {
        use vm_memory::{Bytes, GuestMemoryRegion};
        let mem = create_guest_memory(3584 << 20, HugePages::None, false).unwrap();
        let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(regions, vec![(0, 0xc000_0000), (0x1_0000_0000, 512 << 20)]);
        // Both sides of the gap are backed; the gap is not.
        mem.write_obj(0x55u8, GuestAddress(0xbfff_ffff)).unwrap();
        mem.write_obj(0x66u8, GuestAddress(0x1_0000_0000)).unwrap();
        assert!(mem.write_obj(0u8, GuestAddress(0xc000_0000)).is_err());
    }

    #[test]
    fn guest_ram_is_left_out_of_core_dumps() {
        let mem = create_guest_memory(64 << 20, HugePages::None, false).unwrap();
        let ram_start = crate::arch::layout::ram_ranges(64 << 20)[0].0;
        let start = mem.get_host_address(GuestAddress(ram_start)).unwrap() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut in_region = false;
        let mut flags = None;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((from, _)) = range.split_once('-')
                && let Ok(from) = usize::from_str_radix(from, 16)
            {
                in_region = from == start;
            } else if in_region && let Some(f) = line.strip_prefix("VmFlags:") {
                flags = Some(f.to_owned());
            }
        }
        let flags = flags.expect("guest RAM's mapping in smaps");
        assert!(flags.split_whitespace().any(|f| f == "dd"), "{flags}");
    }

    #[test]
    fn more_than_host_refused() {
        let err =
            create_guest_memory(host_ram_bytes() + (1 << 30), HugePages::None, false).unwrap_err();
        assert!(matches!(err, MemoryError::MoreThanHost { .. }), "{err}");
    }
}
