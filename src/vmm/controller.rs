//! The controller: owns the microVM's configuration and, once started, the VM itself.
//! Every request (API or config file) goes through [`Controller::handle`] on the vmm thread.

#[cfg(target_arch = "x86_64")]
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberId, SubscriberOps};

#[cfg(target_arch = "x86_64")]
use super::action::SnapshotCreate;
use super::action::{
    ActionError, DriveUpdate, InstanceInfo, NetUpdate, SnapshotFiles, VmmAction, VmmData,
};
use super::builder::{BuildOptions, MicroVm, PreparedVm, build_microvm, open_boot_files};
#[cfg(target_arch = "x86_64")]
use super::builder::{RestoredMemory, restore_microvm};
use super::console::{ConsoleInput, ConsoleWriter, HostOutput, RawTerminal};
use super::resources::VmResources;
use super::vcpus::VcpuSet;
use super::{Subscriber, VmExit, WorkRunner, decide_exit};
use crate::config::{BootSourceConfig, ConfigError, DriveConfig, DriveError, MachineConfig};
use crate::devices::virtio::block::open_backing;
use crate::exit_code;
use crate::logger;
use crate::metrics::{METRICS, MetricsSink};
use crate::mmds::{Mmds, MmdsConfig};
use crate::seccomp::{Filters, ThreadKind};
use crate::snapshot::SnapshotError;
#[cfg(target_arch = "x86_64")]
use crate::snapshot::{LoadSnapshotParams, SnapshotType};
use crate::stop::StopSignal;
use crate::vstate::vcpu::VcpuContext;

