//! virtio-rng: an entropy source for the guest (virtio 1.2, 5.4), filled from the host's
//! `getrandom`. One request queue; each chain is a set of device-writable buffers the
//! device fills with random bytes. A rate limiter (ops: requests, bandwidth: bytes) keeps a
//! guest from draining the host's entropy pool as fast as it can ask.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use crate::memory::GuestMemoryMmap;
use event_manager::EventSet;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::Bytes;

use super::{
    ActivateError, VIRTIO_F_VERSION_1, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
};
use crate::config::rate_limiter::RateLimiterConfig;
use crate::metrics::{DeviceCounters, EntropyMetrics, Group, METRICS};
use crate::rate_limiter::{RateLimiter, TokenType};

pub use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

pub const QUEUE_SIZE: u16 = 256;
/// Most bytes one request gets: Linux asks for at most a page at a time; a chain asking
/// for more gets this much (the driver reads the used length).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("entropy device: cannot create the rate limiter's timer: {0}")]
    RateLimiter(std::io::Error),
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
}

pub struct Rng {
    active: Option<Active>,
    limiter: RateLimiter,
    /// Random bytes for one request, reused.
    buffer: Vec<u8>,
    /// The descriptors of the request being answered, reused.
    descs: Vec<virtio_queue::desc::split::Descriptor>,
    /// The queue's rings were found inconsistent: not touched until the driver resets.
    broken: bool,
    metrics: DeviceCounters<EntropyMetrics>,
}

impl Rng {
    pub fn new(rate_limiter: Option<&RateLimiterConfig>) -> Result<Self, RngError> {
        let limiter = match rate_limiter {
            Some(c) => RateLimiter::new(c),
            None => RateLimiter::unlimited(),
        }
        .map_err(RngError::RateLimiter)?;
        Ok(Rng {
            active: None,
            limiter,
            buffer: Vec::with_capacity(MAX_REQUEST_BYTES),
            descs: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            broken: false,
            metrics: DeviceCounters::new(&METRICS.entropy),
        })
    }

    /// The device's counters alone (tests read them).
    pub fn counters(&self) -> &EntropyMetrics {
        self.metrics.own()
    }

    /// Answers every request the guest queued, as far as the rate limiter allows.
    fn process_requests(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if self.broken {
            return;
        }
        let mut returned = false;
        loop {
            let chain = match active.queue.iter(&active.mem).map(|mut i| i.next()) {
                Ok(Some(chain)) => chain,
                Ok(None) => match active.queue.enable_notification(&active.mem) {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        queue_broken(&mut self.broken, &e.to_string());
                        break;
                    }
                },
                Err(e) => {
                    queue_broken(&mut self.broken, &e.to_string());
                    break;
                }
            };
            let head = chain.head_index();
            self.descs.clear();
            self.descs.extend(chain);
            let descs = &self.descs;
            // Only device-writable buffers; a chain with another kind is not a request.
            let wanted = if descs.iter().all(|d| d.is_write_only()) {
                descs
                    .iter()
                    .map(|d| d.len() as usize)
                    .sum::<usize>()
                    .min(MAX_REQUEST_BYTES)
            } else {
                self.metrics.inc(|m| &m.invalid_requests);
                0
            };
            if wanted > 0 {
                if !self.limiter.consume(1, TokenType::Ops) {
                    active.queue.go_to_previous_position();
                    self.metrics.inc(|m| &m.rate_limiter_throttled);
                    break;
                }
                if !self.limiter.consume(wanted as u64, TokenType::Bytes) {
                    self.limiter.manual_replenish(1, TokenType::Ops);
                    active.queue.go_to_previous_position();
                    self.metrics.inc(|m| &m.rate_limiter_throttled);
                    break;
                }
            }
            let written = if wanted == 0 {
                0
            } else {
                self.buffer.resize(wanted, 0);
                match crate::host_random::fill(&mut self.buffer) {
                    Ok(()) => write_buffers(&active.mem, descs, &self.buffer),
                    Err(e) => {
                        self.metrics.inc(|m| &m.host_rng_fails);
                        crate::rate_limited_log!(
                            log::Level::Warn,
                            "entropy device: the host's getrandom failed: {e}"
                        );
                        0
                    }
                }
            };
            if written > 0 {
                self.metrics.inc(|m| &m.entropy_event_count);
                self.metrics.add(|m| &m.entropy_bytes, written as u64);
            }
            // At most MAX_REQUEST_BYTES, far below 4 GiB.
            if let Err(e) = active.queue.add_used(&active.mem, head, written as u32) {
                queue_broken(&mut self.broken, &e.to_string());
                break;
            }
            returned = true;
        }
        if self.broken {
            active.interrupt.trigger(VirtioInterruptType::Config);
        }
        if returned && active.queue.needs_notification(&active.mem).unwrap_or(true) {
            active.interrupt.trigger(VirtioInterruptType::Queue(0));
        }
    }
}

/// The queue's rings are inconsistent: stop using it until the driver resets the device.
fn queue_broken(broken: &mut bool, what: &str) {
    if !*broken {
        log::warn!(
            "entropy device: the guest's request queue is broken ({what}); the device stops \
             until the driver resets it"
        );
    }
    *broken = true;
}

/// Writes `bytes` across the chain's buffers in order; returns how many were written (a
/// buffer outside guest memory ends the request there).
fn write_buffers(
    mem: &GuestMemoryMmap,
    descs: &[virtio_queue::desc::split::Descriptor],
    mut bytes: &[u8],
) -> usize {
    let mut written = 0;
    for d in descs {
        if bytes.is_empty() {
            break;
        }
        let n = (d.len() as usize).min(bytes.len());
        if mem.write_slice(&bytes[..n], d.addr()).is_err() {
            break;
        }
        written += n;
        bytes = &bytes[n..];
    }
    written
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // The device has no configuration space (5.4.4).
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let Some(mut queue) = queues.into_iter().next() else {
            return Err(ActivateError::BadQueue(0));
        };
        if !queue.ready() {
            return Err(ActivateError::BadQueue(0));
        }
        queue.set_event_idx(features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        self.broken = false;
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.broken = false;
    }

    fn needs_reset(&self) -> bool {
        self.broken
    }

    fn process_queue(&mut self, _index: usize) {
        self.process_requests();
    }

    fn stop_queue(&mut self, _index: usize) {
        // Requests are answered synchronously: nothing is in flight.
        self.active = None;
    }

    fn event_sources(&self) -> Vec<(RawFd, EventSet)> {
        vec![(self.limiter.as_raw_fd(), EventSet::IN)]
    }

    fn process_event(&mut self, fd: RawFd, _events: EventSet) {
        if fd == self.limiter.as_raw_fd() {
            if let Err(e) = self.limiter.event_handler() {
                log::debug!("entropy device: {e}");
            }
            self.process_requests();
        }
    }

    fn saved_queues(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .as_ref()
            .map(|a| vec![a.queue.state()])
            .unwrap_or_default()
    }

    fn rate_limiter_states(&self) -> Vec<crate::rate_limiter::RateLimiterState> {
        vec![self.limiter.save_state()]
    }

    fn restore_rate_limiters(&mut self, saved: &[crate::rate_limiter::RateLimiterState]) {
        if let Some(s) = saved.first() {
            self.limiter.restore_state(s);
        }
    }

    fn metrics(&self) -> Option<(&'static str, Arc<dyn Group>)> {
        Some(("entropy", self.metrics.group()))
    }
}

#[cfg(test)]
mod tests;
