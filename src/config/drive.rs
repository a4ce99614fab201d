//! `drives`: virtio-blk devices. Validated and stored now; the block device consumes them.

use serde::{Deserialize, Serialize};

use super::rate_limiter::{RateLimiterConfig, RateLimiterError};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum CacheType {
    #[default]
    Unsafe,
    Writeback,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum IoEngine {
    #[default]
    Sync,
    Async,
}

/// One entry of `drives` / the `PUT /drives/{id}` body.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    pub drive_id: String,
    pub is_root_device: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    #[serde(default)]
    pub is_read_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    #[serde(default)]
    pub cache_type: CacheType,
    #[serde(default)]
    pub io_engine: IoEngine,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
    /// vhost-user-block backends are not supported; the key is recognised so the error is clear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DriveError {
    #[error("drive_id {0:?} is not valid: use 1-64 characters from [A-Za-z0-9_]")]
    InvalidId(String),
    #[error("drive {0:?}: path_on_host is required")]
    MissingPath(String),
    #[error("drive {0:?}: vhost-user-block (socket) is not supported by ember")]
    VhostUser(String),
    #[error("drive {0:?}: rate_limiter: {1}")]
    RateLimiter(String, RateLimiterError),
    #[error("drives {0:?} and {1:?} are both root devices; only one may be")]
    TwoRoots(String, String),
    #[error("drive_id {0:?} appears twice")]
    Duplicate(String),
}

/// Firecracker's rule for resource ids in paths and bodies.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl DriveConfig {
    pub fn validate(&self) -> Result<(), DriveError> {
        if !valid_id(&self.drive_id) {
            return Err(DriveError::InvalidId(self.drive_id.clone()));
        }
        if self.socket.is_some() {
            return Err(DriveError::VhostUser(self.drive_id.clone()));
        }
        if self.path_on_host.as_deref().is_none_or(str::is_empty) {
            return Err(DriveError::MissingPath(self.drive_id.clone()));
        }
        if let Some(rl) = &self.rate_limiter {
            rl.validate()
                .map_err(|e| DriveError::RateLimiter(self.drive_id.clone(), e))?;
        }
        Ok(())
    }
}

/// Checks a whole list: each drive, unique ids, at most one root device.
pub fn validate_drives(drives: &[DriveConfig]) -> Result<(), DriveError> {
    let mut root: Option<&str> = None;
    for (i, d) in drives.iter().enumerate() {
        d.validate()?;
        if drives[..i].iter().any(|other| other.drive_id == d.drive_id) {
            return Err(DriveError::Duplicate(d.drive_id.clone()));
        }
        if d.is_root_device {
            if let Some(r) = root {
                return Err(DriveError::TwoRoots(r.to_owned(), d.drive_id.clone()));
            }
            root = Some(&d.drive_id);
        }
    }
    Ok(())
}

/// A drive with defaults for everything but id and root, for unit tests.
#[cfg(test)]
pub(crate) fn test_drive(id: &str, root: bool) -> DriveConfig {
    serde_json::from_value(serde_json::json!({
        "drive_id": id, "is_root_device": root, "path_on_host": "/tmp/x"
    }))
    .expect("a valid drive body")
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::test_drive as drive;

    #[test]
    fn ids_and_roots() {
        assert_eq!(
            validate_drives(&[drive("rootfs", true), drive("data_1", false)]),
            Ok(())
        );
        assert_eq!(
            validate_drives(&[drive("a", true), drive("b", true)]),
            Err(DriveError::TwoRoots("a".into(), "b".into()))
        );
        assert_eq!(
            validate_drives(&[drive("a", false), drive("a", false)]),
            Err(DriveError::Duplicate("a".into()))
        );
        assert_eq!(
            drive("bad-id", false).validate(),
            Err(DriveError::InvalidId("bad-id".into()))
        );
    }

    #[test]
    fn path_required_and_defaults() {
        let d: DriveConfig =
            serde_json::from_str(r#"{"drive_id":"a","is_root_device":false}"#).unwrap();
        assert_eq!(d.validate(), Err(DriveError::MissingPath("a".into())));
        assert_eq!(d.cache_type, CacheType::Unsafe);
        assert_eq!(d.io_engine, IoEngine::Sync);
        assert!(serde_json::from_str::<DriveConfig>(r#"{"drive_id":"a"}"#).is_err());
    }
}
