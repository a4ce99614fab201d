//! An address-range bus: the port I/O space or the MMIO space. A vCPU exit names an address;
//! the bus finds the device whose range holds it and hands it the offset.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device's register interface as the guest sees it.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset` into the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    InvalidRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps a device already at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
}

type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone, Default)]
pub struct Bus {
    /// Keyed by base address; each value holds the range length and the device.
    devices: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::InvalidRange { base, len });
        }
        let end = base + len;
        // The only ranges that can overlap are the last one starting before `end`.
        if let Some((&other, &(other_len, _))) = self.devices.range(..end).next_back()
            && other + other_len > base
        {
            return Err(BusError::Overlap { base, len, other });
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (&base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        // The whole access must fall inside the range.
        (offset.checked_add(size as u64)? <= *len).then_some((offset, dev))
    }

    /// Dispatches a read; returns false when no device claims the address, in which case the
    /// caller answers as an empty bus does (all ones).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device claims the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last access so tests can see what the bus passed on.
    #[derive(Default)]
    struct Recorder {
        last: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_with_offsets() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        assert!(bus.write(0x3fb, &[7]));
        assert_eq!(a.lock().unwrap().last, Some((3, vec![7])));
        let mut buf = [0u8; 1];
        assert!(bus.read(0x3ff, &mut buf));
        assert_eq!(buf, [7]);
        assert!(!bus.read(0x400, &mut buf));
        assert!(!bus.read(0x3f7, &mut buf));
        // An access that straddles the end of the range is not the device's.
        let mut wide = [0u8; 4];
        assert!(!bus.read(0x3fe, &mut wide));
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let mut bus = Bus::new();
        let d = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(d(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(d(), 0x108, 0x10),
            Err(BusError::Overlap {
                base: 0x108,
                len: 0x10,
                other: 0x100
            })
        );
        assert!(bus.insert(d(), 0xf8, 0x10).is_err());
        assert!(bus.insert(d(), 0x110, 0x10).is_ok());
        assert!(bus.insert(d(), 0xf0, 0x10).is_ok());
        assert_eq!(
            bus.insert(d(), 0, 0),
            Err(BusError::InvalidRange { base: 0, len: 0 })
        );
        assert!(bus.insert(d(), u64::MAX, 2).is_err());
    }
}
