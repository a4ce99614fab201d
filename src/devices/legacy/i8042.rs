//! The i8042 keyboard controller, for the two things a microVM needs from it: the guest's
//! reset request (command 0xFE), which ends the VM, and keystrokes the host injects
//! (Ctrl+Alt+Del, so a guest can be asked to shut down).

use std::collections::VecDeque;

use vm_superio::Trigger;

use super::IrqLine;
use crate::devices::bus::BusDevice;
use crate::metrics::METRICS;
use crate::stop::StopSignal;

/// Data port to command port inclusive (0x60-0x64 on a PC); the speaker port in between
/// (0x61) stays with the in-kernel PIT, which claims it first.
pub const PORT_LEN: u64 = 5;
/// The command/status port, from the data port.
pub const COMMAND_OFFSET: u64 = 4;
/// The controller's output buffer: bytes the guest has not read yet. A real 8042 holds
/// one; its keyboard a 16-byte FIFO behind it. More is dropped, as the hardware drops it.
const OUTPUT_BUFFER_BYTES: usize = 16;

const OFF_DATA: u64 = 0;
const OFF_COMMAND: u64 = COMMAND_OFFSET;

const SB_OUT_DATA_AVAIL: u8 = 0x01;
const SB_I8042_CMD_DATA: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;
/// "System flag": POST passed. Linux checks it.
const SB_SYSTEM: u8 = 0x04;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_WRITE_KBD_OUTBUF: u8 = 0xd2;
const CMD_PULSE_RESET: u8 = 0xfe;

const CTR_KBD_INT: u8 = 0x01;
/// Controller translates the keyboard's set 2 scancodes to set 1.
const CTR_XLATE: u8 = 0x40;

/// Ctrl+Alt+Del as the keyboard sends it, in scancode set 2: left Ctrl, left Alt and Delete
/// (an extended key) pressed, then released in the opposite order. Without translation
/// (ember's power-on state, which Linux keeps) the guest receives exactly this.
const CTRL_ALT_DEL: [u8; 11] = [
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
];

/// Set 2 break prefix and extended-key prefix.
const SET2_BREAK: u8 = 0xf0;
const SET2_EXTENDED: u8 = 0xe0;

/// The 8042's set 2 to set 1 translation for the keys ember sends (Ctrl, Alt, Delete).
fn set1_make_code(set2: u8) -> Option<u8> {
    match set2 {
        0x14 => Some(0x1d),
        0x11 => Some(0x38),
        0x71 => Some(0x53),
        _ => None,
    }
}

pub struct I8042 {
    status: u8,
    control: u8,
    outp: u8,
    /// The last command that waits for a data byte on port 0x60.
    pending_cmd: Option<u8>,
    out_buf: VecDeque<u8>,
    /// With translation on, a set 2 break prefix waits for the code it modifies.
    pending_break: bool,
    stop: StopSignal,
    kbd_interrupt: IrqLine,
}

/// The controller's registers and output queue as a snapshot keeps them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    pub status: u8,
    pub control: u8,
    pub outp: u8,
    pub pending_cmd: Option<u8>,
    pub out_buf: Vec<u8>,
    pub pending_break: bool,
}

impl I8042 {
    /// The registers and queued bytes, for a snapshot.
    pub fn save_state(&self) -> I8042State {
        I8042State {
            status: self.status,
            control: self.control,
            outp: self.outp,
            pending_cmd: self.pending_cmd,
            out_buf: self.out_buf.iter().copied().collect(),
            pending_break: self.pending_break,
        }
    }

    /// Puts the controller back in a saved state.
    pub fn restore_state(&mut self, state: &I8042State) {
        self.status = state.status;
        self.control = state.control;
        self.outp = state.outp;
        self.pending_cmd = state.pending_cmd;
        self.out_buf = state.out_buf.iter().copied().collect();
        self.pending_break = state.pending_break;
    }

    pub fn new(stop: StopSignal, kbd_interrupt: IrqLine) -> Self {
        I8042 {
            status: SB_SYSTEM | SB_KBD_ENABLED,
            control: CTR_KBD_INT,
            outp: 0,
            pending_cmd: None,
            out_buf: VecDeque::new(),
            pending_break: false,
            stop,
            kbd_interrupt,
        }
    }

