//! Maps a request's method, path and body to a typed [`VmmAction`], validating the body
//! against the endpoint's type. Nothing here touches VM state.

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::config::drive::valid_id;
use crate::config::{
    BootSourceConfig, DriveConfig, LoggerConfig, MachineConfig, MetricsConfig, NetConfig,
    VfioConfig,
};
use crate::snapshot::{CreateSnapshotParams, LoadSnapshotParams};
use crate::vmm::action::{DriveUpdate, NetUpdate, SnapshotCreate, VmmAction};
use crate::vmm::resources::MachineConfigUpdate;

/// Every (method, path) the server answers, with `{id}` for a path parameter. The OpenAPI
/// description in docs/api.yaml is checked against this list.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/version"),
    ("PUT", "/boot-source"),
    ("GET", "/machine-config"),
    ("PUT", "/machine-config"),
    ("PATCH", "/machine-config"),
    ("PUT", "/drives/{drive_id}"),
    ("PATCH", "/drives/{drive_id}"),
    ("PUT", "/network-interfaces/{iface_id}"),
    ("PATCH", "/network-interfaces/{iface_id}"),
    ("PUT", "/vfio/{id}"),
    ("PUT", "/actions"),
    ("PATCH", "/vm"),
    ("GET", "/vm/config"),
    ("PUT", "/logger"),
    ("PUT", "/metrics"),
    ("GET", "/metrics/prometheus"),
    ("PUT", "/snapshot/create"),
    ("PUT", "/snapshot/load"),
    ("PUT", "/mmds"),
    ("PATCH", "/mmds"),
    ("GET", "/mmds"),
    ("PUT", "/mmds/config"),
    ("PUT", "/entropy"),
    ("PUT", "/vsock"),
];

/// Firecracker resources ember does not have; requests for them get a plain "not supported".
pub const UNSUPPORTED: &[&str] = &["balloon", "cpu-config", "pmem", "serial", "hotplug"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("invalid request method and/or path: {0} {1}")]
    NotFound(String, String),
    #[error("HTTP method {0} is not supported")]
    Method(String),
    #[error("{0} is not supported by ember yet")]
    Unsupported(String),
    #[error("invalid body for {endpoint}: {reason}")]
    Body { endpoint: String, reason: String },
    #[error("the id in the path ({path:?}) differs from the id in the body ({body:?})")]
    IdMismatch { path: String, body: String },
    #[error("invalid id {0:?} in the path: use 1-64 characters from [A-Za-z0-9_]")]
    InvalidId(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action_type: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmStateBody {
    state: String,
}

fn body<T: DeserializeOwned>(endpoint: &str, bytes: &[u8]) -> Result<T, RouteError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(RouteError::Body {
            endpoint: endpoint.into(),
            reason: "the request has no body".into(),
        });
    }
    // Derived deserializers also take a struct as a JSON array of its fields in order
    // (`[1, 2]` as a machine-config): the API documents objects, so only objects pass.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(RouteError::Body {
            endpoint: endpoint.into(),
            reason: "the body must be a JSON object".into(),
        });
    }
    serde_json::from_slice(bytes).map_err(|e| RouteError::Body {
        endpoint: endpoint.into(),
        reason: e.to_string(),
    })
}

fn path_id(id: &str) -> Result<&str, RouteError> {
    if valid_id(id) {
        Ok(id)
    } else {
        Err(RouteError::InvalidId(id.into()))
    }
}

/// The body of a request on `/<resource>/{id}`: the path id must be valid and equal the
/// id the body carries (read by `id_of`).
fn body_for_id<T: DeserializeOwned>(
    endpoint: &str,
    path: &str,
    bytes: &[u8],
    id_of: impl Fn(&T) -> &String,
) -> Result<T, RouteError> {
    let path = path_id(path)?;
    let value: T = body(endpoint, bytes)?;
    if id_of(&value) != path {
        return Err(RouteError::IdMismatch {
            path: path.into(),
            body: id_of(&value).clone(),
        });
    }
    Ok(value)
}

