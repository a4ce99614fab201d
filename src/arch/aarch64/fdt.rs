//! The flattened device tree an arm64 guest boots with: memory, CPUs (PSCI to start and
//! stop them), the architected timer, the GIC, the UART, the RTC, every virtio-mmio device,
//! and `/chosen` (command line, initrd, console). Bindings: the kernel's
//! Documentation/devicetree/bindings (arm/cpus, arm/psci, timer/arm,arch_timer,
//! interrupt-controller/arm,gic{,-v3}, serial/8250, rtc/arm,pl031, virtio/mmio).

use vm_fdt::{Error as FdtError, FdtWriter};

use super::layout::{
    GIC_CPU_LEN, GIC_CPU_START, GIC_DIST_LEN, GIC_DIST_START, GIC_REDIST_LEN_PER_CPU,
    GIC_REDIST_START, RTC_LEN, SERIAL_LEN, SERIAL_START, mpidr_affinity,
};
use crate::arch::PlatformDevice;

/// The GIC generation the guest is given (KVM's vGIC emulates it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GicVersion {
    V2,
    V3,
}

impl std::fmt::Display for GicVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GicVersion::V2 => write!(f, "GICv2"),
            GicVersion::V3 => write!(f, "GICv3"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FdtBuildError {
    #[error("cannot build the device tree: {0}")]
    Fdt(#[from] FdtError),
    #[error("the device tree needs {0} bytes, more than the 2 MiB the boot protocol allows")]
    TooLarge(usize),
}

/// What the device tree describes.
pub struct FdtSpec<'a> {
    pub vcpu_count: u8,
    /// Guest RAM: (start, length).
    pub ram: (u64, u64),
    pub cmdline: &'a str,
    /// The initrd in guest memory: (address, length).
    pub initrd: Option<(u64, u64)>,
    pub gic: GicVersion,
    pub devices: &'a [PlatformDevice],
}

// Interrupt specifiers: <type number flags> (arm,gic bindings).
const GIC_SPI: u32 = 0;
const GIC_PPI: u32 = 1;
const IRQ_TYPE_EDGE_RISING: u32 = 1;
const IRQ_TYPE_LEVEL_HIGH: u32 = 4;
const IRQ_TYPE_LEVEL_LOW: u32 = 8;
// The architected timer's PPIs: secure and non-secure physical, virtual, hypervisor.
const TIMER_PPIS: [u32; 4] = [13, 14, 11, 10];
/// The GIC's maintenance interrupt (a PPI), for the virtualization extensions it offers.
const GIC_MAINTENANCE_PPI: u32 = 9;
const PHANDLE_GIC: u32 = 1;
const PHANDLE_CLOCK: u32 = 2;
/// The UART's input clock: 1.8432 MHz gives the usual 115200 baud base.
const UART_CLOCK_HZ: u32 = 1_843_200;
/// The PL031's bus clock; the driver only needs one to exist.
const APB_CLOCK_HZ: u32 = 24_000_000;

/// Builds the device tree blob.
pub fn build(spec: &FdtSpec) -> Result<Vec<u8>, FdtBuildError> {
    let mut fdt = FdtWriter::new()?;
    let root = fdt.begin_node("")?;
    fdt.property_string("compatible", "linux,dummy-virt")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_u32("interrupt-parent", PHANDLE_GIC)?;

    cpus(&mut fdt, spec.vcpu_count)?;
    let memory = fdt.begin_node(&format!("memory@{:x}", spec.ram.0))?;
    fdt.property_string("device_type", "memory")?;
    fdt.property_array_u64("reg", &[spec.ram.0, spec.ram.1])?;
    fdt.end_node(memory)?;
    chosen(&mut fdt, spec)?;
    gic(&mut fdt, spec.gic, spec.vcpu_count)?;
    timer(&mut fdt, spec.gic, spec.vcpu_count)?;
    let psci = fdt.begin_node("psci")?;
    fdt.property_string_list(
        "compatible",
        vec!["arm,psci-1.0".into(), "arm,psci-0.2".into()],
    )?;
    fdt.property_string("method", "hvc")?;
    fdt.end_node(psci)?;
    let clock = fdt.begin_node("apb-pclk")?;
    fdt.property_string("compatible", "fixed-clock")?;
    fdt.property_u32("#clock-cells", 0)?;
    fdt.property_u32("clock-frequency", APB_CLOCK_HZ)?;
    fdt.property_string("clock-output-names", "clk24mhz")?;
    fdt.property_phandle(PHANDLE_CLOCK)?;
    fdt.end_node(clock)?;
    for device in spec.devices {
        device_node(&mut fdt, device)?;
    }
    fdt.end_node(root)?;
    let blob = fdt.finish()?;
    if blob.len() as u64 > super::layout::FDT_MAX_LEN {
        return Err(FdtBuildError::TooLarge(blob.len()));
    }
    Ok(blob)
}

fn cpus(fdt: &mut FdtWriter, vcpu_count: u8) -> Result<(), FdtError> {
    let cpus = fdt.begin_node("cpus")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 0)?;
    for index in 0..vcpu_count {
        let mpidr = mpidr_affinity(index);
        let cpu = fdt.begin_node(&format!("cpu@{mpidr:x}"))?;
        fdt.property_string("device_type", "cpu")?;
        fdt.property_string("compatible", "arm,arm-v8")?;
        // The boot vCPU runs; PSCI CPU_ON starts the others where the kernel asks.
        fdt.property_string("enable-method", "psci")?;
        fdt.property_array_u64("reg", &[mpidr])?;
        fdt.end_node(cpu)?;
    }
    fdt.end_node(cpus)
}

