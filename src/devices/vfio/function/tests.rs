use std::sync::{Arc, Mutex};

use crate::memory::GuestMemoryMmap;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::*;
use crate::devices::pci::config_space::{COMMAND_BUS_MASTER, COMMAND_MEMORY_SPACE};
use crate::devices::pci::msix::recorder::Recorder;
use crate::devices::vfio::backend::map_guest_memory;
use crate::devices::vfio::fake::{Call, FakeFunction, FakeIommu, IrqKind};
use crate::vstate::gsi_routes::MsiMessage;

/// Live guest mappings: (gpa, len), removed when their slot drops.
#[derive(Clone, Default)]
struct Slots(Arc<Mutex<Vec<(u64, u64)>>>);

struct Slot(Slots, u64, u64);

impl Drop for Slot {
    fn drop(&mut self) {
        let mut live = (self.0).0.lock().unwrap();
        live.retain(|&m| m != (self.1, self.2));
    }
}

impl GuestMapper for Slots {
    fn map(&self, gpa: u64, memory: Arc<MmapRegion<()>>) -> std::io::Result<Box<dyn Send + Sync>> {
        let len = memory.size() as u64;
        self.0.lock().unwrap().push((gpa, len));
        Ok(Box::new(Slot(self.clone(), gpa, len)))
    }
}

impl Slots {
    fn live(&self) -> Vec<(u64, u64)> {
        let mut v = self.0.lock().unwrap().clone();
        v.sort();
        v
    }
}

const BAR0_AT: u64 = 0x1_0000_0000;
const BAR4_AT: u64 = 0xc000_0000;

struct Rig {
    f: VfioPciFunction,
    dev: Arc<FakeFunction>,
    slots: Slots,
    /// MSI-X's vectors, then MSI's.
    vectors: Vec<Recorder>,
    msi: Vec<Recorder>,
}

fn rig() -> Rig {
    rig_with(FakeFunction::nvme_like())
}

/// The GSI the rig wires INTx to.
const INTX_GSI: u32 = 21;

fn intx_line(pin: u8) -> Option<IntxLine> {
    assert_eq!(pin, 1, "the fake's pin, INTA#");
    Some(IntxLine {
        gsi: INTX_GSI,
        trigger: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        resample: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    })
}

fn rig_with(fake: FakeFunction) -> Rig {
    let dev = Arc::new(fake);
    let slots = Slots::default();
    let mut handed: Vec<Vec<Recorder>> = Vec::new();
    let f = VfioPciFunction::new(
        "nvme0",
        dev.clone(),
        Box::new(slots.clone()),
        |kind, size| match kind {
            BarKind::Memory64 { .. } => {
                assert_eq!(size, 0x4000);
                Ok(BAR0_AT)
            }
            BarKind::Memory32 { .. } => {
                assert_eq!(size, 0x10000);
                Ok(BAR4_AT)
            }
            BarKind::Io => panic!("I/O BARs are not placed"),
        },
        |n| {
            let recorders: Vec<Recorder> = (0..n).map(|_| Recorder::default()).collect();
            handed.push(recorders.clone());
            Ok(recorders
                .into_iter()
                .map(|r| PassthroughVector {
                    sink: Box::new(r),
                    eventfd: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                })
                .collect())
        },
        intx_line,
    )
    .unwrap();
    let mut handed = handed.into_iter();
    Rig {
        f,
        dev,
        slots,
        vectors: handed.next().unwrap_or_default(),
        msi: handed.next().unwrap_or_default(),
    }
}

fn read32(f: &mut VfioPciFunction, offset: usize) -> u32 {
    let mut b = [0u8; 4];
    f.read_config(offset, &mut b);
    u32::from_le_bytes(b)
}

fn read8(f: &mut VfioPciFunction, offset: usize) -> u8 {
    let mut b = [0u8; 1];
    f.read_config(offset, &mut b);
    b[0]
}

fn write32(f: &mut VfioPciFunction, offset: usize, v: u32) {
    f.write_config(offset, &v.to_le_bytes());
}

fn write16(f: &mut VfioPciFunction, offset: usize, v: u16) {
    f.write_config(offset, &v.to_le_bytes());
}

