//! Snapshots: a paused microVM written to two files, a state file (what KVM and ember's
//! devices hold, and the configuration the VM was built from) and a memory file (guest
//! RAM), and a new ember process that continues the VM from them. `docs/snapshots.md`
//! describes the formats and what is promised about them.

pub mod file;
pub mod memory;
pub mod params;
pub mod uffd;

#[cfg(target_arch = "x86_64")]
mod state;

#[cfg(target_arch = "x86_64")]
use crate::arch::x86_64::state::StateError;
use crate::vmm::device_manager::snapshot::DeviceStateError;
pub use params::*;
#[cfg(target_arch = "x86_64")]
pub use state::MicroVmState;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("{0}")]
    File(#[from] file::FileError),
    #[error("{0}")]
    Memory(#[from] memory::MemoryFileError),
    #[error("{0}")]
    Uffd(#[from] uffd::UffdError),
    #[error("the snapshot state file's contents are invalid: {0}")]
    Contents(String),
    #[error("cannot encode the snapshot state: {0}")]
    Encode(String),
    #[error(
        "the snapshot was taken on a different CPU ({saved}); this host has {here}, whose features the guest was not shown"
    )]
    OtherCpu { saved: String, here: String },
    #[cfg(target_arch = "x86_64")]
    #[error("{0}")]
    Arch(#[from] StateError),
    #[error("{0}")]
    Devices(#[from] DeviceStateError),
    #[error("{0}")]
    Vcpus(String),
    #[error("cannot open {what} {path:?}: {source}")]
    Open {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error(
        "Diff snapshots need dirty page tracking: set machine-config track_dirty_pages (or track_dirty_pages at load)"
    )]
    DiffWithoutTracking,
    #[error("network_overrides names interface {0:?}, which the snapshot does not have")]
    UnknownOverride(String),
    #[error("huge_pages \"2M\" needs the Uffd memory backend")]
    HugePagesNeedUffd,
}
