//! ACPI tables: how a guest with a stock distribution kernel finds its CPUs, its interrupt
//! controllers and ember's devices. Such kernels do not parse `virtio_mmio.device=` on the
//! command line; they do read the DSDT, where each virtio-mmio device is an `LNRO0005`
//! device with its MMIO window and interrupt.
//!
//! The platform is ACPI "hardware-reduced": no PM timer, no SCI, no fixed-feature hardware.
//! Power-off and reset go through the FADT's sleep control and reset registers, which
//! ember's power-management device implements.
//!
//! Tables live in the BIOS area below 1 MiB, which the e820 map leaves out of RAM: the RSDP
//! at [`ACPI_START`] (where the legacy scan finds it; the zero page and the PVH start info
//! also point at it), the other tables after it.

use acpi_tables::Aml;
use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{ACPI_END, ACPI_START, APIC_START, IOAPIC_START};
use crate::arch::{PciIntx, PciWindows};
use crate::devices::pci::config_access::PORT_IO_LEN;

/// The PC's configuration-space ports (CONFIG_ADDRESS, CONFIG_DATA).
const PCI_CONFIG_PORT: u16 = 0xcf8;

const OEM_ID: [u8; 6] = *b"EMBER ";
const OEM_TABLE_ID: [u8; 8] = *b"MICROVM ";
const OEM_REVISION: u32 = 1;

/// Tables after the RSDP start on this boundary.
const TABLE_ALIGN: u64 = 16;

/// FADT IA-PC boot architecture flags (ACPI 6.5, table 5.11).
const IAPC_8042: u16 = 1 << 1;
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_PCIE_ASPM_CONTROLS: u16 = 1 << 4;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// MADT structure types and flags (ACPI 6.5, section 5.2.12).
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_CPU_ENABLED: u32 = 1;
/// MPS INTI flags for LINT1: active high, edge triggered.
const MPS_INTI_HIGH_EDGE: u16 = 0b0101;
/// Every processor, in a Local APIC NMI structure.
const ALL_PROCESSORS: u8 = 0xff;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error(
        "the ACPI tables need {needed} bytes, more than the {available} bytes reserved for them"
    )]
    TooLarge { needed: u64, available: u64 },
    #[error("cannot write the ACPI tables into guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
    #[error("{0} vCPUs cannot be described with xAPIC IDs")]
    TooManyCpus(u8),
}

/// A device the DSDT announces, so the guest finds it without probing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DsdtDevice {
    /// A 16550 UART (`PNP0501`): 8 ports from `port`, on ISA `irq`.
    Serial { port: u16, irq: u32 },
    /// An i8042 keyboard controller (`PNP0303`): data and command ports, ISA `irq`.
    Keyboard {
        data_port: u16,
        command_port: u16,
        irq: u32,
    },
    /// A virtio-mmio transport (`LNRO0005`): its register window and its interrupt.
    VirtioMmio { base: u64, len: u64, irq: u32 },
    /// A PCI Express host bridge (`PNP0A08`) with its windows; also makes the MCFG table
    /// and a motherboard resource (`PNP0C02`) reserving ECAM, which Linux requires before
    /// it uses ECAM.
    PciRoot(PciWindows),
    /// A PCI function's INTx wiring: an entry in the host bridge's `_PRT`.
    PciIntx(PciIntx),
}

/// The I/O ports of the hardware-reduced power-management registers, and the values the
/// guest writes to them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PowerRegisters {
    pub sleep_control: u16,
    pub sleep_status: u16,
    pub reset: u16,
    pub reset_value: u8,
    /// The `SLP_TYP` of the S5 (soft off) state, for the DSDT's `\_S5_` package.
    pub s5_sleep_type: u8,
}

/// What the tables describe.
pub struct AcpiConfig<'a> {
    /// APIC IDs are vCPU indices (see `cpuid`); the IOAPIC takes the next ID.
    pub vcpu_count: u8,
    pub devices: &'a [DsdtDevice],
    /// Without them the guest can neither power off nor reset through ACPI.
    pub power: Option<PowerRegisters>,
    /// Whether the machine has the PC's 8259 PICs (only the in-kernel irqchip brings them).
    /// Without them the I/O APIC is ember's, and virtio interrupts are level-triggered: the
    /// line stays high until the driver acknowledges, and an EOI with it still high sends
    /// the interrupt again. With KVM's I/O APIC they stay edges (an irqfd only pulses, and
    /// a level pulse arriving while the last one is in service would be lost).
    pub has_8259: bool,
}

