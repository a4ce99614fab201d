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

/// What every guest's command line starts with. `pci=off`: without `--enable-pci` there is
/// no PCI bus to probe.
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
echo "EMBER-TEST cpu vendor $(grep -m1 ^vendor_id /proc/cpuinfo)"
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

/// What the guest's /proc/cpuinfo said: vendor and feature flags.
struct GuestCpu {
    vendor: String,
    flags: std::collections::BTreeSet<String>,
}

/// Boots `kernel` with the machine report and checks what the guest saw and which boot
/// protocol ember used (`protocol` as ember logs it); `template` is the CPU template.
fn boot_and_check_machine(
    images: &LinuxImages,
    dir: &Scratch,
    kernel: &std::path::Path,
    protocol: &str,
    vcpus: u8,
    mem: usize,
    template: Option<&str>,
) -> GuestCpu {
    let initrd = guest_initrd(images, dir, MACHINE_REPORT);
    let args = format!("{BOOT_ARGS} ember.test=machine");
    let mut cfg = config(kernel, &initrd, vcpus, mem, &args);
    if let Some(t) = template {
        cfg["machine-config"]["cpu_template"] = t.into();
    }
    let mut vm = LinuxVm::boot_config(dir, &cfg);
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
    let vendor = vm.wait_for("EMBER-TEST cpu vendor");
    // The LAPIC's TSC-deadline mode, which KVM emulates and ember must announce.
    let flags = vm.wait_for("EMBER-TEST cpu flags");
    assert!(flags.contains(" tsc_deadline_timer"), "{flags}");
    let (code, log) = vm.wait_exit();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains(&format!("({protocol} boot)")), "{log}");
    assert!(log.contains("the guest powered off (ACPI S5)"), "{log}");
    GuestCpu {
        vendor: vendor.rsplit(' ').next().unwrap_or_default().to_owned(),
        flags: flags
            .split(':')
            .nth(1)
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
    }
}

/// A CPU template as the guest sees it: the flags of `templated` are those of `plain`
/// less some the template hides (T2 on Intel: AVX-512, RDSEED, ADX, SMAP, CLFLUSHOPT, CLWB,
/// SHA; T2A on AMD: AVX-512 and SVM), never more.
fn assert_template_effect(template: &str, plain: &GuestCpu, templated: &GuestCpu) {
    let hidden: &[&str] = if template == "T2" {
        &[
            "avx512f",
            "avx512dq",
            "avx512cd",
            "avx512bw",
            "avx512vl",
            "rdseed",
            "adx",
            "smap",
            "clflushopt",
            "clwb",
            "sha_ni",
            "xsavec",
            "xsaves",
            "pku",
            "vaes",
            "gfni",
        ]
    } else {
        &[
            "avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl", "svm", "vaes", "gfni",
        ]
    };
    let added: Vec<&String> = templated.flags.difference(&plain.flags).collect();
    assert!(added.is_empty(), "{template} added {added:?}");
    let kept: Vec<&&str> = hidden
        .iter()
        .filter(|f| templated.flags.contains(**f))
        .collect();
    assert!(kept.is_empty(), "{template} left {kept:?} visible");
    let removed: Vec<&String> = plain.flags.difference(&templated.flags).collect();
    println!("{template} hid {removed:?} from the guest");
    if hidden.iter().any(|f| plain.flags.contains(*f)) {
        assert!(!removed.is_empty());
    }
}

#[test]
fn bzimage_and_64_bit_elf_boot_one_vcpu() {
    linux_test("bzimage_and_64_bit_elf_boot_one_vcpu", |images| {
        let dir = Scratch::new("linux-one-vcpu");
        let plain = boot_and_check_machine(images, &dir, &images.bzimage, "Linux64", 1, 256, None);
        // The second boot also checks a CPU template for the host's vendor.
        let template = if plain.vendor == "AuthenticAMD" {
            "T2A"
        } else {
            "T2"
        };
        let elf = without_pvh_note(&images.vmlinux, &dir);
        let templated =
            boot_and_check_machine(images, &dir, &elf, "Linux64", 1, 384, Some(template));
        assert_template_effect(template, &plain, &templated);
    });
}

#[test]
fn pvh_elf_boots_two_vcpus() {
    linux_test("pvh_elf_boots_two_vcpus", |images| {
        let dir = Scratch::new("linux-pvh");
        boot_and_check_machine(images, &dir, &images.vmlinux, "Pvh", 2, 512, None);
    });
}

/// What the guest's PCI core found, from sysfs and the kernel log, then a round trip
/// through the virtio-pci disk at 00:01.0.
const PCI_REPORT: &str = r#"
bridge=/sys/bus/pci/devices/0000:00:00.0
disk=/sys/bus/pci/devices/0000:00:01.0
echo "EMBER-TEST pci functions=$(ls /sys/bus/pci/devices | wc -l) bridge=$(cat $bridge/vendor):$(cat $bridge/device):$(cat $bridge/class) config_bytes=$(wc -c < $bridge/config)"
echo "EMBER-TEST disk id=$(cat $disk/vendor):$(cat $disk/device):$(cat $disk/class) driver=$(basename $(readlink $disk/driver)) msix=$(cat $disk/msi_bus 2>/dev/null)"
dmesg | grep -iE "pci|ecam|mmconfig|_osc|msi|virtio" | sed 's/^/EMBER-TEST dmesg /'
echo "EMBER-TEST iomem $(grep -iE 'pci|mmconfig|ecam' /proc/iomem | tr -s ' ' | tr '\n' ';')"
echo "EMBER-TEST ioports $(grep -iE 'pci|cf8' /proc/ioports | tr -s ' ' | tr '\n' ';')"
echo "EMBER-TEST vda head=$(head -c 16 /dev/vda)"
echo "EMBER-TEST-WROTE-THROUGH-PCI" | dd of=/dev/vda bs=512 seek=1 conv=sync,fsync 2>/dev/null
echo "EMBER-TEST vda wrote=$?"
grep virtio0 /proc/interrupts | tr -s ' ' | sed 's/^/EMBER-TEST interrupts /'
echo "EMBER-TEST requests irqs=$(irqs virtio0-req)"
net=/sys/bus/pci/devices/0000:00:02.0
echo "EMBER-TEST net id=$(cat $net/vendor):$(cat $net/device):$(cat $net/class) driver=$(basename $(readlink $net/driver))"
ip link set eth0 up
ip addr add 172.16.1.2/30 dev eth0
if ping -c 3 -W 5 172.16.1.1 >/dev/null; then echo "EMBER-TEST net ping ok"; else echo "EMBER-TEST net ping failed"; fi
echo "EMBER-TEST net irqs=$(irqs virtio1-input)"
poweroff -f
"#;

