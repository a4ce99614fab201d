//! What every virtio transport does the same way, whatever its registers look like (virtio
//! 1.2, 3.1 "Device Initialization"): feature negotiation, the device status state machine,
//! queue set-up, activation, reset and stopping single queues. virtio-mmio and virtio-pci
//! decode their registers and call in here.
//!
//! A reset or a stopped queue may have to wait for host I/O in flight, so those run on the
//! vmm thread through the [`WorkQueue`]; the vCPU waits, and the driver sees the effect
//! complete when its write returns.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::memory::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::{VIRTIO_F_VERSION_1, VirtioDevice, VirtioInterrupt, status};
use crate::devices::work_queue::WorkQueue;
use crate::metrics::METRICS;

/// A virtqueue as a snapshot keeps it.
#[derive(Serialize, Deserialize)]
#[serde(remote = "QueueState")]
struct QueueStateDef {
    max_size: u16,
    next_avail: u16,
    next_used: u16,
    event_idx_enabled: bool,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedQueue(#[serde(with = "QueueStateDef")] pub QueueState);

/// What a transport knows of its device, as a snapshot keeps it: the negotiation, the
/// status, the queues (with the running device's positions in them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportSnapshot {
    pub device_type: u32,
    pub queue_select: u32,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub driver_features: u64,
    pub status: u32,
    pub config_generation: u32,
    pub activated: bool,
    pub queues: Vec<SavedQueue>,
    /// The device's rate limiters' tokens (block: one; net: receive, transmit).
    #[serde(default)]
    pub rate_limiters: Vec<crate::rate_limiter::RateLimiterState>,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportStateError {
    #[error("the snapshot holds a virtio device of type {saved} where this VM has type {here}")]
    DeviceType { saved: u32, here: u32 },
    #[error("the snapshot holds {saved} queues for a device with {here}")]
    QueueCount { saved: usize, here: usize },
    #[error("queue {0} of the snapshot is invalid: {1}")]
    Queue(usize, String),
    #[error("the device would not take its saved queues back: {0}")]
    Activate(String),
}

/// A device as its transport drives it.
pub struct TransportState {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    work: Arc<WorkQueue>,
    pub(super) queues: Vec<Queue>,
    pub(super) queue_select: u32,
    pub(super) device_features_select: u32,
    pub(super) driver_features_select: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
    activated: bool,
}

/// What a status write did, for the transport's own registers.
#[derive(Debug, PartialEq, Eq)]
pub enum StatusWrite {
    /// The driver wrote 0: the device is back in its initial state.
    Reset,
    Other,
}

impl TransportState {
    /// `work` runs what must not run on a vCPU thread.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        work: Arc<WorkQueue>,
    ) -> Self {
        let queues = fresh_queues(&device);
        TransportState {
            device,
            mem,
            work,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        }
    }

    pub fn device(&self) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn activated(&self) -> bool {
        self.activated
    }

    pub fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    pub fn queue(&self, index: usize) -> Option<&Queue> {
        self.queues.get(index)
    }

    /// Applies `f` to the selected queue while the driver may still set queues up (after
    /// FEATURES_OK, before DRIVER_OK); at any other time the write is ignored.
    pub fn with_queue_in_setup(&mut self, f: impl FnOnce(&mut Queue)) {
        if !self.queue_setup_allowed() {
            METRICS.vmm.guest_errors.inc();
            return;
        }
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }

    fn queue_setup_allowed(&self) -> bool {
        self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0
    }

    /// The 32 feature bits DeviceFeaturesSel selects.
    pub fn device_features_word(&self) -> u32 {
        let f = self.device().device_features();
        match self.device_features_select {
            0 => f as u32,
            1 => (f >> 32) as u32,
            _ => 0,
        }
    }

    /// The 32 feature bits DriverFeaturesSel selects, as the driver wrote them.
    pub fn driver_features_word(&self) -> u32 {
        match self.driver_features_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        }
    }

