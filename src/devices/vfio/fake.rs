//! A passed-through function and an IOMMU in memory, for the logic's tests: it keeps a
//! configuration space and BAR contents, and records what ember asked of it.

use std::io;
use std::sync::{Arc, Mutex};

use vm_memory::MmapRegion;
use vmm_sys_util::eventfd::EventFd;

use super::backend::{DmaMapper, RegionInfo, VfioBackend};

pub struct FakeBar {
    pub info: RegionInfo,
    pub contents: Mutex<Vec<u8>>,
}

/// What the fake was asked, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Reset,
    ConfigWrite(u64, Vec<u8>),
    BarWrite(usize, u64, Vec<u8>),
    MapBar(usize, u64, u64),
    EnableMsix(usize),
    DisableMsix,
    EnableMsi(usize),
    DisableMsi,
    EnableIntx,
    DisableIntx,
}

/// The interrupt kind the fake has on, held to the kernel's rule of one at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqKind {
    Intx,
    Msi,
    Msix,
}

pub struct FakeFunction {
    pub config: Mutex<Vec<u8>>,
    pub bars: Vec<FakeBar>,
    pub msix_vectors: u32,
    pub msi_vectors: u32,
    pub intx: bool,
    pub enabled: Mutex<Option<IrqKind>>,
    pub calls: Mutex<Vec<Call>>,
}

