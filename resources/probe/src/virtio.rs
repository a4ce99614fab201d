//! The `virtio` check: finds the virtio-mmio devices the command line announces, tells them
//! apart by DeviceID, and counts the block devices among them against `probe.blk` and the
//! network devices against `probe.net`.
//!
//! MMIO has no discovery mechanism, so the guest is told where devices are. Like Linux
//! (drivers/virtio/virtio_mmio.c), the probe reads one `virtio_mmio.device=<size>@<base>:<irq>`
//! word per device, with an optional `:<id>` suffix it ignores; size takes a K/M/G suffix.

use crate::Boot;
use crate::cmdline::{Cmdline, parse_u64};
use crate::e820::{MMIO_GAP_END, MMIO_GAP_START};
use crate::line::{Detail, Line};
use crate::virtio_mmio::{DEVICE_ID, MAGIC, MAGIC_VALUE, Mmio, VERSION, VERSION_MODERN};

const KEY: &[u8] = b"virtio_mmio.device";
/// More devices than ember can attach; beyond this the probe stops looking.
pub const MAX_DEVICES: usize = 32;
/// The registers and the block device's `capacity`, the least a block device needs.
const MIN_SIZE: u64 = 0x108;
const DEVICE_ID_NET: u32 = 1;
const DEVICE_ID_BLOCK: u32 = 2;

/// The block and network devices found, by register base, in command-line order.
pub struct Found {
    blk: [u64; MAX_DEVICES],
    count: usize,
    net: [u64; MAX_DEVICES],
    net_count: usize,
}

impl Found {
    pub fn new() -> Self {
        Found {
            blk: [0; MAX_DEVICES],
            count: 0,
            net: [0; MAX_DEVICES],
            net_count: 0,
        }
    }

    pub fn blk(&self) -> &[u64] {
        &self.blk[..self.count]
    }

    pub fn net(&self) -> &[u64] {
        &self.net[..self.net_count]
    }
}

/// Whether the VMM announced any virtio-mmio device.
pub fn announced(cmdline: &Cmdline) -> bool {
    cmdline.all(KEY).next().is_some()
}

/// The announced devices' words, in command-line order.
pub fn words(cmdline: &Cmdline) -> impl Iterator<Item = &'static [u8]> + use<> {
    cmdline.all(KEY)
}

/// `<size>@<base>:<irq>[:<id>]` as (size, base, irq). The id is checked for form only.
pub fn parse_word(value: &[u8]) -> Option<(u64, u64, u32)> {
    let at = value.iter().position(|&b| b == b'@')?;
    let size = parse_size(&value[..at])?;
    let mut fields = value[at + 1..].split(|&b| b == b':');
    let base = parse_u64(fields.next()?)?;
    let irq = u32::try_from(parse_u64(fields.next()?)?).ok()?;
    if let Some(id) = fields.next() {
        parse_u64(id.strip_prefix(b"-").unwrap_or(id))?;
    }
    if fields.next().is_some() {
        return None;
    }
    Some((size, base, irq))
}

/// A number with an optional K/M/G (or T/P/E) suffix, as Linux's memparse reads it. In hex the
/// digits a-f belong to the number, so `0x1e` is 30, not 1 exabyte.
fn parse_size(s: &[u8]) -> Option<u64> {
    let digits_end = match s.strip_prefix(b"0x") {
        Some(hex) => 2 + hex.iter().take_while(|b| b.is_ascii_hexdigit()).count(),
        None => s.iter().take_while(|b| b.is_ascii_digit()).count(),
    };
    let value = parse_u64(&s[..digits_end])?;
    let shift = match &s[digits_end..] {
        [] => 0,
        [suffix] => match suffix.to_ascii_uppercase() {
            b'K' => 10,
            b'M' => 20,
            b'G' => 30,
            b'T' => 40,
            b'P' => 50,
            b'E' => 60,
            _ => return None,
        },
        _ => return None,
    };
    value.checked_mul(1 << shift)
}

