//! The hardware-reduced ACPI power-management registers the FADT points at: a guest's
//! power-off (sleep state S5) and its ACPI reset both end the VM cleanly. Without them a
//! Linux `poweroff` halts every CPU and the VM would sit there forever.

use crate::devices::bus::BusDevice;
use crate::stop::StopSignal;

/// Register offsets from the device's base port.
pub const SLEEP_CONTROL: u64 = 0;
pub const SLEEP_STATUS: u64 = 1;
pub const RESET: u64 = 2;
pub const PORT_LEN: u64 = 3;

/// The value the guest writes to the reset register (FADT `RESET_VALUE`).
pub const RESET_VALUE: u8 = 0x1;

/// Sleep control register fields (ACPI 6.5, section 4.8.3.7).
const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111;

pub struct PowerManagement {
    /// The `SLP_TYP` the DSDT gives for S5.
    s5_sleep_type: u8,
    stop: StopSignal,
}

impl PowerManagement {
    pub fn new(s5_sleep_type: u8, stop: StopSignal) -> Self {
        PowerManagement {
            s5_sleep_type,
            stop,
        }
    }
}

impl BusDevice for PowerManagement {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // No wake status to report, and the other registers read as zero.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            SLEEP_CONTROL if value & SLP_EN != 0 => {
                let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if sleep_type == self.s5_sleep_type {
                    log::info!("the guest powered off (ACPI S5)");
                    self.stop.guest_reset();
                } else {
                    // The DSDT offers no other sleep state, so a guest that asks for one is
                    // confused; it keeps running.
                    crate::rate_limited_log!(
                        log::Level::Debug,
                        "ignoring a request for ACPI sleep type {sleep_type}"
                    );
                }
            }
            RESET if value == RESET_VALUE => {
                log::info!("the guest reset through the ACPI reset register");
                self.stop.guest_reset();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (PowerManagement, StopSignal) {
        let stop = StopSignal::new().unwrap();
        (PowerManagement::new(5, stop.clone()), stop)
    }

    #[test]
    fn s5_with_sleep_enable_ends_the_vm() {
        let (mut pm, stop) = device();
        // SLP_TYP without SLP_EN is only a preparation.
        pm.write(SLEEP_CONTROL, &[5 << 2]);
        assert!(!stop.is_stopping());
        pm.write(SLEEP_CONTROL, &[(5 << 2) | SLP_EN]);
        assert!(stop.is_stopping() && stop.was_guest_reset());
    }

    #[test]
    fn other_sleep_states_are_ignored() {
        let (mut pm, stop) = device();
        pm.write(SLEEP_CONTROL, &[(3 << 2) | SLP_EN]);
        assert!(!stop.is_stopping());
    }

    #[test]
    fn reset_register_needs_the_reset_value() {
        let (mut pm, stop) = device();
        pm.write(RESET, &[0x55]);
        assert!(!stop.is_stopping());
        pm.write(RESET, &[RESET_VALUE]);
        assert!(stop.is_stopping() && stop.was_guest_reset());
    }

    #[test]
    fn status_reads_zero() {
        let (mut pm, _) = device();
        let mut b = [0xffu8; 1];
        pm.read(SLEEP_STATUS, &mut b);
        assert_eq!(b, [0]);
    }
}
