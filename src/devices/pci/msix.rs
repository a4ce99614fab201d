//! MSI-X (PCI Local Bus 3.0, 6.8.2): the capability in configuration space, the vector
//! table and the pending bit array the function exposes in a BAR, and delivery through
//! one KVM route per vector.
//!
//! A vector's KVM route follows its table entry while MSI-X is enabled. Masking (the
//! vector's own mask bit or the function mask) is enforced here: a masked vector's
//! interrupt sets its pending bit instead, and is sent when the vector is unmasked, so the
//! guest loses none.

use crate::vstate::gsi_routes::MsiMessage;

pub const CAPABILITY_ID: u8 = 0x11;
/// Bytes in the capability: ID, next, message control, table and PBA locations.
pub const CAPABILITY_LEN: usize = 12;
/// Bytes per vector table entry: address low, address high, data, vector control.
pub const ENTRY_LEN: u64 = 16;
/// Largest table the capability's 11-bit size field describes.
pub const MAX_VECTORS: u16 = 2048;

const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;

/// Where one vector's messages go: a KVM route and irqfd in a VM, a recorder in tests.
pub trait VectorSink: Send {
    /// The message the vector sends from now on, or (None) none, and whether the guest
    /// masks it. Interrupts ember raises through [`VectorSink::trigger`] are held back
    /// here while masked; a sink whose source signals it directly (a passed-through
    /// device) must hold them back itself.
    fn route(&self, message: Option<MsiMessage>, masked: bool) -> std::io::Result<()>;
    /// Sends the vector's message.
    fn trigger(&self) -> std::io::Result<()>;
    /// Whether the sink holds an interrupt of its own source back (the PBA shows it).
    fn pending(&self) -> bool {
        false
    }
}

impl VectorSink for crate::vstate::vm::MsiVector {
    fn route(&self, message: Option<MsiMessage>, _masked: bool) -> std::io::Result<()> {
        crate::vstate::vm::MsiVector::route(self, message)
    }
    fn trigger(&self) -> std::io::Result<()> {
        crate::vstate::vm::MsiVector::trigger(self)
    }
}

/// Where the table and the PBA are: a BAR and an offset in it (8-byte aligned).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixLayout {
    pub table_bar: u8,
    pub table_offset: u32,
    pub pba_bar: u8,
    pub pba_offset: u32,
}

/// A function's MSI-X state.
pub struct Msix {
    /// Each entry as the guest wrote it: address low, address high, data, vector control.
    table: Vec<[u32; 4]>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    sinks: Vec<Box<dyn VectorSink>>,
}

impl Msix {
    /// One vector per sink, all masked, MSI-X disabled: the state after reset.
    pub fn new(sinks: Vec<Box<dyn VectorSink>>) -> Self {
        let n = sinks.len().min(usize::from(MAX_VECTORS));
        Msix {
            table: vec![[0, 0, 0, VECTOR_MASKED]; n],
            pending: vec![false; n],
            enabled: false,
            function_masked: false,
            sinks,
        }
    }

    pub fn vectors(&self) -> u16 {
        self.table.len() as u16
    }

    /// The capability's bytes and its guest-writable mask (only the enable and function
    /// mask bits of message control).
    pub fn capability(&self, layout: MsixLayout) -> ([u8; CAPABILITY_LEN], [u8; CAPABILITY_LEN]) {
        let mut body = [0u8; CAPABILITY_LEN];
        body[0] = CAPABILITY_ID;
        body[2..4].copy_from_slice(&(self.vectors().saturating_sub(1)).to_le_bytes());
        body[4..8]
            .copy_from_slice(&(layout.table_offset | u32::from(layout.table_bar)).to_le_bytes());
        body[8..12].copy_from_slice(&(layout.pba_offset | u32::from(layout.pba_bar)).to_le_bytes());
        let mut writable = [0u8; CAPABILITY_LEN];
        writable[2..4].copy_from_slice(&(CONTROL_ENABLE | CONTROL_FUNCTION_MASK).to_le_bytes());
        (body, writable)
    }

    /// Bytes the table takes in its BAR.
    pub fn table_len(&self) -> u64 {
        self.table.len() as u64 * ENTRY_LEN
    }

    /// Bytes the PBA takes in its BAR: one bit per vector, in whole qwords.
    pub fn pba_len(&self) -> u64 {
        self.table.len().div_ceil(64) as u64 * 8
    }

    /// The guest wrote message control (the capability's bytes 2-3).
    pub fn set_control(&mut self, control: u16) {
        let enabled = control & CONTROL_ENABLE != 0;
        let function_masked = control & CONTROL_FUNCTION_MASK != 0;
        let changed = enabled != self.enabled || function_masked != self.function_masked;
        self.enabled = enabled;
        self.function_masked = function_masked;
        if changed {
            for v in 0..self.table.len() {
                self.update_route(v);
            }
        }
        self.deliver_pending();
    }

