//! A host PCI function as the guest sees it: configuration space read from the device
//! except what ember must own (the BARs, the command register's decode bits, the MSI-X
//! capability, the capability chain and the interrupt line and pin), BARs mapped straight
//! into the guest where the kernel allows it, and MSI-X emulated in front of the device's
//! own vectors.
//!
//! Why each piece is shadowed:
//! - BARs: the guest's addresses are guest physical, the device's are host physical; ember
//!   places the BARs in its PCI windows and maps the device's memory there.
//! - MSI-X: the host kernel owns the physical vector table (it holds host interrupt
//!   vectors); the guest programs an emulated table whose entries become KVM routes, and
//!   the device's vectors signal the same eventfds KVM's irqfds wait on.
//! - MSI, likewise: the guest programs an emulated capability at the device's offsets, its
//!   vectors become KVM routes, and enabling it enables the device's MSI vectors on the host.
//! - INTx: the line goes to a GSI of its own (the host bridge's `_PRT` says which, and the
//!   interrupt line register holds it, as firmware leaves it). The host kernel masks the
//!   line each time it fires and signals an eventfd; the guest's EOI signals the unmask
//!   eventfd. The kernel takes one interrupt kind at a time, so INTx is off on the host
//!   while the guest has MSI or MSI-X on, and back on when it turns them off.

use std::sync::Arc;

use vm_memory::MmapRegion;
use vmm_sys_util::eventfd::EventFd;

use super::backend::{RegionInfo, VfioBackend};
use crate::devices::pci::config_space::{BarKind, BarRegion, ConfigSpace, Identity};
use crate::devices::pci::msi::{self, Msi};
use crate::devices::pci::msix::{self, Msix, MsixLayout, VectorSink};
use crate::devices::pci::root::PciDevice;

const PAGE_SIZE: u64 = 4096;
const BAR0: u64 = 0x10;
const BAR_COUNT: usize = 6;
const HEADER_TYPE: usize = 0x0e;
const ROM_ADDRESS: usize = 0x30;
const CAPABILITIES_POINTER: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
const INTERRUPT_PIN: usize = 0x3d;
const COMMAND: usize = 0x04;
const HEADER_END: usize = 0x40;
const LEGACY_END: usize = 0x100;
/// More capabilities than fit in 192 bytes means a loop in a broken device's chain.
const MAX_CAPABILITIES: usize = 48;

#[derive(Debug, thiserror::Error)]
pub enum VfioFunctionError {
    #[error("BAR {index}: {size:#x} bytes is not a size a BAR can have")]
    BarSize { index: usize, size: u64 },
    #[error("BAR {index}: no room in the PCI window: {reason}")]
    BarSpace { index: usize, reason: String },
    #[error("BAR {index}: {0}", index = .1)]
    Config(crate::devices::pci::ConfigSpaceError, usize),
    #[error("no interrupt vectors for it: {reason}")]
    Vectors { reason: String },
    #[error("the MSI-X capability names BAR {0}, which the function does not have")]
    MsixBar(u8),
    #[error("the function has {have} MSI-X vectors, its capability says {said}")]
    MsixVectors { have: usize, said: u16 },
    #[error("cannot turn its INTx line on: {0}")]
    Intx(std::io::Error),
    #[error("cannot map BAR {index} (+{offset:#x}, {len:#x} bytes): {source}")]
    MapBar {
        index: usize,
        offset: u64,
        len: u64,
        source: std::io::Error,
    },
}

/// Places the guest's memory mappings of BARs: KVM memory slots in a VM, a recorder in
/// tests. What `map` returns unmaps when dropped.
pub trait GuestMapper: Send {
    fn map(&self, gpa: u64, memory: Arc<MmapRegion<()>>) -> std::io::Result<Box<dyn Send + Sync>>;
}

