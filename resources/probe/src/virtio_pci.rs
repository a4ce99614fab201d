//! The virtio PCI transport, modern (virtio 1.2, 4.1): finding a virtio-pci function's
//! structures through its vendor-specific capabilities, the common configuration registers,
//! queue notifications, and MSI-X (PCI 3.0, 6.8.2) in place of an interrupt line.
//!
//! The probe never takes interrupts (they would triple-fault it here), so it watches MSI-X
//! through the pending bit array: its vector stays masked, the VMM must then hold each
//! interrupt pending (the PBA bit set) instead of sending it, and unmasking must send it
//! (to the local APIC, whose IRR shows it) and clear the bit. Each request's interrupt is
//! seen that way, and every step depends on the VMM honouring the table the probe wrote.

use crate::line::Detail;
use crate::pci::ecam_addr;
use crate::phys;
use crate::timeout::{self, Deadline};
use crate::virtio_mmio::{INTERRUPT_TICKS, POLL_GAP_TICKS};

pub const VENDOR_VIRTIO: u32 = 0x1af4;
/// Modern device IDs: 0x1040 plus the virtio device type (2, block).
pub const DEVICE_BLOCK: u32 = 0x1042;

// Configuration space registers.
/// The command register; the status register is the upper half of its dword.
const COMMAND: u64 = 0x04;
const BAR0: u64 = 0x10;
const CAPABILITIES_POINTER: u64 = 0x34;
const COMMAND_MEMORY: u32 = 1 << 1;
const COMMAND_BUS_MASTER: u32 = 1 << 2;
const STATUS_CAPABILITIES: u32 = 1 << 4;
const CAP_VENDOR: u8 = 0x09;
const CAP_MSIX: u8 = 0x11;

// virtio_pci_cap cfg_type values (4.1.4).
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_DEVICE: u8 = 4;

// Common configuration structure offsets (4.1.4.3).
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;
const NO_VECTOR: u16 = 0xffff;

/// MSI-X: message control's enable bit, a table entry's vector control mask bit.
const MSIX_ENABLE: u16 = 1 << 15;
const VECTOR_MASKED: u32 = 1;
/// The message the probe programs: fixed delivery of this vector to APIC ID 0.
pub const MSI_ADDRESS: u32 = 0xfee0_0000;
pub const MSI_VECTOR: u32 = 0x40;
/// The local APIC's interrupt request register for MSI_VECTOR (xAPIC MMIO), and its
/// spurious-interrupt vector register, whose bit 8 enables it in software.
const APIC_IRR: u64 = 0xfee0_0200 + 0x10 * (MSI_VECTOR as u64 / 32);
const APIC_SVR: u64 = 0xfee0_00f0;
const APIC_SOFTWARE_ENABLE: u32 = 1 << 8;

/// Where the function's structures are, once its BAR is placed and decoding.
#[derive(Clone, Copy)]
pub struct PciTransport {
    common: u64,
    notify: u64,
    notify_multiplier: u32,
    device_config: u64,
    table: u64,
    pba: u64,
}

/// What [`PciTransport::setup`] found, for the probe's report.
pub struct Layout {
    pub bar: u64,
    pub vectors: u16,
}