fn chosen(fdt: &mut FdtWriter, spec: &FdtSpec) -> Result<(), FdtError> {
    let chosen = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", spec.cmdline)?;
    fdt.property_string("stdout-path", &format!("/uart@{SERIAL_START:x}"))?;
    if let Some((addr, len)) = spec.initrd {
        fdt.property_u64("linux,initrd-start", addr)?;
        fdt.property_u64("linux,initrd-end", addr + len)?;
    }
    fdt.end_node(chosen)
}

fn gic(fdt: &mut FdtWriter, version: GicVersion, vcpu_count: u8) -> Result<(), FdtError> {
    let gic = fdt.begin_node(&format!("intc@{GIC_DIST_START:x}"))?;
    match version {
        GicVersion::V3 => {
            fdt.property_string("compatible", "arm,gic-v3")?;
            let redist_len = GIC_REDIST_LEN_PER_CPU * u64::from(vcpu_count);
            fdt.property_array_u64(
                "reg",
                &[GIC_DIST_START, GIC_DIST_LEN, GIC_REDIST_START, redist_len],
            )?;
            fdt.property_u32("#redistributor-regions", 1)?;
        }
        GicVersion::V2 => {
            fdt.property_string("compatible", "arm,cortex-a15-gic")?;
            fdt.property_array_u64("reg", &[GIC_DIST_START, 0x1000, GIC_CPU_START, GIC_CPU_LEN])?;
        }
    }
    fdt.property_u32("#interrupt-cells", 3)?;
    fdt.property_null("interrupt-controller")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_null("ranges")?;
    fdt.property_array_u32(
        "interrupts",
        &[
            GIC_PPI,
            GIC_MAINTENANCE_PPI,
            ppi_flags(version, vcpu_count, IRQ_TYPE_LEVEL_HIGH),
        ],
    )?;
    fdt.property_phandle(PHANDLE_GIC)?;
    fdt.end_node(gic)
}

/// A PPI's flags: with GICv2 they also name the CPUs it reaches (bits 8-15).
fn ppi_flags(version: GicVersion, vcpu_count: u8, trigger: u32) -> u32 {
    match version {
        GicVersion::V3 => trigger,
        GicVersion::V2 => {
            let cpus = (1u32 << u32::from(vcpu_count.min(8))) - 1;
            trigger | (cpus << 8)
        }
    }
}

fn timer(fdt: &mut FdtWriter, gic: GicVersion, vcpu_count: u8) -> Result<(), FdtError> {
    let timer = fdt.begin_node("timer")?;
    fdt.property_string("compatible", "arm,armv8-timer")?;
    fdt.property_null("always-on")?;
    let flags = ppi_flags(gic, vcpu_count, IRQ_TYPE_LEVEL_LOW);
    let cells: Vec<u32> = TIMER_PPIS
        .iter()
        .flat_map(|&ppi| [GIC_PPI, ppi, flags])
        .collect();
    fdt.property_array_u32("interrupts", &cells)?;
    fdt.end_node(timer)
}

