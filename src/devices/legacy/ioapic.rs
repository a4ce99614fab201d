//! The I/O APIC in ember, for KVM's split irqchip (the local APICs stay in the kernel):
//! 24 pins with redirection entries, edge and level triggers, remote IRR, and EOI from the
//! local APICs through `KVM_EXIT_IOAPIC_EOI` (version 0x11 has no EOI register).
//!
//! A pin's interrupt goes to the local APICs as the MSI its redirection entry describes
//! (`KVM_SIGNAL_MSI`). KVM exits on an EOI only for vectors it finds in level-triggered
//! MSI routes on the I/O APIC's GSIs, so every unmasked entry is also mirrored into KVM's
//! routing table; the routes carry no interrupts themselves.
//!
//! Register interface: IOREGSEL at 0x00, IOWIN at 0x10 (82093AA datasheet, 3.1); registers
//! 0x00 ID, 0x01 version, 0x02 arbitration, 0x10 + 2n / 0x11 + 2n the low and high halves
//! of redirection entry n.

use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;
use crate::metrics::METRICS;

/// The I/O APIC's register window on the MMIO bus.
pub const IOAPIC_WINDOW: u64 = 0x1000;
/// Redirection entries (pins), as the MP table and the MADT announce.
pub const PINS: usize = 24;
/// Version 0x11: the 82093AA's register set (no EOI register), as KVM's I/O APIC reports.
pub const VERSION: u32 = 0x11;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const REG_ID: u8 = 0x00;
const REG_VERSION: u8 = 0x01;
const REG_ARBITRATION: u8 = 0x02;
const REG_REDIRECTION: u8 = 0x10;

// Redirection entry bits (low half).
const VECTOR: u64 = 0xff;
const DELIVERY_MODE_SHIFT: u64 = 8;
const DELIVERY_MODE: u64 = 0b111 << DELIVERY_MODE_SHIFT;
const DEST_MODE_LOGICAL: u64 = 1 << 11;
const DELIVERY_STATUS: u64 = 1 << 12;
const REMOTE_IRR: u64 = 1 << 14;
const TRIGGER_LEVEL: u64 = 1 << 15;
const MASKED: u64 = 1 << 16;
/// What the guest may write: vector, delivery mode, destination mode, polarity, trigger,
/// mask, destination (bits 56-63). Delivery status and remote IRR are the I/O APIC's.
const WRITABLE: u64 = !(DELIVERY_STATUS | REMOTE_IRR) & (0xff << 56 | 0x1_ffff);

/// Delivers the I/O APIC's messages: KVM in a VM, a recorder in tests.
pub trait MsiSink: Send {
    /// Sends one MSI to the local APICs.
    fn signal_msi(&self, address: u64, data: u32) -> std::io::Result<()>;
    /// Replaces KVM's routes for the I/O APIC's pins with `routes` (gsi, address, data),
    /// so it knows which vectors' EOIs to report.
    fn set_routes(&self, routes: &[(u32, u64, u32)]) -> std::io::Result<()>;
}

pub struct Ioapic {
    id: u32,
    select: u8,
    redirection: [u64; PINS],
    /// Whether each pin's input is asserted (a level-triggered source holding it high).
    level: [bool; PINS],
    /// Pins whose source cannot be read back (a passed-through function's INTx): the
    /// guest's EOI releases the line and signals the eventfd, and the source asserts again
    /// if it still needs service.
    resample: Vec<Option<EventFd>>,
    sink: Box<dyn MsiSink>,
}

/// The I/O APIC's registers and input levels as a snapshot keeps them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IoapicState {
    pub id: u32,
    pub select: u8,
    pub redirection: Vec<u64>,
    pub level: Vec<bool>,
}

impl Ioapic {
    /// The registers and input levels, for a snapshot.
    pub fn save_state(&self) -> IoapicState {
        IoapicState {
            id: self.id,
            select: self.select,
            redirection: self.redirection.to_vec(),
            level: self.level.to_vec(),
        }
    }

    /// Puts the I/O APIC back in a saved state and tells KVM its routes again.
    pub fn restore_state(&mut self, state: &IoapicState) {
        self.id = state.id;
        self.select = state.select;
        for (mine, saved) in self.redirection.iter_mut().zip(&state.redirection) {
            *mine = *saved;
        }
        for (mine, saved) in self.level.iter_mut().zip(&state.level) {
            *mine = *saved;
        }
        self.update_routes();
    }

