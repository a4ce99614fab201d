//! The kernel's VFIO objects behind [`VfioBackend`] and [`DmaMapper`]: one container (one
//! IOMMU address space) per VM holding every passed-through function's group, through
//! `vfio-ioctls`. Before anything is opened, sysfs is read so that a host that cannot pass
//! a function through says why in words an operator can act on.

use std::fs::File;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd, VfioOps, VfioRegionInfoCap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, MmapRegion};
use vmm_sys_util::eventfd::EventFd;

use super::backend::{DmaMapper, RegionInfo, VfioBackend};
use crate::config::Sbdf;

// Region and interrupt indexes of a vfio-pci device, and a region flag (linux/vfio.h).
const BAR0_REGION_INDEX: u32 = 0;
const CONFIG_REGION_INDEX: u32 = 7;
const INTX_IRQ_INDEX: u32 = 0;
const MSI_IRQ_INDEX: u32 = 1;
const MSIX_IRQ_INDEX: u32 = 2;
const REGION_FLAG_MMAP: u32 = 1 << 2;

#[derive(Debug, thiserror::Error)]
pub enum VfioHostError {
    #[error(
        "VFIO is not available on this host ({path} is missing): load the vfio-pci module \
         (modprobe vfio-pci), see docs/vfio.md"
    )]
    NoVfio { path: &'static str },
    #[error("there is no PCI function {0} on this host (lspci -D lists them)")]
    NoSuchFunction(Sbdf),
    #[error(
        "PCI function {sbdf} is bound to {driver}, not vfio-pci: unbind it and bind it to \
         vfio-pci first (docs/vfio.md shows how)"
    )]
    NotBoundToVfio { sbdf: Sbdf, driver: String },
    #[error(
        "PCI function {0} is not bound to any driver: bind it to vfio-pci first (docs/vfio.md)"
    )]
    Unbound(Sbdf),
    #[error(
        "PCI function {0} has no IOMMU group: the host's IOMMU is off (boot it with \
         intel_iommu=on or amd_iommu=on, and the IOMMU enabled in firmware)"
    )]
    NoIommu(Sbdf),
    #[error(
        "IOMMU group {group} of {sbdf} is not viable: {other} shares it and is bound to \
         {driver}; every function in a group must be bound to vfio-pci (or to no driver) \
         before any of them can be passed through"
    )]
    GroupNotViable {
        sbdf: Sbdf,
        group: String,
        other: String,
        driver: String,
    },
    #[error(
        "cannot set up the IOMMU for {sbdf}: {source}. If the host lacks interrupt \
         remapping the kernel refuses passthrough unless vfio_iommu_type1's \
         allow_unsafe_interrupts is set (docs/vfio.md)"
    )]
    Container {
        sbdf: Sbdf,
        source: vfio_ioctls::VfioError,
    },
    #[error("cannot open the VFIO container: {0}")]
    OpenContainer(vfio_ioctls::VfioError),
    #[error("cannot create KVM's VFIO device: {0}")]
    KvmDevice(crate::vstate::vm::VmError),
    #[error("PCI function {sbdf}: {what}: {source}")]
    Device {
        sbdf: Sbdf,
        what: &'static str,
        source: io::Error,
    },
}

/// Where sysfs shows a host function.
fn sysfs_function(root: &Path, sbdf: Sbdf) -> PathBuf {
    root.join("bus/pci/devices").join(sbdf.to_string())
}

