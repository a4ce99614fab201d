//! x86_64 guests: memory layout, boot protocol, CPU state.

pub mod acpi;
pub mod boot_params;
pub mod cpuid;
pub mod interrupts;
pub mod kernel;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