    fn push_byte(&mut self, b: u8) {
        if self.out_buf.len() >= OUTPUT_BUFFER_BYTES {
            METRICS.i8042.missed_bytes.inc();
            return;
        }
        self.out_buf.push_back(b);
        self.status |= SB_OUT_DATA_AVAIL;
        if self.control & CTR_KBD_INT != 0 {
            let _ = self.kbd_interrupt.trigger();
        }
    }

    /// A byte from the keyboard, translated to set 1 as the controller does when the guest
    /// set CTR bit 6: a break prefix is swallowed and sets bit 7 of the code after it.
    fn push_key_byte(&mut self, b: u8) {
        if self.control & CTR_XLATE == 0 {
            self.push_byte(b);
            return;
        }
        match b {
            SET2_BREAK => self.pending_break = true,
            SET2_EXTENDED => self.push_byte(b),
            code => {
                let Some(set1) = set1_make_code(code) else {
                    crate::rate_limited_log!(
                        log::Level::Debug,
                        "i8042: no set 1 code for set 2 code {code:#x}"
                    );
                    return;
                };
                let brk = std::mem::take(&mut self.pending_break);
                self.push_byte(if brk { set1 | 0x80 } else { set1 });
            }
        }
    }

    /// Queues Ctrl+Alt+Del for the guest (the API's SendCtrlAltDel).
    pub fn send_ctrl_alt_del(&mut self) {
        for b in CTRL_ALT_DEL {
            self.push_key_byte(b);
        }
    }

    fn command(&mut self, cmd: u8) {
        self.status |= SB_I8042_CMD_DATA;
        match cmd {
            CMD_READ_CTR => self.push_byte(self.control),
            CMD_WRITE_CTR | CMD_WRITE_OUTP | CMD_WRITE_KBD_OUTBUF => self.pending_cmd = Some(cmd),
            CMD_READ_OUTP => self.push_byte(self.outp),
            CMD_SELF_TEST => self.push_byte(0x55),
            CMD_KBD_TEST => self.push_byte(0x00),
            CMD_KBD_DISABLE => self.status &= !SB_KBD_ENABLED,
            CMD_KBD_ENABLE => self.status |= SB_KBD_ENABLED,
            CMD_PULSE_RESET => {
                METRICS.i8042.reset_count.inc();
                self.stop.guest_reset();
            }
            _ => crate::rate_limited_log!(log::Level::Debug, "i8042: ignoring command {cmd:#x}"),
        }
    }

