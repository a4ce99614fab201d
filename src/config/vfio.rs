//! `vfio`: host PCI functions bound to `vfio-pci` and passed through to the guest. The
//! shape is the one Firecracker's API gives its passthrough devices, `{"id", "sbdf"}`,
//! so clients written for it work unchanged; docs/vfio.md is the operator's guide.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One entry of `vfio` / the `PUT /vfio/{id}` body.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VfioConfig {
    pub id: String,
    /// The host function: `segment:bus:device.function` (`0000:01:02.3`), or without the
    /// segment (`01:02.3`) for segment 0.
    pub sbdf: Sbdf,
}

/// A host PCI function's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Sbdf {
    pub segment: u16,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VfioConfigError {
    #[error("The ID cannot be empty.")]
    EmptyId,
    #[error("VFIO device id {0:?} is not valid: use 1-64 characters from [A-Za-z0-9_]")]
    InvalidId(String),
    #[error("VFIO device id {0:?} appears twice")]
    Duplicate(String),
    #[error("PCI function {sbdf} is given to both {first:?} and {second:?}")]
    DuplicateSbdf {
        sbdf: Sbdf,
        first: String,
        second: String,
    },
    #[error(
        "{0:?} is not a PCI address: use segment:bus:device.function in hex, as lspci -D \
         prints it (0000:01:00.0), or bus:device.function (01:00.0)"
    )]
    InvalidSbdf(String),
}

impl fmt::Display for Sbdf {
    /// The form sysfs names the function by (`/sys/bus/pci/devices/0000:01:02.3`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.segment, self.bus, self.device, self.function
        )
    }
}

impl std::str::FromStr for Sbdf {
    type Err = VfioConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || VfioConfigError::InvalidSbdf(s.to_owned());
        let (address, function) = s.rsplit_once('.').ok_or_else(bad)?;
        let parts: Vec<&str> = address.split(':').collect();
        let (segment, bus, device) = match parts.as_slice() {
            [segment, bus, device] => (*segment, *bus, *device),
            [bus, device] => ("0", *bus, *device),
            _ => return Err(bad()),
        };
        let hex = |text: &str, max_digits: usize| {
            (!text.is_empty()
                && text.len() <= max_digits
                && text.chars().all(|c| c.is_ascii_hexdigit()))
            .then(|| u32::from_str_radix(text, 16).ok())
            .flatten()
            .ok_or_else(bad)
        };
        let segment = hex(segment, 4)?;
        let bus = hex(bus, 2)?;
        let device = hex(device, 2)?;
        let function = hex(function, 2)?;
        if device > 0x1f || function > 7 {
            return Err(bad());
        }
        Ok(Sbdf {
            segment: segment as u16,
            bus: bus as u8,
            device: device as u8,
            function: function as u8,
        })
    }
}

impl Serialize for Sbdf {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Sbdf {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl VfioConfig {
    pub fn validate(&self) -> Result<(), VfioConfigError> {
        if self.id.is_empty() {
            return Err(VfioConfigError::EmptyId);
        }
        if !super::drive::valid_id(&self.id) {
            return Err(VfioConfigError::InvalidId(self.id.clone()));
        }
        Ok(())
    }
}

/// Every entry valid, no id twice, no host function under two ids.
pub fn validate_devices(devices: &[VfioConfig]) -> Result<(), VfioConfigError> {
    for (i, d) in devices.iter().enumerate() {
        d.validate()?;
        for earlier in &devices[..i] {
            if earlier.id == d.id {
                return Err(VfioConfigError::Duplicate(d.id.clone()));
            }
            if earlier.sbdf == d.sbdf {
                return Err(VfioConfigError::DuplicateSbdf {
                    sbdf: d.sbdf,
                    first: earlier.id.clone(),
                    second: d.id.clone(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sbdf(s: &str) -> Result<Sbdf, VfioConfigError> {
        s.parse()
    }

    #[test]
    fn addresses_parse_in_the_long_and_short_forms() {
        let long = sbdf("0000:01:02.3").unwrap();
        assert_eq!(
            long,
            Sbdf {
                segment: 0,
                bus: 1,
                device: 2,
                function: 3
            }
        );
        assert_eq!(sbdf("01:02.3").unwrap(), long);
        // Two-digit functions as some clients write them.
        assert_eq!(sbdf("0000:01:02.03").unwrap(), long);
        assert_eq!(
            sbdf("abcd:ff:1f.7").unwrap().to_string(),
            "abcd:ff:1f.7",
            "hex, either case, printed as sysfs names it"
        );
        assert_eq!(sbdf("ABCD:FF:1F.7").unwrap().to_string(), "abcd:ff:1f.7");
    }

    #[test]
    fn malformed_addresses_are_refused() {
        for bad in [
            "",
            "01:02",
            "1:2:3:4.0",
            "0000:01:20.0",
            "0000:01:02.8",
            "0000:100:02.0",
            "00000:01:02.0",
            "0000:01:02.x",
            "0000::02.0",
            "0000:01:02.",
            "0000:01:-2.0",
            "0000:01:+2.0",
        ] {
            assert_eq!(
                sbdf(bad),
                Err(VfioConfigError::InvalidSbdf(bad.to_owned())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_body_is_id_and_sbdf_and_nothing_else() {
        let c: VfioConfig = serde_json::from_str(r#"{"id":"nic0","sbdf":"01:00.0"}"#).unwrap();
        assert_eq!(c.sbdf.to_string(), "0000:01:00.0");
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"id":"nic0","sbdf":"0000:01:00.0"}"#
        );
        let e = serde_json::from_str::<VfioConfig>(r#"{"id":"a","sbdf":"01:00.0","x":1}"#);
        assert!(e.unwrap_err().to_string().contains("unknown field"));
        let e = serde_json::from_str::<VfioConfig>(r#"{"id":"a","sbdf":"nope"}"#);
        assert!(e.unwrap_err().to_string().contains("not a PCI address"));
    }

    #[test]
    fn ids_and_functions_are_unique() {
        let dev = |id: &str, s: &str| VfioConfig {
            id: id.to_owned(),
            sbdf: sbdf(s).unwrap(),
        };
        assert_eq!(dev("", "01:00.0").validate(), Err(VfioConfigError::EmptyId));
        assert!(matches!(
            dev("a b", "01:00.0").validate(),
            Err(VfioConfigError::InvalidId(_))
        ));
        assert_eq!(
            validate_devices(&[dev("a", "01:00.0"), dev("b", "01:00.1")]),
            Ok(())
        );
        assert_eq!(
            validate_devices(&[dev("a", "01:00.0"), dev("a", "01:00.1")]),
            Err(VfioConfigError::Duplicate("a".to_owned()))
        );
        let e = validate_devices(&[dev("a", "0000:01:00.0"), dev("b", "01:00.0")]).unwrap_err();
        assert!(e.to_string().contains("0000:01:00.0"), "{e}");
        assert!(matches!(e, VfioConfigError::DuplicateSbdf { .. }));
    }
}
