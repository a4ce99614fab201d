//! The typed requests the controller accepts (from the API or the config file) and what it
//! answers.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::rate_limiter::RateLimiterConfig;
use crate::config::{
    BootSourceConfig, ConfigError, DriveConfig, LoggerConfig, MachineConfig, MetricsConfig,
    NetConfig, VfioConfig, VmConfig,
};
use crate::mmds::MmdsConfig;
use crate::snapshot::{CreateSnapshotParams, LoadSnapshotParams, SnapshotError, SnapshotType};
use crate::vmm::builder::BuildError;
use crate::vmm::resources::MachineConfigUpdate;

/// `PATCH /drives/{id}`: what can change on a running drive.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveUpdate {
    pub drive_id: String,
    pub path_on_host: Option<String>,
    pub rate_limiter: Option<RateLimiterConfig>,
    /// `path_on_host`, opened by the API thread (the vmm thread runs under a filter that
    /// allows it no `open`).
    #[serde(skip)]
    pub backing: Option<OpenedBacking>,
}

/// A drive's new backing file, opened and checked, and its size in sectors.
#[derive(Clone, Debug)]
pub struct OpenedBacking {
    pub file: Arc<std::fs::File>,
    pub capacity: u64,
}

/// Two requests are the same when they carry the same open file.
impl PartialEq for OpenedBacking {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.file, &other.file) && self.capacity == other.capacity
    }
}

impl Eq for OpenedBacking {}

/// `PATCH /network-interfaces/{id}`: what can change on a running interface.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetUpdate {
    pub iface_id: String,
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// The two files of a snapshot, created by the API thread (the vmm thread's filter allows
/// it no `open`).
#[derive(Clone, Debug)]
pub struct SnapshotFiles {
    pub state: Arc<std::fs::File>,
    pub memory: Arc<std::fs::File>,
}

/// Two requests are the same when they carry the same open files.
impl PartialEq for SnapshotFiles {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.state, &other.state) && Arc::ptr_eq(&self.memory, &other.memory)
    }
}

impl Eq for SnapshotFiles {}

/// `PUT /snapshot/create`: what to write, and the files to write it to (opened by the API
/// thread; opened by the vmm thread itself when absent, which only callers inside the
/// process do).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotCreate {
    pub params: CreateSnapshotParams,
    pub files: Option<SnapshotFiles>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmmAction {
    GetInstanceInfo,
    GetVersion,
    GetMachineConfig,
    GetVmConfig,
    GetPrometheusMetrics,
    PutBootSource(BootSourceConfig),
    PutMachineConfig(MachineConfig),
    PatchMachineConfig(MachineConfigUpdate),
    PutDrive(DriveConfig),
    /// Whether a drive is read-only, for the API thread to open its new backing file with
    /// the right access before `PatchDrive`; refused as `PATCH /drives` would be.
    GetDriveAccess(String),
    PatchDrive(DriveUpdate),
    PutNetworkInterface(NetConfig),
    PatchNetworkInterface(NetUpdate),
    PutVfioDevice(VfioConfig),
    PutLogger(LoggerConfig),
    PutMetrics(MetricsConfig),
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
    Pause,
    Resume,
    /// Whether `PUT /snapshot/create` of this type would be accepted now, asked before the
    /// API thread creates its files.
    CheckSnapshotCreate(SnapshotType),
    CreateSnapshot(SnapshotCreate),
    LoadSnapshot(LoadSnapshotParams),
    /// `PUT /mmds`: the whole metadata document.
    PutMmds(serde_json::Value),
    /// `PATCH /mmds`: a JSON merge patch of it.
    PatchMmds(serde_json::Value),
    GetMmds,
    PutMmdsConfig(MmdsConfig),
    PutEntropy(crate::config::EntropyConfig),
    PutVsock(crate::config::VsockConfig),
}

/// The `GET /` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InstanceInfo {
    pub id: String,
    pub state: &'static str,
    pub vmm_version: String,
    pub app_name: &'static str,
}

/// A successful answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmmData {
    Empty,
    InstanceInfo(InstanceInfo),
    Version(String),
    MachineConfig(MachineConfig),
    VmConfig(Box<VmConfig>),
    Prometheus(String),
    DriveAccess { read_only: bool },
    Mmds(serde_json::Value),
}

/// Why an action was refused. The VM's state is unchanged by a refused action.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0} is only allowed before the microVM starts (InstanceStart)")]
    PreBootOnly(&'static str),
    #[error("{0} is only allowed after the microVM starts (InstanceStart)")]
    PostBootOnly(&'static str),
    #[error("{0}")]
    BootFile(#[from] crate::host_file::HostFileError),
    #[error("{0}")]
    Drive(#[from] crate::devices::virtio::block::BlockError),
    #[error("cannot start the microVM: no boot source; PUT /boot-source first")]
    NoBootSource,
    #[error("cannot start the microVM: {0}")]
    Start(#[from] BuildError),
    #[error("cannot start the microVM: {0}")]
    Run(String),
    #[error("{0}")]
    Logger(#[from] crate::logger::LoggerError),
    #[error("{0}")]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("the metrics system is already initialized")]
    MetricsAlreadySet,
    #[error("FlushMetrics needs a metrics destination; PUT /metrics first")]
    NoMetrics,
    #[error("{kind} {id:?} does not exist")]
    NotFound { kind: &'static str, id: String },
    #[error("the vCPUs did not pause within {0} ms")]
    PauseTimeout(u128),
    #[error("{0} is not available on {arch}", arch = std::env::consts::ARCH)]
    NotOnThisArch(&'static str),
    #[error("cannot create the snapshot: {0}")]
    SnapshotCreate(SnapshotError),
    #[error("cannot load the snapshot: {0}")]
    SnapshotLoad(SnapshotError),
    #[error("cannot load the snapshot: {0}")]
    Restore(BuildError),
    #[error("a snapshot can only be created while the microVM is paused (PATCH /vm Paused first)")]
    SnapshotNotPaused,
    #[error(
        "loading a snapshot is not allowed after configuring boot-specific resources; it must be the first thing a fresh ember is asked"
    )]
    LoadAfterConfiguration,
    #[error("{0}")]
    Mmds(crate::mmds::DataStoreError),
    #[error("{0}")]
    MmdsConfig(crate::mmds::ConfigError),
    #[error("mmds-config.network_interfaces must name at least one network interface")]
    MmdsNoInterfaces,
}

impl ActionError {
    /// The exit code when this error ends a config-file boot.
    pub fn exit_code(&self) -> u8 {
        match self {
            ActionError::Start(e) => e.exit_code(),
            ActionError::Run(_) | ActionError::PauseTimeout(_) => crate::exit_code::VMM_ERROR,
            _ => crate::exit_code::BAD_CONFIGURATION,
        }
    }
}
