//! The PCI root complex `--enable-pci` gives the guest, as the probe finds it: MCFG, ECAM,
//! the port I/O mechanism, the host bridge (resources/probe/src/pci.rs).

mod common;

use common::*;

#[test]
fn probe_finds_the_pci_root_through_mcfg_ecam_and_ports() {
    let config = config_json(&probe_elf(), 2, 128, &probe_args(2, 128, "probe.pci=1"));
    let r = boot_config_with_flags(&config, &["--enable-pci"]);
    r.assert_probe_passed(PROBE_CHECKS + 1);
    let pci = r.line_starting("PROBE pci ok").expect("a pci line");
    assert!(pci.contains("ecam=0xe0000000"), "{pci}");
    assert!(pci.contains("functions=1"), "{pci}");
    assert!(pci.contains("class=0x60000"), "{pci}");
    let acpi = r.line_starting("PROBE acpi ok").expect("an acpi line");
    assert!(acpi.contains("tables=FACP,APIC,MCFG"), "{acpi}");
}

#[test]
fn without_enable_pci_there_is_no_pci_bus() {
    let config = config_json(&probe_elf(), 1, 128, &probe_args(1, 128, "probe.pci=1"));
    let r = boot_config(&config);
    let pci = r
        .line_starting("PROBE pci FAIL")
        .expect("a failed pci line");
    assert!(pci.contains("no MCFG in the XSDT"), "{pci}");
    let acpi = r.line_starting("PROBE acpi ok").expect("an acpi line");
    assert!(acpi.contains("tables=FACP,APIC "), "{acpi}");
}

#[test]
fn enable_pci_with_virtio_devices_says_they_stay_on_mmio() {
    let dir = Scratch::new("pci-blk");
    let disk = disk_image(&dir, "disk.img", 0, 64);
    let mut config: serde_json::Value = serde_json::from_str(&config_json(
        &probe_elf(),
        1,
        128,
        &probe_args(1, 128, "probe.pci=1"),
    ))
    .unwrap();
    config["drives"] = serde_json::json!([{
        "drive_id": "rootfs",
        "path_on_host": disk,
        "is_root_device": false,
        "is_read_only": true
    }]);
    let r = boot_config_with_flags(&config.to_string(), &["--enable-pci"]);
    assert!(
        r.stderr
            .contains("block and network devices stay on virtio-mmio"),
        "{}",
        r.stderr
    );
    assert!(r.line_starting("PROBE pci ok").is_some(), "{}", r.stdout);
}
