//! A PCI function's configuration space with a type-0 header (PCI Local Bus 3.0, chapter 6;
//! PCI Express Base 4.0, section 7.5): what the guest may write, BAR sizing and placement,
//! and the capability list.
//!
//! The space is 4 KiB, the extended size ECAM reaches; port I/O (0xCF8) sees its first 256
//! bytes. Every byte has a write mask: bits outside it keep their value whatever the guest
//! writes, which is all read-only registers and the BAR sizing protocol need (a BAR's
//! low address bits and type bits are outside its mask, so writing all ones reads back the
//! size).

use std::fmt;

/// The size of a configuration space reached through ECAM.
pub const CONFIG_SPACE_LEN: usize = 4096;
/// The part port I/O and conventional PCI reach.
pub const LEGACY_CONFIG_LEN: usize = 256;

// Header registers (offsets in bytes).
const VENDOR_ID: usize = 0x00;
const DEVICE_ID: usize = 0x02;
const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const REVISION_ID: usize = 0x08;
const CLASS_CODE: usize = 0x09;
const CACHE_LINE_SIZE: usize = 0x0c;
const HEADER_TYPE: usize = 0x0e;
const BAR0: usize = 0x10;
const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
const SUBSYSTEM_ID: usize = 0x2e;
const CAPABILITIES_POINTER: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
const INTERRUPT_PIN: usize = 0x3d;
/// The first byte after the header, where capabilities may start.
const HEADER_END: usize = 0x40;

/// Command register bits a guest may set (I/O and memory decode, bus master, parity and
/// SERR reporting, interrupt disable); the rest are hardwired to 0 for these devices.
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
const COMMAND_PARITY_ERROR_RESPONSE: u16 = 1 << 6;
const COMMAND_SERR: u16 = 1 << 8;
pub const COMMAND_INTERRUPT_DISABLE: u16 = 1 << 10;
const COMMAND_WRITABLE: u16 = COMMAND_IO_SPACE
    | COMMAND_MEMORY_SPACE
    | COMMAND_BUS_MASTER
    | COMMAND_PARITY_ERROR_RESPONSE
    | COMMAND_SERR
    | COMMAND_INTERRUPT_DISABLE;
/// Status: the function has a capability list.
const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;

/// BAR type bits (PCI 3.0, section 6.2.5.1).
const BAR_IO: u32 = 0b01;
const BAR_MEM_64: u32 = 0b100;
const BAR_PREFETCHABLE: u32 = 0b1000;
const BAR_COUNT: usize = 6;

/// Class codes ember's functions use (PCI Code and ID Assignment, chapter 1).
pub const CLASS_MASS_STORAGE: u8 = 0x01;
pub const SUBCLASS_OTHER_STORAGE: u8 = 0x80;
pub const CLASS_NETWORK: u8 = 0x02;
pub const SUBCLASS_ETHERNET: u8 = 0x00;
pub const CLASS_OTHER: u8 = 0xff;
pub const CLASS_BRIDGE: u8 = 0x06;
pub const SUBCLASS_HOST_BRIDGE: u8 = 0x00;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigSpaceError {
    #[error("BAR {index}: there are only six")]
    NoSuchBar { index: usize },
    #[error("BAR {index}: already in use")]
    BarTaken { index: usize },
    #[error("BAR {index}: a 64-bit BAR takes two slots and BAR 5 is the last")]
    NoRoomFor64Bit { index: usize },
    #[error("BAR {index}: size {size:#x} is not a power of two of at least {min:#x}")]
    BadBarSize { index: usize, size: u64, min: u64 },
    #[error("BAR {index}: a 32-bit BAR cannot hold address {addr:#x} (size {size:#x})")]
    BadBarAddress { index: usize, addr: u64, size: u64 },
    #[error("capability of {len} bytes does not fit in the rest of the configuration space")]
    NoRoomForCapability { len: usize },
    #[error("a capability needs at least its ID and next-pointer bytes, got {len}")]
    CapabilityTooShort { len: usize },
}

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Memory32 { prefetchable: bool },
    Memory64 { prefetchable: bool },
}

impl BarKind {
    fn type_bits(self) -> u32 {
        match self {
            BarKind::Io => BAR_IO,
            BarKind::Memory32 { prefetchable } => {
                if prefetchable {
                    BAR_PREFETCHABLE
                } else {
                    0
                }
            }
            BarKind::Memory64 { prefetchable } => {
                BAR_MEM_64 | if prefetchable { BAR_PREFETCHABLE } else { 0 }
            }
        }
    }

