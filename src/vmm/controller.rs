//! The controller: owns the microVM's configuration and, once started, the VM itself.
//! Every request (API or config file) goes through [`Controller::handle`] on the vmm thread.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};

use super::action::{ActionError, DriveUpdate, InstanceInfo, VmmAction, VmmData};
use super::builder::{BuildError, BuildOptions, MicroVm, PreparedVm, build_microvm};
use super::console::{ConsoleInput, RawTerminal};
use super::resources::VmResources;
use super::{Subscriber, VmExit, decide_exit};
use crate::arch::x86_64::kernel::BootFile;
use crate::config::{BootSourceConfig, ConfigError, DriveConfig, DriveError};
use crate::exit_code;
use crate::logger;
use crate::metrics::{METRICS, MetricsSink};
use crate::stop::StopSignal;
use crate::vstate::vcpu::{self, PauseControl, VcpuContext, VcpuOutcome};

/// How long a pause may take before it is reported as failed.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    NotStarted,
    Running,
    Paused,
}

impl VmState {
    pub fn name(self) -> &'static str {
        match self {
            VmState::NotStarted => "Not started",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
        }
    }
}

struct RunningVm {
    _terminal: RawTerminal,
    microvm: MicroVm,
    handles: Vec<JoinHandle<VcpuOutcome>>,
    pause: Arc<PauseControl>,
}

pub struct Controller {
    instance_id: String,
    resources: VmResources,
    state: VmState,
    vm: Option<RunningVm>,
    stop: StopSignal,
    boot_timer_start: Option<Instant>,
    metrics_sink: Option<MetricsSink>,
    /// KVM VM and memory made ahead of InstanceStart for the current machine configuration.
    prepared: Option<PreparedVm>,
}

impl Controller {
    pub fn new(instance_id: String, stop: StopSignal, boot_timer_start: Option<Instant>) -> Self {
        Controller {
            instance_id,
            resources: VmResources::default(),
            state: VmState::NotStarted,
            vm: None,
            stop,
            boot_timer_start,
            metrics_sink: None,
            prepared: None,
        }
    }

    pub fn state(&self) -> VmState {
        self.state
    }

    /// Before start, makes sure a VM and its memory exist for the current machine
    /// configuration, so InstanceStart only loads the kernel and starts vCPUs. Called when
    /// the vmm thread is idle. A failure here is not reported: InstanceStart tries again and
    /// reports it then.
    pub fn prepare_ahead(&mut self) {
        if !self.needs_preparing() {
            return;
        }
        if let Some(old) = self.prepared.take() {
            old.discard();
        }
        match PreparedVm::new(&self.resources.machine_config) {
            Ok(p) => self.prepared = Some(p),
            Err(e) => log::debug!("cannot prepare the VM ahead of start: {e}"),
        }
    }

    /// True before start while no prepared VM matches the machine configuration.
    pub fn needs_preparing(&self) -> bool {
        self.state == VmState::NotStarted
            && !self
                .prepared
                .as_ref()
                .is_some_and(|p| p.fits(&self.resources.machine_config))
    }

    fn pre_boot(&self, what: &'static str) -> Result<(), ActionError> {
        match self.state {
            VmState::NotStarted => Ok(()),
            _ => Err(ActionError::PreBootOnly(what)),
        }
    }

    fn post_boot(&self, what: &'static str) -> Result<(), ActionError> {
        match self.state {
            VmState::NotStarted => Err(ActionError::PostBootOnly(what)),
            _ => Ok(()),
        }
    }

    /// Carries out one request and counts it in the API metrics.
    pub fn handle(
        &mut self,
        action: VmmAction,
        events: &mut EventManager<Subscriber>,
    ) -> Result<VmmData, ActionError> {
        let (count, fails) = request_counters(&action);
        count.inc();
        let result = self.dispatch(action, events);
        if result.is_err()
            && let Some(f) = fails
        {
            f.inc();
        }
        result
    }