    /// An I/O APIC with ID `id` (the MP table's and the MADT's), every pin masked.
    pub fn new(id: u8, sink: Box<dyn MsiSink>) -> Self {
        Ioapic {
            id: u32::from(id) << 24,
            select: 0,
            redirection: [MASKED; PINS],
            level: [false; PINS],
            resample: (0..PINS).map(|_| None).collect(),
            sink,
        }
    }

    /// Makes `pin` a resampled line: each EOI of its interrupt lowers it and signals
    /// `resample`.
    pub fn set_resample(&mut self, pin: usize, resample: EventFd) {
        if let Some(r) = self.resample.get_mut(pin) {
            *r = Some(resample);
        }
    }

    /// Sets the I/O APIC's ID (the one the MP table and the MADT give it).
    pub fn set_id(&mut self, id: u8) {
        self.id = u32::from(id) << 24;
    }

    /// A source raised pin `pin`: an edge-triggered pin sends its interrupt; a
    /// level-triggered one sends it unless the last one is not yet acknowledged (remote
    /// IRR), and holds the input high until [`Self::lower`].
    pub fn raise(&mut self, pin: usize) {
        let Some(entry) = self.redirection.get(pin).copied() else {
            return;
        };
        self.level[pin] = true;
        if entry & TRIGGER_LEVEL == 0 || entry & REMOTE_IRR == 0 {
            self.deliver(pin);
        }
    }

    /// The source released pin `pin` (a level-triggered line goes low).
    pub fn lower(&mut self, pin: usize) {
        if let Some(l) = self.level.get_mut(pin) {
            *l = false;
        }
    }

    /// A local APIC acknowledged `vector` of a level-triggered interrupt: the pins that sent
    /// it may send again, and do at once if their input is still high.
    pub fn end_of_interrupt(&mut self, vector: u8) {
        for pin in 0..PINS {
            let entry = self.redirection[pin];
            if entry & VECTOR != u64::from(vector) || entry & REMOTE_IRR == 0 {
                continue;
            }
            self.redirection[pin] &= !REMOTE_IRR;
            if let Some(resample) = &self.resample[pin] {
                self.level[pin] = false;
                if resample.write(1).is_err() {
                    METRICS.vmm.interrupt_errors.inc();
                }
            }
            if self.level[pin] && entry & TRIGGER_LEVEL != 0 {
                self.deliver(pin);
            }
        }
    }

    fn deliver(&mut self, pin: usize) {
        let entry = self.redirection[pin];
        if entry & MASKED != 0 {
            // An edge on a masked pin is lost, as on the chip; a level stays in `level`
            // and is delivered when the pin is unmasked.
            return;
        }
        let (address, data) = message(entry);
        if entry & TRIGGER_LEVEL != 0 {
            self.redirection[pin] |= REMOTE_IRR;
        }
        if self.sink.signal_msi(address, data).is_err() {
            METRICS.vmm.interrupt_errors.inc();
        }
    }

    fn read_register(&self) -> u32 {
        match self.select {
            REG_ID => self.id,
            REG_VERSION => VERSION | ((PINS as u32 - 1) << 16),
            REG_ARBITRATION => self.id,
            r if r >= REG_REDIRECTION => {
                let index = usize::from(r - REG_REDIRECTION);
                match self.redirection.get(index / 2) {
                    Some(e) if index % 2 == 0 => *e as u32,
                    Some(e) => (*e >> 32) as u32,
                    None => 0,
                }
            }
            _ => 0,
        }
    }

    fn write_register(&mut self, value: u32) {
        match self.select {
            // Eight ID bits, as KVM's I/O APIC has (up to 32 CPUs come before it).
            REG_ID => self.id = value & (0xff << 24),
            r if r >= REG_REDIRECTION => {
                let index = usize::from(r - REG_REDIRECTION);
                let pin = index / 2;
                let Some(old) = self.redirection.get(pin).copied() else {
                    return;
                };
                let written = if index % 2 == 0 {
                    (old & !0xffff_ffff) | u64::from(value)
                } else {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                };
                let mut entry = (written & WRITABLE) | (old & REMOTE_IRR);
                // An edge-triggered entry has no remote IRR.
                if entry & TRIGGER_LEVEL == 0 {
                    entry &= !REMOTE_IRR;
                }
                self.redirection[pin] = entry;
                if entry != old {
                    self.update_routes();
                }
                // Unmasked with its level input high and nothing outstanding: send now.
                if entry & MASKED == 0
                    && entry & TRIGGER_LEVEL != 0
                    && entry & REMOTE_IRR == 0
                    && self.level[pin]
                {
                    self.deliver(pin);
                }
            }
            // Version and arbitration are read-only.
            _ => {}
        }
    }