/// How long ember waits, at exit, for the host to take the guest's last console output.
const CONSOLE_FLUSH_LIMIT: Duration = Duration::from_secs(2);

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
    vcpus: VcpuSet,
    /// Event-loop handlers that act for the guest (devices, console input): taken off the
    /// loop while the VM is paused (no id then).
    device_handlers: Vec<(Option<SubscriberId>, Subscriber)>,
    console_writer: Arc<Mutex<ConsoleWriter>>,
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
    /// The machine configuration preparing failed for: not tried again until it changes
    /// (InstanceStart builds it anew and reports the error).
    prepare_failed: Option<MachineConfig>,
    /// Installed on the vmm thread (and each vCPU's) when the VM starts.
    seccomp: Arc<Filters>,
    /// `--enable-pci`: the guest gets a PCI root complex.
    enable_pci: bool,
    /// The metadata service: its document is set through the API at any time; guests
    /// reach it through the interfaces its configuration names.
    mmds: Arc<Mutex<Mmds>>,
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
            prepare_failed: None,
            seccomp: Arc::new(Filters::none()),
            enable_pci: false,
            mmds: Arc::new(Mutex::new(Mmds::default())),
        }
    }

    /// The largest metadata document, in bytes (`--mmds-size-limit`).
    pub fn with_mmds_size_limit(self, limit: usize) -> Self {
        self.mmds.lock().unwrap_or_else(|e| e.into_inner()).store =
            crate::mmds::MmdsStore::with_limit(limit);
        self
    }

    /// `PUT /mmds/config`: the interfaces it names must exist; the service's address and
    /// token policy change for the guest once the VM starts.
    fn put_mmds_config(&mut self, config: MmdsConfig) -> Result<(), ActionError> {
        config.validate().map_err(ActionError::MmdsConfig)?;
        if config.network_interfaces.is_empty() {
            return Err(ActionError::MmdsNoInterfaces);
        }
        if let Some(missing) = config.network_interfaces.iter().find(|id| {
            !self
                .resources
                .network_interfaces
                .iter()
                .any(|n| &n.iface_id == *id)
        }) {
            return Err(ActionError::NotFound {
                kind: "network interface",
                id: missing.clone(),
            });
        }
        self.mmds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_config(config.clone())
            .map_err(ActionError::MmdsConfig)?;
        self.resources.mmds_config = Some(config);
        Ok(())
    }

    /// The seccomp filters the VM's threads run under once it starts.
    pub fn with_seccomp(mut self, filters: Filters) -> Self {
        self.seccomp = Arc::new(filters);
        self
    }

    /// Whether the VM gets a PCI root complex (`--enable-pci`).
    pub fn with_pci(mut self, enable: bool) -> Self {
        self.enable_pci = enable;
        self
    }

    pub fn state(&self) -> VmState {
        self.state
    }

    /// Before start, makes sure a VM and its memory exist for the current machine
    /// configuration, so InstanceStart only loads the kernel and starts vCPUs. Called when
    /// the vmm thread is idle. A failure is not reported here and not retried for the same
    /// configuration: InstanceStart tries again and reports it.
    pub fn prepare_ahead(&mut self) {
        if !self.needs_preparing() {
            return;
        }
        if let Some(old) = self.prepared.take() {
            old.discard();
        }
        let machine = &self.resources.machine_config;
        match PreparedVm::new(machine) {
            Ok(p) => {
                log::debug!(
                    "prepared a VM with {} MiB of memory ahead of start",
                    machine.mem_size_mib
                );
                self.prepared = Some(p);
            }
            Err(e) => {
                log::debug!("cannot prepare the VM ahead of start: {e}");
                self.prepare_failed = Some(machine.clone());
            }
        }
    }

    /// True before start while no prepared VM matches the machine configuration and
    /// preparing has not already failed for it.
    pub fn needs_preparing(&self) -> bool {
        let machine = &self.resources.machine_config;
        self.state == VmState::NotStarted
            && !self.prepared.as_ref().is_some_and(|p| p.fits(machine))
            && self.prepare_failed.as_ref() != Some(machine)
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
        if let VmmAction::CheckSnapshotCreate(_) = &action {
            // The first half of a PUT /snapshot/create: counted only when the request
            // ends here.
            let result = self.dispatch(action, events);
            if result.is_err() {
                METRICS.put_api_requests.snapshot_create_count.inc();
                METRICS.put_api_requests.snapshot_create_fails.inc();
            }
            return result;
        }
        if let VmmAction::GetDriveAccess(_) = &action {
            // The first half of a PATCH /drives: counted only when the request ends here.
            let result = self.dispatch(action, events);
            if result.is_err() {
                METRICS.patch_api_requests.drive_count.inc();
                METRICS.patch_api_requests.drive_fails.inc();
            }
            return result;
        }
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
            GetVersion => Ok(VmmData::Version(
                crate::version::firecracker_version().to_owned(),
            )),
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
            GetDriveAccess(id) => {
                self.post_boot("PATCH /drives")?;
                self.resources
                    .drives
                    .iter()
                    .find(|d| d.drive_id == id)
                    .map(|d| VmmData::DriveAccess {
                        read_only: d.is_read_only,
                    })
                    .ok_or(ActionError::NotFound { kind: "drive", id })
            }
            PatchDrive(u) => {
                self.post_boot("PATCH /drives")?;
                empty(self.patch_drive(u))
            }
            PutNetworkInterface(n) => {
                self.pre_boot("PUT /network-interfaces")?;
                empty(self.resources.put_network_interface(n).map_err(Into::into))
            }
            PutVfioDevice(d) => {
                self.pre_boot("PUT /vfio")?;
                empty(self.resources.put_vfio_device(d).map_err(Into::into))
            }
            PatchNetworkInterface(u) => {
                self.post_boot("PATCH /network-interfaces")?;
                empty(self.patch_network_interface(u))
            }
            PutMmds(data) => {
                let mut mmds = self.mmds.lock().unwrap_or_else(|e| e.into_inner());
                mmds.store.put(data).map_err(ActionError::Mmds)?;
                Ok(VmmData::Empty)
            }
            PatchMmds(patch) => {
                let mut mmds = self.mmds.lock().unwrap_or_else(|e| e.into_inner());
                mmds.store.patch(&patch).map_err(ActionError::Mmds)?;
                Ok(VmmData::Empty)
            }
            GetMmds => {
                let mmds = self.mmds.lock().unwrap_or_else(|e| e.into_inner());
                // Before the first PUT the document is an empty object.
                Ok(VmmData::Mmds(if mmds.store.is_initialized() {
                    mmds.store.get().clone()
                } else {
                    serde_json::json!({})
                }))
            }
            PutEntropy(config) => {
                self.pre_boot("PUT /entropy")?;
                config.validate().map_err(ConfigError::from)?;
                self.resources.entropy = Some(config);
                Ok(VmmData::Empty)
            }
            PutVsock(config) => {
                self.pre_boot("PUT /vsock")?;
                config.validate().map_err(ConfigError::from)?;
                self.resources.vsock = Some(config);
                Ok(VmmData::Empty)
            }
            PutMmdsConfig(config) => {
                self.pre_boot("PUT /mmds/config")?;
                empty(self.put_mmds_config(config))
            }
            PutLogger(l) => {
                // Opening a log file is not allowed to the running vmm thread (seccomp).
                self.pre_boot("PUT /logger")?;
                logger::configure(&l)?;
                self.resources.logger = Some(l);
                Ok(VmmData::Empty)
            }
            PutMetrics(m) => {
                self.pre_boot("PUT /metrics")?;
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
            // An arm64 guest has no keyboard controller to press the keys on.
            #[cfg(not(target_arch = "x86_64"))]
            SendCtrlAltDel => Err(ActionError::NotOnThisArch("SendCtrlAltDel")),
            #[cfg(target_arch = "x86_64")]
            SendCtrlAltDel => {
                self.post_boot("SendCtrlAltDel")?;
                if let Some(legacy) = self
                    .vm
                    .as_ref()
                    .and_then(|vm| vm.microvm.devices.legacy.as_ref())
                {
                    legacy
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
                empty(self.pause(events))
            }
            Resume => {
                self.post_boot("PATCH /vm")?;
                empty(self.resume(events))
            }
            #[cfg(target_arch = "x86_64")]
            CheckSnapshotCreate(kind) => empty(self.check_snapshot_create(kind)),
            #[cfg(target_arch = "x86_64")]
            CreateSnapshot(request) => {
                self.check_snapshot_create(request.params.snapshot_type)?;
                empty(self.create_snapshot(request))
            }
            #[cfg(target_arch = "x86_64")]
            LoadSnapshot(params) => empty(self.load_snapshot(params, events)),
            #[cfg(not(target_arch = "x86_64"))]
            CheckSnapshotCreate(_) | CreateSnapshot(_) | LoadSnapshot(_) => {
                Err(ActionError::NotOnThisArch("snapshots"))
            }
        }
    }

    /// `PATCH /drives/{id}` on a running VM: a new backing file and/or new rate limits.
    /// New rate limits for a running interface: buckets given replace, absent ones stay.
    fn patch_network_interface(&mut self, update: NetUpdate) -> Result<(), ActionError> {
        let not_found = || ActionError::NotFound {
            kind: "network interface",
            id: update.iface_id.clone(),
        };
        let vm = self.vm.as_ref().ok_or_else(not_found)?;
        let device = vm
            .microvm
            .nets
            .iter()
            .find(|(id, _)| *id == update.iface_id)
            .map(|(_, n)| n.clone())
            .ok_or_else(not_found)?;
        for (name, rl) in [
            ("rx_rate_limiter", &update.rx_rate_limiter),
            ("tx_rate_limiter", &update.tx_rate_limiter),
        ] {
            if let Some(rl) = rl {
                rl.validate().map_err(|e| {
                    ConfigError::from(crate::config::net::NetError::RateLimiter(
                        update.iface_id.clone(),
                        name,
                        e,
                    ))
                })?;
            }
        }
        let stored = self
            .resources
            .network_interfaces
            .iter_mut()
            .find(|n| n.iface_id == update.iface_id)
            .ok_or_else(not_found)?;
        device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .update_rate_limiters(
                update.rx_rate_limiter.as_ref(),
                update.tx_rate_limiter.as_ref(),
            );
        for (kept, given) in [
            (&mut stored.rx_rate_limiter, update.rx_rate_limiter),
            (&mut stored.tx_rate_limiter, update.tx_rate_limiter),
        ] {
            if let Some(rl) = given {
                let limits = kept.get_or_insert_with(Default::default);
                if rl.bandwidth.is_some() {
                    limits.bandwidth = rl.bandwidth;
                }
                if rl.ops.is_some() {
                    limits.ops = rl.ops;
                }
            }
        }
        Ok(())
    }

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
            match update.backing {
                Some(b) => {
                    let file = Arc::try_unwrap(b.file).map_err(|_| {
                        ActionError::Run("the new backing file is still in use".into())
                    })?;
                    block.swap_backing_file(file, b.capacity, &path);
                }
                // Only callers inside the process (tests) come without the file; the API
                // thread always opens it.
                None => block.swap_backing(&path)?,
            }
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
        let microvm = build_microvm(
            &boot,
            &self.resources.machine_config,
            &self.resources.drives,
            &self.resources.network_interfaces,
            &self.resources.vfio,
            self.prepared.take(),
            BuildOptions {
                boot_timer_start: self.boot_timer_start,
                stop: self.stop.clone(),
                instance_id: self.instance_id.clone(),
                enable_pci: self.enable_pci,
                mmds: self
                    .resources
                    .mmds_config
                    .is_some()
                    .then(|| self.mmds.clone()),
                entropy: self.resources.entropy.clone(),
                vsock: self.resources.vsock.clone(),
            },
        )?;
        self.launch(microvm, events, true)?;
        METRICS.vmm.instance_starts.inc();
        METRICS
            .latencies_us
            .instance_start_us
            .set(started.elapsed().as_micros() as u64);
        Ok(())
    }

    /// Runs a built (or restored) VM: its handlers on the event loop, a thread per vCPU,
    /// this thread jailed; with `resume` the guest runs, else it stays paused (its device
    /// handlers then join the loop at resume).
    fn launch(
        &mut self,
        mut microvm: MicroVm,
        events: &mut EventManager<Subscriber>,
        resume: bool,
    ) -> Result<(), ActionError> {
        let run_err = |what: &str, e: std::io::Error| ActionError::Run(format!("{what}: {e}"));
        // Handlers are registered only once everything they need exists, and taken off
        // again if a later step fails, so a failed start leaves no stale handler behind.
        let mut device_handlers: Vec<(Option<SubscriberId>, Subscriber)> = Vec::new();
        let mut other_handlers: Vec<SubscriberId> = Vec::new();
        // Registered for the VM's life (console output, the work queue): the event loop
        // ends with the VM.
        let legacy = microvm
            .devices
            .legacy
            .as_ref()
            .ok_or_else(|| ActionError::Run("the VM has no console".into()))?;
        let writer = Arc::new(Mutex::new(
            ConsoleWriter::new(
                legacy.console_output.clone(),
                HostOutput::stdout().map_err(|e| run_err("cannot open stdout", e))?,
            )
            .map_err(|e| run_err("cannot create the console's batch timer", e))?,
        ));
        let input: Subscriber = Arc::new(Mutex::new(ConsoleInput::new(
            legacy.serial.clone(),
            legacy
                .serial_input_drained
                .try_clone()
                .map_err(|e| run_err("cannot duplicate an eventfd", e))?,
        )));
        let work = microvm.devices.work_queue();
        other_handlers.push(events.add_subscriber(writer.clone()));
        other_handlers.push(events.add_subscriber(Arc::new(Mutex::new(WorkRunner(work.clone())))));
        for h in std::iter::once(input).chain(microvm.devices.take_handlers()) {
            let id = resume.then(|| events.add_subscriber(h.clone()));
            device_handlers.push((id, h));
        }

        #[cfg(target_arch = "x86_64")]
        let msrs_to_save = Arc::new(
            crate::arch::x86_64::state::msrs_to_save(&microvm.kvm.kvm)
                .map_err(|e| ActionError::Run(e.to_string()))?,
        );
        let ctx = VcpuContext {
            pio_bus: Arc::new(microvm.devices.pio_bus.clone()),
            mmio_bus: Arc::new(microvm.devices.mmio_bus.clone()),
            stop: self.stop.clone(),
            seccomp: self.seccomp.clone(),
            ioapic: microvm.vm.ioapic(),
            #[cfg(target_arch = "x86_64")]
            msrs_to_save,
        };
        // The vCPU threads wait, jailed, until the vmm thread is jailed too: from here on
        // the guest runs, and this thread serves it.
        let started_vcpus = VcpuSet::start(std::mem::take(&mut microvm.vcpus), ctx, work)
            .map_err(|e| e.to_string())
            .and_then(|mut vcpus| {
                self.seccomp
                    .install(ThreadKind::Vmm)
                    .map_err(|e| e.to_string())?;
                if resume {
                    vcpus.resume().map_err(|e| e.to_string())?;
                }
                Ok(vcpus)
            });
        let vcpus = match started_vcpus {
            Ok(v) => v,
            Err(e) => {
                for id in device_handlers
                    .iter()
                    .filter_map(|(id, _)| *id)
                    .chain(other_handlers.iter().copied())
                {
                    let _ = events.remove_subscriber(id);
                }
                return Err(ActionError::Run(e));
            }
        };
        log::info!(
            "microVM {} with {} vCPUs",
            if resume { "running" } else { "paused" },
            vcpus.len()
        );
        self.vm = Some(RunningVm {
            _terminal: RawTerminal::enter(),
            microvm,
            vcpus,
            device_handlers,
            console_writer: writer,
        });
        self.state = if resume {
            VmState::Running
        } else {
            VmState::Paused
        };
        Ok(())
    }

    /// Stops the guest: vCPUs out of the guest, device handlers off the event loop, and
    /// requests in flight finished, so nothing writes guest memory until resume.
    fn pause(&mut self, events: &mut EventManager<Subscriber>) -> Result<(), ActionError> {
        let Some(vm) = &mut self.vm else {
            return Ok(());
        };
        if self.state == VmState::Paused {
            return Ok(());
        }
        let started = Instant::now();
        vm.vcpus
            .pause()
            .map_err(|e| ActionError::Run(e.to_string()))?;
        for (id, _) in vm.device_handlers.iter_mut() {
            if let Some(id) = id.take() {
                let _ = events.remove_subscriber(id);
            }
        }
        vm.microvm.devices.quiesce();
        self.state = VmState::Paused;
        METRICS.vmm.pauses.inc();
        METRICS
            .latencies_us
            .pause_vm_us
            .set(started.elapsed().as_micros() as u64);
        log::info!("microVM paused");
        Ok(())
    }

    fn resume(&mut self, events: &mut EventManager<Subscriber>) -> Result<(), ActionError> {
        let Some(vm) = &mut self.vm else {
            return Ok(());
        };
        if self.state != VmState::Paused {
            return Ok(());
        }
        let started = Instant::now();
        // Devices first: what the guest queued while paused is handled as soon as it runs.
        for (id, handler) in vm.device_handlers.iter_mut() {
            if id.is_none() {
                *id = Some(events.add_subscriber(handler.clone()));
            }
        }
        vm.vcpus
            .resume()
            .map_err(|e| ActionError::Run(e.to_string()))?;
        self.state = VmState::Running;
        METRICS.vmm.resumes.inc();
        METRICS
            .latencies_us
            .resume_vm_us
            .set(started.elapsed().as_micros() as u64);
        log::info!("microVM resumed");
        Ok(())
    }

    /// Refuses a snapshot the VM cannot give now: it must be paused, its devices ones a
    /// snapshot holds, and a diff needs dirty page tracking.
    #[cfg(target_arch = "x86_64")]
    fn check_snapshot_create(&self, kind: SnapshotType) -> Result<(), ActionError> {
        self.post_boot("PUT /snapshot/create")?;
        let Some(vm) = &self.vm else {
            return Err(ActionError::PostBootOnly("PUT /snapshot/create"));
        };
        if self.state != VmState::Paused {
            return Err(ActionError::SnapshotNotPaused);
        }
        vm.microvm
            .devices
            .check_snapshot_support()
            .map_err(|e| ActionError::SnapshotCreate(e.into()))?;
        if kind == SnapshotType::Diff && !self.resources.machine_config.track_dirty_pages {
            return Err(ActionError::SnapshotCreate(
                SnapshotError::DiffWithoutTracking,
            ));
        }
        Ok(())
    }

    /// Writes the paused VM to a snapshot: every vCPU's state (saved on its own thread),
    /// KVM's VM-wide state, every device's, and guest memory (all of it, or only what
    /// changed since the last snapshot), then the state file that describes it all.
    #[cfg(target_arch = "x86_64")]
    fn create_snapshot(&mut self, request: SnapshotCreate) -> Result<(), ActionError> {
        use crate::snapshot::{MicroVmState, memory};
        let started = Instant::now();
        let fail = ActionError::SnapshotCreate;
        let files = match request.files {
            Some(f) => f,
            None => open_snapshot_files(&request.params).map_err(fail)?,
        };
        if let Some(v) = &request.params.version {
            log::info!(
                "snapshot format version {v:?} asked for; ember writes format {}",
                crate::snapshot::file::FORMAT_VERSION
            );
        }
        let tracking = self.resources.machine_config.track_dirty_pages;
        let instance_id = self.instance_id.clone();
        let Some(vm) = self.vm.as_mut() else {
            return Err(ActionError::PostBootOnly("PUT /snapshot/create"));
        };
        let vcpus = vm
            .vcpus
            .save_states()
            .map_err(|e| fail(SnapshotError::Vcpus(e.to_string())))?;
        let microvm = &vm.microvm;
        let irqchip = microvm
            .vm
            .irqchip()
            .unwrap_or(self.resources.machine_config.irqchip);
        let vm_state = crate::arch::x86_64::state::save_vm(
            microvm.vm.fd(),
            irqchip == crate::config::Irqchip::Kernel,
        )
        .map_err(|e| fail(e.into()))?;
        let devices = microvm
            .devices
            .save_state(&microvm.vm)
            .map_err(|e| fail(e.into()))?;
        let kind = request.params.snapshot_type;
        let written = match kind {
            SnapshotType::Full => memory::write_full(
                &microvm.guest_memory,
                &files.memory,
                tracking.then_some(&microvm.vm as &dyn memory::DirtyLog),
            ),
            SnapshotType::Diff => {
                memory::write_diff(&microvm.guest_memory, &files.memory, &microvm.vm)
            }
        }
        .map_err(|e| fail(e.into()))?;
        let network_interfaces = self
            .resources
            .network_interfaces
            .iter()
            .map(|n| {
                use crate::devices::virtio::net::{format_mac, interface_mac};
                let mac = interface_mac(n.guest_mac.as_deref(), &instance_id, &n.iface_id);
                crate::config::NetConfig {
                    guest_mac: Some(format_mac(mac)),
                    ..n.clone()
                }
            })
            .collect();
        let state = MicroVmState {
            ember_version: env!("CARGO_PKG_VERSION").to_owned(),
            host_cpu: crate::arch::x86_64::state::host_cpu_identity(),
            snapshot_type: kind,
            machine_config: self.resources.machine_config.clone(),
            boot_source: self.resources.boot_source.clone(),
            drives: self.resources.drives.clone(),
            network_interfaces,
            irqchip,
            memory: crate::memory::ram_regions(&microvm.guest_memory),
            vcpus,
            vm: vm_state,
            devices,
            mmds_config: self.resources.mmds_config.clone(),
            entropy: self.resources.entropy.clone(),
            vsock: self.resources.vsock.clone(),
        };
        let bytes = state.encode().map_err(fail)?;
        let write_err = |e| fail(crate::snapshot::file::FileError::Write(e).into());
        (&*files.state).write_all(&bytes).map_err(write_err)?;
        files.state.sync_all().map_err(write_err)?;
        files
            .memory
            .sync_all()
            .map_err(|e| fail(memory::MemoryFileError::Write(e).into()))?;
        let us = started.elapsed().as_micros() as u64;
        match kind {
            SnapshotType::Full => METRICS.latencies_us.full_create_snapshot_us.set(us),
            SnapshotType::Diff => METRICS.latencies_us.diff_create_snapshot_us.set(us),
        }
        log::info!(
            "{kind:?} snapshot written: {} bytes of state, {} MiB of memory, in {} ms",
            bytes.len(),
            written >> 20,
            us / 1000
        );
        Ok(())
    }

    /// Continues a VM from a snapshot in this fresh process: reads and checks the state
    /// file, maps guest memory from the memory file (copy-on-write) or hands it to a
    /// page-fault handler, rebuilds the VM and puts every saved state back. Nothing is
    /// changed when any step fails.
    #[cfg(target_arch = "x86_64")]
    fn load_snapshot(
        &mut self,
        params: LoadSnapshotParams,
        events: &mut EventManager<Subscriber>,
    ) -> Result<(), ActionError> {
        use crate::snapshot::{MemBackendType, MicroVmState, RestoreHugePages, memory};
        let started = Instant::now();
        self.pre_boot("PUT /snapshot/load")?;
        if self.resources.boot_source.is_some()
            || !self.resources.drives.is_empty()
            || !self.resources.network_interfaces.is_empty()
            || !self.resources.vfio.is_empty()
            || self.resources.machine_config != MachineConfig::default()
        {
            return Err(ActionError::LoadAfterConfiguration);
        }
        let fail = ActionError::SnapshotLoad;
        let (backend, mem_path) = params.memory_source().map_err(fail)?;
        let open = |what, path: &str| {
            std::fs::File::open(path).map_err(|source| {
                fail(SnapshotError::Open {
                    what,
                    path: path.to_owned(),
                    source,
                })
            })
        };
        let mut state_file =
            std::io::BufReader::new(open("the snapshot state file", &params.snapshot_path)?);
        let mut state = MicroVmState::decode(&mut state_file).map_err(fail)?;
        for o in &params.network_overrides {
            let iface = state
                .network_interfaces
                .iter_mut()
                .find(|n| n.iface_id == o.iface_id)
                .ok_or_else(|| fail(SnapshotError::UnknownOverride(o.iface_id.clone())))?;
            iface.host_dev_name = o.host_dev_name.clone();
        }
        let huge_pages = match params.huge_pages {
            RestoreHugePages::Snapshot => state.machine_config.huge_pages,
            RestoreHugePages::None => crate::config::HugePages::None,
            RestoreHugePages::Transparent => crate::config::HugePages::Transparent,
            RestoreHugePages::Hugetlbfs2M => crate::config::HugePages::Hugetlbfs2M,
        };
        let need = state.memory_len();
        let tracking = params.tracks_dirty_pages();
        let memory = match backend {
            MemBackendType::File => {
                if huge_pages == crate::config::HugePages::Hugetlbfs2M {
                    return Err(fail(SnapshotError::HugePagesNeedUffd));
                }
                let file = open("the snapshot memory file", mem_path)?;
                memory::check_len(&file, need).map_err(|e| fail(e.into()))?;
                let guest_memory = crate::memory::map_memory_file(&file, &state.memory, tracking)
                    .map_err(|e| ActionError::Restore(e.into()))?;
                if huge_pages == crate::config::HugePages::Transparent {
                    crate::memory::advise_huge_pages(&guest_memory);
                }
                RestoredMemory {
                    guest_memory,
                    uffd: None,
                }
            }
            MemBackendType::Uffd => {
                let guest_memory = crate::memory::create_guest_memory(need, huge_pages, tracking)
                    .map_err(|e| ActionError::Restore(e.into()))?;
                if crate::memory::ram_regions(&guest_memory) != state.memory {
                    return Err(fail(SnapshotError::Contents(
                        "its memory regions are not the ones this ember lays out for the guest's size".into(),
                    )));
                }
                let uffd = crate::snapshot::uffd::hand_over(&guest_memory, mem_path)
                    .map_err(|e| fail(e.into()))?;
                RestoredMemory {
                    guest_memory,
                    uffd: Some(uffd),
                }
            }
        };
        // The interfaces read the service's address as they are made; a failed load puts
        // the previous configuration back.
        let mmds_before = self
            .mmds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .config()
            .clone();
        if let Some(config) = &state.mmds_config {
            self.mmds
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_config(config.clone())
                .map_err(ActionError::MmdsConfig)?;
        }
        let microvm = restore_microvm(
            &state,
            memory,
            tracking,
            params.clock_realtime,
            BuildOptions {
                boot_timer_start: self.boot_timer_start.map(|_| started),
                stop: self.stop.clone(),
                instance_id: self.instance_id.clone(),
                enable_pci: false,
                mmds: state.mmds_config.is_some().then(|| self.mmds.clone()),
                entropy: state.entropy.clone(),
                vsock: state.vsock.clone(),
            },
        )
        .map_err(|e| {
            let _ = self
                .mmds
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_config(mmds_before);
            ActionError::Restore(e)
        })?;
        if let Some(old) = self.prepared.take() {
            old.discard();
        }
        self.launch(microvm, events, params.resume_vm)?;
        // The configuration the VM now runs, as GET /vm/config and PATCH requests see it.
        let mut machine_config = state.machine_config.clone();
        machine_config.track_dirty_pages = tracking;
        machine_config.huge_pages = huge_pages;
        self.resources.machine_config = machine_config;
        self.resources.boot_source = state.boot_source.take();
        self.resources.drives = std::mem::take(&mut state.drives);
        self.resources.network_interfaces = std::mem::take(&mut state.network_interfaces);
        self.resources.mmds_config = state.mmds_config.take();
        self.resources.entropy = state.entropy.take();
        self.resources.vsock = state.vsock.take();
        let us = started.elapsed().as_micros() as u64;
        METRICS.latencies_us.load_snapshot_us.set(us);
        log::info!(
            "snapshot loaded ({:?}, {} MiB of guest memory{}) in {} us",
            state.snapshot_type,
            need >> 20,
            if backend == MemBackendType::Uffd {
                ", pages from the Uffd handler"
            } else {
                ""
            },
            us
        );
        Ok(())
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
        // The VM (and with it its devices' metrics) stays until the last flush.
        let mut microvm = None;
        let exit = match self.vm.take() {
            Some(vm) => {
                let outcomes = vm.vcpus.stop();
                microvm = Some(vm.microvm);
                vm.console_writer
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .finish(CONSOLE_FLUSH_LIMIT);
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
        drop(microvm);
        exit
    }
}

/// Creates (or empties) the two files of a snapshot, readable by their owner only: they
/// hold the guest's memory and secrets.
pub fn open_snapshot_files(
    params: &crate::snapshot::CreateSnapshotParams,
) -> Result<SnapshotFiles, SnapshotError> {
    use std::os::unix::fs::OpenOptionsExt;
    let create = |what, path: &str| {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map(Arc::new)
            .map_err(|source| SnapshotError::Open {
                what,
                path: path.to_owned(),
                source,
            })
    };
    Ok(SnapshotFiles {
        state: create("the snapshot state file", &params.snapshot_path)?,
        memory: create("the snapshot memory file", &params.mem_file_path)?,
    })
}

/// Opens the kernel and initrd as InstanceStart will, so a wrong path is refused when it is
/// given rather than at start.
fn check_boot_files(boot: &BootSourceConfig) -> Result<(), ActionError> {
    open_boot_files(boot)?;
    Ok(())
}

/// Opens a drive's backing file as the block device will: with the guest's access, without
/// blocking, a regular file or a block device.
fn check_drive_file(drive: &DriveConfig) -> Result<(), ActionError> {
    let path = drive.path_on_host.clone().unwrap_or_default();
    open_backing(&drive.drive_id, &path, drive.is_read_only)?;
    Ok(())
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
        GetDriveAccess(_) => (&patch.drive_count, Some(&patch.drive_fails)),
        PutBootSource(_) => (&put.boot_source_count, Some(&put.boot_source_fails)),
        PutMachineConfig(_) => (&put.machine_cfg_count, Some(&put.machine_cfg_fails)),
        PatchMachineConfig(_) => (&patch.machine_cfg_count, Some(&patch.machine_cfg_fails)),
        PutDrive(_) => (&put.drive_count, Some(&put.drive_fails)),
        PatchDrive(_) => (&patch.drive_count, Some(&patch.drive_fails)),
        PutNetworkInterface(_) => (&put.network_count, Some(&put.network_fails)),
        PatchNetworkInterface(_) => (&patch.network_count, Some(&patch.network_fails)),
        PutVfioDevice(_) => (&put.vfio_count, Some(&put.vfio_fails)),
        PutLogger(_) => (&put.logger_count, Some(&put.logger_fails)),
        PutMetrics(_) => (&put.metrics_count, Some(&put.metrics_fails)),
        InstanceStart | SendCtrlAltDel | FlushMetrics => {
            (&put.actions_count, Some(&put.actions_fails))
        }
        Pause | Resume => (&patch.vm_count, Some(&patch.vm_fails)),
        CheckSnapshotCreate(_) | CreateSnapshot(_) => {
            (&put.snapshot_create_count, Some(&put.snapshot_create_fails))
        }
        LoadSnapshot(_) => (&put.snapshot_load_count, Some(&put.snapshot_load_fails)),
        PutMmds(_) => (&put.mmds_count, Some(&put.mmds_fails)),
        PatchMmds(_) => (&patch.mmds_count, Some(&patch.mmds_fails)),
        GetMmds => (&get.mmds_count, None),
        PutMmdsConfig(_) => (&put.mmds_config_count, Some(&put.mmds_config_fails)),
        PutEntropy(_) => (&put.entropy_count, Some(&put.entropy_fails)),
        PutVsock(_) => (&put.vsock_count, Some(&put.vsock_fails)),
    }
}
