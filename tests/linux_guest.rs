//! Real Linux guests: Debian's stock kernel (tools/nested-host/build.sh fetches it) boots
//! under ember and its own drivers use ember's serial port, interrupt controllers, ACPI
//! tables, virtio-mmio and virtio-blk. On hosts without hardware virtualization each test
//! runs inside a nested host (tests/common/linux.rs, docs/testing.md).
//!
//! A guest runs the shell script the test gives it as /test.sh and reports on its console
//! with `EMBER-TEST ...` lines, which the test reads.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::linux::{LinuxVm, field, linux_test, number};
use common::nested::LinuxImages;
use common::*;

/// What every guest's command line starts with. `pci=off`: ember has no PCI bus yet.
const BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// Shell helpers the guests' scripts share: the total count of an interrupt line in
/// /proc/interrupts (its numbers summed over CPUs).
const SCRIPT_PRELUDE: &str = r#"
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
irqs() {
    grep "$1" /proc/interrupts | head -1 |
        awk '{ s = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i; print s }'
}
"#;

/// The guest's initramfs with `body` (after the prelude) as its /test.sh.
fn guest_initrd(images: &LinuxImages, dir: &Scratch, body: &str) -> PathBuf {
    images
        .initrd(&dir.0, &format!("{SCRIPT_PRELUDE}\n{body}"))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn config(
    kernel: &std::path::Path,
    initrd: &std::path::Path,
    vcpus: u8,
    mem_mib: usize,
    args: &str,
) -> serde_json::Value {
    serde_json::json!({
        "boot-source": {
            "kernel_image_path": kernel,
            "initrd_path": initrd,
            "boot_args": args,
        },
        "machine-config": {"vcpu_count": vcpus, "mem_size_mib": mem_mib},
    })
}

/// What the guest reports about the machine it found, then a clean power-off.
const MACHINE_REPORT: &str = r#"
echo "EMBER-TEST cmdline $(cat /proc/cmdline)"
echo "EMBER-TEST machine cpus=$(grep -c ^processor /proc/cpuinfo) online=$(cat /sys/devices/system/cpu/online) mem_kib=$(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo)"
echo "EMBER-TEST acpi devices=$(ls /sys/bus/acpi/devices | tr '\n' ' ')"
echo "EMBER-TEST cpu flags $(grep -m1 ^flags /proc/cpuinfo)"
poweroff -f
"#;

/// The ELF kernel without its PVH entry note, so ember enters it through the 64-bit boot
/// protocol instead: the Xen note of type 18 (`XEN_ELFNOTE_PHYS32_ENTRY`) gets another type.
fn without_pvh_note(vmlinux: &std::path::Path, dir: &Scratch) -> std::path::PathBuf {
    let mut elf = std::fs::read(vmlinux).expect("read vmlinux");
    // namesz 4, descsz 4 or 8 (a 32-bit or 64-bit entry address), type 18, "Xen\0".
    let is_header = |w: &[u8]| {
        w[..4] == [4, 0, 0, 0]
            && matches!(w[4..8], [4, 0, 0, 0] | [8, 0, 0, 0])
            && w[8..] == [18, 0, 0, 0, b'X', b'e', b'n', 0]
    };
    let at = elf
        .windows(16)
        .position(is_header)
        .expect("the kernel has a PVH entry note");
    elf[at + 8] = 0x7f;
    dir.write("vmlinux-no-pvh", elf)
}

/// Boots `kernel` with the machine report and checks what the guest saw and which boot
/// protocol ember used (`protocol` as ember logs it).
fn boot_and_check_machine(
    images: &LinuxImages,
    dir: &Scratch,
    kernel: &std::path::Path,
    protocol: &str,
    vcpus: u8,
    mem: usize,
) {
    let initrd = guest_initrd(images, dir, MACHINE_REPORT);
    let args = format!("{BOOT_ARGS} ember.test=machine");
    let mut vm = LinuxVm::boot_config(dir, &config(kernel, &initrd, vcpus, mem, &args));
    let init = vm.wait_for("EMBER-GUEST init");
    println!(
        "/init ran {:.1} s after spawn ({init})",
        vm.elapsed().as_secs_f64()
    );
    let cmdline = vm.wait_for("EMBER-TEST cmdline");
    assert!(cmdline.contains(&args), "{cmdline}");
    let machine = vm.wait_for("EMBER-TEST machine");
    assert_eq!(number(&machine, "cpus"), u64::from(vcpus), "{machine}");
    let online = if vcpus == 1 {
        "0".to_owned()
    } else {
        format!("0-{}", vcpus - 1)
    };
    assert_eq!(field(&machine, "online"), online, "{machine}");
    // The kernel keeps some memory for itself; what it reports is most of what it was given.
    let mem_kib = number(&machine, "mem_kib");
    let given_kib = mem as u64 * 1024;
    assert!(
        mem_kib < given_kib && mem_kib > given_kib * 3 / 4,
        "MemTotal {mem_kib} kB for {mem} MiB: {machine}"
    );
    // The DSDT's devices, as the kernel's ACPI interpreter enumerated them.
    let acpi = vm.wait_for("EMBER-TEST acpi");
    for hid in ["PNP0501", "PNP0303"] {
        assert!(acpi.contains(hid), "{acpi}");
    }
    // The LAPIC's TSC-deadline mode, which KVM emulates and ember must announce.
    let flags = vm.wait_for("EMBER-TEST cpu flags");
    assert!(flags.contains(" tsc_deadline_timer"), "{flags}");
    let (code, log) = vm.wait_exit();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains(&format!("({protocol} boot)")), "{log}");
    assert!(log.contains("the guest powered off (ACPI S5)"), "{log}");
}

