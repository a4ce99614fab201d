//! The `acpi` check: the tables a stock Linux kernel reads to find its CPUs, its IOAPIC and
//! the virtio-mmio devices. The RSDP must be where the boot protocol says and where the
//! legacy scan finds it; every table must checksum; the FADT must be hardware-reduced and
//! point at a DSDT; the MADT must list `probe.vcpus` enabled CPUs with distinct APIC IDs and
//! an IOAPIC; the DSDT must hold one `LNRO0005` device per `virtio_mmio.device` word, with
//! the same window and interrupt.
//!
//! The probe has no AML interpreter: it finds each device by its `_HID` string and reads the
//! first Memory32Fixed and Extended Interrupt descriptors after it, which is how ember
//! writes them. Linux, which does interpret the AML, is the real test (tests/linux_guest.rs).

use crate::Boot;
use crate::line::Detail;
use crate::phys;
use crate::virtio;

/// Where the legacy scan looks for the RSDP (ACPI 6.5, 5.2.5.1), on 16-byte boundaries.
const RSDP_SCAN: (u64, u64) = (0xe_0000, 0x10_0000);
const RSDP_SIGNATURE: &[u8; 8] = b"RSD PTR ";
const RSDP_V1_LEN: u64 = 20;
const RSDP_V2_LEN: u64 = 36;
const RSDP_XSDT: u64 = 24;

const HEADER_LEN: u64 = 36;
/// Larger tables than this are not ember's; refusing them bounds the emulated loops.
const MAX_TABLE_LEN: u64 = 64 * 1024;
/// Tables must lie below the end of the boot identity map.
const TABLES_END: u64 = 1 << 30;

const FADT_FLAGS: u64 = 112;
const FADT_X_DSDT: u64 = 140;
const FADT_HW_REDUCED: u32 = 1 << 20;

const MADT_ENTRIES: u64 = 44;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_CPU_ENABLED: u32 = 1;

/// `Name(_HID, "LNRO0005")`: a string object, NUL-terminated.
const VIRTIO_HID: &[u8] = b"\x0dLNRO0005\x00";
/// Memory32Fixed descriptor: tag 0x86, length 9; base at +4, length at +8.
const MEMORY32_FIXED: [u8; 3] = [0x86, 9, 0];
/// Extended interrupt descriptor with one interrupt: tag 0x89, length 6; number at +5.
const EXT_IRQ: [u8; 3] = [0x89, 6, 0];

fn signature(addr: u64) -> [u8; 4] {
    phys::read_u32(addr).to_le_bytes()
}

fn rsdp_at(addr: u64) -> bool {
    let mut sig = [0u8; 8];
    for (i, b) in sig.iter_mut().enumerate() {
        *b = phys::read_u8(addr + i as u64);
    }
    &sig == RSDP_SIGNATURE
}

fn scan_for_rsdp() -> Option<u64> {
    let (start, end) = RSDP_SCAN;
    (start..end).step_by(16).find(|&a| rsdp_at(a))
}

/// A table's length if its header is sound and its bytes sum to zero.
fn table_len(addr: u64, d: &mut Detail) -> Option<u64> {
    if addr < 0x1000 || addr >= TABLES_END - HEADER_LEN {
        d.str(b" table at ").hex(addr).str(b" unreachable");
        return None;
    }
    let len = u64::from(phys::read_u32(addr + 4));
    if !(HEADER_LEN..=MAX_TABLE_LEN).contains(&len) || addr + len > TABLES_END {
        d.str(b" ").str(&signature(addr)).str(b" length=").dec(len);
        return None;
    }
    if phys::byte_sum(addr, len) != 0 {
        d.str(b" ").str(&signature(addr)).str(b" checksum bad");
        return None;
    }
    Some(len)
}

/// The first `pattern` in [from, end), as its address.
fn find(from: u64, end: u64, pattern: &[u8]) -> Option<u64> {
    let n = pattern.len() as u64;
    (from..end.saturating_sub(n - 1)).find(|&a| {
        pattern
            .iter()
            .enumerate()
            .all(|(i, &b)| phys::read_u8(a + i as u64) == b)
    })
}

/// Checks the MADT: enabled CPUs with distinct APIC IDs, and at least one IOAPIC.
fn check_madt(addr: u64, len: u64, want_cpus: u64, d: &mut Detail) -> bool {
    let (mut cpus, mut ioapic, mut seen) = (0u64, None, [0u64; 4]);
    let mut duplicate = false;
    let mut off = MADT_ENTRIES;
    while off + 2 <= len {
        let kind = phys::read_u8(addr + off);
        let size = u64::from(phys::read_u8(addr + off + 1));
        if size < 2 || off + size > len {
            d.str(b" MADT entry at +")
                .hex(off)
                .str(b" overruns the table");
            return false;
        }
        match kind {
            MADT_LOCAL_APIC
                if size >= 8 && phys::read_u32(addr + off + 4) & MADT_CPU_ENABLED != 0 =>
            {
                let id = phys::read_u8(addr + off + 3);
                let (word, bit) = (usize::from(id >> 6), 1u64 << (id & 63));
                duplicate |= seen[word] & bit != 0;
                seen[word] |= bit;
                cpus += 1;
            }
            MADT_IO_APIC if size >= 12 && ioapic.is_none() => {
                ioapic = Some(phys::read_u8(addr + off + 2))
            }
            _ => {}
        }
        off += size;
    }
    d.str(b" cpus=").dec(cpus).str(b" ioapic=");
    match ioapic {
        Some(id) => d.dec(u64::from(id)),
        None => d.str(b"none"),
    };
    let mut ok = ioapic.is_some();
    if cpus != want_cpus {
        d.str(b" expected cpus=").dec(want_cpus);
        ok = false;
    }
    if duplicate {
        d.str(b" duplicate APIC IDs");
        ok = false;
    }
    ok
}

