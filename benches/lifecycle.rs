//! A microVM's whole life: `cargo bench --bench lifecycle`.
//!
//! ember is spawned with the probe guest told to reset at once (`probe.reset=now`), and
//! timed from spawn to its exit with a blocking `waitpid`: one after another (spawn to
//! exit), and `P` at a time for a fixed number of VMs (VMs per second), for both
//! `machine-config.irqchip` modes side by side. Baselines measured in the same run (see
//! "Performance method" in the design notes): spawning `/bin/true` (the fork/exec floor),
//! and creating and closing a bare KVM VM of the same shape in this process (VM, 128 MiB
//! slot, the irqchip of that mode, one vCPU), the floor of what KVM itself costs.
//!
//! `EMBER_BENCH_RUNS` (default 20) sets the serial runs, `EMBER_BENCH_VMS` (default 40) the
//! VMs per parallel round. Without `--bench` (a `cargo test --all-targets` run) it makes a
//! small run as a smoke test. A run whose guest did not reset cleanly fails the benchmark.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use common::{
    BareKvm, MIB, Order, Result, Running, create_temp_dir, env_number, exit_code, explain,
    invoked_as_bench, median, probe_elf, ratio, ratio_row, remove_dir_on_success, runs_from_env,
    spawn_true_once, time_header, time_row,
};

const MEM_MIB: u64 = 128;
const MODES: [&str; 2] = ["split", "kernel"];
const PARALLEL: [usize; 3] = [2, 4, 8];

/// One ember run to its exit; the guest must have reset at once and ember exited 0.
fn ember_once(config: &Path, log: &Path) -> Result<Duration> {
    let mut cmd = common::ember_command(log, Stdio::null())?;
    cmd.args(["--no-api", "--config-file"]).arg(config);
    let start = Instant::now();
    let mut child = Running::spawn(&mut cmd)?;
    let mut out = String::new();
    if let Some(mut stdout) = child.0.stdout.take() {
        stdout
            .read_to_string(&mut out)
            .map_err(|e| format!("cannot read the guest's console: {e}"))?;
    }
    // A blocking waitpid: the exit is seen when it happens, not at the next poll.
    let status = child.wait()?;
    let elapsed = start.elapsed();
    if !status.success() || !out.contains("PROBE RESET now") {
        return Err(explain(
            &format!("ember exited with {status} without a clean reset"),
            &out,
            log,
        ));
    }
    Ok(elapsed)
}

/// `vms` runs, `parallel` at a time; returns VMs per second.
fn ember_rate(config: &Path, dir: &Path, vms: usize, parallel: usize) -> Result<f64> {
    let start = Instant::now();
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..parallel)
            .map(|w| {
                let next = &next;
                s.spawn(move || -> Result<()> {
                    let log = dir.join(format!("rate-{w}.log"));
                    while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < vms {
                        ember_once(config, &log)?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().map_err(|_| "a worker panicked".to_string())?)
    })?;
    Ok(vms as f64 / start.elapsed().as_secs_f64())
}

/// Creates and closes a bare VM (VM, a `mem_bytes` slot, the interrupt controllers of
/// `order`, one vCPU); returns the whole time.
fn bare_create_close(mem_bytes: u64, order: Order) -> Result<Duration> {
    let start = Instant::now();
    let (vm, _) = BareKvm::create(mem_bytes, order)?;
    vm.teardown();
    Ok(start.elapsed())
}

fn write_config(dir: &Path, mode: &str) -> Result<std::path::PathBuf> {
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": probe_elf()?,
            "boot_args": "console=ttyS0 reboot=k panic=1 probe.reset=now",
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": MEM_MIB, "irqchip": mode},
    });
    let path = dir.join(format!("{mode}.json"));
    std::fs::write(&path, config.to_string())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}

fn bench(dir: &Path) -> Result<()> {
    let full = invoked_as_bench();
    let runs = if full { runs_from_env(20)? } else { 2 };
    let vms = if full {
        env_number("EMBER_BENCH_VMS", 40)? as usize
    } else {
        4
    };
    let mem = MEM_MIB * MIB;
    let (mut spawn_true, mut bare_split, mut bare_kernel) = (vec![], vec![], vec![]);
    let mut ember: [Vec<Duration>; 2] = [vec![], vec![]];
    let configs = [write_config(dir, MODES[0])?, write_config(dir, MODES[1])?];
    let log = dir.join("serial.log");
    // Warm-up, then the measurements interleaved so a slow moment hits all of them.
    for c in &configs {
        ember_once(c, &log)?;
    }
    for _ in 0..runs {
        spawn_true.push(spawn_true_once()?);
        bare_split.push(bare_create_close(mem, Order::SplitIrqchip)?);
        bare_kernel.push(bare_create_close(mem, Order::MemorySlotFirst)?);
        for (m, c) in configs.iter().enumerate() {
            ember[m].push(ember_once(c, &log)?);
        }
    }
    println!("ember life cycle: probe resetting at once, 1 vCPU, {MEM_MIB} MiB; {runs} runs");
    time_header();
    time_row("baseline: spawn /bin/true -> exit", &spawn_true);
    time_row(
        "baseline: bare KVM create+close, split irqchip",
        &bare_split,
    );
    time_row(
        "baseline: bare KVM create+close, in-kernel irqchip",
        &bare_kernel,
    );
    for (m, mode) in MODES.iter().enumerate() {
        time_row(&format!("ember spawn -> exit, irqchip {mode}"), &ember[m]);
    }
    for (m, mode) in MODES.iter().enumerate() {
        let bare = if m == 0 { &bare_split } else { &bare_kernel };
        let floor: Vec<Duration> = spawn_true.iter().zip(bare).map(|(a, b)| *a + *b).collect();
        ratio_row(
            &format!("ratio {mode}: spawn->exit / (/bin/true + bare KVM)"),
            ratio(&ember[m], &floor),
        );
    }
    ratio_row(
        "ratio spawn->exit kernel / split",
        ratio(&ember[1], &ember[0]),
    );
    println!("VMs per second ({vms} VMs per round):");
    for p in PARALLEL {
        let mut row = format!("  {p} in parallel:");
        for (m, mode) in MODES.iter().enumerate() {
            row.push_str(&format!(
                "  {mode} {:.1}/s",
                ember_rate(&configs[m], dir, vms, p)?
            ));
        }
        let start = Instant::now();
        for _ in 0..vms {
            spawn_true_once()?;
        }
        row.push_str(&format!(
            "  (/bin/true one at a time {:.0}/s)",
            vms as f64 / start.elapsed().as_secs_f64()
        ));
        println!("{row}");
    }
    println!(
        "lifecycle: median spawn->exit split {:.2} ms, kernel {:.2} ms",
        median(&ember[0]).as_secs_f64() * 1e3,
        median(&ember[1]).as_secs_f64() * 1e3
    );
    Ok(())
}

fn main() -> ExitCode {
    let result = create_temp_dir("ember-lifecycle").and_then(|dir| {
        let r = bench(&dir);
        remove_dir_on_success(&dir, r)
    });
    exit_code("lifecycle", result)
}
