//! The platform's own devices, at the addresses and interrupt lines the layout fixes: the
//! console UART everywhere; on x86_64 (COM1 on its ports) the i8042 keyboard controller,
//! the I/O APIC and the ACPI power-management registers; on arm64 (the UART on the MMIO
//! bus) a PL031 real-time clock.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::{DeviceManager, DeviceManagerError};
use crate::arch::PlatformDevice;
#[cfg(target_arch = "x86_64")]
use crate::arch::layout::{
    COM1_IRQ, COM1_PORT, I8042_DATA_PORT, I8042_IRQ, IOAPIC_START, PM_PORT_START,
};
#[cfg(target_arch = "aarch64")]
use crate::arch::layout::{RTC_IRQ, RTC_START, SERIAL_IRQ, SERIAL_START};
#[cfg(target_arch = "x86_64")]
use crate::devices::legacy::IrqLine;
#[cfg(target_arch = "x86_64")]
use crate::devices::legacy::i8042::{self, I8042};
#[cfg(target_arch = "x86_64")]
use crate::devices::legacy::ioapic::{IOAPIC_WINDOW, Ioapic};
#[cfg(target_arch = "x86_64")]
use crate::devices::legacy::power::{self, PowerManagement};
use crate::devices::legacy::serial::{
    self, ConsoleOutput, OUTPUT_BUFFER_BYTES, OutputBuffer, SerialDevice,
};
use crate::stop::StopSignal;
use crate::vstate::vm::Vm;

/// The `SLP_TYP` the firmware tables give the S5 (soft off) state.
#[cfg(target_arch = "x86_64")]
const S5_SLEEP_TYPE: u8 = 5;

/// What the controller reaches after start: the console's two directions and, on
/// x86_64, the keyboard (SendCtrlAltDel).
pub struct LegacyDevices {
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Readable when the guest has emptied the UART's receive FIFO.
    pub serial_input_drained: EventFd,
    /// Guest output waiting for the host's stdout.
    pub console_output: Arc<OutputBuffer>,
    #[cfg(target_arch = "x86_64")]
    pub i8042: Arc<Mutex<I8042>>,
}

/// The console UART, its input-drained eventfd and its output buffer.
type Console = (Arc<Mutex<SerialDevice>>, EventFd, Arc<OutputBuffer>);

/// The console UART on interrupt `irq`. `on_first_byte` runs at the guest's first console
/// byte (the boot timer).
fn console(
    vm: &Vm,
    irq: u32,
    on_first_byte: Option<Box<dyn FnOnce() + Send>>,
) -> Result<Console, DeviceManagerError> {
    let serial_input_drained = EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|e| DeviceManagerError::Io("the serial input eventfd", e))?;
    let console_output = Arc::new(
        OutputBuffer::new(OUTPUT_BUFFER_BYTES)
            .map_err(|e| DeviceManagerError::Io("the console output buffer", e))?,
    );
    let serial = Arc::new(Mutex::new(
        SerialDevice::new(
            vm.interrupt_line(irq, "the serial port")?,
            serial_input_drained
                .try_clone()
                .map_err(|e| DeviceManagerError::EventFd("the serial port".into(), e))?,
            ConsoleOutput::new(console_output.clone(), on_first_byte),
        )
        .map_err(|e| DeviceManagerError::EventFd("the serial port".into(), e))?,
    ));
    Ok((serial, serial_input_drained, console_output))
}

#[cfg(target_arch = "aarch64")]
impl DeviceManager {
    /// Attaches the console UART and the RTC on the MMIO bus. `on_first_byte` runs at the
    /// guest's first console byte (the boot timer). arm64 guests power off and reset
    /// through PSCI, which KVM answers, so there are no power registers.
    pub fn attach_platform(
        &mut self,
        vm: &Vm,
        _vcpu_count: u8,
        _stop: &StopSignal,
        on_first_byte: Option<Box<dyn FnOnce() + Send>>,
    ) -> Result<(), DeviceManagerError> {
        let (serial, serial_input_drained, console_output) =
            console(vm, SERIAL_IRQ, on_first_byte)?;
        self.mmio_bus
            .insert(serial.clone(), SERIAL_START, serial::REGISTERS_LEN)?;
        self.platform.push(PlatformDevice::MmioSerial {
            base: SERIAL_START,
            irq: SERIAL_IRQ,
        });
        self.mmio_bus.insert(
            Arc::new(Mutex::new(crate::devices::legacy::rtc::RtcDevice::default())),
            RTC_START,
            crate::devices::legacy::rtc::REGISTERS_LEN,
        )?;
        self.platform.push(PlatformDevice::Rtc {
            base: RTC_START,
            irq: RTC_IRQ,
        });
        self.legacy = Some(LegacyDevices {
            serial,
            serial_input_drained,
            console_output,
        });
        Ok(())
    }
}

#[cfg(target_arch = "x86_64")]
impl DeviceManager {
    /// Puts ember's I/O APIC (split irqchip) on the MMIO bus at its architectural address,
    /// with the first ID after the `vcpu_count` CPUs' (as the firmware tables give it).
    fn attach_ioapic(
        &mut self,
        ioapic: Arc<Mutex<Ioapic>>,
        vcpu_count: u8,
    ) -> Result<(), DeviceManagerError> {
        ioapic
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_id(vcpu_count);
        self.mmio_bus.insert(ioapic, IOAPIC_START, IOAPIC_WINDOW)?;
        Ok(())
    }

    /// Attaches ember's I/O APIC (split irqchip), COM1, the i8042 and the power-management
    /// registers. `on_first_byte` runs at the guest's first console byte (the boot timer).
    pub fn attach_platform(
        &mut self,
        vm: &Vm,
        vcpu_count: u8,
        stop: &StopSignal,
        on_first_byte: Option<Box<dyn FnOnce() + Send>>,
    ) -> Result<(), DeviceManagerError> {
        if let Some(ioapic) = vm.ioapic() {
            self.attach_ioapic(ioapic, vcpu_count)?;
        }
        let (serial, serial_input_drained, console_output) = console(vm, COM1_IRQ, on_first_byte)?;
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
