//! The PC's own devices, at the ports and interrupt lines the layout fixes: the console
//! UART (COM1), the i8042 keyboard controller and the ACPI power-management registers.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::{DeviceManager, DeviceManagerError};
use crate::arch::PlatformDevice;
use crate::arch::layout::{
    COM1_IRQ, COM1_PORT, I8042_DATA_PORT, I8042_IRQ, IOAPIC_START, PM_PORT_START,
};
use crate::devices::legacy::IrqLine;
use crate::devices::legacy::i8042::{self, I8042};
use crate::devices::legacy::ioapic::{IOAPIC_WINDOW, Ioapic};
use crate::devices::legacy::power::{self, PowerManagement};
use crate::devices::legacy::serial::{
    self, ConsoleOutput, OUTPUT_BUFFER_BYTES, OutputBuffer, SerialDevice,
};
use crate::stop::StopSignal;
use crate::vstate::vm::Vm;

/// The `SLP_TYP` the firmware tables give the S5 (soft off) state.
const S5_SLEEP_TYPE: u8 = 5;

/// What the controller reaches after start: the console's two directions and the
/// keyboard (SendCtrlAltDel).
pub struct LegacyDevices {
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Readable when the guest has emptied the UART's receive FIFO.
    pub serial_input_drained: EventFd,
    /// Guest output waiting for the host's stdout.
    pub console_output: Arc<OutputBuffer>,
    pub i8042: Arc<Mutex<I8042>>,
}

impl DeviceManager {
    /// Puts ember's I/O APIC (split irqchip) on the MMIO bus at its architectural address.
    pub fn attach_ioapic(&mut self, ioapic: Arc<Mutex<Ioapic>>) -> Result<(), DeviceManagerError> {
        self.mmio_bus.insert(ioapic, IOAPIC_START, IOAPIC_WINDOW)?;
        Ok(())
    }

    /// Attaches COM1, the i8042 and the power-management registers. `on_first_byte` runs
    /// at the guest's first console byte (the boot timer).
    pub fn attach_legacy(
        &mut self,
        vm: &Vm,
        stop: &StopSignal,
        on_first_byte: Option<Box<dyn FnOnce() + Send>>,
    ) -> Result<(), DeviceManagerError> {
        let eventfd =
            |what| EventFd::new(libc::EFD_NONBLOCK).map_err(|e| DeviceManagerError::Io(what, e));
        let serial_input_drained = eventfd("the serial input eventfd")?;
        let console_output = Arc::new(
            OutputBuffer::new(OUTPUT_BUFFER_BYTES)
                .map_err(|e| DeviceManagerError::Io("the console output buffer", e))?,
        );
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            IrqLine(vm.interrupt_line(COM1_IRQ, "the serial port")?),
            serial_input_drained
                .try_clone()
                .map_err(|e| DeviceManagerError::EventFd("the serial port".into(), e))?,
            ConsoleOutput::new(console_output.clone(), on_first_byte),
        )));
        self.pio_bus
            .insert(serial.clone(), COM1_PORT, serial::REGISTERS_LEN)?;
        self.platform.push(PlatformDevice::Serial {
            port: COM1_PORT as u16,
            irq: COM1_IRQ,
        });

        let i8042 = Arc::new(Mutex::new(I8042::new(
            stop.clone(),
            IrqLine(vm.interrupt_line(I8042_IRQ, "the i8042")?),
        )));
        self.pio_bus
            .insert(i8042.clone(), I8042_DATA_PORT, i8042::PORT_LEN)?;
        self.platform.push(PlatformDevice::Keyboard {
            data_port: I8042_DATA_PORT as u16,
            command_port: (I8042_DATA_PORT + i8042::COMMAND_OFFSET) as u16,
            irq: I8042_IRQ,
        });

        self.pio_bus.insert(
            Arc::new(Mutex::new(PowerManagement::new(
                S5_SLEEP_TYPE,
                stop.clone(),
            ))),
            PM_PORT_START,
            power::PORT_LEN,
        )?;
        self.platform.push(PlatformDevice::PowerManagement {
            sleep_control: (PM_PORT_START + power::SLEEP_CONTROL) as u16,
            sleep_status: (PM_PORT_START + power::SLEEP_STATUS) as u16,
            reset: (PM_PORT_START + power::RESET) as u16,
            reset_value: power::RESET_VALUE,
            s5_sleep_type: S5_SLEEP_TYPE,
        });

        self.legacy = Some(LegacyDevices {
            serial,
            serial_input_drained,
            console_output,
            i8042,
        });
        Ok(())
    }
}