/// The tables and where each goes.
pub struct AcpiTables {
    /// (guest address, bytes) of every table, the RSDP first.
    pub blobs: Vec<(u64, Vec<u8>)>,
}

impl AcpiTables {
    pub fn rsdp_addr(&self) -> u64 {
        ACPI_START
    }
}

fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        port.into(),
    )
}

fn fadt(dsdt_addr: u64, power: Option<PowerRegisters>, has_pci: bool) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        // No fixed power or sleep buttons: a hardware-reduced platform would describe them
        // as devices, and ember has none.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    // MSI needs a PCI bus to exist; without one, saying so spares the guest looking.
    let msi = if has_pci { 0 } else { IAPC_MSI_NOT_SUPPORTED };
    b.iapc_boot_arch = (IAPC_8042
        | IAPC_VGA_NOT_PRESENT
        | msi
        | IAPC_PCIE_ASPM_CONTROLS
        | IAPC_CMOS_RTC_NOT_PRESENT)
        .into();
    if let Some(power) = power {
        b = b.flag(Flags::ResetRegSup);
        b.reset_reg = io_register(power.reset);
        b.reset_value = power.reset_value;
        b.sleep_control_reg = io_register(power.sleep_control);
        b.sleep_status_reg = io_register(power.sleep_status);
    }
    // "KVMKVMKVM" is what hypervisor-aware guests look for here; ember is KVM underneath.
    b.hypervisor_vendor_identity = u64::from_le_bytes(*b"KVMKVMKV").into();
    let mut out = Vec::new();
    b.finalize().to_aml_bytes(&mut out);
    out
}

fn madt(vcpu_count: u8, has_8259: bool) -> Result<Vec<u8>, AcpiError> {
    // xAPIC IDs are 8 bits and 0xff is the broadcast ID; the IOAPIC takes one more.
    if vcpu_count == 0 || vcpu_count >= 0xfe {
        return Err(AcpiError::TooManyCpus(vcpu_count));
    }
    let mut t = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    // Local interrupt controller address, and whether 8259s are there too.
    t.write_u32(36, APIC_START as u32);
    t.write_u32(40, if has_8259 { MADT_PCAT_COMPAT } else { 0 });
    for cpu in 0..vcpu_count {
        let mut e = vec![MADT_LOCAL_APIC, 8, cpu, cpu];
        e.extend_from_slice(&MADT_CPU_ENABLED.to_le_bytes());
        t.append_slice(&e);
    }
    let mut ioapic = vec![MADT_IO_APIC, 12, vcpu_count, 0];
    ioapic.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    t.append_slice(&ioapic);
    // LINT1 of every local APIC is the NMI line, as in the MP table.
    let mut nmi = vec![MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS];
    nmi.extend_from_slice(&MPS_INTI_HIGH_EDGE.to_le_bytes());
    nmi.push(1);
    t.append_slice(&nmi);
    Ok(t.as_slice().to_vec())
}

/// A device in `\_SB_` with its hardware ID, optional unique ID and resources.
fn named_device(
    name: &str,
    hid: &dyn Aml,
    uid: Option<usize>,
    resources: &[&dyn Aml],
    extra: &[&dyn Aml],
    out: &mut Vec<u8>,
) {
    let crs = aml::ResourceTemplate::new(resources.to_vec());
    let hid = aml::Name::new("_HID".into(), hid);
    let uid = uid.map(|u| aml::Name::new("_UID".into(), &u).to_aml_vec());
    let uid = RawAml(uid.unwrap_or_default());
    let crs = aml::Name::new("_CRS".into(), &crs);
    let mut children: Vec<&dyn Aml> = vec![&hid, &uid];
    children.extend_from_slice(extra);
    children.push(&crs);
    aml::Device::new(name.into(), children).to_aml_bytes(out);
}

/// AML already serialised, to nest in another object.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

trait ToAmlVec {
    fn to_aml_vec(&self) -> Vec<u8>;
}