    /// The smallest size the BAR's encoding allows (its type bits sit below it).
    fn min_size(self) -> u64 {
        match self {
            BarKind::Io => 4,
            _ => 16,
        }
    }

    fn is_memory(self) -> bool {
        !matches!(self, BarKind::Io)
    }
}

/// A BAR as the function declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Bar {
    size: u64,
    kind: BarKind,
}

/// Where a BAR decodes right now: only while its space is enabled in the command register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarRegion {
    pub index: usize,
    pub kind: BarKind,
    pub addr: u64,
    pub size: u64,
}

impl BarRegion {
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.addr && addr.saturating_add(len) <= self.addr.saturating_add(self.size)
    }
}

/// The identity registers of a type-0 header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision_id: u8,
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

/// One function's configuration space.
pub struct ConfigSpace {
    bytes: Vec<u8>,
    writable: Vec<u8>,
    bars: [Option<Bar>; BAR_COUNT],
    /// Where the last capability's next pointer is, and where the next one may start.
    last_capability: Option<usize>,
    capability_end: usize,
}

impl fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigSpace")
            .field("vendor_id", &self.read_u16(VENDOR_ID))
            .field("device_id", &self.read_u16(DEVICE_ID))
            .field("bars", &self.bars)
            .finish()
    }
}

impl ConfigSpace {
    /// A type-0 header with `identity`, no BARs, no capabilities, no interrupt pin.
    pub fn new(identity: Identity) -> Self {
        let mut c = ConfigSpace {
            bytes: vec![0; CONFIG_SPACE_LEN],
            writable: vec![0; CONFIG_SPACE_LEN],
            bars: [None; BAR_COUNT],
            last_capability: None,
            capability_end: HEADER_END,
        };
        c.set_u16(VENDOR_ID, identity.vendor_id);
        c.set_u16(DEVICE_ID, identity.device_id);
        c.bytes[REVISION_ID] = identity.revision_id;
        c.bytes[CLASS_CODE] = identity.prog_if;
        c.bytes[CLASS_CODE + 1] = identity.subclass;
        c.bytes[CLASS_CODE + 2] = identity.class;
        c.set_u16(SUBSYSTEM_VENDOR_ID, identity.subsystem_vendor_id);
        c.set_u16(SUBSYSTEM_ID, identity.subsystem_id);
        c.set_writable(COMMAND, &COMMAND_WRITABLE.to_le_bytes());
        // Software's scratch registers.
        c.writable[CACHE_LINE_SIZE] = 0xff;
        c.writable[INTERRUPT_LINE] = 0xff;
        c
    }

