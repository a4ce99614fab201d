//! Turns a validated configuration into a VM ready to run: KVM objects, guest memory with the
//! kernel and boot data in it, devices on their buses, vCPUs configured but not started.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::acpi::{self, AcpiConfig, DsdtDevice, PowerRegisters};
use crate::arch::x86_64::boot_params::{self, LinuxBootInfo};
use crate::arch::x86_64::cpuid::Topology;
use crate::arch::x86_64::kernel::{self, BootFile, LoadedKernel};
use crate::arch::x86_64::layout::{MMIO_DEVICES_START, PM_PORT_START};
use crate::arch::x86_64::mptable;
use crate::arch::x86_64::regs::BootProtocol;
use crate::config::boot_source::CMDLINE_MAX_LEN;
use crate::config::drive::{CacheType, IoEngine};
use crate::config::{BootSourceConfig, DriveConfig, MachineConfig};
use crate::devices::virtio::VirtioInterrupt;
use crate::devices::virtio::block::{Block, BlockConfig, BlockError, BlockEventHandler};
use crate::devices::virtio::mmio::{MMIO_WINDOW, MmioTransport, NOTIFY_OFFSET};
use kvm_ioctls::IoEventAddress;

use super::Subscriber;

/// Legacy IRQs for virtio-mmio devices: 5 up to the last IOAPIC pin.
const VIRTIO_IRQ_START: u32 = 5;
const VIRTIO_IRQ_END: u32 = 23;
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::i8042::{I8042, I8042_DATA_PORT, I8042_IRQ, I8042_PORT_LEN};
use crate::devices::legacy::power::{self, PowerManagement};
use crate::devices::legacy::serial::{COM1_IRQ, COM1_LEN, COM1_PORT, ConsoleOutput, SerialDevice};
use crate::exit_code;
use crate::memory::{self, MemoryError};
use crate::stop::StopSignal;
use crate::vstate::kvm::{KvmContext, KvmError};
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Kvm(#[from] KvmError),
    #[error("{0}")]
    Memory(#[from] MemoryError),
    #[error("{0}")]
    Vm(#[from] VmError),
    #[error("{0}")]
    Kernel(#[from] kernel::KernelError),
    #[error("{0}")]
    BootParams(#[from] boot_params::BootParamsError),
    #[error("{0}")]
    MpTable(#[from] mptable::MpTableError),
    #[error("{0}")]
    Acpi(#[from] acpi::AcpiError),
    #[error("{0}")]
    Vcpu(#[from] VcpuError),
    #[error("cannot place a device on the bus: {0}")]
    Bus(#[from] BusError),
    #[error("cannot create an eventfd for {0}: {1}")]
    EventFd(&'static str, std::io::Error),
    #[error("cannot connect {0} to its interrupt line: {1}")]
    Irqfd(&'static str, kvm_ioctls::Error),
    #[error("{0}")]
    Block(#[from] BlockError),
    #[error("cannot register a queue notification with KVM: {0}")]
    IoEvent(kvm_ioctls::Error),
    #[error("at most {0} virtio devices fit the legacy interrupt lines")]
    TooManyDevices(u32),
    #[error(
        "the kernel command line with ember's device parameters is {len} bytes; the x86 boot protocol allows at most {max}"
    )]
    CmdlineTooLong { len: usize, max: usize },
    #[error("machine-config.vcpu_count {requested} is more than this host's KVM allows ({max})")]
    TooManyVcpus { requested: u8, max: usize },
}

impl BuildError {
    /// The exit code this failure gives (see `exit_code`).
    pub fn exit_code(&self) -> u8 {
        match self {
            BuildError::Kernel(_)
            | BuildError::BootParams(_)
            | BuildError::Acpi(_)
            | BuildError::Block(_)
            | BuildError::TooManyDevices(_)
            | BuildError::CmdlineTooLong { .. } => exit_code::BAD_CONFIGURATION,
            BuildError::Kvm(_) | BuildError::Memory(_) | BuildError::TooManyVcpus { .. } => {
                exit_code::HOST_UNSUITABLE
            }
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
}

/// A VM with everything in place, vCPUs not yet running.
pub struct MicroVm {
    pub vcpus: Vec<Vcpu>,
    pub pio_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub serial_input_drained: EventFd,
    /// Event-loop subscribers of the devices (queue notifications).
    pub device_handlers: Vec<Subscriber>,
    /// The block devices by drive id, for updates after start.
    pub blocks: Vec<(String, Arc<Mutex<Block>>)>,
    /// The API's SendCtrlAltDel injects keys here.
    pub i8042: Arc<Mutex<I8042>>,
    pub stop: StopSignal,
    // Held so they live as long as the VM; field order is drop order: the VM (and its
    // memory slots) goes before the memory it maps.
    pub vm: Vm,
    pub guest_memory: GuestMemoryMmap,
    pub kvm: KvmContext,
}

/// What attaching the drives produced: command-line words that announce the devices (and
/// the root device) and the event-loop handlers that run their queues.
struct AttachedDrives {
    cmdline_args: Vec<String>,
    /// How the DSDT announces each device.
    acpi_devices: Vec<DsdtDevice>,
    handlers: Vec<Subscriber>,
    blocks: Vec<(String, Arc<Mutex<Block>>)>,
}

/// Creates a virtio-blk device per drive, root drive first (so it is /dev/vda), each in its
/// own 4 KiB MMIO window with its own legacy IRQ, notification ioeventfd and interrupt irqfd.
fn attach_drives(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    mmio_bus: &mut Bus,
    drives: &[DriveConfig],
) -> Result<AttachedDrives, BuildError> {
    let mut ordered: Vec<&DriveConfig> = drives.iter().filter(|d| d.is_root_device).collect();
    ordered.extend(drives.iter().filter(|d| !d.is_root_device));
    let mut out = AttachedDrives {
        cmdline_args: Vec::new(),
        acpi_devices: Vec::new(),
        handlers: Vec::new(),
        blocks: Vec::new(),
    };
    for (i, drive) in ordered.into_iter().enumerate() {
        let irq = VIRTIO_IRQ_START + i as u32;
        if irq > VIRTIO_IRQ_END {
            return Err(BuildError::TooManyDevices(
                VIRTIO_IRQ_END - VIRTIO_IRQ_START + 1,
            ));
        }
        let base = MMIO_DEVICES_START + i as u64 * MMIO_WINDOW;
        let block = Block::new(BlockConfig {
            id: drive.drive_id.clone(),
            path: drive.path_on_host.clone().unwrap_or_default(),
            read_only: drive.is_read_only,
            flush: drive.cache_type == CacheType::Writeback,
            async_io: drive.io_engine == IoEngine::Async,
            rate_limiter: drive.rate_limiter.clone(),
        })?;
        log::info!(
            "drive {:?}: {} ({} sectors{}, {} I/O) at {base:#x}, IRQ {irq}",
            drive.drive_id,
            drive.path_on_host.as_deref().unwrap_or(""),
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
        let completion_evt = block
            .completion_eventfd()
            .map(EventFd::try_clone)
            .transpose()
            .map_err(|e| BuildError::EventFd("io_uring completions", e))?;
        let block = Arc::new(Mutex::new(block));
        let queue_evt = eventfd("a virtio queue")?;
        let irqfd = eventfd("a virtio interrupt")?;
        vm.fd
            .register_irqfd(&irqfd, irq)
            .map_err(|e| BuildError::Irqfd("a virtio-blk device", e))?;
        vm.fd
            .register_ioevent(
                &queue_evt,
                &IoEventAddress::Mmio(base + NOTIFY_OFFSET),
                0u32,
            )
            .map_err(BuildError::IoEvent)?;
        let transport = MmioTransport::new(
            block.clone(),
            mem.clone(),
            Arc::new(VirtioInterrupt::new(irqfd)),
            vec![
                queue_evt
                    .try_clone()
                    .map_err(|e| BuildError::EventFd("a virtio queue", e))?,
            ],
        );
        mmio_bus.insert(Arc::new(Mutex::new(transport)), base, MMIO_WINDOW)?;
        out.blocks.push((drive.drive_id.clone(), block.clone()));
        out.handlers.push(Arc::new(Mutex::new(BlockEventHandler {
            block,
            queue_evt,
            completion_evt,
        })));
        out.cmdline_args
            .push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
        out.acpi_devices.push(DsdtDevice::VirtioMmio {
            base,
            len: MMIO_WINDOW,
            irq,
        });
        if drive.is_root_device {
            let root = match &drive.partuuid {
                Some(uuid) => format!("root=PARTUUID={uuid}"),
                None => "root=/dev/vda".to_owned(),
            };
            out.cmdline_args.push(root);
            out.cmdline_args
                .push(if drive.is_read_only { "ro" } else { "rw" }.to_owned());
        }
    }
    Ok(out)
}

fn eventfd(what: &'static str) -> Result<EventFd, BuildError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|e| BuildError::EventFd(what, e))
}

fn boot_timer_hook(start: Option<Instant>) -> Option<Box<dyn FnOnce() + Send>> {
    start.map(|start| {
        Box::new(move || {
            let us = start.elapsed().as_micros();
            log::info!(
                "Guest-boot-time = {us:>6} us {} ms (first serial output)",
                us / 1000
            );
        }) as Box<dyn FnOnce() + Send>
    })
}

/// Loads the kernel, initrd and command line, and writes the boot protocol's structures.
fn load_guest(
    mem: &GuestMemoryMmap,
    files: &mut BootFiles,
    boot: &BootSourceConfig,
    machine: &MachineConfig,
    device_args: &[String],
    virtio_devices: &[DsdtDevice],
) -> Result<(LoadedKernel, u64), BuildError> {
    let mem_bytes = machine.mem_size_bytes();
    let loaded = kernel::load_kernel(mem, &mut files.kernel)?;
    let initrd = files
        .initrd
        .as_mut()
        .map(|f| kernel::load_initrd(mem, f, mem_bytes, loaded.end))
        .transpose()?;
    let mut cmdline = boot.boot_args().to_owned();
    for arg in device_args {
        cmdline.push(' ');
        cmdline.push_str(arg);
    }
    if cmdline.len() > CMDLINE_MAX_LEN {
        return Err(BuildError::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX_LEN,
        });
    }
    let cmdline_len = kernel::load_cmdline(mem, &cmdline)?;
    mptable::write(mem, machine.vcpu_count)?;
    let mut acpi_devices = legacy_acpi_devices();
    acpi_devices.extend_from_slice(virtio_devices);
    let rsdp = acpi::write(
        mem,
        &AcpiConfig {
            vcpu_count: machine.vcpu_count,
            devices: &acpi_devices,
            power: power_registers(),
        },
    )?;
    let boot_info = match loaded.protocol {
        BootProtocol::Linux64 => boot_params::write_zero_page(
            mem,
            &LinuxBootInfo {
                mem_bytes,
                cmdline_len,
                initrd,
                setup_header: loaded.setup_header,
                rsdp_addr: Some(rsdp),
            },
        )?,
        BootProtocol::Pvh => boot_params::write_pvh_start_info(mem, mem_bytes, initrd, Some(rsdp))?,
    };
    log::info!(
        "kernel {} loaded, entry {:#x} ({:?} boot){}",
        boot.kernel_image_path,
        loaded.entry,
        loaded.protocol,
        initrd
            .map(|(a, s)| format!(", initrd {s} bytes at {a:#x}"))
            .unwrap_or_default()
    );
    Ok((loaded, boot_info))
}

/// The legacy devices every VM has, as the DSDT announces them.
fn legacy_acpi_devices() -> Vec<DsdtDevice> {
    vec![
        DsdtDevice::Serial {
            port: COM1_PORT as u16,
            irq: COM1_IRQ,
        },
        DsdtDevice::Keyboard {
            data_port: I8042_DATA_PORT as u16,
            command_port: (I8042_DATA_PORT + 4) as u16,
            irq: I8042_IRQ,
        },
    ]
}

/// The ports of the power-management device, for the FADT.
fn power_registers() -> PowerRegisters {
    PowerRegisters {
        sleep_control: (PM_PORT_START + power::SLEEP_CONTROL) as u16,
        sleep_status: (PM_PORT_START + power::SLEEP_STATUS) as u16,
        reset: (PM_PORT_START + power::RESET) as u16,
        reset_value: power::RESET_VALUE,
    }
}

struct BootFiles {
    kernel: BootFile,
    initrd: Option<BootFile>,
}

/// The part of a VM that depends only on the machine configuration: KVM, the VM with its
/// interrupt controllers, and guest memory registered in its slots. The controller builds it
/// ahead of `InstanceStart` so starting does only what needs the kernel.
pub struct PreparedVm {
    /// What it was built for; see [`PreparedVm::fits`].
    machine: MachineConfig,
    vm: Vm,
    guest_memory: GuestMemoryMmap,
    kvm: KvmContext,
}

impl PreparedVm {
    pub fn new(machine: &MachineConfig) -> Result<Self, BuildError> {
        let kvm = KvmContext::open()?;
        let guest_memory =
            memory::create_guest_memory(machine.mem_size_bytes(), machine.huge_pages)?;
        let vm = Vm::new(&kvm)?;
        // Slots before the irqchip: adding a slot once an in-kernel irqchip exists is much
        // slower (docs/performance.md).
        vm.register_memory(&kvm, &guest_memory, machine.track_dirty_pages)?;
        vm.create_interrupt_controllers()?;
        Ok(PreparedVm {
            machine: machine.clone(),
            vm,
            guest_memory,
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
    }
}

/// Builds a microVM, from `prepared` if it was made for this machine configuration.
pub fn build_microvm(
    boot: &BootSourceConfig,
    machine: &MachineConfig,
    drives: &[DriveConfig],
    prepared: Option<PreparedVm>,
    opts: BuildOptions,
) -> Result<MicroVm, BuildError> {
    // Files first: a wrong path is the user's mistake and should be reported as such even on
    // a host where KVM is unusable.
    let mut files = BootFiles {
        kernel: BootFile::open("kernel image", Path::new(&boot.kernel_image_path))?,
        initrd: boot
            .initrd_path
            .as_deref()
            .map(|p| BootFile::open("initrd", Path::new(p)))
            .transpose()?,
    };
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
    if usize::from(machine.vcpu_count) > kvm.max_vcpus() {
        return Err(BuildError::TooManyVcpus {
            requested: machine.vcpu_count,
            max: kvm.max_vcpus(),
        });
    }

    let mut mmio_bus = Bus::new();
    let attached = attach_drives(&vm, &guest_memory, &mut mmio_bus, drives)?;
    let (loaded, boot_info) = load_guest(
        &guest_memory,
        &mut files,
        boot,
        machine,
        &attached.cmdline_args,
        &attached.acpi_devices,
    )?;

    let stop = opts.stop;
    let serial_irq = eventfd("the serial interrupt")?;
    let serial_input_drained = eventfd("serial input")?;
    vm.fd
        .register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(|e| BuildError::Irqfd("the serial port", e))?;
    let out = ConsoleOutput::new(
        Box::new(std::io::stdout()),
        boot_timer_hook(opts.boot_timer_start),
    );
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        serial_irq,
        serial_input_drained
            .try_clone()
            .map_err(|e| BuildError::EventFd("serial input", e))?,
        out,
    )));
    let kbd_irq = eventfd("the keyboard interrupt")?;
    vm.fd
        .register_irqfd(&kbd_irq, I8042_IRQ)
        .map_err(|e| BuildError::Irqfd("the i8042", e))?;
    let i8042 = Arc::new(Mutex::new(I8042::new(stop.clone(), kbd_irq)));

    let mut pio_bus = Bus::new();
    pio_bus.insert(serial.clone(), COM1_PORT, COM1_LEN)?;
    pio_bus.insert(i8042.clone(), I8042_DATA_PORT, I8042_PORT_LEN)?;
    pio_bus.insert(
        Arc::new(Mutex::new(PowerManagement::new(
            acpi::S5_SLEEP_TYPE,
            stop.clone(),
        ))),
        PM_PORT_START,
        power::PORT_LEN,
    )?;

    let supported_cpuid = kvm.supported_cpuid()?;
    let topology = Topology::new(machine.vcpu_count, machine.smt);
    let mut vcpus = Vec::with_capacity(usize::from(machine.vcpu_count));
    for index in 0..machine.vcpu_count {
        let vcpu = Vcpu::new(&vm, index)?;
        vcpu.configure(
            &guest_memory,
            &supported_cpuid,
            topology,
            &loaded,
            boot_info,
        )?;
        vcpus.push(vcpu);
    }

    Ok(MicroVm {
        vcpus,
        pio_bus: Arc::new(pio_bus),
        mmio_bus: Arc::new(mmio_bus),
        device_handlers: attached.handlers,
        blocks: attached.blocks,
        serial,
        serial_input_drained,
        i8042,
        stop,
        vm,
        guest_memory,
        kvm,
    })
}