/// What a device's identification registers say. Writes any problem, after `dev<i>`, to
/// `problems` and returns the DeviceID of a usable device.
fn identify(
    index: usize,
    base: u64,
    size: u64,
    mapped_top: u64,
    problems: &mut Line<1024>,
) -> Option<u32> {
    problems.str(b" dev").dec(index as u64).byte(b'@').hex(base);
    let end = base.saturating_add(size);
    let problem = if size < MIN_SIZE {
        problems.str(b" size=").hex(size).str(b" too small");
        true
    } else if !base.is_multiple_of(4) {
        problems.str(b" not 4-byte aligned");
        true
    } else if base < MMIO_GAP_START || end > MMIO_GAP_END || end > mapped_top {
        problems.str(b" outside the mapped MMIO gap");
        true
    } else {
        false
    };
    if problem {
        return None;
    }
    let mmio = Mmio::new(base);
    // Magic first, then version, and only then DeviceID (virtio 1.2, 4.2.3.1.1).
    let magic = mmio.read(MAGIC_VALUE);
    if magic != MAGIC {
        problems.str(b" magic=").hex(u64::from(magic));
        return None;
    }
    let version = mmio.read(VERSION);
    if version != VERSION_MODERN {
        // Version 1 is the legacy interface, which the probe does not drive.
        problems.str(b" version=").dec(u64::from(version));
        return None;
    }
    Some(mmio.read(DEVICE_ID))
}

#[inline(never)]
pub fn check(boot: &Boot, found: &mut Found, d: &mut Detail) -> bool {
    // Problems are collected first so the detail can start with the count.
    let mut problems = Line::<1024>::new();
    let mut ok = true;
    for (index, value) in boot.cmdline.all(KEY).enumerate() {
        if index == MAX_DEVICES {
            problems
                .str(b" more than ")
                .dec(MAX_DEVICES as u64)
                .str(b" devices");
            ok = false;
            break;
        }
        let Some((size, base, _irq)) = parse_word(value) else {
            problems
                .str(b" dev")
                .dec(index as u64)
                .str(b" malformed: ")
                .str(value);
            ok = false;
            continue;
        };
        let mark = problems.len();
        match identify(index, base, size, boot.mapped_top, &mut problems) {
            Some(DEVICE_ID_BLOCK) => {
                found.blk[found.count] = base;
                found.count += 1;
                problems.truncate(mark);
            }
            Some(DEVICE_ID_NET) => {
                found.net[found.net_count] = base;
                found.net_count += 1;
                problems.truncate(mark);
            }
            // Other device types are not the probe's business, and placeholders (DeviceID 0)
            // must be ignored without an error (virtio 1.2, 4.2.2.2).
            Some(_) => problems.truncate(mark),
            None => ok = false,
        }
    }

    let want_net = boot.cmdline.get(b"probe.net");
    d.str(b"blk=").dec(found.count as u64);
    match boot.cmdline.get(b"probe.blk") {
        // A test that asks for network devices and names no block devices wants none.
        None if want_net.is_some() => {
            if found.count != 0 {
                d.str(b" want=0");
                ok = false;
            }
        }
        None => {
            d.str(b" probe.blk missing");
            ok = false;
        }
        Some(value) => ok &= expect_count(d, b"probe.blk", value, found.count),
    }
    // Only where network devices are involved, so block-only boots print what they did.
    if want_net.is_some() || found.net_count > 0 {
        d.str(b" net=").dec(found.net_count as u64);
        if let Some(value) = want_net {
            ok &= expect_count(d, b"probe.net", value, found.net_count);
        }
    }
    d.str(problems.as_bytes());
    ok
}

/// Compares a count found with the parameter `key`'s `value`; says why in `d` if it differs.
fn expect_count(d: &mut Detail, key: &[u8], value: &[u8], found: usize) -> bool {
    match parse_u64(value) {
        Some(want) if want == found as u64 => true,
        Some(want) => {
            d.str(b" want=").dec(want);
            false
        }
        None => {
            d.byte(b' ')
                .str(key)
                .byte(b'=')
                .str(value)
                .str(b" is not a number");
            false
        }
    }
}