impl<T: Aml> ToAmlVec for T {
    fn to_aml_vec(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.to_aml_bytes(&mut v);
        v
    }
}

/// The AML of one device; `index` numbers the devices of its kind. Virtio interrupts are
/// level-triggered when `virtio_level` (see [`AcpiConfig::has_8259`]).
fn device_aml(
    index: usize,
    dev: &DsdtDevice,
    virtio_level: bool,
    intx: &[PciIntx],
    out: &mut Vec<u8>,
) {
    match *dev {
        DsdtDevice::Serial { port, irq } => named_device(
            &format!("COM{index}"),
            &aml::EISAName::new("PNP0501"),
            Some(index),
            &[
                &aml::IO::new(port, port, 1, 8),
                &aml::Interrupt::new(true, true, false, false, irq),
            ],
            &[],
            out,
        ),
        DsdtDevice::Keyboard {
            data_port,
            command_port,
            irq,
        } => named_device(
            &format!("PS2{index}"),
            &aml::EISAName::new("PNP0303"),
            None,
            &[
                &aml::IO::new(data_port, data_port, 1, 1),
                &aml::IO::new(command_port, command_port, 1, 1),
                &aml::Interrupt::new(true, true, false, false, irq),
            ],
            &[],
            out,
        ),
        // The window is inside the 32-bit MMIO gap, so base and length fit 32 bits. Its
        // DMA is cache-coherent (_CCA 1).
        DsdtDevice::VirtioMmio { base, len, irq } => named_device(
            &format!("V{index:03X}"),
            &"LNRO0005",
            Some(index),
            &[
                &aml::Memory32Fixed::new(true, base as u32, len as u32),
                &aml::Interrupt::new(true, !virtio_level, false, false, irq),
            ],
            &[&aml::Name::new("_CCA".into(), &aml::ONE)],
            out,
        ),
        DsdtDevice::PciRoot(w) => pci_root_aml(index, &w, intx, out),
        // Inside the host bridge, as its `_PRT`.
        DsdtDevice::PciIntx(_) => {}
    }
}

/// The host bridge (segment 0, bus 0) and the motherboard resource that reserves its ECAM.
fn pci_root_aml(index: usize, w: &PciWindows, intx: &[PciIntx], out: &mut Vec<u8>) {
    let last = |(start, len): (u64, u64)| start + len - 1;
    // The 32-bit window and ECAM are below 4 GiB (layout.rs asserts it).
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let config_ports = aml::IO::new(PCI_CONFIG_PORT, PCI_CONFIG_PORT, 1, PORT_IO_LEN as u8);
    let mmio32 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        w.mmio32.0 as u32,
        last(w.mmio32) as u32,
        None,
    );
    let mmio64 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        w.mmio64.0,
        last(w.mmio64),
        None,
    );
    let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03"));
    let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let adr = aml::Name::new("_ADR".into(), &aml::ZERO);
    let cca = aml::Name::new("_CCA".into(), &aml::ONE);
    let prt = aml::Name::new("_PRT".into(), &prt(intx));
    named_device(
        &format!("PCI{index}"),
        &aml::EISAName::new("PNP0A08"),
        Some(index),
        &[&bus, &config_ports, &mmio32, &mmio64],
        &[&cid, &adr, &seg, &bbn, &cca, &prt],
        out,
    );
    named_device(
        &format!("MRD{index}"),
        &aml::EISAName::new("PNP0C02"),
        Some(index),
        &[&aml::Memory32Fixed::new(
            false,
            w.ecam.0 as u32,
            w.ecam.1 as u32,
        )],
        &[],
        out,
    );
}

/// The host bridge's PCI routing table (ACPI 6.5, 6.2.13): one entry per function that
/// uses INTx, {address: device in the high word and 0xFFFF for any function, pin: 0 =
/// INTA#, source: 0 (a GSI, not a link device), source index: the GSI}. A GSI given this
/// way is level-triggered and active low.
fn prt(intx: &[PciIntx]) -> aml::PackageBuilder {
    let mut table = aml::PackageBuilder::new();
    for i in intx {
        let address = (u32::from(i.slot) << 16) | 0xffff;
        let pin = u32::from(i.pin.saturating_sub(1));
        table.add_element(&aml::Package::new(vec![&address, &pin, &aml::ZERO, &i.gsi]));
    }
    table
}

