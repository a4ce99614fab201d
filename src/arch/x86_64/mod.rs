//! x86_64 guests: memory layout, boot protocol, CPU state, firmware tables.

pub mod acpi;
pub mod boot;
pub mod boot_params;
pub mod cpuid;
pub mod interrupts;
pub mod kernel;
pub mod kernel_check;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
pub mod vm;

pub use boot::{
    BootError, BootState, VcpuSetupError, configure_vcpu, fault_state, instruction_pointer,
    load_guest,
};
pub use kernel::CMDLINE_MAX_LEN;
pub use vm::{
    ArchVmError, InterruptControllers, create_interrupt_controllers, finish_interrupt_controllers,
    setup_vm,
};