#[test]
fn bzimage_and_64_bit_elf_boot_one_vcpu() {
    linux_test("bzimage_and_64_bit_elf_boot_one_vcpu", |images| {
        let dir = Scratch::new("linux-one-vcpu");
        boot_and_check_machine(images, &dir, &images.bzimage, "Linux64", 1, 256);
        let elf = without_pvh_note(&images.vmlinux, &dir);
        boot_and_check_machine(images, &dir, &elf, "Linux64", 1, 384);
    });
}

#[test]
fn pvh_elf_boots_two_vcpus() {
    linux_test("pvh_elf_boots_two_vcpus", |images| {
        let dir = Scratch::new("linux-pvh");
        boot_and_check_machine(images, &dir, &images.vmlinux, "Pvh", 2, 512);
    });
}

#[test]
fn serial_console_works_both_ways_with_interrupts() {
    linux_test("serial_console_works_both_ways_with_interrupts", |images| {
        let dir = Scratch::new("linux-serial");
        let initrd = guest_initrd(
            images,
            &dir,
            r#"
echo "EMBER-TEST before timer=$(irqs LOC:) serial=$(irqs ttyS0)"
sleep 1
echo "EMBER-TEST after timer=$(irqs LOC:)"
echo "EMBER-TEST type a command"
read -r cmd < /dev/console
eval "$cmd"
echo "EMBER-TEST end serial=$(irqs ttyS0)"
reboot -f
"#,
        );
        let mut vm =
            LinuxVm::boot_config(&dir, &config(&images.bzimage, &initrd, 2, 256, BOOT_ARGS));
        let before = vm.wait_for("EMBER-TEST before");
        let after = vm.wait_for("EMBER-TEST after");
        // The LAPIC timer ticks while the guest sleeps.
        assert!(
            number(&after, "timer") > number(&before, "timer"),
            "{before}\n{after}"
        );
        vm.wait_for("EMBER-TEST type a command");
        vm.type_text("echo EMBER-TEST typed-$((6*7))\n");
        vm.wait_for("EMBER-TEST typed-42");
        // Input and output both raise the UART's interrupt (IRQ 4 through the IOAPIC).
        let end = vm.wait_for("EMBER-TEST end");
        assert!(
            number(&end, "serial") > number(&before, "serial"),
            "{before}\n{end}"
        );
        // reboot=k: the kernel resets through the i8042, which ends the VM cleanly.
        let (code, log) = vm.wait_exit();
        assert_eq!(code, Some(0), "{log}");
    });
}