impl PciTransport {
    /// Places the function's BAR 0 at `bar` (the guest moves it from where the VMM put
    /// it, as firmware may), turns on memory decode and bus mastering, finds the common,
    /// notify and device structures and the MSI-X table, programs MSI-X vector 0 masked and
    /// enables MSI-X. `bar` must be in the uncached identity map and aligned to the BAR's
    /// size.
    pub fn setup(ecam: u64, device: u64, bar: u64, d: &mut Detail) -> Option<(Self, Layout)> {
        let cfg = |reg| ecam_addr(ecam, device, reg);
        let low = phys::read_u32(cfg(BAR0));
        if low & 0b111 != 0b100 {
            d.str(b"BAR 0 is not a 64-bit memory BAR: ").hex(low.into());
            return None;
        }
        // Sizing protocol: all ones, read the mask back, then the new address.
        phys::write_u32(cfg(BAR0), u32::MAX);
        phys::write_u32(cfg(BAR0 + 4), u32::MAX);
        let mask = (u64::from(phys::read_u32(cfg(BAR0 + 4))) << 32)
            | u64::from(phys::read_u32(cfg(BAR0)) & !0xf);
        let size = (!mask).wrapping_add(1);
        phys::write_u32(cfg(BAR0), bar as u32);
        phys::write_u32(cfg(BAR0 + 4), (bar >> 32) as u32);
        let placed = u64::from(phys::read_u32(cfg(BAR0)) & !0xf)
            | (u64::from(phys::read_u32(cfg(BAR0 + 4))) << 32);
        if placed != bar || !size.is_power_of_two() || bar % size != 0 {
            d.str(b"BAR 0 size ")
                .hex(size)
                .str(b" placed at ")
                .hex(placed);
            return None;
        }
        phys::write_u32(cfg(COMMAND), COMMAND_MEMORY | COMMAND_BUS_MASTER);

        let mut common = None;
        let mut notify = None;
        let mut device_config = None;
        let mut msix = None;
        if phys::read_u32(cfg(COMMAND)) >> 16 & STATUS_CAPABILITIES == 0 {
            d.str(b"no capability list");
            return None;
        }
        let mut at = u64::from(phys::read_u8(cfg(CAPABILITIES_POINTER)) & !3);
        let mut seen = 0;
        while at >= 0x40 && seen < 48 {
            seen += 1;
            let id = phys::read_u8(cfg(at));
            if id == CAP_VENDOR {
                let kind = phys::read_u8(cfg(at + 3));
                let which = phys::read_u8(cfg(at + 4));
                let offset = u64::from(phys::read_u32(cfg(at + 8)));
                let here = (which == 0).then_some(bar + offset);
                match kind {
                    CFG_COMMON if common.is_none() => common = here,
                    CFG_NOTIFY if notify.is_none() => {
                        notify = here.map(|a| (a, phys::read_u32(cfg(at + 16))));
                    }
                    CFG_DEVICE if device_config.is_none() => device_config = here,
                    _ => {}
                }
            } else if id == CAP_MSIX {
                msix = Some(at);
            }
            at = u64::from(phys::read_u8(cfg(at + 1)) & !3);
        }
        let (Some(common), Some((notify, notify_multiplier)), Some(device_config), Some(cap)) =
            (common, notify, device_config, msix)
        else {
            d.str(b"missing a structure: common/notify/device/msix=");
            for found in [
                common.is_some(),
                notify.is_some(),
                device_config.is_some(),
                msix.is_some(),
            ] {
                d.dec(u64::from(found));
            }
            return None;
        };
        let control = phys::read_u16(cfg(cap + 2));
        let vectors = (control & 0x7ff) + 1;
        let table = phys::read_u32(cfg(cap + 4));
        let pba = phys::read_u32(cfg(cap + 8));
        if table & 7 != 0 || pba & 7 != 0 {
            d.str(b"MSI-X structures outside BAR 0");
            return None;
        }
        let t = PciTransport {
            common,
            notify,
            notify_multiplier,
            device_config,
            table: bar + u64::from(table),
            pba: bar + u64::from(pba),
        };
        // Vector 0: the probe's message, masked; then MSI-X on.
        phys::write_u32(t.table, MSI_ADDRESS);
        phys::write_u32(t.table + 4, 0);
        phys::write_u32(t.table + 8, MSI_VECTOR);
        phys::write_u32(t.table + 12, VECTOR_MASKED);
        write_u16(cfg(cap + 2), control | MSIX_ENABLE);
        if phys::read_u16(cfg(cap + 2)) & MSIX_ENABLE == 0 {
            d.str(b"MSI-X enable did not stick");
            return None;
        }
        Some((t, Layout { bar, vectors }))
    }

    pub fn status(&self) -> u32 {
        phys::read_u8(self.common + DEVICE_STATUS).into()
    }

    pub fn set_status(&self, status: u32) {
        write_u8(self.common + DEVICE_STATUS, status as u8);
    }

    pub fn device_features(&self) -> u64 {
        phys::write_u32(self.common + DEVICE_FEATURE_SELECT, 0);
        let low = phys::read_u32(self.common + DEVICE_FEATURE);
        phys::write_u32(self.common + DEVICE_FEATURE_SELECT, 1);
        let high = phys::read_u32(self.common + DEVICE_FEATURE);
        (u64::from(high) << 32) | u64::from(low)
    }

