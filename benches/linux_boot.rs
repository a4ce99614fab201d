//! Linux boot benchmark: `cargo bench --bench linux_boot`.
//!
//! ember boots Debian's stock kernel (tools/nested-host/build.sh) with a busybox initramfs
//! whose /init prints the guest's uptime and reboots. Where this host has no hardware
//! virtualization the whole benchmark runs inside a nested host (docs/testing.md), whose
//! emulated timing makes only ratios meaningful. Measured per kernel format (bzImage, ELF
//! through PVH), each reported next to baselines from the same run:
//!
//! - spawn -> the guest's `/init` (the line it prints), spawn -> ember's exit;
//! - the guest's own clock at `/init` (`/proc/uptime`): the kernel's boot, as the kernel
//!   measures it. spawn -> /init over it is what everything outside the running kernel costs
//!   (ember, loading, and for a bzImage the decompressor, which runs before that clock);
//! - optionally Firecracker booting the same ELF kernel and initramfs on the same machine
//!   shape: set `EMBER_BENCH_FIRECRACKER` to a `firecracker` binary inside this repository
//!   (the nested host sees only the repository).
//!
//! `EMBER_BENCH_RUNS` sets the runs per measurement (default 5). Without `--bench` (as in
//! `cargo test --all-targets`) it makes one run of each, as a smoke test.

mod common;
#[path = "../tests/common/nested.rs"]
mod nested;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc::{RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use common::{Result, Running, median, ratio_row, time_header, time_row};
use nested::LinuxImages;

const DEFAULT_RUNS: usize = 5;
const VCPUS: u8 = 2;
const MEM_MIB: u64 = 256;
const BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";
/// The line the guests' /init prints (tools/nested-host/guest-init), then its uptime.
const INIT_LINE: &str = "EMBER-GUEST init uptime=";
/// A boot that takes longer than this inside the nested host is stuck.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

fn main() -> ExitCode {
    common::exit_code("linux_boot", run())
}

fn run() -> Result<()> {
    let runs = if common::invoked_as_bench() {
        common::runs_from_env(DEFAULT_RUNS)?
    } else {
        1
    };
    let Some(images) = nested::images_if_runnable_here() else {
        // No Linux guest can run here: run this very benchmark in a nested host.
        let env: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with("EMBER_BENCH_"))
            .collect();
        let args: &[&str] = if common::invoked_as_bench() {
            &["--bench"]
        } else {
            &[]
        };
        nested::run_self_with_env(args, &env)?;
        return Ok(());
    };
    let dir = common::create_temp_dir("ember-linux-boot")?;
    let result = measure_all(&images, &dir, runs);
    common::remove_dir_on_success(&dir, result)
}

/// One boot: when the guest's /init ran (wall time from spawn and its own clock) and when
/// the VMM exited.
struct Boot {
    to_init: Duration,
    guest_clock: Duration,
    to_exit: Duration,
}

