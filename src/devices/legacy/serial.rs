//! The 16550 UART: the guest's console. Its output goes into a bounded buffer that the
//! vmm thread drains to the host's stdout, so a vCPU writing a byte never waits for the
//! host: a full or closed stdout costs dropped (and counted) bytes, not a stalled guest.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{Serial, SerialEvents, SerialState};
use vmm_sys_util::eventfd::EventFd;

use super::{IrqLine, Line};
use crate::devices::bus::BusDevice;
use crate::metrics::METRICS;

/// The UART's eight byte-wide registers.
pub const REGISTERS_LEN: u64 = 8;

/// How much guest output may wait for the host; more is dropped.
pub const OUTPUT_BUFFER_BYTES: usize = 1 << 20;

/// Tells the event loop when the guest has drained the receive FIFO, so it resumes
/// reading the host's input instead of polling a full FIFO.
pub struct InputDrained(pub EventFd);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.0.write(1);
    }
}

/// Guest output waiting for the vmm thread, and the eventfd that says there is some.
pub struct OutputBuffer {
    bytes: Mutex<VecDeque<u8>>,
    capacity: usize,
    ready: EventFd,
}

impl OutputBuffer {
    pub fn new(capacity: usize) -> io::Result<Self> {
        Ok(OutputBuffer {
            bytes: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity,
            ready: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<u8>> {
        self.bytes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends what fits; the rest is dropped and counted. Signals the eventfd when the
    /// buffer was empty, which is when the vmm thread may have stopped looking.
    pub fn push(&self, data: &[u8]) {
        let mut bytes = self.lock();
        let was_empty = bytes.is_empty();
        let room = self.capacity.saturating_sub(bytes.len());
        let n = room.min(data.len());
        bytes.extend(&data[..n]);
        if n < data.len() {
            METRICS
                .uart
                .output_dropped_bytes
                .add((data.len() - n) as u64);
        }
        drop(bytes);
        if was_empty && n > 0 {
            let _ = self.ready.write(1);
        }
    }

    /// Hands up to `max` waiting bytes to `write`, which returns how many it took; the
    /// rest stays for later, in order.
    pub fn drain_into(&self, max: usize, write: impl FnOnce(&[u8]) -> usize) -> usize {
        let mut bytes = self.lock();
        let (a, _) = bytes.as_slices();
        let chunk = &a[..a.len().min(max)];
        let taken = write(chunk).min(chunk.len());
        bytes.drain(..taken);
        taken
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.ready
    }
}

/// The UART's output side: into the buffer, with a hook that runs once, at the first byte
/// (the boot timer).
pub struct ConsoleOutput {
    buffer: Arc<OutputBuffer>,
    on_first_byte: Option<Box<dyn FnOnce() + Send>>,
}

impl ConsoleOutput {
    pub fn new(buffer: Arc<OutputBuffer>, on_first_byte: Option<Box<dyn FnOnce() + Send>>) -> Self {
        ConsoleOutput {
            buffer,
            on_first_byte,
        }
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(hook) = self.on_first_byte.take() {
            hook();
        }
        self.buffer.push(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The UART's registers and receive FIFO as a snapshot keeps them.
#[derive(Serialize, Deserialize)]
#[serde(remote = "SerialState")]
struct SerialStateDef {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SerialSnapshot(#[serde(with = "SerialStateDef")] pub SerialState);

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("the serial port's saved state is invalid: {0}")]
    State(String),
    #[error("cannot duplicate the serial port's eventfd: {0}")]
    EventFd(io::Error),
}

pub struct SerialDevice {
    uart: Serial<IrqLine, InputDrained, ConsoleOutput>,
    /// What a restored UART is rebuilt around.
    line: Arc<dyn Line>,
    input_drained: EventFd,
    output: Arc<OutputBuffer>,
}

impl SerialDevice {
    /// The UART on `line`; `input_drained` is signalled when the guest empties the
    /// receive FIFO.
    pub fn new(
        line: Box<dyn Line>,
        input_drained: EventFd,
        out: ConsoleOutput,
    ) -> io::Result<Self> {
        let line: Arc<dyn Line> = Arc::from(line);
        let output = out.buffer.clone();
        let uart = Serial::with_events(
            IrqLine(Box::new(line.clone())),
            InputDrained(input_drained.try_clone()?),
            out,
        );
        Ok(SerialDevice {
            uart,
            line,
            input_drained,
            output,
        })
    }

    /// The registers and receive FIFO, for a snapshot.
    pub fn save_state(&self) -> SerialSnapshot {
        SerialSnapshot(self.uart.state())
    }

    /// Puts the UART back in a saved state; `on_first_byte` runs at its next output byte.
    pub fn restore_state(
        &mut self,
        state: &SerialSnapshot,
        on_first_byte: Option<Box<dyn FnOnce() + Send>>,
    ) -> Result<(), SerialError> {
        let events = self
            .input_drained
            .try_clone()
            .map_err(SerialError::EventFd)?;
        self.uart = Serial::from_state(
            &state.0,
            IrqLine(Box::new(self.line.clone())),
            InputDrained(events),
            ConsoleOutput::new(self.output.clone(), on_first_byte),
        )
        .map_err(|e| SerialError::State(format!("{e:?}")))?;
        Ok(())
    }

    /// Free space in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues host input for the guest; returns how many bytes fitted.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        match self.uart.enqueue_raw_bytes(&bytes[..room]) {
            Ok(n) => {
                METRICS.uart.input_bytes.add(n as u64);
                n
            }
            Err(e) => {
                log::warn!("serial: cannot queue guest input: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        METRICS.uart.read_count.inc();
        // The UART has byte-wide registers; wider accesses read as the first byte.
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        METRICS.uart.write_count.inc();
        // Output cannot fail (the buffer drops what does not fit); a failed interrupt
        // is counted.
        if self.uart.write(offset as u8, value).is_err() {
            METRICS.uart.missed_write_count.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn device(
        capacity: usize,
        hook: Option<Box<dyn FnOnce() + Send>>,
    ) -> (SerialDevice, Arc<OutputBuffer>, EventFd) {
        let drained = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = Arc::new(OutputBuffer::new(capacity).unwrap());
        let dev = SerialDevice::new(
            Box::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
            drained.try_clone().unwrap(),
            ConsoleOutput::new(out.clone(), hook),
        )
        .unwrap();
        (dev, out, drained)
    }

    fn drain(out: &OutputBuffer) -> Vec<u8> {
        let mut got = Vec::new();
        while out.drain_into(usize::MAX, |b| {
            got.extend_from_slice(b);
            b.len()
        }) > 0
        {}
        got
    }

    #[test]
    fn output_reaches_the_buffer_and_hook_runs_once() {
        let fired = Arc::new(Mutex::new(0));
        let f = fired.clone();
        let (mut dev, out, _) = device(64, Some(Box::new(move || *f.lock().unwrap() += 1)));
        for b in b"hi" {
            dev.write(0, &[*b]);
        }
        assert_eq!(
            out.eventfd().read().unwrap(),
            1,
            "signalled once, when it filled"
        );
        assert_eq!(drain(&out), b"hi");
        assert_eq!(*fired.lock().unwrap(), 1);
        // Line status: transmitter empty (bit 5) and idle (bit 6).
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
    }

    #[test]
    fn a_full_buffer_drops_and_counts_and_never_blocks() {
        let (mut dev, out, _) = device(4, None);
        let before = METRICS.uart.output_dropped_bytes.total();
        for b in b"abcdefgh" {
            dev.write(0, &[*b]);
        }
        assert!(METRICS.uart.output_dropped_bytes.total() - before >= 4);
        assert_eq!(drain(&out), b"abcd");
        // Partial takes keep the rest in order.
        out.push(b"xyz");
        assert_eq!(out.drain_into(10, |b| b.len().min(1)), 1);
        assert_eq!(drain(&out), b"yz");
    }

    #[test]
    fn a_saved_uart_restores_its_registers_and_fifo_and_keeps_its_output() {
        let (mut dev, out, _) = device(64, None);
        dev.write(7, &[0x5a]); // scratch
        dev.write(3, &[0x03]); // line control: 8 bits
        assert_eq!(dev.enqueue_input(b"abc"), 3);
        let saved: SerialSnapshot =
            serde_json::from_str(&serde_json::to_string(&dev.save_state()).unwrap()).unwrap();
        let fired = Arc::new(Mutex::new(0));
        let f = fired.clone();
        let (mut fresh, fresh_out, _) = device(64, None);
        fresh
            .restore_state(&saved, Some(Box::new(move || *f.lock().unwrap() += 1)))
            .unwrap();
        let mut b = [0u8];
        fresh.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        fresh.read(3, &mut b);
        assert_eq!(b[0], 0x03);
        for want in b"abc" {
            fresh.read(0, &mut b);
            assert_eq!(b[0], *want);
        }
        // Output still reaches the device's own buffer, and the restore hook runs once.
        fresh.write(0, b"x");
        fresh.write(0, b"y");
        assert_eq!(drain(&fresh_out), b"xy");
        assert!(drain(&out).is_empty());
        assert_eq!(*fired.lock().unwrap(), 1);
        // A FIFO longer than the chip's is refused.
        let mut bad = dev.save_state();
        bad.0.in_buffer = vec![0; 65];
        assert!(fresh.restore_state(&bad, None).is_err());
    }

    #[test]
    fn input_fills_fifo_then_signals_when_drained() {
        let (mut dev, _, drained) = device(64, None);
        let input = vec![b'x'; 100];
        let taken = dev.enqueue_input(&input);
        assert_eq!(taken, 64, "FIFO holds 64 bytes");
        assert_eq!(dev.input_capacity(), 0);
        let mut b = [0u8];
        for _ in 0..64 {
            dev.read(0, &mut b);
            assert_eq!(b[0], b'x');
        }
        assert_eq!(drained.read().unwrap(), 1);
        assert_eq!(dev.input_capacity(), 64);
    }
}