/// Routes one request.
pub fn route(method: &str, target: &str, bytes: &[u8]) -> Result<VmmAction, RouteError> {
    // The API takes no query parameters; ignore any rather than mis-route.
    let path = target.split('?').next().unwrap_or(target);
    let trimmed = path.trim_end_matches('/');
    let segments: Vec<&str> = trimmed.split('/').skip(1).collect();
    let not_found = || RouteError::NotFound(method.into(), path.into());
    if !matches!(method, "GET" | "PUT" | "PATCH") {
        return Err(RouteError::Method(method.into()));
    }
    if let Some(first) = segments.first()
        && UNSUPPORTED.contains(first)
    {
        return Err(RouteError::Unsupported(format!("the /{first} resource")));
    }
    let endpoint = format!("{method} {path}");
    use VmmAction::*;
    Ok(match (method, segments.as_slice()) {
        ("GET", []) => GetInstanceInfo,
        ("GET", ["version"]) => GetVersion,
        ("PUT", ["boot-source"]) => PutBootSource(body::<BootSourceConfig>(&endpoint, bytes)?),
        ("GET", ["machine-config"]) => GetMachineConfig,
        ("PUT", ["machine-config"]) => PutMachineConfig(body::<MachineConfig>(&endpoint, bytes)?),
        ("PATCH", ["machine-config"]) => {
            PatchMachineConfig(body::<MachineConfigUpdate>(&endpoint, bytes)?)
        }
        ("PUT", ["drives", id]) => {
            PutDrive(body_for_id(&endpoint, id, bytes, |d: &DriveConfig| {
                &d.drive_id
            })?)
        }
        ("PATCH", ["drives", id]) => {
            PatchDrive(body_for_id(&endpoint, id, bytes, |d: &DriveUpdate| {
                &d.drive_id
            })?)
        }
        ("PUT", ["network-interfaces", id]) => {
            PutNetworkInterface(body_for_id(&endpoint, id, bytes, |n: &NetConfig| {
                &n.iface_id
            })?)
        }
        ("PATCH", ["network-interfaces", id]) => {
            PatchNetworkInterface(body_for_id(&endpoint, id, bytes, |n: &NetUpdate| {
                &n.iface_id
            })?)
        }
        // `PUT /vfio/` with an empty id, as Firecracker answers it.
        ("PUT", ["vfio"]) => {
            return Err(RouteError::Body {
                endpoint,
                reason: crate::config::VfioConfigError::EmptyId.to_string(),
            });
        }
        ("PUT", ["vfio", id]) => {
            PutVfioDevice(body_for_id(&endpoint, id, bytes, |d: &VfioConfig| &d.id)?)
        }
        ("PUT", ["actions"]) => {
            let a: ActionBody = body(&endpoint, bytes)?;
            match a.action_type.as_str() {
                "InstanceStart" => InstanceStart,
                "SendCtrlAltDel" => SendCtrlAltDel,
                "FlushMetrics" => FlushMetrics,
                other => {
                    return Err(RouteError::Body {
                        endpoint,
                        reason: format!(
                            "unknown action_type {other:?}; expected InstanceStart, SendCtrlAltDel or FlushMetrics"
                        ),
                    });
                }
            }
        }
        ("PATCH", ["vm"]) => {
            let v: VmStateBody = body(&endpoint, bytes)?;
            match v.state.as_str() {
                "Paused" => Pause,
                "Resumed" => Resume,
                other => {
                    return Err(RouteError::Body {
                        endpoint,
                        reason: format!("unknown state {other:?}; expected Paused or Resumed"),
                    });
                }
            }
        }
        ("GET", ["vm", "config"]) => GetVmConfig,
        ("PUT", ["logger"]) => PutLogger(body::<LoggerConfig>(&endpoint, bytes)?),
        ("PUT", ["metrics"]) => PutMetrics(body::<MetricsConfig>(&endpoint, bytes)?),
        ("GET", ["metrics", "prometheus"]) => GetPrometheusMetrics,
        ("PUT", ["snapshot", "create"]) => CreateSnapshot(SnapshotCreate {
            params: body::<CreateSnapshotParams>(&endpoint, bytes)?,
            files: None,
        }),
        ("PUT", ["snapshot", "load"]) => {
            let params: LoadSnapshotParams = body(&endpoint, bytes)?;
            // Exactly one memory source, as Firecracker insists, refused before the VMM
            // is asked.
            params.memory_source().map_err(|e| RouteError::Body {
                endpoint: endpoint.clone(),
                reason: e.to_string(),
            })?;
            LoadSnapshot(params)
        }
        ("PUT", ["mmds"]) => PutMmds(body::<serde_json::Value>(&endpoint, bytes)?),
        ("PATCH", ["mmds"]) => PatchMmds(body::<serde_json::Value>(&endpoint, bytes)?),
        ("GET", ["mmds"]) => GetMmds,
        ("PUT", ["mmds", "config"]) => PutMmdsConfig(body(&endpoint, bytes)?),
        ("PUT", ["entropy"]) => PutEntropy(body(&endpoint, bytes)?),
        ("PUT", ["vsock"]) => PutVsock(body(&endpoint, bytes)?),
        _ => return Err(not_found()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(method: &str, path: &str, body: &str) -> VmmAction {
        route(method, path, body.as_bytes()).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    fn err(method: &str, path: &str, body: &str) -> String {
        route(method, path, body.as_bytes())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn only_json_objects_are_bodies() {
        for body in ["[1, 2]", " [2,64]", "2", "\"x\"", "null", "true"] {
            let e = err("PUT", "/machine-config", body);
            assert!(e.contains("must be a JSON object"), "{body}: {e}");
        }
        assert!(err("PATCH", "/vm", r#"["Paused"]"#).contains("JSON object"));
        assert!(matches!(
            ok(
                "PUT",
                "/machine-config",
                " \n{\"vcpu_count\":2,\"mem_size_mib\":64}"
            ),
            VmmAction::PutMachineConfig(_)
        ));
    }

    #[test]
    fn every_route_reaches_its_action() {
        assert_eq!(ok("GET", "/", ""), VmmAction::GetInstanceInfo);
        match ok(
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_path":"/s","mem_file_path":"/m","snapshot_type":"Diff"}"#,
        ) {
            VmmAction::CreateSnapshot(c) => {
                assert_eq!(c.params.snapshot_type, crate::snapshot::SnapshotType::Diff);
                assert_eq!(c.params.mem_file_path, "/m");
                assert!(
                    c.files.is_none(),
                    "the API thread opens them, not the router"
                );
            }
            other => panic!("{other:?}"),
        }
        match ok(
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path":"/s","mem_backend":{"backend_type":"Uffd","backend_path":"/u"},"enable_diff_snapshots":true,"resume_vm":true,"network_overrides":[{"iface_id":"eth0","host_dev_name":"tap1"}]}"#,
        ) {
            VmmAction::LoadSnapshot(l) => {
                assert_eq!(
                    l.memory_source().unwrap(),
                    (crate::snapshot::MemBackendType::Uffd, "/u")
                );
                assert!(l.tracks_dirty_pages() && l.resume_vm);
                assert_eq!(l.network_overrides[0].host_dev_name, "tap1");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(ok("GET", "/version", ""), VmmAction::GetVersion);
        assert!(matches!(
            ok("PUT", "/boot-source", r#"{"kernel_image_path":"/k"}"#),
            VmmAction::PutBootSource(_)
        ));
        assert!(matches!(
            ok(
                "PUT",
                "/machine-config",
                r#"{"vcpu_count":1,"mem_size_mib":64}"#
            ),
            VmmAction::PutMachineConfig(_)
        ));
        assert!(matches!(
            ok("PATCH", "/machine-config", r#"{"mem_size_mib":64}"#),
            VmmAction::PatchMachineConfig(_)
        ));
        assert!(matches!(
            ok(
                "PUT",
                "/drives/root",
                r#"{"drive_id":"root","is_root_device":true,"path_on_host":"/x"}"#
            ),
            VmmAction::PutDrive(_)
        ));
        assert!(matches!(
            ok(
                "PATCH",
                "/drives/root",
                r#"{"drive_id":"root","path_on_host":"/y"}"#
            ),
            VmmAction::PatchDrive(_)
        ));
        assert!(matches!(
            ok(
                "PUT",
                "/network-interfaces/eth0",
                r#"{"iface_id":"eth0","host_dev_name":"tap0"}"#
            ),
            VmmAction::PutNetworkInterface(_)
        ));
        assert!(matches!(
            ok(
                "PATCH",
                "/network-interfaces/eth0",
                r#"{"iface_id":"eth0"}"#
            ),
            VmmAction::PatchNetworkInterface(_)
        ));
        assert_eq!(
            ok("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#),
            VmmAction::InstanceStart
        );
        assert_eq!(
            ok("PUT", "/actions", r#"{"action_type":"SendCtrlAltDel"}"#),
            VmmAction::SendCtrlAltDel
        );
        assert_eq!(
            ok("PUT", "/actions", r#"{"action_type":"FlushMetrics"}"#),
            VmmAction::FlushMetrics
        );
        assert_eq!(
            ok("PATCH", "/vm", r#"{"state":"Paused"}"#),
            VmmAction::Pause
        );
        assert_eq!(
            ok("PATCH", "/vm", r#"{"state":"Resumed"}"#),
            VmmAction::Resume
        );
        assert_eq!(ok("GET", "/vm/config", ""), VmmAction::GetVmConfig);
        assert!(matches!(
            ok("PUT", "/logger", r#"{"level":"Debug"}"#),
            VmmAction::PutLogger(_)
        ));
        assert!(matches!(
            ok("PUT", "/metrics", r#"{"metrics_path":"/m"}"#),
            VmmAction::PutMetrics(_)
        ));
        assert_eq!(
            ok("GET", "/metrics/prometheus", ""),
            VmmAction::GetPrometheusMetrics
        );
        assert_eq!(
            ok("GET", "/machine-config/", ""),
            VmmAction::GetMachineConfig,
            "trailing slash"
        );
    }

    #[test]
    fn bad_requests_named() {
        assert_eq!(
            err("GET", "/nope", ""),
            "invalid request method and/or path: GET /nope"
        );
        assert_eq!(err("POST", "/", ""), "HTTP method POST is not supported");
        assert_eq!(
            err("DELETE", "/drives/a", ""),
            "HTTP method DELETE is not supported"
        );
        assert_eq!(
            err("PUT", "/version", "{}"),
            "invalid request method and/or path: PUT /version"
        );
        assert!(err("PUT", "/balloon", "{}").contains("/balloon resource is not supported"));
        assert!(err("GET", "/balloon", "").contains("not supported"));
        assert_eq!(
            err("GET", "/snapshot/create", ""),
            "invalid request method and/or path: GET /snapshot/create"
        );
        // Exactly one memory source, refused before the VMM is asked.
        let both = r#"{"snapshot_path":"/s","mem_file_path":"/m","mem_backend":{"backend_type":"File","backend_path":"/m"}}"#;
        assert!(err("PUT", "/snapshot/load", both).contains("not both"));
        assert!(err("PUT", "/snapshot/load", r#"{"snapshot_path":"/s"}"#).contains("required"));
        assert!(
            err(
                "PUT",
                "/snapshot/create",
                r#"{"snapshot_path":"/s","mem_file_path":"/m","snapshot_type":"Half"}"#
            )
            .contains("unknown variant `Half`")
        );
        assert!(err("PUT", "/boot-source", "").contains("has no body"));
        assert!(err("PUT", "/boot-source", "{").contains("EOF while parsing"));
        assert!(err("PUT", "/boot-source", r#"{"kernel_image_path":1}"#).contains("invalid type"));
        assert!(
            err("PUT", "/boot-source", r#"{"kernel_image_path":"/k","x":1}"#)
                .contains("unknown field `x`")
        );
        assert!(
            err("PUT", "/machine-config", r#"{"vcpu_count":1}"#)
                .contains("missing field `mem_size_mib`")
        );
        assert!(
            err(
                "PUT",
                "/drives/a",
                r#"{"drive_id":"b","is_root_device":false,"path_on_host":"/x"}"#
            )
            .contains("differs from the id in the body")
        );
        assert!(
            err(
                "PUT",
                "/drives/a-b",
                r#"{"drive_id":"a-b","is_root_device":false}"#
            )
            .contains("invalid id")
        );
        assert!(
            err("PUT", "/actions", r#"{"action_type":"Reboot"}"#).contains("unknown action_type")
        );
        assert!(err("PATCH", "/vm", r#"{"state":"Stopped"}"#).contains("unknown state"));
    }
}
