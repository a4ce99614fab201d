//! PCI passthrough: a host function bound to `vfio-pci` becomes a function on the guest's
//! PCI bus. Its DMA reaches guest RAM through the IOMMU (every RAM region mapped at its
//! guest physical address), its BARs are mapped into the guest as KVM memory slots, and
//! its MSI-X vectors signal the eventfds of KVM irqfds directly, so neither DMA, BAR
//! accesses nor interrupts pass through ember on the fast path.
//!
//! - [`backend`]: the seam (what ember asks of a function and of the IOMMU);
//! - [`function`]: the function as the guest sees it (configuration space, BARs, MSI-X);
//! - [`host`]: the kernel's VFIO objects, and the checks that explain a host that cannot
//!   pass a function through.
//!
//! docs/vfio.md is the operator's guide.

pub mod backend;
pub mod function;
pub mod host;

#[cfg(test)]
pub mod fake;

use crate::devices::pci::msix::VectorSink;
use crate::vstate::gsi_routes::MsiMessage;
use crate::vstate::vm::MsiVector;

pub use backend::{DmaMapper, RegionInfo, VfioBackend, map_guest_memory};
pub use function::{GuestMapper, IntxLine, PassthroughVector, VfioFunctionError, VfioPciFunction};
pub use host::{HostContainer, HostFunction, VfioHostError};

/// An MSI-X vector of a passed-through function. The device signals the irqfd's eventfd
/// itself, so a vector the guest masks is held back here by disconnecting the irqfd: the
/// eventfd keeps counting (the PBA shows it pending) and KVM delivers it when the guest
/// unmasks, so no interrupt is lost and none arrives while masked.
pub struct GatedVector(pub MsiVector);

impl VectorSink for GatedVector {
    fn route(&self, message: Option<MsiMessage>, masked: bool) -> std::io::Result<()> {
        // Disconnect before the route changes, connect after: never deliver to a stale
        // message or while masked.
        if masked || message.is_none() {
            self.0.connect(false)?;
        }
        self.0.route(message)?;
        if !masked && message.is_some() {
            // KVM injects what is pending when an irqfd is connected but leaves the
            // counter set, which would show as pending the next time the guest masks the
            // vector: take the count and signal once more, which KVM consumes.
            let held = self.0.eventfd().read().is_ok();
            self.0.connect(true)?;
            if held {
                self.0.trigger()?;
            }
        }
        Ok(())
    }

    fn trigger(&self) -> std::io::Result<()> {
        self.0.trigger()
    }

    fn pending(&self) -> bool {
        // Readable means signalled and not yet consumed by KVM: held back while masked.
        let mut fds = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(self.0.eventfd()),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no timeout.
        let n = unsafe { libc::poll(&mut fds, 1, 0) };
        n > 0 && fds.revents & libc::POLLIN != 0
    }
}

// MSI-X vectors on ember's I/O APIC's VM: x86_64.
#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::config::Irqchip;
    use crate::vstate::kvm::KvmContext;
    use crate::vstate::vm::Vm;

    /// What the device does: signal the vector's eventfd itself.
    fn device_signals(v: &GatedVector) {
        v.0.eventfd().write(1).unwrap();
    }

    /// Whether KVM took the signal (the counter is read by the connected irqfd).
    fn consumed_by_kvm(v: &GatedVector) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while std::time::Instant::now() < deadline {
            if !v.pending() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn a_masked_vector_holds_the_device_s_interrupt_until_unmasked() {
        let mut vm = Vm::new(&KvmContext::open().unwrap()).unwrap();
        vm.create_interrupt_controllers(Irqchip::Split).unwrap();
        let v = GatedVector(vm.msi_vector("test").unwrap());
        let m = MsiMessage {
            address: 0xfee0_0000,
            data: 0x45,
        };
        v.route(Some(m), false).unwrap();
        device_signals(&v);
        assert!(consumed_by_kvm(&v), "a live vector goes straight to KVM");
        // Masked: the signal stays in the eventfd, where the PBA sees it.
        v.route(Some(m), true).unwrap();
        device_signals(&v);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(v.pending(), "held while masked");
        // Unmasked: delivered, and nothing is left to show as pending later.
        v.route(Some(m), false).unwrap();
        assert!(consumed_by_kvm(&v));
        v.route(Some(m), true).unwrap();
        assert!(!v.pending(), "no stale pending bit after delivery");
        // Routed nowhere (MSI-X off): held too.
        v.route(None, false).unwrap();
        device_signals(&v);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(v.pending());
    }
}
