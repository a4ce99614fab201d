//! The platform devices a Linux guest expects: a 16550 UART; on x86_64 the i8042 keyboard
//! controller, the I/O APIC and the ACPI power-management registers; on arm64 a PL031 RTC.

pub mod i8042;
pub mod ioapic;
pub mod power;
pub mod rtc;
pub mod serial;

use vmm_sys_util::eventfd::EventFd;

use crate::vstate::vm::Irqfd;

/// Something that raises an interrupt: in a VM an irqfd, which KVM turns into the guest
/// interrupt without the VMM taking part; in tests a plain eventfd to watch.
pub trait Line: Send + Sync {
    /// The source has an interrupt to give.
    fn raise(&self) -> std::io::Result<()>;
    /// The source has none left (its driver acknowledged them): a level-triggered line
    /// goes low. An irqfd only carries edges, so for it this does nothing.
    fn lower(&self) {}
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

/// Legacy (ISA) interrupts are edges: each trigger is a pulse, so a pin the guest made
/// level-triggered by mistake does not fire again on every EOI.
impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        let raised = self.0.raise();
        self.0.lower();
        raised
    }
}

impl Line for std::sync::Arc<dyn Line> {
    fn raise(&self) -> std::io::Result<()> {
        (**self).raise()
    }

    fn lower(&self) {
        (**self).lower()
    }
}

impl Line for Box<dyn Line> {
    fn raise(&self) -> std::io::Result<()> {
        (**self).raise()
    }

    fn lower(&self) {
        (**self).lower()
    }
}
