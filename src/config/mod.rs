//! Typed microVM configuration. The same types are the config file's keys and the API's
//! request bodies, so both paths validate identically.

pub mod boot_source;
pub mod drive;
pub mod entropy;
pub mod logging;
pub mod machine_config;
pub mod net;
pub mod rate_limiter;
pub mod vfio;
pub mod vsock;

use serde::{Deserialize, Serialize};

pub use boot_source::{BootSourceConfig, BootSourceError};
pub use drive::{DriveConfig, DriveError};
pub use entropy::{EntropyConfig, EntropyError};
pub use logging::{LogLevel, LoggerConfig, MetricsConfig};
pub use machine_config::{HugePages, Irqchip, MachineConfig, MachineConfigError};
pub use net::{NetConfig, NetError};
pub use vfio::{Sbdf, VfioConfig, VfioConfigError};
pub use vsock::{VsockConfig, VsockConfigError};

/// The config file (`--config-file`) and `GET /vm/config` shape.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSourceConfig>,
    #[serde(rename = "machine-config", default)]
    pub machine_config: MachineConfig,
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetConfig>,
    /// Host PCI functions passed through (an ember extension of Firecracker's config
    /// file; the API resource is `PUT /vfio/{id}`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vfio: Vec<VfioConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<LoggerConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
    // Firecracker resources ember does not have yet. They are named here so a config that
    // uses them gets "not supported" rather than a confusing "unknown field".
    #[serde(default, skip_serializing, deserialize_with = "given")]
    pub(crate) balloon: Option<serde_json::Value>,
    /// The virtio-vsock device (`PUT /vsock`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// The metadata service (`PUT /mmds/config`): its address, token policy and the
    /// interfaces guests reach it through.
    #[serde(
        rename = "mmds-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub mmds_config: Option<crate::mmds::MmdsConfig>,
    /// The virtio-rng device (`PUT /entropy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<EntropyConfig>,
    #[serde(
        rename = "cpu-config",
        default,
        skip_serializing,
        deserialize_with = "given"
    )]
    pub(crate) cpu_config: Option<serde_json::Value>,
    #[serde(default, skip_serializing, deserialize_with = "given")]
    pub(crate) pmem: Option<serde_json::Value>,
    #[serde(
        rename = "memory-hotplug",
        default,
        skip_serializing,
        deserialize_with = "given"
    )]
    pub(crate) memory_hotplug: Option<serde_json::Value>,
}

