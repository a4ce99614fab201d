//! The 16550 UART at 0x3f8 (COM1, IRQ 4): the guest's console.

use std::io::{self, Write};

use vm_superio::serial::{Serial, SerialEvents};
use vmm_sys_util::eventfd::EventFd;

use super::EventFdTrigger;
use crate::devices::bus::BusDevice;
use crate::metrics::METRICS;

pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;
pub const COM1_IRQ: u32 = 4;

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

/// Where guest output goes, with a hook that runs once, at the first byte (the boot timer).
pub struct ConsoleOutput {
    out: Box<dyn Write + Send>,
    on_first_byte: Option<Box<dyn FnOnce() + Send>>,
}

impl ConsoleOutput {
    pub fn new(
        out: Box<dyn Write + Send>,
        on_first_byte: Option<Box<dyn FnOnce() + Send>>,
    ) -> Self {
        ConsoleOutput { out, on_first_byte }
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(hook) = self.on_first_byte.take() {
            hook();
        }
        self.out.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

pub struct SerialDevice {
    uart: Serial<EventFdTrigger, InputDrained, ConsoleOutput>,
    /// Output errors are logged once: a closed stdout must not flood the log.
    output_failed: bool,
}

impl SerialDevice {
    pub fn new(interrupt: EventFd, input_drained: EventFd, out: ConsoleOutput) -> Self {
        SerialDevice {
            uart: Serial::with_events(EventFdTrigger(interrupt), InputDrained(input_drained), out),
            output_failed: false,
        }
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
        if let Err(e) = self.uart.write(offset as u8, value) {
            METRICS.uart.missed_write_count.inc();
            if !self.output_failed {
                log::warn!("serial: guest output lost: {e:?}");
                self.output_failed = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn device(sink: Sink, hook: Option<Box<dyn FnOnce() + Send>>) -> (SerialDevice, EventFd) {
        let drained = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = SerialDevice::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            drained.try_clone().unwrap(),
            ConsoleOutput::new(Box::new(sink), hook),
        );
        (dev, drained)
    }

    #[test]
    fn output_reaches_sink_and_hook_runs_once() {
        let sink = Sink::default();
        let fired = Arc::new(Mutex::new(0));
        let f = fired.clone();
        let (mut dev, _) = device(
            sink.clone(),
            Some(Box::new(move || *f.lock().unwrap() += 1)),
        );
        for b in b"hi" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        assert_eq!(*fired.lock().unwrap(), 1);
        // Line status: transmitter empty (bit 5) and idle (bit 6).
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
    }

    #[test]
    fn input_fills_fifo_then_signals_when_drained() {
        let (mut dev, drained) = device(Sink::default(), None);
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
