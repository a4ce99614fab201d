//! Boots the probe guest on the real /dev/kvm and checks, from inside the guest, what the
//! boot protocol promises: long mode, zero page, command line, e820, memory, CPUID, MP table.

mod common;

use common::*;

/// Checks the probe runs in this build: longmode, zeropage, cmdline, e820, memory,
/// cpuid, mptable.
const CHECKS: usize = PROBE_CHECKS;

fn assert_cmdline_reached(r: &RunResult, args: &str) {
    let line = r.line_starting("PROBE cmdline ok").expect("cmdline line");
    assert!(line.ends_with(&format!("\"{args}\"")), "{line}");
}

#[test]
fn one_vcpu_128_mib() {
    let r = boot_probe(1, 128, "");
    r.assert_probe_passed(CHECKS);
    assert_cmdline_reached(&r, &probe_args(1, 128, ""));
    assert!(
        r.stdout.contains("PROBE e820 ok ram_mib=127"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("PROBE cpuid ok vcpus=1 "), "{}", r.stdout);
}

/// The in-kernel irqchip (KVM's I/O APIC, PICs and PIT) stays available beside the default
/// split one.
#[test]
fn both_irqchip_modes_boot_the_probe() {
    for irqchip in ["split", "kernel"] {
        let mut config: serde_json::Value =
            serde_json::from_str(&config_json(&probe_elf(), 2, 128, &probe_args(2, 128, "")))
                .unwrap();
        config["machine-config"]["irqchip"] = irqchip.into();
        let r = boot_config(&config.to_string());
        r.assert_probe_passed(CHECKS);
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&config_json(&probe_elf(), 1, 128, "")).unwrap();
    config["machine-config"]["irqchip"] = "pic".into();
    let r = boot_config(&config.to_string());
    assert_fails(
        &r,
        3,
        "unknown variant `pic`, expected one of `split`, `kernel`, `gicv2`, `gicv3`",
    );
    // arm64's GICs are named, and refused here with the choices this host has.
    config["machine-config"]["irqchip"] = "gicv3".into();
    let r = boot_config(&config.to_string());
    assert_fails(
        &r,
        3,
        "machine-config.irqchip \"gicv3\" is not available on x86_64: use \"split\" (the \
         default) or \"kernel\"",
    );
}

#[test]
fn four_vcpus_512_mib() {
    let r = boot_probe(4, 512, "");
    r.assert_probe_passed(CHECKS);
    assert!(r.stdout.contains("PROBE cpuid ok vcpus=4 "), "{}", r.stdout);
    assert!(
        r.stdout.contains("PROBE mptable ok cpus=4 "),
        "{}",
        r.stdout
    );
}

#[test]
fn memory_across_the_mmio_gap() {
    // 3584 MiB: 3 GiB below the gap at 0xc0000000 and 512 MiB from 4 GiB.
    for vcpus in [1, 4] {
        let r = boot_probe(vcpus, 3584, "");
        r.assert_probe_passed(CHECKS);
        assert!(
            r.stdout.contains("PROBE memory ok ranges=3 "),
            "{}",
            r.stdout
        );
        assert!(r.stdout.contains("top=0x120000000"), "{}", r.stdout);
    }
}

#[test]
fn thirty_two_vcpus_with_smt() {
    let args = probe_args(32, 256, "");
    let mut config: serde_json::Value =
        serde_json::from_str(&config_json(&probe_elf(), 32, 256, &args)).unwrap();
    config["machine-config"]["smt"] = true.into();
    let r = boot_config(&config.to_string());
    r.assert_probe_passed(CHECKS);
    assert!(
        r.stdout.contains("PROBE mptable ok cpus=32 "),
        "{}",
        r.stdout
    );
}

#[test]
fn bzimage_boots_like_vmlinux() {
    let args = probe_args(2, 256, "");
    let r = boot_config(&config_json(&probe_bzimage(), 2, 256, &args));
    r.assert_probe_passed(CHECKS);
    assert_cmdline_reached(&r, &args);
    assert!(r.stderr.contains("Linux64 boot"), "{}", r.stderr);
}

/// Boots `kernel` with an initrd of `size` bytes of 0x5a; the probe checks it from inside.
fn boot_with_initrd(kernel: &std::path::Path, mem: usize, size: usize) -> RunResult {
    let dir = Scratch::new("initrd");
    let initrd = dir.write("initrd.img", vec![0x5a; size]);
    let args = probe_args(1, mem, &format!("probe.initrd_size={size}"));
    let mut config: serde_json::Value =
        serde_json::from_str(&config_json(kernel, 1, mem, &args)).unwrap();
    config["boot-source"]["initrd_path"] = initrd.to_str().unwrap().into();
    boot_config(&config.to_string())
}

#[test]
fn initrd_loaded_below_the_gap() {
    let r = boot_with_initrd(&probe_elf(), 128, 3 << 20);
    r.assert_probe_passed(CHECKS + 1);
    // 3 MiB at the top of 128 MiB, page aligned, as the zero page tells the guest.
    assert!(
        r.stdout
            .contains("PROBE initrd ok at=0x7d00000 size=3145728"),
        "{}",
        r.stdout
    );
    let r = boot_with_initrd(&probe_bzimage(), 3584, 5000);
    r.assert_probe_passed(CHECKS + 1);
    assert!(
        r.stdout.contains("PROBE initrd ok at=0xbfffe000 size=5000"),
        "{}",
        r.stdout
    );
}

#[test]
fn pvh_entry() {
    for (vcpus, mem) in [(1, 128), (4, 3584)] {
        let args = probe_args(vcpus, mem, "");
        let r = boot_config(&config_json(&probe_pvh_elf(), vcpus, mem, &args));
        r.assert_probe_passed(CHECKS);
        assert!(r.stderr.contains("(Pvh boot)"), "{}", r.stderr);
        assert!(
            r.stdout.contains("PROBE pvh ok at=0x6000 version=1"),
            "{}",
            r.stdout
        );
        assert_cmdline_reached(&r, &args);
    }
    // The initrd reaches a PVH guest as module 0 of the start info.
    let r = boot_with_initrd(&probe_pvh_elf(), 256, 3 << 20);
    r.assert_probe_passed(CHECKS + 1);
    assert!(
        r.stdout
            .contains("PROBE initrd ok at=0xfd00000 size=3145728"),
        "{}",
        r.stdout
    );
}

#[test]
fn triple_fault_is_a_failure() {
    let r = boot_probe(2, 128, "probe.fault=triple");
    assert!(r.stdout.contains("PROBE FAULT triple"), "{}", r.stdout);
    assert_eq!(r.code(), Some(5), "{r:#?}");
    assert!(
        r.stderr
            .contains("triple fault (KVM_EXIT_SHUTDOWN) at rip=0x"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("vCPU 0"), "{}", r.stderr);
}

#[test]
fn quick_start_example_boots() {
    // The README's first command, run from the repository root.
    let root = env!("CARGO_MANIFEST_DIR");
    let child = ember_command(&["--no-api", "--config-file", "resources/examples/hello.json"])
        .current_dir(root)
        .spawn()
        .expect("spawn ember");
    let r = wait_with_deadline(child, RUN_DEADLINE);
    r.assert_probe_passed(CHECKS);
}

#[test]
fn string_port_io_reaches_the_uart_byte_for_byte() {
    // `rep outsb` hands the VMM one exit with many bytes for one port; each is a write.
    let r = boot_probe(1, 128, "probe.serial=rep");
    r.assert_probe_passed(PROBE_CHECKS);
    assert!(
        r.stdout
            .contains("PROBE serial.rep written with rep outsb, every byte of it\n"),
        "{}",
        r.stdout
    );
}
