//! Hostile guests on request, for the tests of how ember withstands them (tests/hostile_guest.rs):
//! a console flood (`probe.flood=serial`) and a virtio driver that breaks its queue
//! (`probe.hostile=virtq`). Both run after `PROBE DONE`.

use core::ptr::write_volatile;
use core::sync::atomic::{Ordering, fence};

use crate::line::{Detail, Line};
use crate::serial;
use crate::timeout::{self, Deadline};
use crate::transport::Transport;
use crate::virtio_blk::{self, Blk, Request, S_OK};
use crate::virtio_mmio::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, Mmio};
use crate::virtq::{MAX_SIZE, Virtq};

/// Writes numbered lines to the serial port forever, as fast as the UART takes them.
pub fn flood_serial() -> ! {
    let mut n: u64 = 0;
    loop {
        let mut line = Line::<64>::new();
        line.str(b"PROBE FLOOD ")
            .dec(n)
            .str(b" ..................................\n");
        serial::write(line.as_bytes());
        n = n.wrapping_add(1);
    }
}

/// Notifications sent for the broken queue: each one would have the device look at it again.
const NOTIFICATIONS: u32 = 20_000;
/// How long the device may take to report DEVICE_NEEDS_RESET after the notifications: about
/// 0.4-2 s (it handles them on another host thread).
const NEEDS_RESET_TICKS: u64 = 1 << 31;
const POLL_GAP_TICKS: u64 = 1 << 17;

// virtio-mmio registers and bits (virtio 1.2, 2.1 and 4.2.2) the block driver keeps to itself.
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_CONFIG: u32 = 1 << 1;
const DEVICE_NEEDS_RESET: u32 = 0x40;
const F_VERSION_1: u64 = 1 << 32;

/// On block device 0 at `base`: sets queue 0 up, publishes an available index the queue
/// cannot hold, notifies NOTIFICATIONS times, and reports whether the device asked for a
/// reset and raised the configuration change interrupt that goes with it; then resets and
/// initialises the device with the regular driver and reports whether a read of sector 0
/// works: `PROBE hostile needs_reset=<0|1> config_irq=<0|1> notified=<n>`, then
/// `PROBE hostile recovered=<0|1>` (with the reason when 0).
pub fn virtq(base: u64) {
    let mmio = Mmio::new(base);
    let Some(mut queue) = set_up(mmio) else {
        serial::write(b"PROBE hostile FAIL set-up refused: status=");
        let mut line = Line::<24>::new();
        line.hex(u64::from(mmio.status())).str(b"\n");
        serial::write(line.as_bytes());
        return;
    };
    queue.publish_bogus_idx();
    for _ in 0..NOTIFICATIONS {
        mmio.notify(0);
    }
    let mut deadline = Deadline::after(NEEDS_RESET_TICKS);
    let mut status = mmio.status();
    while status & DEVICE_NEEDS_RESET == 0 && !deadline.expired() {
        timeout::delay(POLL_GAP_TICKS);
        status = mmio.status();
    }
    let config_irq = mmio.read(INTERRUPT_STATUS) & INTERRUPT_CONFIG != 0;
    let mut line = Line::<96>::new();
    line.str(b"PROBE hostile needs_reset=")
        .dec(u64::from(status & DEVICE_NEEDS_RESET != 0))
        .str(b" config_irq=")
        .dec(u64::from(config_irq))
        .str(b" notified=")
        .dec(u64::from(NOTIFICATIONS))
        .str(b"\n");
    serial::write(line.as_bytes());

    // `init` resets the device first (virtio 2.4), then sets it up on fresh rings.
    let mut d = Detail::new();
    let recovered = match Blk::init(Transport::Mmio(Mmio::new(base)), 0, &mut d) {
        None => false,
        Some(mut blk) => {
            virtio_blk::fill_data(0, 16, 0);
            match blk.request(Request::read(0, 0, virtio_blk::SECTOR_SIZE)) {
                // The test's disk image starts with EMBER-DISK-0.
                Ok(S_OK) => {
                    let ok = (0..12).all(|i| virtio_blk::data(i) == b"EMBER-DISK-0"[i]);
                    if !ok {
                        d.str(b"sector 0 not as written");
                    }
                    ok
                }
                Ok(status) => {
                    d.str(b"read status=");
                    virtio_blk::describe_status(&mut d, status);
                    false
                }
                Err(error) => {
                    d.str(b"read: ");
                    error.describe(&mut d);
                    false
                }
            }
        }
    };
    serial::write(b"PROBE hostile recovered=");
    serial::write(if recovered { b"1" } else { b"0" });
    if !d.is_empty() {
        serial::write(b" ");
        serial::write(d.as_bytes());
    }
    serial::write(b"\n");
}

/// The device initialisation of virtio 3.1.1, just far enough for a running queue 0.
fn set_up(mmio: Mmio) -> Option<BadQueue> {
    if !mmio.reset() {
        return None;
    }
    let mut status = ACKNOWLEDGE | DRIVER;
    mmio.set_status(status);
    mmio.set_driver_features(mmio.device_features() & F_VERSION_1);
    status |= FEATURES_OK;
    mmio.set_status(status);
    let (ready, queue_max) = mmio.select_queue(0);
    if ready != 0 || queue_max < u32::from(MAX_SIZE) {
        return None;
    }
    // Ring set 0, which `Blk::init` takes again (and zeroes) for the recovery.
    let queue = Virtq::new(0, MAX_SIZE);
    let (desc, driver, device) = queue.areas();
    mmio.activate_queue(MAX_SIZE, desc, driver, device);
    status |= DRIVER_OK;
    mmio.set_status(status);
    (mmio.status() == status).then_some(BadQueue { driver })
}

/// A running queue whose driver area the probe is about to break.
struct BadQueue {
    driver: u64,
}

impl BadQueue {
    /// Publishes an available index MAX_SIZE + 7 entries ahead with no chain behind it, as a
    /// hostile or broken driver might: more than the queue holds, so the device must refuse
    /// the ring rather than follow it.
    fn publish_bogus_idx(&mut self) {
        // The available index follows the 16-bit flags (virtio 1.2, 2.7.6).
        let idx = (self.driver + 2) as *mut u16;
        // SAFETY: the driver area is the probe's own memory, 2-byte aligned; the device only
        // reads it.
        unsafe { write_volatile(idx, MAX_SIZE + 7) };
        // The index must be visible before the notifications that follow.
        fence(Ordering::SeqCst);
    }
}