#[test]
fn ext4_root_on_virtio_blk_keeps_what_the_guest_wrote() {
    linux_test(
        "ext4_root_on_virtio_blk_keeps_what_the_guest_wrote",
        |images| {
            let dir = Scratch::new("linux-ext4");
            let rootfs = images.rootfs_copy(&dir.0).unwrap();
            let mut ro_image = vec![0u8; 1 << 20];
            ro_image[..16].copy_from_slice(b"EMBER-READ-ONLY.");
            let ro_path = dir.write("readonly.img", &ro_image);
            let marker = format!(
                "written-by-the-guest-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            );
            let initrd = guest_initrd(
                images,
                &dir,
                &format!(
                    r#"
echo "EMBER-TEST root $(grep ' / ' /proc/mounts)"
echo "EMBER-TEST rootfs $(cat /etc/ember-rootfs)"
echo "EMBER-TEST irqs before=$(irqs virtio0)"
echo "{marker}" > /guest-file
sync
echo "EMBER-TEST wrote"
echo "EMBER-TEST vdb ro=$(cat /sys/block/vdb/ro) head=$(head -c 16 /dev/vdb)"
if dd if=/dev/zero of=/dev/vdb bs=512 count=1 conv=fsync 2>/dev/null; then
    echo "EMBER-TEST vdb write=accepted"
else
    echo "EMBER-TEST vdb write=refused"
fi
echo "EMBER-TEST irqs after=$(irqs virtio0)"
poweroff -f
"#
                ),
            );
            let mut cfg = config(&images.bzimage, &initrd, 2, 256, BOOT_ARGS);
            cfg["drives"] = serde_json::json!([
                {"drive_id": "rootfs", "path_on_host": rootfs, "is_root_device": true,
                 "is_read_only": false},
                {"drive_id": "data", "path_on_host": ro_path, "is_root_device": false,
                 "is_read_only": true},
            ]);
            let mut vm = LinuxVm::boot_config(&dir, &cfg);
            // The guest found its disks through the DSDT (Debian's kernel ignores the
            // virtio_mmio.device= words) and mounted the root read-write, as root=/dev/vda rw
            // on the command line asks.
            let root = vm.wait_for("EMBER-TEST root");
            assert!(root.contains("/dev/vda / ext4 rw"), "{root}");
            vm.wait_for("EMBER-TEST rootfs ember test root file system");
            let before = vm.wait_for("EMBER-TEST irqs before");
            vm.wait_for("EMBER-TEST wrote");
            let vdb = vm.wait_for("EMBER-TEST vdb ro");
            assert_eq!(field(&vdb, "ro"), "1", "{vdb}");
            assert_eq!(field(&vdb, "head"), "EMBER-READ-ONLY.", "{vdb}");
            vm.wait_for("EMBER-TEST vdb write=refused");
            // Completions reach the guest by interrupt, not by polling.
            let after = vm.wait_for("EMBER-TEST irqs after");
            assert!(
                number(&after, "after") > number(&before, "before"),
                "{before}\n{after}"
            );
            let (code, log) = vm.wait_exit();
            assert_eq!(code, Some(0), "{log}");
            // What the guest wrote and synced is in the image file on the host.
            let image = std::fs::read(&rootfs).expect("read the root image");
            assert!(
                image.windows(marker.len()).any(|w| w == marker.as_bytes()),
                "the guest's file is not in the root image"
            );
            assert_eq!(
                std::fs::read(&ro_path).expect("read the read-only image"),
                ro_image,
                "the read-only drive changed"
            );
        },
    );
}

#[test]
fn api_drives_a_linux_guest_through_its_life() {
    linux_test("api_drives_a_linux_guest_through_its_life", |images| {
        let dir = Scratch::new("linux-api");
        let mut first = vec![0u8; 1 << 20];
        first[..8].copy_from_slice(b"EMBER-A-");
        let first = dir.write("first.img", &first);
        let mut second = vec![0u8; 2 << 20];
        second[..8].copy_from_slice(b"EMBER-B-");
        let second = dir.write("second.img", &second);
        let initrd = guest_initrd(
            images,
            &dir,
            r#"
sectors() { cat /sys/block/vda/size; }
head8() { sync; echo 3 > /proc/sys/vm/drop_caches; head -c 8 /dev/vda; }
echo "EMBER-TEST ready size=$(sectors) head=$(head8)"
( i=0; while true; do echo "EMBER-TEST tick $i"; i=$((i + 1)); sleep 0.2; done ) &
old=$(sectors)
while [ "$(sectors)" = "$old" ]; do sleep 0.2; done
echo "EMBER-TEST swapped size=$(sectors) head=$(head8)"
sleep 3600
"#,
        );
        let mut vm = LinuxVm::serve_api(&dir);
        let mut api = vm.api();
        let put = |api: &mut common::api::ApiClient, path: &str, body: serde_json::Value| {
            let r = api.call("PUT", path, Some(&body.to_string()));
            assert_eq!(r.status, 204, "PUT {path}: {r:?}");
        };
        put(
            &mut api,
            "/machine-config",
            serde_json::json!({"vcpu_count": 2, "mem_size_mib": 256}),
        );
        put(
            &mut api,
            "/boot-source",
            serde_json::json!({"kernel_image_path": images.bzimage, "initrd_path": initrd,
                               "boot_args": BOOT_ARGS}),
        );
        put(
            &mut api,
            "/drives/data",
            serde_json::json!({"drive_id": "data", "path_on_host": first,
                               "is_root_device": false, "is_read_only": false}),
        );
        put(
            &mut api,
            "/actions",
            serde_json::json!({"action_type": "InstanceStart"}),
        );
        let ready = vm.wait_for("EMBER-TEST ready");
        assert_eq!(number(&ready, "size"), 2048, "{ready}");
        assert_eq!(field(&ready, "head"), "EMBER-A-", "{ready}");
        vm.wait_for("EMBER-TEST tick 3");

        // Paused, the guest does nothing at all: no tick reaches the console.
        let r = api.call("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
        assert_eq!(r.status, 204, "{r:?}");
        assert_eq!(api.call("GET", "/", None).json()["state"], "Paused");
        vm.lines_within(Duration::from_millis(500)); // anything already on its way
        let while_paused = vm.lines_within(Duration::from_secs(2));
        assert!(
            while_paused.is_empty(),
            "the guest ran while paused: {while_paused:?}"
        );
        let r = api.call("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
        assert_eq!(r.status, 204, "{r:?}");
        vm.wait_for_within("EMBER-TEST tick", Duration::from_secs(30));

        // A new backing file: the guest sees the new size and the new data.
        let r = api.call(
            "PATCH",
            "/drives/data",
            Some(&serde_json::json!({"drive_id": "data", "path_on_host": second}).to_string()),
        );
        assert_eq!(r.status, 204, "{r:?}");
        let swapped = vm.wait_for("EMBER-TEST swapped");
        assert_eq!(number(&swapped, "size"), 4096, "{swapped}");
        assert_eq!(field(&swapped, "head"), "EMBER-B-", "{swapped}");

        // Ctrl+Alt+Del through the guest's i8042 driver: the kernel restarts (reboot=k),
        // which ends the VM cleanly.
        put(
            &mut api,
            "/actions",
            serde_json::json!({"action_type": "SendCtrlAltDel"}),
        );
        let (code, log) = vm.wait_exit();
        assert_eq!(code, Some(0), "{log}");
    });
}
