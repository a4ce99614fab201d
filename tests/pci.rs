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
fn with_enable_pci_a_drive_is_a_pci_function_not_a_virtio_mmio_device() {
    let dir = Scratch::new("pci-blk");
    let disk = disk_image(&dir, "disk.img", 0, 64);
    let mut config: serde_json::Value = serde_json::from_str(&config_json(
        &probe_elf(),
        1,
        128,
        &probe_args(1, 128, "probe.pci=2"),
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
        r.stderr.contains("drive \"rootfs\"")
            && r.stderr
                .contains("at PCI 0000:00:01.0, BAR 0 0x100000000, MSI-X"),
        "{}",
        r.stderr
    );
    let pci = r.line_starting("PROBE pci ok").expect("a pci line");
    assert!(pci.contains("functions=2"), "{pci}");
    // No virtio-mmio device in the DSDT and none on the command line.
    let acpi = r.line_starting("PROBE acpi ok").expect("an acpi line");
    assert!(acpi.contains("virtio=0"), "{acpi}");
    let cmdline = r.line_starting("PROBE cmdline ok").expect("a cmdline line");
    assert!(!cmdline.contains("virtio_mmio"), "{cmdline}");
}

/// The probe drives a drive as a virtio-pci function with the same checks as over MMIO:
/// it sizes and moves BAR 0 (ember must follow, notifications included), finds the virtio
/// structures through the capabilities, and takes each request's MSI-X interrupt through
/// the PBA of a masked vector, which unmasking must deliver to the local APIC.
#[test]
fn probe_drives_a_virtio_pci_disk_with_msix() {
    let dir = Scratch::new("pci-probe-blk");
    let disk = disk_image(&dir, "disk.img", 0, 64);
    let mut config: serde_json::Value = serde_json::from_str(&config_json(
        &probe_elf(),
        1,
        128,
        &probe_args(1, 128, "probe.pci=2 probe.pciblk=1 probe.blk0.id=pcidisk"),
    ))
    .unwrap();
    config["drives"] = serde_json::json!([{
        "drive_id": "pcidisk",
        "path_on_host": disk,
        "is_root_device": false,
        "is_read_only": false
    }]);
    let r = boot_config_with_flags(&config.to_string(), &["--enable-pci"]);
    // pci, virtio-pci, the block device's checks, msix.
    r.assert_probe_passed(PROBE_CHECKS + 3 + PROBE_CHECKS_PER_BLOCK_DEVICE);
    let found = r
        .line_starting("PROBE virtio-pci ok")
        .expect("a virtio-pci line");
    assert!(found.contains("00:01.0 bar=0xc0000000"), "{found}");
    let irq = r.line_starting("PROBE blk0.irq ok").expect("an irq line");
    assert!(!irq.contains("acks=0"), "{irq}");
    let msix = r.line_starting("PROBE msix ok").expect("an msix line");
    assert!(msix.contains("apic_irr=1"), "{msix}");
    // What the probe wrote through the PCI transport is in the file.
    let after = std::fs::read(&disk).unwrap();
    assert_ne!(after[512..1024], [0u8; 512], "sector 1 unchanged");
}
