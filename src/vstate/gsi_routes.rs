//! KVM's GSI routing table has one owner. `KVM_SET_GSI_ROUTING` replaces the whole table,
//! so the routes of the interrupt controllers' pins (the in-kernel IOAPIC and PIC, or with
//! the split irqchip the MSI routes that tell KVM which vectors' EOIs ember's I/O APIC
//! needs) and every MSI/MSI-X vector's route are kept here and pushed together each time
//! one of them changes. Forgetting the pins in a pushed table would silently disconnect
//! the serial port and every virtio-mmio device.

use std::collections::BTreeMap;

#[cfg(target_arch = "x86_64")]
use kvm_bindings::{KVM_IRQ_ROUTING_IRQCHIP, kvm_irq_routing_irqchip};
use kvm_bindings::{KVM_IRQ_ROUTING_MSI, kvm_irq_routing_entry, kvm_irq_routing_msi};
use vm_allocator::IdAllocator;

/// The I/O APIC's pins take GSIs 0-23; MSI vectors get the numbers above.
pub const FIRST_MSI_GSI: u32 = 24;
/// KVM accepts GSIs below `KVM_MAX_IRQ_ROUTES` (4096).
pub const LAST_MSI_GSI: u32 = 4095;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GsiRoutesError {
    #[error(
        "no interrupt number left for another MSI vector ({FIRST_MSI_GSI}-{LAST_MSI_GSI} taken)"
    )]
    Exhausted,
}

/// One MSI message: where the device writes and what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// The routing table as ember means it to be.
pub struct GsiRoutes {
    /// The interrupt controllers' own routes.
    pins: Vec<kvm_irq_routing_entry>,
    /// MSI vectors' routes by GSI. A GSI allocated but without a message has no route:
    /// its irqfd then injects nothing.
    msi: BTreeMap<u32, MsiMessage>,
    gsis: IdAllocator,
}