    fn dispatch(
        &mut self,
        action: VmmAction,
        events: &mut EventManager<Subscriber>,
    ) -> Result<VmmData, ActionError> {
        use VmmAction::*;
        let empty = |r: Result<(), ActionError>| r.map(|()| VmmData::Empty);
        match action {
            GetInstanceInfo => Ok(VmmData::InstanceInfo(InstanceInfo {
                id: self.instance_id.clone(),
                state: self.state.name(),
                vmm_version: env!("CARGO_PKG_VERSION").to_owned(),
                app_name: "ember",
            })),
            GetVersion => Ok(VmmData::Version(env!("CARGO_PKG_VERSION").to_owned())),
            GetMachineConfig => Ok(VmmData::MachineConfig(
                self.resources.machine_config.clone(),
            )),
            GetVmConfig => Ok(VmmData::VmConfig(Box::new(self.resources.to_vm_config()))),
            GetPrometheusMetrics => Ok(VmmData::Prometheus(METRICS.prometheus())),
            PutBootSource(b) => {
                self.pre_boot("PUT /boot-source")?;
                check_boot_files(&b)?;
                empty(self.resources.set_boot_source(b).map_err(Into::into))
            }
            PutMachineConfig(m) => {
                self.pre_boot("PUT /machine-config")?;
                empty(self.resources.set_machine_config(m).map_err(Into::into))
            }
            PatchMachineConfig(u) => {
                self.pre_boot("PATCH /machine-config")?;
                empty(self.resources.update_machine_config(u).map_err(Into::into))
            }
            PutDrive(d) => {
                self.pre_boot("PUT /drives")?;
                // Validated first so a malformed body is named as such; the file is checked
                // the way the block device will open it.
                d.validate().map_err(crate::config::ConfigError::from)?;
                check_drive_file(&d)?;
                empty(self.resources.put_drive(d).map_err(Into::into))
            }
            PatchDrive(u) => {
                self.post_boot("PATCH /drives")?;
                empty(self.patch_drive(u))
            }
            PutNetworkInterface(n) => {
                self.pre_boot("PUT /network-interfaces")?;
                empty(self.resources.put_network_interface(n).map_err(Into::into))
            }
            PatchNetworkInterface(u) => {
                self.post_boot("PATCH /network-interfaces")?;
                if !self
                    .resources
                    .network_interfaces
                    .iter()
                    .any(|n| n.iface_id == u.iface_id)
                {
                    return Err(ActionError::NotFound {
                        kind: "network interface",
                        id: u.iface_id,
                    });
                }
                Err(ActionError::Unsupported(
                    "updating a network interface after boot (net devices are not attached yet)"
                        .into(),
                ))
            }
            PutLogger(l) => {
                logger::configure(&l)?;
                self.resources.logger = Some(l);
                Ok(VmmData::Empty)
            }
            PutMetrics(m) => {
                if self.metrics_sink.is_some() {
                    return Err(ActionError::MetricsAlreadySet);
                }
                self.metrics_sink = Some(MetricsSink::open(&m, &self.instance_id)?);
                self.resources.metrics = Some(m);
                Ok(VmmData::Empty)
            }
            InstanceStart => {
                self.pre_boot("InstanceStart")?;
                empty(self.start(events))
            }
            SendCtrlAltDel => {
                self.post_boot("SendCtrlAltDel")?;
                if let Some(vm) = &self.vm {
                    vm.microvm
                        .i8042
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .send_ctrl_alt_del();
                    METRICS.i8042.ctrl_alt_del_count.inc();
                }
                Ok(VmmData::Empty)
            }
            FlushMetrics => {
                let sink = self.metrics_sink.as_mut().ok_or(ActionError::NoMetrics)?;
                sink.flush(&METRICS)?;
                Ok(VmmData::Empty)
            }
            Pause => {
                self.post_boot("PATCH /vm")?;
                empty(self.pause())
            }
            Resume => {
                self.post_boot("PATCH /vm")?;
                self.resume();
                Ok(VmmData::Empty)
            }
        }
    }

