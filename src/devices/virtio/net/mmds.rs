//! An interface's door to the metadata service: frames the guest sends to the service's
//! address are answered by ember's own small network stack (`crate::mmds::stack`) instead
//! of going to the TAP, and its replies are received by the guest like any other frame.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_net::{VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE};
use vmm_sys_util::timerfd::TimerFd;

use super::header::NetHeader;
use super::tx::TxFrame;
use crate::mmds::Mmds;
use crate::mmds::stack::{MMDS_MAC, MmdsStack};

/// Enough of a frame to tell whether it is for the service: Ethernet, then an ARP packet
/// or an IPv4 header.
const CLASSIFY_LEN: usize = 64;
/// The longest frame the service takes; its requests are a few hundred bytes.
const MAX_REQUEST_FRAME: usize = 16 * 1024;

pub struct MmdsEndpoint {
    shared: Arc<Mutex<Mmds>>,
    stack: MmdsStack,
    /// Fires when the stack has a retransmission due.
    timer: TimerFd,
    frame: Vec<u8>,
}

impl MmdsEndpoint {
    pub fn new(shared: Arc<Mutex<Mmds>>) -> std::io::Result<Self> {
        let ip = shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .config()
            .ipv4_address;
        Ok(MmdsEndpoint {
            shared,
            stack: MmdsStack::new(ip, MMDS_MAC),
            timer: TimerFd::new()?,
            frame: Vec::with_capacity(MAX_REQUEST_FRAME),
        })
    }

    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// Takes `frame` if it is for the service (true), answering it later through
    /// [`Self::write_reply`]; false leaves it to be sent to the TAP.
    pub fn intercept(&mut self, frame: &TxFrame) -> bool {
        frame.copy_frame(&mut self.frame, CLASSIFY_LEN);
        if !self.stack.is_for_mmds(&self.frame) {
            return false;
        }
        let header = NetHeader::from_bytes(&frame.header);
        if header.gso_type != VIRTIO_NET_HDR_GSO_NONE as u8 || frame.len > MAX_REQUEST_FRAME {
            // Requests to the service are small; a segmented one is nothing it serves.
            return true;
        }
        frame.copy_frame(&mut self.frame, MAX_REQUEST_FRAME);
        if header.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 != 0 {
            complete_checksum(&mut self.frame, header.csum_start, header.csum_offset);
        }
        let now = Instant::now();
        {
            let mut mmds = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            self.stack.receive_frame(&self.frame, &mut mmds, now);
        }
        self.arm_timer();
        true
    }

    /// Whether a reply is ready (or a retransmission is due).
    pub fn has_reply(&self) -> bool {
        self.stack.pending_frame() || self.stack.next_timer().is_some_and(|t| t <= Instant::now())
    }

    /// Writes the next reply (an Ethernet frame) into `buf`; its length, or None.
    pub fn write_reply(&mut self, buf: &mut [u8]) -> Option<usize> {
        let n = self.stack.write_next_frame(buf, Instant::now());
        self.arm_timer();
        n
    }

    /// The timer fired: consume the expiry (the caller then looks for replies).
    pub fn timer_fired(&mut self) {
        let _ = self.timer.wait();
        self.arm_timer();
    }

    fn arm_timer(&mut self) {
        let due = self
            .stack
            .next_timer()
            .map(|t| t.saturating_duration_since(Instant::now()));
        let result = match due {
            // A zero duration disarms a timerfd; a due timer fires at once instead.
            Some(d) => self.timer.reset(d.max(Duration::from_micros(1)), None),
            None => self.timer.reset(Duration::ZERO, None),
        };
        if let Err(e) = result {
            crate::rate_limited_log!(
                log::Level::Warn,
                "metadata service: cannot arm its retransmission timer: {e}"
            );
        }
    }
}

/// Completes a checksum the driver left to the device (VIRTIO_NET_HDR_F_NEEDS_CSUM): the
/// one's complement sum of the frame from `start`, written at `start + offset`, which holds
/// the pseudo-header's sum meanwhile. Out-of-range positions leave the frame as it is (the
/// header was checked against the frame's length when it was gathered).
fn complete_checksum(frame: &mut [u8], start: u16, offset: u16) {
    let (start, at) = (usize::from(start), usize::from(start) + usize::from(offset));
    if at + 2 > frame.len() || start > frame.len() {
        return;
    }
    let mut sum: u32 = 0;
    let mut words = frame[start..].chunks_exact(2);
    for w in &mut words {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u32::from(u16::from_be_bytes([*last, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    frame[at..at + 2].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one's complement sum of `bytes`, folded.
    fn sum(bytes: &[u8]) -> u16 {
        let mut s: u32 = bytes
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
            .sum();
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    #[test]
    fn a_completed_checksum_sums_to_all_ones() {
        // 10 bytes before the checksummed part; the checksum field 6 bytes into it holds a
        // partial sum, as a driver leaves it.
        let mut frame: Vec<u8> = (0u8..41).map(|b| b.wrapping_mul(37)).collect();
        frame[16..18].copy_from_slice(&0x1234u16.to_be_bytes());
        complete_checksum(&mut frame, 10, 6);
        // With the pseudo-header's sum added back, as a receiver verifies, all ones.
        let mut verify = u32::from(sum(&frame[10..])) + 0x1234;
        while verify > 0xffff {
            verify = (verify & 0xffff) + (verify >> 16);
        }
        assert_eq!(verify, 0xffff);
        // Positions outside the frame change nothing.
        let before = frame.clone();
        complete_checksum(&mut frame, 40, 6);
        complete_checksum(&mut frame, 200, 0);
        assert_eq!(frame, before);
    }
}
