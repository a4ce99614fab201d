//! A real Linux guest. These tests need a host with hardware virtualization (guest code in
//! KVM's instruction emulator is far too slow for a kernel) and a kernel in
//! `EMBER_TEST_KERNEL` (`tools/debian-kernel.sh` fetches one); they skip with a printed
//! reason elsewhere. `EMBER_TEST_ROOTFS` adds a root file system test.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;

/// How long a kernel may take to get where a test expects it.
const LINUX_DEADLINE: Duration = Duration::from_secs(60);

fn env_path(name: &str) -> Option<PathBuf> {
    match std::env::var_os(name) {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!(
                "skipped: {name} is not set (needs a Linux guest and hardware virtualization)"
            );
            None
        }
    }
}

/// Boots `config` and reads the console until a line contains `want`; returns the console
/// text and ember's exit code (after a SIGTERM if the guest did not stop by itself).
fn boot_until(config: &str, want: &str) -> (String, Option<i32>) {
    let dir = Scratch::new("linux");
    let path = dir.write("vm.json", config);
    let mut child = ember_command(&["--no-api", "--config-file", path.to_str().unwrap()])
        .spawn()
        .expect("spawn ember");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    let mut console = String::new();
    while start.elapsed() < LINUX_DEADLINE {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                console.push_str(&line);
                console.push('\n');
                if line.contains(want) {
                    break;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    // Give a rebooting guest a moment to end the VM by itself.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && child.try_wait().ok().flatten().is_none() {
        std::thread::sleep(Duration::from_millis(50));
    }
    if child.try_wait().ok().flatten().is_none() {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    }
    let status = child.wait().expect("wait for ember");
    (console, status.code())
}

#[test]
fn kernel_boots_and_its_panic_reboot_ends_the_vm() {
    let Some(kernel) = env_path("EMBER_TEST_KERNEL") else {
        return;
    };
    // No root device: the kernel panics, and with panic=1 reboot=k it resets through the
    // i8042 a second later, which ends the VM cleanly.
    let config = config_json(&kernel, 2, 512, "console=ttyS0 reboot=k panic=1 pci=off");
    let (console, code) = boot_until(&config, "Rebooting in");
    assert!(console.contains("Linux version"), "{console}");
    assert!(
        console.contains("smpboot: Allowing 2 CPUs") || console.contains("2 CPUs"),
        "{console}"
    );
    assert_eq!(code, Some(0), "{console}");
}

#[test]
fn kernel_mounts_a_virtio_blk_root() {
    let (Some(kernel), Some(rootfs)) =
        (env_path("EMBER_TEST_KERNEL"), env_path("EMBER_TEST_ROOTFS"))
    else {
        return;
    };
    let mut config: serde_json::Value = serde_json::from_str(&config_json(
        &kernel,
        2,
        512,
        "console=ttyS0 reboot=k panic=1 pci=off",
    ))
    .unwrap();
    config["drives"] = serde_json::json!([{
        "drive_id": "rootfs", "path_on_host": rootfs, "is_root_device": true, "is_read_only": true
    }]);
    let (console, _) = boot_until(&config.to_string(), "VFS: Mounted root");
    assert!(console.contains("VFS: Mounted root"), "{console}");
    assert!(console.contains("vda"), "{console}");
}