/// MCFG: where ECAM is for the PCI segments (one here, bus 0 only).
fn mcfg(w: &PciWindows) -> Vec<u8> {
    let mut t = acpi_tables::mcfg::MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let last_bus = (w.ecam.1 >> 20).saturating_sub(1) as u8;
    t.add_ecam(w.ecam.0, 0, 0, last_bus);
    t.to_aml_vec()
}

fn dsdt(devices: &[DsdtDevice], s5_sleep_type: Option<u8>, virtio_level: bool) -> Vec<u8> {
    let mut body = Vec::new();
    let mut children = Vec::new();
    let intx: Vec<PciIntx> = devices
        .iter()
        .filter_map(|d| match d {
            DsdtDevice::PciIntx(i) => Some(*i),
            _ => None,
        })
        .collect();
    for (i, d) in devices.iter().enumerate() {
        // Names are unique per kind: COM0, V000, V001, ...
        let index = devices[..i]
            .iter()
            .filter(|o| std::mem::discriminant(*o) == std::mem::discriminant(d))
            .count();
        device_aml(index, d, virtio_level, &intx, &mut children);
    }
    let devices_aml = RawAml(children);
    aml::Scope::new("_SB_".into(), vec![&devices_aml]).to_aml_bytes(&mut body);
    // \_S5_: the soft-off sleep type, SLP_TYPa and SLP_TYPb.
    if let Some(s5) = s5_sleep_type {
        aml::Name::new("_S5_".into(), &aml::Package::new(vec![&s5, &0u8])).to_aml_bytes(&mut body);
    }
    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.append_slice(&body);
    t.as_slice().to_vec()
}

fn align_up(addr: u64) -> u64 {
    addr.div_ceil(TABLE_ALIGN) * TABLE_ALIGN
}

/// Builds every table, placed from [`ACPI_START`].
pub fn build(config: &AcpiConfig) -> Result<AcpiTables, AcpiError> {
    let mut next = align_up(ACPI_START + Rsdp::len() as u64);
    let mut place = |bytes: Vec<u8>, blobs: &mut Vec<(u64, Vec<u8>)>| {
        let at = next;
        next = align_up(at + bytes.len() as u64);
        blobs.push((at, bytes));
        at
    };
    let mut blobs = Vec::new();
    let s5 = config.power.map(|p| p.s5_sleep_type);
    let dsdt_addr = place(dsdt(config.devices, s5, !config.has_8259), &mut blobs);
    let pci = config.devices.iter().find_map(|d| match d {
        DsdtDevice::PciRoot(w) => Some(*w),
        _ => None,
    });
    let fadt_addr = place(fadt(dsdt_addr, config.power, pci.is_some()), &mut blobs);
    let madt_addr = place(madt(config.vcpu_count, config.has_8259)?, &mut blobs);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    if let Some(w) = pci {
        xsdt.add_entry(place(mcfg(&w), &mut blobs));
    }
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let xsdt_addr = place(xsdt_bytes, &mut blobs);
    let end = blobs.last().map_or(ACPI_START, |(a, b)| a + b.len() as u64);
    if end > ACPI_END {
        return Err(AcpiError::TooLarge {
            needed: end - ACPI_START,
            available: ACPI_END - ACPI_START,
        });
    }
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
    blobs.insert(0, (ACPI_START, rsdp));
    Ok(AcpiTables { blobs })
}

/// Writes the tables into guest memory and returns the RSDP's address.
pub fn write<M: GuestMemoryBackend>(mem: &M, config: &AcpiConfig) -> Result<u64, AcpiError> {
    let tables = build(config)?;
    for (addr, bytes) in &tables.blobs {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(AcpiError::Write)?;
    }
    Ok(tables.rsdp_addr())
}

#[cfg(test)]
mod tests {
    use super::*;

