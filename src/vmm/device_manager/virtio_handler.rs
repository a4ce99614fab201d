//! The event-loop side of any virtio device: its queue notifications (ioeventfds KVM
//! signals on the guest's QueueNotify writes) and the device's own event sources, each
//! handed to the device on the vmm thread.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use crate::devices::virtio::VirtioDevice;
use vmm_sys_util::eventfd::EventFd;

pub struct VirtioHandler {
    /// The device's id, for log lines.
    id: String,
    device: Arc<Mutex<dyn VirtioDevice>>,
    /// Queue i's notification eventfd is `queue_evts[i]` (KVM signals it through an
    /// ioeventfd registration the transport's owner keeps).
    queue_evts: Vec<EventFd>,
    /// The device's own sources as registered with the loop.
    sources: Vec<(RawFd, EventSet)>,
}

impl VirtioHandler {
    pub fn new(id: String, device: Arc<Mutex<dyn VirtioDevice>>, queue_evts: Vec<EventFd>) -> Self {
        VirtioHandler {
            id,
            device,
            queue_evts,
            sources: Vec::new(),
        }
    }

    fn device(&self) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn queue_of(&self, fd: RawFd) -> Option<usize> {
        self.queue_evts.iter().position(|e| e.as_raw_fd() == fd)
    }
}

impl MutEventSubscriber for VirtioHandler {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let changed = {
            let mut device = self.device();
            match self.queue_of(fd) {
                Some(index) => {
                    // A read error only means the counter was already drained.
                    let _ = self.queue_evts[index].read();
                    device.process_queue(index);
                }
                None => device.process_event(fd, events.event_set()),
            }
            device.take_sources_changed()
        };
        if changed {
            self.watch_sources(ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for evt in &self.queue_evts {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                log::error!("{}: cannot watch a queue notification: {e}", self.id);
            }
        }
        self.watch_sources(ops);
    }
}

impl VirtioHandler {
    /// Watches the device's current event sources instead of the ones watched so far.
    fn watch_sources(&mut self, ops: &mut EventOps) {
        for (fd, set) in std::mem::take(&mut self.sources) {
            // Devices keep a source's descriptor open for as long as the device exists,
            // so the loop's table never holds a number that now means another file.
            if let Err(e) = ops.remove(Events::new_raw(fd, set)) {
                log::debug!("{}: cannot stop watching a source: {e}", self.id);
            }
        }
        let sources = self.device().event_sources();
        for &(fd, set) in &sources {
            if let Err(e) = ops.add(Events::new_raw(fd, set)) {
                log::error!("{}: cannot watch one of its event sources: {e}", self.id);
            }
        }
        self.sources = sources;
    }
}