    fn update_routes(&mut self) {
        let routes: Vec<(u32, u64, u32)> = self
            .redirection
            .iter()
            .enumerate()
            .filter(|(_, e)| **e & MASKED == 0)
            .map(|(pin, e)| {
                let (address, data) = message(*e);
                (pin as u32, address, data)
            })
            .collect();
        if let Err(e) = self.sink.set_routes(&routes) {
            METRICS.vmm.interrupt_errors.inc();
            crate::rate_limited_log!(
                log::Level::Warn,
                "ioapic: cannot tell KVM the interrupt routes: {e}"
            );
        }
    }
}

/// The MSI a redirection entry stands for (Intel SDM vol. 3, 11.11): destination and
/// destination mode in the address; vector, delivery mode and trigger mode in the data.
fn message(entry: u64) -> (u64, u32) {
    let destination = (entry >> 56) & 0xff;
    let logical = entry & DEST_MODE_LOGICAL != 0;
    let address = 0xfee0_0000 | (destination << 12) | (u64::from(logical) << 2);
    let level = entry & TRIGGER_LEVEL != 0;
    let data = (entry & (VECTOR | DELIVERY_MODE)) as u32
        | (u32::from(level) << 15)
        // Assert: the only level a message carries.
        | (1 << 14);
    (address, data)
}

impl BusDevice for Ioapic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            IOREGSEL => u32::from(self.select),
            IOWIN => self.read_register(),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Registers are written as 32-bit values; a shorter write fills the low bytes.
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(bytes);
        match offset {
            IOREGSEL => self.select = value as u8,
            IOWIN => self.write_register(value),
            _ => {}
        }
    }
}

/// One of the I/O APIC's input pins, as a device's interrupt line.
pub struct IoapicPin {
    ioapic: Arc<Mutex<Ioapic>>,
    pin: usize,
}

impl IoapicPin {
    pub fn new(ioapic: Arc<Mutex<Ioapic>>, pin: u32) -> Self {
        IoapicPin {
            ioapic,
            pin: pin as usize,
        }
    }
}

impl super::Line for IoapicPin {
    fn raise(&self) -> std::io::Result<()> {
        self.ioapic
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .raise(self.pin);
        Ok(())
    }

    fn lower(&self) {
        self.ioapic
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lower(self.pin);
    }
}

/// A level-triggered source that signals an eventfd when it asserts its line (the host
/// kernel's trigger for a passed-through function's INTx), raising an I/O APIC pin from
/// the event loop; the pin's resample eventfd ([`Ioapic::set_resample`]) tells the source
/// when the guest is done.
pub struct EventfdLevelSource {
    pub what: String,
    pub trigger: EventFd,
    pub pin: IoapicPin,
}

