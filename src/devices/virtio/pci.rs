//! The virtio-pci transport, modern only (virtio 1.2, 4.1): a PCI function whose BAR 0
//! holds the common configuration structure, the ISR status, the device-specific
//! configuration, the queue notification addresses and the MSI-X table and PBA, each
//! announced by a vendor-specific capability; interrupts are MSI-X, one vector per queue
//! plus one for configuration changes.
//!
//! Queue notifications normally bypass the transport: an ioeventfd at each queue's notify
//! address, registered wherever the guest places BAR 0 and moved when it moves it. A write
//! that does reach the transport is forwarded to the queue's eventfd.

use std::sync::atomic::{AtomicU8, AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::memory::GuestMemoryMmap;
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use super::transport::{StatusWrite, TransportState};
use super::{VirtioDevice, VirtioInterrupt, VirtioInterruptType};
use crate::devices::pci::config_space::{
    BarKind, BarRegion, CLASS_MASS_STORAGE, CLASS_NETWORK, CLASS_OTHER, ConfigSpace,
    ConfigSpaceError, Identity, SUBCLASS_ETHERNET, SUBCLASS_OTHER_STORAGE,
};
use crate::devices::pci::msix::{self, Msix, MsixLayout, VectorSink};
use crate::devices::pci::root::PciDevice;
use crate::devices::work_queue::WorkQueue;
use crate::metrics::METRICS;
use crate::vstate::vm::{IoEventFd, VmHandle};

/// Red Hat's vendor ID, which virtio devices use (virtio 1.2, 4.1.2).
pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
/// Modern device IDs are 0x1040 plus the virtio device type.
const DEVICE_ID_BASE: u16 = 0x1040;
const SUBSYSTEM_ID: u16 = 0x0040;

/// BAR 0's layout.
pub const BAR_SIZE: u64 = 0x8000;
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x40;
const ISR: u64 = 0x1000;
const ISR_LEN: u64 = 4;
const DEVICE_CONFIG: u64 = 0x2000;
const DEVICE_CONFIG_LEN: u64 = 0x1000;
const NOTIFY: u64 = 0x3000;
/// Queue `q` is notified at NOTIFY + q * NOTIFY_MULTIPLIER.
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x5000;

/// Vendor-specific capability and its structure types (virtio 1.2, 4.1.4).
const CAP_VENDOR: u8 = 0x09;
const CAP_COMMON_CFG: u8 = 1;
const CAP_NOTIFY_CFG: u8 = 2;
const CAP_ISR_CFG: u8 = 3;
const CAP_DEVICE_CFG: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
/// In the PCI configuration access capability: bar, offset, length and the data window.
const PCI_CFG_BAR: usize = 4;
const PCI_CFG_OFFSET: usize = 8;
const PCI_CFG_LENGTH: usize = 12;
const PCI_CFG_DATA: usize = 16;

/// "No vector" for config_msix_vector and queue_msix_vector.
pub const NO_VECTOR: u16 = 0xffff;

const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// Which MSI-X vector each of the device's reasons to interrupt uses, and the ISR status.
pub struct PciInterrupt {
    msix: Arc<Mutex<Msix>>,
    isr: AtomicU8,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
}

impl PciInterrupt {
    fn msix(&self) -> MutexGuard<'_, Msix> {
        self.msix.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reset(&self) {
        self.isr.store(0, Ordering::SeqCst);
        self.config_vector.store(NO_VECTOR, Ordering::SeqCst);
        for v in &self.queue_vectors {
            v.store(NO_VECTOR, Ordering::SeqCst);
        }
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn trigger(&self, kind: VirtioInterruptType) {
        let mut msix = self.msix();
        // 4.1.4.5.1: the configuration bit is always set; the queue bit only without MSI-X.
        let vector = match kind {
            VirtioInterruptType::Config => {
                self.isr.fetch_or(ISR_CONFIG, Ordering::SeqCst);
                self.config_vector.load(Ordering::SeqCst)
            }
            VirtioInterruptType::Queue(q) => {
                if !msix.enabled() {
                    self.isr.fetch_or(ISR_QUEUE, Ordering::SeqCst);
                }
                self.queue_vectors
                    .get(usize::from(q))
                    .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst))
            }
        };
        if vector != NO_VECTOR {
            msix.trigger(vector);
        }
    }
}

/// Where the queue notifications are registered with KVM, for a function in a VM.
pub struct Notifications {
    pub vm: VmHandle,
    /// What logs call the device.
    pub label: String,
    registered: Vec<IoEventFd>,
    /// BAR 0's address while the registrations are there.
    at: Option<u64>,
}

impl Notifications {
    pub fn new(vm: VmHandle, label: String) -> Self {
        Notifications {
            vm,
            label,
            registered: Vec::new(),
            at: None,
        }
    }
}