    /// `PATCH /drives/{id}` on a running VM: a new backing file and/or new rate limits.
    fn patch_drive(&mut self, update: DriveUpdate) -> Result<(), ActionError> {
        let not_found = || ActionError::NotFound {
            kind: "drive",
            id: update.drive_id.clone(),
        };
        let vm = self.vm.as_ref().ok_or_else(not_found)?;
        let block = vm
            .microvm
            .blocks
            .iter()
            .find(|(id, _)| *id == update.drive_id)
            .map(|(_, b)| b.clone())
            .ok_or_else(not_found)?;
        if let Some(rl) = &update.rate_limiter {
            rl.validate().map_err(|e| {
                ConfigError::from(DriveError::RateLimiter(update.drive_id.clone(), e))
            })?;
        }
        let stored = self
            .resources
            .drives
            .iter_mut()
            .find(|d| d.drive_id == update.drive_id)
            .ok_or_else(not_found)?;
        let mut block = block.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(path) = update.path_on_host {
            block.swap_backing(&path).map_err(BuildError::from)?;
            stored.path_on_host = Some(path);
        }
        if let Some(rl) = update.rate_limiter {
            block.update_rate_limiter(&rl);
            // As the limiter does: buckets given replace, absent ones stay.
            let limits = stored.rate_limiter.get_or_insert_with(Default::default);
            if rl.bandwidth.is_some() {
                limits.bandwidth = rl.bandwidth;
            }
            if rl.ops.is_some() {
                limits.ops = rl.ops;
            }
        }
        Ok(())
    }

    fn start(&mut self, events: &mut EventManager<Subscriber>) -> Result<(), ActionError> {
        let started = Instant::now();
        let boot = self
            .resources
            .boot_source
            .clone()
            .ok_or(ActionError::NoBootSource)?;
        if !self.resources.network_interfaces.is_empty() {
            log::warn!(
                "network-interfaces are validated but not yet attached in this version of ember"
            );
        }
        let mut microvm = build_microvm(
            &boot,
            &self.resources.machine_config,
            &self.resources.drives,
            self.prepared.take(),
            BuildOptions {
                boot_timer_start: self.boot_timer_start,
                stop: self.stop.clone(),
            },
        )?;
        let drained = microvm
            .serial_input_drained
            .try_clone()
            .map_err(|e| ActionError::Run(format!("cannot duplicate an eventfd: {e}")))?;
        events.add_subscriber(Arc::new(Mutex::new(ConsoleInput::new(
            microvm.serial.clone(),
            drained,
        ))));
        for handler in microvm.device_handlers.drain(..) {
            events.add_subscriber(handler);
        }
        vcpu::install_kick_handler().map_err(|e| ActionError::Run(e.to_string()))?;

        let pause = Arc::new(PauseControl::default());
        let ctx = VcpuContext {
            pio_bus: microvm.pio_bus.clone(),
            mmio_bus: microvm.mmio_bus.clone(),
            stop: self.stop.clone(),
            pause: pause.clone(),
        };
        let mut handles = Vec::with_capacity(microvm.vcpus.len());
        for v in microvm.vcpus.drain(..) {
            match v.spawn(ctx.clone()) {
                Ok(h) => handles.push(h),
                Err(e) => {
                    vcpu::stop_all(&self.stop, handles);
                    return Err(ActionError::Run(e.to_string()));
                }
            }
        }
        log::info!("microVM running with {} vCPUs", handles.len());
        METRICS.vmm.instance_starts.inc();
        METRICS
            .latencies_us
            .instance_start_us
            .set(started.elapsed().as_micros() as u64);
        self.vm = Some(RunningVm {
            _terminal: RawTerminal::enter(),
            microvm,
            handles,
            pause,
        });
        self.state = VmState::Running;
        Ok(())
    }

    fn pause(&mut self) -> Result<(), ActionError> {
        let Some(vm) = &self.vm else { return Ok(()) };
        let started = Instant::now();
        if !vm.pause.pause(&vm.handles, PAUSE_TIMEOUT) {
            vm.pause.resume();
            return Err(ActionError::PauseTimeout(PAUSE_TIMEOUT.as_millis()));
        }
        self.state = VmState::Paused;
        METRICS.vmm.pauses.inc();
        METRICS
            .latencies_us
            .pause_vm_us
            .set(started.elapsed().as_micros() as u64);
        log::info!("microVM paused");
        Ok(())
    }