/// The driver a function is bound to, if any.
fn bound_driver(function: &Path) -> Option<String> {
    std::fs::read_link(function.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// Drivers a function in the same group may be bound to without making the group unsafe
/// to hand to a guest (PCIe port drivers are allowed by the kernel too).
const HARMLESS_DRIVERS: &[&str] = &["vfio-pci", "pcieport", "pci-stub"];

/// Checks, from sysfs under `root` (`/sys` on a host), that `sbdf` can be passed through:
/// it exists, is bound to vfio-pci, has an IOMMU group, and its group is viable. Returns
/// the group's number.
pub fn check_function(root: &Path, sbdf: Sbdf) -> Result<String, VfioHostError> {
    let function = sysfs_function(root, sbdf);
    if !function.exists() {
        return Err(VfioHostError::NoSuchFunction(sbdf));
    }
    match bound_driver(&function) {
        Some(d) if d == "vfio-pci" => {}
        Some(driver) => return Err(VfioHostError::NotBoundToVfio { sbdf, driver }),
        None => return Err(VfioHostError::Unbound(sbdf)),
    }
    let group_link = std::fs::read_link(function.join("iommu_group"))
        .map_err(|_| VfioHostError::NoIommu(sbdf))?;
    let group = group_link
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or(VfioHostError::NoIommu(sbdf))?;
    let members = root
        .join("kernel/iommu_groups")
        .join(&group)
        .join("devices");
    if let Ok(entries) = std::fs::read_dir(&members) {
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for other in names {
            let driver = bound_driver(&members.join(&other));
            if let Some(driver) = driver
                && !HARMLESS_DRIVERS.contains(&driver.as_str())
            {
                return Err(VfioHostError::GroupNotViable {
                    sbdf,
                    group,
                    other,
                    driver,
                });
            }
        }
    }
    Ok(group)
}

/// The VM's IOMMU address space: every passed-through function's group joins it.
pub struct HostContainer {
    container: Arc<VfioContainer>,
}

impl HostContainer {
    /// Opens `/dev/vfio/vfio` with KVM's VFIO device attached (`kvm_vfio`).
    pub fn open(vm: &crate::vstate::vm::VmHandle) -> Result<Self, VfioHostError> {
        const CONTAINER: &str = "/dev/vfio/vfio";
        if !Path::new(CONTAINER).exists() {
            return Err(VfioHostError::NoVfio { path: CONTAINER });
        }
        let kvm_device = vm.create_vfio_device().map_err(VfioHostError::KvmDevice)?;
        let container = VfioContainer::new(Some(Arc::new(VfioDeviceFd::new_from_kvm(kvm_device))))
            .map_err(VfioHostError::OpenContainer)?;
        Ok(HostContainer {
            container: Arc::new(container),
        })
    }

    /// Opens host function `sbdf` (checked first with [`check_function`]) in this
    /// container.
    pub fn open_function(&self, sbdf: Sbdf) -> Result<HostFunction, VfioHostError> {
        let sys = Path::new("/sys");
        check_function(sys, sbdf)?;
        let path = sysfs_function(sys, sbdf);
        let ops: Arc<dyn VfioOps> = self.container.clone();
        let device = VfioDevice::new(&path, ops, false)
            .map_err(|source| VfioHostError::Container { sbdf, source })?;
        // mmap needs a File for the device fd; a duplicate keeps the device's own.
        // SAFETY: the device's fd is open for as long as `device` lives, past this call.
        let fd = unsafe { BorrowedFd::borrow_raw(device.as_raw_fd()) }
            .try_clone_to_owned()
            .map_err(|source| VfioHostError::Device {
                sbdf,
                what: "cannot duplicate its fd",
                source,
            })?;
        let file = Arc::new(File::from(fd));
        Ok(HostFunction {
            device: ManuallyDrop::new(device),
            file,
        })
    }
}

impl DmaMapper for HostContainer {
    unsafe fn map(&self, iova: u64, len: u64, host_addr: u64) -> io::Result<()> {
        // SAFETY: the caller keeps the memory mapped until `unmap`.
        unsafe {
            self.container
                .vfio_dma_map(iova, len as usize, host_addr as *mut u8)
        }
        .map_err(io::Error::other)
    }

    fn unmap(&self, iova: u64, len: u64) -> io::Result<()> {
        self.container
            .vfio_dma_unmap(iova, len as usize)
            .map_err(io::Error::other)
    }
}

/// One host function opened through VFIO. Dropping it releases the device to the host.
pub struct HostFunction {
    device: ManuallyDrop<VfioDevice>,
    file: Arc<File>,
}

impl Drop for HostFunction {
    fn drop(&mut self) {
        if crate::seccomp::thread_is_filtered() {
            // The VM is over and ember is about to exit: the library's teardown (reading
            // the group's sysfs link, unsetting the container) is not allowed on the
            // jailed thread, and the kernel does the same when ember's descriptors close,
            // resetting the function and handing it back to vfio-pci.
            return;
        }
        // SAFETY: dropped once, here, and never used again.
        unsafe { ManuallyDrop::drop(&mut self.device) };
    }
}

impl VfioBackend for HostFunction {
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        self.device.region_read(CONFIG_REGION_INDEX, data, offset);
    }

    fn write_config(&self, offset: u64, data: &[u8]) {
        self.device.region_write(CONFIG_REGION_INDEX, data, offset);
    }

    fn bar_region(&self, index: usize) -> RegionInfo {
        let region = BAR0_REGION_INDEX + index as u32;
        let size = self.device.get_region_size(region);
        let flags = self.device.get_region_flags(region);
        let sparse = self
            .device
            .get_region_caps(region)
            .into_iter()
            .filter_map(|cap| match cap {
                VfioRegionInfoCap::SparseMmap(s) => Some(s.areas),
                _ => None,
            })
            .flatten()
            .map(|a| (a.offset, a.size))
            .collect();
        RegionInfo {
            size,
            mappable: flags & REGION_FLAG_MMAP != 0,
            sparse,
        }
    }

    fn read_bar(&self, index: usize, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        self.device
            .region_read(BAR0_REGION_INDEX + index as u32, data, offset);
    }

    fn write_bar(&self, index: usize, offset: u64, data: &[u8]) {
        self.device
            .region_write(BAR0_REGION_INDEX + index as u32, data, offset);
    }

    fn map_bar(&self, index: usize, offset: u64, len: u64) -> io::Result<Arc<MmapRegion<()>>> {
        let region = BAR0_REGION_INDEX + index as u32;
        let at = self.device.get_region_offset(region) + offset;
        let mapping = MmapRegionBuilder::new(len as usize)
            .with_file_offset(FileOffset::from_arc(self.file.clone(), at))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED)
            .build()
            .map_err(io::Error::other)?;
        Ok(Arc::new(mapping))
    }

    fn msix_vectors(&self) -> u32 {
        self.device
            .get_irq_info(MSIX_IRQ_INDEX)
            .map_or(0, |irq| irq.count)
    }

    fn enable_msix(&self, fds: &[&EventFd]) -> io::Result<()> {
        self.device
            .enable_msix(fds.to_vec())
            .map_err(io::Error::other)
    }

    fn disable_msix(&self) -> io::Result<()> {
        self.device.disable_msix().map_err(io::Error::other)
    }

    fn msi_vectors(&self) -> u32 {
        self.device
            .get_irq_info(MSI_IRQ_INDEX)
            .map_or(0, |irq| irq.count)
    }

    fn enable_msi(&self, fds: &[&EventFd]) -> io::Result<()> {
        self.device
            .enable_msi(fds.to_vec())
            .map_err(io::Error::other)
    }

    fn disable_msi(&self) -> io::Result<()> {
        self.device.disable_msi().map_err(io::Error::other)
    }

    fn intx_available(&self) -> bool {
        self.device
            .get_irq_info(INTX_IRQ_INDEX)
            .is_some_and(|irq| irq.count == 1)
    }

    fn enable_intx(&self, trigger: &EventFd, resample: &EventFd) -> io::Result<()> {
        self.device
            .enable_irq(INTX_IRQ_INDEX, vec![trigger])
            .map_err(io::Error::other)?;
        if let Err(e) = self
            .device
            .set_irq_resample_fd(INTX_IRQ_INDEX, vec![resample])
        {
            // Without its unmask eventfd the line would stay masked after the first
            // interrupt: leave INTx off rather than half on.
            let _ = self.device.disable_irq(INTX_IRQ_INDEX);
            return Err(io::Error::other(e));
        }
        Ok(())
    }

    fn disable_intx(&self) -> io::Result<()> {
        self.device
            .disable_irq(INTX_IRQ_INDEX)
            .map_err(io::Error::other)
    }

    fn reset(&self) {
        self.device.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A sysfs tree with `functions` (name, driver, group) under a scratch directory.
    fn sysfs(functions: &[(&str, Option<&str>, Option<&str>)]) -> tempdir::Dir {
        let dir = tempdir::Dir::new();
        let root = dir.path();
        for &(name, driver, group) in functions {
            let f = root.join("bus/pci/devices").join(name);
            std::fs::create_dir_all(&f).unwrap();
            if let Some(driver) = driver {
                let d = root.join("bus/pci/drivers").join(driver);
                std::fs::create_dir_all(&d).unwrap();
                symlink(&d, f.join("driver")).unwrap();
            }
            if let Some(group) = group {
                let g = root.join("kernel/iommu_groups").join(group);
                std::fs::create_dir_all(g.join("devices")).unwrap();
                symlink(&g, f.join("iommu_group")).unwrap();
                symlink(&f, g.join("devices").join(name)).unwrap();
            }
        }
        dir
    }

    mod tempdir {
        use std::path::{Path, PathBuf};
        use std::sync::atomic::{AtomicUsize, Ordering};

        pub struct Dir(PathBuf);
        impl Dir {
            pub fn new() -> Self {
                static N: AtomicUsize = AtomicUsize::new(0);
                let p = std::env::temp_dir().join(format!(
                    "ember-vfio-sysfs-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
            pub fn path(&self) -> &Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn sbdf(s: &str) -> Sbdf {
        s.parse().unwrap()
    }

    #[test]
    fn a_function_bound_to_vfio_pci_alone_in_its_group_passes() {
        let dir = sysfs(&[("0000:01:00.0", Some("vfio-pci"), Some("7"))]);
        assert_eq!(check_function(dir.path(), sbdf("01:00.0")).unwrap(), "7");
    }

    #[test]
    fn each_host_problem_is_named() {
        let dir = sysfs(&[
            ("0000:01:00.0", Some("e1000e"), Some("1")),
            ("0000:02:00.0", None, Some("2")),
            ("0000:03:00.0", Some("vfio-pci"), None),
            ("0000:04:00.0", Some("vfio-pci"), Some("4")),
            ("0000:04:00.1", Some("igb"), Some("4")),
            ("0000:05:00.0", Some("vfio-pci"), Some("5")),
            ("0000:05:00.1", None, Some("5")),
            ("0000:05:01.0", Some("pcieport"), Some("5")),
        ]);
        let check = |s: &str| check_function(dir.path(), sbdf(s));
        let e = check("09:00.0").unwrap_err();
        assert!(matches!(e, VfioHostError::NoSuchFunction(_)), "{e}");
        let e = check("01:00.0").unwrap_err();
        assert!(
            e.to_string().contains("bound to e1000e, not vfio-pci"),
            "{e}"
        );
        let e = check("02:00.0").unwrap_err();
        assert!(matches!(e, VfioHostError::Unbound(_)), "{e}");
        let e = check("03:00.0").unwrap_err();
        assert!(e.to_string().contains("intel_iommu=on"), "{e}");
        let e = check("04:00.0").unwrap_err();
        assert!(
            e.to_string()
                .contains("0000:04:00.1 shares it and is bound to igb"),
            "{e}"
        );
        // Unbound functions and PCIe ports in the group are fine.
        assert_eq!(check("05:00.0").unwrap(), "5");
    }
}
