//! Every bad input the boot path can meet gives a clear one-line error, a documented
//! non-zero exit code, and never a panic or a guest that runs anyway.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const BAD_ARGUMENTS: i32 = 2;
const BAD_CONFIGURATION: i32 = 3;
const HOST_UNSUITABLE: i32 = 4;

fn config_value(machine: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "boot-source": {"kernel_image_path": probe_elf(), "boot_args": probe_args(1, 128, "")},
        "machine-config": machine,
    })
}

fn config_with(machine: serde_json::Value) -> String {
    config_value(machine).to_string()
}

/// A valid one-vCPU, 128 MiB probe config to spoil in one place.
fn valid_config() -> serde_json::Value {
    config_value(serde_json::json!({"vcpu_count": 1, "mem_size_mib": 128}))
}

#[test]
fn missing_kernel() {
    let r = boot_config(&config_json("/nonexistent/vmlinux".as_ref(), 1, 128, "x=1"));
    assert_fails(
        &r,
        BAD_CONFIGURATION,
        "cannot open kernel image /nonexistent/vmlinux: No such file or directory",
    );
}

#[test]
fn kernel_is_a_directory() {
    let dir = Scratch::new("kdir");
    let r = boot_config(&config_json(&dir.0, 1, 128, "x=1"));
    assert_fails(&r, BAD_CONFIGURATION, "is a directory, not a regular file");
}

#[test]
fn kernel_neither_elf_nor_bzimage() {
    let dir = Scratch::new("garbage");
    let kernel = dir.write(
        "vmlinux",
        b"#!/bin/sh\necho this is not a kernel\n".repeat(100),
    );
    let r = boot_config(&config_json(&kernel, 1, 128, "x=1"));
    assert_fails(
        &r,
        BAD_CONFIGURATION,
        "is neither an ELF vmlinux nor a bzImage",
    );
}

#[test]
fn truncated_elf_kernel() {
    let dir = Scratch::new("trunc");
    let elf = std::fs::read(probe_elf()).unwrap();
    // Where the first program header's segment ends in the file.
    let ph = usize::try_from(le_u64(&elf, 0x20)).unwrap();
    let end = le_u64(&elf, ph + 0x08) + le_u64(&elf, ph + 0x20);
    // Cut before the segment's bytes start, and one byte short of its end.
    for cut in [200, usize::try_from(end).unwrap() - 1] {
        let kernel = dir.write("vmlinux", &elf[..cut]);
        assert_kernel_refused(
            &kernel,
            &format!(
                "kernel image {} is truncated: its segment 0 ends at byte {end}, the file has {cut}",
                kernel.display()
            ),
        );
    }
}

#[test]
fn missing_initrd() {
    let mut config = valid_config();
    config["boot-source"]["initrd_path"] = "/nonexistent/initrd".into();
    let r = boot_config(&config.to_string());
    assert_fails(
        &r,
        BAD_CONFIGURATION,
        "cannot open initrd /nonexistent/initrd",
    );
}

#[test]
fn initrd_too_large_for_memory() {
    let dir = Scratch::new("biginitrd");
    let initrd = dir.path("initrd");
    std::fs::File::create(&initrd)
        .unwrap()
        .set_len(200 << 20)
        .unwrap();
    let mut config = valid_config();
    config["boot-source"]["initrd_path"] = initrd.to_str().unwrap().into();
    let r = boot_config(&config.to_string());
    assert_fails(&r, BAD_CONFIGURATION, "does not fit in guest memory");
}

#[test]
fn malformed_json() {
    let r = boot_config("{\"boot-source\": {\"kernel_image_path\": ");
    assert_fails(
        &r,
        BAD_CONFIGURATION,
        "config file is not valid: EOF while parsing",
    );
}

#[test]
fn missing_config_file() {
    let r = run_ember(&["--no-api", "--config-file", "/nonexistent/vm.json"]);
    assert_fails(
        &r,
        BAD_CONFIGURATION,
        "cannot read config file /nonexistent/vm.json",
    );
}

#[test]
fn unknown_fields() {
    let r = boot_config(&config_with(
        serde_json::json!({"vcpu_count": 1, "mem_size_mib": 128, "cpus": 2}),
    ));
    assert_fails(&r, BAD_CONFIGURATION, "unknown field `cpus`");
    let mut config = valid_config();
    config["boot_source"] = serde_json::json!({});
    let r = boot_config(&config.to_string());
    assert_fails(&r, BAD_CONFIGURATION, "unknown field `boot_source`");
}

#[test]
fn vcpu_count_out_of_range() {
    for n in [0, 33] {
        let r = boot_config(&config_with(
            serde_json::json!({"vcpu_count": n, "mem_size_mib": 128}),
        ));
        assert_fails(
            &r,
            BAD_CONFIGURATION,
            &format!("vcpu_count must be between 1 and 32, got {n}"),
        );
    }
    let r = boot_config(&config_with(
        serde_json::json!({"vcpu_count": -1, "mem_size_mib": 128}),
    ));
    assert_fails(&r, BAD_CONFIGURATION, "invalid value: integer `-1`");
}