impl GuestMapper for crate::vstate::vm::VmHandle {
    fn map(&self, gpa: u64, memory: Arc<MmapRegion<()>>) -> std::io::Result<Box<dyn Send + Sync>> {
        self.map_memory(gpa, memory)
            .map(|slot| Box::new(slot) as Box<dyn Send + Sync>)
            .map_err(std::io::Error::other)
    }
}

/// A part of a BAR mapped into ember, and where the guest sees it now.
struct MappedArea {
    offset: u64,
    memory: Arc<MmapRegion<()>>,
    slot: Option<Box<dyn Send + Sync>>,
}

struct PassthroughBar {
    areas: Vec<MappedArea>,
    /// Where the guest decodes the BAR, as last mapped.
    mapped_at: Option<u64>,
}

/// The device's MSI-X capability and ember's emulation of it.
struct MsixCap {
    offset: usize,
    layout: MsixLayout,
    msix: Msix,
    /// The eventfd each vector's KVM irqfd waits on: the device signals these.
    eventfds: Vec<EventFd>,
}

impl MsixCap {
    fn table(&self) -> (usize, u64, u64) {
        (
            usize::from(self.layout.table_bar),
            u64::from(self.layout.table_offset),
            self.msix.table_len(),
        )
    }

    fn pba(&self) -> (usize, u64, u64) {
        (
            usize::from(self.layout.pba_bar),
            u64::from(self.layout.pba_offset),
            self.msix.pba_len(),
        )
    }

    /// Which structure an access to BAR `bar` at `offset` hits: (is it the table, the
    /// offset inside it).
    fn hit(&self, bar: usize, offset: u64, len: usize) -> Option<(bool, u64)> {
        let inside = |(b, start, size): (usize, u64, u64)| {
            (b == bar
                && offset >= start
                && offset.saturating_add(len as u64) <= start.saturating_add(size))
            .then(|| offset - start)
        };
        if let Some(at) = inside(self.table()) {
            return Some((true, at));
        }
        inside(self.pba()).map(|at| (false, at))
    }
}

/// Where a configuration byte's value comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Device,
    /// ember's header: command, BARs, ROM, interrupt line/pin, header type.
    Header,
    /// A next pointer of the chain the guest sees (or the capabilities pointer).
    Next(u8),
    /// The MSI-X capability's register at this offset inside it.
    Msix(usize),
    /// The MSI capability's register at this offset inside it.
    Msi(usize),
}

/// The device's MSI capability and ember's emulation of it.
struct MsiCap {
    offset: usize,
    msi: Msi,
    eventfds: Vec<EventFd>,
}

/// Where a function's INTx goes: the GSI its pin is wired to, the eventfd the host kernel
/// signals when the function asserts the line, and the one that unmasks it again (see
/// `Vm::level_irq`).
pub struct IntxLine {
    pub gsi: u32,
    pub trigger: EventFd,
    pub resample: EventFd,
}

struct Intx {
    line: IntxLine,
    /// Whether INTx is on at the host (it is off while MSI or MSI-X is).
    on: bool,
}

pub struct VfioPciFunction {
    label: String,
    backend: Arc<dyn VfioBackend>,
    header: ConfigSpace,
    /// The capabilities the guest sees: (offset, next offset shown).
    chain: Vec<(usize, u8)>,
    first_capability: u8,
    msix: Option<MsixCap>,
    msi: Option<MsiCap>,
    intx: Option<Intx>,
    bars: Vec<Option<PassthroughBar>>,
    mapper: Box<dyn GuestMapper>,
}

/// A vector for the MSI-X emulation and the eventfd the device signals for it.
pub struct PassthroughVector {
    pub sink: Box<dyn VectorSink>,
    pub eventfd: EventFd,
}

fn le32(b: &[u8]) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[..4]);
    u32::from_le_bytes(v)
}

