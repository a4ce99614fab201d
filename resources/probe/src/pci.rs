//! The `pci` check (`probe.pci=N`, with N the functions expected on bus 0): the MCFG table
//! names ECAM for segment 0 from bus 0; scanning bus 0 through ECAM and through the port
//! I/O mechanism (0xCF8/0xCFC) finds the same N functions; 00:00.0 is a host bridge; a
//! write through one mechanism reads back through the other.

use crate::Boot;
use crate::acpi;
use crate::cpu::{inl, outl};
use crate::line::Detail;
use crate::phys;
use crate::virtio_pci::{DEVICE_BLOCK, PciTransport, VENDOR_VIRTIO};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;
const CONFIG_ENABLE: u32 = 1 << 31;

/// MCFG: the first allocation follows the header and 8 reserved bytes.
const MCFG_FIRST: u64 = 44;
const MCFG_ENTRY_LEN: u64 = 16;

const SLOTS: u64 = 32;
const VENDOR_NONE: u32 = 0xffff;
const CLASS_HOST_BRIDGE: u32 = 0x06_00_00;
const INTERRUPT_LINE: u64 = 0x3c;

/// The address of `register` of device `device` on bus 0 through ECAM.
pub fn ecam_addr(ecam: u64, device: u64, register: u64) -> u64 {
    ecam + (device << 15) + register
}

fn port_read(device: u64, register: u64) -> u32 {
    outl(
        CONFIG_ADDRESS,
        CONFIG_ENABLE | ((device as u32) << 11) | (register as u32 & 0xfc),
    );
    inl(CONFIG_DATA)
}

/// ECAM's base for segment 0 from bus 0, from the MCFG table; says in `d` why not.
pub fn ecam(boot: &Boot, d: &mut Detail) -> Option<u64> {
    let (mcfg, len) = acpi::find_table(boot, b"MCFG", d)?;
    if len < MCFG_FIRST + MCFG_ENTRY_LEN {
        d.str(b"MCFG has no allocation");
        return None;
    }
    let entry = mcfg + MCFG_FIRST;
    let ecam = phys::read_u64(entry);
    let (segment, start_bus) = (phys::read_u16(entry + 8), phys::read_u8(entry + 10));
    d.str(b"ecam=").hex(ecam);
    if segment != 0 || start_bus != 0 || ecam == 0 || ecam >= 1 << 32 {
        d.str(b" segment=")
            .dec(segment.into())
            .str(b" bus=")
            .dec(start_bus.into());
        return None;
    }
    Some(ecam)
}

pub fn check(boot: &Boot, d: &mut Detail) -> bool {
    let Some(want) = boot.cmdline.require_u64(b"probe.pci", d) else {
        return false;
    };
    let Some(ecam) = ecam(boot, d) else {
        return false;
    };
    let mut found = 0;
    for device in 0..SLOTS {
        let by_ecam = phys::read_u32(ecam_addr(ecam, device, 0));
        let by_port = port_read(device, 0);
        if by_ecam != by_port {
            d.str(b" device ")
                .dec(device)
                .str(b": ECAM ")
                .hex(by_ecam.into());
            d.str(b" ports ").hex(by_port.into());
            return false;
        }
        if by_ecam & 0xffff != VENDOR_NONE {
            found += 1;
        }
    }
    d.str(b" functions=").dec(found);
    let id = phys::read_u32(ecam_addr(ecam, 0, 0));
    let class = phys::read_u32(ecam_addr(ecam, 0, 8)) >> 8;
    d.str(b" 00:00.0=").hex((id & 0xffff).into()).byte(b':');
    d.hex((id >> 16).into()).str(b" class=").hex(class.into());
    if found != want {
        d.str(b" want ").dec(want);
        return false;
    }
    if class != CLASS_HOST_BRIDGE {
        d.str(b" not a host bridge");
        return false;
    }
    // Both mechanisms reach one configuration space: the interrupt line register (the
    // guest's scratch byte) written through ECAM reads back through the ports.
    phys::write_u32(ecam_addr(ecam, 0, INTERRUPT_LINE), 0x0b);
    let line = port_read(0, INTERRUPT_LINE) & 0xff;
    if line != 0x0b {
        d.str(b" interrupt line written by ECAM reads ")
            .hex(line.into());
        return false;
    }
    true
}

/// Where the probe moves virtio-pci functions' BAR 0: the start of the 32-bit window the
/// DSDT's host bridge describes, one MiB apart (BAR 0 is 32 KiB). Firmware places BARs;
/// the probe does too, so the VMM must follow a BAR the guest moves.
const VIRTIO_BAR_BASE: u64 = 0xc000_0000;
const VIRTIO_BAR_STRIDE: u64 = 1 << 20;
/// The most virtio-pci block functions the probe drives.
pub const MAX_BLK: usize = 4;

/// The `virtio-pci` check (`probe.pciblk=N`): the virtio-pci block functions on bus 0, each
/// set up (BAR moved, decode and bus master on, structures found, MSI-X vector 0 programmed
/// masked and MSI-X enabled). Returns them in slot order.
pub fn virtio_blk(
    boot: &Boot,
    found: &mut [Option<PciTransport>; MAX_BLK],
    d: &mut Detail,
) -> bool {
    let Some(want) = boot.cmdline.require_u64(b"probe.pciblk", d) else {
        return false;
    };
    let Some(ecam) = ecam(boot, d) else {
        return false;
    };
    PciTransport::enable_local_apic();
    let mut n = 0;
    for device in 0..SLOTS {
        let id = phys::read_u32(ecam_addr(ecam, device, 0));
        if id & 0xffff != VENDOR_VIRTIO || id >> 16 != DEVICE_BLOCK || n == MAX_BLK {
            continue;
        }
        let bar = VIRTIO_BAR_BASE + VIRTIO_BAR_STRIDE * n as u64;
        d.str(b" 00:").hex2(device as u8).str(b".0");
        let Some((transport, layout)) = PciTransport::setup(ecam, device, bar, d) else {
            return false;
        };
        d.str(b" bar=")
            .hex(layout.bar)
            .str(b" vectors=")
            .dec(layout.vectors.into());
        found[n] = Some(transport);
        n += 1;
    }
    d.str(b" blk=").dec(n as u64);
    if n as u64 != want {
        d.str(b" want ").dec(want);
        return false;
    }
    true
}
