//! The kernel command line: where the test tells the probe what the VMM was asked for,
//! as `probe.<key>=<value>` words among the usual kernel parameters.

use crate::bootinfo::BootInfo;
use crate::line::Detail;
use crate::paging::BOOT_MAP_END;
use crate::phys;

const PREFIX: &[u8] = b"probe.";
/// Bound the NUL search when the header does not say (`cmdline_size` = 0, or PVH, which has no
/// size field) or says nonsense.
const DEFAULT_LIMIT: u64 = 4096;
const MAX_LIMIT: u64 = 64 * 1024;

pub struct Cmdline {
    text: &'static [u8],
}

impl Cmdline {
    pub fn empty() -> Self {
        Cmdline { text: &[] }
    }

    pub fn as_bytes(&self) -> &'static [u8] {
        self.text
    }

    fn words(&self) -> impl Iterator<Item = &'static [u8]> + use<> {
        self.text
            .split(|&b| b == b' ' || b == b'\t' || b == b'\n')
            .filter(|w| !w.is_empty())
    }

    /// The value of the last `key=value` word (later words override earlier ones, as in
    /// Linux).
    pub fn get(&self, key: &[u8]) -> Option<&'static [u8]> {
        self.all(key).last()
    }

    /// The values of every `key=value` word, in order: for keys that may repeat, such as
    /// `virtio_mmio.device`.
    pub fn all<'a>(&self, key: &'a [u8]) -> impl Iterator<Item = &'static [u8]> + use<'a> {
        self.words()
            .filter_map(move |word| match word.strip_prefix(key)?.split_first() {
                Some((b'=', value)) => Some(value),
                _ => None,
            })
    }

    /// A required numeric parameter; on failure says why in `d` (missing or not a number).
    pub fn require_u64(&self, key: &[u8], d: &mut Detail) -> Option<u64> {
        match self.get(key) {
            None => {
                d.str(key).str(b" missing");
                None
            }
            Some(value) => {
                let parsed = parse_u64(value);
                if parsed.is_none() {
                    d.str(key).str(b"=").str(value).str(b" is not a number");
                }
                parsed
            }
        }
    }

    pub fn has_probe_params(&self) -> bool {
        self.words().any(|w| w.starts_with(PREFIX))
    }
}

/// Decimal, or hex with a `0x` prefix.
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s.strip_prefix(b"0x") {
        Some(hex) => (hex, 16),
        None => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut value: u64 = 0;
    for &c in digits {
        let digit = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' if radix == 16 => c - b'a' + 10,
            b'A'..=b'F' if radix == 16 => c - b'A' + 10,
            _ => return None,
        };
        value = value.checked_mul(radix)?.checked_add(u64::from(digit))?;
    }
    Some(value)
}

/// The `cmdline` check: the command line exists, is NUL-terminated within the size the
/// header allows, and carries at least one `probe.` parameter. The detail quotes it whole
/// so tests can compare it with what they passed.
pub fn check(info: &BootInfo, d: &mut Detail) -> (Cmdline, bool) {
    let (addr, limit) = match info {
        BootInfo::ZeroPage(zp) => {
            let limit = match u64::from(zp.cmdline_size()) {
                0 => DEFAULT_LIMIT,
                size => (size + 1).min(MAX_LIMIT),
            };
            (zp.cmdline_addr(), limit)
        }
        BootInfo::StartInfo(si) => (si.cmdline_addr(), DEFAULT_LIMIT),
    };
    if addr == 0 {
        d.str(match info {
            BootInfo::ZeroPage(_) => b"cmd_line_ptr is 0",
            BootInfo::StartInfo(_) => b"cmdline_paddr is 0",
        });
        return (Cmdline::empty(), false);
    }
    if addr >= BOOT_MAP_END || BOOT_MAP_END - addr < limit {
        d.str(b"at=")
            .hex(addr)
            .str(b" outside the boot identity map");
        return (Cmdline::empty(), false);
    }
    let mut len = 0;
    while len < limit && phys::read_u8(addr + len) != 0 {
        len += 1;
    }
    if len == limit {
        d.str(b"at=")
            .hex(addr)
            .str(b" not NUL-terminated within ")
            .dec(limit)
            .str(b" bytes");
        return (Cmdline::empty(), false);
    }
    // SAFETY: the bytes were just read through the identity map and nothing writes them.
    let text = unsafe { core::slice::from_raw_parts(addr as *const u8, len as usize) };
    let cmdline = Cmdline { text };

    d.str(b"len=").dec(len).str(b" \"");
    for &b in text {
        // Keep the result on one printable line.
        d.byte(if (0x20..0x7f).contains(&b) { b } else { b'?' });
    }
    d.byte(b'"');
    let ok = cmdline.has_probe_params();
    if !ok {
        d.str(b" no probe.* parameter");
    }
    (cmdline, ok)
}
