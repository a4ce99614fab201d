//! The PL031 real-time clock arm64 guests read the time of day from (vm-superio's model of
//! its registers, behind ember's bus): 32-bit registers; other access sizes read as zero
//! and are ignored on write.

use vm_superio::Rtc;

use crate::devices::bus::BusDevice;

/// The PL031's register window, its PrimeCell ID registers at the end included.
pub const REGISTERS_LEN: u64 = 0x1000;

#[derive(Default)]
pub struct RtcDevice(Rtc<vm_superio::rtc_pl031::NoEvents>);

impl BusDevice for RtcDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (<&mut [u8; 4]>::try_from(&mut *data), u16::try_from(offset)) {
            (Ok(word), Ok(offset)) => self.0.read(offset, word),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(word), Ok(offset)) = (<&[u8; 4]>::try_from(data), u16::try_from(offset)) {
            self.0.write(offset, word);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read32(rtc: &mut RtcDevice, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        rtc.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn it_reads_as_a_pl031_with_the_host_s_time() {
        let mut rtc = RtcDevice::default();
        // PrimeCell peripheral and cell IDs: 0x00041031 and 0xb105f00d, a byte per word.
        let ids: Vec<u32> = (0..8).map(|i| read32(&mut rtc, 0xfe0 + 4 * i)).collect();
        assert_eq!(ids, vec![0x31, 0x10, 0x04, 0x00, 0x0d, 0xf0, 0x05, 0xb1]);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as u32;
        let data = read32(&mut rtc, 0);
        assert!(data.abs_diff(now) <= 2, "RTCDR {data} vs {now}");
        // A byte access is no PL031 access: zero, and no panic.
        let mut b = [0xffu8; 1];
        rtc.read(0, &mut b);
        assert_eq!(b, [0]);
        rtc.write(0x1000_0000, &[1, 2, 3, 4]);
    }
}
