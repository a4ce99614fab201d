//! One vCPU: its KVM state at boot and the thread that runs it.
//!
//! A vCPU thread only runs the guest and dispatches port/MMIO exits to device registers; it
//! never blocks on device I/O. It stops when the [`StopSignal`] is raised (checked before
//! every entry into the guest) and it is kicked out of `KVM_RUN` by [`KICK_SIGNAL`].

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    CpuId, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN, kvm_mp_state,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::arch::x86_64::kernel::LoadedKernel;
use crate::arch::x86_64::{cpuid, interrupts, msr, regs};
use crate::devices::bus::Bus;
use crate::metrics::METRICS;
use crate::stop::StopSignal;
use crate::vstate::vm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {0}: {1}")]
    Create(u8, kvm_ioctls::Error),
    #[error("vCPU {index}: cannot set {what}: {source}")]
    Configure {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {0}: {1}")]
    Boot(u8, regs::RegsError),
    #[error("vCPU {0}: KVM took {1} of {2} boot MSRs")]
    Msrs(u8, usize, usize),
    #[error("vCPU {0}: {1}")]
    MsrList(u8, msr::MsrError),
    #[error("vCPU {0}: cannot build the CPUID list: {1:?}")]
    CpuidList(u8, vmm_sys_util::fam::Error),
    #[error("cannot start the thread of vCPU {0}: {1}")]
    Spawn(u8, std::io::Error),
    #[error("cannot install the vCPU kick signal handler: {0}")]
    KickHandler(vmm_sys_util::errno::Error),
}

/// The real-time signal used to kick a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

/// Installs the (empty) kick handler: its only job is to interrupt `KVM_RUN` with EINTR.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    register_signal_handler(kick_signal(), on_kick).map_err(VcpuError::KickHandler)
}

/// How a vCPU thread ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuOutcome {
    /// Told to stop by the VMM; says nothing about the guest.
    Stopped,
    /// The guest asked KVM to power off or reset (a system event).
    GuestShutdown,
    /// The guest triple-faulted (`KVM_EXIT_SHUTDOWN`).
    TripleFault { rip: u64 },
    /// KVM could not emulate or run the guest (`KVM_EXIT_INTERNAL_ERROR`).
    InternalError { suberror: u32, rip: u64 },
    /// VM entry failed (`KVM_EXIT_FAIL_ENTRY`).
    FailEntry { reason: u64, rip: u64 },
    /// The guest crashed (a crash system event) or exited in a way ember does not handle.
    GuestError { what: String, rip: u64 },
    /// `KVM_RUN` itself failed.
    RunError(String),
}

impl VcpuOutcome {
    /// True when the outcome is a fault that must make ember's exit code non-zero.
    pub fn is_fault(&self) -> bool {
        !matches!(self, VcpuOutcome::Stopped | VcpuOutcome::GuestShutdown)
    }
}

impl std::fmt::Display for VcpuOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VcpuOutcome::Stopped => write!(f, "stopped"),
            VcpuOutcome::GuestShutdown => write!(f, "guest shut down"),
            VcpuOutcome::TripleFault { rip } => {
                write!(f, "triple fault (KVM_EXIT_SHUTDOWN) at rip={rip:#x}")
            }
            VcpuOutcome::InternalError { suberror, rip } => {
                let what = match suberror {
                    1 => " (emulation failure)",
                    2 => " (simultaneous exceptions)",
                    3 => " (delivery event)",
                    _ => "",
                };
                write!(f, "KVM internal error {suberror}{what} at rip={rip:#x}")
            }
            VcpuOutcome::FailEntry { reason, rip } => {
                write!(
                    f,
                    "VM entry failed, hardware reason {reason:#x}, at rip={rip:#x}"
                )
            }
            VcpuOutcome::GuestError { what, rip } => write!(f, "{what} at rip={rip:#x}"),
            VcpuOutcome::RunError(e) => write!(f, "KVM_RUN failed: {e}"),
        }
    }
}

pub struct Vcpu {
    pub index: u8,
    fd: VcpuFd,
}

/// Parks vCPU threads outside `KVM_RUN` while the VM is paused. Their KVM state stays in
/// the kernel untouched, so resuming continues the guest exactly where it was.
#[derive(Default)]
pub struct PauseControl {
    state: Mutex<PauseState>,
    changed: Condvar,
}

#[derive(Default)]
struct PauseState {
    paused: bool,
    parked: usize,
}