    const POWER: Option<PowerRegisters> = Some(PowerRegisters {
        sleep_control: 0x600,
        sleep_status: 0x601,
        reset: 0x602,
        reset_value: 0x1,
        s5_sleep_type: 5,
    });

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn table<'a>(t: &'a AcpiTables, sig: &[u8; 4]) -> (u64, &'a [u8]) {
        t.blobs
            .iter()
            .find(|(_, b)| &b[..4] == sig)
            .map(|(a, b)| (*a, b.as_slice()))
            .unwrap_or_else(|| panic!("no {}", String::from_utf8_lossy(sig)))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn sample() -> AcpiTables {
        build(&AcpiConfig {
            vcpu_count: 3,
            devices: &[
                DsdtDevice::Serial {
                    port: 0x3f8,
                    irq: 4,
                },
                DsdtDevice::VirtioMmio {
                    base: 0xd000_0000,
                    len: 0x1000,
                    irq: 5,
                },
                DsdtDevice::VirtioMmio {
                    base: 0xd000_1000,
                    len: 0x1000,
                    irq: 6,
                },
            ],
            power: POWER,
            has_8259: false,
        })
        .unwrap()
    }

    #[test]
    fn every_table_checksums_and_links() {
        let t = sample();
        let (rsdp_addr, rsdp) = &t.blobs[0];
        assert_eq!(*rsdp_addr, ACPI_START);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP 1.0 checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        let xsdt_addr = u64_at(rsdp, 24);
        let (addr, xsdt) = table(&t, b"XSDT");
        assert_eq!(addr, xsdt_addr);
        for (_, b) in &t.blobs[1..] {
            assert_eq!(u32_at(b, 4) as usize, b.len(), "length field");
            assert_eq!(sum(b), 0, "{} checksum", String::from_utf8_lossy(&b[..4]));
        }
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(xsdt, o))
            .collect();
        assert_eq!(
            entries,
            vec![table(&t, b"FACP").0, table(&t, b"APIC").0],
            "XSDT lists the FADT and the MADT"
        );
        let (_, fadt) = table(&t, b"FACP");
        assert_eq!(u64_at(fadt, 140), table(&t, b"DSDT").0, "X_DSDT");
        for (a, b) in &t.blobs {
            assert!(*a >= ACPI_START && a + b.len() as u64 <= ACPI_END);
        }
    }

    const PCI: PciWindows = PciWindows {
        ecam: (0xe000_0000, 1 << 20),
        mmio32: (0xc000_0000, 0x1000_0000),
        mmio64: (0x1_0000_0000, 64 << 30),
    };

    fn with_pci() -> AcpiTables {
        build(&AcpiConfig {
            vcpu_count: 1,
            devices: &[DsdtDevice::PciRoot(PCI)],
            power: POWER,
            has_8259: false,
        })
        .unwrap()
    }

    fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
        haystack.windows(needle.len()).position(|w| w == needle)
    }

    #[test]
    fn pci_root_gets_mcfg_a_host_bridge_and_an_ecam_reservation() {
        let t = with_pci();
        let (mcfg_addr, m) = table(&t, b"MCFG");
        assert_eq!(sum(m), 0);
        // Header, 8 reserved bytes, then one 16-byte allocation.
        assert_eq!(m.len(), 36 + 8 + 16);
        assert_eq!(u64_at(m, 44), 0xe000_0000);
        assert_eq!(
            (u16::from_le_bytes([m[52], m[53]]), m[54], m[55]),
            (0, 0, 0)
        );
        let (_, xsdt) = table(&t, b"XSDT");
        assert!(
            (36..xsdt.len())
                .step_by(8)
                .any(|o| u64_at(xsdt, o) == mcfg_addr)
        );

        let (_, d) = table(&t, b"DSDT");
        let eisa = |id: &str| aml::EISAName::new(id).to_aml_vec();
        let bridge = find(d, &eisa("PNP0A08")).expect("a PNP0A08 host bridge");
        assert!(find(d, &eisa("PNP0A03")).is_some(), "PCI compatible ID");
        // The bridge's _CRS: bus 0..0 (word address space, type 2), the config ports, the
        // 32-bit window (dword memory, min and max) and the 64-bit one (qword memory).
        let rest = &d[bridge..];
        let bus = find(rest, &[0x88, 13, 0, 2]).expect("bus number range");
        assert_eq!(&rest[bus + 8..bus + 12], &[0, 0, 0, 0]);
        let io = find(rest, &[0x47, 1, 0xf8, 0x0c, 0xf8, 0x0c]).expect("0xCF8 ports");
        assert_eq!(rest[io + 7], 8);
        let m32 = find(rest, &[0x87, 23, 0, 0]).expect("32-bit window");
        assert_eq!(u32_at(rest, m32 + 10), 0xc000_0000);
        assert_eq!(u32_at(rest, m32 + 14), 0xcfff_ffff);
        let m64 = find(rest, &[0x8a, 43, 0, 0]).expect("64-bit window");
        assert_eq!(u64_at(rest, m64 + 14), 0x1_0000_0000);
        assert_eq!(u64_at(rest, m64 + 22), 0x1_0000_0000 + (64 << 30) - 1);
        // ECAM reserved as a motherboard resource.
        let mrd = find(d, &eisa("PNP0C02")).expect("a PNP0C02 reservation");
        let r = find(&d[mrd..], &[0x86, 9, 0]).expect("its Memory32Fixed") + mrd;
        assert_eq!((u32_at(d, r + 4), u32_at(d, r + 8)), (0xe000_0000, 1 << 20));
    }

    #[test]
    fn msi_is_announced_only_with_a_pci_bus() {
        let boot_arch = |t: &AcpiTables| {
            let (_, f) = table(t, b"FACP");
            u16::from_le_bytes([f[109], f[110]])
        };
        assert_ne!(boot_arch(&sample()) & IAPC_MSI_NOT_SUPPORTED, 0);
        assert_eq!(boot_arch(&with_pci()) & IAPC_MSI_NOT_SUPPORTED, 0);
        let t = sample();
        assert!(t.blobs.iter().all(|(_, b)| &b[..4] != b"MCFG"));
    }

    #[test]
    fn fadt_is_hardware_reduced_with_power_registers() {
        let t = sample();
        let (_, f) = table(&t, b"FACP");
        let flags = u32_at(f, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        let boot_arch = u16::from_le_bytes([f[109], f[110]]);
        assert_ne!(boot_arch & IAPC_8042, 0, "the i8042 is present");
        assert_ne!(boot_arch & IAPC_CMOS_RTC_NOT_PRESENT, 0);
        // Reset register: GAS at 116 (space, width, offset, access, address), value at 128.
        assert_eq!((f[116], u64_at(f, 120), f[128]), (1, 0x602, 0x1));
        // Sleep control and status registers, GAS at 244 and 256.
        assert_eq!((f[244], u64_at(f, 248)), (1, 0x600));
        assert_eq!((f[256], u64_at(f, 260)), (1, 0x601));
    }

    #[test]
    fn madt_lists_each_cpu_and_the_ioapic() {
        let t = sample();
        let (_, m) = table(&t, b"APIC");
        assert_eq!(u32_at(m, 36) as u64, APIC_START);
        let (mut cpus, mut ioapics, mut off) = (vec![], vec![], 44);
        while off < m.len() {
            let (kind, len) = (m[off], m[off + 1] as usize);
            match kind {
                MADT_LOCAL_APIC => cpus.push((m[off + 2], m[off + 3], u32_at(m, off + 4))),
                MADT_IO_APIC => ioapics.push((m[off + 2], u32_at(m, off + 4) as u64)),
                _ => {}
            }
            off += len;
        }
        assert_eq!(off, m.len(), "structures fill the table");
        assert_eq!(cpus, vec![(0, 0, 1), (1, 1, 1), (2, 2, 1)]);
        assert_eq!(ioapics, vec![(3, IOAPIC_START)]);
        // No 8259s with the split irqchip; the in-kernel one has them.
        assert_eq!(u32_at(m, 40), 0);
        assert_eq!(u32_at(&madt(3, true).unwrap(), 40), MADT_PCAT_COMPAT);
    }

    #[test]
    fn the_host_bridge_routes_each_intx_function_to_its_own_gsi() {
        let intx = |slot, pin, gsi| DsdtDevice::PciIntx(PciIntx { slot, pin, gsi });
        let d = dsdt(
            &[intx(3, 1, 20), DsdtDevice::PciRoot(PCI), intx(31, 4, 23)],
            None,
            true,
        );
        // Name(_PRT, Package(2) {Package(4) {0x0003FFFF, 0, Zero, 20}, Package(4)
        // {0x001FFFFF, 3, Zero, 23}}): NameOp, the name, PackageOp, its length, 2 elements;
        // each entry: PackageOp, length, 4 elements, DWordPrefix address, the pin (ZeroOp
        // or BytePrefix 3), ZeroOp for the source, BytePrefix GSI.
        let mut expected = vec![0x08, b'_', b'P', b'R', b'T', 0x12, 27, 2];
        expected.extend_from_slice(&[0x12, 11, 4, 0x0c, 0xff, 0xff, 3, 0, 0x00, 0x00, 0x0a, 20]);
        expected.extend_from_slice(&[
            0x12, 12, 4, 0x0c, 0xff, 0xff, 31, 0, 0x0a, 3, 0x00, 0x0a, 23,
        ]);
        let at = find(&d, &expected).expect("the _PRT with both entries");
        let bridge = find(&d, &aml::EISAName::new("PNP0A08").to_aml_vec()).unwrap();
        assert!(at > bridge, "inside the host bridge");
        // No INTx functions: an empty table, still present.
        let none = dsdt(&[DsdtDevice::PciRoot(PCI)], None, true);
        assert!(find(&none, &[0x08, b'_', b'P', b'R', b'T', 0x12, 2, 0]).is_some());
    }

    #[test]
    fn dsdt_names_every_virtio_device_with_its_window_and_irq() {
        let t = sample();
        let (_, d) = table(&t, b"DSDT");
        let hid = b"\x0dLNRO0005\0";
        let found: Vec<usize> = d
            .windows(hid.len())
            .enumerate()
            .filter(|(_, w)| w == hid)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(found.len(), 2);
        // Each device's _CRS: Memory32Fixed (0x86) with base and length, then an extended
        // interrupt descriptor (0x89) with one interrupt.
        for (at, (base, irq)) in found.iter().zip([(0xd000_0000u32, 5u32), (0xd000_1000, 6)]) {
            let rest = &d[*at..];
            let m = rest.windows(3).position(|w| w == [0x86, 9, 0]).unwrap();
            assert_eq!(u32_at(rest, m + 4), base);
            assert_eq!(u32_at(rest, m + 8), 0x1000);
            let i = rest.windows(3).position(|w| w == [0x89, 6, 0]).unwrap();
            // The sample has no 8259s: ember's I/O APIC, level-triggered virtio.
            assert_eq!(rest[i + 3] & 0b11, 0b01, "consumer, level triggered");
            assert_eq!(u32_at(rest, i + 5), irq);
        }
        // With KVM's I/O APIC (irqfds only pulse) they stay edges.
        let edge = dsdt(
            &[DsdtDevice::VirtioMmio {
                base: 0xd000_0000,
                len: 0x1000,
                irq: 5,
            }],
            None,
            false,
        );
        let i = edge.windows(3).position(|w| w == [0x89, 6, 0]).unwrap();
        assert_eq!(edge[i + 3] & 0b11, 0b11, "consumer, edge triggered");
        assert!(d.windows(4).any(|w| w == b"_S5_"));
        assert!(d.windows(4).any(|w| w == b"COM0"));
        assert!(d.windows(4).any(|w| w == b"V001"));
        // Without power registers there is no S5 and no reset register to announce.
        let bare = build(&AcpiConfig {
            vcpu_count: 1,
            devices: &[],
            power: None,
            has_8259: false,
        })
        .unwrap();
        let (_, d) = table(&bare, b"DSDT");
        assert!(!d.windows(4).any(|w| w == b"_S5_"));
        let (_, f) = table(&bare, b"FACP");
        assert_eq!(u32_at(f, 112) & (1 << 10), 0, "no RESET_REG_SUP");
    }

    #[test]
    fn refuses_what_does_not_fit() {
        let many: Vec<DsdtDevice> = (0..4000)
            .map(|i| DsdtDevice::VirtioMmio {
                base: 0xd000_0000 + i * 0x1000,
                len: 0x1000,
                irq: 5,
            })
            .collect();
        let r = build(&AcpiConfig {
            vcpu_count: 1,
            devices: &many,
            power: POWER,
            has_8259: true,
        });
        assert!(matches!(r, Err(AcpiError::TooLarge { .. })));
        assert!(matches!(
            madt(0xfe, true),
            Err(AcpiError::TooManyCpus(0xfe))
        ));
    }
}
