//! The bodies of `PUT /snapshot/create` and `PUT /snapshot/load`, as Firecracker defines
//! them.

use serde::{Deserialize, Serialize};

use super::SnapshotError;

/// `snapshot_type` of `PUT /snapshot/create`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum SnapshotType {
    /// All of guest memory.
    #[default]
    Full,
    /// Only the pages written since the last snapshot (needs `track_dirty_pages`).
    Diff,
}

/// The `PUT /snapshot/create` body.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotParams {
    pub snapshot_path: String,
    pub mem_file_path: String,
    #[serde(default)]
    pub snapshot_type: SnapshotType,
    /// Older clients send the format version they want; ember writes its own and says so.
    #[serde(default)]
    pub version: Option<String>,
}

/// Where a restored VM's memory comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum MemBackendType {
    /// The memory file, mapped copy-on-write.
    File,
    /// A page-fault handler process reached through a Unix socket (userfaultfd).
    Uffd,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    pub backend_type: MemBackendType,
    pub backend_path: String,
}

/// A network interface that attaches to another TAP after the restore.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// `huge_pages` of `PUT /snapshot/load`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum RestoreHugePages {
    #[default]
    Snapshot,
    None,
    Transparent,
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// The `PUT /snapshot/load` body.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadSnapshotParams {
    pub snapshot_path: String,
    #[serde(default)]
    pub mem_file_path: Option<String>,
    #[serde(default)]
    pub mem_backend: Option<MemBackend>,
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// The older name of `track_dirty_pages`.
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    #[serde(default)]
    pub resume_vm: bool,
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    /// Advance kvmclock by the wall-clock time since the snapshot (KVM_CLOCK_REALTIME).
    #[serde(default)]
    pub clock_realtime: bool,
    #[serde(default)]
    pub huge_pages: RestoreHugePages,
}

impl LoadSnapshotParams {
    /// The memory source, from whichever of the two fields was given (exactly one must be).
    pub fn memory_source(&self) -> Result<(MemBackendType, &str), SnapshotError> {
        match (&self.mem_file_path, &self.mem_backend) {
            (Some(path), None) => Ok((MemBackendType::File, path)),
            (None, Some(b)) => Ok((b.backend_type, &b.backend_path)),
            (Some(_), Some(_)) => Err(SnapshotError::BadRequest(
                "give either mem_file_path or mem_backend, not both",
            )),
            (None, None) => Err(SnapshotError::BadRequest(
                "mem_backend (or the older mem_file_path) is required",
            )),
        }
    }

    pub fn tracks_dirty_pages(&self) -> bool {
        self.track_dirty_pages || self.enable_diff_snapshots
    }
}