impl VfioPciFunction {
    /// Reads the function's header and capabilities through `backend`, resets it, places
    /// each memory BAR where `place(kind, size)` says, and maps what the kernel lets ember
    /// map (less the MSI-X table and PBA pages). `vectors(n)` gives n vectors, once for
    /// MSI-X and once for MSI. `intx(pin)` wires the function's INTx pin, if it has one the
    /// kernel offers; without a line (None) the guest sees no pin.
    pub fn new(
        label: &str,
        backend: Arc<dyn VfioBackend>,
        mapper: Box<dyn GuestMapper>,
        mut place: impl FnMut(BarKind, u64) -> Result<u64, String>,
        mut vectors: impl FnMut(usize) -> Result<Vec<PassthroughVector>, String>,
        intx: impl FnOnce(u8) -> Option<IntxLine>,
    ) -> Result<Self, VfioFunctionError> {
        backend.reset();
        let mut raw = vec![0u8; LEGACY_END];
        backend.read_config(0, &mut raw);
        let identity = Identity {
            vendor_id: u16::from_le_bytes([raw[0], raw[1]]),
            device_id: u16::from_le_bytes([raw[2], raw[3]]),
            revision_id: raw[8],
            prog_if: raw[9],
            subclass: raw[10],
            class: raw[11],
            subsystem_vendor_id: u16::from_le_bytes([raw[0x2c], raw[0x2d]]),
            subsystem_id: u16::from_le_bytes([raw[0x2e], raw[0x2f]]),
        };
        let mut header = ConfigSpace::new(identity);
        let capabilities = walk_capabilities(&raw);

        // The MSI-X capability, if any: where its table and PBA live.
        let msix_found = capabilities
            .iter()
            .find(|&&(_, id)| id == msix::CAPABILITY_ID)
            .map(|&(offset, _)| {
                let control = u16::from_le_bytes([raw[offset + 2], raw[offset + 3]]);
                let table = le32(&raw[offset + 4..]);
                let pba = le32(&raw[offset + 8..]);
                let layout = MsixLayout {
                    table_bar: (table & 7) as u8,
                    table_offset: table & !7,
                    pba_bar: (pba & 7) as u8,
                    pba_offset: pba & !7,
                };
                (offset, (control & 0x7ff) + 1, layout)
            });

        // BARs: sizes from the kernel, types from the device's registers.
        let mut bars: Vec<Option<PassthroughBar>> = (0..BAR_COUNT).map(|_| None).collect();
        let mut index = 0;
        while index < BAR_COUNT {
            let register = le32(&raw[(BAR0 as usize + 4 * index)..]);
            let kind = if register & 1 != 0 {
                BarKind::Io
            } else if register & 0b110 == 0b100 {
                BarKind::Memory64 {
                    prefetchable: register & 0b1000 != 0,
                }
            } else {
                BarKind::Memory32 {
                    prefetchable: register & 0b1000 != 0,
                }
            };
            let next = index
                + if matches!(kind, BarKind::Memory64 { .. }) {
                    2
                } else {
                    1
                };
            let region = backend.bar_region(index);
            // I/O BARs are not offered: ember's root has no I/O window, and the drivers of
            // devices worth passing through use their memory BARs.
            if region.size == 0 || kind == BarKind::Io {
                index = next;
                continue;
            }
            let size = region.size.max(16);
            if !size.is_power_of_two() {
                return Err(VfioFunctionError::BarSize { index, size });
            }
            // Page-aligned, so the mapped parts can be KVM memory slots.
            let addr = place(kind, size.max(PAGE_SIZE))
                .map_err(|reason| VfioFunctionError::BarSpace { index, reason })?;
            header
                .add_bar(index, kind, size, addr)
                .map_err(|e| VfioFunctionError::Config(e, index))?;
            let trapped: Vec<(u64, u64)> = msix_found
                .iter()
                .flat_map(|&(_, n, layout)| {
                    let table_len = u64::from(n) * msix::ENTRY_LEN;
                    let pba_len = u64::from(n).div_ceil(64) * 8;
                    [
                        (layout.table_bar, u64::from(layout.table_offset), table_len),
                        (layout.pba_bar, u64::from(layout.pba_offset), pba_len),
                    ]
                })
                .filter(|&(bar, _, _)| usize::from(bar) == index)
                .map(|(_, offset, len)| (offset, len))
                .collect();
            let mut areas = Vec::new();
            for (offset, len) in mappable_areas(&region, &trapped) {
                let memory = backend.map_bar(index, offset, len).map_err(|source| {
                    VfioFunctionError::MapBar {
                        index,
                        offset,
                        len,
                        source,
                    }
                })?;
                areas.push(MappedArea {
                    offset,
                    memory,
                    slot: None,
                });
            }
            bars[index] = Some(PassthroughBar {
                areas,
                mapped_at: None,
            });
            index = next;
        }

        let msix = match msix_found {
            Some((offset, said, layout)) => {
                let n = (backend.msix_vectors() as usize).min(usize::from(said));
                for bar in [layout.table_bar, layout.pba_bar] {
                    if bars.get(usize::from(bar)).is_none_or(|b| b.is_none()) {
                        return Err(VfioFunctionError::MsixBar(bar));
                    }
                }
                let given = vectors(n).map_err(|reason| VfioFunctionError::Vectors { reason })?;
                if given.len() != n {
                    return Err(VfioFunctionError::MsixVectors {
                        have: given.len(),
                        said,
                    });
                }
                let (sinks, eventfds) = given.into_iter().map(|v| (v.sink, v.eventfd)).unzip();
                Some(MsixCap {
                    offset,
                    layout,
                    msix: Msix::new(sinks),
                    eventfds,
                })
            }
            None => None,
        };

        // MSI, if the device has it and the kernel offers its vectors; a capability ember
        // does not emulate is left out of the chain, so no driver enables it behind ember.
        let msi_offset = capabilities
            .iter()
            .find(|&&(_, id)| id == msi::CAPABILITY_ID)
            .map(|&(offset, _)| offset);
        let msi = match msi_offset {
            Some(offset) if backend.msi_vectors() > 0 => {
                let control = u16::from_le_bytes([raw[offset + 2], raw[offset + 3]]);
                let asked = 1usize << ((control >> 1) & 0b111).min(5);
                let n = asked.min(backend.msi_vectors() as usize);
                let given = vectors(n).map_err(|reason| VfioFunctionError::Vectors { reason })?;
                let (sinks, eventfds) = given.into_iter().map(|v| (v.sink, v.eventfd)).unzip();
                Some(MsiCap {
                    offset,
                    msi: Msi::new(control, sinks),
                    eventfds,
                })
            }
            _ => None,
        };
        let visible: Vec<usize> = capabilities
            .iter()
            .filter(|&&(offset, id)| {
                id != msi::CAPABILITY_ID || Some(offset) == msi_offset && msi.is_some()
            })
            .map(|&(offset, _)| offset)
            .collect();
        let chain = visible
            .iter()
            .enumerate()
            .map(|(i, &offset)| (offset, visible.get(i + 1).copied().unwrap_or(0) as u8))
            .collect();

        // INTx, on from the start as on a real board: a driver that never enables MSI
        // uses it.
        let pin = raw[INTERRUPT_PIN];
        let intx = if (1..=4).contains(&pin) && backend.intx_available() {
            intx(pin)
        } else {
            None
        };
        let intx = match intx {
            Some(line) => {
                backend
                    .enable_intx(&line.trigger, &line.resample)
                    .map_err(VfioFunctionError::Intx)?;
                header.set_interrupt_pin(pin);
                header.set_interrupt_line(line.gsi as u8);
                Some(Intx { line, on: true })
            }
            None => None,
        };
        Ok(VfioPciFunction {
            label: label.to_owned(),
            backend,
            header,
            chain,
            first_capability: visible.first().copied().unwrap_or(0) as u8,
            msix,
            msi,
            intx,
            bars,
            mapper,
        })
    }

