//! Booting an x86_64 guest: the kernel, initrd and command line in guest memory, the
//! tables that describe the machine (MP table, ACPI), the boot protocol's data (zero page or
//! PVH start info), and each vCPU's state at entry.

use crate::memory::GuestMemoryMmap;
use kvm_bindings::{CpuId, kvm_mp_state};
use kvm_ioctls::VcpuFd;

use super::acpi::{self, AcpiConfig, DsdtDevice, PowerRegisters};
use super::boot_params::{self, LinuxBootInfo};
use super::cpuid::{self, Topology};
use super::kernel::{self, LoadedKernel};
use super::regs::{self, BootProtocol};
use super::{interrupts, mptable, msr};
use crate::arch::{BootSpec, PlatformDevice};
use crate::config::Irqchip;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("{0}")]
    Kernel(#[from] kernel::KernelError),
    #[error("{0}")]
    BootParams(#[from] boot_params::BootParamsError),
    #[error("{0}")]
    MpTable(#[from] mptable::MpTableError),
    #[error("{0}")]
    Acpi(#[from] acpi::AcpiError),
}

#[derive(Debug, thiserror::Error)]
pub enum VcpuSetupError {
    #[error("vCPU {index}: cannot set {what}: {source}")]
    Kvm {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {0}: {1}")]
    Boot(u8, regs::RegsError),
    #[error("vCPU {0}: KVM took {1} of {2} boot MSRs")]
    Msrs(u8, usize, usize),
    #[error("vCPU {0}: {1}")]
    MsrList(u8, msr::MsrError),
    #[error("vCPU {0}: cannot build the CPUID list: {1:?}")]
    CpuidList(u8, vmm_sys_util::fam::Error),
}

/// Where and how the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug)]
pub struct BootState {
    pub kernel: LoadedKernel,
    /// The zero page (64-bit protocol) or the PVH start info.
    pub boot_info: u64,
}

impl BootState {
    /// How the kernel is entered, as the log says it.
    pub fn describe(&self) -> String {
        format!(
            "entry {:#x} ({:?} boot)",
            self.kernel.entry, self.kernel.protocol
        )
    }
}

/// Loads the kernel, initrd and command line, and writes the tables and the boot
/// protocol's data.
pub fn load_guest(mem: &GuestMemoryMmap, spec: BootSpec<'_>) -> Result<BootState, BootError> {
    let loaded = kernel::load_kernel(mem, spec.kernel)?;
    let initrd = spec
        .initrd
        .map(|f| kernel::load_initrd(mem, f, spec.mem_bytes, loaded.end))
        .transpose()?;
    let cmdline_len = kernel::load_cmdline(mem, spec.cmdline)?;
    mptable::write(mem, spec.vcpu_count)?;
    let mut dsdt = Vec::new();
    let mut power = None;
    for d in spec.devices {
        match *d {
            PlatformDevice::Serial { port, irq } => dsdt.push(DsdtDevice::Serial { port, irq }),
            PlatformDevice::Keyboard {
                data_port,
                command_port,
                irq,
            } => dsdt.push(DsdtDevice::Keyboard {
                data_port,
                command_port,
                irq,
            }),
            PlatformDevice::VirtioMmio { base, len, irq } => {
                dsdt.push(DsdtDevice::VirtioMmio { base, len, irq })
            }
            PlatformDevice::PciRoot(windows) => dsdt.push(DsdtDevice::PciRoot(windows)),
            PlatformDevice::PciIntx(intx) => dsdt.push(DsdtDevice::PciIntx(intx)),
            // arm64's devices; the device manager never places them here.
            PlatformDevice::MmioSerial { .. } | PlatformDevice::Rtc { .. } => {}
            PlatformDevice::PowerManagement {
                sleep_control,
                sleep_status,
                reset,
                reset_value,
                s5_sleep_type,
            } => {
                power = Some(PowerRegisters {
                    sleep_control,
                    sleep_status,
                    reset,
                    reset_value,
                    s5_sleep_type,
                })
            }
        }
    }
    let rsdp = acpi::write(
        mem,
        &AcpiConfig {
            vcpu_count: spec.vcpu_count,
            devices: &dsdt,
            power,
            has_8259: spec.irqchip == Irqchip::Kernel,
        },
    )?;
    let boot_info = match loaded.protocol {
        BootProtocol::Linux64 => boot_params::write_zero_page(
            mem,
            &LinuxBootInfo {
                mem_bytes: spec.mem_bytes,
                cmdline_len,
                initrd,
                setup_header: loaded.setup_header,
                rsdp_addr: Some(rsdp),
            },
        )?,
        BootProtocol::Pvh => {
            boot_params::write_pvh_start_info(mem, spec.mem_bytes, initrd, Some(rsdp))?
        }
    };
    if let Some((addr, size)) = initrd {
        log::info!("initrd {size} bytes at {addr:#x}");
    }
    Ok(BootState {
        kernel: loaded,
        boot_info,
    })
}

fn set<T>(
    index: u8,
    what: &'static str,
    r: Result<T, kvm_ioctls::Error>,
) -> Result<T, VcpuSetupError> {
    r.map_err(|source| VcpuSetupError::Kvm {
        index,
        what,
        source,
    })
}

/// CPUID, MSRs, FPU and LAPIC for every vCPU; registers and segments for the boot vCPU.
/// Application processors wait in the in-kernel LAPIC for the guest's INIT/SIPI.
pub fn configure_vcpu(
    fd: &VcpuFd,
    index: u8,
    mem: &GuestMemoryMmap,
    boot: &BootState,
    supported_cpuid: &CpuId,
    vcpu_count: u8,
    smt: bool,
) -> Result<(), VcpuSetupError> {
    let mut entries = supported_cpuid.as_slice().to_vec();
    cpuid::normalize(&mut entries, index, Topology::new(vcpu_count, smt));
    // Without KVM_CAP_GET_TSC_KHZ the leaf is left out; guests then use kvm-clock alone.
    if let Ok(khz) = fd.get_tsc_khz() {
        cpuid::publish_tsc_frequency(&mut entries, khz);
    }
    let cpuid = CpuId::from_entries(&entries).map_err(|e| VcpuSetupError::CpuidList(index, e))?;
    set(index, "CPUID", fd.set_cpuid2(&cpuid))?;

    let msrs = msr::boot_msrs().map_err(|e| VcpuSetupError::MsrList(index, e))?;
    let written = set(index, "MSRs", fd.set_msrs(&msrs))?;
    if written != msrs.as_slice().len() {
        return Err(VcpuSetupError::Msrs(index, written, msrs.as_slice().len()));
    }
    set(index, "FPU", fd.set_fpu(&regs::boot_fpu()))?;

    let mut lapic = set(index, "LAPIC (get)", fd.get_lapic())?;
    interrupts::set_lint(&mut lapic);
    set(index, "LAPIC", fd.set_lapic(&lapic))?;

    if index == 0 {
        let mut sregs = set(index, "special registers (get)", fd.get_sregs())?;
        regs::setup_sregs(mem, boot.kernel.protocol, &mut sregs)
            .map_err(|e| VcpuSetupError::Boot(index, e))?;
        set(index, "special registers", fd.set_sregs(&sregs))?;
        let r = regs::boot_regs(boot.kernel.protocol, boot.kernel.entry, boot.boot_info);
        set(index, "registers", fd.set_regs(&r))?;
    } else {
        // KVM_MP_STATE_UNINITIALIZED: wait for INIT/SIPI.
        let state = kvm_mp_state { mp_state: 1 };
        set(index, "MP state", fd.set_mp_state(state))?;
    }
    Ok(())
}

/// The registers that say where a vCPU was when the guest faulted, for the log.
pub fn fault_state(fd: &VcpuFd) -> String {
    let (Ok(r), Ok(s)) = (fd.get_regs(), fd.get_sregs()) else {
        return "registers unreadable".into();
    };
    format!(
        "rip={:#x} rsp={:#x} rflags={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x} (base {:#x}, l={}) idt={:#x}+{:#x}",
        r.rip,
        r.rsp,
        r.rflags,
        s.cr0,
        s.cr2,
        s.cr3,
        s.cr4,
        s.efer,
        s.cs.selector,
        s.cs.base,
        s.cs.l,
        s.idt.base,
        s.idt.limit
    )
}

/// The instruction pointer of a vCPU, 0 if it cannot be read.
pub fn instruction_pointer(fd: &VcpuFd) -> u64 {
    fd.get_regs().map(|r| r.rip).unwrap_or(0)
}