impl GsiRoutes {
    /// The table KVM starts with for its in-kernel irqchip (virt/kvm/irqchip.c's default
    /// routing on x86): GSIs 0-15 reach both the PICs and the I/O APIC, 16-23 the I/O APIC.
    #[cfg(target_arch = "x86_64")]
    pub fn in_kernel_irqchip() -> Self {
        use kvm_bindings::{KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE};
        let mut pins = Vec::new();
        for gsi in 0..FIRST_MSI_GSI {
            if gsi < 16 {
                let chip = if gsi < 8 {
                    KVM_IRQCHIP_PIC_MASTER
                } else {
                    KVM_IRQCHIP_PIC_SLAVE
                };
                pins.push(irqchip_entry(gsi, chip, gsi % 8));
            }
            pins.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        Self::with_pins(pins)
    }

    /// The split irqchip's table starts empty: ember's I/O APIC adds its pins' routes.
    pub fn split_irqchip() -> Self {
        Self::with_pins(Vec::new())
    }

    fn with_pins(pins: Vec<kvm_irq_routing_entry>) -> Self {
        GsiRoutes {
            pins,
            msi: BTreeMap::new(),
            // The range is a constant that is valid.
            gsis: IdAllocator::new(FIRST_MSI_GSI, LAST_MSI_GSI)
                .unwrap_or_else(|_| unreachable!("a fixed, non-empty range")),
        }
    }

    /// Replaces the pins' routes with MSI routes (gsi, message): the split irqchip's I/O
    /// APIC, whose redirection entries KVM needs to know to report EOIs.
    pub fn set_pin_messages(&mut self, routes: &[(u32, MsiMessage)]) {
        self.pins = routes.iter().map(|&(gsi, m)| msi_entry(gsi, m)).collect();
    }

    /// A GSI for a new MSI vector, without a route yet.
    pub fn allocate(&mut self) -> Result<u32, GsiRoutesError> {
        self.gsis
            .allocate_id()
            .map_err(|_| GsiRoutesError::Exhausted)
    }

    /// Gives `gsi` back; its route goes too.
    pub fn free(&mut self, gsi: u32) {
        self.msi.remove(&gsi);
        let _ = self.gsis.free_id(gsi);
    }

    /// Routes `gsi` to `message`, or (None) nowhere. True if the table changed.
    pub fn set_msi(&mut self, gsi: u32, message: Option<MsiMessage>) -> bool {
        match message {
            Some(m) => self.msi.insert(gsi, m) != Some(m),
            None => self.msi.remove(&gsi).is_some(),
        }
    }

    /// The whole table to push: the pins' routes, then every MSI route.
    pub fn table(&self) -> Vec<kvm_irq_routing_entry> {
        let mut table = self.pins.clone();
        table.extend(self.msi.iter().map(|(&gsi, &m)| msi_entry(gsi, m)));
        table
    }
}

#[cfg(target_arch = "x86_64")]
fn irqchip_entry(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip = kvm_irq_routing_irqchip { irqchip, pin };
    e
}

fn msi_entry(gsi: u32, m: MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi = kvm_irq_routing_msi {
        address_lo: m.address as u32,
        address_hi: (m.address >> 32) as u32,
        data: m.data,
        ..Default::default()
    };
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (gsi, type, irqchip or address_lo, pin or data) of each entry.
    fn summary(table: &[kvm_irq_routing_entry]) -> Vec<(u32, u32, u32, u32)> {
        table
            .iter()
            .map(|e| {
                // SAFETY: the union member read is the one `type_` says was written.
                let (a, b) = unsafe {
                    if e.type_ == KVM_IRQ_ROUTING_MSI {
                        (e.u.msi.address_lo, e.u.msi.data)
                    } else {
                        (e.u.irqchip.irqchip, e.u.irqchip.pin)
                    }
                };
                (e.gsi, e.type_, a, b)
            })
            .collect()
    }

    const MSG: MsiMessage = MsiMessage {
        address: 0xfee0_0000,
        data: 0x41,
    };

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn msi_routes_never_push_out_the_in_kernel_pins() {
        let mut routes = GsiRoutes::in_kernel_irqchip();
        let pins = routes.table();
        // 16 PIC entries and 24 I/O APIC entries, as KVM's default table.
        assert_eq!(pins.len(), 40);
        let gsi = routes.allocate().unwrap();
        assert_eq!(gsi, FIRST_MSI_GSI);
        assert!(routes.set_msi(gsi, Some(MSG)));
        assert!(
            !routes.set_msi(gsi, Some(MSG)),
            "the same message is no change"
        );
        let table = summary(&routes.table());
        assert_eq!(&table[..40], &summary(&pins)[..]);
        assert_eq!(table[40], (gsi, KVM_IRQ_ROUTING_MSI, 0xfee0_0000, 0x41));
        // The serial port's GSI 4 still reaches the master PIC's pin 4 and the I/O APIC's.
        assert!(table.contains(&(4, KVM_IRQ_ROUTING_IRQCHIP, 0, 4)));
        assert!(table.contains(&(4, KVM_IRQ_ROUTING_IRQCHIP, 2, 4)));
        assert!(table.contains(&(23, KVM_IRQ_ROUTING_IRQCHIP, 2, 23)));
        // Taking the route away leaves the pins.
        assert!(routes.set_msi(gsi, None));
        assert_eq!(summary(&routes.table()), summary(&pins));
    }

    #[test]
    fn split_pins_and_msi_routes_are_pushed_together() {
        let mut routes = GsiRoutes::split_irqchip();
        let a = routes.allocate().unwrap();
        let b = routes.allocate().unwrap();
        routes.set_msi(b, Some(MSG));
        routes.set_pin_messages(&[(
            4,
            MsiMessage {
                address: 0xfee0_1000,
                data: 0x30,
            },
        )]);
        assert_eq!(
            summary(&routes.table()),
            vec![
                (4, KVM_IRQ_ROUTING_MSI, 0xfee0_1000, 0x30),
                (b, KVM_IRQ_ROUTING_MSI, 0xfee0_0000, 0x41),
            ]
        );
        // A freed GSI loses its route and is handed out again.
        routes.set_msi(a, Some(MSG));
        routes.free(a);
        assert_eq!(routes.table().len(), 2);
        assert_eq!(routes.allocate().unwrap(), a);
    }

    #[test]
    fn gsis_run_out_with_a_clear_error() {
        let mut routes = GsiRoutes::split_irqchip();
        for _ in FIRST_MSI_GSI..=LAST_MSI_GSI {
            routes.allocate().unwrap();
        }
        assert_eq!(routes.allocate(), Err(GsiRoutesError::Exhausted));
    }
}