    /// Turns INTx on or off at the host, if the function has it and it is not so already.
    fn switch_intx(&mut self, on: bool) -> std::io::Result<()> {
        let Some(intx) = self.intx.as_mut() else {
            return Ok(());
        };
        if intx.on == on {
            return Ok(());
        }
        if on {
            self.backend
                .enable_intx(&intx.line.trigger, &intx.line.resample)?;
        } else {
            self.backend.disable_intx()?;
        }
        intx.on = on;
        Ok(())
    }

    /// Turns MSI or MSI-X on or off at the host with `switch`, one interrupt kind at a time
    /// as vfio-pci takes them: INTx goes off before a message kind goes on, and comes back
    /// once none is on.
    fn switch_messages(
        &mut self,
        on: bool,
        switch: impl FnOnce(&Self) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        if on {
            self.switch_intx(false)?;
        }
        switch(self)?;
        if !on && !self.message_interrupts_on() {
            self.switch_intx(true)?;
        }
        Ok(())
    }

    /// Whether the guest has MSI or MSI-X on.
    fn message_interrupts_on(&self) -> bool {
        self.msix.as_ref().is_some_and(|m| m.msix.enabled())
            || self.msi.as_ref().is_some_and(|m| m.msi.enabled())
    }

    fn source(&self, offset: usize) -> Source {
        match offset {
            COMMAND | 0x05 => return Source::Header,
            HEADER_TYPE => return Source::Header,
            o if (BAR0 as usize..BAR0 as usize + 4 * BAR_COUNT).contains(&o) => {
                return Source::Header;
            }
            o if (ROM_ADDRESS..ROM_ADDRESS + 4).contains(&o) => return Source::Header,
            CAPABILITIES_POINTER => return Source::Next(self.first_capability),
            INTERRUPT_LINE | INTERRUPT_PIN => return Source::Header,
            _ => {}
        }
        if let Some(&(_, next)) = self.chain.iter().find(|&&(cap, _)| cap + 1 == offset) {
            return Source::Next(next);
        }
        if let Some(m) = &self.msix {
            let inside = offset.wrapping_sub(m.offset);
            if (2..msix::CAPABILITY_LEN).contains(&inside) {
                return Source::Msix(inside);
            }
        }
        if let Some(m) = &self.msi {
            let inside = offset.wrapping_sub(m.offset);
            if (2..m.msi.capability_len()).contains(&inside) {
                return Source::Msi(inside);
            }
        }
        Source::Device
    }

