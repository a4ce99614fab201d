//! Start-up and memory benchmark: `cargo bench --bench startup`.
//!
//! Absolute times on a shared or nested host are noise, so every time is reported next to a
//! baseline measured in the same run (see "Performance method" in the design notes):
//!
//! - ember, spawned with the probe guest, to the first guest serial byte and to its exit;
//! - the bare cost of a KVM VM of the same shape, created in this process;
//! - spawning `/bin/true`, the fork/exec floor any VMM process pays.
//!
//! Memory: ember's RSS while the probe waits on its serial port, split into guest memory
//! the guest touched and everything else (the VMM's overhead), for two guest sizes.
//!
//! `EMBER_BENCH_RUNS` sets the number of measured runs (default 20). Without `--bench` on
//! the command line (`cargo test --all-targets` runs this file too) it makes one run of each
//! measurement, as a smoke test. Any failed ember run (non-zero exit, missing or failing
//! `PROBE DONE`) fails the benchmark: numbers measured on a broken boot mean nothing.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{
    MIB, Order, RUN_TIMEOUT, Result, Running, bare_kvm_once, has_line_starting, median, min_max,
    ratio, ratio_row, spawn_true_once, time_row,
};

/// Guest shape for the start-up measurements; the bare-KVM baseline uses the same.
const STARTUP_MEM_MIB: u64 = 128;
/// Guest sizes for the memory measurement: overhead should not depend on them.
const MEMORY_SIZES_MIB: [u64; 2] = [128, 1024];
const DEFAULT_RUNS: usize = 20;
/// Runs discarded first, so page cache, the dynamic loader and KVM's module state are warm.
const WARMUP_RUNS: usize = 2;
/// Where ember puts guest RAM above 3 GiB (mirrors its x86_64 layout).
const MMIO_GAP_START: u64 = 0xc000_0000;

fn main() -> ExitCode {
    common::exit_code("startup", run())
}

fn run() -> Result<()> {
    let (runs, warmup) = if common::invoked_as_bench() {
        (common::runs_from_env(DEFAULT_RUNS)?, WARMUP_RUNS)
    } else {
        (1, 0)
    };
    let bench = Bench::new(runs, warmup)?;
    let result = bench.run_all();
    common::remove_dir_on_success(&bench.dir, result)
}

struct Bench {
    dir: PathBuf,
    probe: PathBuf,
    /// Measured runs of each measurement, after `warmup` discarded ones.
    runs: usize,
    warmup: usize,
}

impl Bench {
    fn new(runs: usize, warmup: usize) -> Result<Self> {
        let probe = common::probe_elf()?;
        let dir = common::create_temp_dir("ember-bench")?;
        Ok(Bench {
            dir,
            probe,
            runs,
            warmup,
        })
    }

    fn run_all(&self) -> Result<()> {
        let startup = self.measure_startup()?;
        let memory = MEMORY_SIZES_MIB
            .iter()
            .map(|&mib| self.measure_memory(mib))
            .collect::<Result<Vec<_>>>()?;
        print_startup(&startup, self.runs, self.warmup);
        print_memory(&memory, self.runs);
        println!(
            "startup: ratio first-byte/bare-kvm = {:.2}",
            startup.ratio_bare_kvm()
        );
        Ok(())
    }

    /// Writes a Firecracker-style config for a 1-vCPU probe guest of `mem_mib`; with
    /// `wait_serial` the probe waits for one byte on its serial port before it resets.
    fn write_config(&self, mem_mib: u64, wait_serial: bool) -> Result<PathBuf> {
        let wait = if wait_serial {
            " probe.wait=serial"
        } else {
            ""
        };
        let boot_args =
            format!("console=ttyS0 reboot=k panic=1 probe.mem_mib={mem_mib} probe.vcpus=1{wait}");
        let config = serde_json::json!({
            "boot-source": {
                "kernel_image_path": self.probe,
                "boot_args": boot_args,
            },
            "machine-config": { "vcpu_count": 1, "mem_size_mib": mem_mib },
        });
        let name = if wait_serial { "wait-serial" } else { "boot" };
        let path = self.dir.join(format!("{name}-{mem_mib}mib.json"));
        fs::write(&path, config.to_string())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(path)
    }

