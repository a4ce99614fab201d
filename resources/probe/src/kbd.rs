//! Keystrokes the host injects through the i8042 (the API's SendCtrlAltDel), read by polling
//! its status port: interrupts stay off, so the pending IRQ 1 is never taken, and the
//! controller is only asked whether its output buffer holds a byte.

use crate::cpu::{PORT_I8042_COMMAND, PORT_I8042_DATA, inb};
use crate::line::Line;
use crate::serial;
use crate::timeout::{self, Deadline};

/// Status register (read from the command port): a byte waits in the data port.
const STATUS_OUTPUT_FULL: u8 = 1 << 0;
/// Ctrl+Alt+Del in scancode set 2 (the controller's translation stays off): three make
/// codes, Delete's with the extended prefix, then the three break codes.
const KEYS: usize = 11;
/// How long the host may take to send them: about 30 s at 3 GHz (18-90 s over the 1-5 GHz
/// TSC range), since the test sends them through the API only after seeing `PROBE DONE`.
const WAIT_TICKS: u64 = 90_000_000_000;
/// Between two status reads: each is an exit to the VMM's thread, and the keys may be
/// seconds away, so a few thousand reads a second (0.2-1 ms apart) are plenty.
const POLL_GAP_TICKS: u64 = 1 << 20;

/// Collects `KEYS` bytes from the i8042 and prints them as `PROBE KBD 14 11 ..`, or
/// `PROBE KBD timeout got=..` with those that came before the wait ran out.
pub fn wait_and_report() {
    let mut got = [0u8; KEYS];
    let mut n = 0;
    let mut deadline = Deadline::after(WAIT_TICKS);
    while n < KEYS {
        if inb(PORT_I8042_COMMAND) & STATUS_OUTPUT_FULL != 0 {
            // No pause after a byte: the host queues the whole sequence at once.
            got[n] = inb(PORT_I8042_DATA);
            n += 1;
        } else if deadline.expired() {
            break;
        } else {
            timeout::delay(POLL_GAP_TICKS);
        }
    }

    let mut line = Line::<64>::new();
    line.str(b"PROBE KBD ");
    if n < KEYS {
        line.str(b"timeout got=");
    }
    for (i, &byte) in got.iter().take(n).enumerate() {
        if i > 0 {
            line.byte(b' ');
        }
        line.hex2(byte);
    }
    line.str(b"\n");
    serial::write(line.as_bytes());
}
