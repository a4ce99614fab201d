//! MSI (PCI Local Bus 3.0, 6.8.1): the capability's registers as the guest programs them,
//! and one route per vector the guest enables. A function with `2^n` vectors sends vector
//! `i` as the programmed message with `i` in the low bits of its data.
//!
//! The layout follows the function's own capability (32- or 64-bit address, with or
//! without per-vector masking), so a passed-through function keeps its offsets.

use crate::devices::pci::msix::VectorSink;
use crate::vstate::gsi_routes::MsiMessage;

pub const CAPABILITY_ID: u8 = 0x05;

const CONTROL_ENABLE: u16 = 1 << 0;
const CONTROL_MMC_SHIFT: u16 = 1;
const CONTROL_MME_SHIFT: u16 = 4;
const CONTROL_MME_MASK: u16 = 0b111 << CONTROL_MME_SHIFT;
const CONTROL_64BIT: u16 = 1 << 7;
const CONTROL_PER_VECTOR_MASK: u16 = 1 << 8;
/// The most vectors MSI describes (multiple message capable = 5).
pub const MAX_VECTORS: usize = 32;

/// The function's MSI state.
pub struct Msi {
    /// The function's fixed bits: how many vectors it asks for (log2), address size,
    /// per-vector masking.
    capable_log2: u16,
    wide: bool,
    per_vector_mask: bool,
    enabled: bool,
    enabled_log2: u16,
    address: u64,
    data: u16,
    mask: u32,
    sinks: Vec<Box<dyn VectorSink>>,
}

