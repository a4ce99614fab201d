//! What a state file holds, and the checks a loaded one must pass.

use serde::{Deserialize, Serialize};

use super::{SnapshotError, SnapshotType, file};
use crate::arch::x86_64::state::{VcpuState, VmState};
use crate::config::{BootSourceConfig, DriveConfig, Irqchip, MachineConfig, NetConfig};
use crate::memory::RamRegion;
use crate::vmm::device_manager::snapshot::DevicesState;

/// Everything a state file holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct MicroVmState {
    /// The ember that wrote it, for people reading the file.
    pub ember_version: String,
    /// The CPU of the host that took the snapshot (`state::host_cpu_identity`).
    pub host_cpu: String,
    pub snapshot_type: SnapshotType,
    /// The configuration the VM was built from: a restore attaches the same devices in
    /// the same order. Network interfaces carry the MAC the guest saw.
    pub machine_config: MachineConfig,
    pub boot_source: Option<BootSourceConfig>,
    pub drives: Vec<DriveConfig>,
    pub network_interfaces: Vec<NetConfig>,
    /// The interrupt controllers as created.
    pub irqchip: Irqchip,
    /// Guest RAM, region after region as the memory file lays it out.
    pub memory: Vec<RamRegion>,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub devices: DevicesState,
    /// The metadata service's configuration (not its document, which the orchestrator
    /// sets again), so restored interfaces answer for it as before.
    #[serde(default)]
    pub mmds_config: Option<crate::mmds::MmdsConfig>,
    /// The entropy device, attached after the network interfaces.
    #[serde(default)]
    pub entropy: Option<crate::config::EntropyConfig>,
    /// The vsock device, attached after the entropy device. Its connections are not
    /// saved: a restored guest is told they were reset.
    #[serde(default)]
    pub vsock: Option<crate::config::VsockConfig>,
}

impl MicroVmState {
    /// The state file's bytes.
    pub fn encode(&self) -> Result<Vec<u8>, SnapshotError> {
        let body = serde_json::to_vec(self).map_err(|e| SnapshotError::Encode(e.to_string()))?;
        let mut out = Vec::with_capacity(body.len() + file::HEADER_LEN);
        file::write(&mut out, &body)?;
        Ok(out)
    }

    /// Reads and checks a state file: envelope, contents, and that this host can run it.
    pub fn decode(input: &mut impl std::io::Read) -> Result<Self, SnapshotError> {
        let body = file::read(input)?;
        let state: MicroVmState =
            serde_json::from_slice(&body).map_err(|e| SnapshotError::Contents(e.to_string()))?;
        let here = crate::arch::x86_64::state::host_cpu_identity();
        if state.host_cpu != here {
            return Err(SnapshotError::OtherCpu {
                saved: state.host_cpu,
                here,
            });
        }
        if state.vcpus.len() != usize::from(state.machine_config.vcpu_count) {
            return Err(SnapshotError::Contents(format!(
                "{} vCPU states for a machine of {} vCPUs",
                state.vcpus.len(),
                state.machine_config.vcpu_count
            )));
        }
        Ok(state)
    }

    /// Bytes of guest memory the memory file must hold.
    pub fn memory_len(&self) -> u64 {
        self.memory.iter().map(|r| r.len).sum()
    }
}
