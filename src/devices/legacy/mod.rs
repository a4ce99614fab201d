//! The PC devices a Linux guest expects: a 16550 UART, the i8042 keyboard controller, and
//! the ACPI power-management registers.

pub mod i8042;
pub mod power;
pub mod serial;

use vmm_sys_util::eventfd::EventFd;

use crate::vstate::vm::Irqfd;

/// Something that raises an interrupt: in a VM an irqfd, which KVM turns into the guest
/// interrupt without the VMM taking part; in tests a plain eventfd to watch.
pub trait Line: Send {
    fn raise(&self) -> std::io::Result<()>;
}

impl Line for Irqfd {
    fn raise(&self) -> std::io::Result<()> {
        self.trigger()
    }
}

impl Line for EventFd {
    fn raise(&self) -> std::io::Result<()> {
        self.write(1)
    }
}

/// The interrupt line of a legacy device.
pub struct IrqLine(pub Box<dyn Line>);

impl IrqLine {
    pub fn new(line: impl Line + 'static) -> Self {
        IrqLine(Box::new(line))
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.raise()
    }
}