impl FakeFunction {
    fn record(&self, call: Call) {
        self.calls.lock().unwrap().push(call);
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    pub fn forget_calls(&self) {
        self.calls.lock().unwrap().clear();
    }

    /// What vfio-pci does: one interrupt kind at a time, EINVAL for another.
    fn switch_irqs(&self, from: IrqKind, on: bool) -> io::Result<()> {
        let mut enabled = self.enabled.lock().unwrap();
        match (*enabled, on) {
            (None, true) => *enabled = Some(from),
            (Some(k), true) if k == from => {}
            (Some(k), false) if k == from => *enabled = None,
            // Turning off what is not on is refused too.
            _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
        Ok(())
    }

    /// An NVMe-like function: vendor 0x1b36 device 0x0010 class 01:08:02; BAR 0 a 64-bit
    /// 16 KiB memory BAR with the MSI-X table at 0x2000 and PBA at 0x3000 (8 vectors);
    /// BAR 2 an I/O BAR; BAR 4 a 32-bit 64 KiB prefetchable BAR the kernel lets ember map
    /// only from 0x4000 on (sparse); capabilities MSI-X at 0x40, MSI at 0x50 (4 vectors, 64-bit,
    /// per-vector masking), PCI Express at 0x70; interrupt pin A; function 0 of a
    /// multi-function device.
    pub fn nvme_like() -> Self {
        let mut c = vec![0u8; 4096];
        c[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
        c[2..4].copy_from_slice(&0x0010u16.to_le_bytes());
        c[0x06] = 1 << 4; // capability list
        c[0x08] = 2; // revision
        c[0x09..0x0c].copy_from_slice(&[0x02, 0x08, 0x01]);
        c[0x0e] = 0x80; // multi-function
        c[0x10..0x14].copy_from_slice(&0xfebf_0004u32.to_le_bytes()); // 64-bit memory
        c[0x18..0x1c].copy_from_slice(&0x0000_c001u32.to_le_bytes()); // I/O
        c[0x20..0x24].copy_from_slice(&0xfe00_0008u32.to_le_bytes()); // 32-bit prefetchable
        c[0x2c..0x30].copy_from_slice(&0x1100_1af4u32.to_le_bytes());
        c[0x30..0x34].copy_from_slice(&0xfeb8_0000u32.to_le_bytes()); // expansion ROM
        c[0x34] = 0x40;
        c[0x3d] = 1; // INTA#
        // MSI-X: 8 vectors (size field 7), table BAR 0 + 0x2000, PBA BAR 0 + 0x3000.
        c[0x40..0x44].copy_from_slice(&[0x11, 0x50, 0x07, 0x00]);
        c[0x44..0x48].copy_from_slice(&0x2000u32.to_le_bytes());
        c[0x48..0x4c].copy_from_slice(&0x3000u32.to_le_bytes());
        // MSI (four vectors asked, 64-bit, per-vector masking), then PCI Express (the end
        // of the chain).
        c[0x50..0x52].copy_from_slice(&[0x05, 0x70]);
        c[0x52..0x54].copy_from_slice(&0x0184u16.to_le_bytes());
        c[0x70..0x72].copy_from_slice(&[0x10, 0x00]);
        c[0x72] = 0x02;
        let bar = |size: u64, mappable: bool, sparse: Vec<(u64, u64)>| FakeBar {
            info: RegionInfo {
                size,
                mappable,
                sparse,
            },
            contents: Mutex::new(vec![0; size as usize]),
        };
        FakeFunction {
            config: Mutex::new(c),
            bars: vec![
                bar(0x4000, true, vec![]),
                bar(0, false, vec![]),
                bar(0x100, false, vec![]),
                bar(0, false, vec![]),
                bar(0x10000, true, vec![(0x4000, 0xc000)]),
                bar(0, false, vec![]),
            ],
            msix_vectors: 8,
            msi_vectors: 4,
            intx: true,
            enabled: Mutex::new(None),
            calls: Mutex::new(Vec::new()),
        }
    }
}

impl VfioBackend for FakeFunction {
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config.lock().unwrap();
        let o = offset as usize;
        data.copy_from_slice(&c[o..o + data.len()]);
    }

    fn write_config(&self, offset: u64, data: &[u8]) {
        self.record(Call::ConfigWrite(offset, data.to_vec()));
        let mut c = self.config.lock().unwrap();
        let o = offset as usize;
        c[o..o + data.len()].copy_from_slice(data);
    }

    fn bar_region(&self, index: usize) -> RegionInfo {
        self.bars[index].info.clone()
    }

    fn read_bar(&self, index: usize, offset: u64, data: &mut [u8]) {
        let b = self.bars[index].contents.lock().unwrap();
        let o = offset as usize;
        data.copy_from_slice(&b[o..o + data.len()]);
    }

    fn write_bar(&self, index: usize, offset: u64, data: &[u8]) {
        self.record(Call::BarWrite(index, offset, data.to_vec()));
        let mut b = self.bars[index].contents.lock().unwrap();
        let o = offset as usize;
        b[o..o + data.len()].copy_from_slice(data);
    }

    fn map_bar(&self, index: usize, offset: u64, len: u64) -> io::Result<Arc<MmapRegion<()>>> {
        self.record(Call::MapBar(index, offset, len));
        Ok(Arc::new(
            MmapRegion::new(len as usize).map_err(io::Error::other)?,
        ))
    }

    fn msix_vectors(&self) -> u32 {
        self.msix_vectors
    }

    fn enable_msix(&self, fds: &[&EventFd]) -> io::Result<()> {
        self.switch_irqs(IrqKind::Msix, true)?;
        self.record(Call::EnableMsix(fds.len()));
        Ok(())
    }

    fn disable_msix(&self) -> io::Result<()> {
        self.switch_irqs(IrqKind::Msix, false)?;
        self.record(Call::DisableMsix);
        Ok(())
    }

    fn msi_vectors(&self) -> u32 {
        self.msi_vectors
    }

    fn enable_msi(&self, fds: &[&EventFd]) -> io::Result<()> {
        self.switch_irqs(IrqKind::Msi, true)?;
        self.record(Call::EnableMsi(fds.len()));
        Ok(())
    }

    fn disable_msi(&self) -> io::Result<()> {
        self.switch_irqs(IrqKind::Msi, false)?;
        self.record(Call::DisableMsi);
        Ok(())
    }

    fn intx_available(&self) -> bool {
        self.intx
    }

    fn enable_intx(&self, _trigger: &EventFd, _resample: &EventFd) -> io::Result<()> {
        if !self.intx {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.switch_irqs(IrqKind::Intx, true)?;
        self.record(Call::EnableIntx);
        Ok(())
    }

    fn disable_intx(&self) -> io::Result<()> {
        self.switch_irqs(IrqKind::Intx, false)?;
        self.record(Call::DisableIntx);
        Ok(())
    }

    fn reset(&self) {
        self.record(Call::Reset);
    }
}

/// An IOMMU that records its mappings and can be told to refuse the n-th.
#[derive(Default)]
pub struct FakeIommu {
    pub mapped: Mutex<Vec<(u64, u64, u64)>>,
    pub fail_at: Option<usize>,
}

impl DmaMapper for FakeIommu {
    unsafe fn map(&self, iova: u64, len: u64, host_addr: u64) -> io::Result<()> {
        let mut mapped = self.mapped.lock().unwrap();
        if self.fail_at == Some(mapped.len()) {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        mapped.push((iova, len, host_addr));
        Ok(())
    }

    fn unmap(&self, iova: u64, len: u64) -> io::Result<()> {
        let mut mapped = self.mapped.lock().unwrap();
        let before = mapped.len();
        mapped.retain(|&(i, l, _)| (i, l) != (iova, len));
        if mapped.len() == before {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        Ok(())
    }
}
