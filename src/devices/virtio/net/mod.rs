//! virtio-net: a guest network interface backed by a host TAP device (virtio 1.2, 5.1).
//!
//! One receive and one transmit queue, run on the vmm thread. Transmit writes each chain
//! straight from guest memory to the TAP; receive reads each frame straight into the
//! buffers the guest made available. A guest that stops taking frames leaves them queued in
//! the host's TAP (where the host's own limits apply; at most one waits in the device)
//! instead of ember spinning or dropping them.
//! The TAP is watched edge-triggered: reading stops when the guest is out of buffers and
//! resumes when it notifies the receive queue.

pub mod header;
pub mod mmds;
pub mod rx;
pub mod tap;
pub mod tx;

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use crate::memory::GuestMemoryMmap;
use event_manager::EventSet;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::DescriptorChain;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::timerfd::TimerFd;

use super::{
    ActivateError, VIRTIO_F_VERSION_1, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
    read_config_bytes,
};
use crate::config::rate_limiter::RateLimiterConfig;
use crate::metrics::{DeviceCounters, Group, METRICS, NetMetrics};
use crate::rate_limiter::{RateLimiter, TokenType};
use rx::{Delivery, RxReserve};
use tap::{InterfaceProbe, Tap, TapError, VNET_HDR_LEN};
use tx::{MAX_FRAME_LEN, TxFrame};

pub use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Entries in each queue.
pub const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
/// The most reserved buffers one TAP read fills in place; a frame longer than they hold
/// continues in the bounce buffer.
const MAX_RX_IOVECS: usize = 64;
/// How often a TAP that disappeared is looked for again.
const REATTACH_PERIOD: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("network interface {id:?}: {source}")]
    Tap { id: String, source: TapError },
    #[error("network interface {id:?}: cannot create a timer: {source}")]
    Timer { id: String, source: std::io::Error },
    #[error("network interface {id:?}: cannot create a socket to look up interfaces: {source}")]
    Probe { id: String, source: std::io::Error },
    #[error("network interface {id:?}: cannot set up the metadata service: {source}")]
    Mmds { id: String, source: std::io::Error },
}

/// What the device is made from.
#[derive(Clone, Debug)]
pub struct NetConfig {
    pub id: String,
    pub tap_name: String,
    pub mac: [u8; 6],
    /// Announced to the guest (VIRTIO_NET_F_MTU) when set.
    pub mtu: Option<u16>,
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    pub tx_rate_limiter: Option<RateLimiterConfig>,
    /// The metadata service, when its configuration names this interface.
    pub mmds: Option<Arc<std::sync::Mutex<crate::mmds::Mmds>>>,
}

/// The MAC address an interface's guest sees: the configured `guest_mac` if it parses,
/// else the generated one.
pub fn interface_mac(guest_mac: Option<&str>, instance_id: &str, iface_id: &str) -> [u8; 6] {
    guest_mac
        .and_then(crate::config::net::parse_mac)
        .unwrap_or_else(|| generated_mac(instance_id, iface_id))
}

/// `aa:bb:cc:dd:ee:ff`, as the API shows MAC addresses.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// A MAC address for an interface the user gave none: stable for the same VM id and
/// interface id, locally administered and unicast.
pub fn generated_mac(instance_id: &str, iface_id: &str) -> [u8; 6] {
    // FNV-1a: small, stable across builds and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in instance_id.bytes().chain([0]).chain(iface_id.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let b = h.to_le_bytes();
    [(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]]
}

struct ActiveQueues {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
    features: u64,
}

/// A frame read from the TAP, waiting for room in the guest or for the rate limiter.
#[derive(Clone, Copy)]
struct PendingFrame {
    /// Its length, header included.
    len: usize,
    /// Its first bytes, already in the reserved buffers; the rest is in the bounce buffer.
    in_place: usize,
}