/// A virtio device as a PCI function.
pub struct VirtioPciFunction {
    config: ConfigSpace,
    state: TransportState,
    interrupt: Arc<PciInterrupt>,
    msix_cap: usize,
    pci_cfg_cap: usize,
    queue_evts: Vec<EventFd>,
    notifications: Option<Notifications>,
}

#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("virtio-pci configuration space: {0}")]
    Config(#[from] ConfigSpaceError),
    #[error("virtio-pci needs one MSI-X vector per queue plus one, got {got} for {queues} queues")]
    Vectors { got: usize, queues: usize },
}

impl VirtioPciFunction {
    /// `bar_addr` is where BAR 0 starts (64-bit, `BAR_SIZE` aligned); `vectors` deliver
    /// MSI-X vectors, one per queue plus one; `queue_evts` are the eventfds the device's
    /// handler waits on; `notifications`, when given, get KVM ioeventfds on them.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        work: Arc<WorkQueue>,
        bar_addr: u64,
        vectors: Vec<Box<dyn VectorSink>>,
        queue_evts: Vec<EventFd>,
        notifications: Option<Notifications>,
    ) -> Result<Self, VirtioPciError> {
        let (device_type, queues) = {
            let d = device.lock().unwrap_or_else(|e| e.into_inner());
            (d.device_type(), d.queue_max_sizes().len())
        };
        if vectors.len() != queues + 1 || vectors.len() > usize::from(msix::MAX_VECTORS) {
            return Err(VirtioPciError::Vectors {
                got: vectors.len(),
                queues,
            });
        }
        let (class, subclass) = class_of(device_type);
        let mut config = ConfigSpace::new(Identity {
            vendor_id: VIRTIO_PCI_VENDOR,
            device_id: DEVICE_ID_BASE + device_type as u16,
            // Modern-only devices have a revision of at least 1 (4.1.2.1).
            revision_id: 1,
            class,
            subclass,
            prog_if: 0,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR,
            subsystem_id: SUBSYSTEM_ID,
        });
        config.add_bar(
            0,
            BarKind::Memory64 {
                prefetchable: false,
            },
            BAR_SIZE,
            bar_addr,
        )?;
        let structure = |kind: u8, offset: u64, len: u64| {
            let mut cap = vec![CAP_VENDOR, 0, 16, kind, 0, 0, 0, 0];
            cap.extend_from_slice(&(offset as u32).to_le_bytes());
            cap.extend_from_slice(&(len as u32).to_le_bytes());
            cap
        };
        config.add_capability(&structure(CAP_COMMON_CFG, COMMON, COMMON_LEN), &[])?;
        let mut notify = structure(
            CAP_NOTIFY_CFG,
            NOTIFY,
            queues as u64 * u64::from(NOTIFY_MULTIPLIER),
        );
        notify[2] = 20;
        notify.extend_from_slice(&NOTIFY_MULTIPLIER.to_le_bytes());
        config.add_capability(&notify, &[])?;
        config.add_capability(&structure(CAP_ISR_CFG, ISR, ISR_LEN), &[])?;
        config.add_capability(
            &structure(CAP_DEVICE_CFG, DEVICE_CONFIG, DEVICE_CONFIG_LEN),
            &[],
        )?;
        // The access window through configuration space: bar, offset, length and data
        // are the driver's to write.
        let mut pci_cfg = structure(CAP_PCI_CFG, 0, 0);
        pci_cfg[2] = 20;
        pci_cfg.extend_from_slice(&[0; 4]);
        let mut writable = vec![0u8; 20];
        writable[PCI_CFG_BAR] = 0xff;
        writable[PCI_CFG_OFFSET..].fill(0xff);
        let pci_cfg_cap = config.add_capability(&pci_cfg, &writable)?;
        let msix = Msix::new(vectors);
        let (body, writable) = msix.capability(MsixLayout {
            table_bar: 0,
            table_offset: MSIX_TABLE as u32,
            pba_bar: 0,
            pba_offset: MSIX_PBA as u32,
        });
        let msix_cap = config.add_capability(&body, &writable)?;
        let interrupt = Arc::new(PciInterrupt {
            msix: Arc::new(Mutex::new(msix)),
            isr: AtomicU8::new(0),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
        });
        Ok(VirtioPciFunction {
            config,
            state: TransportState::new(device, mem, work),
            interrupt,
            msix_cap,
            pci_cfg_cap,
            queue_evts,
            notifications,
        })
    }

    fn vectors(&self) -> u16 {
        self.interrupt.msix().vectors()
    }

    /// A vector the driver asks for: kept if the table has it, else NO_VECTOR, which the
    /// driver reads back as the refusal (4.1.4.3.2).
    fn accept_vector(&self, vector: u16) -> u16 {
        if vector < self.vectors() {
            vector
        } else {
            NO_VECTOR
        }
    }

    fn selected_queue_vector(&self) -> Option<&AtomicU16> {
        self.interrupt
            .queue_vectors
            .get(self.state.queue_select as usize)
    }

    /// The common configuration structure (4.1.4.3), field by field; each field is read
    /// whole, and 64-bit fields also as two 32-bit halves.
    fn read_common(&self, offset: u64, len: usize) -> Option<u64> {
        let s = &self.state;
        let queue = s.queue(s.queue_select as usize);
        let v = match (offset, len) {
            (0x00, 4) => u64::from(s.device_features_select),
            (0x04, 4) => u64::from(s.device_features_word()),
            (0x08, 4) => u64::from(s.driver_features_select),
            (0x0c, 4) => u64::from(s.driver_features_word()),
            (0x10, 2) => u64::from(self.interrupt.config_vector.load(Ordering::SeqCst)),
            (0x12, 2) => self.interrupt.queue_vectors.len() as u64,
            (0x14, 1) => u64::from(s.device_status() as u8),
            (0x15, 1) => u64::from(s.config_generation() as u8),
            (0x16, 2) => u64::from(s.queue_select),
            (0x18, 2) => queue.map_or(0, |q| u64::from(q.size())),
            (0x1a, 2) => self
                .selected_queue_vector()
                .map_or(u64::from(NO_VECTOR), |v| {
                    u64::from(v.load(Ordering::SeqCst))
                }),
            (0x1c, 2) => queue.map_or(0, |q| u64::from(q.ready())),
            // queue_notify_off: queue q is notified at q * the multiplier.
            (0x1e, 2) => queue.map_or(0, |_| u64::from(s.queue_select)),
            (0x20..=0x37, 4 | 8) => {
                let q = queue?;
                let whole = match offset & !7 {
                    0x20 => q.desc_table(),
                    0x28 => q.avail_ring(),
                    _ => q.used_ring(),
                };
                if len == 8 {
                    whole
                } else if offset.is_multiple_of(8) {
                    whole & 0xffff_ffff
                } else {
                    whole >> 32
                }
            }
            _ => return None,
        };
        Some(v)
    }

    fn write_common(&mut self, offset: u64, len: usize, value: u64) {
        let s = &mut self.state;
        match (offset, len) {
            (0x00, 4) => s.device_features_select = value as u32,
            (0x08, 4) => s.driver_features_select = value as u32,
            (0x0c, 4) => s.set_driver_features_word(value as u32),
            (0x10, 2) => {
                let v = self.accept_vector(value as u16);
                self.interrupt.config_vector.store(v, Ordering::SeqCst);
            }
            (0x14, 1) => {
                let status = value as u32;
                let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
                if s.set_status(status, interrupt) == StatusWrite::Reset {
                    self.interrupt.reset();
                }
            }
            (0x16, 2) => s.queue_select = value as u32,
            (0x18, 2) => s.with_queue_in_setup(|q| q.set_size(value as u16)),
            (0x1a, 2) => {
                let v = self.accept_vector(value as u16);
                if let Some(q) = self.selected_queue_vector() {
                    q.store(v, Ordering::SeqCst);
                }
            }
            (0x1c, 2) => s.set_queue_ready(u32::from(value as u16)),
            (0x20..=0x37, 4 | 8) => {
                let (low, high) = match (len, offset % 8) {
                    (8, _) => (Some(value as u32), Some((value >> 32) as u32)),
                    (_, 0) => (Some(value as u32), None),
                    _ => (None, Some(value as u32)),
                };
                match offset & !7 {
                    0x20 => s.with_queue_in_setup(|q| q.set_desc_table_address(low, high)),
                    0x28 => s.with_queue_in_setup(|q| q.set_avail_ring_address(low, high)),
                    _ => s.with_queue_in_setup(|q| q.set_used_ring_address(low, high)),
                }
            }
            _ => {
                METRICS.vmm.guest_errors.inc();
                crate::rate_limited_log!(
                    log::Level::Debug,
                    "virtio-pci: ignored write of {value:#x} to common configuration {offset:#x}"
                );
            }
        }
    }

    /// Moves the queue notification ioeventfds to where BAR 0 decodes now.
    fn move_notifications(&mut self, bar0: Option<u64>) {
        let Some(n) = self.notifications.as_mut() else {
            return;
        };
        if n.at == bar0 {
            return;
        }
        n.registered.clear();
        n.at = None;
        let Some(base) = bar0 else {
            return;
        };
        for (q, evt) in self.queue_evts.iter().enumerate() {
            let addr = base + NOTIFY + q as u64 * u64::from(NOTIFY_MULTIPLIER);
            match n.vm.ioeventfd(evt, addr, None, &n.label) {
                Ok(reg) => n.registered.push(reg),
                // The notify write still reaches the transport, which forwards it: slower,
                // but nothing is lost.
                Err(e) => log::warn!("{}: queue {q} notifications exit to ember: {e}", n.label),
            }
        }
        n.at = Some(base);
    }

    /// The PCI configuration access window's BAR access, when the driver touched its data.
    fn pci_cfg_window(&self) -> Option<(u64, usize)> {
        let cap = self.pci_cfg_cap;
        let b = |at: usize, n: usize| self.config.bytes(cap + at, n).to_vec();
        let bar = b(PCI_CFG_BAR, 1)[0];
        let offset = u32::from_le_bytes(b(PCI_CFG_OFFSET, 4).try_into().ok()?);
        let length = u32::from_le_bytes(b(PCI_CFG_LENGTH, 4).try_into().ok()?) as usize;
        let ok = bar == 0 && matches!(length, 1 | 2 | 4) && offset % length as u32 == 0;
        ok.then_some((u64::from(offset), length))
    }

    fn touches(offset: usize, len: usize, start: usize, field: usize) -> bool {
        offset < start + field && offset + len > start
    }
}

