//! The two ways a guest reaches configuration space: the PC's port I/O mechanism
//! (CONFIG_ADDRESS at 0xCF8, CONFIG_DATA at 0xCFC; PCI Local Bus 3.0, section 3.2.2.3.2),
//! which sees the first 256 bytes of each function, and ECAM (PCI Express Base 4.0, section
//! 7.2.2), a memory window where each function's whole 4 KiB has an address of its own.

use std::sync::Arc;

use super::config_space::LEGACY_CONFIG_LEN;
use super::root::{FUNCTIONS, PciRoot, SLOTS};
use crate::devices::bus::BusDevice;

/// Ports the mechanism occupies: CONFIG_ADDRESS (0xCF8-0xCFB) and CONFIG_DATA (0xCFC-0xCFF).
pub const PORT_IO_LEN: u64 = 8;
const DATA_OFFSET: u64 = 4;

/// CONFIG_ADDRESS: the enable bit, bus, device, function and dword register fields; the
/// reserved bits 30:24 and the low two bits read as zero.
const ADDRESS_ENABLE: u32 = 1 << 31;
const ADDRESS_WRITABLE: u32 = ADDRESS_ENABLE | 0x00ff_fffc;

/// ECAM's size for one bus: 32 devices of 8 functions of 4 KiB.
pub const ECAM_BUS_LEN: u64 = (SLOTS * FUNCTIONS * 4096) as u64;

/// Whether an access of `len` bytes at `offset` is one configuration space takes: 1, 2 or
/// 4 bytes, naturally aligned (so never across a dword).
fn well_formed(offset: u64, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && offset.is_multiple_of(len as u64)
}

/// The port I/O mechanism: a BusDevice for ports 0xCF8-0xCFF.
pub struct PortIoConfig {
    root: Arc<PciRoot>,
    address: u32,
}

impl PortIoConfig {
    pub fn new(root: Arc<PciRoot>) -> Self {
        PortIoConfig { root, address: 0 }
    }

    /// The function and register CONFIG_ADDRESS selects, plus `byte` into the data port;
    /// None while it is disabled.
    fn target(&self, byte: u64) -> Option<(u8, u8, u8, usize)> {
        if self.address & ADDRESS_ENABLE == 0 {
            return None;
        }
        let a = self.address;
        let register = (a & 0xfc) as usize + byte as usize;
        Some((
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 0x7) as u8,
            register,
        ))
    }
}

impl BusDevice for PortIoConfig {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.address.to_le_bytes());
        } else if offset >= DATA_OFFSET
            && well_formed(offset, data.len())
            && let Some((bus, dev, func, reg)) = self.target(offset - DATA_OFFSET)
        {
            self.root.config_read(bus, dev, func, reg, data);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() == 4 {
            let mut v = [0; 4];
            v.copy_from_slice(data);
            self.address = u32::from_le_bytes(v) & ADDRESS_WRITABLE;
        } else if offset >= DATA_OFFSET
            && well_formed(offset, data.len())
            && let Some((bus, dev, func, reg)) = self.target(offset - DATA_OFFSET)
        {
            debug_assert!(reg < LEGACY_CONFIG_LEN);
            self.root.config_write(bus, dev, func, reg, data);
        }
        // Anything else (a byte or word at 0xCF8, 0xCF9's reset control on some chipsets)
        // is no configuration access and changes nothing.
    }
}

/// ECAM: a BusDevice for the memory window of bus 0.
pub struct EcamWindow {
    root: Arc<PciRoot>,
}

impl EcamWindow {
    pub fn new(root: Arc<PciRoot>) -> Self {
        EcamWindow { root }
    }
}

/// Bus, device, function and register of an offset into the ECAM window.
fn ecam_target(offset: u64) -> (u8, u8, u8, usize) {
    (
        (offset >> 20) as u8,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 0x7) as u8,
        (offset & 0xfff) as usize,
    )
}