pub struct Net {
    config: NetConfig,
    /// None while the TAP device is gone (deleted under the running VM).
    tap: Option<Tap>,
    config_space: [u8; 12],
    active: Option<ActiveQueues>,
    rx_reserve: RxReserve,
    /// Bounce buffer for what of a frame the reserved buffers could not hold (header
    /// included), at the frame's own offsets.
    rx_frame: Vec<u8>,
    /// The frame read from the TAP and not yet delivered.
    rx_pending: Option<PendingFrame>,
    rx_iovecs: Vec<libc::iovec>,
    /// Length of the last frame read (header included): how much room to reserve first.
    rx_last_len: usize,
    tx_frame: TxFrame,
    tx_iovecs: Vec<libc::iovec>,
    descs: Vec<Descriptor>,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    /// Fires while the TAP is gone, to look for it again.
    reattach: TimerFd,
    /// The TAP's descriptor changed: the event loop must watch the new one.
    sources_changed: bool,
    /// The TAP's descriptor while its device is gone: kept to attach again when a device of
    /// the same name is back (the vmm thread may not open a new one).
    detached: Option<Tap>,
    /// Tells whether the TAP device is back.
    interfaces: InterfaceProbe,
    /// A queue's rings were found inconsistent: neither queue is touched until the driver
    /// resets the device (DEVICE_NEEDS_RESET).
    broken: bool,
    /// Frames for the metadata service go here instead of the TAP.
    mmds: Option<mmds::MmdsEndpoint>,
    metrics: DeviceCounters<NetMetrics>,
}

// SAFETY: the raw pointers in `tx_iovecs` and `tx_frame` point into guest memory or into
// the device's own buffers and are only used on the thread that runs the device.
unsafe impl Send for Net {}

impl Net {
    pub fn new(config: NetConfig) -> Result<Self, NetError> {
        let tap = Tap::open(&config.tap_name).map_err(|source| NetError::Tap {
            id: config.id.clone(),
            source,
        })?;
        Self::with_tap(config, tap)
    }