    /// Message control as the guest reads it: table size, enable and function mask.
    pub fn control(&self) -> u16 {
        let mut control = self.vectors().saturating_sub(1);
        if self.enabled {
            control |= CONTROL_ENABLE;
        }
        if self.function_masked {
            control |= CONTROL_FUNCTION_MASK;
        }
        control
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn message(&self, vector: usize) -> MsiMessage {
        let e = self.table[vector];
        MsiMessage {
            address: u64::from(e[0]) | (u64::from(e[1]) << 32),
            data: e[2],
        }
    }

    fn masked(&self, vector: usize) -> bool {
        self.function_masked || self.table[vector][3] & VECTOR_MASKED != 0
    }

    fn update_route(&self, vector: usize) {
        let message = self.enabled.then(|| self.message(vector));
        if let Err(e) = self.sinks[vector].route(message, self.masked(vector)) {
            log::error!("MSI-X: cannot route vector {vector}: {e}");
        }
    }

    fn deliver_pending(&mut self) {
        if !self.enabled {
            return;
        }
        for v in 0..self.table.len() {
            if self.pending[v] && !self.masked(v) {
                self.pending[v] = false;
                self.send(v);
            }
        }
    }

    fn send(&self, vector: usize) {
        if self.sinks[vector].trigger().is_err() {
            // Only a full eventfd counter fails, and that interrupt is pending anyway.
            crate::metrics::METRICS.vmm.interrupt_errors.inc();
        }
    }

    /// The function signals `vector`: sent now, or kept pending while it is masked. False
    /// when nothing can be sent (MSI-X is off, or no such vector).
    pub fn trigger(&mut self, vector: u16) -> bool {
        let v = usize::from(vector);
        if !self.enabled || v >= self.table.len() {
            return false;
        }
        if self.masked(v) {
            self.pending[v] = true;
        } else {
            self.send(v);
        }
        true
    }

    /// The guest reads the table: whole dwords or qwords, naturally aligned (6.8.2.9).
    /// Anything else reads zero.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !matches!(data.len(), 4 | 8) || !offset.is_multiple_of(data.len() as u64) {
            return;
        }
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let dword = offset / 4 + i as u64;
            let entry = (dword / 4) as usize;
            if let Some(e) = self.table.get(entry) {
                chunk.copy_from_slice(&e[(dword % 4) as usize].to_le_bytes());
            }
        }
    }

    /// The guest writes the table. Unmasking a vector sends what it held pending.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        if !matches!(data.len(), 4 | 8) || !offset.is_multiple_of(data.len() as u64) {
            crate::metrics::METRICS.vmm.guest_errors.inc();
            return;
        }
        let mut touched = None;
        for (i, chunk) in data.chunks(4).enumerate() {
            let dword = offset / 4 + i as u64;
            let entry = (dword / 4) as usize;
            let Some(e) = self.table.get_mut(entry) else {
                continue;
            };
            let mut v = [0u8; 4];
            v.copy_from_slice(chunk);
            let value = u32::from_le_bytes(v);
            match dword % 4 {
                // Message addresses are dword aligned: the low two bits are read-only 0.
                0 => e[0] = value & !3,
                3 => e[3] = value & VECTOR_MASKED,
                word => e[word as usize] = value,
            }
            touched = Some(entry);
        }
        if let Some(entry) = touched {
            if self.enabled {
                self.update_route(entry);
            }
            self.deliver_pending();
        }
    }

    /// The guest reads the pending bit array (read-only; writes are ignored).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        for (i, byte) in data.iter_mut().enumerate() {
            let first = (offset as usize + i) * 8;
            for bit in 0..8 {
                let v = first + bit;
                let held = self.pending.get(v).copied().unwrap_or(false)
                    || (v < self.table.len() && self.masked(v) && self.sinks[v].pending());
                if held {
                    *byte |= 1 << bit;
                }
            }
        }
    }
}

/// A vector sink that records what it was told, for tests of MSI-X users.
#[cfg(test)]
pub mod recorder {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// What happened to one vector: its routes (with whether it was masked) and how many
    /// messages it sent.
    #[derive(Clone, Default)]
    pub struct Recorder(Arc<Mutex<Log>>);

    #[derive(Default)]
    struct Log {
        routes: Vec<(Option<MsiMessage>, bool)>,
        sent: usize,
    }

    impl VectorSink for Recorder {
        fn route(&self, message: Option<MsiMessage>, masked: bool) -> std::io::Result<()> {
            self.0.lock().unwrap().routes.push((message, masked));
            Ok(())
        }
        fn trigger(&self) -> std::io::Result<()> {
            self.0.lock().unwrap().sent += 1;
            Ok(())
        }
    }