#[test]
fn mem_size_zero_or_beyond_host() {
    let r = boot_config(&config_with(
        serde_json::json!({"vcpu_count": 1, "mem_size_mib": 0}),
    ));
    assert_fails(&r, BAD_CONFIGURATION, "mem_size_mib must be greater than 0");
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let host_kib: u64 = meminfo
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let too_much = host_kib / 1024 + 1024;
    let r = boot_config(&config_with(
        serde_json::json!({"vcpu_count": 1, "mem_size_mib": too_much}),
    ));
    assert_fails(
        &r,
        HOST_UNSUITABLE,
        &format!("mem_size_mib {too_much} is more than this host's"),
    );
}

#[test]
fn command_line_too_long() {
    let args = format!("{} {}", probe_args(1, 128, ""), "x".repeat(2048));
    let r = boot_config(&config_json(&probe_elf(), 1, 128, &args));
    assert_fails(
        &r,
        BAD_CONFIGURATION,
        "the x86 boot protocol allows at most 2047",
    );
}

#[test]
fn unsupported_resource_key() {
    let mut config = valid_config();
    config["balloon"] = serde_json::json!({"amount_mib": 1, "deflate_on_oom": false});
    let r = boot_config(&config.to_string());
    assert_fails(
        &r,
        BAD_CONFIGURATION,
        "config key \"balloon\" is not supported by ember yet",
    );
}

#[test]
fn bad_flags() {
    let r = run_ember(&["--no-api"]);
    assert_fails(&r, BAD_ARGUMENTS, "--config-file");
    let r = run_ember(&["--bogus-flag"]);
    assert_fails(&r, BAD_ARGUMENTS, "unexpected argument '--bogus-flag'");
    let r = run_ember(&["--level", "loud", "--no-api", "--config-file", "x"]);
    assert_fails(&r, BAD_ARGUMENTS, "log level \"loud\"");
}

/// Runs ember through `wrapper` (a command that changes the process's view of /dev/kvm);
/// skips with a printed reason when the wrapper is unavailable here.
fn run_wrapped(wrapper: &[&str], config: &str) -> Option<RunResult> {
    let dir = Scratch::new("kvm");
    let path = dir.write("vm.json", config);
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let probe = Command::new(wrapper[0])
        .args(&wrapper[1..])
        .arg("true")
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        _ => {
            cannot_run(&format!(
                "{} is not usable here (needs root)",
                wrapper.join(" ")
            ));
            return None;
        }
    }
    let mut cmd = Command::new(wrapper[0]);
    cmd.args(&wrapper[1..])
        .arg(EMBER)
        .args(["--no-api", "--config-file", path.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    Some(wait_with_deadline(cmd.spawn().unwrap(), RUN_DEADLINE))
}

#[test]
fn dev_kvm_missing() {
    // A private mount namespace with an empty /dev: /dev/kvm does not exist for ember only.
    let config = config_with(serde_json::json!({"vcpu_count": 1, "mem_size_mib": 128}));
    let wrapper = [
        "unshare",
        "--mount",
        "sh",
        "-c",
        "mount -t tmpfs none /dev && exec \"$0\" \"$@\"",
    ];
    if let Some(r) = run_wrapped(&wrapper, &config) {
        assert_fails(
            &r,
            HOST_UNSUITABLE,
            "cannot open /dev/kvm: No such file or directory",
        );
    }
}

#[test]
fn dev_kvm_not_accessible() {
    // /dev/kvm is root-only on this kind of host; an unprivileged user cannot open it.
    let meta = std::fs::metadata("/dev/kvm").unwrap();
    if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o006 != 0 {
        cannot_run("/dev/kvm is world-accessible here");
        return;
    }
    // The probe file must be readable by that user for the error to be about KVM.
    let config = config_with(serde_json::json!({"vcpu_count": 1, "mem_size_mib": 128}));
    let wrapper = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ];
    if let Some(r) = run_wrapped(&wrapper, &config) {
        assert_fails(
            &r,
            HOST_UNSUITABLE,
            "cannot open /dev/kvm: Permission denied",
        );
    }
}

#[test]
fn unreadable_kernel() {
    let dir = Scratch::new("unreadable");
    let kernel = dir.path("vmlinux");
    std::fs::copy(probe_elf(), &kernel).unwrap();
    std::fs::set_permissions(&kernel, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = config_json(&kernel, 1, 128, "x=1");
    let wrapper = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ];
    if let Some(r) = run_wrapped(&wrapper, &config) {
        assert_fails(&r, BAD_CONFIGURATION, "cannot open kernel image");
        assert!(r.stderr.contains("Permission denied"), "{}", r.stderr);
    }
}

