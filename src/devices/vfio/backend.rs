//! The seam between the passthrough logic ([`super::function`]) and the kernel's VFIO
//! objects ([`super::host`]): what ember asks of a passed-through function and of the
//! IOMMU, so the logic is tested against a fake (`super::fake`) on hosts without an IOMMU.

use std::io;
use std::sync::Arc;

use crate::memory::GuestMemoryMmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MmapRegion};
use vmm_sys_util::eventfd::EventFd;

/// What the kernel says about one BAR's region.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionInfo {
    /// The BAR's size in bytes (0: the function has no such BAR).
    pub size: u64,
    /// Whether the region may be mapped into ember's address space at all.
    pub mappable: bool,
    /// The parts that may be mapped, (offset, length), when the kernel restricts them
    /// (its sparse-mmap capability); empty means the whole region.
    pub sparse: Vec<(u64, u64)>,
}

/// One passed-through PCI function.
pub trait VfioBackend: Send + Sync {
    /// Reads the function's configuration space (as the kernel's vfio-pci filters it).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the function's configuration space; the kernel refuses what it must.
    fn write_config(&self, offset: u64, data: &[u8]);
    /// BAR `index`'s region.
    fn bar_region(&self, index: usize) -> RegionInfo;
    /// Reads a BAR through the kernel (a part that is not mapped).
    fn read_bar(&self, index: usize, offset: u64, data: &mut [u8]);
    /// Writes a BAR through the kernel.
    fn write_bar(&self, index: usize, offset: u64, data: &[u8]);
    /// Maps `len` bytes of BAR `index` from `offset` into this process.
    fn map_bar(&self, index: usize, offset: u64, len: u64) -> io::Result<Arc<MmapRegion<()>>>;
    /// How many MSI-X vectors the function has (0: no MSI-X).
    fn msix_vectors(&self) -> u32;
    /// Enables MSI-X with vector `i` signalling `fds[i]`.
    fn enable_msix(&self, fds: &[&EventFd]) -> io::Result<()>;
    fn disable_msix(&self) -> io::Result<()>;
    /// How many MSI vectors the function has (0: no MSI).
    fn msi_vectors(&self) -> u32;
    /// Enables MSI with vector `i` signalling `fds[i]`.
    fn enable_msi(&self, fds: &[&EventFd]) -> io::Result<()>;
    fn disable_msi(&self) -> io::Result<()>;
    /// Whether the function has an INTx line the kernel offers.
    fn intx_available(&self) -> bool;
    /// Enables INTx: each time the function asserts it, the kernel masks it on the host and
    /// signals `trigger`; signalling `resample` unmasks it. The kernel takes one interrupt
    /// kind at a time: INTx must be off while MSI or MSI-X is on.
    fn enable_intx(&self, trigger: &EventFd, resample: &EventFd) -> io::Result<()>;
    fn disable_intx(&self) -> io::Result<()>;
    /// Resets the function, if it can be reset.
    fn reset(&self);
}

/// The IOMMU the passed-through functions do DMA through.
pub trait DmaMapper {
    /// Lets the devices reach `len` bytes of ember's memory at `host_addr` as IO virtual
    /// address `iova`.
    ///
    /// # Safety
    /// The memory must stay mapped until [`DmaMapper::unmap`] for the same range: the
    /// device writes to it whenever it likes.
    unsafe fn map(&self, iova: u64, len: u64, host_addr: u64) -> io::Result<()>;
    fn unmap(&self, iova: u64, len: u64) -> io::Result<()>;
}

/// Maps every region of guest RAM for DMA at its guest physical address, so a driver in
/// the guest programs the device with the addresses it knows. On failure, undoes what it
/// mapped.
pub fn map_guest_memory(dma: &dyn DmaMapper, mem: &GuestMemoryMmap) -> io::Result<()> {
    let mut mapped: Vec<(u64, u64)> = Vec::new();
    for region in mem.iter() {
        let (iova, len) = (region.start_addr().0, region.len());
        // SAFETY: guest memory stays mapped for as long as the VM exists, and the VFIO
        // container (with its mappings) is dropped with the VM's devices, before it.
        let r = unsafe { dma.map(iova, len, region.as_ptr() as u64) };
        if let Err(e) = r {
            for &(iova, len) in mapped.iter().rev() {
                let _ = dma.unmap(iova, len);
            }
            return Err(io::Error::new(
                e.kind(),
                format!("cannot map guest memory at {iova:#x} (+{len:#x}) for DMA: {e}"),
            ));
        }
        mapped.push((iova, len));
    }
    Ok(())
}