    fn read_u16(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    fn read_u32(&self, offset: usize) -> u32 {
        let mut b = [0; 4];
        b.copy_from_slice(&self.bytes[offset..offset + 4]);
        u32::from_le_bytes(b)
    }

    fn set_u16(&mut self, offset: usize, v: u16) {
        self.bytes[offset..offset + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn set_u32(&mut self, offset: usize, v: u32) {
        self.bytes[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn set_writable(&mut self, offset: usize, mask: &[u8]) {
        self.writable[offset..offset + mask.len()].copy_from_slice(mask);
    }

    /// Marks the function as multi-function in its header type register.
    pub fn set_multifunction(&mut self) {
        self.bytes[HEADER_TYPE] |= 0x80;
    }

    /// The interrupt pin the function uses for INTx (1 = INTA# .. 4 = INTD#, 0 = none).
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.bytes[INTERRUPT_PIN] = pin;
    }

    /// The interrupt line register's value at reset: which interrupt INTx reaches, as
    /// firmware leaves it for the OS (software may overwrite it; it is a scratch register).
    pub fn set_interrupt_line(&mut self, line: u8) {
        self.bytes[INTERRUPT_LINE] = line;
    }

    /// The command register as the guest last set it.
    pub fn command(&self) -> u16 {
        self.read_u16(COMMAND)
    }

    /// Declares BAR `index` (0-5; a 64-bit BAR also takes `index + 1`) of `size` bytes at
    /// `addr`, where the VMM placed it; the guest may move it.
    pub fn add_bar(
        &mut self,
        index: usize,
        kind: BarKind,
        size: u64,
        addr: u64,
    ) -> Result<(), ConfigSpaceError> {
        let slots = if matches!(kind, BarKind::Memory64 { .. }) {
            2
        } else {
            1
        };
        if index >= BAR_COUNT {
            return Err(ConfigSpaceError::NoSuchBar { index });
        }
        if index + slots > BAR_COUNT {
            return Err(ConfigSpaceError::NoRoomFor64Bit { index });
        }
        if (index..index + slots).any(|i| self.bars[i].is_some() || self.is_upper_half(i)) {
            return Err(ConfigSpaceError::BarTaken { index });
        }
        let min = kind.min_size();
        if !size.is_power_of_two() || size < min {
            return Err(ConfigSpaceError::BadBarSize { index, size, min });
        }
        let limit = match kind {
            BarKind::Memory64 { .. } => u64::MAX,
            _ => u32::MAX.into(),
        };
        if !addr.is_multiple_of(size) || addr.checked_add(size - 1).is_none_or(|end| end > limit) {
            return Err(ConfigSpaceError::BadBarAddress { index, addr, size });
        }
        self.bars[index] = Some(Bar { size, kind });
        let mask = !(size - 1);
        let low_mask = mask as u32 & !((kind.min_size() as u32) - 1);
        let offset = BAR0 + 4 * index;
        self.set_writable(offset, &low_mask.to_le_bytes());
        self.set_u32(offset, (addr as u32 & low_mask) | kind.type_bits());
        if slots == 2 {
            self.set_writable(offset + 4, &((mask >> 32) as u32).to_le_bytes());
            self.set_u32(offset + 4, (addr >> 32) as u32);
        }
        Ok(())
    }

    /// Whether slot `index` holds the upper half of the 64-bit BAR below it.
    fn is_upper_half(&self, index: usize) -> bool {
        index > 0
            && matches!(
                self.bars[index - 1],
                Some(Bar {
                    kind: BarKind::Memory64 { .. },
                    ..
                })
            )
    }

    /// The address BAR `index` holds, whether or not it decodes.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bars.get(index).copied().flatten()?;
        let offset = BAR0 + 4 * index;
        let low = u64::from(self.read_u32(offset) & !((bar.kind.min_size() as u32) - 1));
        Some(match bar.kind {
            BarKind::Memory64 { .. } => low | (u64::from(self.read_u32(offset + 4)) << 32),
            _ => low,
        })
    }

    /// The BARs that decode now: their space is enabled in the command register.
    pub fn decoding_bars(&self) -> Vec<BarRegion> {
        let command = self.command();
        let io = command & COMMAND_IO_SPACE != 0;
        let memory = command & COMMAND_MEMORY_SPACE != 0;
        (0..BAR_COUNT)
            .filter_map(|index| {
                let bar = self.bars[index]?;
                let enabled = if bar.kind.is_memory() { memory } else { io };
                enabled.then(|| BarRegion {
                    index,
                    kind: bar.kind,
                    addr: self.bar_address(index).unwrap_or(0),
                    size: bar.size,
                })
            })
            .collect()
    }

    /// Appends a capability: `body` starts with its ID and a placeholder next pointer (which
    /// this sets), `writable` is the guest-writable mask of its bytes (as long as `body` or
    /// empty for a read-only one). Returns its offset.
    pub fn add_capability(
        &mut self,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, ConfigSpaceError> {
        if body.len() < 2 {
            return Err(ConfigSpaceError::CapabilityTooShort { len: body.len() });
        }
        // Capabilities are dword aligned and live in the first 256 bytes.
        let offset = self.capability_end.next_multiple_of(4);
        if offset + body.len() > LEGACY_CONFIG_LEN {
            return Err(ConfigSpaceError::NoRoomForCapability { len: body.len() });
        }
        self.bytes[offset..offset + body.len()].copy_from_slice(body);
        self.bytes[offset + 1] = 0;
        if !writable.is_empty() {
            let n = writable.len().min(body.len());
            self.set_writable(offset, &writable[..n]);
        }
        // The ID and next pointer are never the guest's to change.
        self.writable[offset] = 0;
        self.writable[offset + 1] = 0;
        match self.last_capability {
            Some(last) => self.bytes[last + 1] = offset as u8,
            None => {
                self.bytes[CAPABILITIES_POINTER] = offset as u8;
                let status = self.read_u16(STATUS) | STATUS_CAPABILITIES_LIST;
                self.set_u16(STATUS, status);
            }
        }
        self.last_capability = Some(offset);
        self.capability_end = offset + body.len();
        Ok(offset)
    }

    /// Bytes of the space, for the device's own use (its capabilities' registers).
    pub fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        &self.bytes[offset..offset + len]
    }

    /// The function sets bytes of its own registers, whatever the guest may write there.
    pub fn set_bytes(&mut self, offset: usize, data: &[u8]) {
        if let Some(bytes) = self.bytes.get_mut(offset..offset + data.len()) {
            bytes.copy_from_slice(data);
        }
    }

    /// The guest reads `data.len()` bytes at `offset`. Outside the space, it reads ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        match self.bytes.get(offset..offset + data.len()) {
            Some(b) => data.copy_from_slice(b),
            None => data.fill(0xff),
        }
    }

    /// The guest writes `data` at `offset`: only the writable bits change. Outside the
    /// space the write goes nowhere.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        let Some(bytes) = self.bytes.get_mut(offset..offset + data.len()) else {
            return;
        };
        let writable = &self.writable[offset..offset + data.len()];
        for ((b, w), d) in bytes.iter_mut().zip(writable).zip(data) {
            *b = (*b & !w) | (d & w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision_id: 1,
            class: 0x01,
            subclass: 0x00,
            prog_if: 0,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        }
    }

