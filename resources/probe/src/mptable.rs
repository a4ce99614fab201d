//! The `mptable` check: the Intel MultiProcessor tables (spec 1.4) that Linux, booted
//! without ACPI, uses to find the CPUs and the IOAPIC.

use crate::Boot;
use crate::e820::MMIO_GAP_START;
use crate::line::Detail;
use crate::phys;

const FLOATING_SIGNATURE: u32 = u32::from_le_bytes(*b"_MP_");
const CONFIG_SIGNATURE: u32 = u32::from_le_bytes(*b"PCMP");
const FLOATING_SIZE: u64 = 16;
/// Where Linux looks for the floating pointer: the first KiB of the EBDA (the last KiB of
/// base memory) and the BIOS ROM area.
const SEARCH_AREAS: [(u64, u64); 2] = [(0x9_fc00, 0xa_0000), (0xf_0000, 0x10_0000)];

const CONFIG_HEADER_SIZE: u64 = 44;
/// The base table length field is 16 bits wide.
const CONFIG_MAX_SIZE: u64 = 0xffff;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_IOAPIC: u8 = 2;
const PROCESSOR_ENTRY_SIZE: u64 = 20;
const OTHER_ENTRY_SIZE: u64 = 8;
const CPU_ENABLED: u8 = 1 << 0;
const CPU_BSP: u8 = 1 << 1;

fn find_floating_pointer() -> Option<u64> {
    for (start, end) in SEARCH_AREAS {
        let mut addr = start;
        while addr < end {
            if phys::read_u32(addr) == FLOATING_SIGNATURE {
                return Some(addr);
            }
            addr += FLOATING_SIZE;
        }
    }
    None
}

/// What the processor and IOAPIC entries say.
struct Cpus {
    count: u64,
    enabled: u64,
    bsps: u64,
    bsp_apic_id: u8,
    duplicate_id: bool,
    seen_ids: [u64; 4],
    ioapic: Option<u8>,
}

impl Cpus {
    fn processor(&mut self, apic_id: u8, flags: u8) {
        self.count += 1;
        if flags & CPU_ENABLED != 0 {
            self.enabled += 1;
        }
        if flags & CPU_BSP != 0 {
            self.bsps += 1;
            self.bsp_apic_id = apic_id;
        }
        let (word, bit) = (usize::from(apic_id >> 6), 1u64 << (apic_id & 63));
        if self.seen_ids[word] & bit != 0 {
            self.duplicate_id = true;
        }
        self.seen_ids[word] |= bit;
    }
}

/// Reads the config table's entries, or says what is wrong with the table.
fn parse_config(table: u64, d: &mut Detail) -> Option<Cpus> {
    if phys::read_u32(table) != CONFIG_SIGNATURE {
        d.str(b"no PCMP signature at ").hex(table);
        return None;
    }
    let length = u64::from(phys::read_u16(table + 4));
    if !(CONFIG_HEADER_SIZE..=CONFIG_MAX_SIZE).contains(&length) {
        d.str(b"config table length=").dec(length);
        return None;
    }
    if table + length > MMIO_GAP_START {
        d.str(b"config table beyond RAM below 4 GiB");
        return None;
    }
    if phys::byte_sum(table, length) != 0 {
        d.str(b"config table checksum bad");
        return None;
    }
    let entry_count = phys::read_u16(table + 34);

    let mut cpus = Cpus {
        count: 0,
        enabled: 0,
        bsps: 0,
        bsp_apic_id: 0,
        duplicate_id: false,
        seen_ids: [0; 4],
        ioapic: None,
    };
    let mut offset = CONFIG_HEADER_SIZE;
    for _ in 0..entry_count {
        let entry = table + offset;
        let kind = phys::read_u8(entry);
        let size = match kind {
            ENTRY_PROCESSOR => PROCESSOR_ENTRY_SIZE,
            1..=4 => OTHER_ENTRY_SIZE,
            _ => {
                d.str(b"unknown entry type ").dec(u64::from(kind));
                return None;
            }
        };
        if offset + size > length {
            d.str(b"entries overrun the table length");
            return None;
        }
        match kind {
            ENTRY_PROCESSOR => cpus.processor(phys::read_u8(entry + 1), phys::read_u8(entry + 3)),
            // Linux numbers IOAPICs in table order; the first one is what the tests name.
            ENTRY_IOAPIC if cpus.ioapic.is_none() => cpus.ioapic = Some(phys::read_u8(entry + 1)),
            _ => {}
        }
        offset += size;
    }
    Some(cpus)
}

pub fn check(boot: &Boot, d: &mut Detail) -> bool {
    let Some(expected) = boot.cmdline.require_u64(b"probe.vcpus", d) else {
        return false;
    };
    let Some(floating) = find_floating_pointer() else {
        d.str(b"no _MP_ floating pointer");
        return false;
    };
    if phys::read_u8(floating + 8) != 1 || phys::byte_sum(floating, FLOATING_SIZE) != 0 {
        d.str(b"floating pointer at ")
            .hex(floating)
            .str(b" has a bad length or checksum");
        return false;
    }
    let table = u64::from(phys::read_u32(floating + 4));
    if table == 0 || phys::read_u8(floating + 11) != 0 {
        d.str(b"floating pointer names a default configuration, not a table");
        return false;
    }
    let Some(cpus) = parse_config(table, d) else {
        return false;
    };

    d.str(b"cpus=").dec(cpus.count).str(b" ioapic=");
    match cpus.ioapic {
        Some(id) => d.dec(u64::from(id)),
        None => d.str(b"none"),
    };
    let mut ok = cpus.ioapic.is_some();
    if cpus.count != expected {
        d.str(b" expected cpus=").dec(expected);
        ok = false;
    }
    if cpus.enabled != cpus.count {
        d.str(b" disabled cpus=").dec(cpus.count - cpus.enabled);
        ok = false;
    }
    if cpus.bsps != 1 {
        d.str(b" bsps=").dec(cpus.bsps);
        ok = false;
    } else if cpus.bsp_apic_id != 0 {
        d.str(b" bsp apic_id=").dec(u64::from(cpus.bsp_apic_id));
        ok = false;
    }
    if cpus.duplicate_id {
        d.str(b" duplicate APIC IDs");
        ok = false;
    }
    ok
}
