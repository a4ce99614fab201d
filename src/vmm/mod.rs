//! The vmm thread: one event loop that serves API requests, console input, signals and
//! stop requests, around the [`Controller`] that owns the microVM.

pub mod action;
pub mod builder;
pub mod console;
pub mod controller;
pub mod device_manager;
pub mod resources;
pub mod signals;
pub mod vcpus;

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::config::{MetricsConfig, VmConfig};
use crate::exit_code;
use crate::stop::{StopSignal, StopSignalError};
use crate::vstate::vcpu::VcpuOutcome;
use action::{ActionError, VmmAction, VmmData};
use controller::Controller;
use signals::{SignalError, SignalHandler};

/// How long the API must be quiet before the VM is prepared ahead of InstanceStart.
const PREPARE_QUIET_TIME: Duration = Duration::from_millis(5);

/// How often metrics are written when a destination is set.
const METRICS_PERIOD: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot create the event loop: {0}")]
    EventLoop(event_manager::Error),
    #[error("{0}")]
    Signals(#[from] SignalError),
    #[error("{0}")]
    Stop(#[from] StopSignalError),
    #[error("cannot create the metrics timer: {0}")]
    Timer(std::io::Error),
    #[error("{0}")]
    Config(ActionError),
}

impl VmmError {
    pub fn exit_code(&self) -> u8 {
        match self {
            VmmError::Config(e) => e.exit_code(),
            _ => exit_code::VMM_ERROR,
        }
    }
}

/// How the microVM ended, and the process exit code that says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmExit {
    pub code: u8,
    pub reason: String,
}

pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// One request from the API thread, with the channel its answer goes back on.
pub struct ApiRequest {
    pub action: VmmAction,
    pub reply: SyncSender<Result<VmmData, String>>,
}

/// The vmm thread's end of the API: requests, and the eventfd that says one is waiting.
pub struct ApiEndpoint {
    pub requests: Receiver<ApiRequest>,
    pub wakeup: EventFd,
}

/// Wakes the event loop when something raised the stop signal.
struct StopListener(StopSignal);

impl MutEventSubscriber for StopListener {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.eventfd().read();
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.eventfd(), EventSet::IN)) {
            log::error!("cannot watch the stop eventfd: {e}");
        }
    }
}

/// Drains an eventfd so the loop wakes once per burst of events; the work happens in the
/// main loop, which can reach the controller and the event manager.
struct Wakeup(EventFd);

impl MutEventSubscriber for Wakeup {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            log::error!("cannot watch an eventfd: {e}");
        }
    }
}

/// Runs the work vCPUs hand to the vmm thread (see `devices::work_queue`).
pub struct WorkRunner(pub Arc<crate::devices::work_queue::WorkQueue>);

impl MutEventSubscriber for WorkRunner {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.0.run_pending();
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.eventfd(), EventSet::IN)) {
            log::error!("cannot watch the device work queue: {e}");
        }
    }
}

/// The periodic metrics flush.
struct MetricsTimer {
    timer: TimerFd,
    due: Arc<AtomicBool>,
}

impl MutEventSubscriber for MetricsTimer {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.timer.wait();
        self.due.store(true, Ordering::SeqCst);
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            log::error!("cannot watch the metrics timer: {e}");
        }
    }
}

