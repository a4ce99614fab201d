//! `network-interfaces`: virtio-net devices. Validated and stored now; the net device
//! consumes them.

use serde::{Deserialize, Serialize};

use super::drive::valid_id;
use super::rate_limiter::{RateLimiterConfig, RateLimiterError};

/// One entry of `network-interfaces` / the `PUT /network-interfaces/{id}` body.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    pub iface_id: String,
    pub host_dev_name: String,
    /// Stored lowercased: the guest, `GET /vm/config` and snapshots all show one spelling.
    #[serde(
        default,
        deserialize_with = "lowercase",
        skip_serializing_if = "Option::is_none"
    )]
    pub guest_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

fn lowercase<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let mac: Option<String> = serde::Deserialize::deserialize(d)?;
    Ok(mac.map(|m| m.to_ascii_lowercase()))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetError {
    #[error("iface_id {0:?} is not valid: use 1-64 characters from [A-Za-z0-9_]")]
    InvalidId(String),
    #[error("network interface {0:?}: host_dev_name must be 1-15 bytes without '/' or spaces")]
    InvalidTapName(String),
    #[error("network interface {0:?}: guest_mac {1:?} is not a MAC address like 06:00:ac:10:00:02")]
    InvalidMac(String, String),
    #[error("network interface {0:?}: mtu {1} is outside 68..=65535")]
    InvalidMtu(String, u16),
    #[error("network interface {0:?}: {1}: {2}")]
    RateLimiter(String, &'static str, RateLimiterError),
    #[error("iface_id {0:?} appears twice")]
    Duplicate(String),
    #[error("host_dev_name {0:?} is used by two interfaces")]
    DuplicateTap(String),
    #[error("guest_mac {0} is used by two interfaces")]
    DuplicateMac(String),
}

/// Parses `aa:bb:cc:dd:ee:ff` (hex, either case).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl NetConfig {
    pub fn validate(&self) -> Result<(), NetError> {
        let id = || self.iface_id.clone();
        if !valid_id(&self.iface_id) {
            return Err(NetError::InvalidId(id()));
        }
        // IFNAMSIZ is 16 including the NUL.
        let name = &self.host_dev_name;
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
            return Err(NetError::InvalidTapName(id()));
        }
        if let Some(mac) = &self.guest_mac
            && parse_mac(mac).is_none()
        {
            return Err(NetError::InvalidMac(id(), mac.clone()));
        }
        if let Some(mtu) = self.mtu
            && mtu < 68
        {
            return Err(NetError::InvalidMtu(id(), mtu));
        }
        for (name, rl) in [
            ("rx_rate_limiter", &self.rx_rate_limiter),
            ("tx_rate_limiter", &self.tx_rate_limiter),
        ] {
            if let Some(rl) = rl {
                rl.validate()
                    .map_err(|e| NetError::RateLimiter(id(), name, e))?;
            }
        }
        Ok(())
    }
}

pub fn validate_interfaces(ifaces: &[NetConfig]) -> Result<(), NetError> {
    for (i, n) in ifaces.iter().enumerate() {
        n.validate()?;
        if ifaces[..i].iter().any(|o| o.iface_id == n.iface_id) {
            return Err(NetError::Duplicate(n.iface_id.clone()));
        }
        if ifaces[..i]
            .iter()
            .any(|o| o.host_dev_name == n.host_dev_name)
        {
            return Err(NetError::DuplicateTap(n.host_dev_name.clone()));
        }
        // Two NICs with one address would confuse every switch and ARP cache they meet.
        if let Some(mac) = n.guest_mac.as_deref().and_then(parse_mac)
            && ifaces[..i]
                .iter()
                .any(|o| o.guest_mac.as_deref().and_then(parse_mac) == Some(mac))
        {
            return Err(NetError::DuplicateMac(
                n.guest_mac.clone().unwrap_or_default(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(id: &str, tap: &str, mac: Option<&str>) -> NetConfig {
        NetConfig {
            iface_id: id.into(),
            host_dev_name: tap.into(),
            guest_mac: mac.map(Into::into),
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        }
    }

    #[test]
    fn guest_mac_stored_lowercase() {
        let n: NetConfig = serde_json::from_str(
            r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"AA:Bb:0C:00:00:01"}"#,
        )
        .unwrap();
        assert_eq!(n.guest_mac.as_deref(), Some("aa:bb:0c:00:00:01"));
        let shown = serde_json::to_value(&n).unwrap();
        assert_eq!(shown["guest_mac"], "aa:bb:0c:00:00:01");
        let none: NetConfig =
            serde_json::from_str(r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":null}"#)
                .unwrap();
        assert_eq!(none.guest_mac, None);
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("06:00:AC:10:00:02"),
            Some([6, 0, 0xac, 0x10, 0, 2])
        );
        for bad in [
            "06:00:ac:10:00",
            "06:00:ac:10:00:02:03",
            "6:00:ac:10:00:02",
            "zz:00:ac:10:00:02",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn interface_rules() {
        assert_eq!(
            iface("eth0", "tap0", Some("06:00:ac:10:00:02")).validate(),
            Ok(())
        );
        assert!(matches!(
            iface("eth0", "tap0", Some("x")).validate(),
            Err(NetError::InvalidMac(..))
        ));
        assert!(matches!(
            iface("eth0", "a/b", None).validate(),
            Err(NetError::InvalidTapName(_))
        ));
        assert!(matches!(
            iface("eth0", &"t".repeat(16), None).validate(),
            Err(NetError::InvalidTapName(_))
        ));
        assert_eq!(
            validate_interfaces(&[iface("a", "tap0", None), iface("b", "tap0", None)]),
            Err(NetError::DuplicateTap("tap0".into()))
        );
        assert_eq!(
            validate_interfaces(&[
                iface("a", "tap0", Some("06:00:00:00:00:01")),
                iface("b", "tap1", Some("06:00:00:00:00:01")),
            ]),
            Err(NetError::DuplicateMac("06:00:00:00:00:01".into()))
        );
    }
}
