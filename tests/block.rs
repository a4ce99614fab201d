//! virtio-blk end to end: the probe guest finds each drive through the command line, drives
//! it with a polling virtio-mmio driver and checks reads, writes, flushes, read-only drives
//! and the end of the disk from inside the VM.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

/// Checks the probe always runs (longmode, zeropage, cmdline, e820, memory, cpuid, mptable).
const BASE_CHECKS: usize = PROBE_CHECKS;
/// The `virtio` check plus six `blk<n>.*` checks per device.
fn expected_checks(devices: usize) -> usize {
    BASE_CHECKS + 1 + PROBE_CHECKS_PER_BLOCK_DEVICE * devices
}

/// The pattern the probe writes to sector `s` (1..=8) of device `n`.
fn written_byte(s: usize, k: usize, n: usize) -> u8 {
    ((s * 7 + k + n * 13) & 0xff) as u8
}

fn assert_written(path: &Path, n: usize) {
    let img = std::fs::read(path).unwrap();
    for s in 1..=8 {
        for k in 0..512 {
            assert_eq!(
                img[s * 512 + k],
                written_byte(s, k, n),
                "sector {s} byte {k} of {path:?}"
            );
        }
    }
}

struct Drive {
    id: &'static str,
    path: PathBuf,
    root: bool,
    read_only: bool,
    extra: serde_json::Value,
}

fn config(drives: &[Drive], extra_args: &str) -> String {
    let mut args = format!("probe.blk={}", drives.len());
    // Device n is the n-th in command-line order: the root drive first, then the others.
    let mut ordered: Vec<&Drive> = drives.iter().filter(|d| d.root).collect();
    ordered.extend(drives.iter().filter(|d| !d.root));
    for (n, d) in ordered.iter().enumerate() {
        args.push_str(&format!(" probe.blk{n}.id={}", d.id));
    }
    args.push(' ');
    args.push_str(extra_args);
    let mut cfg: serde_json::Value = serde_json::from_str(&config_json(
        &probe_elf(),
        2,
        256,
        &probe_args(2, 256, args.trim_end()),
    ))
    .unwrap();
    cfg["drives"] = drives
        .iter()
        .map(|d| {
            let mut v = serde_json::json!({
                "drive_id": d.id,
                "path_on_host": d.path,
                "is_root_device": d.root,
                "is_read_only": d.read_only,
            });
            for (k, val) in d.extra.as_object().unwrap() {
                v[k] = val.clone();
            }
            v
        })
        .collect();
    cfg.to_string()
}

fn none() -> serde_json::Value {
    serde_json::json!({})
}