    fn msix_register(&self, inside: usize) -> u8 {
        let Some(m) = &self.msix else { return 0 };
        let control = m.msix.control();
        let table = m.layout.table_offset | u32::from(m.layout.table_bar);
        let pba = m.layout.pba_offset | u32::from(m.layout.pba_bar);
        let mut bytes = [0u8; msix::CAPABILITY_LEN];
        bytes[2..4].copy_from_slice(&control.to_le_bytes());
        bytes[4..8].copy_from_slice(&table.to_le_bytes());
        bytes[8..12].copy_from_slice(&pba.to_le_bytes());
        bytes[inside]
    }

    /// Runs of bytes of one source, in order.
    fn runs(&self, offset: usize, len: usize) -> Vec<(Source, usize, usize)> {
        let mut runs: Vec<(Source, usize, usize)> = Vec::new();
        for o in offset..offset + len {
            let s = self.source(o);
            match runs.last_mut() {
                Some((last, _, n)) if *last == Source::Device && s == Source::Device => *n += 1,
                _ => runs.push((s, o, 1)),
            }
        }
        runs
    }

    /// The guest wrote message control: MSI-X on the device follows the emulation's.
    fn write_msix_control(&mut self, inside: usize, value: u8) {
        let Some(m) = self.msix.as_mut() else { return };
        let mut control = m.msix.control().to_le_bytes();
        control[inside - 2] = value;
        let was = m.msix.enabled();
        m.msix.set_control(u16::from_le_bytes(control));
        let now = m.msix.enabled();
        let r = match (was, now) {
            (false, true) => {
                log::info!("{}: the guest turned MSI-X on", self.label);
                self.switch_messages(true, |f| {
                    f.msix.as_ref().map_or(Ok(()), |m| {
                        f.backend
                            .enable_msix(&m.eventfds.iter().collect::<Vec<_>>())
                    })
                })
            }
            (true, false) => {
                log::info!("{}: the guest turned MSI-X off", self.label);
                self.switch_messages(false, |f| f.backend.disable_msix())
            }
            _ => Ok(()),
        };
        if let Err(e) = r {
            log::error!(
                "{}: cannot turn MSI-X {} on the device: {e}",
                self.label,
                if now { "on" } else { "off" }
            );
        }
    }