    /// Interleaves the three start-up measurements run by run, so drift on a shared host
    /// (other load, frequency changes) hits ember and its baselines alike.
    fn measure_startup(&self) -> Result<StartupResults> {
        let config = self.write_config(STARTUP_MEM_MIB, false)?;
        let log = self.dir.join("startup.log");
        let mut results = StartupResults::default();
        for i in 0..self.warmup + self.runs {
            let bare = bare_kvm_once(STARTUP_MEM_MIB * MIB, Order::MemorySlotFirst)?;
            let irqchip_first = bare_kvm_once(STARTUP_MEM_MIB * MIB, Order::IrqchipFirst)?;
            let floor = spawn_true_once()?;
            let ember = ember_startup_once(&config, &log)
                .map_err(|e| format!("ember start-up run {}: {e}", i + 1))?;
            if i >= self.warmup {
                results.bare_kvm.push(bare);
                results.bare_kvm_irqchip_first.push(irqchip_first);
                results.spawn_true.push(floor);
                results.first_byte.push(ember.first_byte);
                results.exit.push(ember.exit);
            }
        }
        Ok(results)
    }

    fn measure_memory(&self, mem_mib: u64) -> Result<MemoryResults> {
        let config = self.write_config(mem_mib, true)?;
        let log = self.dir.join(format!("memory-{mem_mib}.log"));
        let mut samples = Vec::with_capacity(self.runs);
        for i in 0..self.warmup + self.runs {
            let sample = ember_memory_once(&config, &log, mem_mib * MIB)
                .map_err(|e| format!("ember memory run ({mem_mib} MiB) {}: {e}", i + 1))?;
            if i >= self.warmup {
                samples.push(sample);
            }
        }
        Ok(MemoryResults { mem_mib, samples })
    }
}

// ---------------------------------------------------------------------------------------
// ember runs

struct StartupSample {
    first_byte: Duration,
    exit: Duration,
}

/// Boots the probe once: spawn -> first byte on stdout (the guest's first serial byte) and
/// spawn -> exit. Stdin is /dev/null so ember does not watch it.
fn ember_startup_once(config: &Path, log: &Path) -> Result<StartupSample> {
    let mut cmd = ember_command(config, log, Stdio::null())?;
    let deadline = Instant::now() + RUN_TIMEOUT;
    let start = Instant::now();
    let mut child = Running::spawn(&mut cmd)?;
    let mut stdout = child.0.stdout.take().expect("stdout was set to a pipe");
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    let n = read_before(&mut stdout, &mut byte, deadline)?;
    let first_byte = start.elapsed();
    out.extend_from_slice(&byte[..n]);
    read_to_end_before(&mut stdout, &mut out, deadline)?;
    let status = child.wait()?;
    let exit = start.elapsed();
    let out = String::from_utf8_lossy(&out);
    check_boot(status, &out, log)?;
    if !out.starts_with("PROBE START") {
        return Err(format!(
            "the first output was not the guest's `PROBE START`, so the first-byte time \
             measures something else:\n{out}"
        ));
    }
    Ok(StartupSample { first_byte, exit })
}

struct MemorySample {
    total_rss_kib: u64,
    guest_rss_kib: u64,
    /// Rss of file mappings: ember's binary and the shared libraries.
    file_rss_kib: u64,
    pss_kib: u64,
    /// Largest non-guest mappings by Rss: (Rss KiB, description).
    top_vmm: Vec<(u64, String)>,
}

impl MemorySample {
    fn overhead_kib(&self) -> u64 {
        self.total_rss_kib.saturating_sub(self.guest_rss_kib)
    }

    /// Overhead not backed by files: heap, thread stacks, other anonymous memory.
    fn anon_overhead_kib(&self) -> u64 {
        self.overhead_kib().saturating_sub(self.file_rss_kib)
    }
}

