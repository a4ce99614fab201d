//! ember on arm64, proven with real Linux: Debian's arm64 kernel under ember's arm64 build
//! inside an emulated arm64 host (tests/common/arm64.rs), once with a GICv3 and once with a
//! GICv2 (the Raspberry Pi 4 case), each with one and two vCPUs, the serial console both
//! ways, the RTC, an ext4 root on virtio-blk written in one boot and read in the next,
//! virtio-net on a TAP device, and power-off and reboot ending ember with 0; and ember's
//! unit tests on arm64 KVM.

mod common;

use common::arm64::{self, output_of};
use common::cannot_run;

/// What every guest reports, then it waits for a command typed on its console.
const REPORT: &str = r#"
irqs() {
    grep "$1" /proc/interrupts | head -1 |
        awk '{ s = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i; print s }'
}
echo "EMBER-TEST cpus=$(grep -c ^processor /proc/cpuinfo) online=$(cat /sys/devices/system/cpu/online)"
echo "EMBER-TEST timer $(grep arch_timer /proc/interrupts | head -1 | tr -s ' ')"
echo "EMBER-TEST uart $(grep ttyS0 /proc/interrupts | tr -s ' ')"
echo "EMBER-TEST rtc name=$(cat /sys/class/rtc/rtc0/name 2>/dev/null) year=$(date +%Y)"
echo "EMBER-TEST serial before=$(irqs ttyS0)"
echo "EMBER-TEST type a command"
read -r cmd < /dev/console
eval "$cmd"
echo "EMBER-TEST serial after=$(irqs ttyS0)"
"#;

/// The typed command and what it prints.
const TYPED: &str = "echo EMBER-TEST typed-$((6*7))";
const TYPED_OUT: &str = "EMBER-TEST typed-42";

fn config(
    images: &arm64::Arm64Images,
    initrd: &std::path::Path,
    vcpus: u8,
    irqchip: Option<&str>,
    args: &str,
) -> serde_json::Value {
    let mut c = serde_json::json!({
        "boot-source": {
            "kernel_image_path": images.image,
            "initrd_path": initrd,
            "boot_args": args,
        },
        "machine-config": {"vcpu_count": vcpus, "mem_size_mib": 256},
    });
    if let Some(chip) = irqchip {
        c["machine-config"]["irqchip"] = chip.into();
    }
    c
}

/// Writes `config` as `dir/name.json` and returns the path.
fn write(dir: &std::path::Path, name: &str, config: &serde_json::Value) -> String {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, config.to_string()).unwrap();
    path.display().to_string()
}

/// The ember binary and images, or None (with the reason said) where they cannot be had.
fn prerequisites() -> Option<(std::path::PathBuf, arm64::Arm64Images)> {
    let ember = match arm64::ember() {
        Ok(e) => e,
        Err(e) => {
            cannot_run(&e);
            return None;
        }
    };
    match arm64::images() {
        Ok(i) => Some((ember, i)),
        Err(e) => {
            cannot_run(&e);
            None
        }
    }
}

/// The lines of one run, checked to have ended with ember's exit code 0 and the typed
/// command answered over the serial console.
fn assert_run_ok(console: &str, name: &str) -> String {
    let all = output_of(console, name);
    assert!(
        all.contains("ember-exit=0"),
        "run {name} did not end with 0:\n{all}"
    );
    all
}

/// The interrupt chip the guest's timer interrupt is on, as /proc/interrupts names it
/// ("GICv3", or "GIC-0" for a GICv2).
fn timer_chip(all: &str) -> String {
    let line = all
        .lines()
        .find(|l| l.starts_with("EMBER-TEST timer"))
        .unwrap_or_else(|| panic!("no timer line in:\n{all}"));
    line.split_whitespace()
        .find(|w| w.starts_with("GIC"))
        .unwrap_or_else(|| panic!("no GIC in {line:?}"))
        .to_owned()
}

/// The guest's serial console worked both ways: the command was typed and answered, and
/// the UART's interrupt count rose with the traffic.
fn assert_serial_both_ways(all: &str) {
    assert!(all.contains(TYPED_OUT), "{all}");
    let count = |key: &str| -> u64 {
        all.lines()
            .find_map(|l| l.split(key).nth(1))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in:\n{all}"))
    };
    assert!(
        count("EMBER-TEST serial after=") > count("EMBER-TEST serial before="),
        "{all}"
    );
}

