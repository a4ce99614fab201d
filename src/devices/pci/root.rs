//! The root bus: 32 device slots of one function each, the host bridge in slot 0, and the
//! routing of guest memory accesses to the BARs the functions decode.

use std::sync::{Arc, Mutex, RwLock};

use super::config_space::{
    BarKind, BarRegion, CLASS_BRIDGE, ConfigSpace, Identity, SUBCLASS_HOST_BRIDGE,
};
use crate::devices::bus::BusDevice;

/// Device slots on a PCI bus (device numbers 0-31).
pub const SLOTS: usize = 32;
/// Functions per slot; ember's devices are single-function, so only function 0 answers.
pub const FUNCTIONS: usize = 8;

/// The host bridge's identity: Red Hat's vendor ID for virtual hardware, its generic PCIe
/// host bridge device ID. Guests bind no driver to it; they only see a bridge class.
const HOST_BRIDGE_VENDOR: u16 = 0x1b36;
const HOST_BRIDGE_DEVICE: u16 = 0x0008;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciRootError {
    #[error("the PCI bus is full: all {SLOTS} device slots are taken")]
    BusFull,
}

/// A PCI function as the root bus sees it: its configuration space and its BARs.
pub trait PciDevice: Send {
    fn config(&self) -> &ConfigSpace;
    fn config_mut(&mut self) -> &mut ConfigSpace;
    /// The guest reads configuration space; a function with registers that read through
    /// to somewhere else (virtio's PCI configuration access window) overrides this.
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data);
    }
    /// The guest writes configuration space; a function with registers that act (MSI-X
    /// enable, say) overrides this and then calls the plain write.
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config_mut().write(offset, data);
    }
    /// The guest reads `data.len()` bytes at `offset` into BAR `bar`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` into BAR `bar`.
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// The function's decoding memory BARs changed (moved, or decode turned on or off):
    /// `bars` is where they decode now. A function with fast paths registered at a BAR's
    /// address (ioeventfds, mapped memory) moves them here.
    fn decoding_changed(&mut self, _bars: &[BarRegion]) {}
}

type SharedFunction = Arc<Mutex<dyn PciDevice>>;

/// Where one decoding memory BAR is and whose it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Route {
    region: BarRegion,
    slot: usize,
}

/// The root bus.
pub struct PciRoot {
    slots: RwLock<Vec<Option<SharedFunction>>>,
    /// Every memory BAR that decodes, refreshed after each configuration write (the only
    /// way a BAR moves or starts decoding).
    routes: RwLock<Vec<Route>>,
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    /// A bus with the host bridge at 00:00.0.
    pub fn new() -> Self {
        let mut slots: Vec<Option<SharedFunction>> = vec![None; SLOTS];
        slots[0] = Some(Arc::new(Mutex::new(HostBridge::new())));
        PciRoot {
            slots: RwLock::new(slots),
            routes: RwLock::new(Vec::new()),
        }
    }

    /// Puts `function` in the first free slot and returns the slot (its device number).
    pub fn add(&self, function: SharedFunction) -> Result<u8, PciRootError> {
        let slot = {
            let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
            let slot = slots
                .iter()
                .position(Option::is_none)
                .ok_or(PciRootError::BusFull)?;
            slots[slot] = Some(function);
            slot
        };
        self.refresh_routes(slot);
        Ok(slot as u8)
    }

