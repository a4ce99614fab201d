//! `vsock`: the virtio-vsock device and the Unix sockets its connections go through.

use serde::{Deserialize, Serialize};

/// The `PUT /vsock` body and config-file key.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id: 3 or more (0-2 are reserved for the hypervisor and the host).
    pub guest_cid: u32,
    /// The socket ember listens on for host-initiated connections; guest-initiated ones
    /// connect to `<uds_path>_<port>`.
    pub uds_path: String,
    /// Accepted and ignored, as older clients still send it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// The longest path a Unix socket address holds (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VsockConfigError {
    #[error("vsock.guest_cid must be 3 or more (0-2 are reserved), got {0}")]
    GuestCid(u32),
    #[error("vsock.uds_path must not be empty")]
    EmptyPath,
    #[error("vsock.uds_path is {0} bytes; a Unix socket path holds at most {MAX_SOCKET_PATH}")]
    PathTooLong(usize),
    #[error("vsock.uds_path must not contain a NUL byte")]
    NulInPath,
}

impl VsockConfig {
    pub fn validate(&self) -> Result<(), VsockConfigError> {
        if self.guest_cid < 3 {
            return Err(VsockConfigError::GuestCid(self.guest_cid));
        }
        if self.uds_path.is_empty() {
            return Err(VsockConfigError::EmptyPath);
        }
        if self.uds_path.len() > MAX_SOCKET_PATH {
            return Err(VsockConfigError::PathTooLong(self.uds_path.len()));
        }
        if self.uds_path.contains('\0') {
            return Err(VsockConfigError::NulInPath);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<VsockConfig, String> {
        let c: VsockConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn bodies_checked() {
        let c = parse(r#"{"guest_cid": 3, "uds_path": "/tmp/v.sock"}"#).unwrap();
        assert_eq!((c.guest_cid, c.uds_path.as_str()), (3, "/tmp/v.sock"));
        assert!(parse(r#"{"vsock_id": "1", "guest_cid": 52, "uds_path": "/v"}"#).is_ok());
        for (text, why) in [
            (r#"{"guest_cid": 2, "uds_path": "/v"}"#, "3 or more"),
            (r#"{"guest_cid": 3, "uds_path": ""}"#, "must not be empty"),
            (r#"{"guest_cid": 3}"#, "missing field `uds_path`"),
            (r#"{"guest_cid": -1, "uds_path": "/v"}"#, "invalid value"),
            (
                r#"{"guest_cid": 3, "uds_path": "/v", "x": 1}"#,
                "unknown field `x`",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
        let long = format!(r#"{{"guest_cid": 3, "uds_path": "/{}"}}"#, "a".repeat(107));
        assert!(parse(&long).unwrap_err().contains("at most 107"));
    }
}