/// Checks that the DSDT describes exactly the virtio-mmio devices the command line names.
fn check_dsdt(boot: &Boot, addr: u64, len: u64, d: &mut Detail) -> bool {
    let end = addr + len;
    let mut ok = true;
    let mut at = addr + HEADER_LEN;
    let mut count = 0u64;
    let mut words = virtio::words(&boot.cmdline);
    while let Some(hid) = find(at, end, VIRTIO_HID) {
        let next = find(hid + 1, end, VIRTIO_HID).unwrap_or(end);
        let base = find(hid, next, &MEMORY32_FIXED).map(|m| phys::read_u32(m + 4));
        let irq = find(hid, next, &EXT_IRQ).map(|i| phys::read_u32(i + 5));
        let want = words.next().and_then(virtio::parse_word);
        match (base, irq, want) {
            (Some(b), Some(i), Some((_, wb, wi))) if u64::from(b) == wb && i == wi => {}
            (_, _, None) => {
                d.str(b" extra device ").dec(count);
                ok = false;
            }
            _ => {
                d.str(b" device ").dec(count).str(b" window/irq differ");
                ok = false;
            }
        }
        count += 1;
        at = next;
    }
    let missing = words.count();
    if missing > 0 {
        d.str(b" missing ").dec(missing as u64).str(b" devices");
        ok = false;
    }
    d.str(b" virtio=").dec(count);
    ok
}

#[inline(never)]
/// The table with `sig` the XSDT lists, as (address, length), once the RSDP and XSDT are
/// sound (the `acpi` check says why when they are not).
pub fn find_table(boot: &Boot, sig: &[u8; 4], d: &mut Detail) -> Option<(u64, u64)> {
    let rsdp = boot.info?.rsdp_addr();
    if rsdp == 0 || !rsdp_at(rsdp) {
        d.str(b"no RSDP");
        return None;
    }
    let xsdt = phys::read_u64(rsdp + RSDP_XSDT);
    let xsdt_len = table_len(xsdt, d)?;
    let mut entry = xsdt + HEADER_LEN;
    while entry + 8 <= xsdt + xsdt_len {
        let table = phys::read_u64(entry);
        let len = table_len(table, d)?;
        if &signature(table) == sig {
            return Some((table, len));
        }
        entry += 8;
    }
    d.str(b"no ").str(sig).str(b" in the XSDT");
    None
}

pub fn check(boot: &Boot, d: &mut Detail) -> bool {
    let Some(want_cpus) = boot.cmdline.require_u64(b"probe.vcpus", d) else {
        return false;
    };
    let Some(info) = boot.require_info(d) else {
        return false;
    };
    let given = info.rsdp_addr();
    let scanned = scan_for_rsdp();
    d.str(b"rsdp=").hex(given);
    if given == 0 || Some(given) != scanned {
        d.str(b" scan found ");
        match scanned {
            Some(a) => d.hex(a),
            None => d.str(b"none"),
        };
        return false;
    }
    if phys::byte_sum(given, RSDP_V1_LEN) != 0
        || phys::read_u8(given + 15) < 2
        || phys::read_u32(given + 20) as u64 != RSDP_V2_LEN
        || phys::byte_sum(given, RSDP_V2_LEN) != 0
    {
        d.str(b" RSDP revision, length or checksum bad");
        return false;
    }
    let xsdt = phys::read_u64(given + RSDP_XSDT);
    let Some(xsdt_len) = table_len(xsdt, d) else {
        return false;
    };
    if &signature(xsdt) != b"XSDT" {
        d.str(b" no XSDT at ").hex(xsdt);
        return false;
    }
    let (mut fadt, mut madt) = (None, None);
    d.str(b" tables=");
    let mut entry = xsdt + HEADER_LEN;
    while entry + 8 <= xsdt + xsdt_len {
        let table = phys::read_u64(entry);
        let Some(len) = table_len(table, d) else {
            return false;
        };
        if entry > xsdt + HEADER_LEN {
            d.byte(b',');
        }
        d.str(&signature(table));
        match &signature(table) {
            b"FACP" => fadt = Some(table),
            b"APIC" => madt = Some((table, len)),
            _ => {}
        }
        entry += 8;
    }
    let (Some(fadt), Some((madt, madt_len))) = (fadt, madt) else {
        d.str(b" FADT or MADT missing");
        return false;
    };
    if phys::read_u32(fadt + FADT_FLAGS) & FADT_HW_REDUCED == 0 {
        d.str(b" FADT not hardware-reduced");
        return false;
    }
    let dsdt = phys::read_u64(fadt + FADT_X_DSDT);
    let Some(dsdt_len) = table_len(dsdt, d) else {
        return false;
    };
    if &signature(dsdt) != b"DSDT" {
        d.str(b" X_DSDT points at no DSDT");
        return false;
    }
    let madt_ok = check_madt(madt, madt_len, want_cpus, d);
    check_dsdt(boot, dsdt, dsdt_len, d) && madt_ok
}