/// A section of a Firecracker resource ember does not have: present only when it says
/// something. `GET /vm/config` shows such sections as null (or `[]`), which a config file
/// made from that answer then carries.
fn given<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    let v: Option<serde_json::Value> = Deserialize::deserialize(d)?;
    Ok(v.filter(|v| v.as_array().is_none_or(|a| !a.is_empty())))
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file is not valid: {0}")]
    Json(#[from] serde_json::Error),
    #[error("config has no boot-source: a kernel_image_path is required to boot")]
    MissingBootSource,
    #[error("{0}")]
    BootSource(#[from] BootSourceError),
    #[error("{0}")]
    MachineConfig(#[from] MachineConfigError),
    #[error("{0}")]
    Drive(#[from] DriveError),
    #[error("{0}")]
    Net(#[from] NetError),
    #[error("{0}")]
    Vfio(#[from] VfioConfigError),
    #[error("{0}")]
    Entropy(#[from] EntropyError),
    #[error("{0}")]
    Vsock(#[from] VsockConfigError),
    #[error("config key {0:?} is not supported by ember yet")]
    Unsupported(&'static str),
}

impl VmConfig {
    /// Parses a config file's text: JSON errors carry serde's line and column.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let config: VmConfig = serde_json::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    pub fn from_file(path: &str) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// The `GET /vm/config` answer: every section of Firecracker's description present, as
    /// null or `[]` when not configured (an empty boot source before `PUT /boot-source`),
    /// and each device's optional fields as null, so clients that index into the answer
    /// find every key they expect.
    pub fn full_json(&self) -> Result<serde_json::Value, serde_json::Error> {
        use serde_json::{Value, json};
        fn fill(value: &mut Value, keys: &[&str]) {
            if let Some(object) = value.as_object_mut() {
                for key in keys {
                    object.entry(*key).or_insert(Value::Null);
                }
            }
        }
        fn fill_limiters(value: &mut Value, keys: &[&str]) {
            if let Some(object) = value.as_object_mut() {
                for key in keys {
                    match object.get_mut(*key) {
                        Some(limiter @ Value::Object(_)) => fill(limiter, &["bandwidth", "ops"]),
                        _ => {
                            object.insert((*key).to_owned(), Value::Null);
                        }
                    }
                }
            }
        }
        let mut full = serde_json::to_value(self)?;
        let Some(sections) = full.as_object_mut() else {
            return Ok(full);
        };
        let boot = sections
            .entry("boot-source")
            .or_insert_with(|| json!({ "kernel_image_path": "" }));
        fill(boot, &["initrd_path", "boot_args"]);
        if let Some(Value::Array(drives)) = sections.get_mut("drives") {
            for drive in drives {
                fill(drive, &["partuuid", "socket"]);
                fill_limiters(drive, &["rate_limiter"]);
            }
        }
        if let Some(Value::Array(interfaces)) = sections.get_mut("network-interfaces") {
            for interface in interfaces {
                fill(interface, &["guest_mac"]);
                fill_limiters(interface, &["rx_rate_limiter", "tx_rate_limiter"]);
            }
        }
        for key in [
            "balloon",
            "cpu-config",
            "logger",
            "metrics",
            "memory-hotplug",
            "mmds-config",
            "vsock",
            "entropy",
        ] {
            sections.entry(key).or_insert(Value::Null);
        }
        sections.entry("pmem").or_insert_with(|| json!([]));
        Ok(full)
    }

    /// Validates every part. A boot source is required because a config file boots at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let unsupported = [
            ("balloon", self.balloon.is_some()),
            ("cpu-config", self.cpu_config.is_some()),
            ("pmem", self.pmem.is_some()),
            ("memory-hotplug", self.memory_hotplug.is_some()),
        ];
        if let Some((key, _)) = unsupported.iter().find(|(_, present)| *present) {
            return Err(ConfigError::Unsupported(key));
        }
        self.boot_source
            .as_ref()
            .ok_or(ConfigError::MissingBootSource)?
            .validate()?;
        self.machine_config.validate()?;
        drive::validate_drives(&self.drives)?;
        net::validate_interfaces(&self.network_interfaces)?;
        vfio::validate_devices(&self.vfio)?;
        if let Some(e) = &self.entropy {
            e.validate()?;
        }
        if let Some(v) = &self.vsock {
            v.validate()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"{"boot-source":{"kernel_image_path":"/k"},"machine-config":{"vcpu_count":2,"mem_size_mib":256}}"#;

    #[test]
    fn minimal_config_parses() {
        let c = VmConfig::from_json(MINIMAL).unwrap();
        assert_eq!(c.machine_config.vcpu_count, 2);
        assert_eq!(c.boot_source.unwrap().kernel_image_path, "/k");
    }

    #[test]
    fn machine_config_defaults_when_absent() {
        let c = VmConfig::from_json(r#"{"boot-source":{"kernel_image_path":"/k"}}"#).unwrap();
        assert_eq!(c.machine_config, MachineConfig::default());
    }

    #[test]
    fn bad_inputs_named() {
        let cases = [
            ("{", "EOF"),
            (
                r#"{"boot-source":{"kernel_image_path":"/k"},"bogus":1}"#,
                "unknown field `bogus`",
            ),
            (
                r#"{"machine-config":{"vcpu_count":1,"mem_size_mib":1}}"#,
                "no boot-source",
            ),
            (
                r#"{"boot-source":{"kernel_image_path":"/k"},"machine-config":{"vcpu_count":0,"mem_size_mib":128}}"#,
                "vcpu_count must be between 1 and 32, got 0",
            ),
            (
                r#"{"boot-source":{"kernel_image_path":"/k"},"machine-config":{"vcpu_count":33,"mem_size_mib":128}}"#,
                "got 33",
            ),
            (
                r#"{"boot-source":{"kernel_image_path":"/k"},"machine-config":{"vcpu_count":1,"mem_size_mib":0}}"#,
                "mem_size_mib must be greater than 0",
            ),
            (
                r#"{"boot-source":{"kernel_image_path":"/k"},"machine-config":{"vcpu_count":"two","mem_size_mib":0}}"#,
                "invalid type",
            ),
            (
                r#"{"boot-source":{"kernel_image_path":"/k"},"balloon":{}}"#,
                "\"balloon\" is not supported",
            ),
        ];
        for (text, want) in cases {
            let err = VmConfig::from_json(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn full_json_has_every_section_and_reads_back() {
        let empty = VmConfig::default().full_json().unwrap();
        let keys: Vec<&str> = empty
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        for key in [
            "balloon",
            "drives",
            "boot-source",
            "cpu-config",
            "logger",
            "machine-config",
            "metrics",
            "memory-hotplug",
            "mmds-config",
            "network-interfaces",
            "pmem",
            "vsock",
            "entropy",
        ] {
            assert!(keys.contains(&key), "{key} missing from {empty}");
        }
        assert_eq!(
            empty["boot-source"],
            serde_json::json!({"kernel_image_path": "", "initrd_path": null, "boot_args": null})
        );
        assert_eq!(empty["drives"], serde_json::json!([]));
        assert_eq!(empty["pmem"], serde_json::json!([]));
        assert!(empty["vsock"].is_null() && empty["balloon"].is_null());

        let text = r#"{"boot-source":{"kernel_image_path":"/k"},
            "drives":[{"drive_id":"root","is_root_device":true,"path_on_host":"/d",
                "rate_limiter":{"bandwidth":{"size":1,"refill_time":1}}}],
            "network-interfaces":[{"iface_id":"eth0","host_dev_name":"tap0"}]}"#;
        let config = VmConfig::from_json(text).unwrap();
        let full = config.full_json().unwrap();
        let drive = &full["drives"][0];
        assert!(drive["partuuid"].is_null() && drive["socket"].is_null());
        assert!(drive["rate_limiter"]["ops"].is_null());
        assert_eq!(drive["rate_limiter"]["bandwidth"]["size"], 1);
        let interface = &full["network-interfaces"][0];
        assert!(interface["guest_mac"].is_null());
        assert!(interface["rx_rate_limiter"].is_null() && interface["tx_rate_limiter"].is_null());
        // What GET /vm/config shows is a config file that boots the same VM.
        assert_eq!(VmConfig::from_json(&full.to_string()).unwrap(), config);
    }

    #[test]
    fn round_trips_through_json() {
        let c = VmConfig::from_json(MINIMAL).unwrap();
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(VmConfig::from_json(&text).unwrap(), c);
    }
}
