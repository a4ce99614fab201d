//! The PC devices a Linux guest expects: a 16550 UART, the i8042 keyboard controller, and
//! the ACPI power-management registers.

pub mod i8042;
pub mod power;
pub mod serial;

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line driven through an eventfd that KVM turns into a guest interrupt
/// (an irqfd), so raising it never takes a lock or a syscall on the VM's behalf.
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