#[test]
fn the_function_is_reset_and_keeps_its_identity() {
    let Rig { mut f, dev, .. } = rig();
    assert_eq!(dev.calls()[0], Call::Reset, "reset before anything else");
    assert_eq!(read32(&mut f, 0x00), 0x0010_1b36);
    assert_eq!(read32(&mut f, 0x08) >> 8, 0x01_08_02);
    assert_eq!(
        read32(&mut f, 0x2c),
        0x1100_1af4,
        "subsystem from the device"
    );
    // One function in its slot, no ROM: ember routes neither.
    assert_eq!(read8(&mut f, 0x0e) & 0x80, 0);
    assert_eq!(read32(&mut f, 0x30), 0);
    // INTA#, wired to its own GSI, and on at the host from the start.
    assert_eq!(read8(&mut f, 0x3d), 1);
    assert_eq!(read8(&mut f, 0x3c), INTX_GSI as u8);
    assert_eq!(dev.calls().last(), Some(&Call::EnableIntx));
}

#[test]
fn without_a_line_for_it_intx_is_hidden_and_left_off() {
    for (kernel_offers, line) in [(false, true), (true, false)] {
        let mut fake = FakeFunction::nvme_like();
        fake.intx = kernel_offers;
        let dev = Arc::new(fake);
        let mut f = VfioPciFunction::new(
            "x",
            dev.clone(),
            Box::new(Slots::default()),
            |kind, _| match kind {
                BarKind::Memory64 { .. } => Ok(BAR0_AT),
                _ => Ok(BAR4_AT),
            },
            |n| {
                Ok((0..n)
                    .map(|_| PassthroughVector {
                        sink: Box::new(Recorder::default()),
                        eventfd: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                    })
                    .collect())
            },
            |pin| if line { intx_line(pin) } else { None },
        )
        .unwrap();
        assert_eq!(read8(&mut f, 0x3d), 0, "no pin shown");
        assert!(!dev.calls().contains(&Call::EnableIntx));
        // MSI-X on and off again: INTx stays off.
        write16(&mut f, 0x42, 1 << 15);
        write16(&mut f, 0x42, 0);
        assert!(!dev.calls().contains(&Call::EnableIntx));
    }
}

#[test]
fn intx_is_off_at_the_host_while_msi_or_msix_is_on() {
    let Rig { mut f, dev, .. } = rig();
    dev.forget_calls();
    // MSI-X on: INTx goes off first (the kernel refuses MSI-X while INTx is on; the fake
    // does too, so a wrong order shows as a missing EnableMsix).
    write16(&mut f, 0x42, 1 << 15);
    assert_eq!(dev.calls(), vec![Call::DisableIntx, Call::EnableMsix(8)]);
    // Masking the function is no change of kind.
    dev.forget_calls();
    write16(&mut f, 0x42, (1 << 15) | (1 << 14));
    assert_eq!(dev.calls(), vec![]);
    // Off: INTx is back.
    write16(&mut f, 0x42, 0);
    assert_eq!(dev.calls(), vec![Call::DisableMsix, Call::EnableIntx]);
    // The same around MSI.
    dev.forget_calls();
    write32(&mut f, 0x54, 0xfee0_2000);
    write16(&mut f, 0x52, 1);
    write16(&mut f, 0x52, 0);
    assert_eq!(
        dev.calls(),
        vec![
            Call::DisableIntx,
            Call::EnableMsi(1),
            Call::DisableMsi,
            Call::EnableIntx
        ]
    );
    assert_eq!(*dev.enabled.lock().unwrap(), Some(IrqKind::Intx));
}

#[test]
fn bars_are_ember_s_the_sizing_protocol_works_and_io_bars_are_hidden() {
    let Rig { mut f, dev, .. } = rig();
    // BAR 0: 64-bit, where ember placed it, not where the host has it.
    assert_eq!(read32(&mut f, 0x10), (BAR0_AT as u32) | 0b100);
    assert_eq!(read32(&mut f, 0x14), (BAR0_AT >> 32) as u32);
    write32(&mut f, 0x10, 0xffff_ffff);
    write32(&mut f, 0x14, 0xffff_ffff);
    assert_eq!(read32(&mut f, 0x10), 0xffff_c004, "16 KiB, 64-bit");
    assert_eq!(read32(&mut f, 0x14), 0xffff_ffff);
    // The I/O BAR reads as absent and takes no address.
    write32(&mut f, 0x18, 0xffff_ffff);
    assert_eq!(read32(&mut f, 0x18), 0);
    // BAR 4: 32-bit prefetchable, 64 KiB.
    assert_eq!(read32(&mut f, 0x20), BAR4_AT as u32 | 0b1000);
    write32(&mut f, 0x20, 0xffff_ffff);
    assert_eq!(read32(&mut f, 0x20), 0xffff_0008);
    // None of it reached the device's own BAR registers.
    assert!(
        !dev.calls()
            .iter()
            .any(|c| matches!(c, Call::ConfigWrite(o, _) if (0x10..0x28).contains(o))),
        "{:?}",
        dev.calls()
    );
}