fn class_of(device_type: u32) -> (u8, u8) {
    use virtio_bindings::virtio_ids::{VIRTIO_ID_BLOCK, VIRTIO_ID_NET};
    match device_type {
        VIRTIO_ID_BLOCK => (CLASS_MASS_STORAGE, SUBCLASS_OTHER_STORAGE),
        VIRTIO_ID_NET => (CLASS_NETWORK, SUBCLASS_ETHERNET),
        _ => (CLASS_OTHER, 0),
    }
}

fn to_u64(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b[..data.len().min(8)].copy_from_slice(&data[..data.len().min(8)]);
    u64::from_le_bytes(b)
}

impl PciDevice for VirtioPciFunction {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        let data_at = self.pci_cfg_cap + PCI_CFG_DATA;
        if Self::touches(offset, data.len(), data_at, 4)
            && let Some((at, length)) = self.pci_cfg_window()
        {
            let mut window = [0u8; 4];
            self.read_bar(0, at, &mut window[..length]);
            self.config.set_bytes(data_at, &window);
        }
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        let control_at = self.msix_cap + 2;
        if Self::touches(offset, data.len(), control_at, 2) {
            let c = self.config.bytes(control_at, 2);
            let control = u16::from_le_bytes([c[0], c[1]]);
            self.interrupt.msix().set_control(control);
        }
        let data_at = self.pci_cfg_cap + PCI_CFG_DATA;
        if Self::touches(offset, data.len(), data_at, 4)
            && let Some((at, length)) = self.pci_cfg_window()
        {
            let window = self.config.bytes(data_at, length).to_vec();
            self.write_bar(0, at, &window);
        }
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        let len = data.len() as u64;
        match offset {
            o if o + len <= COMMON + COMMON_LEN => match self.read_common(o - COMMON, data.len()) {
                Some(v) => data.copy_from_slice(&v.to_le_bytes()[..data.len()]),
                None => METRICS.vmm.guest_errors.inc(),
            },
            o if (ISR..ISR + ISR_LEN).contains(&o) => {
                // Reading the ISR status acknowledges it (4.1.4.5).
                data[0] = self.interrupt.isr.swap(0, Ordering::SeqCst);
            }
            o if (DEVICE_CONFIG..DEVICE_CONFIG + DEVICE_CONFIG_LEN).contains(&o) => {
                self.state.read_device_config(o - DEVICE_CONFIG, data);
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => {
                self.interrupt.msix().read_table(o - MSIX_TABLE, data);
            }
            o if (MSIX_PBA..BAR_SIZE).contains(&o) => {
                self.interrupt.msix().read_pba(o - MSIX_PBA, data);
            }
            _ => {}
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 || data.is_empty() || data.len() > 8 {
            return;
        }
        let len = data.len() as u64;
        match offset {
            o if o + len <= COMMON + COMMON_LEN => {
                self.write_common(o - COMMON, data.len(), to_u64(data))
            }
            o if (DEVICE_CONFIG..DEVICE_CONFIG + DEVICE_CONFIG_LEN).contains(&o) => {
                self.state.write_device_config(o - DEVICE_CONFIG, data);
            }
            o if (NOTIFY..MSIX_TABLE).contains(&o) => {
                // Only reached when no ioeventfd took the write: forward it.
                let q = ((o - NOTIFY) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(evt) = self.queue_evts.get(q) {
                    let _ = evt.write(1);
                }
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => {
                self.interrupt.msix().write_table(o - MSIX_TABLE, data);
            }
            _ => METRICS.vmm.guest_errors.inc(),
        }
    }

    fn decoding_changed(&mut self, bars: &[BarRegion]) {
        let bar0 = bars.iter().find(|b| b.index == 0).map(|b| b.addr);
        self.move_notifications(bar0);
    }
}

#[cfg(test)]
mod tests;