/// With `--enable-pci` a stock kernel finds the root complex the way it finds one on a
/// PC: the host bridge through ACPI (PNP0A08), configuration space through the MCFG's ECAM
/// (reserved by a motherboard resource, or Linux would not trust it), the windows from
/// `_CRS`; the drive is a virtio-pci function its virtio-pci driver binds, with MSI-X
/// interrupts, reading and writing the host file; and the network interface is another,
/// which pings the host through its TAP.
#[test]
fn pci_root_complex_with_a_virtio_pci_disk_and_nic() {
    linux_test(
        "pci_root_complex_with_a_virtio_pci_disk_and_nic",
        |images| {
            let dir = Scratch::new("linux-pci");
            let mut disk = vec![0u8; 1 << 20];
            disk[..16].copy_from_slice(b"EMBER-PCI-DISK..");
            let disk_path = dir.write("disk.img", &disk);
            let initrd = guest_initrd(images, &dir, PCI_REPORT);
            let args = "console=ttyS0 reboot=k panic=1";
            let mut cfg = config(&images.bzimage, &initrd, 1, 256, args);
            cfg["drives"] = serde_json::json!([
                {"drive_id": "data", "path_on_host": disk_path, "is_root_device": false,
                 "is_read_only": false},
            ]);
            persistent_tap("tap1", "172.16.1.1/30");
            cfg["network-interfaces"] = serde_json::json!([
                {"iface_id": "eth0", "host_dev_name": "tap1", "guest_mac": "06:00:ac:10:01:02"}
            ]);
            let mut vm = LinuxVm::boot_config_with_flags(&dir, &cfg, &["--enable-pci"]);
            let pci = vm.wait_for("EMBER-TEST pci");
            let disk_line = vm.wait_for("EMBER-TEST disk");
            vm.wait_for("EMBER-TEST ioports");
            let head = vm.wait_for("EMBER-TEST vda head");
            let wrote = vm.wait_for("EMBER-TEST vda wrote");
            let requests = vm.wait_for("EMBER-TEST requests");
            let net = vm.wait_for("EMBER-TEST net id");
            let ping = vm.wait_for("EMBER-TEST net ping");
            let net_irqs = vm.wait_for("EMBER-TEST net irqs");
            let all = vm.lines_with(&["EMBER-TEST"]);
            assert_eq!(field(&pci, "functions"), "3", "{all}");
            assert_eq!(field(&pci, "bridge"), "0x1b36:0x0008:0x060000", "{all}");
            // Extended configuration space (4 KiB) is only readable through ECAM.
            assert_eq!(field(&pci, "config_bytes"), "4096", "{all}");
            for needle in [
                "PCI Root Bridge [PCI0] (domain 0000 [bus 00])",
                "MMCONFIG at [mem 0xe0000000-0xe00fffff] reserved in ACPI motherboard resources",
                "root bus resource [mem 0xc0000000-0xcfffffff window]",
                // 256 MiB of RAM: the 64-bit window starts at 4 GiB.
                "root bus resource [mem 0x100000000-0x10ffffffff window]",
                "pci 0000:00:00.0: [1b36:0008] type 00 class 0x060000",
                "pci 0000:00:01.0: [1af4:1042] type 00 class 0x018000",
                "0cf8-0cff : PCI conf1",
            ] {
                assert!(all.contains(needle), "no {needle:?} in:\n{all}");
            }
            // The virtio-pci driver bound the function and virtio-blk read and wrote it.
            assert_eq!(field(&disk_line, "id"), "0x1af4:0x1042:0x018000", "{all}");
            assert_eq!(field(&disk_line, "driver"), "virtio-pci", "{all}");
            assert!(head.contains("head=EMBER-PCI-DISK.."), "{all}");
            assert_eq!(field(&wrote, "wrote"), "0", "{all}");
            // Completions arrived as MSI-X messages on the request queue's vector.
            assert!(number(&requests, "irqs") > 0, "{all}");
            assert!(
                all.lines()
                    .any(|l| l.contains("EMBER-TEST interrupts") && l.contains("MSI")),
                "{all}"
            );
            // The network interface: virtio-pci too, its frames both ways with MSI-X.
            assert_eq!(field(&net, "id"), "0x1af4:0x1041:0x020000", "{all}");
            assert_eq!(field(&net, "driver"), "virtio-pci", "{all}");
            assert!(ping.contains("net ping ok"), "{all}");
            assert!(number(&net_irqs, "irqs") > 0, "{all}");
            let (code, log) = vm.wait_exit();
            assert_eq!(code, Some(0), "{log}");
            assert!(log.contains("PCI 0000:00:01.0"), "{log}");
            assert!(log.contains("PCI 0000:00:02.0"), "{log}");
            let after = std::fs::read(&disk_path).unwrap();
            assert!(
                after[512..].starts_with(b"EMBER-TEST-WROTE-THROUGH-PCI"),
                "{:?}",
                String::from_utf8_lossy(&after[512..560])
            );
        },
    );
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
echo "EMBER-TEST irq kind=$(grep 'virtio0' /proc/interrupts | grep -o 'fasteoi\|edge' | head -n 1)"
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
            // On the split irqchip (the default) the virtio interrupt is level-triggered
            // through ember's I/O APIC: Linux handles it as fasteoi, and it kept arriving
            // above, so EOIs reached the I/O APIC and reopened the line.
            let kind = vm.wait_for("EMBER-TEST irq kind");
            assert_eq!(field(&kind, "kind"), "fasteoi", "{kind}");
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

/// MiB the host sends the guest over TCP: `EMBER_NET_TRANSFER_MIB`, 64 by default.
fn net_transfer_bytes() -> usize {
    mib_from_env("EMBER_NET_TRANSFER_MIB", 64) << 20
}

/// MiB the guest sends the host over TCP: `EMBER_NET_GUEST_TX_MIB`, 0 (none) by default.
/// Bulk TCP from a guest using checksum and segmentation offload reset or hung the nested
/// host within seconds in most runs (docs/testing.md), while the same transfer with the
/// offloads off passed; until that is understood the direction runs on request only.
fn guest_tx_bytes() -> usize {
    mib_from_env("EMBER_NET_GUEST_TX_MIB", 0) << 20
}

fn mib_from_env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(default)
}

/// A persistent TAP called `name` (it outlives this call; `ip link delete` removes it), with
/// `addr` on it and up.
fn persistent_tap(name: &str, addr: &str) {
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun");
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    use std::os::fd::AsRawFd;
    // SAFETY: TUNSETIFF and TUNSETPERSIST on a tun fd we own, with a valid ifreq and an int.
    unsafe {
        assert_eq!(
            libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req),
            0,
            "TUNSETIFF"
        );
        assert_eq!(
            libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 1),
            0,
            "TUNSETPERSIST"
        );
    }
    drop(tun);
    // The same MAC every time: a TAP re-created under a running guest is then the same
    // neighbour to it, as a host re-plugging its cable would be.
    for args in [
        vec!["link", "set", name, "address", "02:00:00:00:ee:01"],
        vec!["addr", "add", addr, "dev", name],
        vec!["link", "set", name, "up"],
    ] {
        let ok = std::process::Command::new("ip")
            .args(&args)
            .status()
            .expect("run ip");
        assert!(ok.success(), "ip {args:?}");
    }
}

/// A line every 16 MiB of a long transfer: the nested host's console must not stay silent
/// for the harness's hang limit while a slow emulated host moves hundreds of MiB.
fn progress(what: &str, before: usize, after: usize) {
    const STEP: usize = 16 << 20;
    if after / STEP > before / STEP {
        println!("net transfer: {} MiB {what}", after >> 20);
    }
}

/// A deterministic stream of `len` bytes (xorshift), so both ends can hash it.
fn pattern(len: usize, seed: u64) -> impl Iterator<Item = Vec<u8>> {
    let mut x = seed | 1;
    let mut left = len;
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let n = left.min(1 << 16);
        left -= n;
        let mut chunk = Vec::with_capacity(n);
        while chunk.len() < n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.extend_from_slice(&x.to_le_bytes());
        }
        chunk.truncate(n);
        Some(chunk)
    })
}