    /// The driver accepts features; only before FEATURES_OK, as negotiation is then over.
    pub fn set_driver_features_word(&mut self, value: u32) {
        if self.status & status::FEATURES_OK != 0 {
            return;
        }
        let v = u64::from(value);
        match self.driver_features_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
            _ => {}
        }
    }

    /// Runs `f` on the device, on the vmm thread, and waits for it.
    fn on_vmm_thread(&self, f: impl FnOnce(&mut dyn VirtioDevice) + Send + 'static) {
        let device = self.device.clone();
        self.work.run(move || {
            let mut dev = device.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut *dev);
        });
    }

    /// Returns the transport and device to their initial state; the backend stays. The
    /// device's part (waiting for its I/O) is done before the driver's write returns, so
    /// the status reads 0 only once nothing touches guest memory any more.
    fn reset(&mut self) {
        if self.activated {
            self.on_vmm_thread(|dev| dev.reset());
        }
        self.activated = false;
        self.queues = fresh_queues(&self.device);
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
    }

    /// The driver writes the device status; `interrupt` is what the device will be given
    /// if this write activates it (DRIVER_OK).
    pub fn set_status(&mut self, value: u32, interrupt: Arc<dyn VirtioInterrupt>) -> StatusWrite {
        if value == 0 {
            self.reset();
            return StatusWrite::Reset;
        }
        // A driver only ever adds bits; anything else is a driver bug, which the device
        // answers by asking for a reset.
        if value & self.status != self.status {
            self.status |= status::DEVICE_NEEDS_RESET;
            return StatusWrite::Other;
        }
        let new = value & !self.status;
        if new & status::FEATURES_OK != 0 {
            let offered = self.device().device_features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if !ok {
                // Leaving FEATURES_OK clear tells the driver the features were refused.
                self.status |= value & !status::FEATURES_OK;
                return StatusWrite::Other;
            }
        }
        if new & status::DRIVER_OK != 0 && !self.activate(interrupt) {
            self.status |= (value & !status::DRIVER_OK) | status::DEVICE_NEEDS_RESET;
            return StatusWrite::Other;
        }
        self.status |= value;
        StatusWrite::Other
    }

    fn activate(&mut self, interrupt: Arc<dyn VirtioInterrupt>) -> bool {
        if self.status & status::FEATURES_OK == 0 {
            return false;
        }
        if let Some(i) = self
            .queues
            .iter()
            .position(|q| q.ready() && !q.is_valid(&self.mem))
        {
            METRICS.vmm.guest_errors.inc();
            crate::rate_limited_log!(
                log::Level::Debug,
                "virtio: queue {i} set up with invalid addresses or size"
            );
            return false;
        }
        // The device gets its own copies; the transport keeps its view for the registers.
        let queues: Vec<Queue> = self
            .queues
            .iter()
            .filter_map(|q| Queue::try_from(q.state()).ok())
            .collect();
        let result =
            self.device()
                .activate(self.mem.clone(), self.driver_features, queues, interrupt);
        match result {
            Ok(()) => {
                self.activated = true;
                true
            }
            Err(e) => {
                METRICS.vmm.guest_errors.inc();
                crate::rate_limited_log!(
                    log::Level::Debug,
                    "virtio: cannot activate the device: {e}"
                );
                false
            }
        }
    }

    /// The selected queue's ready flag: 1 during set-up makes the queue usable; 0 at any
    /// time stops it (virtio 1.2, 4.2.2.2 and 4.1.4.3.2: "to stop using the queue the
    /// driver MUST write zero ... and MUST read the value back"), and reads back 0 once the
    /// device no longer uses it.
    pub fn set_queue_ready(&mut self, value: u32) {
        let index = self.queue_select as usize;
        let running = self.activated;
        let Some(q) = self.selected_queue() else {
            return;
        };
        if value == 0 {
            let was_ready = q.ready();
            q.set_ready(false);
            if running && was_ready {
                self.on_vmm_thread(move |dev| dev.stop_queue(index));
            }
        } else if value == 1 && !running {
            q.set_ready(true);
        }
    }

    /// The status as the driver reads it: what it set, plus DEVICE_NEEDS_RESET when the
    /// transport refused a step or the running device gave up on a queue.
    pub fn device_status(&self) -> u32 {
        if self.activated && self.device().needs_reset() {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// ConfigGeneration: changes whenever the driver or the device changed the device's
    /// configuration space.
    pub fn config_generation(&self) -> u32 {
        self.config_generation
            .wrapping_add(self.device().config_generation())
    }

    pub fn read_device_config(&self, offset: u64, data: &mut [u8]) {
        self.device().read_config(offset, data);
    }

    pub fn write_device_config(&mut self, offset: u64, data: &[u8]) {
        self.device().write_config(offset, data);
        self.config_generation = self.config_generation.wrapping_add(1);
    }
}

impl TransportState {
    /// The transport and its device's queue positions, for a snapshot taken while the VM
    /// is paused and the device quiesced.
    pub fn save_state(&self) -> TransportSnapshot {
        let device = self.device();
        let running = if self.activated {
            device.saved_queues()
        } else {
            Vec::new()
        };
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| SavedQueue(running.get(i).copied().unwrap_or_else(|| q.state())))
            .collect();
        TransportSnapshot {
            device_type: device.device_type(),
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            status: self.status,
            config_generation: self.config_generation,
            activated: self.activated,
            queues,
            rate_limiters: device.rate_limiter_states(),
        }
    }

    /// Puts a freshly attached transport in a saved state; a device that was running is
    /// activated again on its saved queues with `interrupt`.
    pub fn restore_state(
        &mut self,
        saved: &TransportSnapshot,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), TransportStateError> {
        let here = self.device().device_type();
        if saved.device_type != here {
            return Err(TransportStateError::DeviceType {
                saved: saved.device_type,
                here,
            });
        }
        if saved.queues.len() != self.queues.len() {
            return Err(TransportStateError::QueueCount {
                saved: saved.queues.len(),
                here: self.queues.len(),
            });
        }
        let mut queues = Vec::with_capacity(saved.queues.len());
        for (i, (q, max)) in saved
            .queues
            .iter()
            .zip(self.device().queue_max_sizes().iter().copied())
            .enumerate()
        {
            if q.0.max_size != max {
                return Err(TransportStateError::Queue(
                    i,
                    format!("its largest size is {} here, {} saved", max, q.0.max_size),
                ));
            }
            let queue =
                Queue::try_from(q.0).map_err(|e| TransportStateError::Queue(i, e.to_string()))?;
            queues.push(queue);
        }
        self.queues = queues;
        self.queue_select = saved.queue_select;
        self.device_features_select = saved.device_features_select;
        self.driver_features_select = saved.driver_features_select;
        self.driver_features = saved.driver_features;
        self.status = saved.status;
        self.config_generation = saved.config_generation;
        self.device().restore_rate_limiters(&saved.rate_limiters);
        if saved.activated {
            let queues: Vec<Queue> = self
                .queues
                .iter()
                .filter_map(|q| Queue::try_from(q.state()).ok())
                .collect();
            self.device()
                .activate(self.mem.clone(), self.driver_features, queues, interrupt)
                .map_err(|e| TransportStateError::Activate(e.to_string()))?;
            self.activated = true;
        }
        Ok(())
    }
}

fn fresh_queues(device: &Arc<Mutex<dyn VirtioDevice>>) -> Vec<Queue> {
    let dev = device.lock().unwrap_or_else(|e| e.into_inner());
    dev.queue_max_sizes()
        .iter()
        // Sizes come from our own device models, which use powers of two up to 256.
        .filter_map(|&max| Queue::new(max).ok())
        .collect()
}
