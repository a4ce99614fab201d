//! arm64 guests: memory layout, the Image boot protocol, the device tree, the vGIC and
//! vCPU state (docs/aarch64.md). The layout, the device tree and the Image header are plain
//! data and also build, with their tests, in x86_64 test builds.

pub mod fdt;
pub mod kernel;
pub mod layout;

#[cfg(target_arch = "aarch64")]
pub mod boot;
#[cfg(target_arch = "aarch64")]
pub mod gic;
#[cfg(target_arch = "aarch64")]
pub mod regs;
#[cfg(target_arch = "aarch64")]
pub mod vm;

#[cfg(target_arch = "aarch64")]
pub use boot::{
    BootError, BootState, CMDLINE_MAX_LEN, VcpuSetupError, configure_vcpu, fault_state, init_vcpu,
    instruction_pointer, load_guest,
};
#[cfg(target_arch = "aarch64")]
pub use vm::{
    ArchVmError, InterruptControllers, create_interrupt_controllers, finish_interrupt_controllers,
    setup_vm,
};