/// A log or metrics path that is a named pipe nobody reads must not hang ember in `open`
/// (the API would stop answering and SIGTERM would go unheard): it fails at once, saying
/// why.
#[test]
fn log_and_metrics_fifos_without_reader_fail_at_once() {
    let dir = Scratch::new("fifo-sinks");
    let fifo = dir.path("sink.fifo");
    let made = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("run mkfifo");
    assert!(made.success(), "mkfifo failed");
    let config = dir.write("vm.json", valid_config().to_string());
    for flag in ["--log-path", "--metrics-path"] {
        let started = std::time::Instant::now();
        let r = run_ember(&[
            "--no-api",
            "--config-file",
            config.to_str().expect("utf-8 path"),
            flag,
            fifo.to_str().expect("utf-8 path"),
        ]);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{flag}: ember took {:?}",
            started.elapsed()
        );
        assert_ne!(r.code(), Some(0), "{flag}: {r:#?}");
        assert!(
            r.stderr.contains("named pipe that no process reads yet"),
            "{flag}: {}",
            r.stderr
        );
        assert!(
            r.probe_lines().is_empty(),
            "{flag}: the guest ran: {}",
            r.stdout
        );
    }
}

/// Boots `kernel` as the probe with `--no-api --config-file` and checks that ember refuses it
/// as invalid configuration, naming the problem, and at once: a kernel that cannot boot must
/// not get a guest that spins until someone kills it.
fn assert_kernel_refused(kernel: &Path, message: &str) {
    let started = Instant::now();
    let r = boot_config(&config_json(kernel, 1, 128, &probe_args(1, 128, "")));
    assert_fails(&r, BAD_CONFIGURATION, message);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "ember took {:?} to refuse {}",
        started.elapsed(),
        kernel.display()
    );
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// A copy of the probe kernel at `from` in `dir`, changed by `patch`.
fn patched_kernel(dir: &Scratch, from: &Path, patch: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut image = std::fs::read(from).unwrap();
    patch(&mut image);
    dir.write("kernel", image)
}

#[test]
fn elf_kernel_for_another_machine() {
    let dir = Scratch::new("aarch64");
    // e_machine, at byte 18: EM_AARCH64. Everything else is the probe, which would boot.
    let kernel = patched_kernel(&dir, &probe_elf(), |elf| {
        elf[18..20].copy_from_slice(&183u16.to_le_bytes())
    });
    assert_kernel_refused(
        &kernel,
        &format!(
            "kernel image {} is an ELF for machine 183 (aarch64), not x86-64",
            kernel.display()
        ),
    );
}

#[test]
fn elf_kernel_segment_outside_guest_ram() {
    let dir = Scratch::new("segram");
    let mut memsz = 0;
    // The probe's second segment (data and bss) moved to 256 MiB, past 128 MiB of RAM.
    let kernel = patched_kernel(&dir, &probe_elf(), |elf| {
        let ph = usize::try_from(le_u64(elf, 0x20)).unwrap() + 56;
        memsz = le_u64(elf, ph + 0x28);
        elf[ph + 0x18..ph + 0x20].copy_from_slice(&0x1000_0000u64.to_le_bytes());
    });
    assert_kernel_refused(
        &kernel,
        &format!(
            "kernel image {}: segment 1 at 0x10000000..{:#x} is not inside guest RAM (0x0..0x8000000)",
            kernel.display(),
            0x1000_0000 + memsz
        ),
    );
}

#[test]
fn elf_kernel_entry_outside_its_segments() {
    let dir = Scratch::new("entry");
    // e_entry at 80 MiB: RAM, but zeros, not the probe's code.
    let kernel = patched_kernel(&dir, &probe_elf(), |elf| {
        elf[0x18..0x20].copy_from_slice(&0x500_0000u64.to_le_bytes())
    });
    assert_kernel_refused(
        &kernel,
        "its entry point 0x5000000 is not inside any segment loaded from the file",
    );
}

#[test]
fn truncated_bzimage_kernel() {
    let dir = Scratch::new("truncbz");
    let bz = std::fs::read(probe_bzimage()).unwrap();
    let setup_sects = u64::from(bz[0x1f1]);
    let syssize = u64::from(u32::from_le_bytes(bz[0x1f4..0x1f8].try_into().unwrap()));
    let announced = (setup_sects + 1) * 512 + syssize * 16;
    let cut = bz.len() / 2;
    let kernel = dir.write("bzImage", &bz[..cut]);
    assert_kernel_refused(
        &kernel,
        &format!(
            "kernel image {} is truncated: its header announces {announced} bytes, the file has {cut}",
            kernel.display()
        ),
    );
}

#[test]
fn bzimage_kernel_without_64_bit_entry() {
    let dir = Scratch::new("bz32");
    // xloadflags bit 0, XLF_KERNEL_64: without it there is no entry point ember can use.
    let kernel = patched_kernel(&dir, &probe_bzimage(), |bz| bz[0x236] &= !1);
    assert_kernel_refused(
        &kernel,
        &format!(
            "kernel image {} has no 64-bit entry point (XLF_KERNEL_64 is clear",
            kernel.display()
        ),
    );
}