    fn read32(c: &ConfigSpace, offset: usize) -> u32 {
        let mut b = [0; 4];
        c.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn write32(c: &mut ConfigSpace, offset: usize, v: u32) {
        c.write(offset, &v.to_le_bytes());
    }

    #[test]
    fn header_identity_is_read_only() {
        let mut c = ConfigSpace::new(identity());
        assert_eq!(read32(&c, 0), 0x1042_1af4);
        assert_eq!(read32(&c, 8), 0x0100_0001);
        assert_eq!(read32(&c, 0x2c), 0x0040_1af4);
        write32(&mut c, 0, 0xdead_beef);
        write32(&mut c, 8, 0xffff_ffff);
        write32(&mut c, 0x2c, 0);
        assert_eq!(read32(&c, 0), 0x1042_1af4);
        assert_eq!(read32(&c, 8), 0x0100_0001);
        assert_eq!(read32(&c, 0x2c), 0x0040_1af4);
        // No expansion ROM: its BAR sizes to 0.
        write32(&mut c, 0x30, 0xffff_ffff);
        assert_eq!(read32(&c, 0x30), 0);
    }

    #[test]
    fn command_keeps_only_defined_bits_and_scratch_registers_work() {
        let mut c = ConfigSpace::new(identity());
        c.write(COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(c.command(), COMMAND_WRITABLE);
        c.write(INTERRUPT_LINE, &[11]);
        c.write(INTERRUPT_PIN, &[3]);
        let mut b = [0; 2];
        c.read(INTERRUPT_LINE, &mut b);
        assert_eq!(b, [11, 0], "the line is the guest's, the pin is not");
    }

    #[test]
    fn bar_sizing_protocol_32_bit() {
        let mut c = ConfigSpace::new(identity());
        c.add_bar(
            0,
            BarKind::Memory32 {
                prefetchable: false,
            },
            0x4000,
            0xc000_0000,
        )
        .unwrap();
        assert_eq!(read32(&c, BAR0), 0xc000_0000);
        write32(&mut c, BAR0, 0xffff_ffff);
        assert_eq!(read32(&c, BAR0), 0xffff_c000, "size mask, type bits kept");
        write32(&mut c, BAR0, 0xc001_0000);
        assert_eq!(c.bar_address(0), Some(0xc001_0000));
        // Unaligned addresses lose their low bits.
        write32(&mut c, BAR0, 0xc001_2345);
        assert_eq!(c.bar_address(0), Some(0xc001_0000));
    }

    #[test]
    fn bar_sizing_protocol_64_bit_prefetchable_and_io() {
        let mut c = ConfigSpace::new(identity());
        c.add_bar(
            2,
            BarKind::Memory64 { prefetchable: true },
            1 << 33,
            0x40_0000_0000,
        )
        .unwrap();
        assert_eq!(read32(&c, BAR0 + 8), 0b1100);
        assert_eq!(read32(&c, BAR0 + 12), 0x40);
        write32(&mut c, BAR0 + 8, 0xffff_ffff);
        write32(&mut c, BAR0 + 12, 0xffff_ffff);
        assert_eq!(read32(&c, BAR0 + 8), 0x0000_000c);
        assert_eq!(read32(&c, BAR0 + 12), 0xffff_fffe);
        write32(&mut c, BAR0 + 8, 0);
        write32(&mut c, BAR0 + 12, 0x80);
        assert_eq!(c.bar_address(2), Some(0x80_0000_0000));
        // The upper half is not a BAR of its own.
        assert_eq!(c.bar_address(3), None);
        assert_eq!(
            c.add_bar(3, BarKind::Io, 16, 0x1000),
            Err(ConfigSpaceError::BarTaken { index: 3 })
        );

        c.add_bar(4, BarKind::Io, 32, 0x1000).unwrap();
        write32(&mut c, BAR0 + 16, 0xffff_ffff);
        assert_eq!(read32(&c, BAR0 + 16), 0xffff_ffe1);
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut c = ConfigSpace::new(identity());
        let mem = BarKind::Memory32 {
            prefetchable: false,
        };
        let mem64 = BarKind::Memory64 {
            prefetchable: false,
        };
        assert_eq!(
            c.add_bar(6, mem, 16, 0),
            Err(ConfigSpaceError::NoSuchBar { index: 6 })
        );
        assert_eq!(
            c.add_bar(5, mem64, 16, 0),
            Err(ConfigSpaceError::NoRoomFor64Bit { index: 5 })
        );
        assert!(matches!(
            c.add_bar(0, mem, 0x3000, 0),
            Err(ConfigSpaceError::BadBarSize { .. })
        ));
        assert!(matches!(
            c.add_bar(0, mem, 8, 0),
            Err(ConfigSpaceError::BadBarSize { .. })
        ));
        assert!(matches!(
            c.add_bar(0, mem, 0x1000, 0x1_0000_0000),
            Err(ConfigSpaceError::BadBarAddress { .. })
        ));
        assert!(matches!(
            c.add_bar(0, mem, 0x1000, 0x800),
            Err(ConfigSpaceError::BadBarAddress { .. })
        ));
        c.add_bar(0, mem, 0x1000, 0x1000).unwrap();
        assert_eq!(
            c.add_bar(0, mem, 0x1000, 0x2000),
            Err(ConfigSpaceError::BarTaken { index: 0 })
        );
    }

    #[test]
    fn bars_decode_only_when_their_space_is_enabled() {
        let mut c = ConfigSpace::new(identity());
        c.add_bar(
            0,
            BarKind::Memory32 {
                prefetchable: false,
            },
            0x1000,
            0xc000_0000,
        )
        .unwrap();
        c.add_bar(1, BarKind::Io, 16, 0x1000).unwrap();
        assert!(c.decoding_bars().is_empty());
        c.write(COMMAND, &COMMAND_MEMORY_SPACE.to_le_bytes());
        let regions = c.decoding_bars();
        assert_eq!(
            regions,
            vec![BarRegion {
                index: 0,
                kind: BarKind::Memory32 {
                    prefetchable: false
                },
                addr: 0xc000_0000,
                size: 0x1000
            }]
        );
        assert!(regions[0].contains(0xc000_0ffc, 4));
        assert!(!regions[0].contains(0xc000_0ffe, 4));
        c.write(
            COMMAND,
            &(COMMAND_MEMORY_SPACE | COMMAND_IO_SPACE).to_le_bytes(),
        );
        assert_eq!(c.decoding_bars().len(), 2);
    }

    #[test]
    fn capabilities_chain_and_keep_their_read_only_bytes() {
        let mut c = ConfigSpace::new(identity());
        assert_eq!(c.read_u16(STATUS) & STATUS_CAPABILITIES_LIST, 0);
        let first = c.add_capability(&[0x09, 0xaa, 4, 1], &[]).unwrap();
        let second = c
            .add_capability(&[0x11, 0, 0, 0, 0, 0], &[0, 0, 0xff, 0xc0])
            .unwrap();
        assert_eq!(first, 0x40);
        assert_eq!(second, 0x44);
        assert_ne!(c.read_u16(STATUS) & STATUS_CAPABILITIES_LIST, 0);
        assert_eq!(c.bytes[CAPABILITIES_POINTER], 0x40);
        assert_eq!(c.bytes(first, 2), &[0x09, 0x44]);
        assert_eq!(c.bytes(second, 2), &[0x11, 0x00]);
        c.write(second, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(c.bytes(second, 4), &[0x11, 0x00, 0xff, 0xc0]);
        c.write(first, &[0; 4]);
        assert_eq!(c.bytes(first, 4), &[0x09, 0x44, 4, 1]);
        assert_eq!(
            c.add_capability(&[0x05], &[]),
            Err(ConfigSpaceError::CapabilityTooShort { len: 1 })
        );
        assert!(matches!(
            c.add_capability(&[0u8; 200], &[]),
            Err(ConfigSpaceError::NoRoomForCapability { .. })
        ));
    }

    #[test]
    fn accesses_outside_the_space_read_ones_and_write_nothing() {
        let mut c = ConfigSpace::new(identity());
        let mut b = [0; 4];
        c.read(CONFIG_SPACE_LEN - 2, &mut b);
        assert_eq!(b, [0xff; 4]);
        c.write(CONFIG_SPACE_LEN - 2, &[1, 2, 3, 4]);
        // Extended space without capabilities reads as zero (PCIe 4.0, 7.6.2).
        c.read(0x100, &mut b);
        assert_eq!(b, [0; 4]);
    }
}
