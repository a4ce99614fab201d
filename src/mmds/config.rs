//! Operator-facing MMDS configuration (`PUT /mmds/config`).

use std::net::Ipv4Addr;

use serde::{Deserialize, Deserializer, Serialize};

/// Address the guest reaches MMDS at unless the operator picks another one.
pub const DEFAULT_IPV4_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// Errors of the MMDS configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The address is outside the link-local range MMDS may use.
    #[error(
        "Invalid MMDS IPv4 address {0}: it must be a link-local address 169.254.x.y \
         with x in 1..=254 and y in 0..=255."
    )]
    NotLinkLocal(Ipv4Addr),
}

/// How the guest must authenticate its metadata requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MmdsVersion {
    /// Plain GET requests; session tokens are optional and never checked.
    #[default]
    V1,
    /// GET requests need a session token obtained with `PUT /latest/api/token`.
    V2,
}

/// Body of `PUT /mmds/config`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    /// Token policy for guest requests.
    #[serde(default)]
    pub version: MmdsVersion,
    /// IDs of the network interfaces whose guest traffic MMDS answers.
    pub network_interfaces: Vec<String>,
    /// Link-local address MMDS answers ARP and TCP for.
    #[serde(
        default = "default_ipv4_address",
        deserialize_with = "deserialize_ipv4_address"
    )]
    pub ipv4_address: Ipv4Addr,
    /// Always answer `text/plain` in IMDS format, whatever the `Accept` header says.
    #[serde(default)]
    pub imds_compat: bool,
}

impl Default for MmdsConfig {
    fn default() -> Self {
        Self {
            version: MmdsVersion::default(),
            network_interfaces: Vec::new(),
            ipv4_address: DEFAULT_IPV4_ADDRESS,
            imds_compat: false,
        }
    }
}

impl MmdsConfig {
    /// Checks what deserialization checks, for configurations built in code.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_ipv4_address(self.ipv4_address)
    }
}

fn default_ipv4_address() -> Ipv4Addr {
    DEFAULT_IPV4_ADDRESS
}

/// Accepts 169.254.x.y with x in 1..=254: the first and last /24 of the link-local
/// block are reserved (RFC 3927), so the API refuses them.
pub fn validate_ipv4_address(addr: Ipv4Addr) -> Result<(), ConfigError> {
    match addr.octets() {
        [169, 254, 1..=254, _] => Ok(()),
        _ => Err(ConfigError::NotLinkLocal(addr)),
    }
}

fn deserialize_ipv4_address<'de, D: Deserializer<'de>>(d: D) -> Result<Ipv4Addr, D::Error> {
    let addr = Ipv4Addr::deserialize(d)?;
    validate_ipv4_address(addr).map_err(serde::de::Error::custom)?;
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<MmdsConfig, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn defaults_apply() {
        let config = parse(r#"{"network_interfaces": ["eth0"]}"#).unwrap();
        assert_eq!(config.version, MmdsVersion::V1);
        assert_eq!(config.ipv4_address, DEFAULT_IPV4_ADDRESS);
        assert!(!config.imds_compat);
        assert_eq!(config.network_interfaces, vec!["eth0".to_string()]);
    }

    #[test]
    fn all_fields() {
        let config = parse(
            r#"{"network_interfaces": [], "version": "V2",
                "ipv4_address": "169.254.170.2", "imds_compat": true}"#,
        )
        .unwrap();
        assert_eq!(config.version, MmdsVersion::V2);
        assert_eq!(config.ipv4_address, Ipv4Addr::new(169, 254, 170, 2));
        assert!(config.imds_compat);
        let round_trip: MmdsConfig =
            serde_json::from_str(&serde_json::to_string(&config).unwrap()).unwrap();
        assert_eq!(round_trip, config);
    }

    #[test]
    fn network_interfaces_required() {
        assert!(parse(r#"{"version": "V1"}"#).is_err());
    }

    #[test]
    fn unknown_fields_and_versions_refused() {
        assert!(parse(r#"{"network_interfaces": [], "foo": 1}"#).is_err());
        assert!(parse(r#"{"network_interfaces": [], "version": "V3"}"#).is_err());
        assert!(parse(r#"{"network_interfaces": [], "version": "v2"}"#).is_err());
    }

    #[test]
    fn address_range() {
        for ok in ["169.254.1.0", "169.254.254.255", "169.254.169.254"] {
            let json = format!(r#"{{"network_interfaces": [], "ipv4_address": "{ok}"}}"#);
            assert!(parse(&json).is_ok(), "{ok}");
        }
        for bad in [
            "169.254.0.1",
            "169.254.255.1",
            "10.0.0.1",
            "169.255.1.1",
            "169.254.1",
            "not an ip",
        ] {
            let json = format!(r#"{{"network_interfaces": [], "ipv4_address": "{bad}"}}"#);
            assert!(parse(&json).is_err(), "{bad}");
        }
        let err = parse(r#"{"network_interfaces": [], "ipv4_address": "169.254.0.9"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("link-local"), "{err}");
    }

    #[test]
    fn validate_in_code() {
        let mut config = MmdsConfig::default();
        assert!(config.validate().is_ok());
        config.ipv4_address = Ipv4Addr::new(192, 168, 0, 1);
        assert_eq!(
            config.validate(),
            Err(ConfigError::NotLinkLocal(Ipv4Addr::new(192, 168, 0, 1)))
        );
    }
}
