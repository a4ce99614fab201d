//! Bounded waiting without a timer or interrupts: polls end when the TSC has advanced by a
//! given number of ticks, so a device that never answers costs seconds, not the whole run.
//!
//! The TSC rate is unknown (about 1-5 GHz), so the bounds are generous tick counts rather
//! than times. A second bound on the number of rounds ends the wait even if the TSC does not
//! advance, which no sane VMM does, but the probe must not hang on a broken one.

use crate::cpu;

/// Rounds after which a wait ends whatever the TSC says: seconds of `pause` on real hardware.
const MAX_ROUNDS: u64 = 1 << 28;

pub struct Deadline {
    start: u64,
    ticks: u64,
    rounds: u64,
}

impl Deadline {
    pub fn after(ticks: u64) -> Self {
        Deadline {
            start: cpu::rdtsc(),
            ticks,
            rounds: 0,
        }
    }

    /// Call once per polling round: true once the wait is over. Includes a `pause`, which
    /// also lets the host schedule the device's thread (pause-loop exiting) on a busy host.
    pub fn expired(&mut self) -> bool {
        core::hint::spin_loop();
        self.rounds += 1;
        self.rounds > MAX_ROUNDS || cpu::rdtsc().wrapping_sub(self.start) > self.ticks
    }
}

/// Spins for about `ticks` TSC ticks: spaces out register polls, each of which is a VM exit.
pub fn delay(ticks: u64) {
    let mut deadline = Deadline::after(ticks);
    while !deadline.expired() {}
}
