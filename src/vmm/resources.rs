//! What the microVM will be built from: the configuration the API or the config file has
//! set so far. Every change is validated in full before it is stored, so a refused request
//! leaves the resources exactly as they were.

use serde::Deserialize;

use crate::config::drive::validate_drives;
use crate::config::machine_config::{CpuTemplate, Irqchip};
use crate::config::net::validate_interfaces;
use crate::config::vfio::validate_devices;
use crate::config::{
    BootSourceConfig, ConfigError, DriveConfig, HugePages, LoggerConfig, MachineConfig,
    MetricsConfig, NetConfig, VfioConfig, VmConfig,
};

/// The `PATCH /machine-config` body: any subset of the fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    pub vcpu_count: Option<u8>,
    pub mem_size_mib: Option<usize>,
    pub smt: Option<bool>,
    pub track_dirty_pages: Option<bool>,
    pub huge_pages: Option<HugePages>,
    pub cpu_template: Option<CpuTemplate>,
    pub irqchip: Option<Irqchip>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmResources {
    pub boot_source: Option<BootSourceConfig>,
    pub machine_config: MachineConfig,
    pub drives: Vec<DriveConfig>,
    pub network_interfaces: Vec<NetConfig>,
    pub vfio: Vec<VfioConfig>,
    pub logger: Option<LoggerConfig>,
    pub metrics: Option<MetricsConfig>,
    /// The metadata service's configuration (`PUT /mmds/config`).
    pub mmds_config: Option<crate::mmds::MmdsConfig>,
    /// The virtio-rng device (`PUT /entropy`).
    pub entropy: Option<crate::config::EntropyConfig>,
    /// The virtio-vsock device (`PUT /vsock`).
    pub vsock: Option<crate::config::VsockConfig>,
}

impl VmResources {
    pub fn set_boot_source(&mut self, boot: BootSourceConfig) -> Result<(), ConfigError> {
        boot.validate()?;
        self.boot_source = Some(boot);
        Ok(())
    }

    pub fn set_machine_config(&mut self, config: MachineConfig) -> Result<(), ConfigError> {
        config.validate()?;
        self.machine_config = config;
        Ok(())
    }

    pub fn update_machine_config(
        &mut self,
        update: MachineConfigUpdate,
    ) -> Result<(), ConfigError> {
        let mut next = self.machine_config.clone();
        if let Some(v) = update.vcpu_count {
            next.vcpu_count = v;
        }
        if let Some(v) = update.mem_size_mib {
            next.mem_size_mib = v;
        }
        if let Some(v) = update.smt {
            next.smt = v;
        }
        if let Some(v) = update.track_dirty_pages {
            next.track_dirty_pages = v;
        }
        if let Some(v) = update.huge_pages {
            next.huge_pages = v;
        }
        if let Some(t) = update.cpu_template {
            // "None" takes a template away.
            next.cpu_template = (t != CpuTemplate::None).then_some(t);
        }
        if let Some(v) = update.irqchip {
            next.irqchip = v;
        }
        self.set_machine_config(next)
    }

    /// Inserts a drive, or replaces the one with the same id.
    pub fn put_drive(&mut self, drive: DriveConfig) -> Result<(), ConfigError> {
        put_by_id(&mut self.drives, drive, |d| &d.drive_id, validate_drives)
    }

    /// Inserts a network interface, or replaces the one with the same id.
    pub fn put_network_interface(&mut self, iface: NetConfig) -> Result<(), ConfigError> {
        put_by_id(
            &mut self.network_interfaces,
            iface,
            |n| &n.iface_id,
            validate_interfaces,
        )
    }

    /// Inserts a passed-through device, or replaces the one with the same id.
    pub fn put_vfio_device(&mut self, device: VfioConfig) -> Result<(), ConfigError> {
        put_by_id(&mut self.vfio, device, |d| &d.id, validate_devices)
    }

    /// The configuration in the config file's shape (`GET /vm/config`).
    pub fn to_vm_config(&self) -> VmConfig {
        VmConfig {
            boot_source: self.boot_source.clone(),
            machine_config: self.machine_config.clone(),
            drives: self.drives.clone(),
            network_interfaces: self.network_interfaces.clone(),
            vfio: self.vfio.clone(),
            logger: self.logger.clone(),
            metrics: self.metrics.clone(),
            mmds_config: self.mmds_config.clone(),
            entropy: self.entropy.clone(),
            vsock: self.vsock.clone(),
            ..Default::default()
        }
    }
}

/// Puts `item` in `list`, replacing the entry with the same id, if the list as a whole
/// then passes `validate`; otherwise `list` stays as it was.
fn put_by_id<T: Clone, E>(
    list: &mut Vec<T>,
    item: T,
    id: impl Fn(&T) -> &String,
    validate: impl Fn(&[T]) -> Result<(), E>,
) -> Result<(), ConfigError>
where
    ConfigError: From<E>,
{
    let mut next = list.clone();
    match next.iter_mut().find(|e| id(e) == id(&item)) {
        Some(slot) => *slot = item,
        None => next.push(item),
    }
    validate(&next)?;
    *list = next;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::drive::test_drive as drive;

    #[test]
    fn refused_changes_leave_resources_unchanged() {
        let mut r = VmResources::default();
        r.put_drive(drive("root", true)).unwrap();
        let before = r.clone();
        assert!(
            r.put_drive(drive("other", true)).is_err(),
            "second root refused"
        );
        assert!(
            r.update_machine_config(MachineConfigUpdate {
                vcpu_count: Some(0),
                ..Default::default()
            })
            .is_err()
        );
        assert_eq!(r, before);
    }

    #[test]
    fn put_replaces_by_id_and_patch_merges() {
        let mut r = VmResources::default();
        r.put_drive(drive("a", false)).unwrap();
        r.put_drive(drive("a", true)).unwrap();
        assert_eq!(r.drives.len(), 1);
        assert!(r.drives[0].is_root_device);
        r.update_machine_config(MachineConfigUpdate {
            mem_size_mib: Some(256),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (r.machine_config.vcpu_count, r.machine_config.mem_size_mib),
            (1, 256)
        );
    }

    #[test]
    fn exports_config_file_shape() {
        let mut r = VmResources::default();
        r.set_boot_source(BootSourceConfig {
            kernel_image_path: "/k".into(),
            ..Default::default()
        })
        .unwrap();
        let json = serde_json::to_value(r.to_vm_config()).unwrap();
        assert_eq!(json["boot-source"]["kernel_image_path"], "/k");
        assert_eq!(json["machine-config"]["mem_size_mib"], 128);
        assert!(json["drives"].as_array().unwrap().is_empty());
    }
}
