//! The address ranges and interrupt lines devices get, handed out by `vm-allocator`, so no
//! device computes where it lives from an index and a device that goes away gives its
//! resources back.

use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator, RangeInclusive};

use crate::arch::layout::{DEVICE_IRQ_FIRST, DEVICE_IRQ_LAST, VIRTIO_MMIO_END, VIRTIO_MMIO_START};

#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error(
        "no room for another {size:#x}-byte device window (all of {start:#x}-{end:#x} is taken)"
    )]
    NoMmioWindow { size: u64, start: u64, end: u64 },
    #[error("no interrupt line left for another device ({first}-{last} are all taken)")]
    NoIrq { first: u32, last: u32 },
    #[error("interrupt lines {first}-{last} are already given to devices")]
    IrqsTaken { first: u32, last: u32 },
}

/// One device's share: its MMIO window and its interrupt line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceSlot {
    pub base: u64,
    pub len: u64,
    pub irq: u32,
}

pub struct DeviceResources {
    mmio: AddressAllocator,
    irqs: IdAllocator,
}

impl DeviceResources {
    pub fn new() -> Self {
        DeviceResources {
            // The layout's constants are valid ranges (checked in the layout's tests).
            mmio: AddressAllocator::new(VIRTIO_MMIO_START, VIRTIO_MMIO_END - VIRTIO_MMIO_START)
                .expect("the virtio-mmio range in the layout is valid"),
            irqs: IdAllocator::new(DEVICE_IRQ_FIRST, DEVICE_IRQ_LAST)
                .expect("the device interrupt range in the layout is valid"),
        }
    }

    /// A window of `size` bytes (aligned to its size) and an interrupt line, lowest first,
    /// so devices attached in order get increasing addresses and lines.
    pub fn allocate(&mut self, size: u64) -> Result<DeviceSlot, ResourceError> {
        let irq = self.irqs.allocate_id().map_err(|_| ResourceError::NoIrq {
            first: DEVICE_IRQ_FIRST,
            last: DEVICE_IRQ_LAST,
        })?;
        let window = match self.mmio.allocate(size, size, AllocPolicy::FirstMatch) {
            Ok(w) => w,
            Err(_) => {
                let _ = self.irqs.free_id(irq);
                return Err(ResourceError::NoMmioWindow {
                    size,
                    start: VIRTIO_MMIO_START,
                    end: VIRTIO_MMIO_END,
                });
            }
        };
        Ok(DeviceSlot {
            base: window.start(),
            len: size,
            irq,
        })
    }

    /// Takes lines `first..=last` for a fixed use (the PCI root's INTx lines) so no device
    /// is given one later. Fails if a device holds one of them already.
    pub fn take_irqs(&mut self, first: u32, last: u32) -> Result<(), ResourceError> {
        let wanted = (first..=last)
            .filter(|&id| !self.irqs.is_allocated(id))
            .count();
        if wanted != (first..=last).count() {
            return Err(ResourceError::IrqsTaken { first, last });
        }
        // The allocator hands out the lowest free line: take lines until the range is
        // ours, then give the others back.
        let mut others = Vec::new();
        let mut got = 0;
        while got < wanted {
            match self.irqs.allocate_id() {
                Ok(id) if (first..=last).contains(&id) => got += 1,
                Ok(id) => others.push(id),
                Err(_) => break,
            }
        }
        for id in others {
            let _ = self.irqs.free_id(id);
        }
        if got == wanted {
            Ok(())
        } else {
            Err(ResourceError::IrqsTaken { first, last })
        }
    }

    /// Gives a device's share back.
    pub fn free(&mut self, slot: DeviceSlot) {
        if let Ok(r) = RangeInclusive::new(slot.base, slot.base + slot.len - 1) {
            let _ = self.mmio.free(&r);
        }
        let _ = self.irqs.free_id(slot.irq);
    }
}

impl Default for DeviceResources {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_and_irqs_increase_and_never_overlap() {
        let mut r = DeviceResources::new();
        let a = r.allocate(0x1000).unwrap();
        let b = r.allocate(0x1000).unwrap();
        assert_eq!((a.base, a.irq), (VIRTIO_MMIO_START, DEVICE_IRQ_FIRST));
        assert_eq!(
            (b.base, b.irq),
            (VIRTIO_MMIO_START + 0x1000, DEVICE_IRQ_FIRST + 1)
        );
    }

    #[test]
    fn irqs_run_out_with_a_clear_error_and_come_back_when_freed() {
        let mut r = DeviceResources::new();
        let n = DEVICE_IRQ_LAST - DEVICE_IRQ_FIRST + 1;
        let slots: Vec<DeviceSlot> = (0..n).map(|_| r.allocate(0x1000).unwrap()).collect();
        let err = r.allocate(0x1000).unwrap_err();
        assert!(matches!(err, ResourceError::NoIrq { .. }), "{err}");
        r.free(slots[3]);
        let again = r.allocate(0x1000).unwrap();
        assert_eq!(again, slots[3], "the freed window and line are reused");
    }

    #[test]
    fn a_failed_window_gives_its_irq_back() {
        let mut r = DeviceResources::new();
        let too_big = VIRTIO_MMIO_END - VIRTIO_MMIO_START + 0x1000;
        assert!(matches!(
            r.allocate(too_big.next_power_of_two()),
            Err(ResourceError::NoMmioWindow { .. })
        ));
        assert_eq!(r.allocate(0x1000).unwrap().irq, DEVICE_IRQ_FIRST);
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn lines_taken_for_pci_intx_are_never_given_to_a_device() {
        let mut r = DeviceResources::new();
        let first = r.allocate(0x1000).unwrap();
        r.take_irqs(20, 23).unwrap();
        let mut given = vec![first.irq];
        while let Ok(slot) = r.allocate(0x1000) {
            given.push(slot.irq);
        }
        assert_eq!(given, (DEVICE_IRQ_FIRST..20).collect::<Vec<_>>());
        // Held by a device already: refused.
        let mut r = DeviceResources::new();
        for _ in 0..16 {
            r.allocate(0x1000).unwrap();
        }
        assert!(matches!(
            r.take_irqs(20, 23),
            Err(ResourceError::IrqsTaken { .. })
        ));
    }
}
