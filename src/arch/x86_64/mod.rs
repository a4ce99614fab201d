//! x86_64 guests: memory layout, boot protocol, CPU state, firmware tables.

pub mod acpi;
pub mod boot;
pub mod boot_params;
pub mod cpu_template;
pub mod cpuid;
pub mod interrupts;
pub mod kernel;
pub mod kernel_check;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
pub mod state;
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

/// Every capability ember uses, with the name an operator can look up. KVM_CAP_XCRS is not
/// among them: KVM offers it only on hosts with XSAVE, and a VM runs without it (its guest
/// then has no XSAVE either); saving a VM's state will read the XCRs only where it exists.
pub const REQUIRED_KVM_CAPS: &[(kvm_ioctls::Cap, &str)] = &[
    (kvm_ioctls::Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (kvm_ioctls::Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (kvm_ioctls::Cap::Irqfd, "KVM_CAP_IRQFD"),
    (kvm_ioctls::Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (kvm_ioctls::Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (
        kvm_ioctls::Cap::SetIdentityMapAddr,
        "KVM_CAP_SET_IDENTITY_MAP_ADDR",
    ),
    (kvm_ioctls::Cap::Pit2, "KVM_CAP_PIT2"),
    (kvm_ioctls::Cap::PitState2, "KVM_CAP_PIT_STATE2"),
    (kvm_ioctls::Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (kvm_ioctls::Cap::MpState, "KVM_CAP_MP_STATE"),
    (kvm_ioctls::Cap::IrqRouting, "KVM_CAP_IRQ_ROUTING"),
    (kvm_ioctls::Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
    (kvm_ioctls::Cap::Debugregs, "KVM_CAP_DEBUGREGS"),
    (kvm_ioctls::Cap::Xsave, "KVM_CAP_XSAVE"),
    (kvm_ioctls::Cap::AdjustClock, "KVM_CAP_ADJUST_CLOCK"),
    (
        kvm_ioctls::Cap::TscDeadlineTimer,
        "KVM_CAP_TSC_DEADLINE_TIMER",
    ),
    (kvm_ioctls::Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];