/// Decides the exit from what the vCPUs reported, whether the guest asked to reset, and
/// which signal (if any) stopped ember. A guest fault wins over everything: the code must
/// never claim a clean shutdown for a guest that crashed, even if the crash raced with it.
pub fn decide_exit(outcomes: &[VcpuOutcome], guest_reset: bool, signal: i32) -> VmExit {
    if let Some((i, o)) = outcomes.iter().enumerate().find(|(_, o)| o.is_fault()) {
        let code = match o {
            VcpuOutcome::RunError(_) | VcpuOutcome::SetupError(_) => exit_code::VMM_ERROR,
            _ => exit_code::GUEST_FAULT,
        };
        return VmExit {
            code,
            reason: format!("vCPU {i}: {o}"),
        };
    }
    if guest_reset || outcomes.contains(&VcpuOutcome::GuestShutdown) {
        return VmExit {
            code: exit_code::GUEST_SHUTDOWN,
            reason: "the guest reset or powered off".into(),
        };
    }
    if signal > 0 {
        return VmExit {
            code: exit_code::SIGNAL_BASE.saturating_add(signal as u8),
            reason: format!("stopped by signal {signal}"),
        };
    }
    VmExit {
        code: exit_code::VMM_ERROR,
        reason: "the VM stopped for no recorded reason".into(),
    }
}

/// The actions a config file stands for, in the order the API would apply them.
pub fn config_actions(config: VmConfig) -> Vec<VmmAction> {
    let mut actions = Vec::new();
    if let Some(l) = config.logger {
        actions.push(VmmAction::PutLogger(l));
    }
    if let Some(m) = config.metrics {
        actions.push(VmmAction::PutMetrics(m));
    }
    actions.push(VmmAction::PutMachineConfig(config.machine_config));
    if let Some(b) = config.boot_source {
        actions.push(VmmAction::PutBootSource(b));
    }
    actions.extend(config.drives.into_iter().map(VmmAction::PutDrive));
    actions.extend(
        config
            .network_interfaces
            .into_iter()
            .map(VmmAction::PutNetworkInterface),
    );
    actions.extend(config.vfio.into_iter().map(VmmAction::PutVfioDevice));
    if let Some(m) = config.mmds_config {
        actions.push(VmmAction::PutMmdsConfig(m));
    }
    if let Some(e) = config.entropy {
        actions.push(VmmAction::PutEntropy(e));
    }
    if let Some(v) = config.vsock {
        actions.push(VmmAction::PutVsock(v));
    }
    actions.push(VmmAction::InstanceStart);
    actions
}

/// What the vmm thread starts with.
pub struct VmmOptions {
    pub instance_id: String,
    pub boot_timer_start: Option<Instant>,
    /// A config file to apply (and boot) before serving anything else.
    pub config: Option<VmConfig>,
    /// A metrics destination from `--metrics-path`.
    pub metrics: Option<MetricsConfig>,
    pub api: Option<ApiEndpoint>,
    /// The filters for the vmm and vCPU threads.
    pub seccomp: crate::seccomp::Filters,
    /// `--enable-pci`: the guest gets a PCI root complex.
    pub enable_pci: bool,
    /// `--mmds-size-limit`: the largest metadata document, in bytes.
    pub mmds_size_limit: usize,
    /// `--metadata`: the metadata document to start with.
    pub metadata: Option<serde_json::Value>,
}

