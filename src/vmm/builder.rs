//! Turns a validated configuration into a VM ready to run: KVM objects, guest memory with
//! the kernel and boot data in it, every device attached through the device manager,
//! vCPUs configured but not started.

use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::{self, Vsock};
use crate::mmds::Mmds;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::memory::GuestMemoryMmap;

use crate::arch::{self, BootSpec};
use crate::config::boot_source::{CMDLINE_MAX_LEN, DEFAULT_BOOT_ARGS};
use crate::config::drive::{CacheType, IoEngine};
use crate::config::{BootSourceConfig, DriveConfig, MachineConfig, NetConfig, VfioConfig};
use crate::devices::virtio::block::{Block, BlockConfig, BlockError};
use crate::devices::virtio::net::{self, Net, NetError};
use crate::exit_code;
use crate::host_file::{self, Accept, Access, HostFile, HostFileError};
use crate::memory::{self, MemoryError};
use crate::stop::StopSignal;
use crate::vstate::kvm::{KvmContext, KvmError};
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::{Vm, VmError};

use super::device_manager::{DeviceManager, DeviceManagerError};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Kvm(#[from] KvmError),
    #[error("{0}")]
    Memory(#[from] MemoryError),
    #[error("{0}")]
    Vm(#[from] VmError),
    #[error("{0}")]
    BootFile(#[from] HostFileError),
    #[error("{0}")]
    Boot(#[from] arch::BootError),
    #[error("{0}")]
    VcpuSetup(#[from] arch::VcpuSetupError),
    #[error("{0}")]
    Devices(#[from] DeviceManagerError),
    #[error("{0}")]
    Block(#[from] BlockError),
    #[error("{0}")]
    Net(#[from] NetError),
    #[error("{0}")]
    Entropy(#[from] crate::devices::virtio::rng::RngError),
    #[error("{0}")]
    Vsock(#[from] crate::devices::virtio::vsock::VsockError),
    #[error(
        "the kernel command line with ember's device parameters is {len} bytes; the boot protocol allows at most {max}"
    )]
    CmdlineTooLong { len: usize, max: usize },
    #[error("machine-config.vcpu_count {requested} is more than this host's KVM allows ({max})")]
    TooManyVcpus { requested: u8, max: usize },
    #[error("machine-config.vcpu_count {requested} is more than a {gic} can serve ({max})")]
    TooManyVcpusForGic {
        requested: u8,
        gic: &'static str,
        max: u64,
    },
    #[error("{0} is not available on {arch} yet", arch = std::env::consts::ARCH)]
    NotOnThisArch(&'static str),
    #[cfg(target_arch = "x86_64")]
    #[error("{0}")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[cfg(target_arch = "x86_64")]
    #[error("{0}")]
    CpuTemplate(#[from] arch::x86_64::cpu_template::CpuTemplateError),
}

impl BuildError {
    /// The exit code this failure gives (see `exit_code`).
    pub fn exit_code(&self) -> u8 {
        #[cfg(target_arch = "x86_64")]
        use super::device_manager::pci::VfioAttachError;
        use super::device_manager::resources::ResourceError;
        match self {
            BuildError::BootFile(_)
            | BuildError::Boot(_)
            | BuildError::Block(_)
            | BuildError::Net(_)
            | BuildError::Devices(DeviceManagerError::Resources(
                ResourceError::NoIrq { .. } | ResourceError::NoMmioWindow { .. },
            ))
            | BuildError::NotOnThisArch(_)
            | BuildError::TooManyVcpusForGic { .. }
            | BuildError::CmdlineTooLong { .. } => exit_code::BAD_CONFIGURATION,
            #[cfg(target_arch = "x86_64")]
            BuildError::Devices(DeviceManagerError::Vfio(VfioAttachError::NeedsPci(_))) => {
                exit_code::BAD_CONFIGURATION
            }
            // A template for the other vendor's CPUs.
            #[cfg(target_arch = "x86_64")]
            BuildError::CpuTemplate(_) => exit_code::HOST_UNSUITABLE,
            // The interrupt controller asked for is not one this host's KVM can make.
            BuildError::Kvm(_)
            | BuildError::Memory(_)
            | BuildError::TooManyVcpus { .. }
            | BuildError::Vm(VmError::Arch(_)) => exit_code::HOST_UNSUITABLE,
            #[cfg(target_arch = "x86_64")]
            BuildError::Devices(DeviceManagerError::Vfio(
                VfioAttachError::Host { .. } | VfioAttachError::Dma(_),
            )) => exit_code::HOST_UNSUITABLE,
            _ => exit_code::VMM_ERROR,
        }
    }
}

/// What building needs besides the configuration.
pub struct BuildOptions {
    /// When set, the first byte the guest prints logs the time since this instant.
    pub boot_timer_start: Option<Instant>,
    /// Raised by whatever ends the VM (guest reset, vCPU fault, the controller).
    pub stop: StopSignal,
    /// The VM's id, from which interfaces without a `guest_mac` get a stable one.
    pub instance_id: String,
    /// `--enable-pci`: a PCI root complex for the guest (docs/pci.md).
    pub enable_pci: bool,
    /// The metadata service, when configured: the interfaces its configuration names
    /// answer frames for it.
    pub mmds: Option<Arc<Mutex<Mmds>>>,
    /// The virtio-rng device, when configured.
    pub entropy: Option<crate::config::EntropyConfig>,
    /// The virtio-vsock device, when configured.
    pub vsock: Option<crate::config::VsockConfig>,
}

/// The metadata service for interface `iface_id`, if its configuration names it.
fn mmds_for(mmds: Option<&Arc<Mutex<Mmds>>>, iface_id: &str) -> Option<Arc<Mutex<Mmds>>> {
    let shared = mmds?;
    let named = shared
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .config()
        .network_interfaces
        .iter()
        .any(|id| id == iface_id);
    named.then(|| shared.clone())
}

/// A VM with everything in place, vCPUs not yet running.
pub struct MicroVm {
    pub vcpus: Vec<Vcpu>,
    pub devices: DeviceManager,
    /// The block devices by drive id, for updates after start.
    pub blocks: Vec<(String, Arc<Mutex<Block>>)>,
    /// The network devices by interface id, for updates after start.
    pub nets: AttachedNets,
    pub stop: StopSignal,
    pub guest_memory: GuestMemoryMmap,
    /// The VM keeps the memory its slots map until its fd is closed (see `vstate::vm`).
    pub vm: Vm,
    pub kvm: KvmContext,
    /// A restored VM's userfaultfd (Uffd memory backend), open while the VM lives.
    pub uffd: Option<std::os::fd::OwnedFd>,
}

/// A hook for the guest's first console byte that logs the time since `start` as `what`:
/// `Guest-boot-time` from process start, `Guest-restore-time` from a snapshot load.
fn first_byte_timer(
    start: Option<Instant>,
    what: &'static str,
    since: &'static str,
) -> Option<Box<dyn FnOnce() + Send>> {
    start.map(|start| {
        Box::new(move || {
            let us = start.elapsed().as_micros();
            log::info!("{what} = {us:>6} us {} ms ({since})", us / 1000);
        }) as Box<dyn FnOnce() + Send>
    })
}

/// Opens the kernel and initrd (without blocking, regular files only), so a wrong path is
/// refused as soon as it is given and reported as the user's mistake even on a host where
/// KVM is unusable.
pub fn open_boot_files(
    boot: &BootSourceConfig,
) -> Result<(HostFile, Option<HostFile>), HostFileError> {
    let kernel = host_file::open(
        "kernel image",
        Path::new(&boot.kernel_image_path),
        Access::ReadOnly,
        Accept::RegularFile,
    )?;
    let initrd = boot
        .initrd_path
        .as_deref()
        .map(|p| {
            host_file::open(
                "initrd",
                Path::new(p),
                Access::ReadOnly,
                Accept::RegularFile,
            )
        })
        .transpose()?;
    Ok((kernel, initrd))
}

/// A VM with `guest_memory` in its slots and its interrupt controllers. Slots come first:
/// adding a slot once an in-kernel irqchip exists is much slower (docs/performance.md).
fn vm_with_memory(
    kvm: &KvmContext,
    guest_memory: &GuestMemoryMmap,
    track_dirty_pages: bool,
    irqchip: crate::config::Irqchip,
) -> Result<Vm, BuildError> {
    let mut vm = Vm::new(kvm)?;
    vm.register_memory(guest_memory, track_dirty_pages)?;
    vm.create_interrupt_controllers(irqchip)?;
    Ok(vm)
}

/// The part of a VM that depends only on the machine configuration: KVM, the VM with its
/// interrupt controllers, and guest memory registered in its slots. The controller builds it
/// ahead of `InstanceStart` so starting does only what needs the kernel.
pub struct PreparedVm {
    /// What it was built for; see [`PreparedVm::fits`].
    machine: MachineConfig,
    guest_memory: GuestMemoryMmap,
    vm: Vm,
    kvm: KvmContext,
}

impl PreparedVm {
    pub fn new(machine: &MachineConfig) -> Result<Self, BuildError> {
        let kvm = KvmContext::open()?;
        let guest_memory = memory::create_guest_memory(
            machine.mem_size_bytes(),
            machine.huge_pages,
            machine.track_dirty_pages,
        )?;
        let vm = vm_with_memory(
            &kvm,
            &guest_memory,
            machine.track_dirty_pages,
            machine.irqchip,
        )?;
        // Prepared ahead of InstanceStart when the API is used: the start then finds it.
        kvm.prefetch_cpuid();
        Ok(PreparedVm {
            machine: machine.clone(),
            guest_memory,
            vm,
            kvm,
        })
    }

    /// Destroys the VM off the calling thread: tearing down a VM with an in-kernel irqchip
    /// takes 10-20 ms on some hosts (docs/performance.md), which must not delay a request.
    pub fn discard(self) {
        let spawned = std::thread::Builder::new()
            .name("vm-teardown".into())
            .spawn(move || drop(self));
        if let Err(e) = spawned {
            log::debug!("cannot tear the unused VM down in the background: {e}");
        }
    }

    /// True when this VM can serve `machine`: only the memory settings went into it; the
    /// vCPUs are made at start.
    pub fn fits(&self, machine: &MachineConfig) -> bool {
        self.machine.mem_size_mib == machine.mem_size_mib
            && self.machine.huge_pages == machine.huge_pages
            && self.machine.track_dirty_pages == machine.track_dirty_pages
            && self.machine.irqchip == machine.irqchip
    }
}

/// The block devices by drive id, as `PATCH /drives` finds them.
type AttachedDrives = Vec<(String, Arc<Mutex<Block>>)>;

/// Creates a virtio-blk device per drive and attaches it, root drive first (so it is
/// /dev/vda). Returns the devices and the command-line words for the root device.
fn attach_drives(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    devices: &mut DeviceManager,
    drives: &[DriveConfig],
) -> Result<(AttachedDrives, Vec<String>), BuildError> {
    let mut ordered: Vec<&DriveConfig> = drives.iter().filter(|d| d.is_root_device).collect();
    ordered.extend(drives.iter().filter(|d| !d.is_root_device));
    let mut blocks = Vec::new();
    let mut root_args = Vec::new();
    for drive in ordered {
        let block = Block::new(BlockConfig {
            id: drive.drive_id.clone(),
            path: drive.path_on_host.clone().unwrap_or_default(),
            read_only: drive.is_read_only,
            flush: drive.cache_type == CacheType::Writeback,
            async_io: drive.io_engine == IoEngine::Async,
            rate_limiter: drive.rate_limiter.clone(),
        })?;
        let summary = format!(
            "{} sectors{}, {} I/O",
            block.capacity(),
            if drive.is_read_only {
                ", read-only"
            } else {
                ""
            },
            if block.is_async() {
                "io_uring"
            } else {
                "synchronous"
            }
        );
        let block = Arc::new(Mutex::new(block));
        let placement = devices.attach_virtio(vm, mem, &drive.drive_id, block.clone())?;
        log::info!(
            "drive {:?}: {} ({summary}) {placement}",
            drive.drive_id,
            drive.path_on_host.as_deref().unwrap_or(""),
        );
        blocks.push((drive.drive_id.clone(), block));
        if drive.is_root_device {
            root_args.push(match &drive.partuuid {
                Some(uuid) => format!("root=PARTUUID={uuid}"),
                None => "root=/dev/vda".to_owned(),
            });
            root_args.push(if drive.is_read_only { "ro" } else { "rw" }.to_owned());
        }
    }
    Ok((blocks, root_args))
}

/// The network devices by interface id, as `PATCH /network-interfaces` finds them.
pub type AttachedNets = Vec<(String, Arc<Mutex<Net>>)>;

/// Creates a virtio-net device per interface, on its TAP, and attaches it.
fn attach_nets(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    devices: &mut DeviceManager,
    interfaces: &[NetConfig],
    instance_id: &str,
    mmds: Option<&Arc<Mutex<Mmds>>>,
) -> Result<AttachedNets, BuildError> {
    let mut nets = Vec::with_capacity(interfaces.len());
    for iface in interfaces {
        let mac = net::interface_mac(iface.guest_mac.as_deref(), instance_id, &iface.iface_id);
        let device = Net::new(net::NetConfig {
            id: iface.iface_id.clone(),
            tap_name: iface.host_dev_name.clone(),
            mac,
            mtu: iface.mtu,
            rx_rate_limiter: iface.rx_rate_limiter.clone(),
            tx_rate_limiter: iface.tx_rate_limiter.clone(),
            mmds: mmds_for(mmds, &iface.iface_id),
        })?;
        let device = Arc::new(Mutex::new(device));
        let placement = devices.attach_virtio(vm, mem, &iface.iface_id, device.clone())?;
        log::info!(
            "network interface {:?}: TAP {}, MAC {} {placement}",
            iface.iface_id,
            iface.host_dev_name,
            net::format_mac(mac),
        );
        nets.push((iface.iface_id.clone(), device));
    }
    Ok(nets)
}

/// The guest's command line: the user's arguments, then ember's device words. The default
/// arguments keep the guest off PCI (`pci=off`) only when there is no PCI bus.
fn compose_cmdline(
    boot: &BootSourceConfig,
    enable_pci: bool,
    words: &[String],
) -> Result<String, BuildError> {
    let mut cmdline = match (&boot.boot_args, enable_pci) {
        (None, true) => DEFAULT_BOOT_ARGS
            .split_whitespace()
            .filter(|w| *w != "pci=off")
            .collect::<Vec<_>>()
            .join(" "),
        _ => boot.boot_args().to_owned(),
    };
    for w in words {
        cmdline.push(' ');
        cmdline.push_str(w);
    }
    if cmdline.len() > CMDLINE_MAX_LEN {
        return Err(BuildError::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX_LEN,
        });
    }
    Ok(cmdline)
}

/// Refuses more vCPUs than the interrupt controller serves: a GICv2 has eight CPU
/// interfaces, a GICv3 as many redistributors as the layout has room for.
fn check_vcpus_for_irqchip(
    vcpu_count: u8,
    irqchip: crate::config::Irqchip,
) -> Result<(), BuildError> {
    use crate::config::Irqchip;
    let (gic, max) = match irqchip {
        Irqchip::GicV2 => ("GICv2", 8),
        #[cfg(target_arch = "aarch64")]
        Irqchip::GicV3 => ("GICv3", arch::layout::max_vcpus_for_gicv3()),
        _ => return Ok(()),
    };
    if u64::from(vcpu_count) > max {
        return Err(BuildError::TooManyVcpusForGic {
            requested: vcpu_count,
            gic,
            max,
        });
    }
    Ok(())
}

/// The vCPUs of `machine`, created (and on arm64 initialised) before any device: arm64's
/// vGIC is initialised for them, and only then takes the devices' irqfds.
fn create_vcpus(
    vm: &Vm,
    kvm: &KvmContext,
    machine: &MachineConfig,
) -> Result<Vec<(u8, kvm_ioctls::VcpuFd)>, BuildError> {
    // The interrupt controller's limit first: it is the configuration's to fix, and KVM's
    // own limit follows from it on an arm64 host with a GICv2.
    let irqchip = vm.irqchip().unwrap_or(machine.irqchip);
    check_vcpus_for_irqchip(machine.vcpu_count, irqchip)?;
    if usize::from(machine.vcpu_count) > kvm.max_vcpus() {
        return Err(BuildError::TooManyVcpus {
            requested: machine.vcpu_count,
            max: kvm.max_vcpus(),
        });
    }
    #[cfg(target_arch = "aarch64")]
    let preferred_target = vm.preferred_target()?;
    let mut vcpu_fds = Vec::with_capacity(usize::from(machine.vcpu_count));
    for index in 0..machine.vcpu_count {
        let fd = vm.create_vcpu(index)?;
        #[cfg(target_arch = "aarch64")]
        arch::init_vcpu(&fd, index, &preferred_target)?;
        vcpu_fds.push((index, fd));
    }
    vm.finish_interrupt_controllers()?;
    Ok(vcpu_fds)
}

/// What `attach_devices` attached.
struct AttachedDevices {
    devices: DeviceManager,
    blocks: AttachedDrives,
    /// The root drive's command-line words.
    root_args: Vec<String>,
    nets: AttachedNets,
    /// Told of a transport reset after a snapshot load (x86_64 only so far).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    vsock: Option<Arc<Mutex<Vsock>>>,
}

/// Every device a configuration names, attached in the one order a snapshot relies on:
/// the platform's, the PCI root, drives (root first), network interfaces, VFIO functions.
#[allow(clippy::too_many_arguments)]
fn attach_devices(
    vm: &Vm,
    guest_memory: &GuestMemoryMmap,
    machine: &MachineConfig,
    drives: &[DriveConfig],
    interfaces: &[NetConfig],
    vfio: &[VfioConfig],
    opts: &BuildOptions,
    on_first_byte: Option<Box<dyn FnOnce() + Send>>,
) -> Result<AttachedDevices, BuildError> {
    let mut devices = DeviceManager::new()?;
    devices.attach_platform(vm, machine.vcpu_count, &opts.stop, on_first_byte)?;
    #[cfg(target_arch = "x86_64")]
    if opts.enable_pci {
        devices.attach_pci_root(machine.mem_size_bytes())?;
    }
    #[cfg(not(target_arch = "x86_64"))]
    if opts.enable_pci || !vfio.is_empty() {
        return Err(BuildError::NotOnThisArch(
            "the PCI bus (--enable-pci) and VFIO passthrough",
        ));
    }
    let (blocks, root_args) = attach_drives(vm, guest_memory, &mut devices, drives)?;
    let nets = attach_nets(
        vm,
        guest_memory,
        &mut devices,
        interfaces,
        &opts.instance_id,
        opts.mmds.as_ref(),
    )?;
    if let Some(entropy) = &opts.entropy {
        let device = Rng::new(entropy.rate_limiter.as_ref())?;
        let placement =
            devices.attach_virtio(vm, guest_memory, "entropy", Arc::new(Mutex::new(device)))?;
        log::info!("entropy device {placement}");
    }
    let vsock = match &opts.vsock {
        Some(config) => {
            let device = Arc::new(Mutex::new(Vsock::new(vsock::VsockConfig {
                guest_cid: config.guest_cid,
                uds_path: config.uds_path.clone().into(),
            })?));
            let placement = devices.attach_virtio(vm, guest_memory, "vsock", device.clone())?;
            log::info!(
                "vsock device: guest CID {}, host socket {} {placement}",
                config.guest_cid,
                config.uds_path
            );
            Some(device)
        }
        None => None,
    };
    #[cfg(target_arch = "x86_64")]
    devices.attach_vfio(vm, guest_memory, vfio)?;
    Ok(AttachedDevices {
        devices,
        blocks,
        root_args,
        nets,
        vsock,
    })
}

/// Builds a microVM, from `prepared` if it was made for this machine configuration.
pub fn build_microvm(
    boot: &BootSourceConfig,
    machine: &MachineConfig,
    drives: &[DriveConfig],
    interfaces: &[NetConfig],
    vfio: &[VfioConfig],
    prepared: Option<PreparedVm>,
    opts: BuildOptions,
) -> Result<MicroVm, BuildError> {
    let (mut kernel, mut initrd) = open_boot_files(boot)?;
    let PreparedVm {
        vm,
        guest_memory,
        kvm,
        ..
    } = match prepared {
        Some(p) if p.fits(machine) => {
            log::debug!("using the VM and memory prepared ahead of start");
            p
        }
        stale => {
            if let Some(old) = stale {
                old.discard();
            }
            PreparedVm::new(machine)?
        }
    };
    let irqchip = vm.irqchip().unwrap_or(machine.irqchip);
    let vcpu_fds = create_vcpus(&vm, &kvm, machine)?;
    let AttachedDevices {
        devices,
        blocks,
        root_args,
        nets,
        vsock: _,
    } = attach_devices(
        &vm,
        &guest_memory,
        machine,
        drives,
        interfaces,
        vfio,
        &opts,
        first_byte_timer(
            opts.boot_timer_start,
            "Guest-boot-time",
            "first serial output",
        ),
    )?;
    let mut words = devices.cmdline_words().to_vec();
    words.extend(root_args);
    let cmdline = compose_cmdline(boot, opts.enable_pci, &words)?;
    let boot_state = arch::load_guest(
        &guest_memory,
        BootSpec {
            kernel: &mut kernel,
            initrd: initrd.as_mut(),
            cmdline: &cmdline,
            mem_bytes: machine.mem_size_bytes(),
            vcpu_count: machine.vcpu_count,
            devices: devices.platform_devices(),
            irqchip,
        },
    )?;
    log::info!("kernel {} loaded, {}", kernel.shown, boot_state.describe());

    #[cfg(target_arch = "x86_64")]
    let supported_cpuid = {
        let mut entries = kvm.supported_cpuid()?.as_slice().to_vec();
        if let Some(template) = machine.cpu_template {
            arch::x86_64::cpu_template::apply(&mut entries, template)?;
        }
        kvm_bindings::CpuId::from_entries(&entries)
            .map_err(|e| arch::VcpuSetupError::CpuidList(0, e))?
    };
    let mut vcpus = Vec::with_capacity(vcpu_fds.len());
    for (index, fd) in vcpu_fds {
        #[cfg(target_arch = "x86_64")]
        arch::configure_vcpu(
            &fd,
            index,
            &guest_memory,
            &boot_state,
            &supported_cpuid,
            machine.vcpu_count,
            machine.smt,
        )?;
        #[cfg(target_arch = "aarch64")]
        arch::configure_vcpu(&fd, index, &boot_state)?;
        vcpus.push(Vcpu { index, fd });
    }

    Ok(MicroVm {
        vcpus,
        devices,
        blocks,
        nets,
        stop: opts.stop,
        guest_memory,
        vm,
        kvm,
        uffd: None,
    })
}

/// Where a restored VM's memory comes from: mapped, and for the Uffd backend the
/// userfaultfd that the page-fault handler serves (kept open for the VM's life).
pub struct RestoredMemory {
    pub guest_memory: GuestMemoryMmap,
    pub uffd: Option<std::os::fd::OwnedFd>,
}

/// Builds a microVM from a snapshot: the devices of its configuration attached in the same
/// order, then every vCPU, KVM's VM-wide state and every device put back as saved. The
/// vCPUs do not run until the controller resumes them.
#[cfg(target_arch = "x86_64")]
pub fn restore_microvm(
    state: &crate::snapshot::MicroVmState,
    memory: RestoredMemory,
    track_dirty_pages: bool,
    clock_realtime: bool,
    opts: BuildOptions,
) -> Result<MicroVm, BuildError> {
    use crate::arch::x86_64::state;
    use crate::snapshot::SnapshotError;
    let RestoredMemory { guest_memory, uffd } = memory;
    let kvm = KvmContext::open()?;
    let vm = vm_with_memory(&kvm, &guest_memory, track_dirty_pages, state.irqchip)?;
    let vcpu_fds = create_vcpus(&vm, &kvm, &state.machine_config)?;
    let AttachedDevices {
        devices,
        blocks,
        nets,
        vsock,
        ..
    } = attach_devices(
        &vm,
        &guest_memory,
        &state.machine_config,
        &state.drives,
        &state.network_interfaces,
        &[],
        &opts,
        None,
    )?;
    let mut vcpus = Vec::with_capacity(vcpu_fds.len());
    for ((index, fd), saved) in vcpu_fds.into_iter().zip(&state.vcpus) {
        state::restore_vcpu(&fd, index, saved).map_err(SnapshotError::from)?;
        vcpus.push(Vcpu { index, fd });
    }
    state::restore_vm(vm.fd(), &state.vm, clock_realtime).map_err(SnapshotError::from)?;
    devices
        .restore_state(
            &vm,
            &state.devices,
            first_byte_timer(
                opts.boot_timer_start,
                "Guest-restore-time",
                "first serial output after the snapshot load",
            ),
        )
        .map_err(SnapshotError::from)?;
    // Connections did not survive the snapshot: the guest's driver is told to drop its
    // side of them.
    if let Some(v) = vsock {
        v.lock()
            .unwrap_or_else(|e| e.into_inner())
            .send_transport_reset();
    }
    Ok(MicroVm {
        vcpus,
        devices,
        blocks,
        nets,
        stop: opts.stop,
        guest_memory,
        vm,
        kvm,
        uffd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot(args: Option<&str>) -> BootSourceConfig {
        BootSourceConfig {
            kernel_image_path: "vmlinux".into(),
            initrd_path: None,
            boot_args: args.map(str::to_owned),
        }
    }

    #[test]
    fn default_command_line_drops_pci_off_only_with_a_pci_bus() {
        let words = ["virtio_mmio.device=4K@0xd0000000:5".to_owned()];
        let without = compose_cmdline(&boot(None), false, &words).unwrap();
        assert!(without.split(' ').any(|w| w == "pci=off"), "{without}");
        assert!(without.ends_with(" virtio_mmio.device=4K@0xd0000000:5"));
        let with = compose_cmdline(&boot(None), true, &words).unwrap();
        assert!(!with.contains("pci=off"), "{with}");
        assert!(with.starts_with("reboot=k panic=1 nomodule"), "{with}");
        // The user's own arguments are theirs, PCI or not.
        let own = compose_cmdline(&boot(Some("console=ttyS0 pci=off")), true, &[]).unwrap();
        assert_eq!(own, "console=ttyS0 pci=off");
    }
}