#[test]
fn debian_arm64_on_gicv3_one_and_two_vcpus_serial_rtc_and_an_ext4_root() {
    let Some((ember, images)) = prerequisites() else {
        return;
    };
    let dir = arm64::shared_dir("gicv3");
    let poweroff = images.initrd(&dir, "poweroff", &format!("{REPORT}\npoweroff -f\n"));
    let one = write(
        &dir,
        "one",
        &config(&images, &poweroff, 1, None, "console=ttyS0 panic=1"),
    );
    // Two vCPUs on an explicit GICv3, ended by a reboot (PSCI SYSTEM_RESET).
    let reboot = images.initrd(&dir, "reboot", &format!("{REPORT}\nreboot -f\n"));
    let two = write(
        &dir,
        "two",
        &config(
            &images,
            &reboot,
            2,
            Some("gicv3"),
            "console=ttyS0 panic=1 quiet",
        ),
    );
    // An ext4 root on virtio-blk: the first boot writes a file, the second reads it.
    let disk = dir.join("rootfs.ext4");
    std::fs::copy(&images.rootfs, &disk).unwrap();
    let root_script = r#"
if [ -f /ember-note ]; then
    echo "EMBER-TEST root read=$(cat /ember-note)"
else
    echo "written-through-virtio-blk" > /ember-note
    sync
    echo "EMBER-TEST root wrote"
fi
echo "EMBER-TEST root $(grep ' / ' /proc/mounts)"
poweroff -f
"#;
    let root_initrd = images.initrd(&dir, "root", root_script);
    let mut root = config(
        &images,
        &root_initrd,
        1,
        None,
        "console=ttyS0 panic=1 quiet root=/dev/vda rw",
    );
    root["drives"] = serde_json::json!([{
        "drive_id": "rootfs",
        "path_on_host": disk,
        "is_root_device": true,
        "is_read_only": false,
    }]);
    let root = write(&dir, "root", &root);
    // virtio-net on a TAP device ember creates; the arm64 host answers the guest's pings.
    let net_script = r#"
ip link set eth0 up
ip addr add 172.16.0.2/30 dev eth0
echo "EMBER-TEST net mac=$(cat /sys/class/net/eth0/address)"
ping -c 3 -W 5 172.16.0.1 >/tmp/ping 2>&1
echo "EMBER-TEST net ping=$? $(grep -o '[0-9]* packets received' /tmp/ping)"
poweroff -f
"#;
    let net_initrd = images.initrd(&dir, "net", net_script);
    let mut net = config(&images, &net_initrd, 1, None, "console=ttyS0 panic=1 quiet");
    net["network-interfaces"] = serde_json::json!([{
        "iface_id": "eth0",
        "host_dev_name": "tap0",
        "guest_mac": "06:00:ac:10:00:02",
    }]);
    let net = write(&dir, "net", &net);
    let script = format!(
        "run one {one} 'type a command' '{TYPED}'\n\
         run two {two} 'type a command' '{TYPED}'\n\
         run write {root}\n\
         run read {root}\n\
         (n=0; while [ ! -e /sys/class/net/tap0 ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done\n\
          ip addr add 172.16.0.1/30 dev tap0 && ip link set tap0 up) &\n\
         run net {net}\n"
    );
    let console = arm64::run("gicv3", 3, &ember, &script).unwrap_or_else(|e| panic!("{e}"));

    let all = assert_run_ok(&console, "one");
    assert!(all.contains("EMBER-GUEST init"), "{all}");
    assert!(all.contains("EMBER-TEST cpus=1 online=0"), "{all}");
    // KVM's GICv3 was picked by itself, and the timer and the UART are its interrupts.
    assert!(all.contains("GICv3: CPU0: found redistributor"), "{all}");
    assert_eq!(timer_chip(&all), "GICv3", "{all}");
    assert!(all.contains("ttyS0 at MMIO 0xa000000"), "{all}");
    assert!(all.contains("EMBER-TEST rtc name=rtc-pl031"), "{all}");
    let year: u32 = all
        .split("year=")
        .nth(1)
        .and_then(|s| s.get(..4))
        .and_then(|y| y.parse().ok())
        .unwrap_or(0);
    assert!(year >= 2026, "the RTC gave the host's date: {all}");
    assert_serial_both_ways(&all);

    let all = assert_run_ok(&console, "two");
    assert!(all.contains("EMBER-TEST cpus=2 online=0-1"), "{all}");
    assert_serial_both_ways(&all);

    let all = assert_run_ok(&console, "write");
    assert!(all.contains("EMBER-TEST root wrote"), "{all}");
    assert!(all.contains("EMBER-TEST root /dev/vda / ext4 rw"), "{all}");
    let all = assert_run_ok(&console, "read");
    assert!(
        all.contains("EMBER-TEST root read=written-through-virtio-blk"),
        "{all}"
    );

    let all = assert_run_ok(&console, "net");
    assert!(
        all.contains("EMBER-TEST net mac=06:00:ac:10:00:02"),
        "{all}"
    );
    assert!(
        all.contains("EMBER-TEST net ping=0 3 packets received"),
        "{all}"
    );
}