    impl Recorder {
        pub fn sent(&self) -> usize {
            self.0.lock().unwrap().sent
        }
        /// Every route the vector was given, in order.
        pub fn routes(&self) -> Vec<Option<MsiMessage>> {
            self.0.lock().unwrap().routes.iter().map(|r| r.0).collect()
        }
        pub fn last_route(&self) -> Option<MsiMessage> {
            self.0.lock().unwrap().routes.last().and_then(|r| r.0)
        }
        /// Whether the vector was masked when it was last routed.
        pub fn last_masked(&self) -> Option<bool> {
            self.0.lock().unwrap().routes.last().map(|r| r.1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::recorder::Recorder;
    use super::*;

    fn msix(n: usize) -> (Msix, Vec<Recorder>) {
        let recs: Vec<Recorder> = (0..n).map(|_| Recorder::default()).collect();
        let sinks = recs
            .iter()
            .map(|r| Box::new(r.clone()) as Box<dyn VectorSink>)
            .collect();
        (Msix::new(sinks), recs)
    }

    fn program(m: &mut Msix, vector: u64, address: u64, data: u32) {
        let base = vector * ENTRY_LEN;
        m.write_table(base, &address.to_le_bytes());
        m.write_table(base + 8, &data.to_le_bytes());
    }

    fn unmask(m: &mut Msix, vector: u64) {
        m.write_table(vector * ENTRY_LEN + 12, &0u32.to_le_bytes());
    }

    #[test]
    fn capability_describes_the_table_and_only_control_bits_are_writable() {
        let (m, _) = msix(3);
        let (body, writable) = m.capability(MsixLayout {
            table_bar: 0,
            table_offset: 0x4000,
            pba_bar: 2,
            pba_offset: 0x800,
        });
        assert_eq!(body[0], CAPABILITY_ID);
        assert_eq!(
            u16::from_le_bytes([body[2], body[3]]),
            2,
            "table size is N-1"
        );
        assert_eq!(u32::from_le_bytes(body[4..8].try_into().unwrap()), 0x4000);
        assert_eq!(u32::from_le_bytes(body[8..12].try_into().unwrap()), 0x802);
        assert_eq!(writable, [0, 0, 0, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!((m.table_len(), m.pba_len()), (48, 8));
    }

    #[test]
    fn vectors_start_masked_and_disabled_and_read_back_what_was_written() {
        let (mut m, recs) = msix(2);
        let mut d = [0u8; 4];
        m.read_table(12, &mut d);
        assert_eq!(u32::from_le_bytes(d), VECTOR_MASKED);
        program(&mut m, 1, 0xfee0_1003, 0x4041);
        let mut q = [0u8; 8];
        m.read_table(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_1000, "low address bits are 0");
        m.read_table(24, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x4041);
        // Disabled: nothing is routed or sent.
        assert!(!m.trigger(1));
        assert_eq!(recs[1].sent(), 0);
        assert!(recs[1].routes().is_empty());
        // Unaligned and odd-sized accesses go nowhere.
        m.write_table(17, &[1, 2, 3, 4]);
        m.write_table(16, &[1, 2]);
        m.read_table(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_1000);
    }

    #[test]
    fn enabling_routes_every_vector_and_masked_interrupts_wait_in_the_pba() {
        let (mut m, recs) = msix(2);
        program(&mut m, 0, 0xfee0_0000, 0x30);
        m.set_control(CONTROL_ENABLE);
        assert_eq!(
            recs[0].last_route(),
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x30
            })
        );
        // Vector 0 is still masked: the interrupt is pending, not sent.
        assert!(m.trigger(0));
        assert_eq!(recs[0].sent(), 0);
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 1);
        // Unmasking sends it once and clears the bit.
        unmask(&mut m, 0);
        assert_eq!(recs[0].sent(), 1);
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        assert!(m.trigger(0));
        assert_eq!(recs[0].sent(), 2);
        // The function mask holds every vector back, and lifting it delivers.
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        m.trigger(0);
        m.trigger(0);
        assert_eq!(recs[0].sent(), 2);
        m.set_control(CONTROL_ENABLE);
        assert_eq!(recs[0].sent(), 3, "pending is one bit, sent once");
        // Reprogramming an enabled vector moves its route.
        program(&mut m, 0, 0xfee0_2000, 0x31);
        assert_eq!(recs[0].last_route().map(|r| r.data), Some(0x31));
        // Disabling takes the routes away.
        m.set_control(0);
        assert_eq!(recs[0].last_route(), None);
        assert_eq!(recs[1].last_route(), None);
        // A vector the table does not have is refused.
        m.set_control(CONTROL_ENABLE);
        assert!(!m.trigger(2));
    }
}