    fn slot(&self, slot: usize) -> Option<SharedFunction> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots.get(slot)?.clone()
    }

    fn function(&self, bus: u8, device: u8, function: u8) -> Option<SharedFunction> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.slot(usize::from(device))
    }

    /// Reads configuration space; a function that does not exist reads all ones, which is
    /// how software finds the bus's functions (vendor ID 0xffff).
    pub fn config_read(&self, bus: u8, device: u8, function: u8, offset: usize, data: &mut [u8]) {
        match self.function(bus, device, function) {
            Some(f) => lock(&f).read_config(offset, data),
            None => data.fill(0xff),
        }
    }

    /// Writes configuration space; to a function that does not exist it goes nowhere.
    pub fn config_write(&self, bus: u8, device: u8, function: u8, offset: usize, data: &[u8]) {
        if let Some(f) = self.function(bus, device, function) {
            lock(&f).write_config(offset, data);
            self.refresh_routes(usize::from(device));
        }
    }

    /// Re-reads where `slot`'s memory BARs decode and tells the function when that
    /// changed.
    fn refresh_routes(&self, slot: usize) {
        let Some(f) = self.slot(slot) else {
            return;
        };
        let regions: Vec<BarRegion> = lock(&f)
            .config()
            .decoding_bars()
            .into_iter()
            .filter(|r| r.kind != BarKind::Io)
            .collect();
        let changed = {
            let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
            let before: Vec<BarRegion> = routes
                .iter()
                .filter(|r| r.slot == slot)
                .map(|r| r.region)
                .collect();
            routes.retain(|r| r.slot != slot);
            routes.extend(regions.iter().map(|&region| Route { region, slot }));
            before != regions
        };
        if changed {
            lock(&f).decoding_changed(&regions);
        }
    }

    /// The function, BAR and offset a memory access at `addr` reaches, if any.
    fn route(&self, addr: u64, len: usize) -> Option<(SharedFunction, usize, u64)> {
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
        let r = routes
            .iter()
            .find(|r| r.region.contains(addr, len as u64))?;
        let f = self.slot(r.slot)?;
        Some((f, r.region.index, addr - r.region.addr))
    }

    /// Every decoding memory BAR: (device number, region).
    pub fn decoding_bars(&self) -> Vec<(u8, BarRegion)> {
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
        routes.iter().map(|r| (r.slot as u8, r.region)).collect()
    }
}

fn lock(f: &SharedFunction) -> std::sync::MutexGuard<'_, dyn PciDevice + 'static> {
    f.lock().unwrap_or_else(|e| e.into_inner())
}

/// One of the root's MMIO windows on the MMIO bus: an access lands in whichever BAR the
/// guest placed there, or reads ones and writes nothing when no BAR holds it.
pub struct BarWindow {
    root: Arc<PciRoot>,
    base: u64,
}

impl BarWindow {
    pub fn new(root: Arc<PciRoot>, base: u64) -> Self {
        BarWindow { root, base }
    }
}

impl BusDevice for BarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.root.route(self.base + offset, data.len()) {
            Some((f, bar, at)) => lock(&f).read_bar(bar, at, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((f, bar, at)) = self.root.route(self.base + offset, data.len()) {
            lock(&f).write_bar(bar, at, data);
        }
    }
}