impl Msi {
    /// The state after reset for a capability whose message control reads `control` on the
    /// function: disabled, nothing programmed, every vector masked if it can be. `sinks`
    /// (at most [`MAX_VECTORS`]) bounds the vectors offered.
    pub fn new(control: u16, sinks: Vec<Box<dyn VectorSink>>) -> Self {
        let asked = (control >> CONTROL_MMC_SHIFT) & 0b111;
        // As many as the function asks for and there are sinks for, a power of two.
        let have = sinks.len().clamp(1, MAX_VECTORS);
        let capable_log2 = asked.min(have.ilog2() as u16);
        Msi {
            capable_log2,
            wide: control & CONTROL_64BIT != 0,
            per_vector_mask: control & CONTROL_PER_VECTOR_MASK != 0,
            enabled: false,
            enabled_log2: 0,
            address: 0,
            data: 0,
            mask: 0,
            sinks,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Vectors the guest enabled (meaningful while enabled).
    pub fn enabled_vectors(&self) -> usize {
        1 << self.enabled_log2
    }

    /// The capability's length in configuration space for this layout.
    pub fn capability_len(&self) -> usize {
        let base = if self.wide { 14 } else { 10 };
        if self.per_vector_mask {
            base + 10
        } else {
            base
        }
    }

    fn data_offset(&self) -> usize {
        if self.wide { 12 } else { 8 }
    }

    fn mask_offset(&self) -> Option<usize> {
        self.per_vector_mask
            .then_some(if self.wide { 16 } else { 12 })
    }

    fn control(&self) -> u16 {
        let mut c = self.capable_log2 << CONTROL_MMC_SHIFT;
        c |= self.enabled_log2 << CONTROL_MME_SHIFT;
        if self.enabled {
            c |= CONTROL_ENABLE;
        }
        if self.wide {
            c |= CONTROL_64BIT;
        }
        if self.per_vector_mask {
            c |= CONTROL_PER_VECTOR_MASK;
        }
        c
    }

    /// The capability's registers from offset 2 (message control) on, as they read now;
    /// the pending bits read 0 (the sinks hold what is pending).
    fn registers(&self) -> [u8; 24] {
        let mut r = [0u8; 24];
        r[2..4].copy_from_slice(&self.control().to_le_bytes());
        r[4..8].copy_from_slice(&(self.address as u32).to_le_bytes());
        if self.wide {
            r[8..12].copy_from_slice(&((self.address >> 32) as u32).to_le_bytes());
        }
        let d = self.data_offset();
        r[d..d + 2].copy_from_slice(&self.data.to_le_bytes());
        if let Some(m) = self.mask_offset() {
            r[m..m + 4].copy_from_slice(&self.mask.to_le_bytes());
        }
        r
    }

    /// The guest reads byte `offset` of the capability (2 and up; the ID and next pointer
    /// are the caller's).
    pub fn read(&self, offset: usize) -> u8 {
        self.registers().get(offset).copied().unwrap_or(0)
    }

    /// The guest writes byte `offset` of the capability. Returns whether MSI was turned on
    /// or off by it (the caller then enables or disables the function's vectors).
    pub fn write(&mut self, offset: usize, value: u8) -> Option<bool> {
        let mut r = self.registers();
        if offset >= self.capability_len() || offset < 2 {
            return None;
        }
        r[offset] = value;
        let was = (self.enabled, self.enabled_log2);
        let control = u16::from_le_bytes([r[2], r[3]]);
        self.enabled = control & CONTROL_ENABLE != 0;
        // More than the function offers reads back as what it offers.
        self.enabled_log2 =
            ((control & CONTROL_MME_MASK) >> CONTROL_MME_SHIFT).min(self.capable_log2);
        let low = u32::from_le_bytes([r[4], r[5], r[6], r[7]]) & !3;
        let high = if self.wide {
            u32::from_le_bytes([r[8], r[9], r[10], r[11]])
        } else {
            0
        };
        self.address = u64::from(low) | (u64::from(high) << 32);
        let d = self.data_offset();
        self.data = u16::from_le_bytes([r[d], r[d + 1]]);
        if let Some(m) = self.mask_offset() {
            self.mask = u32::from_le_bytes([r[m], r[m + 1], r[m + 2], r[m + 3]]);
        }
        self.update_routes();
        let now = (self.enabled, self.enabled_log2);
        (was.0 != now.0).then_some(now.0)
    }

    fn update_routes(&self) {
        let n = self.enabled_vectors() as u32;
        for (i, sink) in self.sinks.iter().enumerate() {
            let live = self.enabled && i < self.enabled_vectors();
            let message = live.then(|| MsiMessage {
                address: self.address,
                // The function sets the data's low log2(n) bits to the vector (6.8.1.3).
                data: (u32::from(self.data) & !(n - 1)) | i as u32,
            });
            let masked = self.mask & (1 << i) != 0;
            if let Err(e) = sink.route(message, masked) {
                log::error!("MSI: cannot route vector {i}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::pci::msix::recorder::Recorder;

    fn msi(control: u16, n: usize) -> (Msi, Vec<Recorder>) {
        let recs: Vec<Recorder> = (0..n).map(|_| Recorder::default()).collect();
        let sinks = recs
            .iter()
            .map(|r| Box::new(r.clone()) as Box<dyn VectorSink>)
            .collect();
        (Msi::new(control, sinks), recs)
    }

    fn write16(m: &mut Msi, offset: usize, v: u16) -> Option<bool> {
        let a = m.write(offset, v as u8);
        let b = m.write(offset + 1, (v >> 8) as u8);
        a.or(b)
    }

    fn write32(m: &mut Msi, offset: usize, v: u32) {
        for (i, b) in v.to_le_bytes().into_iter().enumerate() {
            m.write(offset + i, b);
        }
    }

    fn read16(m: &Msi, offset: usize) -> u16 {
        u16::from_le_bytes([m.read(offset), m.read(offset + 1)])
    }

    #[test]
    fn a_64_bit_capability_with_masking_keeps_its_layout() {
        // Four vectors asked (MMC 2), 64-bit, per-vector masking.
        let (mut m, recs) = msi((2 << 1) | (1 << 7) | (1 << 8), 4);
        assert_eq!(m.capability_len(), 24);
        assert_eq!(read16(&m, 2), (2 << 1) | (1 << 7) | (1 << 8));
        write32(&mut m, 4, 0xfee0_1003);
        write32(&mut m, 8, 0x1);
        write16(&mut m, 12, 0x4120);
        write32(&mut m, 16, 0b0010);
        // Address bits 1:0 are reserved zero.
        assert_eq!(m.read(4), 0x00);
        // Enable with two of the four vectors.
        assert_eq!(write16(&mut m, 2, 1 | (1 << 4)), Some(true));
        assert_eq!(m.enabled_vectors(), 2);
        let want = |data| MsiMessage {
            address: 0x1_fee0_1000,
            data,
        };
        assert_eq!(recs[0].last_route(), Some(want(0x4120)));
        assert_eq!(recs[0].last_masked(), Some(false));
        assert_eq!(
            recs[1].last_route(),
            Some(want(0x4121)),
            "vector in the data's low bits"
        );
        // Low bits the guest left set are the function's to replace.
        write16(&mut m, 12, 0x4123);
        assert_eq!(recs[0].last_route(), Some(want(0x4122)));
        assert_eq!(recs[1].last_route(), Some(want(0x4123)));
        write16(&mut m, 12, 0x4120);
        assert_eq!(recs[1].last_masked(), Some(true));
        assert_eq!(recs[2].last_route(), None, "not enabled");
        // Unmask vector 1; then disable.
        write32(&mut m, 16, 0);
        assert_eq!(recs[1].last_masked(), Some(false));
        assert_eq!(write16(&mut m, 2, 0), Some(false));
        assert_eq!(recs[0].last_route(), None);
    }

    #[test]
    fn a_32_bit_capability_without_masking_and_requests_beyond_it() {
        // One vector asked, 32-bit address, no masking.
        let (mut m, recs) = msi(0, 1);
        assert_eq!(m.capability_len(), 10);
        write32(&mut m, 4, 0xfee0_0000);
        write16(&mut m, 8, 0x0031);
        // Eight vectors asked for: one is what there is.
        write16(&mut m, 2, 1 | (3 << 4));
        assert_eq!(read16(&m, 2) & 0x71, 1);
        assert_eq!(
            recs[0].last_route(),
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x31
            })
        );
        // Bytes past the capability go nowhere.
        assert_eq!(m.write(12, 0xff), None);
        assert_eq!(m.read(12), 0);
    }

    #[test]
    fn fewer_sinks_than_asked_bound_the_vectors_offered() {
        // 32 vectors asked (MMC 5), 3 sinks: 2 offered (a power of two).
        let (m, _) = msi(5 << 1, 3);
        assert_eq!((read16(&m, 2) >> 1) & 0b111, 1);
    }
}