#[test]
fn debian_arm64_on_gicv2_with_the_gic_picked_by_itself_and_asked_for() {
    let Some((ember, images)) = prerequisites() else {
        return;
    };
    let dir = arm64::shared_dir("gicv2");
    let initrd = images.initrd(&dir, "poweroff", &format!("{REPORT}\npoweroff -f\n"));
    // Nothing asked: KVM has no GICv3 here, so ember takes the GICv2.
    let auto = write(
        &dir,
        "auto",
        &config(&images, &initrd, 1, None, "console=ttyS0 panic=1"),
    );
    let two = write(
        &dir,
        "two",
        &config(
            &images,
            &initrd,
            2,
            Some("gicv2"),
            "console=ttyS0 panic=1 quiet",
        ),
    );
    // A GICv3 asked for where there is none: refused before boot, saying so.
    let v3 = write(
        &dir,
        "v3",
        &config(&images, &initrd, 1, Some("gicv3"), "console=ttyS0"),
    );
    // More vCPUs than a GICv2 has CPU interfaces.
    let nine = write(
        &dir,
        "nine",
        &config(&images, &initrd, 9, Some("gicv2"), "console=ttyS0"),
    );
    let script = format!(
        "run auto {auto} 'type a command' '{TYPED}'\n\
         run two {two} 'type a command' '{TYPED}'\n\
         run v3 {v3}\n\
         run nine {nine}\n"
    );
    let console = arm64::run("gicv2", 2, &ember, &script).unwrap_or_else(|e| panic!("{e}"));

    let all = assert_run_ok(&console, "auto");
    assert!(all.contains("EMBER-TEST cpus=1 online=0"), "{all}");
    assert_eq!(timer_chip(&all), "GIC-0", "a GICv2: {all}");
    assert_serial_both_ways(&all);

    let all = assert_run_ok(&console, "two");
    assert!(all.contains("EMBER-TEST cpus=2 online=0-1"), "{all}");
    assert_serial_both_ways(&all);

    let v3 = output_of(&console, "v3");
    assert!(v3.contains("ember-exit=4"), "{v3}");
    assert!(
        v3.contains("this host's KVM cannot emulate a GICv3"),
        "{v3}"
    );
    let nine = output_of(&console, "nine");
    assert!(nine.contains("ember-exit=3"), "{nine}");
    assert!(
        nine.contains("machine-config.vcpu_count 9 is more than a GICv2 can serve (8)"),
        "{nine}"
    );
}

/// ember's library unit tests, built for arm64 and run where they meet a real arm64 KVM:
/// the vGIC, vCPU init and registers, irqfds, memory slots, the virtio-mmio transport and
/// the device manager, next to everything architecture-neutral.
#[test]
fn the_unit_tests_pass_on_arm64_kvm() {
    let binary = match arm64::unit_tests() {
        Ok(b) => b,
        Err(e) => return cannot_run(&e),
    };
    if let Err(e) = arm64::images() {
        return cannot_run(&e);
    }
    let script = format!("{} --test-threads=2 2>&1\n", binary.display());
    // No ember runs here; the prelude's path is not used.
    let console = arm64::run("unit", 3, &binary, &script).unwrap_or_else(|e| panic!("{e}"));
    let result = console
        .lines()
        .find(|l| l.starts_with("test result:"))
        .unwrap_or_else(|| panic!("no test result in the console above"));
    assert!(result.starts_with("test result: ok."), "{result}");
    let passed: u32 = result
        .split_whitespace()
        .nth(3)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    // The arm64 tests among them ran: a test of the vGIC and one of the vCPU registers.
    for name in [
        "arch::aarch64::vm::tests::kernel_picks_a_gic_the_host_has_and_names_it ... ok",
        "arch::aarch64::regs::tests::vcpus_get_psci_the_device_tree_s_mpidr_and_the_boot_registers ... ok",
    ] {
        assert!(console.contains(name), "{name} did not pass");
    }
    assert!(passed >= 200, "{result}");
}
