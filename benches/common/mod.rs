//! Helpers shared by the benchmarks: the run count and smoke-test mode, the scratch
//! directory, the in-process baselines (bare KVM, spawning `/bin/true`), running the real
//! `ember` binary with a deadline, and the statistics and table rows of the reports.

#![allow(dead_code)] // each bench uses a different subset

use std::fs::{self, File};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_CAP_SPLIT_IRQCHIP, kvm_enable_cap, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

pub type Result<T> = std::result::Result<T, String>;

pub const EMBER: &str = env!("CARGO_BIN_EXE_ember");
pub const MIB: u64 = 1 << 20;
/// An ember run takes well under a second; anything near this is a hang, not a slow run.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// Running a bench

/// The bench's exit code; an error is printed as `<bench> bench: error: ...`.
pub fn exit_code(bench: &str, result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{bench} bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `cargo bench` passes `--bench`; `cargo test` does not and only wants to know it works.
pub fn invoked_as_bench() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// The positive whole number in the environment variable `name`, `default` if it is unset.
pub fn env_number(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(s) => match s.trim().parse::<u64>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{name}={s:?} is not a positive whole number")),
        },
    }
}

/// The number of measured runs: `EMBER_BENCH_RUNS`, or `default`.
pub fn runs_from_env(default: usize) -> Result<usize> {
    Ok(env_number("EMBER_BENCH_RUNS", default as u64)? as usize)
}

/// The probe guest's kernel, which the ember runs boot.
pub fn probe_elf() -> Result<PathBuf> {
    let probe = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/probe/probe.elf");
    if !probe.is_file() {
        return Err(format!(
            "{} is missing: `cargo build --release` builds it",
            probe.display()
        ));
    }
    Ok(probe)
}

pub fn create_dir_all(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

/// A scratch directory of this process, `<temp dir>/<prefix>-<pid>`, for configs, sockets
/// and ember logs.
pub fn create_temp_dir(prefix: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
    create_dir_all(&dir)?;
    Ok(dir)
}

/// Passes `result` on, removing the scratch directory `dir` if the bench succeeded.
pub fn remove_dir_on_success(dir: &Path, result: Result<()>) -> Result<()> {
    // On failure what the bench left there (configs, ember logs) stays, for whoever looks
    // into it.
    if result.is_ok() {
        // Best effort: a leftover temp dir is harmless and must not hide the real result.
        let _ = fs::remove_dir_all(dir);
    }
    result
}

// ---------------------------------------------------------------------------------------
// Baselines

/// The bare VM's interrupt controllers and when they are made. On some hosts the order
/// matters a lot: registering a memory slot once the in-kernel irqchip exists can wait for
/// a kernel grace period (~7.5 ms on nested hosts, see docs/performance.md). ember
/// registers the slot first, so the baselines do too; the start-up bench times the other
/// order as a diagnostic and says which one the baseline uses.
#[derive(Clone, Copy, PartialEq)]
pub enum Order {
    /// The slot, then the in-kernel irqchip.
    MemorySlotFirst,
    /// The in-kernel irqchip, then the slot.
    IrqchipFirst,
    /// KVM's local APICs only (`KVM_CAP_SPLIT_IRQCHIP`, ember's default), then the slot.
    SplitIrqchip,
}

/// What every KVM VMM must create before its guest runs: the VM, one memory slot backed
/// by an anonymous mapping, the in-kernel irqchip and one vCPU.
pub struct BareKvm {
    // Dropped in this order: the slot's mapping must outlive the VM.
    vcpu: VcpuFd,
    vm: VmFd,
    kvm: Kvm,
    mem: GuestRam,
}

impl BareKvm {
    /// Creates the VM with a `mem_bytes` slot and returns it with the time that took.
    pub fn create(mem_bytes: u64, order: Order) -> Result<(Self, Duration)> {
        let start = Instant::now();
        let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
        let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
        let mem = GuestRam::new(mem_bytes)?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: mem_bytes,
            userspace_addr: mem.addr as u64,
        };
        let irqchip = || {
            vm.create_irq_chip()
                .map_err(|e| format!("KVM_CREATE_IRQCHIP: {e}"))
        };
        if order == Order::IrqchipFirst {
            irqchip()?;
        }
        if order == Order::SplitIrqchip {
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_SPLIT_IRQCHIP,
                ..Default::default()
            };
            cap.args[0] = 24;
            vm.enable_cap(&cap)
                .map_err(|e| format!("KVM_CAP_SPLIT_IRQCHIP: {e}"))?;
        }
        // SAFETY: the region is a live mapping of `mem_bytes` that outlives `vm` (`BareKvm`
        // drops it last).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
        if order == Order::MemorySlotFirst {
            irqchip()?;
        }
        let vcpu = vm
            .create_vcpu(0)
            .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
        let created = start.elapsed();
        Ok((BareKvm { vcpu, vm, kvm, mem }, created))
    }

    /// Tears the VM down and returns the time that took.
    pub fn teardown(self) -> Duration {
        let BareKvm { vcpu, vm, kvm, mem } = self;
        let start = Instant::now();
        drop(vcpu);
        drop(vm);
        drop(kvm);
        drop(mem);
        start.elapsed()
    }
}

/// The time to create a [`BareKvm`]; tearing it down is not timed.
pub fn bare_kvm_once(mem_bytes: u64, order: Order) -> Result<Duration> {
    let (vm, created) = BareKvm::create(mem_bytes, order)?;
    drop(vm);
    Ok(created)
}

/// Anonymous, lazily reserved memory, like ember's guest RAM; unmapped on drop.
struct GuestRam {
    addr: *mut libc::c_void,
    len: usize,
}