    fn data(&mut self, value: u8) {
        self.status &= !SB_I8042_CMD_DATA;
        match self.pending_cmd.take() {
            Some(CMD_WRITE_CTR) => self.control = value,
            Some(CMD_WRITE_OUTP) => self.outp = value,
            Some(CMD_WRITE_KBD_OUTBUF) => self.push_byte(value),
            // A byte for the keyboard itself: acknowledge it as a keyboard does.
            _ => self.push_byte(0xfa),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        METRICS.i8042.read_count.inc();
        data.fill(0);
        let Some(first) = data.first_mut() else {
            return;
        };
        match offset {
            OFF_DATA => {
                *first = self.out_buf.pop_front().unwrap_or(0);
                if self.out_buf.is_empty() {
                    self.status &= !SB_OUT_DATA_AVAIL;
                } else if self.control & CTR_KBD_INT != 0 {
                    let _ = self.kbd_interrupt.trigger();
                }
            }
            OFF_COMMAND => *first = self.status,
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        METRICS.i8042.write_count.inc();
        let Some(&value) = data.first() else { return };
        match offset {
            OFF_DATA => self.data(value),
            OFF_COMMAND => self.command(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    /// The controller, its stop signal and its interrupt line, an eventfd to watch.
    fn device() -> (I8042, StopSignal, EventFd) {
        let stop = StopSignal::new().unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = I8042::new(stop.clone(), IrqLine::new(irq.try_clone().unwrap()));
        (dev, stop, irq)
    }

    fn read(dev: &mut I8042, off: u64) -> u8 {
        let mut b = [0u8];
        dev.read(off, &mut b);
        b[0]
    }

    #[test]
    fn a_saved_controller_restores_its_registers_and_queued_bytes() {
        let prepared = || {
            let (mut dev, _, _) = device();
            dev.write(OFF_COMMAND, &[CMD_WRITE_CTR]);
            dev.write(OFF_DATA, &[0x47]);
            dev.send_ctrl_alt_del();
            dev
        };
        let mut reference = prepared();
        let all: Vec<u8> = (0..11).map(|_| read(&mut reference, OFF_DATA)).collect();
        let mut dev = prepared();
        assert_eq!(read(&mut dev, OFF_DATA), all[0], "one of 11 bytes read");
        let saved: I8042State =
            serde_json::from_str(&serde_json::to_string(&dev.save_state()).unwrap()).unwrap();
        let (mut fresh, _, _) = device();
        fresh.restore_state(&saved);
        assert_eq!(fresh.save_state(), saved);
        let rest: Vec<u8> = (0..10).map(|_| read(&mut fresh, OFF_DATA)).collect();
        assert_eq!(rest, all[1..], "the queue goes on where it was");
        fresh.write(OFF_COMMAND, &[CMD_READ_CTR]);
        assert_eq!(read(&mut fresh, OFF_DATA), 0x47);
    }

    #[test]
    fn reset_command_signals() {
        let (mut dev, stop, _) = device();
        dev.write(OFF_COMMAND, &[CMD_WRITE_CTR]);
        assert!(!stop.is_stopping(), "nothing signalled yet");
        dev.write(OFF_COMMAND, &[CMD_PULSE_RESET]);
        assert!(stop.was_guest_reset() && stop.is_stopping());
        assert_eq!(stop.eventfd().read().unwrap(), 1);
    }

    #[test]
    fn control_register_round_trip_and_self_test() {
        let (mut dev, _, _) = device();
        dev.write(OFF_COMMAND, &[CMD_WRITE_CTR]);
        dev.write(OFF_DATA, &[0x47]);
        dev.write(OFF_COMMAND, &[CMD_READ_CTR]);
        assert_ne!(read(&mut dev, OFF_COMMAND) & SB_OUT_DATA_AVAIL, 0);
        assert_eq!(read(&mut dev, OFF_DATA), 0x47);
        assert_eq!(read(&mut dev, OFF_COMMAND) & SB_OUT_DATA_AVAIL, 0);
        dev.write(OFF_COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut dev, OFF_DATA), 0x55);
    }

    #[test]
    fn ctrl_alt_del_scancodes_and_interrupt() {
        let (mut dev, _, irq) = device();
        dev.send_ctrl_alt_del();
        assert!(irq.read().unwrap() >= 1);
        let got: Vec<u8> = (0..11).map(|_| read(&mut dev, OFF_DATA)).collect();
        // Set 2, as Linux reads it with translation off (the power-on state).
        assert_eq!(
            got,
            [
                0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14
            ]
        );
        assert_eq!(read(&mut dev, OFF_COMMAND) & SB_OUT_DATA_AVAIL, 0);
    }

    #[test]
    fn translation_gives_set_1_when_the_guest_enables_it() {
        let (mut dev, _, _) = device();
        dev.write(OFF_COMMAND, &[CMD_WRITE_CTR]);
        dev.write(OFF_DATA, &[CTR_KBD_INT | CTR_XLATE]);
        dev.send_ctrl_alt_del();
        let got: Vec<u8> = (0..8).map(|_| read(&mut dev, OFF_DATA)).collect();
        assert_eq!(got, [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]);
        assert_eq!(read(&mut dev, OFF_COMMAND) & SB_OUT_DATA_AVAIL, 0);
    }

    #[test]
    fn output_buffer_is_bounded_like_the_hardware() {
        let (mut dev, _, _) = device();
        let before = METRICS.i8042.missed_bytes.total();
        // Far more keystrokes than the controller holds, as a guest that never reads would
        // see them.
        for _ in 0..1000 {
            dev.send_ctrl_alt_del();
        }
        assert_eq!(dev.out_buf.len(), OUTPUT_BUFFER_BYTES);
        assert_eq!(
            METRICS.i8042.missed_bytes.total() - before,
            (1000 * CTRL_ALT_DEL.len() - OUTPUT_BUFFER_BYTES) as u64
        );
        // A guest writing commands that answer in a loop cannot grow it either.
        for _ in 0..1000 {
            dev.write(OFF_COMMAND, &[CMD_SELF_TEST]);
        }
        assert_eq!(dev.out_buf.len(), OUTPUT_BUFFER_BYTES);
    }
}
