//! The `pci` check (`probe.pci=N`, with N the functions expected on bus 0): the MCFG table
//! names ECAM for segment 0 from bus 0; scanning bus 0 through ECAM and through the port
//! I/O mechanism (0xCF8/0xCFC) finds the same N functions; 00:00.0 is a host bridge; a
//! write through one mechanism reads back through the other.

use crate::Boot;
use crate::acpi;
use crate::cpu::{inl, outl};
use crate::line::Detail;
use crate::phys;

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

fn ecam_addr(ecam: u64, device: u64, register: u64) -> u64 {
    ecam + (device << 15) + register
}

fn port_read(device: u64, register: u64) -> u32 {
    outl(
        CONFIG_ADDRESS,
        CONFIG_ENABLE | ((device as u32) << 11) | (register as u32 & 0xfc),
    );
    inl(CONFIG_DATA)
}

pub fn check(boot: &Boot, d: &mut Detail) -> bool {
    let Some(want) = boot.cmdline.require_u64(b"probe.pci", d) else {
        return false;
    };
    let Some((mcfg, len)) = acpi::find_table(boot, b"MCFG", d) else {
        return false;
    };
    if len < MCFG_FIRST + MCFG_ENTRY_LEN {
        d.str(b"MCFG has no allocation");
        return false;
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
        return false;
    }
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
