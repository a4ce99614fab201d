//! The Intel MultiProcessor Specification 1.4 table, which tells a guest without ACPI how
//! many CPUs it has and how legacy interrupts are wired. It lives in the first KiB of the
//! EBDA, where Linux looks for it.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{APIC_START, EBDA_START, IOAPIC_START};
use crate::devices::legacy::ioapic;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("{0} vCPUs do not fit in the MP table area (at most {MAX_CPUS})")]
    TooManyCpus(u8),
    #[error("cannot write the MP table into guest memory")]
    Write,
}

/// The MP table area is 1 KiB; this many processor entries fit with all the others.
pub const MAX_CPUS: u8 = 32;
/// The I/O APIC's pins (ember's and KVM's have 24); each gets an interrupt source entry.
const IOAPIC_PINS: u8 = ioapic::PINS as u8;

const MPC_SPEC: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = ioapic::VERSION as u8;

const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the floating pointer and configuration table as they sit at `base`.
pub fn build(base: u64, vcpu_count: u8) -> Result<Vec<u8>, MpTableError> {
    if vcpu_count == 0 || vcpu_count > MAX_CPUS {
        return Err(MpTableError::TooManyCpus(vcpu_count));
    }
    let table_addr = base + FLOATING_LEN as u64;
    let ioapic_id = vcpu_count; // the first APIC ID after the CPUs'

    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..vcpu_count {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, cpu, APIC_VERSION, flags]);
        // Signature (family 6) and feature flags (FPU, APIC), as real firmware reports.
        entries.extend_from_slice(&0x600u32.to_le_bytes());
        entries.extend_from_slice(&0x201u32.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        // ISA IRQ n arrives on IOAPIC pin n, edge-triggered, active high (flags 0 = bus default).
        entries.extend_from_slice(&[MP_INTSRC, MP_IRQ_INT, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // LINT0: ExtINT from the PIC to the BSP; LINT1: NMI to every local APIC.
    entries.extend_from_slice(&[MP_LINTSRC, MP_IRQ_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_IRQ_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = HEADER_LEN + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(MPC_SPEC);
    table.push(0); // checksum, filled below
    table.extend_from_slice(b"EMBER   "); // OEM id, 8 bytes
    table.extend_from_slice(b"MICROVM     "); // product id, 12 bytes
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum + reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(FLOATING_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(table_addr as u32).to_le_bytes());
    floating.push(1); // length in 16-byte units
    floating.push(MPC_SPEC);
    floating.push(0); // checksum
    floating.extend_from_slice(&[0; 5]); // feature bytes: 0 = a config table is present
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    Ok(floating)
}

/// Writes the MP table at the start of the EBDA.
pub fn write<M: GuestMemoryBackend>(mem: &M, vcpu_count: u8) -> Result<(), MpTableError> {
    let bytes = build(EBDA_START, vcpu_count)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(|_| MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestMemoryMmap;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    /// Parses a table the way a guest does and returns (processor entries, ioapic id).
    fn parse(mem: &GuestMemoryMmap) -> (Vec<(u8, u8)>, Option<u8>) {
        let mut fp = [0u8; 16];
        mem.read_slice(&mut fp, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&fp[..4], b"_MP_");
        assert_eq!(sum(&fp), 0, "floating pointer checksum");
        let table_addr = u32::from_le_bytes(fp[4..8].try_into().unwrap()) as u64;
        let mut hdr = [0u8; 44];
        mem.read_slice(&mut hdr, GuestAddress(table_addr)).unwrap();
        assert_eq!(&hdr[..4], b"PCMP");
        let len = u16::from_le_bytes([hdr[4], hdr[5]]) as usize;
        assert!(
            table_addr as usize + len <= EBDA_START as usize + 1024,
            "fits in 1 KiB"
        );
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(table_addr))
            .unwrap();
        assert_eq!(sum(&table), 0, "table checksum");
        assert_eq!(
            u32::from_le_bytes(table[36..40].try_into().unwrap()) as u64,
            APIC_START
        );
        let count = u16::from_le_bytes([table[34], table[35]]);
        let (mut cpus, mut ioapic, mut off) = (vec![], None, 44);
        for _ in 0..count {
            match table[off] {
                MP_PROCESSOR => {
                    cpus.push((table[off + 1], table[off + 3]));
                    off += 20;
                }
                MP_IOAPIC => {
                    ioapic = Some(table[off + 1]);
                    off += 8;
                }
                _ => off += 8,
            }
        }
        assert_eq!(off, len, "entries fill the table exactly");
        (cpus, ioapic)
    }

    #[test]
    fn every_vcpu_listed() {
        for n in [1u8, 4, 32] {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
            write(&mem, n).unwrap();
            let (cpus, ioapic) = parse(&mem);
            assert_eq!(cpus.len(), n as usize);
            assert_eq!(cpus[0], (0, CPU_ENABLED | CPU_BOOTPROCESSOR));
            for (i, (id, flags)) in cpus.iter().enumerate().skip(1) {
                assert_eq!((*id as usize, *flags), (i, CPU_ENABLED));
            }
            assert_eq!(ioapic, Some(n));
        }
    }

    #[test]
    fn vcpu_count_bounds() {
        assert!(matches!(
            build(EBDA_START, 0),
            Err(MpTableError::TooManyCpus(0))
        ));
        assert!(matches!(
            build(EBDA_START, 33),
            Err(MpTableError::TooManyCpus(33))
        ));
    }
}