/// Boots the probe with `probe.wait=serial`, reads ember's smaps once the probe is done
/// (so the guest has touched all it will), then releases the guest with one byte on stdin.
fn ember_memory_once(config: &Path, log: &Path, mem_bytes: u64) -> Result<MemorySample> {
    let mut cmd = ember_command(config, log, Stdio::piped())?;
    let deadline = Instant::now() + RUN_TIMEOUT;
    let mut child = Running::spawn(&mut cmd)?;
    let mut stdin = child.0.stdin.take().expect("stdin was set to a pipe");
    let mut stdout = child.0.stdout.take().expect("stdout was set to a pipe");
    let mut out = Vec::new();
    while !has_line_starting(&out, "PROBE DONE") {
        let mut buf = [0u8; 256];
        let n = read_before(&mut stdout, &mut buf, deadline)?;
        if n == 0 {
            break; // EOF: check_boot below reports the missing DONE line.
        }
        out.extend_from_slice(&buf[..n]);
    }
    let smaps_path = format!("/proc/{}/smaps", child.0.id());
    let sample = fs::read_to_string(&smaps_path)
        .map_err(|e| format!("cannot read {smaps_path}: {e}"))
        .and_then(|smaps| memory_sample(&smaps, mem_bytes));
    // Release the guest even if smaps failed, so the run ends cleanly either way.
    let _ = stdin.write_all(b"x");
    drop(stdin);
    read_to_end_before(&mut stdout, &mut out, deadline)?;
    let status = child.wait()?;
    let out = String::from_utf8_lossy(&out);
    check_boot(status, &out, log)?;
    if !out.contains("PROBE GOT 0x78") {
        return Err(format!(
            "the probe did not report the byte sent on stdin:\n{out}"
        ));
    }
    sample
}

fn ember_command(config: &Path, log: &Path, stdin: Stdio) -> Result<Command> {
    let mut cmd = common::ember_command(log, stdin)?;
    cmd.arg("--no-api").arg("--config-file").arg(config);
    Ok(cmd)
}

/// `read` that gives up at `deadline` instead of hanging the bench on a stuck guest; the
/// caller's `Running` guard then kills ember.
fn read_before(
    src: &mut (impl Read + AsRawFd),
    buf: &mut [u8],
    deadline: Instant,
) -> Result<usize> {
    if common::poll_until([Some(src.as_raw_fd())], deadline)?.is_none() {
        return Err(format!(
            "ember did not finish within {} s; killed it",
            RUN_TIMEOUT.as_secs()
        ));
    }
    src.read(buf)
        .map_err(|e| format!("cannot read ember's stdout: {e}"))
}