#[test]
fn one_root_drive_read_write() {
    let dir = Scratch::new("blk1");
    let path = disk_image(&dir, "root.img", 0, 2048);
    let drives = [Drive {
        id: "rootfs",
        path: path.clone(),
        root: true,
        read_only: false,
        extra: none(),
    }];
    let r = boot_config(&config(&drives, ""));
    r.assert_probe_passed(expected_checks(1));
    assert!(
        r.stdout
            .contains("PROBE blk0.init ok cap=2048 ro=0 flush=0"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("PROBE blk0.id ok id=rootfs"),
        "{}",
        r.stdout
    );
    // The guest saw the device announced and the root device named.
    let cmdline = r.line_starting("PROBE cmdline ok").unwrap();
    assert!(
        cmdline.contains("virtio_mmio.device=4K@0xd0000000:5 root=/dev/vda rw"),
        "{cmdline}"
    );
    assert_written(&path, 0);
}

#[test]
fn three_drives_read_only_writeback_and_async() {
    let dir = Scratch::new("blk3");
    let data = disk_image(&dir, "data.img", 1, 16);
    let root = disk_image(&dir, "root.img", 0, 4096);
    let scratch = disk_image(&dir, "scratch.img", 2, 64);
    let ro_before = std::fs::read(&data).unwrap();
    // Root listed last on purpose: it must still become device 0 (/dev/vda).
    let drives = [
        Drive {
            id: "data",
            path: data.clone(),
            root: false,
            read_only: true,
            extra: none(),
        },
        Drive {
            id: "scratch",
            path: scratch.clone(),
            root: false,
            read_only: false,
            extra: serde_json::json!({"cache_type": "Writeback", "io_engine": "Async"}),
        },
        Drive {
            id: "rootfs",
            path: root.clone(),
            root: true,
            read_only: false,
            extra: serde_json::json!({"cache_type": "Writeback", "partuuid": "0eaa91a0-01"}),
        },
    ];
    let metrics = dir.path("metrics.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&config(&drives, "")).unwrap();
    cfg["metrics"] = serde_json::json!({"metrics_path": metrics});
    let r = boot_config(&cfg.to_string());
    r.assert_probe_passed(expected_checks(3));
    assert!(
        r.stdout
            .contains("PROBE blk0.init ok cap=4096 ro=0 flush=1"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("PROBE blk0.write ok sectors=1-8 flushed=1"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("PROBE blk1.init ok cap=16 ro=1 flush=0"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("PROBE blk1.readonly ok refused=ioerr"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("PROBE blk2.id ok id=scratch"),
        "{}",
        r.stdout
    );
    let cmdline = r.line_starting("PROBE cmdline ok").unwrap();
    assert!(
        cmdline.contains("root=PARTUUID=0eaa91a0-01 rw"),
        "{cmdline}"
    );
    assert!(
        cmdline.contains("virtio_mmio.device=4K@0xd0002000:7"),
        "{cmdline}"
    );
    assert_written(&root, 0);
    assert_written(&scratch, 2);
    assert_eq!(
        std::fs::read(&data).unwrap(),
        ro_before,
        "read-only drive changed"
    );
    // Each drive is counted on its own, and in the sum over drives. The probe writes
    // sectors 1-8 of every writable drive and tries one write on the read-only one.
    let text = std::fs::read_to_string(&metrics).unwrap();
    let flushed: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let total = |key: &str, field: &str| -> u64 {
        flushed
            .iter()
            .map(|l| {
                l[key][field]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{key}.{field}: {l}"))
            })
            .sum()
    };
    for id in ["rootfs", "scratch"] {
        assert!(
            total(&format!("block_{id}"), "write_bytes") >= 8 * 512,
            "{text}"
        );
    }
    assert_eq!(total("block_data", "write_bytes"), 0, "{text}");
    // Every drive gets the probe's request past its end; the read-only one also its write.
    assert_eq!(
        total("block_data", "invalid_reqs_count"),
        total("block_rootfs", "invalid_reqs_count") + 1,
        "{text}"
    );
    assert!(total("block_rootfs", "flush_count") >= 1, "{text}");
    for field in [
        "read_bytes",
        "write_bytes",
        "invalid_reqs_count",
        "flush_count",
    ] {
        assert_eq!(
            total("block", field),
            ["rootfs", "scratch", "data"]
                .iter()
                .map(|id| total(&format!("block_{id}"), field))
                .sum::<u64>(),
            "block.{field} is not the sum over drives: {text}"
        );
    }
    // The Async drive must really use io_uring: a silent fallback to synchronous I/O
    // would pass every check above.
    if r.stderr.contains("falling back") {
        cannot_run(&format!("io_uring is not available: {}", r.stderr));
        return;
    }
    assert!(
        r.stderr.contains("scratch.img (64 sectors, io_uring I/O)"),
        "the Async drive does not use io_uring:\n{}",
        r.stderr
    );
}

#[test]
fn rate_limited_drive_still_completes() {
    let dir = Scratch::new("blkrl");
    let path = disk_image(&dir, "root.img", 0, 256);
    let limiter = serde_json::json!({"rate_limiter": {
        "ops": {"size": 2, "refill_time": 20},
        "bandwidth": {"size": 8192, "refill_time": 20}
    }});
    let drives = [Drive {
        id: "rootfs",
        path: path.clone(),
        root: true,
        read_only: false,
        extra: limiter,
    }];
    let r = boot_config(&config(&drives, ""));
    r.assert_probe_passed(expected_checks(1));
    assert_written(&path, 0);
}

#[test]
fn flushed_writes_survive_sigkill() {
    let dir = Scratch::new("blkkill");
    let path = disk_image(&dir, "root.img", 0, 512);
    let drives = [Drive {
        id: "rootfs",
        path: path.clone(),
        root: true,
        read_only: false,
        extra: serde_json::json!({"cache_type": "Writeback"}),
    }];
    let cfg = dir.write("vm.json", config(&drives, "probe.wait=serial"));
    let mut child = ember_command(&["--no-api", "--config-file", cfg.to_str().unwrap()])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        assert_ne!(
            out.read_line(&mut line).unwrap(),
            0,
            "ember exited early: {lines:#?}"
        );
        let done = line.starts_with("PROBE DONE");
        lines.push(line);
        if done {
            break;
        }
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("PROBE blk0.write ok sectors=1-8 flushed=1")),
        "{lines:#?}"
    );
    // No chance to flush anything on the way out.
    child.kill().unwrap();
    child.wait().unwrap();
    assert_written(&path, 0);
}

/// SIGKILL keeps the host's page cache, so `flushed_writes_survive_sigkill` cannot tell a
/// flush that reached the disk from one that did not. This counts what ember asks of the
/// host kernel instead: the guest's flush on a Writeback drive becomes an fsync of the
/// backing file; on an Unsafe drive (no flush offered to the guest) none is issued.
#[test]
fn guest_flush_becomes_fsync_of_the_backing_file() {
    if Command::new("strace").arg("-V").output().is_err() {
        cannot_run("strace is not installed");
        return;
    }
    for (cache_type, expect_fsync) in [("Writeback", true), ("Unsafe", false)] {
        let dir = Scratch::new(&format!("blkfsync-{cache_type}"));
        let path = disk_image(&dir, "root.img", 0, 512);
        let drives = [Drive {
            id: "rootfs",
            path: path.clone(),
            root: true,
            read_only: false,
            extra: serde_json::json!({"cache_type": cache_type}),
        }];
        let cfg = dir.write("vm.json", config(&drives, ""));
        let trace = dir.path("trace");
        let child = Command::new("strace")
            .args([
                "-f",
                "-qq",
                "-e",
                "trace=fsync,fdatasync,sync_file_range",
                "-o",
            ])
            .arg(&trace)
            .args([EMBER, "--no-api", "--config-file"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run strace");
        let r = wait_with_deadline(child, RUN_DEADLINE);
        r.assert_probe_passed(expected_checks(1));
        let flushed = r
            .probe_lines()
            .iter()
            .any(|l| l.starts_with("PROBE blk0.write ok sectors=1-8 flushed=1"));
        assert_eq!(flushed, expect_fsync, "{cache_type}: {}", r.stdout);
        let calls = std::fs::read_to_string(&trace).expect("strace output");
        let fsyncs = calls
            .lines()
            .filter(|l| l.contains("fsync(") || l.contains("fdatasync("))
            .count();
        if expect_fsync {
            assert!(fsyncs >= 1, "{cache_type}: no fsync issued:\n{calls}");
        } else {
            assert_eq!(fsyncs, 0, "{cache_type}: unexpected fsync:\n{calls}");
        }
    }
}

#[test]
fn missing_drive_file_is_a_configuration_error() {
    let drives = [Drive {
        id: "rootfs",
        path: "/nonexistent/root.img".into(),
        root: true,
        read_only: false,
        extra: none(),
    }];
    let r = boot_config(&config(&drives, ""));
    assert_fails(
        &r,
        3,
        "drive \"rootfs\": cannot open backing file /nonexistent/root.img",
    );
}

/// Mounts a tmpfs of `size` at `dir` for the life of the guard; None where mounting is not
/// allowed (not root).
struct TmpfsMount(PathBuf);

impl TmpfsMount {
    fn new(dir: &Path, size: &str) -> Option<Self> {
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "ember-test",
                dir.to_str()?,
            ])
            .status()
            .ok()?
            .success();
        ok.then(|| TmpfsMount(dir.to_owned()))
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn host_enospc_becomes_ioerr_and_the_vm_goes_on() {
    let dir = Scratch::new("enospc");
    let mnt = dir.path("full");
    std::fs::create_dir(&mnt).unwrap();
    let Some(_mount) = TmpfsMount::new(&mnt, "8k") else {
        cannot_run("cannot mount a tmpfs here (needs root)");
        return;
    };
    // A sparse disk whose first page holds sector 0's pattern, on a filesystem with one
    // page left, which the filler takes: the probe's write to sectors 1-8 runs out of space.
    let img = disk_image(&dir, "src.img", 0, 8);
    let disk = mnt.join("disk.img");
    std::fs::copy(&img, &disk).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.set_len(1 << 20).unwrap();
    let _ = std::fs::write(mnt.join("filler"), vec![1u8; 4096]);
    let drives = [Drive {
        id: "rootfs",
        path: disk,
        root: true,
        read_only: false,
        extra: none(),
    }];
    let r = boot_config(&config(&drives, ""));
    assert_eq!(r.code(), Some(0), "{r:#?}");
    assert!(r.stdout.contains("PROBE blk0.read0 ok"), "{}", r.stdout);
    let write = r.line_starting("PROBE blk0.write").unwrap();
    assert!(
        write.contains("FAIL") && write.to_lowercase().contains("ioerr"),
        "{write}"
    );
    // Reads still work after the failed write.
    assert!(r.stdout.contains("PROBE blk0.eod ok"), "{}", r.stdout);
    assert!(r.stderr.contains("No space left on device"), "{}", r.stderr);
}