fn chain(f: &mut VfioPciFunction) -> Vec<(u8, u8)> {
    let mut chain = Vec::new();
    let mut at = read8(f, 0x34);
    while at != 0 {
        chain.push((at, read8(f, usize::from(at))));
        at = read8(f, usize::from(at) + 1);
    }
    chain
}

#[test]
fn the_capability_chain_shows_what_ember_emulates() {
    let Rig {
        mut f,
        vectors,
        msi,
        ..
    } = rig();
    assert_eq!(
        chain(&mut f),
        vec![(0x40, 0x11), (0x50, 0x05), (0x70, 0x10)]
    );
    assert_eq!((vectors.len(), msi.len()), (8, 4));
    // The PCI Express capability's own registers come from the device.
    assert_eq!(read8(&mut f, 0x72), 0x02);
    // Without MSI vectors from the kernel, MSI is left out of the chain.
    let mut fake = FakeFunction::nvme_like();
    fake.msi_vectors = 0;
    let Rig { mut f, msi, .. } = rig_with(fake);
    assert_eq!(chain(&mut f), vec![(0x40, 0x11), (0x70, 0x10)]);
    assert!(msi.is_empty());
}

#[test]
fn msi_is_emulated_at_the_device_s_offsets_and_enables_its_vectors() {
    let Rig {
        mut f, dev, msi, ..
    } = rig();
    // Message control: four vectors capable, 64-bit, per-vector masking, off.
    assert_eq!(read32(&mut f, 0x50) >> 16, 0x0184);
    dev.forget_calls();
    write32(&mut f, 0x54, 0xfee0_2000);
    write32(&mut f, 0x58, 0);
    write16(&mut f, 0x5c, 0x0050);
    write32(&mut f, 0x60, 0b10);
    // Two vectors, enabled.
    write16(&mut f, 0x52, 1 | (1 << 4));
    assert_eq!(
        dev.calls(),
        vec![Call::DisableIntx, Call::EnableMsi(2)],
        "only the enabled vectors"
    );
    assert_eq!(msi[0].last_route().map(|m| m.data), Some(0x50));
    assert_eq!(msi[1].last_route().map(|m| m.data), Some(0x51));
    assert_eq!(msi[1].last_masked(), Some(true));
    assert_eq!(msi[0].last_masked(), Some(false));
    assert_eq!(msi[2].last_route(), None);
    assert_eq!(read32(&mut f, 0x50) >> 16, 0x0184 | 1 | (1 << 4));
    dev.forget_calls();
    write16(&mut f, 0x52, 0);
    assert_eq!(dev.calls(), vec![Call::DisableMsi, Call::EnableIntx]);
    assert_eq!(msi[0].last_route(), None);
}

#[test]
fn other_registers_pass_through_and_command_goes_to_both() {
    let Rig { mut f, dev, .. } = rig();
    dev.forget_calls();
    // A register in the PCI Express capability (device control): to the device.
    write16(&mut f, 0x78, 0x2810);
    assert_eq!(dev.calls(), vec![Call::ConfigWrite(0x78, vec![0x10, 0x28])]);
    assert_eq!(read32(&mut f, 0x78) & 0xffff, 0x2810);
    dev.forget_calls();
    // Memory decode and bus mastering: ember decodes, and the device must too.
    write16(&mut f, 0x04, COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER);
    assert_eq!(
        f.config().command(),
        COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER
    );
    assert_eq!(
        dev.calls(),
        vec![
            Call::ConfigWrite(0x04, vec![0x06]),
            Call::ConfigWrite(0x05, vec![0])
        ]
    );
}