    /// The guest wrote the MSI capability: the device's MSI vectors follow its enable bit.
    fn write_msi(&mut self, inside: usize, value: u8) {
        let Some(m) = self.msi.as_mut() else { return };
        let r = match m.msi.write(inside, value) {
            Some(true) => {
                let n = m.msi.enabled_vectors().min(m.eventfds.len());
                log::info!("{}: the guest turned MSI on ({n} vectors)", self.label);
                self.switch_messages(true, |f| {
                    f.msi.as_ref().map_or(Ok(()), |m| {
                        f.backend
                            .enable_msi(&m.eventfds[..n].iter().collect::<Vec<_>>())
                    })
                })
            }
            Some(false) => {
                log::info!("{}: the guest turned MSI off", self.label);
                self.switch_messages(false, |f| f.backend.disable_msi())
            }
            None => Ok(()),
        };
        if let Err(e) = r {
            log::error!(
                "{}: cannot turn MSI on or off on the device: {e}",
                self.label
            );
        }
    }

    /// Moves the guest's mappings of each BAR to where it decodes now.
    fn remap(&mut self, decoding: &[BarRegion]) {
        for (index, bar) in self.bars.iter_mut().enumerate() {
            let Some(bar) = bar else { continue };
            let at = decoding
                .iter()
                .find(|r| r.index == index)
                .map(|r| r.addr)
                .filter(|addr| addr.is_multiple_of(PAGE_SIZE));
            if at == bar.mapped_at {
                continue;
            }
            for area in &mut bar.areas {
                area.slot = None;
            }
            bar.mapped_at = None;
            let Some(base) = at else { continue };
            for area in &mut bar.areas {
                match self.mapper.map(base + area.offset, area.memory.clone()) {
                    Ok(slot) => area.slot = Some(slot),
                    Err(e) => {
                        // Accesses there still work, trapped and forwarded: only slower.
                        log::warn!(
                            "{}: BAR {index} at {:#x}: cannot map +{:#x} into the guest: {e}",
                            self.label,
                            base,
                            area.offset
                        );
                    }
                }
            }
            bar.mapped_at = Some(base);
        }
    }
}