/// The host bridge at 00:00.0: a header and nothing behind it.
pub struct HostBridge {
    config: ConfigSpace,
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl HostBridge {
    pub fn new() -> Self {
        HostBridge {
            config: ConfigSpace::new(Identity {
                vendor_id: HOST_BRIDGE_VENDOR,
                device_id: HOST_BRIDGE_DEVICE,
                revision_id: 0,
                class: CLASS_BRIDGE,
                subclass: SUBCLASS_HOST_BRIDGE,
                prog_if: 0,
                subsystem_vendor_id: HOST_BRIDGE_VENDOR,
                subsystem_id: 0x1100,
            }),
        }
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }
    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::pci::config_space::COMMAND_MEMORY_SPACE;

    /// A function with one memory BAR whose bytes read back what was written.
    pub(crate) struct Scratchpad {
        pub config: ConfigSpace,
        pub memory: Vec<u8>,
    }

    impl Scratchpad {
        pub(crate) fn new(bar_addr: u64) -> Self {
            let mut config = ConfigSpace::new(Identity {
                vendor_id: 0x1af4,
                device_id: 0x10ff,
                revision_id: 0,
                class: 0xff,
                subclass: 0,
                prog_if: 0,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            });
            config
                .add_bar(
                    0,
                    BarKind::Memory32 {
                        prefetchable: false,
                    },
                    0x1000,
                    bar_addr,
                )
                .unwrap();
            Scratchpad {
                config,
                memory: vec![0; 0x1000],
            }
        }
    }

    impl PciDevice for Scratchpad {
        fn config(&self) -> &ConfigSpace {
            &self.config
        }
        fn config_mut(&mut self) -> &mut ConfigSpace {
            &mut self.config
        }
        fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            assert_eq!(bar, 0);
            let at = offset as usize;
            data.copy_from_slice(&self.memory[at..at + data.len()]);
        }
        fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
            assert_eq!(bar, 0);
            let at = offset as usize;
            self.memory[at..at + data.len()].copy_from_slice(data);
        }
    }

    fn read32(root: &PciRoot, device: u8, offset: usize) -> u32 {
        let mut b = [0; 4];
        root.config_read(0, device, 0, offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn host_bridge_answers_and_empty_slots_read_ones() {
        let root = PciRoot::new();
        assert_eq!(read32(&root, 0, 0), 0x0008_1b36);
        assert_eq!(read32(&root, 0, 8) >> 8, 0x06_00_00);
        assert_eq!(read32(&root, 1, 0), 0xffff_ffff);
        assert_eq!(read32(&root, 31, 0), 0xffff_ffff);
        let mut b = [0; 4];
        root.config_read(0, 0, 1, 0, &mut b);
        assert_eq!(b, [0xff; 4], "function 1 does not exist");
        root.config_read(1, 0, 0, 0, &mut b);
        assert_eq!(b, [0xff; 4], "bus 1 does not exist");
        root.config_read(0, 32, 0, 0, &mut b);
        assert_eq!(b, [0xff; 4], "there is no device 32");
        // Writes to nothing go nowhere.
        root.config_write(0, 5, 0, 4, &[0xff; 4]);
    }

    #[test]
    fn functions_fill_free_slots_until_the_bus_is_full() {
        let root = PciRoot::new();
        for want in 1..SLOTS {
            let slot = root
                .add(Arc::new(Mutex::new(Scratchpad::new(0xc000_0000))))
                .unwrap();
            assert_eq!(usize::from(slot), want);
        }
        assert_eq!(
            root.add(Arc::new(Mutex::new(Scratchpad::new(0xc000_0000)))),
            Err(PciRootError::BusFull)
        );
    }

    #[test]
    fn bar_accesses_follow_the_bar_when_the_guest_moves_it() {
        let root = PciRoot::new();
        let pad = Arc::new(Mutex::new(Scratchpad::new(0xc000_0000)));
        let slot = root.add(pad.clone()).unwrap();
        let root = Arc::new(root);
        let mut window = BarWindow::new(root.clone(), 0xc000_0000);
        let mut b = [0u8; 4];

        // Memory decoding is off: nothing answers.
        window.write(0x10, &[1, 2, 3, 4]);
        window.read(0x10, &mut b);
        assert_eq!(b, [0xff; 4]);
        assert!(pad.lock().unwrap().memory.iter().all(|&x| x == 0));

        root.config_write(0, slot, 0, 4, &COMMAND_MEMORY_SPACE.to_le_bytes());
        window.write(0x10, &[1, 2, 3, 4]);
        window.read(0x10, &mut b);
        assert_eq!(b, [1, 2, 3, 4]);

        // Moved 64 KiB up: the old place is empty, the new one reaches the same bytes.
        root.config_write(0, slot, 0, 0x10, &0xc001_0000u32.to_le_bytes());
        window.read(0x10, &mut b);
        assert_eq!(b, [0xff; 4]);
        window.read(0x1_0010, &mut b);
        assert_eq!(b, [1, 2, 3, 4]);
        assert_eq!(root.decoding_bars()[0].1.addr, 0xc001_0000);
        // An access crossing the BAR's end is not the BAR's.
        window.read(0x1_0ffe, &mut b);
        assert_eq!(b, [0xff; 4]);
    }
}