#[test]
fn mappable_parts_of_bars_follow_the_guest_and_msix_pages_stay_trapped() {
    let Rig {
        mut f, dev, slots, ..
    } = rig();
    // BAR 0 is mapped less its MSI-X table and PBA pages; BAR 4 only where the kernel's
    // sparse areas allow.
    let maps: Vec<Call> = dev
        .calls()
        .into_iter()
        .filter(|c| matches!(c, Call::MapBar(..)))
        .collect();
    assert_eq!(
        maps,
        vec![Call::MapBar(0, 0, 0x2000), Call::MapBar(4, 0x4000, 0xc000)]
    );
    assert!(slots.live().is_empty(), "nothing is mapped before decode");
    let decoding = |f: &VfioPciFunction| f.config().decoding_bars();
    write16(&mut f, 0x04, COMMAND_MEMORY_SPACE);
    let regions = decoding(&f);
    f.decoding_changed(&regions);
    assert_eq!(
        slots.live(),
        vec![(BAR4_AT + 0x4000, 0xc000), (BAR0_AT, 0x2000)]
    );
    // The guest moves BAR 0: its mapping moves, BAR 4's stays.
    write32(&mut f, 0x10, 0x8000_0000);
    write32(&mut f, 0x14, 0x2);
    let regions = decoding(&f);
    f.decoding_changed(&regions);
    assert_eq!(
        slots.live(),
        vec![(BAR4_AT + 0x4000, 0xc000), (0x2_8000_0000, 0x2000)]
    );
    // Decode off: nothing stays mapped.
    write16(&mut f, 0x04, 0);
    let regions = decoding(&f);
    f.decoding_changed(&regions);
    assert!(slots.live().is_empty());
}

#[test]
fn trapped_bar_accesses_reach_the_device_except_the_msix_structures() {
    let Rig { mut f, dev, .. } = rig();
    dev.forget_calls();
    // BAR 4 below its sparse area: forwarded.
    f.write_bar(4, 0x10, &0xabcd_u32.to_le_bytes());
    let mut b = [0u8; 4];
    f.read_bar(4, 0x10, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0xabcd);
    // BAR 0's table page outside the table (8 entries = 128 bytes): forwarded too.
    f.write_bar(0, 0x2100, &[1, 2, 3, 4]);
    // The table itself never reaches the device: the host kernel owns the real one.
    f.write_bar(0, 0x2000, &0xfee0_0000_u32.to_le_bytes());
    f.read_bar(0, 0x2000, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0xfee0_0000);
    assert_eq!(
        dev.calls(),
        vec![
            Call::BarWrite(4, 0x10, 0xabcd_u32.to_le_bytes().to_vec()),
            Call::BarWrite(0, 0x2100, vec![1, 2, 3, 4]),
        ]
    );
    // The PBA is read-only and ember's.
    f.write_bar(0, 0x3000, &[0xff; 8]);
    let mut q = [0u8; 8];
    f.read_bar(0, 0x3000, &mut q);
    assert_eq!(q, [0; 8]);
}

fn program_vector(f: &mut VfioPciFunction, v: u64, data: u32, masked: bool) {
    let entry = 0x2000 + 16 * v;
    f.write_bar(0, entry, &0xfee0_1000_u32.to_le_bytes());
    f.write_bar(0, entry + 4, &0u32.to_le_bytes());
    f.write_bar(0, entry + 8, &data.to_le_bytes());
    f.write_bar(0, entry + 12, &u32::from(masked).to_le_bytes());
}

#[test]
fn msix_enable_mask_and_disable_reach_the_device_and_the_routes() {
    let Rig {
        mut f,
        dev,
        vectors,
        ..
    } = rig();
    // Message control: 8 vectors, off.
    assert_eq!(read32(&mut f, 0x40) >> 16, 7);
    dev.forget_calls();
    program_vector(&mut f, 0, 0x41, false);
    program_vector(&mut f, 1, 0x42, true);
    write16(&mut f, 0x42, 1 << 15);
    assert_eq!(read32(&mut f, 0x40) >> 16, 0x8007);
    assert_eq!(
        dev.calls(),
        vec![Call::DisableIntx, Call::EnableMsix(8)],
        "all vectors, once"
    );
    let m = MsiMessage {
        address: 0xfee0_1000,
        data: 0x41,
    };
    assert_eq!(vectors[0].last_route(), Some(m));
    assert_eq!(vectors[0].last_masked(), Some(false));
    assert_eq!(vectors[1].last_masked(), Some(true), "vector 1 is masked");
    // The guest masks the whole function, then unmasks it: the sinks hear both.
    write16(&mut f, 0x42, (1 << 15) | (1 << 14));
    assert_eq!(vectors[0].last_masked(), Some(true));
    write16(&mut f, 0x42, 1 << 15);
    assert_eq!(vectors[0].last_masked(), Some(false));
    // Reprogramming a live vector re-routes it.
    program_vector(&mut f, 0, 0x51, false);
    assert_eq!(vectors[0].last_route().map(|m| m.data), Some(0x51));
    // Nothing of this went to the device's MSI-X capability.
    assert!(
        !dev.calls()
            .iter()
            .any(|c| matches!(c, Call::ConfigWrite(..)))
    );
    dev.forget_calls();
    write16(&mut f, 0x42, 0);
    assert_eq!(dev.calls(), vec![Call::DisableMsix, Call::EnableIntx]);
    assert_eq!(vectors[0].last_route(), None);
}

