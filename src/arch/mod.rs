//! Architecture-specific guest set-up behind one interface, so the rest of ember (the VM,
//! the vCPUs, the builder, guest memory) never names an architecture: each supported one
//! provides the items re-exported below under the same names.
//!
//! - `layout`: where RAM, device windows and legacy devices live (`ram_ranges`,
//!   `VIRTIO_MMIO_START`/`_END`, `DEVICE_IRQ_FIRST`/`_LAST`, ...);
//! - `setup_vm`, `create_interrupt_controllers`, `ArchVmError`: the VM before its vCPUs;
//! - `load_guest`, `BootSpec`, `BootState`, `BootError`, `CMDLINE_MAX_LEN`: kernel, initrd,
//!   command line and firmware tables in guest memory;
//! - `configure_vcpu`, `VcpuSetupError`, `fault_state`, `instruction_pointer`: vCPU state.

#[cfg(target_arch = "x86_64")]
pub mod x86_64;

// arm64's device tree, layout and Image header are plain data: x86_64 test builds compile
// them too, so their tests run on every CI host.
#[cfg(any(target_arch = "aarch64", all(test, target_arch = "x86_64")))]
pub mod aarch64;

#[cfg(target_arch = "x86_64")]
pub use x86_64::{
    ArchVmError, BootError, BootState, CMDLINE_MAX_LEN, InterruptControllers, REQUIRED_KVM_CAPS,
    VcpuSetupError, configure_vcpu, create_interrupt_controllers, fault_state,
    finish_interrupt_controllers, instruction_pointer, layout, load_guest, setup_vm,
};

#[cfg(target_arch = "aarch64")]
pub use aarch64::{
    ArchVmError, BootError, BootState, CMDLINE_MAX_LEN, InterruptControllers, REQUIRED_KVM_CAPS,
    VcpuSetupError, configure_vcpu, create_interrupt_controllers, fault_state,
    finish_interrupt_controllers, init_vcpu, instruction_pointer, layout, load_guest, setup_vm,
};

/// What the guest boots from and the machine it boots on.
pub struct BootSpec<'a> {
    pub kernel: &'a mut crate::host_file::HostFile,
    pub initrd: Option<&'a mut crate::host_file::HostFile>,
    pub cmdline: &'a str,
    pub mem_bytes: u64,
    pub vcpu_count: u8,
    /// Every device the firmware tables (ACPI, the device tree) announce.
    pub devices: &'a [PlatformDevice],
    /// The interrupt controllers as created: on x86_64 whether 8259s exist (the MADT says
    /// so), on arm64 the GIC generation (the device tree's node).
    pub irqchip: crate::config::Irqchip,
}

/// A device the firmware tables (ACPI on x86_64, the device tree on arm64) announce to the
/// guest, as the device manager placed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlatformDevice {
    /// A 16550 UART at I/O port `port` (8 ports) on interrupt `irq`.
    Serial { port: u16, irq: u32 },
    /// A 16550 UART on the MMIO bus (byte-wide registers from `base`), on interrupt `irq`.
    MmioSerial { base: u64, irq: u32 },
    /// A PL031 real-time clock at `base`, on interrupt `irq`.
    Rtc { base: u64, irq: u32 },
    /// An i8042 keyboard controller: data and command ports, interrupt.
    Keyboard {
        data_port: u16,
        command_port: u16,
        irq: u32,
    },
    /// The ACPI power-management registers (I/O ports) and the values they take.
    PowerManagement {
        sleep_control: u16,
        sleep_status: u16,
        reset: u16,
        reset_value: u8,
        s5_sleep_type: u8,
    },
    /// A virtio-mmio transport: its register window and its interrupt.
    VirtioMmio { base: u64, len: u64, irq: u32 },
    /// The PCI root complex: bus 0's ECAM window and the windows BARs are placed in.
    PciRoot(PciWindows),
    /// A function on the root's bus that raises INTx: which GSI its pin is wired to.
    PciIntx(PciIntx),
}

/// How one slot's INTx pin reaches the interrupt controller: no bridges and no sharing,
/// each function that uses INTx has a GSI of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIntx {
    /// The device number on bus 0.
    pub slot: u8,
    /// The interrupt pin register's value: 1 = INTA# .. 4 = INTD#.
    pub pin: u8,
    pub gsi: u32,
}

/// Where a PCI root complex's guest-visible ranges are: (start, length) each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciWindows {
    pub ecam: (u64, u64),
    pub mmio32: (u64, u64),
    pub mmio64: (u64, u64),
}