/// Runs the vmm thread's loop until the microVM stops (or, before it starts, until a
/// termination signal); returns how it ended.
pub fn run_vmm(opts: VmmOptions) -> Result<VmExit, VmmError> {
    let stop = StopSignal::new()?;
    let mut events: EventManager<Subscriber> = EventManager::new().map_err(VmmError::EventLoop)?;
    let received_signal = Arc::new(AtomicI32::new(0));
    events.add_subscriber(Arc::new(Mutex::new(SignalHandler::new(
        stop.clone(),
        received_signal.clone(),
    )?)));
    events.add_subscriber(Arc::new(Mutex::new(StopListener(stop.clone()))));
    let metrics_due = Arc::new(AtomicBool::new(false));
    let mut timer = TimerFd::new().map_err(|e| VmmError::Timer(e.into()))?;
    timer
        .reset(METRICS_PERIOD, Some(METRICS_PERIOD))
        .map_err(|e| VmmError::Timer(e.into()))?;
    events.add_subscriber(Arc::new(Mutex::new(MetricsTimer {
        timer,
        due: metrics_due.clone(),
    })));
    let requests = match opts.api {
        Some(api) => {
            events.add_subscriber(Arc::new(Mutex::new(Wakeup(api.wakeup))));
            Some(api.requests)
        }
        None => None,
    };

    let mut controller = Controller::new(opts.instance_id, stop.clone(), opts.boot_timer_start)
        .with_seccomp(opts.seccomp)
        .with_pci(opts.enable_pci)
        .with_mmds_size_limit(opts.mmds_size_limit);
    // With the API, the VM and its memory are made while the vmm thread is idle, once the
    // machine configuration has not changed for PREPARE_QUIET_TIME: a client changing it
    // request after request does not pay for VMs it never starts.
    let mut last_request = Instant::now();
    let flag_actions = opts
        .metadata
        .map(VmmAction::PutMmds)
        .into_iter()
        .chain(opts.metrics.map(VmmAction::PutMetrics));
    let file_actions = opts.config.map(config_actions).unwrap_or_default();
    for action in flag_actions.into_iter().chain(file_actions) {
        if let Err(e) = controller.handle(action, &mut events) {
            controller.shutdown(0);
            return Err(VmmError::Config(e));
        }
    }

    while !stop.is_stopping() {
        let prepare_in = (requests.is_some() && controller.needs_preparing())
            .then(|| PREPARE_QUIET_TIME.saturating_sub(last_request.elapsed()));
        let timeout_ms = prepare_in.map_or(-1, |d| d.as_millis() as i32);
        if let Err(e) = events.run_with_timeout(timeout_ms) {
            log::error!("event loop failed: {e}; stopping the microVM");
            stop.request();
        }
        if let Some(rx) = &requests {
            while let Ok(req) = rx.try_recv() {
                last_request = Instant::now();
                let answer = controller
                    .handle(req.action, &mut events)
                    .map_err(|e| e.to_string());
                // The API thread may have given up on a client; nothing to do then.
                let _ = req.reply.send(answer);
            }
        }
        if metrics_due.swap(false, Ordering::SeqCst) {
            controller.flush_metrics();
        }
        if requests.is_some() && last_request.elapsed() >= PREPARE_QUIET_TIME {
            controller.prepare_ahead();
        }
    }
    // Requests that arrive from now on, or wait unanswered, get 503 from the API thread.
    drop(requests);
    Ok(controller.shutdown(received_signal.load(Ordering::SeqCst)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_beats_reset_and_signal() {
        let outcomes = vec![
            VcpuOutcome::Stopped,
            VcpuOutcome::TripleFault { rip: 0x1234 },
        ];
        let exit = decide_exit(&outcomes, true, libc::SIGTERM);
        assert_eq!(exit.code, exit_code::GUEST_FAULT);
        assert!(
            exit.reason.contains("vCPU 1") && exit.reason.contains("0x1234"),
            "{}",
            exit.reason
        );
    }

    #[test]
    fn reset_is_clean() {
        let exit = decide_exit(&[VcpuOutcome::Stopped, VcpuOutcome::Stopped], true, 0);
        assert_eq!(exit.code, 0);
        let exit = decide_exit(&[VcpuOutcome::GuestShutdown], false, 0);
        assert_eq!(exit.code, 0);
    }

    #[test]
    fn signal_gives_128_plus_n() {
        let exit = decide_exit(&[VcpuOutcome::Stopped], false, libc::SIGTERM);
        assert_eq!(exit.code, 128 + 15);
    }

    #[test]
    fn internal_error_and_run_error_codes() {
        let e = decide_exit(
            &[VcpuOutcome::InternalError {
                suberror: 1,
                rip: 0,
            }],
            false,
            0,
        );
        assert_eq!(e.code, exit_code::GUEST_FAULT);
        assert!(e.reason.contains("emulation failure"));
        let e = decide_exit(&[VcpuOutcome::RunError("x".into())], false, 0);
        assert_eq!(e.code, exit_code::VMM_ERROR);
    }
}