fn read_to_end_before(
    src: &mut (impl Read + AsRawFd),
    out: &mut Vec<u8>,
    deadline: Instant,
) -> Result<()> {
    let mut buf = [0u8; 4096];
    loop {
        let n = read_before(src, &mut buf, deadline)?;
        if n == 0 {
            return Ok(());
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// A boot counts only if ember exited 0 and the probe finished with every check passing.
fn check_boot(status: ExitStatus, out: &str, log: &Path) -> Result<()> {
    let verdict = if status.success() {
        common::check_probe_done(out)
    } else {
        Err(format!("ember exited with {status}"))
    };
    verdict.map_err(|p| common::explain(&p, out, log))
}

// ---------------------------------------------------------------------------------------
// /proc/<pid>/smaps

#[derive(Debug, Default)]
struct Mapping {
    header: String,
    anonymous: bool,
    size_kib: u64,
    rss_kib: u64,
    pss_kib: u64,
}

fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut maps: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        if is_mapping_header(line) {
            // Fields: range perms offset dev inode [path]; no path means anonymous memory.
            let anonymous = line.split_whitespace().nth(5).is_none();
            maps.push(Mapping {
                header: line.to_string(),
                anonymous,
                ..Mapping::default()
            });
            continue;
        }
        let Some(map) = maps.last_mut() else { continue };
        let mut words = line.split_whitespace();
        let (Some(key), Some(value)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(kib) = value.parse::<u64>() else {
            continue;
        };
        match key {
            "Size:" => map.size_kib = kib,
            "Rss:" => map.rss_kib = kib,
            "Pss:" => map.pss_kib = kib,
            _ => {}
        }
    }
    maps
}

impl Mapping {
    /// The pathname field of the header, empty for anonymous memory.
    fn path(&self) -> &str {
        self.header.split_whitespace().nth(5).unwrap_or("")
    }
}

/// A mapping header starts with `start-end` in hex; field lines start with `Name:`.
fn is_mapping_header(line: &str) -> bool {
    let Some(range) = line.split_whitespace().next() else {
        return false;
    };
    match range.split_once('-') {
        Some((a, b)) => u64::from_str_radix(a, 16).is_ok() && u64::from_str_radix(b, 16).is_ok(),
        None => false,
    }
}

/// Sizes of ember's guest RAM mappings: one below the 3 GiB MMIO gap, a second above it.
fn guest_region_sizes(mem_bytes: u64) -> Vec<u64> {
    if mem_bytes <= MMIO_GAP_START {
        vec![mem_bytes]
    } else {
        vec![MMIO_GAP_START, mem_bytes - MMIO_GAP_START]
    }
}

/// Indices of the guest RAM mappings: anonymous, one per region, of exactly its size.
fn find_guest_mappings(maps: &[Mapping], mem_bytes: u64) -> Result<Vec<usize>> {
    let mut found = Vec::new();
    for size in guest_region_sizes(mem_bytes) {
        let size_kib = size / 1024;
        let candidates: Vec<usize> = (0..maps.len())
            .filter(|&i| maps[i].anonymous && maps[i].size_kib == size_kib)
            .filter(|i| !found.contains(i))
            .collect();
        match candidates.as_slice() {
            [one] => found.push(*one),
            _ => {
                return Err(format!(
                    "expected one anonymous mapping of {size_kib} KiB for guest RAM, found {}; \
                     anonymous mappings over 1 MiB:\n{}",
                    candidates.len(),
                    describe_large_anonymous(maps)
                ));
            }
        }
    }
    Ok(found)
}

fn describe_large_anonymous(maps: &[Mapping]) -> String {
    maps.iter()
        .filter(|m| m.anonymous && m.size_kib > 1024)
        .map(|m| format!("  {} ({} KiB)", m.header, m.size_kib))
        .collect::<Vec<_>>()
        .join("\n")
}

fn memory_sample(smaps: &str, mem_bytes: u64) -> Result<MemorySample> {
    let maps = parse_smaps(smaps);
    let guest = find_guest_mappings(&maps, mem_bytes)?;
    let mut top_vmm: Vec<(u64, String)> = maps
        .iter()
        .enumerate()
        .filter(|(i, m)| !guest.contains(i) && m.rss_kib > 0)
        .map(|(_, m)| (m.rss_kib, describe_mapping(&m.header)))
        .collect();
    top_vmm.sort_by_key(|m| std::cmp::Reverse(m.0));
    top_vmm.truncate(6);
    Ok(MemorySample {
        total_rss_kib: maps.iter().map(|m| m.rss_kib).sum(),
        guest_rss_kib: guest.iter().map(|&i| maps[i].rss_kib).sum(),
        file_rss_kib: maps
            .iter()
            .filter(|m| m.path().starts_with('/'))
            .map(|m| m.rss_kib)
            .sum(),
        pss_kib: maps.iter().map(|m| m.pss_kib).sum(),
        top_vmm,
    })
}

/// `perms path` of a smaps header, with `[anon]` for anonymous memory.
fn describe_mapping(header: &str) -> String {
    let fields: Vec<&str> = header.split_whitespace().collect();
    let perms = fields.get(1).copied().unwrap_or("?");
    let path = fields.get(5..).map(|p| p.join(" ")).unwrap_or_default();
    let path = if path.is_empty() {
        "[anon]".to_string()
    } else {
        path
    };
    format!("{perms} {path}")
}

// ---------------------------------------------------------------------------------------
// Statistics and report

#[derive(Default)]
struct StartupResults {
    bare_kvm: Vec<Duration>,
    /// Diagnostic only, not a baseline: the same calls with the irqchip created first.
    bare_kvm_irqchip_first: Vec<Duration>,
    spawn_true: Vec<Duration>,
    first_byte: Vec<Duration>,
    exit: Vec<Duration>,
}

impl StartupResults {
    fn ratio_bare_kvm(&self) -> f64 {
        ratio(&self.first_byte, &self.bare_kvm)
    }

    fn ratio_floor(&self) -> f64 {
        let floor = median(&self.spawn_true) + median(&self.bare_kvm);
        median(&self.first_byte).as_secs_f64() / floor.as_secs_f64()
    }
}

struct MemoryResults {
    mem_mib: u64,
    samples: Vec<MemorySample>,
}

impl MemoryResults {
    fn median_of(&self, f: impl Fn(&MemorySample) -> u64) -> u64 {
        median(&self.samples.iter().map(f).collect::<Vec<_>>())
    }

    fn range_of(&self, f: impl Fn(&MemorySample) -> u64) -> (u64, u64) {
        min_max(&self.samples.iter().map(f).collect::<Vec<_>>())
    }
}

fn print_startup(r: &StartupResults, runs: usize, warmup: usize) {
    println!(
        "ember start-up: 1 vCPU, {STARTUP_MEM_MIB} MiB, probe guest; \
         {runs} runs after {warmup} warm-up"
    );
    common::time_header();
    time_row("ember spawn -> first guest serial byte", &r.first_byte);
    time_row("ember spawn -> exit (probe done, VM reset)", &r.exit);
    time_row(
        &format!("baseline: bare KVM VM+{STARTUP_MEM_MIB}MiB slot+irqchip+vCPU"),
        &r.bare_kvm,
    );
    time_row("baseline: spawn /bin/true -> exit", &r.spawn_true);
    time_row(
        "diagnostic: bare KVM as above, irqchip before the slot",
        &r.bare_kvm_irqchip_first,
    );
    ratio_row("ratio first-byte / bare KVM", r.ratio_bare_kvm());
    ratio_row(
        "ratio first-byte / (spawn /bin/true + bare KVM)",
        r.ratio_floor(),
    );
    println!();
}

fn print_memory(results: &[MemoryResults], runs: usize) {
    println!(
        "ember memory: probe done, waiting on serial; /proc/<pid>/smaps; \
         medians of {runs} runs (KiB)"
    );
    println!(
        "  {:>9} {:>9} {:>9} {:>9} {:>13} {:>9} {:>9} {:>9}",
        "guest MiB",
        "total Rss",
        "guest",
        "VMM",
        "VMM min-max",
        "VMM file",
        "VMM anon",
        "Pss total"
    );
    for r in results {
        let (lo, hi) = r.range_of(MemorySample::overhead_kib);
        println!(
            "  {:>9} {:>9} {:>9} {:>9} {:>13} {:>9} {:>9} {:>9}",
            r.mem_mib,
            r.median_of(|s| s.total_rss_kib),
            r.median_of(|s| s.guest_rss_kib),
            r.median_of(MemorySample::overhead_kib),
            format!("{lo}-{hi}"),
            r.median_of(|s| s.file_rss_kib),
            r.median_of(MemorySample::anon_overhead_kib),
            r.median_of(|s| s.pss_kib),
        );
    }
    println!(
        "  (guest = Rss of the guest RAM mappings, i.e. memory the guest touched; \
         VMM = total - guest; file = binary and libraries)"
    );
    print_overhead_growth(results);
    if let Some(first) = results.first()
        && let Some(sample) = first.samples.first()
    {
        println!(
            "  largest VMM mappings by Rss (first {} MiB run):",
            first.mem_mib
        );
        for (rss, what) in &sample.top_vmm {
            println!("    {rss:>7} KiB  {what}");
        }
    }
    println!();
}

/// Overhead is meant to be independent of guest size; say so loudly when it is not.
fn print_overhead_growth(results: &[MemoryResults]) {
    let (Some(small), Some(large)) = (results.first(), results.last()) else {
        return;
    };
    let a = small.median_of(MemorySample::overhead_kib);
    let b = large.median_of(MemorySample::overhead_kib);
    // Allow page-granular jitter; a real dependence on guest size shows up far above this.
    let grows = b > a + a / 10 + 256;
    println!(
        "  VMM overhead {} MiB -> {} MiB guest: {a} -> {b} KiB ({})",
        small.mem_mib,
        large.mem_mib,
        if grows {
            "GROWS with guest size"
        } else {
            "independent of guest size"
        }
    );
}