fn device_node(fdt: &mut FdtWriter, device: &PlatformDevice) -> Result<(), FdtError> {
    match *device {
        PlatformDevice::MmioSerial { base, irq } => {
            let node = fdt.begin_node(&format!("uart@{base:x}"))?;
            fdt.property_string("compatible", "ns16550a")?;
            fdt.property_array_u64("reg", &[base, SERIAL_LEN])?;
            fdt.property_u32("clock-frequency", UART_CLOCK_HZ)?;
            // ember's lines are irqfds, which signal edges.
            fdt.property_array_u32("interrupts", &[GIC_SPI, irq, IRQ_TYPE_EDGE_RISING])?;
            fdt.end_node(node)
        }
        PlatformDevice::Rtc { base, irq } => {
            let node = fdt.begin_node(&format!("rtc@{base:x}"))?;
            fdt.property_string_list(
                "compatible",
                vec!["arm,pl031".into(), "arm,primecell".into()],
            )?;
            fdt.property_array_u64("reg", &[base, RTC_LEN])?;
            fdt.property_array_u32("interrupts", &[GIC_SPI, irq, IRQ_TYPE_LEVEL_HIGH])?;
            fdt.property_u32("clocks", PHANDLE_CLOCK)?;
            fdt.property_string("clock-names", "apb_pclk")?;
            fdt.end_node(node)
        }
        PlatformDevice::VirtioMmio { base, len, irq } => {
            let node = fdt.begin_node(&format!("virtio_mmio@{base:x}"))?;
            fdt.property_string("compatible", "virtio,mmio")?;
            fdt.property_array_u64("reg", &[base, len])?;
            fdt.property_array_u32("interrupts", &[GIC_SPI, irq, IRQ_TYPE_EDGE_RISING])?;
            fdt.property_null("dma-coherent")?;
            fdt.end_node(node)
        }
        // x86's, or not on this bus.
        PlatformDevice::Serial { .. }
        | PlatformDevice::Keyboard { .. }
        | PlatformDevice::PowerManagement { .. }
        | PlatformDevice::PciRoot(_)
        | PlatformDevice::PciIntx(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::aarch64::layout::{RTC_IRQ, RTC_START, SERIAL_IRQ};

    /// Every node's path with its properties (name, value).
    type Nodes = Vec<(String, Vec<(String, Vec<u8>)>)>;

    /// A minimal reader of the blob.
    fn parse(blob: &[u8]) -> Nodes {
        let be32 = |at: usize| u32::from_be_bytes(blob[at..at + 4].try_into().unwrap());
        assert_eq!(be32(0), 0xd00d_feed, "magic");
        assert_eq!(be32(4) as usize, blob.len(), "totalsize");
        let structs = be32(8) as usize;
        let strings = be32(12) as usize;
        let name_at = |off: usize| {
            let s = &blob[strings + off..];
            String::from_utf8(s[..s.iter().position(|&b| b == 0).unwrap()].to_vec()).unwrap()
        };
        let mut nodes = Vec::new();
        let mut path: Vec<String> = Vec::new();
        let mut at = structs;
        loop {
            match be32(at) {
                1 => {
                    let s = &blob[at + 4..];
                    let end = s.iter().position(|&b| b == 0).unwrap();
                    path.push(String::from_utf8(s[..end].to_vec()).unwrap());
                    nodes.push((path.join("/"), Vec::new()));
                    at += 4 + (end + 1).next_multiple_of(4);
                }
                2 => {
                    path.pop();
                    at += 4;
                }
                3 => {
                    let len = be32(at + 4) as usize;
                    let name = name_at(be32(at + 8) as usize);
                    let value = blob[at + 12..at + 12 + len].to_vec();
                    nodes.last_mut().unwrap().1.push((name, value));
                    at += 12 + len.next_multiple_of(4);
                }
                4 => at += 4,
                9 => break,
                t => panic!("token {t} at {at}"),
            }
        }
        nodes
    }

    fn prop<'a>(nodes: &'a Nodes, node: &str, name: &str) -> &'a [u8] {
        let (_, props) = nodes
            .iter()
            .find(|(p, _)| p == node)
            .unwrap_or_else(|| panic!("no node {node}"));
        props
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
            .unwrap_or_else(|| panic!("no {name} in {node}"))
    }

    fn cells(v: &[u8]) -> Vec<u32> {
        v.chunks(4)
            .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn spec(gic: GicVersion, devices: &[PlatformDevice]) -> Nodes {
        let blob = build(&FdtSpec {
            vcpu_count: 2,
            ram: (0x8000_0000, 256 << 20),
            cmdline: "console=ttyS0 panic=1",
            initrd: Some((0x8f00_0000, 0x1000)),
            gic,
            devices,
        })
        .unwrap();
        parse(&blob)
    }

    const DEVICES: [PlatformDevice; 3] = [
        PlatformDevice::MmioSerial {
            base: SERIAL_START,
            irq: SERIAL_IRQ,
        },
        PlatformDevice::Rtc {
            base: RTC_START,
            irq: RTC_IRQ,
        },
        PlatformDevice::VirtioMmio {
            base: 0x0a01_0000,
            len: 0x1000,
            irq: 2,
        },
    ];

    #[test]
    fn memory_cpus_chosen_and_devices_are_described() {
        let t = spec(GicVersion::V3, &DEVICES);
        assert_eq!(
            cells(prop(&t, "/memory@80000000", "reg")),
            vec![0, 0x8000_0000, 0, 256 << 20]
        );
        for (i, node) in ["/cpus/cpu@0", "/cpus/cpu@1"].iter().enumerate() {
            assert_eq!(cells(prop(&t, node, "reg")), vec![0, i as u32]);
            assert_eq!(prop(&t, node, "enable-method"), b"psci\0");
        }
        assert_eq!(prop(&t, "/chosen", "bootargs"), b"console=ttyS0 panic=1\0");
        assert_eq!(prop(&t, "/chosen", "stdout-path"), b"/uart@a000000\0");
        assert_eq!(
            cells(prop(&t, "/chosen", "linux,initrd-start")),
            vec![0, 0x8f00_0000]
        );
        assert_eq!(
            cells(prop(&t, "/chosen", "linux,initrd-end")),
            vec![0, 0x8f00_1000]
        );
        assert_eq!(prop(&t, "/uart@a000000", "compatible"), b"ns16550a\0");
        assert_eq!(
            cells(prop(&t, "/uart@a000000", "interrupts")),
            vec![0, SERIAL_IRQ, 1]
        );
        assert_eq!(
            prop(&t, "/rtc@a001000", "compatible"),
            b"arm,pl031\0arm,primecell\0"
        );
        assert_eq!(
            cells(prop(&t, "/rtc@a001000", "clocks")),
            vec![PHANDLE_CLOCK]
        );
        assert_eq!(
            cells(prop(&t, "/virtio_mmio@a010000", "reg")),
            vec![0, 0x0a01_0000, 0, 0x1000]
        );
        assert_eq!(
            cells(prop(&t, "/virtio_mmio@a010000", "interrupts")),
            vec![0, 2, 1],
            "SPI 2, edge"
        );
        assert_eq!(prop(&t, "/psci", "method"), b"hvc\0");
        assert_eq!(cells(prop(&t, "", "interrupt-parent")), vec![PHANDLE_GIC]);
    }

    #[test]
    fn the_gic_node_matches_the_generation() {
        let v3 = spec(GicVersion::V3, &[]);
        assert_eq!(prop(&v3, "/intc@8000000", "compatible"), b"arm,gic-v3\0");
        assert_eq!(
            cells(prop(&v3, "/intc@8000000", "reg")),
            vec![0, 0x0800_0000, 0, 0x1_0000, 0, 0x080a_0000, 0, 0x4_0000],
            "distributor and two vCPUs' redistributors"
        );
        assert_eq!(
            cells(prop(&v3, "/timer", "interrupts")),
            vec![1, 13, 8, 1, 14, 8, 1, 11, 8, 1, 10, 8]
        );
        let v2 = spec(GicVersion::V2, &[]);
        assert_eq!(
            prop(&v2, "/intc@8000000", "compatible"),
            b"arm,cortex-a15-gic\0"
        );
        assert_eq!(
            cells(prop(&v2, "/intc@8000000", "reg")),
            vec![0, 0x0800_0000, 0, 0x1000, 0, 0x0801_0000, 0, 0x2000]
        );
        // GICv2 PPIs name their CPUs: two vCPUs, mask 0b11.
        assert_eq!(cells(prop(&v2, "/timer", "interrupts"))[2], 8 | (0b11 << 8));
        assert_eq!(
            cells(prop(&v2, "/intc@8000000", "interrupts")),
            vec![1, 9, 4 | (0b11 << 8)]
        );
    }
}