    pub fn set_driver_features(&self, features: u64) {
        phys::write_u32(self.common + DRIVER_FEATURE_SELECT, 0);
        phys::write_u32(self.common + DRIVER_FEATURE, features as u32);
        phys::write_u32(self.common + DRIVER_FEATURE_SELECT, 1);
        phys::write_u32(self.common + DRIVER_FEATURE, (features >> 32) as u32);
    }

    /// Selects queue `index`: (queue_enable, queue_size), the size being the maximum the
    /// device offers until the driver writes a smaller one (0: no such queue).
    pub fn select_queue(&self, index: u32) -> (u32, u32) {
        write_u16(self.common + QUEUE_SELECT, index as u16);
        (
            phys::read_u16(self.common + QUEUE_ENABLE).into(),
            phys::read_u16(self.common + QUEUE_SIZE).into(),
        )
    }

    /// The selected queue's size, areas and MSI-X vector 0 (configuration changes get
    /// none), then enabled.
    pub fn activate_queue(&self, size: u16, desc: u64, driver: u64, device: u64) -> bool {
        write_u16(self.common + QUEUE_SIZE, size);
        for (reg, addr) in [
            (QUEUE_DESC, desc),
            (QUEUE_DRIVER, driver),
            (QUEUE_DEVICE, device),
        ] {
            phys::write_u32(self.common + reg, addr as u32);
            phys::write_u32(self.common + reg + 4, (addr >> 32) as u32);
        }
        write_u16(self.common + CONFIG_MSIX_VECTOR, NO_VECTOR);
        write_u16(self.common + QUEUE_MSIX_VECTOR, 0);
        // The device answers NO_VECTOR when it cannot use the vector (4.1.4.3.1).
        let mapped = phys::read_u16(self.common + QUEUE_MSIX_VECTOR) == 0;
        write_u16(self.common + QUEUE_ENABLE, 1);
        mapped
    }

    /// Queue `queue`'s notification: its notify offset times the multiplier from the
    /// notify structure's start (4.1.4.4); the value is the queue index.
    pub fn notify(&self, queue: u32) {
        write_u16(self.common + QUEUE_SELECT, queue as u16);
        let off = u64::from(phys::read_u16(self.common + QUEUE_NOTIFY_OFF));
        write_u16(
            self.notify + off * u64::from(self.notify_multiplier),
            queue as u16,
        );
    }

    fn pending(&self) -> bool {
        phys::read_u32(self.pba) & 1 != 0
    }

    /// Waits for vector 0's pending bit (the device signalled while the vector is masked),
    /// then unmasks it, which must send the message and clear the bit, and masks it again.
    /// `patient` false looks once.
    pub fn take_used_interrupt(&self, patient: bool) -> bool {
        let mut deadline = Deadline::after(if patient { INTERRUPT_TICKS } else { 0 });
        while !self.pending() {
            if !patient || deadline.expired() {
                return false;
            }
            timeout::delay(POLL_GAP_TICKS);
        }
        phys::write_u32(self.table + 12, 0);
        phys::write_u32(self.table + 12, VECTOR_MASKED);
        !self.pending()
    }

    /// Enables the local APIC in software: a disabled one drops fixed interrupts (SDM
    /// 10.4.7.2), and the MSI-X check needs it to accept the one unmasking sends. With
    /// interrupts off in the CPU (IF=0) nothing is delivered further; every LVT entry stays
    /// masked as reset left it.
    pub fn enable_local_apic() {
        let svr = phys::read_u32(APIC_SVR);
        phys::write_u32(APIC_SVR, svr | APIC_SOFTWARE_ENABLE | 0xff);
    }

    /// Whether the local APIC holds the probe's vector requested: what unmasking sent.
    pub fn apic_requested() -> bool {
        phys::read_u32(APIC_IRR) & (1 << (MSI_VECTOR % 32)) != 0
    }

    pub fn config_generation(&self) -> u32 {
        phys::read_u8(self.common + CONFIG_GENERATION).into()
    }

    /// 32 bits of the device-specific configuration structure at `offset`.
    pub fn config_u32(&self, offset: u64) -> u32 {
        phys::read_u32(self.device_config + offset)
    }
}

fn write_u16(addr: u64, value: u16) {
    // SAFETY: device registers in the uncached identity map.
    unsafe { core::ptr::write_volatile(addr as *mut u16, value) }
}

fn write_u8(addr: u64, value: u8) {
    // SAFETY: as for write_u16.
    unsafe { core::ptr::write_volatile(addr as *mut u8, value) }
}