impl GuestRam {
    fn new(len: u64) -> Result<Self> {
        let len = usize::try_from(len).map_err(|_| format!("{len} bytes do not fit usize"))?;
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(format!(
                "mmap of {len} bytes: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(GuestRam { addr, len })
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`, which nothing uses any more.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// The fork/exec floor any VMM process pays: spawn `/bin/true` and wait for its exit.
pub fn spawn_true_once() -> Result<Duration> {
    let start = Instant::now();
    let status = Command::new("/bin/true")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run /bin/true: {e}"))?;
    let elapsed = start.elapsed();
    if !status.success() {
        return Err(format!("/bin/true exited with {status}"));
    }
    Ok(elapsed)
}

// ---------------------------------------------------------------------------------------
// ember runs

/// ember with its stdout (the guest's serial console) on a pipe and its log lines in `log`;
/// the caller adds the arguments.
pub fn ember_command(log: &Path, stdin: Stdio) -> Result<Command> {
    // Log lines go to a file rather than a pipe: nothing has to drain it, and it is at hand
    // to explain a failed run.
    let log_file =
        File::create(log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    let mut cmd = Command::new(EMBER);
    cmd.stdin(stdin).stdout(Stdio::piped()).stderr(log_file);
    Ok(cmd)
}

/// A child that is killed and reaped if a run is abandoned, so an error never leaves a
/// guest waiting on its serial port behind.
pub struct Running(pub Child);

impl Running {
    pub fn spawn(cmd: &mut Command) -> Result<Self> {
        cmd.spawn()
            .map(Running)
            .map_err(|e| format!("cannot spawn {EMBER}: {e}"))
    }

    pub fn wait(&mut self) -> Result<ExitStatus> {
        self.0
            .wait()
            .map_err(|e| format!("cannot wait for ember: {e}"))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Both are no-ops once the child has been waited for.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until one of the given descriptors (`None`: not watched) is readable or closed;
/// `None` once `deadline` has passed, so a stuck guest or server cannot hang the bench.
pub fn poll_until<const N: usize>(
    fds: [Option<RawFd>; N],
    deadline: Instant,
) -> Result<Option<[bool; N]>> {
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd: fd.unwrap_or(-1), // poll skips negative descriptors
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout_ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
        let nfds = libc::nfds_t::try_from(N).expect("a handful of descriptors");
        // SAFETY: `pfds` is an array of N valid pollfd structures that outlives the call.
        let ready = unsafe { libc::poll(pfds.as_mut_ptr(), nfds, timeout_ms) };
        if ready < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll: {err}"));
        }
        if ready == 0 {
            return Ok(None);
        }
        return Ok(Some(pfds.map(|p| p.revents != 0)));
    }
}

pub fn has_line_starting(out: &[u8], prefix: &str) -> bool {
    out.split(|&b| b == b'\n')
        .any(|line| line.starts_with(prefix.as_bytes()))
}

/// The probe's verdict on the guest's console output: a `PROBE DONE` line with every
/// check passed.
pub fn check_probe_done(out: &str) -> Result<()> {
    match out.lines().find(|l| l.starts_with("PROBE DONE")) {
        Some(line) if line.ends_with(" fail=0") => Ok(()),
        Some(line) => Err(format!("probe checks failed: {line}")),
        None => Err("no `PROBE DONE` line".into()),
    }
}

/// `problem` with the guest's console output and ember's log attached.
pub fn explain(problem: &str, out: &str, log: &Path) -> String {
    let log_text = fs::read_to_string(log).unwrap_or_default();
    format!(
        "{problem}\n--- guest serial output ---\n{out}\n--- ember log ({}) ---\n{log_text}",
        log.display()
    )
}

// ---------------------------------------------------------------------------------------
// Statistics and report

/// Median of a non-empty sample (halfway between the middle two for an even count).
pub fn median<T: Copy + Ord + Halfway>(values: &[T]) -> T {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    median_of_sorted(&sorted)
}

/// Median of a non-empty, sorted sample.
pub fn median_of_sorted<T: Copy + Halfway>(sorted: &[T]) -> T {
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        T::halfway(sorted[mid - 1], sorted[mid])
    }
}

pub trait Halfway {
    fn halfway(a: Self, b: Self) -> Self;
}

impl Halfway for Duration {
    fn halfway(a: Self, b: Self) -> Self {
        (a + b) / 2
    }
}

impl Halfway for u64 {
    fn halfway(a: Self, b: Self) -> Self {
        a.midpoint(b)
    }
}

impl Halfway for f64 {
    fn halfway(a: Self, b: Self) -> Self {
        (a + b) / 2.0
    }
}

/// Smallest and largest value; the default value twice for an empty sample.
pub fn min_max<T: Copy + Ord + Default>(values: &[T]) -> (T, T) {
    let min = values.iter().min().copied().unwrap_or_default();
    let max = values.iter().max().copied().unwrap_or_default();
    (min, max)
}

/// Median of ember's times over the median of the baseline's.
pub fn ratio(ember: &[Duration], baseline: &[Duration]) -> f64 {
    median(ember).as_secs_f64() / median(baseline).as_secs_f64()
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

/// The head of a table of `time_row`s.
pub fn time_header() {
    println!(
        "  {:<56} {:>9} {:>9} {:>9}",
        "measurement (ms)", "median", "min", "max"
    );
}

/// Median, min and max of `values` in ms.
pub fn time_row(name: &str, values: &[Duration]) {
    let (min, max) = min_max(values);
    println!(
        "  {name:<56} {:>9} {:>9} {:>9}",
        ms(median(values)),
        ms(min),
        ms(max)
    );
}

pub fn ratio_row(name: &str, ratio: f64) {
    println!("  {name:<56} {ratio:>9.2}");
}
