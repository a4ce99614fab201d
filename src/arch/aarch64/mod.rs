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

/// What an arm64 VM needs: the vGIC as a KVM device, PSCI 0.2 in the vCPUs, one-register
/// access, irqfds and ioeventfds for the devices.
#[cfg(target_arch = "aarch64")]
pub const REQUIRED_KVM_CAPS: &[(kvm_ioctls::Cap, &str)] = &[
    (kvm_ioctls::Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (kvm_ioctls::Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (kvm_ioctls::Cap::Irqfd, "KVM_CAP_IRQFD"),
    (kvm_ioctls::Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (kvm_ioctls::Cap::DeviceCtrl, "KVM_CAP_DEVICE_CTRL"),
    (kvm_ioctls::Cap::ArmPsci02, "KVM_CAP_ARM_PSCI_0_2"),
    (kvm_ioctls::Cap::OneReg, "KVM_CAP_ONE_REG"),
    (kvm_ioctls::Cap::MpState, "KVM_CAP_MP_STATE"),
    (kvm_ioctls::Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];