impl MutEventSubscriber for EventfdLevelSource {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // A read error only means the counter was already drained.
        if self.trigger.read().is_ok() {
            let _ = super::Line::raise(&self.pin);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.trigger, EventSet::IN)) {
            log::error!("{}: cannot watch its interrupt line: {e}", self.what);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Sent = Arc<Mutex<Vec<(u64, u32)>>>;
    type Routes = Arc<Mutex<Vec<Vec<(u32, u64, u32)>>>>;

    struct Recorder(Sent, Routes);

    impl MsiSink for Recorder {
        fn signal_msi(&self, address: u64, data: u32) -> std::io::Result<()> {
            self.0.lock().unwrap().push((address, data));
            Ok(())
        }
        fn set_routes(&self, routes: &[(u32, u64, u32)]) -> std::io::Result<()> {
            self.1.lock().unwrap().push(routes.to_vec());
            Ok(())
        }
    }

    fn ioapic() -> (Ioapic, Sent, Routes) {
        let sent = Sent::default();
        let routes = Routes::default();
        let io = Ioapic::new(2, Box::new(Recorder(sent.clone(), routes.clone())));
        (io, sent, routes)
    }

    fn write_reg(io: &mut Ioapic, reg: u8, value: u32) {
        io.write(IOREGSEL, &[reg]);
        io.write(IOWIN, &value.to_le_bytes());
    }

    fn read_reg(io: &mut Ioapic, reg: u8) -> u32 {
        io.write(IOREGSEL, &[reg]);
        let mut b = [0u8; 4];
        io.read(IOWIN, &mut b);
        u32::from_le_bytes(b)
    }

    /// Programs pin `pin`: vector, level or edge, masked or not, to APIC ID `dest`.
    fn program(io: &mut Ioapic, pin: u8, vector: u8, level: bool, masked: bool, dest: u8) {
        let low = u32::from(vector)
            | if level { TRIGGER_LEVEL as u32 } else { 0 }
            | if masked { MASKED as u32 } else { 0 };
        write_reg(io, REG_REDIRECTION + 2 * pin + 1, u32::from(dest) << 24);
        write_reg(io, REG_REDIRECTION + 2 * pin, low);
    }

    #[test]
    fn a_saved_ioapic_restores_its_pins_and_tells_kvm_its_routes_again() {
        let (mut io, _, _) = ioapic();
        program(&mut io, 4, 0x31, false, false, 1);
        program(&mut io, 9, 0x41, true, false, 0);
        io.raise(9); // level, delivered: remote IRR set, input high
        let saved: IoapicState =
            serde_json::from_str(&serde_json::to_string(&io.save_state()).unwrap()).unwrap();
        let (mut fresh, sent, routes) = ioapic();
        fresh.restore_state(&saved);
        assert_eq!(fresh.save_state(), saved);
        assert_eq!(read_reg(&mut fresh, REG_REDIRECTION + 8) & 0xff, 0x31);
        let pushed = routes.lock().unwrap().last().cloned().unwrap();
        assert_eq!(pushed.iter().map(|r| r.0).collect::<Vec<_>>(), vec![4, 9]);
        // The level pin's interrupt is still outstanding: its EOI delivers it again, as
        // the input is still high.
        fresh.end_of_interrupt(0x41);
        assert_eq!(sent.lock().unwrap().len(), 1);
    }

    #[test]
    fn identity_version_and_reset_state() {
        let (mut io, sent, _) = ioapic();
        assert_eq!(read_reg(&mut io, REG_ID), 2 << 24);
        assert_eq!(read_reg(&mut io, REG_VERSION), 0x0017_0011);
        assert_eq!(read_reg(&mut io, REG_ARBITRATION), 2 << 24);
        for pin in 0..PINS as u8 {
            assert_eq!(read_reg(&mut io, REG_REDIRECTION + 2 * pin), MASKED as u32);
        }
        // Masked at reset: nothing goes out.
        io.raise(4);
        assert!(sent.lock().unwrap().is_empty());
        // The ID is writable (Linux renumbers I/O APICs), version is not.
        write_reg(&mut io, REG_ID, 5 << 24);
        write_reg(&mut io, REG_VERSION, 0);
        assert_eq!(read_reg(&mut io, REG_ID), 5 << 24);
        assert_eq!(read_reg(&mut io, REG_VERSION), 0x0017_0011);
    }

    #[test]
    fn an_edge_pin_sends_its_message_on_every_raise() {
        let (mut io, sent, routes) = ioapic();
        program(&mut io, 4, 0x34, false, false, 1);
        io.raise(4);
        io.raise(4);
        let want = (0xfee0_1000, 0x4034);
        assert_eq!(*sent.lock().unwrap(), vec![want, want]);
        // The unmasked entry is mirrored into KVM's routes.
        assert_eq!(
            routes.lock().unwrap().last().unwrap(),
            &vec![(4, 0xfee0_1000, 0x4034)]
        );
        // No remote IRR on an edge pin.
        assert_eq!(
            read_reg(&mut io, REG_REDIRECTION + 8) & REMOTE_IRR as u32,
            0
        );
    }

    #[test]
    fn a_level_pin_waits_for_eoi_and_sends_again_while_still_raised() {
        let (mut io, sent, _) = ioapic();
        program(&mut io, 5, 0x41, true, false, 0);
        io.raise(5);
        assert_eq!(sent.lock().unwrap().len(), 1);
        assert_eq!(sent.lock().unwrap()[0], (0xfee0_0000, 0xc041));
        assert_ne!(
            read_reg(&mut io, REG_REDIRECTION + 10) & REMOTE_IRR as u32,
            0
        );
        // Raised again before the EOI: nothing more (remote IRR).
        io.raise(5);
        assert_eq!(sent.lock().unwrap().len(), 1);
        // An EOI for another vector changes nothing.
        io.end_of_interrupt(0x42);
        assert_eq!(sent.lock().unwrap().len(), 1);
        // EOI with the line still high: sent again at once.
        io.end_of_interrupt(0x41);
        assert_eq!(sent.lock().unwrap().len(), 2);
        // Lowered, then EOI: remote IRR clears, nothing sent.
        io.lower(5);
        io.end_of_interrupt(0x41);
        assert_eq!(sent.lock().unwrap().len(), 2);
        assert_eq!(
            read_reg(&mut io, REG_REDIRECTION + 10) & REMOTE_IRR as u32,
            0
        );
        // Raised again: a new interrupt.
        io.raise(5);
        assert_eq!(sent.lock().unwrap().len(), 3);
    }

    #[test]
    fn a_resampled_pin_is_released_at_eoi_and_its_source_told() {
        let (mut io, sent, _) = ioapic();
        program(&mut io, 20, 0x48, true, false, 0);
        let resample = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        io.set_resample(20, resample.try_clone().unwrap());
        io.raise(20);
        assert_eq!(sent.lock().unwrap().len(), 1);
        assert!(
            resample.read().is_err(),
            "nothing to resample before the EOI"
        );
        // The EOI lowers the line (its source cannot be asked) and tells the source, which
        // asserts again only if it still needs service: no second message on its own.
        io.end_of_interrupt(0x48);
        assert_eq!(resample.read().unwrap(), 1);
        assert_eq!(sent.lock().unwrap().len(), 1);
        // The source asserts again: a new interrupt.
        io.raise(20);
        assert_eq!(sent.lock().unwrap().len(), 2);
        // Through the event loop's path: the trigger eventfd raises the pin.
        let io = Arc::new(Mutex::new(io));
        io.lock().unwrap().end_of_interrupt(0x48);
        let trigger = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let source = Arc::new(Mutex::new(EventfdLevelSource {
            what: "test".into(),
            trigger: trigger.try_clone().unwrap(),
            pin: IoapicPin::new(io.clone(), 20),
        }));
        let mut event_loop =
            event_manager::EventManager::<Arc<Mutex<EventfdLevelSource>>>::new().unwrap();
        event_manager::SubscriberOps::add_subscriber(&mut event_loop, source);
        trigger.write(1).unwrap();
        event_loop.run_with_timeout(1000).unwrap();
        assert_eq!(sent.lock().unwrap().len(), 3);
    }

    #[test]
    fn masking_holds_a_level_interrupt_until_unmasked_and_drops_an_edge() {
        let (mut io, sent, routes) = ioapic();
        program(&mut io, 6, 0x50, true, true, 0);
        program(&mut io, 7, 0x51, false, true, 0);
        io.raise(6);
        io.raise(7);
        assert!(sent.lock().unwrap().is_empty());
        assert!(
            routes.lock().unwrap().last().unwrap().is_empty(),
            "masked: no route"
        );
        // Unmasking the level pin with its line high sends it; the edge was lost.
        program(&mut io, 6, 0x50, true, false, 0);
        program(&mut io, 7, 0x51, false, false, 0);
        assert_eq!(*sent.lock().unwrap(), vec![(0xfee0_0000, 0xc050)]);
        assert_eq!(routes.lock().unwrap().last().unwrap().len(), 2);
    }

    #[test]
    fn a_redirection_change_while_pending_goes_to_the_new_vector() {
        let (mut io, sent, _) = ioapic();
        program(&mut io, 9, 0x60, true, false, 0);
        io.raise(9);
        assert_eq!(sent.lock().unwrap().len(), 1);
        // The guest moves the pin to another vector and CPU while the first is in service:
        // remote IRR survives the rewrite, and the EOI that clears it is the old vector's.
        program(&mut io, 9, 0x61, true, false, 3);
        assert_ne!(
            read_reg(&mut io, REG_REDIRECTION + 18) & REMOTE_IRR as u32,
            0
        );
        io.end_of_interrupt(0x60);
        assert_eq!(
            sent.lock().unwrap().len(),
            1,
            "the old vector's EOI is not this pin's"
        );
        io.end_of_interrupt(0x61);
        assert_eq!(sent.lock().unwrap().last(), Some(&(0xfee0_3000, 0xc061)));
    }

    #[test]
    fn guest_cannot_set_remote_irr_or_delivery_status_and_bad_pins_are_ignored() {
        let (mut io, sent, _) = ioapic();
        write_reg(
            &mut io,
            REG_REDIRECTION,
            (REMOTE_IRR | DELIVERY_STATUS | TRIGGER_LEVEL) as u32 | 0x30,
        );
        assert_eq!(
            read_reg(&mut io, REG_REDIRECTION),
            (TRIGGER_LEVEL as u32) | 0x30
        );
        io.raise(PINS);
        io.lower(PINS + 5);
        assert_eq!(read_reg(&mut io, REG_REDIRECTION + 2 * PINS as u8), 0);
        assert!(sent.lock().unwrap().is_empty(), "pin 0 was never raised");
    }
}