impl PauseControl {
    fn lock(&self) -> std::sync::MutexGuard<'_, PauseState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pause_requested(&self) -> bool {
        self.lock().paused
    }

    /// Called by a vCPU thread: waits while paused, unless the VM is stopping.
    fn park(&self, stop: &StopSignal) {
        let mut state = self.lock();
        if !state.paused {
            return;
        }
        state.parked += 1;
        self.changed.notify_all();
        while state.paused && !stop.is_stopping() {
            // The timeout bounds how long a stop request can go unnoticed by a parked vCPU.
            state = self
                .changed
                .wait_timeout(state, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        state.parked -= 1;
        self.changed.notify_all();
    }

    /// Pauses every vCPU: asks them to park, kicks them out of `KVM_RUN`, and waits until
    /// all `handles.len()` threads are parked. Returns false if they did not park in time.
    pub fn pause(&self, handles: &[JoinHandle<VcpuOutcome>], timeout: Duration) -> bool {
        self.lock().paused = true;
        let deadline = Instant::now() + timeout;
        loop {
            let running = handles.iter().filter(|h| !h.is_finished()).count();
            {
                let state = self.lock();
                if state.parked >= running {
                    return true;
                }
            }
            if Instant::now() > deadline {
                return false;
            }
            for h in handles {
                let _ = h.kill(kick_signal());
            }
            let state = self.lock();
            let _ = self
                .changed
                .wait_timeout(state, Duration::from_millis(5))
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        self.lock().paused = false;
        self.changed.notify_all();
    }
}

/// What a running vCPU needs to dispatch exits and know when to stop or pause.
#[derive(Clone)]
pub struct VcpuContext {
    pub pio_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub stop: StopSignal,
    pub pause: Arc<PauseControl>,
}

impl Vcpu {
    pub fn new(vm: &Vm, index: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .fd
            .create_vcpu(u64::from(index))
            .map_err(|e| VcpuError::Create(index, e))?;
        Ok(Vcpu { index, fd })
    }

    fn set<T>(&self, what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VcpuError> {
        r.map_err(|source| VcpuError::Configure {
            index: self.index,
            what,
            source,
        })
    }

    /// CPUID, MSRs, FPU and LAPIC for every vCPU; registers and segments for the boot vCPU.
    /// Application processors wait in the in-kernel LAPIC for the guest's INIT/SIPI.
    pub fn configure(
        &self,
        mem: &GuestMemoryMmap,
        supported_cpuid: &CpuId,
        topology: cpuid::Topology,
        kernel: &LoadedKernel,
        boot_info: u64,
    ) -> Result<(), VcpuError> {
        let mut entries = supported_cpuid.as_slice().to_vec();
        cpuid::normalize(&mut entries, self.index, topology);
        let cpuid =
            CpuId::from_entries(&entries).map_err(|e| VcpuError::CpuidList(self.index, e))?;
        self.set("CPUID", self.fd.set_cpuid2(&cpuid))?;

        let msrs = msr::boot_msrs().map_err(|e| VcpuError::MsrList(self.index, e))?;
        let written = self.set("MSRs", self.fd.set_msrs(&msrs))?;
        if written != msrs.as_slice().len() {
            return Err(VcpuError::Msrs(self.index, written, msrs.as_slice().len()));
        }
        self.set("FPU", self.fd.set_fpu(&regs::boot_fpu()))?;

        let mut lapic = self.set("LAPIC (get)", self.fd.get_lapic())?;
        interrupts::set_lint(&mut lapic);
        self.set("LAPIC", self.fd.set_lapic(&lapic))?;

        if self.index == 0 {
            let mut sregs = self.set("special registers (get)", self.fd.get_sregs())?;
            regs::setup_sregs(mem, kernel.protocol, &mut sregs)
                .map_err(|e| VcpuError::Boot(self.index, e))?;
            self.set("special registers", self.fd.set_sregs(&sregs))?;
            let r = regs::boot_regs(kernel.protocol, kernel.entry, boot_info);
            self.set("registers", self.fd.set_regs(&r))?;
        } else {
            // KVM_MP_STATE_UNINITIALIZED: wait for INIT/SIPI.
            let state = kvm_mp_state { mp_state: 1 };
            self.set("MP state", self.fd.set_mp_state(state))?;
        }
        Ok(())
    }

    /// Starts the vCPU's thread. The thread raises `ctx.stop` when it ends on its own.
    pub fn spawn(self, ctx: VcpuContext) -> Result<JoinHandle<VcpuOutcome>, VcpuError> {
        let index = self.index;
        std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let mut vcpu = self;
                let outcome = vcpu.run_loop(&ctx);
                if outcome != VcpuOutcome::Stopped {
                    if outcome.is_fault() {
                        METRICS.vcpu.failures.inc();
                        log::error!("vCPU {index}: {outcome}");
                    } else {
                        log::info!("vCPU {index}: {outcome}");
                    }
                    ctx.stop.request();
                }
                outcome
            })
            .map_err(|e| VcpuError::Spawn(index, e))
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map(|r| r.rip).unwrap_or(0)
    }

    /// Logs the registers that say where a guest was when it faulted, for whoever has to
    /// find out why.
    fn log_fault_state(&self) {
        let (Ok(r), Ok(s)) = (self.fd.get_regs(), self.fd.get_sregs()) else {
            return;
        };
        log::error!(
            "vCPU {}: rip={:#x} rsp={:#x} rflags={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x} (base {:#x}, l={}) idt={:#x}+{:#x}",
            self.index,
            r.rip,
            r.rsp,
            r.rflags,
            s.cr0,
            s.cr2,
            s.cr3,
            s.cr4,
            s.efer,
            s.cs.selector,
            s.cs.base,
            s.cs.l,
            s.idt.base,
            s.idt.limit
        );
    }

    fn run_loop(&mut self, ctx: &VcpuContext) -> VcpuOutcome {
        loop {
            if ctx.stop.is_stopping() {
                return VcpuOutcome::Stopped;
            }
            if ctx.pause.pause_requested() {
                ctx.pause.park(&ctx.stop);
                continue;
            }
            match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    METRICS.vcpu.exit_io_in.inc();
                    if !ctx.pio_bus.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    METRICS.vcpu.exit_io_out.inc();
                    ctx.pio_bus.write(u64::from(port), data);
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    METRICS.vcpu.exit_mmio_read.inc();
                    if !ctx.mmio_bus.read(addr, data) {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    METRICS.vcpu.exit_mmio_write.inc();
                    ctx.mmio_bus.write(addr, data);
                }
                Ok(VcpuExit::Hlt) => return VcpuOutcome::GuestShutdown,
                Ok(VcpuExit::Shutdown) => {
                    self.log_fault_state();
                    return VcpuOutcome::TripleFault { rip: self.rip() };
                }
                Ok(VcpuExit::InternalError) => {
                    // SAFETY: after KVM_EXIT_INTERNAL_ERROR, `internal` is the union member
                    // KVM filled in.
                    let suberror =
                        unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    self.log_fault_state();
                    return VcpuOutcome::InternalError {
                        suberror,
                        rip: self.rip(),
                    };
                }
                Ok(VcpuExit::FailEntry(reason, _)) => {
                    self.log_fault_state();
                    return VcpuOutcome::FailEntry {
                        reason,
                        rip: self.rip(),
                    };
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => {
                        ctx.stop.guest_reset();
                        return VcpuOutcome::GuestShutdown;
                    }
                    KVM_SYSTEM_EVENT_CRASH => {
                        return VcpuOutcome::GuestError {
                            what: "guest crash event".into(),
                            rip: self.rip(),
                        };
                    }
                    other => log::warn!("vCPU {}: ignoring system event {other}", self.index),
                },
                Ok(VcpuExit::Intr) => {}
                Ok(other) => {
                    return VcpuOutcome::GuestError {
                        what: format!("unexpected exit {other:?}"),
                        rip: self.rip(),
                    };
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // Kicked: clear KVM's immediate-exit request and look at the stop flag.
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) => return VcpuOutcome::RunError(e.to_string()),
            }
        }
    }
}

/// Stops every vCPU thread and returns how each ended, in vCPU order. The stop flag is
/// raised first; then threads still inside `KVM_RUN` are kicked until they leave, which
/// also covers a kick that lands just before a thread enters the guest.
pub fn stop_all(stop: &StopSignal, handles: Vec<JoinHandle<VcpuOutcome>>) -> Vec<VcpuOutcome> {
    stop.request();
    for _ in 0..1000 {
        let running: Vec<&JoinHandle<VcpuOutcome>> =
            handles.iter().filter(|h| !h.is_finished()).collect();
        if running.is_empty() {
            break;
        }
        for h in running {
            let _ = h.kill(kick_signal());
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    handles
        .into_iter()
        .map(|h| {
            if !h.is_finished() {
                log::error!("a vCPU thread does not stop; leaving it behind");
                return VcpuOutcome::RunError("vCPU thread did not stop".into());
            }
            h.join()
                .unwrap_or_else(|_| VcpuOutcome::RunError("vCPU thread panicked".into()))
        })
        .collect()
}
