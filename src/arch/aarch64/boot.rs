//! Booting an arm64 guest: the Image, initrd and device tree in guest memory, and each
//! vCPU's state at entry.

use std::io::{Read, Seek, SeekFrom};

use crate::memory::GuestMemoryMmap;
use kvm_bindings::kvm_vcpu_init;
use kvm_ioctls::VcpuFd;
use linux_loader::loader::{KernelLoader, pe::PE};
use vm_memory::{Bytes, GuestAddress};

use super::fdt::{self, FdtBuildError, FdtSpec, GicVersion};
use super::kernel::{self, HEADER_LEN, ImageError, ImageHeader};
use super::layout::RAM_START;
use super::regs::{self, RegsError};
use crate::arch::BootSpec;
use crate::config::Irqchip;

/// Linux's COMMAND_LINE_SIZE on arm64, less the NUL.
pub const CMDLINE_MAX_LEN: usize = 2047;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read kernel image {path}: {source}")]
    ReadKernel {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Image(#[from] ImageError),
    #[error("cannot load kernel image {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("cannot read initrd {0} into guest memory")]
    ReadInitrd(String),
    #[error("{0}")]
    Fdt(#[from] FdtBuildError),
    #[error("cannot write the device tree into guest memory: {0}")]
    WriteFdt(vm_memory::GuestMemoryError),
    #[error("the interrupt controller is {0:?}, not a GIC")]
    NotAGic(Irqchip),
}

#[derive(Debug, thiserror::Error)]
#[error("vCPU {index}: {source}")]
pub struct VcpuSetupError {
    index: u8,
    source: RegsError,
}

/// Where the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug)]
pub struct BootState {
    pub entry: u64,
    pub fdt: u64,
}

impl BootState {
    /// How the kernel is entered, as the log says it.
    pub fn describe(&self) -> String {
        format!(
            "entry {:#x} (arm64 Image), device tree at {:#x}",
            self.entry, self.fdt
        )
    }
}

/// Loads the kernel and initrd and writes the device tree.
pub fn load_guest(mem: &GuestMemoryMmap, spec: BootSpec) -> Result<BootState, BootError> {
    let gic = match spec.irqchip {
        Irqchip::GicV3 => GicVersion::V3,
        Irqchip::GicV2 => GicVersion::V2,
        other => return Err(BootError::NotAGic(other)),
    };
    let shown = spec.kernel.shown.clone();
    let read_error = |source| BootError::ReadKernel {
        path: shown.clone(),
        source,
    };
    let file = &mut spec.kernel.file;
    let mut bytes = [0u8; HEADER_LEN];
    file.seek(SeekFrom::Start(0)).map_err(read_error)?;
    file.read_exact(&mut bytes).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            BootError::Image(ImageError::NotAnImage(shown.clone(), false))
        } else {
            read_error(e)
        }
    })?;
    let header = ImageHeader::parse(&bytes, &shown)?;
    let initrd_len = spec.initrd.as_ref().map_or(0, |f| f.size);
    let ram = (RAM_START, spec.mem_bytes);
    let place = kernel::place(ram, header, spec.kernel.size, initrd_len)?;

    let loaded =
        PE::load(mem, Some(GuestAddress(RAM_START)), file, None).map_err(|e| BootError::Load {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
    if loaded.kernel_load.0 != place.kernel {
        return Err(BootError::Load {
            path: shown,
            reason: format!(
                "loaded at {:#x}, not at {:#x} as its header says",
                loaded.kernel_load.0, place.kernel
            ),
        });
    }

    let initrd = match (spec.initrd, place.initrd) {
        (Some(f), Some(at)) => {
            f.file
                .seek(SeekFrom::Start(0))
                .map_err(|_| BootError::ReadInitrd(f.shown.clone()))?;
            mem.read_exact_volatile_from(GuestAddress(at), &mut f.file, f.size as usize)
                .map_err(|_| BootError::ReadInitrd(f.shown.clone()))?;
            log::info!("initrd {} bytes at {at:#x}", f.size);
            Some((at, f.size))
        }
        _ => None,
    };
    let blob = fdt::build(&FdtSpec {
        vcpu_count: spec.vcpu_count,
        ram,
        cmdline: spec.cmdline,
        initrd,
        gic,
        devices: spec.devices,
    })?;
    mem.write_slice(&blob, GuestAddress(place.fdt))
        .map_err(BootError::WriteFdt)?;
    Ok(BootState {
        entry: place.kernel,
        fdt: place.fdt,
    })
}

/// Initialises vCPU `index` right after it is created, before the vGIC is: PSCI 0.2, and
/// every vCPU but the first powered off until the guest starts it.
pub fn init_vcpu(fd: &VcpuFd, index: u8, preferred: &kvm_vcpu_init) -> Result<(), VcpuSetupError> {
    regs::init(fd, index, preferred).map_err(|source| VcpuSetupError { index, source })
}

/// Points the boot vCPU at the kernel; the others wait for PSCI CPU_ON.
pub fn configure_vcpu(fd: &VcpuFd, index: u8, boot: &BootState) -> Result<(), VcpuSetupError> {
    if index == 0 {
        regs::set_boot_registers(fd, boot.entry, boot.fdt)
            .map_err(|source| VcpuSetupError { index, source })?;
    }
    Ok(())
}

/// The registers that say where a vCPU was when the guest failed, for the log.
pub fn fault_state(fd: &VcpuFd) -> String {
    format!("pc={:#x}", regs::program_counter(fd))
}

/// The program counter of a vCPU, 0 if it cannot be read.
pub fn instruction_pointer(fd: &VcpuFd) -> u64 {
    regs::program_counter(fd)
}
