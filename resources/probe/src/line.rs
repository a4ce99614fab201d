//! A fixed-capacity byte buffer with decimal and hex printers, standing in for `core::fmt`.

use core::mem::MaybeUninit;

/// Large enough for the longest detail: the whole command line (at most 4096 bytes).
pub const DETAIL_CAPACITY: usize = 4096 + 128;

pub struct Line<const N: usize> {
    // Left uninitialised: zeroing 4 KiB would cost thousands of emulated iterations.
    buf: [MaybeUninit<u8>; N],
    len: usize,
}

/// The buffer a check writes its detail into.
pub type Detail = Line<DETAIL_CAPACITY>;

impl<const N: usize> Line<N> {
    pub fn new() -> Self {
        Line {
            buf: [MaybeUninit::uninit(); N],
            len: 0,
        }
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Drops what was written after the first `len` bytes.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: the first `len` bytes have been written.
        unsafe { core::slice::from_raw_parts(self.buf.as_ptr().cast::<u8>(), self.len) }
    }

    /// Drops what does not fit: a truncated detail beats a panic.
    pub fn byte(&mut self, b: u8) -> &mut Self {
        if let Some(slot) = self.buf.get_mut(self.len) {
            slot.write(b);
            self.len += 1;
        }
        self
    }

    #[inline(never)]
    pub fn str(&mut self, s: &[u8]) -> &mut Self {
        for &b in s {
            self.byte(b);
        }
        self
    }

    pub fn dec(&mut self, mut value: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut n = 0;
        loop {
            digits[n] = b'0' + (value % 10) as u8;
            n += 1;
            value /= 10;
            if value == 0 || n == digits.len() {
                break;
            }
        }
        while n > 0 {
            n -= 1;
            self.byte(digits[n]);
        }
        self
    }

    /// `0x` followed by the hex digits without leading zeros.
    pub fn hex(&mut self, value: u64) -> &mut Self {
        self.str(b"0x");
        let mut shift = 60;
        while shift > 0 && (value >> shift) == 0 {
            shift -= 4;
        }
        loop {
            self.byte(hex_digit((value >> shift) as u8));
            if shift == 0 {
                break;
            }
            shift -= 4;
        }
        self
    }

    /// `0x` and exactly two hex digits.
    pub fn hex_byte(&mut self, value: u8) -> &mut Self {
        self.str(b"0x").hex2(value)
    }

    /// Exactly two hex digits, no prefix: for lists of bytes.
    pub fn hex2(&mut self, value: u8) -> &mut Self {
        self.byte(hex_digit(value >> 4)).byte(hex_digit(value))
    }

    /// A range as `start-end` (end exclusive).
    pub fn range(&mut self, start: u64, end: u64) -> &mut Self {
        self.hex(start).byte(b'-').hex(end)
    }
}

fn hex_digit(nibble: u8) -> u8 {
    b"0123456789abcdef"[usize::from(nibble & 0xf)]
}