#[test]
fn a_failing_bar_placement_is_an_error_not_a_panic() {
    let dev = Arc::new(FakeFunction::nvme_like());
    let e = VfioPciFunction::new(
        "x",
        dev,
        Box::new(Slots::default()),
        |_, _| Err("window full".to_owned()),
        |_| Ok(Vec::new()),
        intx_line,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("window full"), "{e}");
}

#[test]
fn the_mappable_areas_exclude_msix_pages_and_keep_to_whole_pages() {
    let whole = RegionInfo {
        size: 0x10000,
        mappable: true,
        sparse: vec![],
    };
    assert_eq!(mappable_areas(&whole, &[]), vec![(0, 0x10000)]);
    // A table at 0x2000 (0x80 bytes) and a PBA at 0x2800 share one page.
    assert_eq!(
        mappable_areas(&whole, &[(0x2000, 0x80), (0x2800, 8)]),
        vec![(0, 0x2000), (0x3000, 0xd000)]
    );
    // A table at the very start.
    assert_eq!(
        mappable_areas(&whole, &[(0, 0x1800)]),
        vec![(0x2000, 0xe000)]
    );
    let not = RegionInfo {
        mappable: false,
        ..whole.clone()
    };
    assert!(mappable_areas(&not, &[]).is_empty());
    // Sparse areas, one of them not page-aligned at its end.
    let sparse = RegionInfo {
        sparse: vec![(0, 0x1000), (0x3000, 0x1800)],
        ..whole
    };
    assert_eq!(
        mappable_areas(&sparse, &[(0x3000, 0x10)]),
        vec![(0, 0x1000)]
    );
    // A BAR smaller than a page maps nothing.
    let tiny = RegionInfo {
        size: 0x100,
        mappable: true,
        sparse: vec![],
    };
    assert!(mappable_areas(&tiny, &[]).is_empty());
}

#[test]
fn a_looping_or_stray_capability_chain_ends() {
    let mut raw = vec![0u8; 256];
    raw[0x06] = 1 << 4;
    raw[0x34] = 0x40;
    raw[0x40] = 0x11;
    raw[0x41] = 0x48;
    raw[0x48] = 0x10;
    raw[0x49] = 0x40; // back to the first
    assert_eq!(walk_capabilities(&raw), vec![(0x40, 0x11), (0x48, 0x10)]);
    raw[0x49] = 0x10; // into the header
    assert_eq!(walk_capabilities(&raw).len(), 2);
    raw[0x06] = 0;
    assert!(walk_capabilities(&raw).is_empty(), "no capability list bit");
}

#[test]
fn every_ram_region_is_mapped_for_dma_at_its_guest_address() {
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x10_0000),
        (GuestAddress(0x1_0000_0000), 0x20_0000),
    ])
    .unwrap();
    let iommu = FakeIommu::default();
    map_guest_memory(&iommu, &mem).unwrap();
    let mapped = iommu.mapped.lock().unwrap().clone();
    let hosts: Vec<u64> = mem.iter().map(|r| r.as_ptr() as u64).collect();
    assert_eq!(
        mapped,
        vec![
            (0, 0x10_0000, hosts[0]),
            (0x1_0000_0000, 0x20_0000, hosts[1])
        ]
    );
    // The second region refused: the first is unmapped again and the error names it.
    let iommu = FakeIommu {
        fail_at: Some(1),
        ..Default::default()
    };
    let e = map_guest_memory(&iommu, &mem).unwrap_err();
    assert!(e.to_string().contains("0x100000000"), "{e}");
    assert!(iommu.mapped.lock().unwrap().is_empty());
}
