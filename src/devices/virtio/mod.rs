//! virtio devices and their MMIO transport (virtio 1.2, "Virtio Over MMIO", version 2).

pub mod block;
pub mod mmio;
pub mod net;
pub mod pci;
pub mod rng;
#[cfg(test)]
pub mod test_utils;
pub mod transport;
pub mod vsock;

use std::os::fd::RawFd;
use std::sync::Arc;

use crate::memory::GuestMemoryMmap;
use event_manager::EventSet;
use virtio_queue::Queue;

/// Feature bits shared by every device.
pub use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    use virtio_bindings::virtio_config as c;
    pub const ACKNOWLEDGE: u32 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    pub const DRIVER: u32 = c::VIRTIO_CONFIG_S_DRIVER;
    pub const DRIVER_OK: u32 = c::VIRTIO_CONFIG_S_DRIVER_OK;
    pub const FEATURES_OK: u32 = c::VIRTIO_CONFIG_S_FEATURES_OK;
    pub const DEVICE_NEEDS_RESET: u32 = c::VIRTIO_CONFIG_S_NEEDS_RESET;
    pub const FAILED: u32 = c::VIRTIO_CONFIG_S_FAILED;
}

/// Why a device interrupts its driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtioInterruptType {
    /// The device changed its configuration space.
    Config,
    /// The device put buffers in the used ring of this queue.
    Queue(u16),
}

/// How a device interrupts its driver, whatever the transport: virtio-mmio raises a legacy
/// interrupt line and sets its InterruptStatus register; MSI-X (with virtio-pci) sends the
/// vector of the queue. A device only says why.
pub trait VirtioInterrupt: Send + Sync {
    fn trigger(&self, kind: VirtioInterruptType);
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {0} is not valid (size or ring addresses)")]
    BadQueue(usize),
}

/// What a transport and the event loop need from a device model. Register accesses come
/// from vCPU threads (`read_config`, `write_config`, `activate`); everything that does I/O
/// runs on the vmm thread (`process_queue`, `process_event`, `reset`, `quiesce`).
pub trait VirtioDevice: Send {
    /// The virtio device type (2 for block).
    fn device_type(&self) -> u32;
    /// Largest size of each of the device's queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers.
    fn device_features(&self) -> u64;
    /// Reads from the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to the device-specific configuration space (ignored by read-only configs).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver finished setting up (DRIVER_OK): the device may start using the queues.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError>;
    /// The driver reset the device: wait for work in flight, drop the queues, keep the
    /// backend. Once it returns the device no longer touches guest memory.
    fn reset(&mut self);
    /// True when the device has stopped using its queues until the driver resets it (the
    /// driver broke one): the transport shows DEVICE_NEEDS_RESET in the device status
    /// (virtio 1.2, 2.1.2). A device that enters this state also raises a configuration
    /// change interrupt; `reset` leaves it.
    fn needs_reset(&self) -> bool {
        false
    }
    /// Counts changes the device made to its own configuration space, so the driver can
    /// tell a torn read (virtio 1.2, 4.2.2 ConfigGeneration).
    fn config_generation(&self) -> u32 {
        0
    }
    /// The driver notified queue `index`.
    fn process_queue(&mut self, index: usize);
    /// The driver stopped using queue `index` (QueueReady written 0 after DRIVER_OK): wait
    /// for its requests in flight and forget it. Runs on the vmm thread.
    fn stop_queue(&mut self, index: usize);
    /// The device's own event sources besides its queues (timers, backends), with the
    /// events the loop waits for on each.
    fn event_sources(&self) -> Vec<(RawFd, EventSet)> {
        Vec::new()
    }
    /// One of [`Self::event_sources`] is ready.
    fn process_event(&mut self, _fd: RawFd, _events: EventSet) {}
    /// True (once) after [`Self::event_sources`] changed (a backend was reopened): the event
    /// loop then watches the new set.
    fn take_sources_changed(&mut self) -> bool {
        false
    }
    /// Waits until nothing the device started still writes guest memory (the VM pauses).
    fn quiesce(&mut self) {}
    /// The queues as the running device holds them, for a snapshot taken after
    /// [`Self::quiesce`]: a chain the device took but has not answered is given back
    /// (its position is before it), so the restored device takes it again. Empty while
    /// the device is not active.
    fn saved_queues(&self) -> Vec<virtio_queue::QueueState> {
        Vec::new()
    }
    /// The tokens in the device's rate limiters, for a snapshot (their limits come back
    /// with the device's configuration).
    fn rate_limiter_states(&self) -> Vec<crate::rate_limiter::RateLimiterState> {
        Vec::new()
    }
    /// Puts saved tokens back into the rate limiters, in [`Self::rate_limiter_states`]'s
    /// order.
    fn restore_rate_limiters(&mut self, _saved: &[crate::rate_limiter::RateLimiterState]) {}
    /// The device's own counters and the kind they are reported under (`block`): the
    /// device manager puts them in every metrics flush while the device is attached.
    fn metrics(&self) -> Option<(&'static str, Arc<dyn crate::metrics::Group>)> {
        None
    }
}

/// Copies the bytes of `config` at `offset` into `data`; out-of-range bytes read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, 100, &mut d);
        assert_eq!(d, [0; 4]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
