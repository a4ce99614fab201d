//! VFIO passthrough as a user meets it on a host without a passable device: the config
//! file's and the API's rules, and the clear refusals before boot (docs/vfio.md). The
//! passthrough itself is covered against a fake device in src/devices/vfio.

mod common;

use common::api::*;
use common::*;

/// A function no host has: bus 0xff, device 0x1f, function 7.
const ABSENT: &str = "0000:ff:1f.7";

fn config_with_vfio(devices: serde_json::Value) -> String {
    let mut config: serde_json::Value =
        serde_json::from_str(&config_json(&probe_elf(), 1, 128, &probe_args(1, 128, ""))).unwrap();
    config["vfio"] = devices;
    config.to_string()
}

#[test]
fn passthrough_without_the_pci_bus_is_refused_before_boot() {
    let r = boot_config(&config_with_vfio(
        serde_json::json!([{"id": "nic0", "sbdf": ABSENT}]),
    ));
    assert_eq!(r.code(), Some(3), "{r:#?}");
    assert!(
        r.stderr.contains("VFIO device \"nic0\"") && r.stderr.contains("--enable-pci"),
        "{}",
        r.stderr
    );
    assert!(!r.stdout.contains("PROBE"), "the guest must not run");
}

#[test]
fn a_host_that_cannot_pass_the_function_says_why_before_boot() {
    let r = boot_config_with_flags(
        &config_with_vfio(serde_json::json!([{"id": "acc0", "sbdf": "ff:1f.7"}])),
        &["--enable-pci"],
    );
    assert_eq!(r.code(), Some(4), "{r:#?}");
    // Which check fails first depends on the host: without vfio-pci loaded there is no
    // container; with it, this function does not exist.
    let want = if std::path::Path::new("/dev/vfio/vfio").exists() {
        format!("there is no PCI function {ABSENT}")
    } else {
        "VFIO is not available on this host (/dev/vfio/vfio is missing)".to_owned()
    };
    assert!(
        r.stderr.contains("VFIO device \"acc0\"") && r.stderr.contains(&want),
        "want {want:?} in:\n{}",
        r.stderr
    );
    assert!(!r.stdout.contains("PROBE"), "the guest must not run");
}

#[test]
fn the_config_file_refuses_one_function_under_two_ids() {
    let r = boot_config_with_flags(
        &config_with_vfio(serde_json::json!([
            {"id": "a", "sbdf": "0000:01:00.0"},
            {"id": "b", "sbdf": "01:00.0"}
        ])),
        &["--enable-pci"],
    );
    assert_eq!(r.code(), Some(3), "{r:#?}");
    assert!(
        r.stderr
            .contains("PCI function 0000:01:00.0 is given to both \"a\" and \"b\""),
        "{}",
        r.stderr
    );
    let r = boot_config(&config_with_vfio(
        serde_json::json!([{"id": "a", "sbdf": "1:2:3"}]),
    ));
    assert_eq!(r.code(), Some(3), "{r:#?}");
    assert!(r.stderr.contains("is not a PCI address"), "{}", r.stderr);
}

#[test]
fn the_api_takes_firecracker_s_passthrough_body_before_boot_only() {
    let vm = ApiVm::start(&["--enable-pci"]);
    let mut c = vm.client();
    let r = c.call(
        "PUT",
        "/vfio/nvme0",
        Some(r#"{"id": "nvme0", "sbdf": "0000:01:02.3"}"#),
    );
    assert_eq!(r.status, 204, "{r:?}");
    // Replaced under the same id, in the short form.
    let r = c.call(
        "PUT",
        "/vfio/nvme0",
        Some(r#"{"id": "nvme0", "sbdf": "01:02.03"}"#),
    );
    assert_eq!(r.status, 204, "{r:?}");
    let r = c.call(
        "PUT",
        "/vfio/nvme1",
        Some(r#"{"id": "nvme1", "sbdf": "0000:01:02.4"}"#),
    );
    assert_eq!(r.status, 204, "{r:?}");
    c.expect_fault(
        "PUT",
        "/vfio/",
        r#"{"id": "", "sbdf": "0000:01:02.5"}"#,
        "The ID cannot be empty.",
    );
    c.expect_fault(
        "PUT",
        "/vfio/nvme2",
        r#"{"id": "nvme2", "sbdf": "0000:01:02.4"}"#,
        "is given to both \"nvme1\" and \"nvme2\"",
    );
    c.expect_fault(
        "PUT",
        "/vfio/nvme2",
        r#"{"id": "other", "sbdf": "0000:01:02.6"}"#,
        "differs from the id in the body",
    );
    c.expect_fault(
        "PUT",
        "/vfio/nvme2",
        r#"{"id": "nvme2", "sbdf": "0000:01:02.6", "bar": 1}"#,
        "unknown field",
    );
    let config = c.call("GET", "/vm/config", None).json();
    assert_eq!(
        config["vfio"],
        serde_json::json!([
            {"id": "nvme0", "sbdf": "0000:01:02.3"},
            {"id": "nvme1", "sbdf": "0000:01:02.4"}
        ])
    );
    drop(c);
    vm.terminate();

    // After InstanceStart, passthrough devices can no longer be given.
    let mut vm = ApiVm::start(&[]);
    boot_waiting_probe(&mut vm);
    let mut c = vm.client();
    c.expect_fault(
        "PUT",
        "/vfio/late",
        r#"{"id": "late", "sbdf": "0000:01:02.3"}"#,
        "PUT /vfio is only allowed before",
    );
    drop(c);
    vm.terminate();
}