impl PciDevice for VfioPciFunction {
    fn config(&self) -> &ConfigSpace {
        &self.header
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.header
    }

    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        if offset + data.len() > crate::devices::pci::config_space::CONFIG_SPACE_LEN {
            data.fill(0xff);
            return;
        }
        for (source, start, n) in self.runs(offset, data.len()) {
            let out = &mut data[start - offset..start - offset + n];
            match source {
                Source::Device => self.backend.read_config(start as u64, out),
                Source::Header => self.header.read(start, out),
                Source::Next(next) => out[0] = next,
                Source::Msix(inside) => out[0] = self.msix_register(inside),
                Source::Msi(inside) => {
                    out[0] = self.msi.as_ref().map_or(0, |m| m.msi.read(inside));
                }
            }
        }
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        if offset + data.len() > crate::devices::pci::config_space::CONFIG_SPACE_LEN {
            return;
        }
        for (source, start, n) in self.runs(offset, data.len()) {
            let bytes = &data[start - offset..start - offset + n];
            match source {
                Source::Device => self.backend.write_config(start as u64, bytes),
                Source::Header => {
                    self.header.write(start, bytes);
                    // The device must decode and master the bus itself: the guest's
                    // command bits go to it too (the kernel keeps what it must).
                    if start == COMMAND || start == COMMAND + 1 {
                        let command = self.header.command().to_le_bytes();
                        self.backend
                            .write_config(start as u64, &command[start - COMMAND..][..1]);
                    }
                }
                Source::Next(_) => {}
                Source::Msix(inside) => {
                    if (2..4).contains(&inside) {
                        self.write_msix_control(inside, bytes[0]);
                    }
                }
                Source::Msi(inside) => self.write_msi(inside, bytes[0]),
            }
        }
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if let Some(m) = self.msix.as_ref()
            && let Some((table, at)) = m.hit(bar, offset, data.len())
        {
            if table {
                m.msix.read_table(at, data);
            } else {
                m.msix.read_pba(at, data);
            }
            return;
        }
        self.backend.read_bar(bar, offset, data);
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if let Some(m) = self.msix.as_mut()
            && let Some((table, at)) = m.hit(bar, offset, data.len())
        {
            // The PBA is read-only.
            if table {
                m.msix.write_table(at, data);
            }
            return;
        }
        self.backend.write_bar(bar, offset, data);
    }

    fn decoding_changed(&mut self, bars: &[BarRegion]) {
        self.remap(bars);
    }
}

/// The capabilities in the first 256 bytes, in chain order: (offset, ID). A chain that
/// points into the header, outside the space, or loops ends there.
fn walk_capabilities(raw: &[u8]) -> Vec<(usize, u8)> {
    const STATUS_CAPABILITIES_LIST: u8 = 1 << 4;
    let mut caps = Vec::new();
    if raw[0x06] & STATUS_CAPABILITIES_LIST == 0 {
        return caps;
    }
    let mut at = usize::from(raw[CAPABILITIES_POINTER] & !3);
    while at >= HEADER_END && at + 2 <= LEGACY_END && caps.len() < MAX_CAPABILITIES {
        if caps.iter().any(|&(o, _)| o == at) {
            break;
        }
        caps.push((at, raw[at]));
        at = usize::from(raw[at + 1] & !3);
    }
    caps
}

/// The page-aligned parts of a BAR to map: what the kernel allows, less the pages the
/// MSI-X table and PBA (`trapped`, offset and length) touch.
fn mappable_areas(region: &RegionInfo, trapped: &[(u64, u64)]) -> Vec<(u64, u64)> {
    if !region.mappable {
        return Vec::new();
    }
    let allowed = if region.sparse.is_empty() {
        vec![(0, region.size)]
    } else {
        region.sparse.clone()
    };
    let holes: Vec<(u64, u64)> = trapped
        .iter()
        .filter(|&&(_, len)| len > 0)
        .map(|&(offset, len)| {
            let start = offset & !(PAGE_SIZE - 1);
            (start, (offset + len).next_multiple_of(PAGE_SIZE))
        })
        .collect();
    let mut areas = Vec::new();
    for (offset, len) in allowed {
        // Only whole pages can be mapped.
        let mut pieces = vec![(
            offset.next_multiple_of(PAGE_SIZE),
            (offset + len) & !(PAGE_SIZE - 1),
        )];
        for &(hole_start, hole_end) in &holes {
            pieces = pieces
                .into_iter()
                .flat_map(|(s, e)| {
                    if hole_end <= s || hole_start >= e {
                        vec![(s, e)]
                    } else {
                        vec![(s, hole_start.max(s)), (hole_end.min(e), e)]
                    }
                })
                .collect();
        }
        areas.extend(
            pieces
                .into_iter()
                .filter(|(s, e)| e > s)
                .map(|(s, e)| (s, e - s)),
        );
    }
    areas
}

#[cfg(test)]
mod tests;