/// The MD5 of what is written to the returned pipe, from busybox's md5sum.
fn md5sum_process() -> std::process::Child {
    std::process::Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn md5sum")
}

fn md5sum_result(child: std::process::Child) -> String {
    let out = child.wait_with_output().expect("md5sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[test]
fn virtio_net_carries_ping_and_tcp_both_ways_and_survives_its_tap() {
    linux_test(
        "virtio_net_carries_ping_and_tcp_both_ways_and_survives_its_tap",
        |images| {
            use std::io::{Read, Write};
            let dir = Scratch::new("linux-net");
            persistent_tap("tap0", "172.16.0.1/30");
            let blocks = guest_tx_bytes() >> 20;
            let initrd = guest_initrd(
                images,
                &dir,
                &format!(
                    r#"
date +%s > /tmp/t0
ip link set eth0 up
ip addr add 172.16.0.2/30 dev eth0
dev=$(basename $(readlink -f /sys/class/net/eth0/device))
echo "EMBER-TEST link state=$(cat /sys/class/net/eth0/operstate) mtu=$(cat /sys/class/net/eth0/mtu) mac=$(cat /sys/class/net/eth0/address) features=$(cat /sys/bus/virtio/devices/$dev/features)"
if ping -c 3 -W 5 172.16.0.1 >/dev/null; then echo "EMBER-TEST ping ok"; else echo "EMBER-TEST ping failed"; fi
# A console line now and then: a silent nested host is taken for a hung one.
( while true; do sleep 20; echo "EMBER-TEST transferring"; done ) &
ticker=$!
( nc -l -p 5002 | md5sum | cut -d' ' -f1 | sed 's/^/EMBER-TEST received md5=/' ) &
sleep 1
echo "EMBER-TEST listening"
# A 1 MiB block sent {blocks} times, of text that differs all along (so a lost, repeated
# or reordered segment changes the hash): generating all of it would cost more than the
# transfer under emulation.
if [ {blocks} -gt 0 ]; then
    seq -w 1 150000 | head -c 1048576 > /tmp/block
    mkfifo /tmp/sent
    md5sum < /tmp/sent > /tmp/sent.md5 &
    i=0
    while [ $i -lt {blocks} ]; do cat /tmp/block; i=$((i + 1)); done | tee /tmp/sent | nc 172.16.0.1 5001
else
    echo none > /tmp/sent.md5
fi
kill $ticker
wait
echo "EMBER-TEST sent md5=$(cut -d' ' -f1 /tmp/sent.md5) after=$(( $(date +%s) - $(cat /tmp/t0) ))s"
echo "EMBER-TEST type go"
read -r go < /dev/console
n=0
until ping -c 1 -W 1 172.16.0.1 >/dev/null; do
    n=$((n + 1))
    [ $n -lt 30 ] || break
done
echo "EMBER-TEST ping after=$n"
poweroff -f
"#
                ),
            );
            let mut cfg = config(&images.bzimage, &initrd, 2, 256, BOOT_ARGS);
            cfg["network-interfaces"] = serde_json::json!([
                {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02",
                 "mtu": 1500}
            ]);
            let listener = std::net::TcpListener::bind("172.16.0.1:5001").expect("listen");
            let mut vm = LinuxVm::boot_config(&dir, &cfg);
            let link = vm.wait_for("EMBER-TEST link");
            assert!(link.contains("mac=06:00:ac:10:00:02"), "{link}");
            assert!(link.contains("mtu=1500"), "{link}");
            // The guest accepted checksum offload both ways, mergeable buffers and the MTU
            // (bits 0, 1, 15 and 3 of the features string, which lists bit 0 first).
            let features = field(&link, "features");
            for bit in [0usize, 1, 3, 5, 15, 16] {
                assert_eq!(
                    features.as_bytes().get(bit),
                    Some(&b'1'),
                    "feature bit {bit}: {link}"
                );
            }
            vm.wait_for("EMBER-TEST ping ok");
            // Host to guest: the guest hashes what it receives.
            vm.wait_for("EMBER-TEST listening");
            let started = std::time::Instant::now();
            let mut hash_sent = md5sum_process();
            {
                let mut to_guest =
                    std::net::TcpStream::connect("172.16.0.2:5002").expect("connect to the guest");
                let mut md5_in = hash_sent.stdin.take().expect("md5sum stdin");
                let mut sent = 0usize;
                for chunk in pattern(net_transfer_bytes(), 7) {
                    to_guest.write_all(&chunk).expect("send to the guest");
                    md5_in.write_all(&chunk).expect("hash");
                    progress("to the guest", sent, sent + chunk.len());
                    sent += chunk.len();
                }
            }
            let expected_in_guest = md5sum_result(hash_sent);
            // Guest to host (on request, see guest_tx_bytes): data the guest hashed as it
            // sent it.
            let received_on_host = if guest_tx_bytes() > 0 {
                let (mut from_guest, _) = listener.accept().expect("the guest connects");
                let mut hash_received = md5sum_process();
                let mut md5_in = hash_received.stdin.take().expect("md5sum stdin");
                let mut buf = vec![0u8; 1 << 16];
                let mut got = 0usize;
                while got < guest_tx_bytes() {
                    let n = from_guest.read(&mut buf).expect("receive from the guest");
                    assert!(n > 0, "the guest's stream ended after {got} bytes");
                    md5_in.write_all(&buf[..n]).expect("hash");
                    progress("from the guest", got, got + n);
                    got += n;
                }
                drop(from_guest);
                drop(md5_in);
                md5sum_result(hash_received)
            } else {
                "none".to_owned()
            };
            let in_guest = vm.wait_for("EMBER-TEST received");
            assert_eq!(field(&in_guest, "md5"), expected_in_guest, "{in_guest}");
            let sent = vm.wait_for("EMBER-TEST sent");
            assert_eq!(field(&sent, "md5"), received_on_host, "{sent}");
            println!(
                "{} MiB to the guest, {} MiB from it, in {:.1} s",
                net_transfer_bytes() >> 20,
                guest_tx_bytes() >> 20,
                started.elapsed().as_secs_f64()
            );
            // The TAP disappears under the running guest and comes back.
            vm.wait_for("EMBER-TEST type go");
            let deleted = std::process::Command::new("ip")
                .args(["link", "delete", "tap0"])
                .status()
                .expect("run ip");
            assert!(deleted.success(), "ip link delete tap0");
            std::thread::sleep(std::time::Duration::from_millis(1500));
            persistent_tap("tap0", "172.16.0.1/30");
            vm.type_text("go\n");
            let after = vm.wait_for("EMBER-TEST ping after");
            assert!(
                number(&after, "after") < 30,
                "no ping after the TAP came back: {after}"
            );
            let (code, log) = vm.wait_exit();
            assert_eq!(code, Some(0), "{log}");
            assert!(log.contains("TAP tap0 is gone"), "{log}");
            assert!(log.contains("TAP tap0 is back"), "{log}");
        },
    );
}

/// What the guest does with the two functions passed through to it: the NVMe controller's
/// namespace written with 64 MiB and read back (DMA both ways through the IOMMU, completions
/// as MSI-X), and the e1000e NIC's link brought up (its interrupts MSI-X too). The e1000e's
/// MSI mode is not used: QEMU's model does not deliver its MSI messages even to the nested
/// host's own driver (docs/testing.md), so MSI passthrough is covered by unit tests.
/// One line per PCI function the guest found: address, IDs, class and driver.
const FUNCTIONS_REPORT: &str = r#"
for f in /sys/bus/pci/devices/*; do
    echo "EMBER-TEST function $(basename $f) id=$(cat $f/vendor):$(cat $f/device):$(cat $f/class) driver=$(basename "$(readlink $f/driver)")"
done
"#;

/// The drivers of the passed-through NVMe controller and e1000e, and the disk's arrival.
const PASSTHROUGH_DRIVERS: &str = r#"
modprobe nvme
modprobe e1000e
n=0; while [ ! -b /dev/nvme0n1 ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n+1)); done
"#;

/// The disk written and read back through the NVMe driver, the NIC's link on MSI-X.
const PASSTHROUGH_REPORT: &str = r#"
echo "EMBER-TEST nvme sectors=$(cat /sys/block/nvme0n1/size 2>/dev/null)"
head -c 1048576 /dev/urandom > /tmp/chunk
i=0; while [ $i -lt 64 ]; do cat /tmp/chunk; i=$((i+1)); done > /tmp/data
echo "EMBER-TEST nvme wrote md5=$(md5sum < /tmp/data | cut -d' ' -f1)"
dd if=/tmp/data of=/dev/nvme0n1 bs=1M conv=fsync 2>/dev/null
echo "EMBER-TEST nvme dd status=$?"
rm -f /tmp/data
echo 3 > /proc/sys/vm/drop_caches
echo "EMBER-TEST nvme read md5=$(dd if=/dev/nvme0n1 bs=1M count=64 2>/dev/null | md5sum | cut -d' ' -f1)"
grep nvme /proc/interrupts | tr -s ' ' | sed 's/^/EMBER-TEST interrupts /'
echo "EMBER-TEST nvme irqs=$(irqs nvme0q1)"
ip link set eth0 up
n=0; while [ "$(cat /sys/class/net/eth0/carrier 2>/dev/null)" != 1 ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n+1)); done
echo "EMBER-TEST nic carrier=$(cat /sys/class/net/eth0/carrier 2>/dev/null) driver=$(basename "$(readlink /sys/class/net/eth0/device/driver)")"
echo "EMBER-TEST nic irq kind=$(cat /sys/class/net/eth0/device/msi_irqs/* 2>/dev/null | sort -u | tr '\n' ',') irqs=$(irqs eth0)"
rmmod e1000e
"#;

/// The e1000e driver in legacy interrupt mode (`IntMode=0`): INTx only, through the host
/// bridge's `_PRT`. Bringing the link up takes a link-change interrupt; the pings (answered
/// or not) add transmit completions, each one more INTx after an unmask.
const INTX_REPORT: &str = r#"
modprobe e1000e IntMode=0
ip link set eth0 up
n=0; while [ "$(cat /sys/class/net/eth0/carrier 2>/dev/null)" != 1 ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n+1)); done
ip addr add 10.0.2.15/24 dev eth0
ping -c 3 -W 1 10.0.2.2 >/dev/null 2>&1
echo "EMBER-TEST intx carrier=$(cat /sys/class/net/eth0/carrier 2>/dev/null) msi=$(ls /sys/class/net/eth0/device/msi_irqs 2>/dev/null | wc -l) irqs=$(irqs eth0)"
grep eth0 /proc/interrupts | tr -s ' ' | sed 's/^/EMBER-TEST intx interrupts /'
dmesg | grep -iE "e1000e|nvme|PCI INT|GSI" | sed 's/^/EMBER-TEST dmesg /'
poweroff -f
"#;

/// Checks [`INTX_REPORT`]'s lines: the link came up and the interrupts that took came as
/// INTx through an I/O APIC pin, more than one (the line was unmasked after each).
fn assert_intx_worked(vm: &mut LinuxVm) -> String {
    let line = vm.wait_for("EMBER-TEST intx carrier");
    let interrupts = vm.wait_for("EMBER-TEST intx interrupts");
    let context = vm.lines_with(&["EMBER-TEST"]);
    assert_eq!(field(&line, "carrier"), "1", "{context}");
    assert_eq!(
        field(&line, "msi"),
        "0",
        "no MSI or MSI-X vectors: {context}"
    );
    assert!(number(&line, "irqs") >= 2, "{context}");
    assert!(
        interrupts.contains("IO-APIC") && interrupts.contains("fasteoi"),
        "a level-triggered I/O APIC line: {context}"
    );
    context
}

/// The addresses of the nested host's PCI functions with vendor and device `id`
/// (`0x8086:0x10d3`), in order.
fn host_functions(id: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/bus/pci/devices")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    let read = |n: &str, what: &str| {
        std::fs::read_to_string(format!("/sys/bus/pci/devices/{n}/{what}"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    names
        .into_iter()
        .filter(|n| format!("{}:{}", read(n, "vendor"), read(n, "device")) == id)
        .collect()
}

/// Checks that ember refuses to start `cfg` with `--enable-pci` as a host problem (exit
/// code 4) and says `why`.
fn refused_before_boot(cfg: &serde_json::Value, why: &str) {
    let refused = boot_config_with_flags(&cfg.to_string(), &["--enable-pci"]);
    assert_eq!(refused.code(), Some(4), "{refused:#?}");
    assert!(refused.stderr.contains(why), "{}", refused.stderr);
}

/// Binds host function `sbdf` to vfio-pci the way docs/vfio.md tells operators to.
fn bind_to_vfio_pci(sbdf: &str) {
    let dev = format!("/sys/bus/pci/devices/{sbdf}");
    std::fs::write(format!("{dev}/driver_override"), "vfio-pci").unwrap();
    if std::path::Path::new(&format!("{dev}/driver")).exists() {
        std::fs::write(format!("{dev}/driver/unbind"), sbdf).unwrap();
    }
    std::fs::write("/sys/bus/pci/drivers_probe", sbdf).unwrap();
    let driver = std::fs::read_link(format!("{dev}/driver")).unwrap();
    assert!(driver.ends_with("vfio-pci"), "{sbdf} bound to {driver:?}");
}

/// Inside the nested host (q35 with an emulated Intel IOMMU, NESTED_PASSTHROUGH_DISK): an
/// NVMe controller and an e1000e NIC, refused while not bound to vfio-pci, then passed
/// through to one guest whose own drivers use them.
fn passthrough_inside(images: &LinuxImages) {
    if std::env::var_os("EMBER_NESTED_HOST").is_none() {
        // A real host (EMBER_LINUX_TESTS=direct): its NVMe and network functions are its
        // own, never rebound here; only a function the operator bound to vfio-pci is used.
        let Ok(sbdf) = std::env::var("EMBER_TEST_VFIO_DEVICE") else {
            panic!(
                "on a host with hardware virtualization this test needs EMBER_TEST_VFIO_DEVICE \
                 naming a PCI function bound to vfio-pci (docs/vfio.md); it never rebinds the \
                 host's own devices"
            );
        };
        passthrough_named(images, &sbdf);
        return;
    }
    // QEMU's NVMe controller, its e1000e, and the two functions of its e1000 (82540EM).
    let (nvmes, nics, pair) = (
        host_functions("0x1b36:0x0010"),
        host_functions("0x8086:0x10d3"),
        host_functions("0x8086:0x100e"),
    );
    let (Some(nvme), Some(nic), [first, second]) =
        (nvmes.first().cloned(), nics.first().cloned(), &pair[..])
    else {
        panic!(
            "this host lacks the NVMe controller, e1000e and two-function e1000 the nested \
             host gets from NESTED_PASSTHROUGH_DISK: {nvmes:?} {nics:?} {pair:?}"
        );
    };
    let dir = Scratch::new("linux-vfio");
    let script =
        format!("{PASSTHROUGH_DRIVERS}{FUNCTIONS_REPORT}{PASSTHROUGH_REPORT}{INTX_REPORT}");
    let initrd = guest_initrd(images, &dir, &script);
    let mut cfg = config(
        &images.bzimage,
        &initrd,
        1,
        512,
        "console=ttyS0 reboot=k panic=1",
    );
    cfg["vfio"] = serde_json::json!([
        {"id": "nvme0", "sbdf": nvme},
        {"id": "nic0", "sbdf": nic},
    ]);
    // No driver yet: refused before boot, naming the function and what to do.
    refused_before_boot(
        &cfg,
        &format!("PCI function {nvme} is not bound to any driver: bind it to vfio-pci first"),
    );
    bind_to_vfio_pci(&nvme);
    bind_to_vfio_pci(&nic);
    // A function whose IOMMU group holds another function the host's e1000 driver has:
    // refused before boot, naming that function and its driver.
    bind_to_vfio_pci(first);
    let mut grouped = cfg.clone();
    grouped["vfio"] = serde_json::json!([{"id": "g0", "sbdf": first}]);
    refused_before_boot(
        &grouped,
        &format!("of {first} is not viable: {second} shares it and is bound to e1000"),
    );
    bind_to_vfio_pci(second);

    let mut vm = LinuxVm::boot_config_with_flags(&dir, &cfg, &["--enable-pci"]);
    let sectors = vm.wait_for("EMBER-TEST nvme sectors");
    let wrote = vm.wait_for("EMBER-TEST nvme wrote");
    let status = vm.wait_for("EMBER-TEST nvme dd status");
    let read = vm.wait_for("EMBER-TEST nvme read");
    let irqs = vm.wait_for("EMBER-TEST nvme irqs");
    let carrier = vm.wait_for("EMBER-TEST nic carrier");
    let nic_irq = vm.wait_for("EMBER-TEST nic irq");
    // Reloaded in legacy mode: MSI-X off, INTx back on at the host, through ember's I/O
    // APIC (the split irqchip).
    assert_intx_worked(&mut vm);
    let mut all = vm.lines_with(&["EMBER-TEST", "e1000e", "nvme"]);
    let (code, log) = vm.wait_exit();
    all.push_str("\n--- ember's log ---\n");
    all.push_str(&log);
    assert_eq!(code, Some(0), "{all}");
    // The guest's own drivers bound both, at the slots after the host bridge.
    assert!(
        all.contains("function 0000:00:01.0 id=0x1b36:0x0010:0x010802 driver=nvme"),
        "{all}"
    );
    assert!(
        all.contains("function 0000:00:02.0 id=0x8086:0x10d3:0x020000 driver=e1000e"),
        "{all}"
    );
    // The namespace is the host file: 128 MiB.
    assert_eq!(number(&sectors, "sectors"), (128 << 20) / 512, "{all}");
    assert_eq!(field(&status, "status"), "0", "{all}");
    assert_eq!(field(&wrote, "md5"), field(&read, "md5"), "{all}");
    // Completions arrived as MSI-X interrupts on an I/O queue's vector.
    assert!(number(&irqs, "irqs") > 0, "{all}");
    assert!(
        all.lines()
            .any(|l| l.contains("EMBER-TEST interrupts") && l.contains("MSI")),
        "{all}"
    );
    assert_eq!(field(&carrier, "carrier"), "1", "{all}");
    assert_eq!(field(&carrier, "driver"), "e1000e", "{all}");
    // The NIC's interrupts (the link change among them) came as MSI-X.
    assert_eq!(field(&nic_irq, "kind"), "msix,", "{all}");
    assert!(number(&nic_irq, "irqs") > 0, "{all}");
    assert!(
        log.contains(&format!(
            "VFIO device \"nvme0\" ({nvme}) passed through as PCI 00:01.0, INTA on GSI 20"
        )),
        "{log}"
    );
    let nic_label = format!("VFIO device \"nic0\" ({nic})");
    assert!(
        log.contains(&format!(
            "{nic_label} passed through as PCI 00:02.0, INTA on GSI 21"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!("{nic_label}: the guest turned MSI-X off")),
        "{log}"
    );

    // The NIC with KVM's irqchip: INTx through a resampling irqfd, ember not on the path.
    // With it, both functions of the e1000's group, now all bound to vfio-pci: one group
    // in the VM's container twice.
    let dir = Scratch::new("linux-vfio-intx");
    let initrd = guest_initrd(images, &dir, &format!("{FUNCTIONS_REPORT}{INTX_REPORT}"));
    let mut cfg = config(
        &images.bzimage,
        &initrd,
        1,
        256,
        "console=ttyS0 reboot=k panic=1",
    );
    cfg["machine-config"]["irqchip"] = "kernel".into();
    cfg["vfio"] = serde_json::json!([
        {"id": "nic0", "sbdf": nic},
        {"id": "g0", "sbdf": first},
        {"id": "g1", "sbdf": second},
    ]);
    let mut vm = LinuxVm::boot_config_with_flags(&dir, &cfg, &["--enable-pci"]);
    let context = assert_intx_worked(&mut vm);
    let (code, log) = vm.wait_exit();
    assert_eq!(code, Some(0), "{context}\n{log}");
    assert!(log.contains("INTA on GSI 20"), "{log}");
    for slot in ["02", "03"] {
        assert!(
            context.contains(&format!(
                "function 0000:00:{slot}.0 id=0x8086:0x100e:0x020000"
            )),
            "{context}"
        );
    }
}

/// On a real host: the function `sbdf` (bound to vfio-pci by the operator) is the guest's
/// 00:01.0 with the host's vendor and device IDs, and ember releases it at exit.
fn passthrough_named(images: &LinuxImages, sbdf: &str) {
    let dir = Scratch::new("linux-vfio-named");
    let initrd = guest_initrd(
        images,
        &dir,
        r#"
f=/sys/bus/pci/devices/0000:00:01.0
echo "EMBER-TEST passed id=$(cat $f/vendor):$(cat $f/device) driver=$(basename "$(readlink $f/driver)")"
poweroff -f
"#,
    );
    let mut cfg = config(
        &images.bzimage,
        &initrd,
        1,
        512,
        "console=ttyS0 reboot=k panic=1",
    );
    cfg["vfio"] = serde_json::json!([{"id": "dev0", "sbdf": sbdf}]);
    let host = |what: &str| {
        let path = format!("/sys/bus/pci/devices/{sbdf}/{what}");
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .trim()
            .to_owned()
    };
    let want = format!("{}:{}", host("vendor"), host("device"));
    let mut vm = LinuxVm::boot_config_with_flags(&dir, &cfg, &["--enable-pci"]);
    let passed = vm.wait_for("EMBER-TEST passed");
    let (code, log) = vm.wait_exit();
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(field(&passed, "id"), want, "{passed}\n{log}");
    let driver = std::fs::read_link(format!("/sys/bus/pci/devices/{sbdf}/driver")).unwrap();
    assert!(
        driver.ends_with("vfio-pci"),
        "back with vfio-pci after exit: {driver:?}"
    );
}

/// VFIO passthrough of real (emulated) PCIe functions through a real IOMMU: the nested host
/// is a q35 machine with an Intel IOMMU, an NVMe controller backed by a file on this side
/// and an e1000e NIC. After the run, the file holds what the guest wrote through the
/// passed-through controller. On a host with hardware virtualization
/// (`EMBER_LINUX_TESTS=direct`) it passes `EMBER_TEST_VFIO_DEVICE` through instead.
#[test]
fn vfio_passthrough_of_an_nvme_controller_and_an_e1000e_nic() {
    const NAME: &str = "vfio_passthrough_of_an_nvme_controller_and_an_e1000e_nic";
    if let Some(images) = common::nested::images_if_runnable_here() {
        passthrough_inside(&images);
        return;
    }
    let dir = Scratch::new("linux-vfio-outer");
    let disk = dir.path("nvme.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(128 << 20))
        .unwrap();
    let console = common::nested::run_self_on_host(
        &["--exact", NAME, "--nocapture", "--test-threads=1"],
        &[],
        &[("NESTED_PASSTHROUGH_DISK", disk.to_str().unwrap())],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        console.contains("test result: ok. 1 passed"),
        "the nested host did not run {NAME}; its output is above"
    );
    let wrote = console
        .lines()
        .find(|l| l.contains("EMBER-TEST nvme wrote"))
        .expect("the guest's md5 of what it wrote");
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c {} '{}' | md5sum",
            64 << 20,
            disk.display()
        ))
        .output()
        .unwrap();
    let on_disk = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        on_disk.split_whitespace().next(),
        Some(field(wrote, "md5")),
        "the host file does not hold what the guest wrote"
    );
}

/// The guest of the snapshot test: a tick with the uptime every half second, and a shell
/// that runs what is typed on the console.
const SNAPSHOT_GUEST: &str = r#"
echo "EMBER-TEST ready root=$(grep ' / ' /proc/mounts | cut -d' ' -f1)"
( i=0; while true; do echo "EMBER-TEST tick $i up=$(cut -d' ' -f1 /proc/uptime | cut -d. -f1)"; i=$((i + 1)); sleep 0.5; done ) &
while true; do
    read -r cmd < /dev/console
    eval "$cmd"
done
"#;

/// Pauses the VM and writes a snapshot of `kind` to `state` and `mem`.
fn linux_snapshot(vm: &LinuxVm, kind: &str, state: &std::path::Path, mem: &std::path::Path) {
    let mut api = vm.api();
    let r = api.call("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(r.status, 204, "{r:?}");
    let body = serde_json::json!({"snapshot_type": kind, "snapshot_path": state,
                                  "mem_file_path": mem});
    let r = api.call("PUT", "/snapshot/create", Some(&body.to_string()));
    assert_eq!(r.status, 204, "{r:?}");
}

/// The uptime (whole seconds) in the next tick line.
fn next_uptime(vm: &mut LinuxVm) -> u64 {
    number(&vm.wait_for("EMBER-TEST tick"), "up")
}

/// Continues the guest from `state` with its memory from `mem` in a new ember; returns it
/// once it ticks again, having checked its uptime goes on from `uptime` (it did not boot
/// again) and that it still answers on its console.
fn linux_restore(
    dir: &Scratch,
    state: &std::path::Path,
    mem: &std::path::Path,
    uptime: u64,
) -> LinuxVm {
    let mut vm = LinuxVm::serve_api(dir);
    let body = serde_json::json!({"snapshot_path": state, "resume_vm": true,
        "mem_backend": {"backend_type": "File", "backend_path": mem}});
    let r = vm
        .api()
        .call("PUT", "/snapshot/load", Some(&body.to_string()));
    assert_eq!(r.status, 204, "{r:?}");
    let up = next_uptime(&mut vm);
    assert!(
        up >= uptime && up < uptime + 30,
        "the restored guest's uptime goes on from {uptime} s: {up} s"
    );
    vm.type_text("echo EMBER-TEST answered $((6*7))\n");
    vm.wait_for("EMBER-TEST answered 42");
    vm
}

#[test]
fn a_linux_guest_continues_from_full_and_diff_snapshots() {
    linux_test(
        "a_linux_guest_continues_from_full_and_diff_snapshots",
        |images| {
            let dir = Scratch::new("linux-snapshot");
            let rootfs = images.rootfs_copy(&dir.0).unwrap();
            let initrd = guest_initrd(images, &dir, SNAPSHOT_GUEST);
            let mut vm = LinuxVm::serve_api(&dir);
            let mut api = vm.api();
            for (path, body) in [
                (
                    "/machine-config",
                    serde_json::json!({"vcpu_count": 2, "mem_size_mib": 256,
                                       "track_dirty_pages": true}),
                ),
                (
                    "/boot-source",
                    serde_json::json!({"kernel_image_path": images.bzimage,
                                       "initrd_path": initrd, "boot_args": BOOT_ARGS}),
                ),
                (
                    "/drives/rootfs",
                    serde_json::json!({"drive_id": "rootfs", "path_on_host": rootfs,
                                       "is_root_device": true, "is_read_only": false}),
                ),
                (
                    "/actions",
                    serde_json::json!({"action_type": "InstanceStart"}),
                ),
            ] {
                let r = api.call("PUT", path, Some(&body.to_string()));
                assert_eq!(r.status, 204, "PUT {path}: {r:?}");
            }
            let ready = vm.wait_for("EMBER-TEST ready");
            assert_eq!(field(&ready, "root"), "/dev/vda", "{ready}");
            vm.wait_for("EMBER-TEST tick 2");

            // A full snapshot, and the disk as it was then (the guest's page cache in the
            // snapshot belongs with it).
            let (full_state, full_mem) = (dir.path("full.state"), dir.path("full.mem"));
            let up_full = next_uptime(&mut vm);
            linux_snapshot(&vm, "Full", &full_state, &full_mem);
            std::fs::copy(&rootfs, dir.path("rootfs-at-full")).unwrap();
            let r = api.call("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
            assert_eq!(r.status, 204, "{r:?}");

            // The guest writes a file, then a diff snapshot on top of the full one.
            vm.type_text("echo one > /mark; sync; echo EMBER-TEST marked $(cat /mark)\n");
            vm.wait_for("EMBER-TEST marked one");
            let up_diff = next_uptime(&mut vm);
            let (diff_state, diff_mem) = (dir.path("diff.state"), dir.path("diff.mem"));
            linux_snapshot(&vm, "Diff", &diff_state, &diff_mem);
            std::fs::copy(&rootfs, dir.path("rootfs-at-diff")).unwrap();
            drop(api);
            drop(vm);

            // From the full snapshot: it runs, answers, and its disk works.
            std::fs::copy(dir.path("rootfs-at-full"), &rootfs).unwrap();
            let mut restored = linux_restore(&dir, &full_state, &full_mem, up_full);
            // (The quotes keep the console's echo of the command from matching.)
            restored.type_text(
                "echo two > /mark2; sync; echo 3 > /proc/sys/vm/drop_caches; echo EMBER-TEST \"disk=$(cat /mark2) before=$(cat /mark 2>/dev/null || echo none)\"\n",
            );
            let disk = restored.wait_for("EMBER-TEST disk=");
            assert_eq!(field(&disk, "disk"), "two", "{disk}");
            assert_eq!(field(&disk, "before"), "none", "{disk}");
            drop(restored);

            // The diff laid over the full memory file: the guest as it was at the diff,
            // with the file it wrote after the full snapshot.
            std::fs::copy(dir.path("rootfs-at-diff"), &rootfs).unwrap();
            let out = std::process::Command::new(EMBER)
                .arg("--rebase-memory")
                .args([&full_mem, &diff_mem])
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            let mut restored = linux_restore(&dir, &diff_state, &full_mem, up_diff);
            restored.type_text("echo EMBER-TEST mark $(cat /mark)\n");
            restored.wait_for("EMBER-TEST mark one");
        },
    );
}

/// The metadata service as a Linux guest uses it, configured the way Firecracker clients
/// do (PUT /network-interfaces, /mmds/config, /mmds, then start): V2, so a request without
/// a session token is refused; a token from `PUT /latest/api/token` (busybox nc: busybox
/// wget cannot send PUT) opens it to busybox wget, in IMDS text and in JSON; a PATCH /mmds
/// while the guest runs is what the guest reads next. None of it reaches the TAP.
#[test]
fn mmds_serves_a_linux_guest_over_virtio_net() {
    linux_test("mmds_serves_a_linux_guest_over_virtio_net", |images| {
        let dir = Scratch::new("linux-mmds");
        persistent_tap("tapmmds", "172.16.4.1/30");
        let initrd = guest_initrd(
            images,
            &dir,
            r#"
ip link set eth0 up
ip addr add 172.16.4.2/30 dev eth0
ip route add 169.254.169.254 dev eth0
md=http://169.254.169.254
token() {
    printf 'PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\nX-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n' |
        nc 169.254.169.254 80 | tail -n 1
}
get() { wget -q -O - --header "X-metadata-token: $TOKEN" "$@"; }
echo "EMBER-TEST mmds no-token=$(wget -O - $md/latest/meta-data/ 2>&1 | grep -o '40[0-9][^"]*' | head -1)"
TOKEN=$(token)
echo "EMBER-TEST mmds token-length=${#TOKEN}"
echo "EMBER-TEST mmds list=$(get $md/latest/meta-data/ | tr '\n' ',')"
echo "EMBER-TEST mmds ami=$(get $md/latest/meta-data/ami-id)"
echo "EMBER-TEST mmds json=$(get --header 'Accept: application/json' $md/latest/meta-data/ami-id)"
echo "EMBER-TEST mmds bad-token=$(wget -O - --header 'X-metadata-token: nope' $md/latest/meta-data/ 2>&1 | grep -o '40[0-9][^"]*' | head -1)"
echo "EMBER-TEST type go"
read -r go < /dev/console
echo "EMBER-TEST mmds patched=$(get $md/latest/meta-data/ami-id) new=$(get $md/latest/meta-data/zone)"
poweroff -f
"#,
        );
        let mut vm = LinuxVm::serve_api(&dir);
        let mut api = vm.api();
        let mut call = |method: &str, path: &str, body: serde_json::Value| {
            let r = api.call(method, path, Some(&body.to_string()));
            assert_eq!(r.status, 204, "{method} {path}: {r:?}");
        };
        call(
            "PUT",
            "/machine-config",
            serde_json::json!({"vcpu_count": 1, "mem_size_mib": 256}),
        );
        call(
            "PUT",
            "/boot-source",
            serde_json::json!({"kernel_image_path": images.bzimage, "initrd_path": initrd,
                               "boot_args": BOOT_ARGS}),
        );
        call(
            "PUT",
            "/network-interfaces/eth0",
            serde_json::json!({"iface_id": "eth0", "host_dev_name": "tapmmds",
                               "guest_mac": "06:00:AC:10:04:02"}),
        );
        call(
            "PUT",
            "/mmds/config",
            serde_json::json!({"version": "V2", "network_interfaces": ["eth0"]}),
        );
        call(
            "PUT",
            "/mmds",
            serde_json::json!({"latest": {"meta-data": {"ami-id": "ami-12345678",
                               "placement": {"zone": "edge-1"}}}}),
        );
        // Everything the guest sends to the TAP, to check none of it was for the service.
        let tap = common::netns::PacketSocket::bind_all("tapmmds").expect("packet socket");
        call(
            "PUT",
            "/actions",
            serde_json::json!({"action_type": "InstanceStart"}),
        );
        let no_token = vm.wait_for("EMBER-TEST mmds no-token");
        assert!(no_token.contains("401"), "{no_token}");
        let token = vm.wait_for("EMBER-TEST mmds token-length");
        assert!(number(&token, "token-length") >= 32, "{token}");
        let list = vm.wait_for("EMBER-TEST mmds list");
        assert_eq!(field(&list, "list"), "ami-id,placement/", "{list}");
        let ami = vm.wait_for("EMBER-TEST mmds ami");
        assert_eq!(field(&ami, "ami"), "ami-12345678", "{ami}");
        let json = vm.wait_for("EMBER-TEST mmds json");
        assert_eq!(field(&json, "json"), "\"ami-12345678\"", "{json}");
        let bad = vm.wait_for("EMBER-TEST mmds bad-token");
        assert!(bad.contains("401"), "{bad}");
        vm.wait_for("EMBER-TEST type go");
        let r = vm.api().call(
            "PATCH",
            "/mmds",
            Some(r#"{"latest": {"meta-data": {"ami-id": "ami-87654321", "zone": "edge-2"}}}"#),
        );
        assert_eq!(r.status, 204, "{r:?}");
        vm.type_text("go\n");
        let patched = vm.wait_for("EMBER-TEST mmds patched");
        assert_eq!(field(&patched, "patched"), "ami-87654321", "{patched}");
        assert_eq!(field(&patched, "new"), "edge-2", "{patched}");
        let (code, log) = vm.wait_exit();
        assert_eq!(code, Some(0), "{log}");
        let service = [169u8, 254, 169, 254];
        let mut frames = 0;
        while let Some(f) = tap.receive(Duration::from_millis(200)) {
            frames += 1;
            let ipv4_to_service =
                f.len() >= 34 && f[12..14] == [0x08, 0x00] && f[30..34] == service;
            let arp_for_service =
                f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[38..42] == service;
            assert!(
                !ipv4_to_service && !arp_for_service,
                "a frame for the metadata service reached the TAP: {f:02x?}"
            );
        }
        println!("{frames} other frames reached the TAP");
        let _ = std::process::Command::new("ip")
            .args(["link", "delete", "tapmmds"])
            .status();
    });
}

/// The entropy device as Linux uses it: the guest's hw_random core picks virtio-rng,
/// `/dev/hwrng` gives bytes that do not compress (random, not zeros), and the device's
/// rate limiter (8 KiB per second here) holds: 32 KiB take at least three refills.
#[test]
fn entropy_device_feeds_dev_hwrng_within_its_rate_limit() {
    linux_test(
        "entropy_device_feeds_dev_hwrng_within_its_rate_limit",
        |images| {
            let dir = Scratch::new("linux-entropy");
            let initrd = guest_initrd(
                images,
                &dir,
                r#"
centis() { cut -d' ' -f1 /proc/uptime | tr -d .; }
echo "EMBER-TEST rng current=$(cat /sys/class/misc/hw_random/rng_current)"
echo "EMBER-TEST rng sample=$(head -c 4096 /dev/hwrng | wc -c) packed=$(head -c 4096 /dev/hwrng | gzip -9 | wc -c)"
t0=$(centis)
got=$(dd if=/dev/hwrng bs=1024 count=32 iflag=fullblock 2>/dev/null | wc -c)
echo "EMBER-TEST rng limited=$got centis=$(( $(centis) - t0 ))"
poweroff -f
"#,
            );
            let mut cfg = config(&images.bzimage, &initrd, 1, 256, BOOT_ARGS);
            cfg["entropy"] = serde_json::json!({
                "rate_limiter": {"bandwidth": {"size": 8192, "refill_time": 1000}}
            });
            let mut vm = LinuxVm::boot_config(&dir, &cfg);
            let current = vm.wait_for("EMBER-TEST rng current");
            assert!(
                field(&current, "current").starts_with("virtio_rng"),
                "{current}"
            );
            let sample = vm.wait_for("EMBER-TEST rng sample");
            assert_eq!(number(&sample, "sample"), 4096, "{sample}");
            // Random bytes do not compress; 4 KiB of one value would shrink to a few dozen.
            assert!(number(&sample, "packed") > 4000, "{sample}");
            let limited = vm.wait_for("EMBER-TEST rng limited");
            assert_eq!(number(&limited, "limited"), 32768, "{limited}");
            // The sample's 8 KiB already spent the first second's budget; 32 KiB more at 8 KiB
            // per second cannot take less than about three seconds.
            assert!(number(&limited, "centis") >= 250, "{limited}");
            let (code, log) = vm.wait_exit();
            assert_eq!(code, Some(0), "{log}");
            assert!(log.contains("entropy device"), "{log}");
        },
    );
}

/// The bytes of vsock test stream `seed`, position `i` on.
fn vsock_pattern(seed: u64, from: usize, len: usize) -> Vec<u8> {
    (from..from + len)
        .map(|i| {
            (i as u64)
                .wrapping_mul(31)
                .wrapping_add(seed * 7 + (i as u64 >> 9)) as u8
        })
        .collect()
}

/// A host-initiated connection to guest port `port` through ember's socket `uds`: the
/// `CONNECT`/`OK` handshake, then `len` bytes of stream `seed` written while the guest's
/// echo is read back, compared byte for byte.
fn vsock_echo_from_host(uds: &std::path::Path, port: u32, len: usize, seed: u64) {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(uds).expect("connect to uds_path");
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut ok = String::new();
    reader.read_line(&mut ok).expect("the handshake's answer");
    let local: u32 = ok
        .strip_prefix("OK ")
        .and_then(|p| p.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("handshake answer {ok:?}"));
    assert!(local > 0, "{ok:?}");
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        for at in (0..len).step_by(16 << 10) {
            let n = (16 << 10).min(len - at);
            writer.write_all(&vsock_pattern(seed, at, n)).unwrap();
        }
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut back = Vec::with_capacity(len);
    reader.read_to_end(&mut back).expect("read the echo");
    sender.join().unwrap();
    assert_eq!(back.len(), len, "stream {seed}: echoed length");
    assert!(
        back == vsock_pattern(seed, 0, len),
        "stream {seed}: echoed bytes differ"
    );
}

/// ember's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// virtio-vsock with a real Linux guest (its vsock drivers; `vsock-test`, a static program
/// in the guest's initramfs, since busybox has no AF_VSOCK): host-initiated connections
/// through `uds_path` with the CONNECT/OK handshake, one of 1 MiB and 64 at once, echoed
/// back intact; a guest-initiated connection to `uds_path_6000` both ways; one to a port
/// nobody listens on refused; and a guest that never reads makes the host's writes stop
/// instead of growing ember's memory.
#[test]
fn vsock_carries_streams_both_ways_with_a_linux_guest() {
    linux_test(
        "vsock_carries_streams_both_ways_with_a_linux_guest",
        |images| {
            use std::io::{BufRead, BufReader, Read, Write};
            let dir = Scratch::new("linux-vsock");
            let uds = dir.path("v.sock");
            // Guest-initiated connections to port 6000: an echo on uds_path_6000.
            let listener =
                std::os::unix::net::UnixListener::bind(format!("{}_6000", uds.display())).unwrap();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(mut conn) = conn else { break };
                    std::thread::spawn(move || {
                        let mut out = conn.try_clone().unwrap();
                        let _ = std::io::copy(&mut conn, &mut out);
                        let _ = out.shutdown(std::net::Shutdown::Write);
                    });
                }
            });
            let initrd = guest_initrd(
                images,
                &dir,
                r#"
vsock-test echo 5000 &
vsock-test stall 7000 &
sleep 1
echo "EMBER-TEST vsock ready"
echo "EMBER-TEST vsock guest-initiated $(vsock-test send 2 6000 1048576)"
echo "EMBER-TEST vsock no-listener $(vsock-test send 2 6001 10)"
echo "EMBER-TEST type go"
read -r go < /dev/console
poweroff -f
"#,
            );
            let mut cfg = config(&images.bzimage, &initrd, 2, 256, BOOT_ARGS);
            cfg["vsock"] = serde_json::json!({"guest_cid": 3, "uds_path": uds});
            let mut vm = LinuxVm::boot_config(&dir, &cfg);
            vm.wait_for("EMBER-TEST vsock ready");

            let guest = vm.wait_for("EMBER-TEST vsock guest-initiated");
            assert!(
                guest.contains("sent=1048576 got=1048576 match=yes"),
                "{guest}"
            );
            let refused = vm.wait_for("EMBER-TEST vsock no-listener");
            assert!(refused.contains("sent=0 got=0 match=no"), "{refused}");

            vsock_echo_from_host(&uds, 5000, 1 << 20, 1);
            let parallel: Vec<_> = (0..64u64)
                .map(|seed| {
                    let uds = uds.clone();
                    std::thread::spawn(move || {
                        vsock_echo_from_host(&uds, 5000, 64 << 10, seed + 100)
                    })
                })
                .collect();
            for t in parallel {
                t.join().expect("a parallel stream failed");
            }
            println!("vsock: 1 MiB and 64 x 64 KiB echoed");

            // A guest that accepts and never reads: the host's writes stop (the socket buffer
            // fills) once the guest's credit is spent, and ember holds no growing backlog.
            let rss_before = rss_kib(vm.pid());
            let mut stall = std::os::unix::net::UnixStream::connect(&uds).unwrap();
            stall.write_all(b"CONNECT 7000\n").unwrap();
            let mut ok = String::new();
            BufReader::new(stall.try_clone().unwrap())
                .read_line(&mut ok)
                .unwrap();
            assert!(ok.starts_with("OK "), "{ok:?}");
            stall.set_nonblocking(true).unwrap();
            let chunk = vec![0x5a; 64 << 10];
            let mut accepted = 0usize;
            let mut idle_since = std::time::Instant::now();
            while idle_since.elapsed() < Duration::from_secs(3) && accepted < (256 << 20) {
                match stall.write(&chunk) {
                    Ok(n) => {
                        accepted += n;
                        idle_since = std::time::Instant::now();
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(e) => panic!("write to a stalled connection: {e}"),
                }
            }
            let grown = rss_kib(vm.pid()).saturating_sub(rss_before);
            println!(
                "vsock: a stalled guest took {} KiB; ember grew {grown} KiB",
                accepted >> 10
            );
            assert!(
                accepted < (32 << 20),
                "{accepted} bytes went into a stalled connection"
            );
            assert!(
                grown < 16 << 10,
                "ember grew {grown} KiB behind a stalled guest"
            );
            let mut rest = Vec::new();
            stall.set_nonblocking(false).unwrap();
            stall
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let _ = stall.read_to_end(&mut rest);
            assert!(rest.is_empty(), "the stalled guest answered {rest:?}");

            vm.type_text("go\n");
            let (code, log) = vm.wait_exit();
            assert_eq!(code, Some(0), "{log}");
        },
    );
}