fn measure_all(images: &LinuxImages, dir: &Path, runs: usize) -> Result<()> {
    let initrd = images.initrd(dir, "reboot -f\n")?;
    let inside = std::env::var_os("EMBER_NESTED_HOST").is_some();
    println!(
        "linux_boot: Debian kernel to /init, {VCPUS} vCPUs, {MEM_MIB} MiB, {runs} runs{}",
        if inside { ", inside a nested host" } else { "" }
    );
    let ember = |kernel: &Path| -> Result<Vec<Boot>> {
        let config = vm_config(dir, "ember", kernel, &initrd)?;
        let mut cmd = Command::new(common::EMBER);
        cmd.args(["--no-api", "--config-file"]).arg(&config);
        (0..runs).map(|_| boot_once(&mut cmd, dir)).collect()
    };
    let bz = ember(&images.bzimage)?;
    let pvh = ember(&images.vmlinux)?;
    let firecracker = match std::env::var_os("EMBER_BENCH_FIRECRACKER") {
        None => None,
        Some(fc) => {
            let config = vm_config(dir, "firecracker", &images.vmlinux, &initrd)?;
            let mut cmd = Command::new(fc);
            cmd.args(["--no-api", "--no-seccomp", "--config-file"])
                .arg(&config)
                .arg("--log-path")
                .arg(dir.join("firecracker.log"));
            Some(
                (0..runs)
                    .map(|_| boot_once(&mut cmd, dir))
                    .collect::<Result<Vec<_>>>()?,
            )
        }
    };

    time_header();
    let rows = |name: &str, boots: &[Boot]| {
        time_row(
            &format!("{name}: spawn -> /init"),
            &pick(boots, |b| b.to_init),
        );
        time_row(
            &format!("{name}: guest clock at /init"),
            &pick(boots, |b| b.guest_clock),
        );
        time_row(
            &format!("{name}: spawn -> exit"),
            &pick(boots, |b| b.to_exit),
        );
    };
    rows("ember, bzImage", &bz);
    rows("ember, ELF (PVH)", &pvh);
    if let Some(fc) = &firecracker {
        rows("firecracker, ELF (PVH)", fc);
    }
    println!("  ratios (medians)");
    let over_clock = |boots: &[Boot]| {
        median(&pick(boots, |b| b.to_init)).as_secs_f64()
            / median(&pick(boots, |b| b.guest_clock)).as_secs_f64()
    };
    ratio_row(
        "ember bzImage: spawn -> /init / guest clock",
        over_clock(&bz),
    );
    ratio_row("ember PVH: spawn -> /init / guest clock", over_clock(&pvh));
    if let Some(fc) = &firecracker {
        ratio_row(
            "firecracker PVH: spawn -> /init / guest clock",
            over_clock(fc),
        );
        ratio_row(
            "ember PVH / firecracker PVH: spawn -> /init",
            common::ratio(&pick(&pvh, |b| b.to_init), &pick(fc, |b| b.to_init)),
        );
        ratio_row(
            "ember PVH / firecracker PVH: spawn -> exit",
            common::ratio(&pick(&pvh, |b| b.to_exit), &pick(fc, |b| b.to_exit)),
        );
    }
    Ok(())
}

fn pick(boots: &[Boot], f: impl Fn(&Boot) -> Duration) -> Vec<Duration> {
    boots.iter().map(f).collect()
}

/// The same config-file keys for ember and Firecracker.
fn vm_config(dir: &Path, name: &str, kernel: &Path, initrd: &Path) -> Result<PathBuf> {
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": kernel,
            "initrd_path": initrd,
            "boot_args": BOOT_ARGS,
        },
        "machine-config": {"vcpu_count": VCPUS, "mem_size_mib": MEM_MIB},
        // Firecracker requires the key; both take it.
        "drives": [],
    });
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, config.to_string())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}

/// Boots once and times it; the guest must reach /init and the VMM must exit with 0.
fn boot_once(cmd: &mut Command, dir: &Path) -> Result<Boot> {
    let log = dir.join("vmm.log");
    let log_file =
        std::fs::File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file);
    let started = Instant::now();
    let mut child = Running::spawn(cmd)?;
    let stdout = child.0.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout)
            .lines()
            .map_while(std::result::Result::ok)
        {
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let mut console = String::new();
    let (at, uptime) = loop {
        let left = (started + BOOT_TIMEOUT).saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((at, line)) => {
                console.push_str(&line);
                console.push('\n');
                if let Some(rest) = line.split(INIT_LINE).nth(1) {
                    break (at, rest.trim().to_owned());
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                return Err(common::explain(
                    "no /init within the timeout",
                    &console,
                    &log,
                ));
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(common::explain(
                    "the VMM exited before /init",
                    &console,
                    &log,
                ));
            }
        }
    };
    let guest_clock = uptime
        .parse::<f64>()
        .map(Duration::from_secs_f64)
        .map_err(|_| format!("the guest's uptime {uptime:?} is not a number"))?;
    let status = loop {
        if let Some(status) = child
            .0
            .try_wait()
            .map_err(|e| format!("cannot wait for the VMM: {e}"))?
        {
            break status;
        }
        if started.elapsed() > BOOT_TIMEOUT {
            return Err(common::explain(
                "the VMM did not exit after the guest rebooted",
                &console,
                &log,
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let to_exit = started.elapsed();
    if !status.success() {
        return Err(common::explain(
            &format!("the VMM exited with {status}"),
            &console,
            &log,
        ));
    }
    let boot = Boot {
        to_init: at - started,
        guest_clock,
        to_exit,
    };
    // Progress, so a stuck run shows where it stuck.
    println!(
        "  run: /init after {:.2} s (guest clock {:.2} s), exit after {:.2} s",
        boot.to_init.as_secs_f64(),
        boot.guest_clock.as_secs_f64(),
        boot.to_exit.as_secs_f64()
    );
    Ok(boot)
}