    fn resume(&mut self) {
        let Some(vm) = &self.vm else { return };
        let started = Instant::now();
        vm.pause.resume();
        self.state = VmState::Running;
        METRICS.vmm.resumes.inc();
        METRICS
            .latencies_us
            .resume_vm_us
            .set(started.elapsed().as_micros() as u64);
        log::info!("microVM resumed");
    }

    /// Writes a metrics line if a destination is set; failures are logged, not fatal.
    pub fn flush_metrics(&mut self) {
        if let Some(sink) = &mut self.metrics_sink
            && let Err(e) = sink.flush(&METRICS)
        {
            log::warn!("{e}");
        }
    }

    /// Stops the VM (if it runs) and decides the exit code.
    pub fn shutdown(mut self, signal: i32) -> VmExit {
        let exit = match self.vm.take() {
            Some(vm) => {
                vm.pause.resume();
                let outcomes = vcpu::stop_all(&self.stop, vm.handles);
                decide_exit(&outcomes, self.stop.was_guest_reset(), signal)
            }
            None if signal > 0 => VmExit {
                code: exit_code::SIGNAL_BASE.saturating_add(signal as u8),
                reason: format!("stopped by signal {signal} before the microVM started"),
            },
            None => VmExit {
                code: exit_code::VMM_ERROR,
                reason: "stopped before the microVM started".into(),
            },
        };
        self.flush_metrics();
        exit
    }
}

/// Opens the kernel and initrd as InstanceStart will, so a wrong path is refused when it is
/// given rather than at start.
fn check_boot_files(boot: &BootSourceConfig) -> Result<(), ActionError> {
    BootFile::open("kernel image", Path::new(&boot.kernel_image_path))?;
    if let Some(initrd) = &boot.initrd_path {
        BootFile::open("initrd", Path::new(initrd))?;
    }
    Ok(())
}

/// Opens a drive's backing file with the access the guest will have.
fn check_drive_file(drive: &DriveConfig) -> Result<(), ActionError> {
    let path = drive.path_on_host.clone().unwrap_or_default();
    std::fs::OpenOptions::new()
        .read(true)
        .write(!drive.is_read_only)
        .open(&path)
        .map(drop)
        .map_err(|source| ActionError::DriveFile {
            id: drive.drive_id.clone(),
            path,
            source,
        })
}

/// The API counters an action moves: its count, and its failure count if it has one.
fn request_counters(
    action: &VmmAction,
) -> (
    &'static crate::metrics::Counter,
    Option<&'static crate::metrics::Counter>,
) {
    use VmmAction::*;
    let (get, put, patch) = (
        &METRICS.get_api_requests,
        &METRICS.put_api_requests,
        &METRICS.patch_api_requests,
    );
    match action {
        GetInstanceInfo => (&get.instance_info_count, None),
        GetVersion => (&get.version_count, None),
        GetMachineConfig => (&get.machine_cfg_count, None),
        GetVmConfig => (&get.vm_config_count, None),
        GetPrometheusMetrics => (&get.prometheus_count, None),
        PutBootSource(_) => (&put.boot_source_count, Some(&put.boot_source_fails)),
        PutMachineConfig(_) => (&put.machine_cfg_count, Some(&put.machine_cfg_fails)),
        PatchMachineConfig(_) => (&patch.machine_cfg_count, Some(&patch.machine_cfg_fails)),
        PutDrive(_) => (&put.drive_count, Some(&put.drive_fails)),
        PatchDrive(_) => (&patch.drive_count, Some(&patch.drive_fails)),
        PutNetworkInterface(_) => (&put.network_count, Some(&put.network_fails)),
        PatchNetworkInterface(_) => (&patch.network_count, Some(&patch.network_fails)),
        PutLogger(_) => (&put.logger_count, Some(&put.logger_fails)),
        PutMetrics(_) => (&put.metrics_count, Some(&put.metrics_fails)),
        InstanceStart | SendCtrlAltDel | FlushMetrics => {
            (&put.actions_count, Some(&put.actions_fails))
        }
        Pause | Resume => (&patch.vm_count, Some(&patch.vm_fails)),
    }
}
