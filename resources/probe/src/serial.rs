//! Output and input on the COM1 16550 UART, by polling only (interrupts stay off).
//!
//! Every port access is a VM exit, so the FIFO is used: once LSR says the transmitter is
//! empty, 16 bytes may be written without asking again.

use core::sync::atomic::{AtomicU32, Ordering};

use crate::cpu::{inb, outb};

const COM1: u16 = 0x3f8;
const THR: u16 = COM1;
const RBR: u16 = COM1;
const FCR: u16 = COM1 + 2;
const LSR: u16 = COM1 + 5;

const FCR_ENABLE_AND_CLEAR: u8 = 0x07;
const LSR_DATA_READY: u8 = 1 << 0;
const LSR_THR_EMPTY: u8 = 1 << 5;
const FIFO_DEPTH: u32 = 16;

/// Bytes that may still be written before LSR must be polled again.
static TX_ROOM: AtomicU32 = AtomicU32::new(0);

pub fn init() {
    outb(FCR, FCR_ENABLE_AND_CLEAR);
}

// Not inlined: unrolled copies for every constant string would bloat the image tenfold.
#[inline(never)]
pub fn write(bytes: &[u8]) {
    // Relaxed load/store compile to plain moves; the probe is single-threaded.
    let mut room = TX_ROOM.load(Ordering::Relaxed);
    for &byte in bytes {
        if room == 0 {
            while inb(LSR) & LSR_THR_EMPTY == 0 {}
            room = FIFO_DEPTH;
        }
        outb(THR, byte);
        room -= 1;
    }
    TX_ROOM.store(room, Ordering::Relaxed);
}

/// Writes `bytes` with string instructions (`rep outsb`), up to a FIFO's worth per
/// instruction: the VMM sees one exit carrying many bytes for one port, and must write
/// each of them to the UART.
#[inline(never)]
pub fn write_string_io(bytes: &[u8]) {
    for chunk in bytes.chunks(FIFO_DEPTH as usize) {
        while inb(LSR) & LSR_THR_EMPTY == 0 {}
        // SAFETY: reads `chunk.len()` bytes from `chunk` and writes them to the port;
        // rsi/rcx are consumed by the instruction.
        unsafe {
            core::arch::asm!(
                "rep outsb",
                in("dx") THR,
                inout("rsi") chunk.as_ptr() => _,
                inout("rcx") chunk.len() => _,
                options(nostack, preserves_flags, readonly)
            )
        };
    }
    TX_ROOM.store(0, Ordering::Relaxed);
}

/// Blocks until a byte arrives.
pub fn read_byte() -> u8 {
    while inb(LSR) & LSR_DATA_READY == 0 {}
    inb(RBR)
}