impl BusDevice for EcamWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if !well_formed(offset, data.len()) {
            data.fill(0xff);
            return;
        }
        let (bus, dev, func, reg) = ecam_target(offset);
        self.root.config_read(bus, dev, func, reg, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if well_formed(offset, data.len()) {
            let (bus, dev, func, reg) = ecam_target(offset);
            self.root.config_write(bus, dev, func, reg, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::devices::pci::root::tests::Scratchpad;

    fn root_with_pad() -> Arc<PciRoot> {
        let root = PciRoot::new();
        root.add(Arc::new(Mutex::new(Scratchpad::new(0xc000_0000))))
            .unwrap();
        Arc::new(root)
    }

    fn address(dev: u32, func: u32, reg: u32) -> [u8; 4] {
        (ADDRESS_ENABLE | dev << 11 | func << 8 | reg).to_le_bytes()
    }

    #[test]
    fn port_io_reads_and_writes_through_config_address() {
        let root = root_with_pad();
        let mut io = PortIoConfig::new(root.clone());
        let mut b4 = [0; 4];

        io.write(0, &address(0, 0, 0));
        io.read(DATA_OFFSET, &mut b4);
        assert_eq!(u32::from_le_bytes(b4), 0x0008_1b36);
        // The address register reads back, reserved and low bits cleared.
        io.write(0, &(0xffff_ffffu32).to_le_bytes());
        io.read(0, &mut b4);
        assert_eq!(u32::from_le_bytes(b4), 0x80ff_fffc);

        // Device 1's vendor, then its device ID through the upper data port bytes.
        io.write(0, &address(1, 0, 0));
        let mut b2 = [0; 2];
        io.read(DATA_OFFSET, &mut b2);
        assert_eq!(u16::from_le_bytes(b2), 0x1af4);
        io.read(DATA_OFFSET + 2, &mut b2);
        assert_eq!(u16::from_le_bytes(b2), 0x10ff);
        // A write through the data port lands: the interrupt line register.
        io.write(0, &address(1, 0, 0x3c));
        io.write(DATA_OFFSET, &[9]);
        let mut b1 = [0; 1];
        io.read(DATA_OFFSET, &mut b1);
        assert_eq!(b1, [9]);

        // Functions that do not exist read ones.
        io.write(0, &address(2, 0, 0));
        io.read(DATA_OFFSET, &mut b4);
        assert_eq!(b4, [0xff; 4]);
        io.write(0, &address(0, 3, 0));
        io.read(DATA_OFFSET, &mut b4);
        assert_eq!(b4, [0xff; 4]);
    }

    #[test]
    fn port_io_ignores_disabled_and_malformed_accesses() {
        let root = root_with_pad();
        let mut io = PortIoConfig::new(root);
        let mut b4 = [0; 4];
        // Enable bit clear: the data port answers nothing.
        io.write(0, &(1u32 << 11).to_le_bytes());
        io.read(DATA_OFFSET, &mut b4);
        assert_eq!(b4, [0xff; 4]);
        // A byte write to 0xCF8 does not touch CONFIG_ADDRESS.
        io.write(0, &address(1, 0, 0));
        io.write(0, &[0]);
        io.read(0, &mut b4);
        assert_eq!(b4, address(1, 0, 0));
        // Misaligned data-port accesses are dropped.
        let mut b2 = [0; 2];
        io.read(DATA_OFFSET + 1, &mut b2);
        assert_eq!(b2, [0xff; 2]);
    }

    #[test]
    fn ecam_reaches_every_function_and_the_extended_space() {
        let root = root_with_pad();
        let mut ecam = EcamWindow::new(root.clone());
        let mut b4 = [0; 4];
        ecam.read(0, &mut b4);
        assert_eq!(u32::from_le_bytes(b4), 0x0008_1b36);
        ecam.read(1 << 15, &mut b4);
        assert_eq!(u32::from_le_bytes(b4), 0x10ff_1af4);
        ecam.read(2 << 15, &mut b4);
        assert_eq!(b4, [0xff; 4]);
        ecam.read((1 << 15) | (1 << 12), &mut b4);
        assert_eq!(b4, [0xff; 4], "function 1");
        // Extended space exists (and is empty) for a present function.
        ecam.read((1 << 15) | 0x100, &mut b4);
        assert_eq!(b4, [0; 4]);
        // BAR sizing through ECAM.
        ecam.write((1 << 15) | 0x10, &[0xff; 4]);
        ecam.read((1 << 15) | 0x10, &mut b4);
        assert_eq!(u32::from_le_bytes(b4), 0xffff_f000);
        // Misaligned accesses are dropped.
        ecam.read((1 << 15) | 0x3d, &mut b4[..2]);
        assert_eq!(&b4[..2], &[0xff; 2]);
        assert_eq!(ECAM_BUS_LEN, 1 << 20);
    }
}