    /// The device on an already open TAP (or a stand-in for one).
    pub fn with_tap(config: NetConfig, tap: Tap) -> Result<Self, NetError> {
        let limiter = |c: &Option<RateLimiterConfig>| {
            match c {
                Some(rl) => RateLimiter::new(rl),
                None => RateLimiter::unlimited(),
            }
            .map_err(|source| NetError::Timer {
                id: config.id.clone(),
                source,
            })
        };
        let rx_limiter = limiter(&config.rx_rate_limiter)?;
        let tx_limiter = limiter(&config.tx_rate_limiter)?;
        let reattach = TimerFd::new().map_err(|e| NetError::Timer {
            id: config.id.clone(),
            source: e.into(),
        })?;
        let interfaces = InterfaceProbe::new().map_err(|source| NetError::Probe {
            id: config.id.clone(),
            source,
        })?;
        let mmds = match &config.mmds {
            Some(shared) => {
                Some(
                    mmds::MmdsEndpoint::new(shared.clone()).map_err(|source| NetError::Mmds {
                        id: config.id.clone(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        let mut config_space = [0u8; 12];
        config_space[..6].copy_from_slice(&config.mac);
        config_space[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        // max_virtqueue_pairs (8..10) is read only with VIRTIO_NET_F_MQ, which is not offered.
        config_space[10..12].copy_from_slice(&config.mtu.unwrap_or(0).to_le_bytes());
        Ok(Net {
            config,
            tap: Some(tap),
            config_space,
            active: None,
            rx_reserve: RxReserve::new(),
            rx_frame: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN],
            rx_pending: None,
            rx_iovecs: Vec::with_capacity(MAX_RX_IOVECS + 1),
            rx_last_len: 0,
            tx_frame: TxFrame::new(),
            tx_iovecs: Vec::with_capacity(16),
            descs: Vec::with_capacity(16),
            rx_limiter,
            tx_limiter,
            reattach,
            sources_changed: false,
            detached: None,
            interfaces,
            broken: false,
            mmds,
            metrics: DeviceCounters::new(&METRICS.net),
        })
    }

    pub fn id(&self) -> &str {
        &self.config.id
    }

    pub fn tap_name(&self) -> &str {
        &self.config.tap_name
    }

    /// The device's counters alone (tests read them).
    pub fn counters(&self) -> &NetMetrics {
        self.metrics.own()
    }

    /// New limits from `PATCH /network-interfaces`: buckets given are replaced.
    pub fn update_rate_limiters(
        &mut self,
        rx: Option<&RateLimiterConfig>,
        tx: Option<&RateLimiterConfig>,
    ) {
        if let Some(rx) = rx {
            self.rx_limiter.update_buckets(rx);
        }
        if let Some(tx) = tx {
            self.tx_limiter.update_buckets(tx);
        }
        self.process_tx();
        self.process_rx();
    }

    /// TUN offload flags for what the guest accepts on receive.
    fn tap_offloads(features: u64) -> libc::c_uint {
        let accepted = |bit: u32| features & (1u64 << bit) != 0;
        let mut flags = 0;
        if accepted(VIRTIO_NET_F_GUEST_CSUM) {
            flags |= libc::TUN_F_CSUM;
            if accepted(VIRTIO_NET_F_GUEST_TSO4) {
                flags |= libc::TUN_F_TSO4;
            }
            if accepted(VIRTIO_NET_F_GUEST_TSO6) {
                flags |= libc::TUN_F_TSO6;
            }
            if accepted(VIRTIO_NET_F_GUEST_UFO) {
                flags |= libc::TUN_F_UFO;
            }
        }
        flags
    }

    fn configure_tap(&self) {
        let (Some(tap), Some(active)) = (&self.tap, &self.active) else {
            return;
        };
        let flags = Self::tap_offloads(active.features);
        if let Err(e) = tap.set_offload(flags) {
            // Hosts that dropped UFO refuse it; the rest still helps.
            let without_ufo = flags & !libc::TUN_F_UFO;
            if tap.set_offload(without_ufo).is_err() {
                log::warn!(
                    "network interface {:?}: TAP {} refuses offloads {flags:#x}: {e}; the host \
                     completes checksums and segments frames itself",
                    self.config.id,
                    tap.name()
                );
            }
        }
    }

    /// Receives what the TAP has, as far as the guest has room.
    pub fn process_rx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if self.broken {
            return;
        }
        let mergeable = active.features & (1u64 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        let mut delivered = false;
        let mut retried = false;
        let mut popped_before = self.rx_reserve.popped;
        let mut received = Sent::default();
        loop {
            let pending = match self.rx_pending {
                Some(p) => p,
                None if self.mmds.as_ref().is_some_and(|m| m.has_reply()) => {
                    // The metadata service's replies go first; they come from the bounce
                    // buffer behind an all-zero header (complete checksums, no segments).
                    let Some(m) = self.mmds.as_mut() else { break };
                    self.rx_frame[..VNET_HDR_LEN].fill(0);
                    match m.write_reply(&mut self.rx_frame[VNET_HDR_LEN..]) {
                        Some(n) => {
                            let p = PendingFrame {
                                len: VNET_HDR_LEN + n,
                                in_place: 0,
                            };
                            self.rx_pending = Some(p);
                            p
                        }
                        None => continue,
                    }
                }
                None => {
                    let Some(tap) = &self.tap else { break };
                    // Room first, so the frame is read straight into the guest's buffers:
                    // enough for a frame as long as the last one, so a run of large frames
                    // is read in place whole. With no buffers at all, one frame is read
                    // into the bounce buffer and waits there (the rest wait in the TAP).
                    let want = if mergeable { self.rx_last_len } else { 0 };
                    self.rx_reserve.reserve(&mut active.rx, &active.mem, want);
                    let covered = self.rx_reserve.iovecs(
                        &active.mem,
                        mergeable,
                        MAX_RX_IOVECS,
                        &mut self.rx_iovecs,
                    );
                    // What the reserved buffers cannot hold lands in the bounce buffer, at
                    // the same offsets as in the frame.
                    if covered < self.rx_frame.len() {
                        self.rx_iovecs.push(libc::iovec {
                            iov_base: self.rx_frame[covered..].as_mut_ptr().cast(),
                            iov_len: self.rx_frame.len() - covered,
                        });
                    }
                    // SAFETY: the iovecs are reserved guest buffers (checked, and the guest
                    // memory outlives the device's queues) and the device's own buffer.
                    let read = unsafe { tap.read_frame_vectored(&self.rx_iovecs) };
                    match read {
                        // Only a stand-in whose peer closed reads 0: nothing will come.
                        Ok(0) => break,
                        Ok(n) if n < VNET_HDR_LEN => {
                            // Nothing a frame can be; not the guest's doing.
                            self.metrics.inc(|m| &m.rx_fails);
                            continue;
                        }
                        Ok(n) => {
                            self.rx_last_len = n;
                            let p = PendingFrame {
                                len: n,
                                in_place: n.min(covered),
                            };
                            self.rx_pending = Some(p);
                            p
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => {
                            self.metrics.inc(|m| &m.tap_read_fails);
                            if tap::is_detached(&e) {
                                Self::tap_lost(
                                    &self.config,
                                    &mut self.tap,
                                    &mut self.detached,
                                    &mut self.reattach,
                                    &mut self.sources_changed,
                                    &e,
                                );
                            } else {
                                crate::rate_limited_log!(
                                    log::Level::Warn,
                                    "network interface {:?}: TAP read failed: {e}",
                                    self.config.id
                                );
                            }
                            break;
                        }
                    }
                }
            };
            let frame_bytes = (pending.len - VNET_HDR_LEN) as u64;
            if !self.rx_limiter.consume(1, TokenType::Ops) {
                self.metrics.inc(|m| &m.rx_rate_limiter_throttled);
                break;
            }
            if frame_bytes > 0 && !self.rx_limiter.consume(frame_bytes, TokenType::Bytes) {
                self.rx_limiter.manual_replenish(1, TokenType::Ops);
                self.metrics.inc(|m| &m.rx_rate_limiter_throttled);
                break;
            }
            let frame = &mut self.rx_frame[..pending.len];
            match self.rx_reserve.deliver(
                &mut active.rx,
                &active.mem,
                frame,
                pending.in_place,
                mergeable,
            ) {
                Delivery::Delivered { .. } => {
                    self.rx_pending = None;
                    delivered = true;
                    received.frames += 1;
                    received.bytes += frame_bytes;
                }
                Delivery::TooLarge => {
                    self.rx_pending = None;
                    self.metrics.inc(|m| &m.rx_fails);
                    crate::rate_limited_log!(
                        log::Level::Warn,
                        "network interface {:?}: a {frame_bytes}-byte frame does not fit the \
                         guest's receive buffer; dropped",
                        self.config.id
                    );
                }
                Delivery::NoRoom => {
                    // The tokens go back: the frame waits for the guest, not the limiter.
                    self.rx_limiter.manual_replenish(1, TokenType::Ops);
                    if frame_bytes > 0 {
                        self.rx_limiter
                            .manual_replenish(frame_bytes, TokenType::Bytes);
                    }
                    self.metrics.inc(|m| &m.no_rx_avail_buffer);
                    let popped = self.rx_reserve.popped != popped_before;
                    popped_before = self.rx_reserve.popped;
                    if !Self::wait_for_room(
                        &self.config,
                        active,
                        &mut self.broken,
                        &mut retried,
                        popped,
                    ) {
                        break;
                    }
                }
            }
        }
        // Counted once per pass: the counters are shared atomics.
        if received.frames > 0 {
            self.metrics.add(|m| &m.rx_packets_count, received.frames);
            self.metrics.add(|m| &m.rx_bytes_count, received.bytes);
        }
        if self.broken {
            active.interrupt.trigger(VirtioInterruptType::Config);
        }
        let bad = std::mem::take(&mut self.rx_reserve.bad_chains);
        if bad > 0 {
            self.metrics.add(|m| &m.rx_malformed_chains, bad);
            delivered = true;
        }
        if delivered && active.rx.needs_notification(&active.mem).unwrap_or(true) {
            active
                .interrupt
                .trigger(VirtioInterruptType::Queue(RX_QUEUE as u16));
        }
    }

    /// Forgets the reserved receive chains, and with them a frame waiting in them.
    fn drop_reserved(&mut self) {
        self.rx_reserve.clear();
        if self.rx_pending.take().is_some() {
            self.metrics.inc(|m| &m.rx_fails);
        }
    }

    /// The guest is out of receive buffers: asks to be told when it adds some. True when
    /// it did meanwhile and receiving should go on (once without new chains: a ring that
    /// claims buffers it cannot give is broken).
    fn wait_for_room(
        config: &NetConfig,
        active: &mut ActiveQueues,
        broken: &mut bool,
        retried: &mut bool,
        popped: bool,
    ) -> bool {
        match active.rx.enable_notification(&active.mem) {
            Ok(true) if popped || !*retried => {
                *retried = true;
                true
            }
            Ok(true) => {
                Self::queue_broken(config, broken, "receive");
                false
            }
            Ok(false) => false,
            Err(e) => {
                Self::queue_broken(config, broken, &e.to_string());
                false
            }
        }
    }

    /// Sends every frame the guest queued.
    pub fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if self.broken {
            return;
        }
        let mut returned = false;
        let mut sent = Sent::default();
        // Frames the metadata service took: its replies are received right after.
        let mut answered_locally = false;
        'chains: loop {
            let mut popped = 0usize;
            loop {
                let chain = match pop_chain(&mut active.tx, &active.mem) {
                    Ok(Some(chain)) => chain,
                    Ok(None) => break,
                    Err(e) => {
                        Self::queue_broken(&self.config, &mut self.broken, &e.to_string());
                        break 'chains;
                    }
                };
                popped += 1;
                let head = chain.head_index();
                self.descs.clear();
                self.descs.extend(chain);
                let bytes: u64 = self.descs.iter().map(|d| u64::from(d.len())).sum();
                if !self.tx_limiter.consume(1, TokenType::Ops) {
                    active.tx.go_to_previous_position();
                    self.metrics.inc(|m| &m.tx_rate_limiter_throttled);
                    break 'chains;
                }
                if bytes > 0 && !self.tx_limiter.consume(bytes, TokenType::Bytes) {
                    self.tx_limiter.manual_replenish(1, TokenType::Ops);
                    active.tx.go_to_previous_position();
                    self.metrics.inc(|m| &m.tx_rate_limiter_throttled);
                    break 'chains;
                }
                match tx::gather(
                    &self.descs,
                    &active.mem,
                    active.features,
                    &mut self.tx_frame,
                ) {
                    Ok(())
                        if self
                            .mmds
                            .as_mut()
                            .is_some_and(|m| m.intercept(&self.tx_frame)) =>
                    {
                        answered_locally = true;
                    }
                    Ok(()) => Self::send(
                        &self.config,
                        &mut self.tap,
                        &mut self.detached,
                        &mut self.reattach,
                        &mut self.sources_changed,
                        &self.tx_frame,
                        &mut self.tx_iovecs,
                        &self.metrics,
                        &mut sent,
                    ),
                    Err(e) => {
                        self.metrics.inc(|m| &m.tx_malformed_frames);
                        crate::rate_limited_log!(
                            log::Level::Warn,
                            "network interface {:?}: dropped a transmit chain: {e}",
                            self.config.id
                        );
                    }
                }
                if let Err(e) = active.tx.add_used(&active.mem, head, 0) {
                    crate::rate_limited_log!(
                        log::Level::Warn,
                        "network interface {:?}: cannot return a transmit chain: {e}",
                        self.config.id
                    );
                }
                returned = true;
            }
            match active.tx.enable_notification(&active.mem) {
                // More is available, yet nothing could be taken: the ring is broken.
                Ok(true) if popped == 0 => {
                    Self::queue_broken(&self.config, &mut self.broken, "transmit");
                    break;
                }
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    Self::queue_broken(&self.config, &mut self.broken, &e.to_string());
                    break;
                }
            }
        }
        // Counted once per pass: the counters are shared atomics.
        if sent.frames > 0 {
            self.metrics.add(|m| &m.tx_packets_count, sent.frames);
            self.metrics.add(|m| &m.tx_bytes_count, sent.bytes);
        }
        if self.broken {
            active.interrupt.trigger(VirtioInterruptType::Config);
        }
        if returned && active.tx.needs_notification(&active.mem).unwrap_or(true) {
            active
                .interrupt
                .trigger(VirtioInterruptType::Queue(TX_QUEUE as u16));
        }
        if answered_locally {
            self.process_rx();
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn send(
        config: &NetConfig,
        tap: &mut Option<Tap>,
        detached: &mut Option<Tap>,
        reattach: &mut TimerFd,
        sources_changed: &mut bool,
        frame: &TxFrame,
        iovecs: &mut Vec<libc::iovec>,
        metrics: &DeviceCounters<NetMetrics>,
        sent: &mut Sent,
    ) {
        let Some(t) = tap.as_ref() else {
            // The TAP is gone: the frame has nowhere to go.
            metrics.inc(|m| &m.tx_fails);
            return;
        };
        frame.iovecs(iovecs);
        // SAFETY: the header lives in `frame`, the rest in guest memory checked by gather.
        match unsafe { t.write_frame(iovecs) } {
            Ok(_) => {
                sent.frames += 1;
                sent.bytes += frame.len as u64;
            }
            Err(e) => {
                metrics.inc(|m| &m.tap_write_fails);
                metrics.inc(|m| &m.tx_fails);
                if tap::is_detached(&e) {
                    Self::tap_lost(config, tap, detached, reattach, sources_changed, &e);
                } else {
                    // A TAP that is down (EIO), full, or refusing this frame (EINVAL).
                    crate::rate_limited_log!(
                        log::Level::Warn,
                        "network interface {:?}: TAP {} did not take a frame: {e}",
                        config.id,
                        config.tap_name
                    );
                }
            }
        }
    }

    /// A queue's rings are inconsistent (an available index beyond the queue size, rings
    /// outside guest memory): stop using the device until the driver resets it.
    fn queue_broken(config: &NetConfig, broken: &mut bool, what: &str) {
        if !*broken {
            log::warn!(
                "network interface {:?}: the guest's {what} queue is broken; the device stops \
                 until the driver resets it",
                config.id
            );
        }
        *broken = true;
    }

    /// The TAP device was deleted: stop using it and look for it again periodically.
    fn tap_lost(
        config: &NetConfig,
        tap: &mut Option<Tap>,
        detached: &mut Option<Tap>,
        reattach: &mut TimerFd,
        sources_changed: &mut bool,
        e: &std::io::Error,
    ) {
        let Some(gone) = tap.take() else {
            return;
        };
        // The event loop stops watching it; it stays open for attaching again.
        *detached = Some(gone);
        *sources_changed = true;
        log::warn!(
            "network interface {:?}: TAP {} is gone ({e}); frames are dropped until it is back",
            config.id,
            config.tap_name
        );
        if let Err(e) = reattach.reset(REATTACH_PERIOD, Some(REATTACH_PERIOD)) {
            log::warn!(
                "network interface {:?}: cannot arm the timer to look for the TAP again: {e}",
                config.id
            );
        }
    }

    /// The reattach timer fired: take the TAP back if it exists again.
    fn try_reattach(&mut self) {
        let _ = self.reattach.wait();
        if self.tap.is_some() || !self.interfaces.exists(&self.config.tap_name) {
            return;
        }
        let Some(tap) = self.detached.take() else {
            return;
        };
        match tap.reattach() {
            Ok(()) => {
                log::info!(
                    "network interface {:?}: TAP {} is back",
                    self.config.id,
                    self.config.tap_name
                );
                self.tap = Some(tap);
                self.sources_changed = true;
                let _ = self.reattach.reset(Duration::ZERO, None);
                self.configure_tap();
                self.process_rx();
            }
            Err(e) => {
                log::debug!(
                    "network interface {:?}: TAP not back yet: {e}",
                    self.config.id
                );
                self.detached = Some(tap);
            }
        }
    }
}

/// Frames and bytes sent or received in one pass over a queue.
#[derive(Default)]
struct Sent {
    frames: u64,
    bytes: u64,
}

/// The next available chain; an error when the ring cannot be read (virtio-queue's own
/// pop would log that on every call, and a guest can make every call fail).
fn pop_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, virtio_queue::Error> {
    Ok(queue.iter(mem)?.next())
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_NET_F_MRG_RXBUF)
            | (1 << VIRTIO_NET_F_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_TSO4)
            | (1 << VIRTIO_NET_F_GUEST_TSO6)
            | (1 << VIRTIO_NET_F_GUEST_UFO)
            | (1 << VIRTIO_NET_F_HOST_TSO4)
            | (1 << VIRTIO_NET_F_HOST_TSO6)
            | (1 << VIRTIO_NET_F_HOST_UFO);
        if self.config.mtu.is_some() {
            f |= 1 << VIRTIO_NET_F_MTU;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Without VIRTIO_NET_F_CTRL_MAC_ADDR the driver may not change the MAC (5.1.4.2).
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let mut queues = queues.into_iter();
        let (Some(mut rx), Some(mut tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::BadQueue(TX_QUEUE));
        };
        for (index, q) in [(RX_QUEUE, &rx), (TX_QUEUE, &tx)] {
            if !q.ready() {
                return Err(ActivateError::BadQueue(index));
            }
        }
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        rx.set_event_idx(event_idx);
        tx.set_event_idx(event_idx);
        self.active = Some(ActiveQueues {
            mem,
            rx,
            tx,
            interrupt,
            features,
        });
        self.configure_tap();
        // Frames may have waited in the TAP since before the driver was ready.
        self.process_rx();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.broken = false;
        self.drop_reserved();
    }

    fn rate_limiter_states(&self) -> Vec<crate::rate_limiter::RateLimiterState> {
        vec![self.rx_limiter.save_state(), self.tx_limiter.save_state()]
    }

    fn restore_rate_limiters(&mut self, saved: &[crate::rate_limiter::RateLimiterState]) {
        for (limiter, s) in [&mut self.rx_limiter, &mut self.tx_limiter]
            .into_iter()
            .zip(saved)
        {
            limiter.restore_state(s);
        }
    }

    fn saved_queues(&self) -> Vec<virtio_queue::QueueState> {
        let Some(active) = &self.active else {
            return Vec::new();
        };
        // Receive chains held in the reserve were taken but never filled: they are the
        // last ones taken, so the saved position sits before them.
        let mut rx = active.rx.state();
        rx.next_avail = rx.next_avail.wrapping_sub(self.rx_reserve.len() as u16);
        vec![rx, active.tx.state()]
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            RX_QUEUE => self.process_rx(),
            // Answers to what was sent arrive as TAP readiness events of their own.
            TX_QUEUE => self.process_tx(),
            _ => {}
        }
    }

    fn stop_queue(&mut self, index: usize) {
        // Nothing is in flight: transmit is synchronous and receive holds chains only in
        // the reserve. Stopping either queue stops the interface until a reset.
        if index == RX_QUEUE {
            self.drop_reserved();
        }
        self.active = None;
    }

    fn event_sources(&self) -> Vec<(RawFd, EventSet)> {
        let mut v = vec![
            (self.rx_limiter.as_raw_fd(), EventSet::IN),
            (self.tx_limiter.as_raw_fd(), EventSet::IN),
            (self.reattach.as_raw_fd(), EventSet::IN),
        ];
        if let Some(m) = &self.mmds {
            v.push((m.timer_fd(), EventSet::IN));
        }
        if let Some(tap) = &self.tap {
            v.push((tap.as_raw_fd(), EventSet::IN | EventSet::EDGE_TRIGGERED));
        }
        v
    }

    fn needs_reset(&self) -> bool {
        self.broken
    }

    fn take_sources_changed(&mut self) -> bool {
        std::mem::take(&mut self.sources_changed)
    }

    fn process_event(&mut self, fd: RawFd, _events: EventSet) {
        if self.tap.as_ref().is_some_and(|t| t.as_raw_fd() == fd) {
            self.metrics.inc(|m| &m.rx_tap_event_count);
            self.process_rx();
        } else if fd == self.rx_limiter.as_raw_fd() {
            if let Err(e) = self.rx_limiter.event_handler() {
                log::debug!("network interface {:?}: {e}", self.config.id);
            }
            self.process_rx();
        } else if fd == self.tx_limiter.as_raw_fd() {
            if let Err(e) = self.tx_limiter.event_handler() {
                log::debug!("network interface {:?}: {e}", self.config.id);
            }
            self.process_tx();
        } else if fd == self.reattach.as_raw_fd() {
            self.try_reattach();
        } else if let Some(m) = self.mmds.as_mut()
            && fd == m.timer_fd()
        {
            m.timer_fired();
            self.process_rx();
        }
    }

    fn metrics(&self) -> Option<(&'static str, Arc<dyn Group>)> {
        Some(("net", self.metrics.group()))
    }
}

#[cfg(test)]
mod tests;
