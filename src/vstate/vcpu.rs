//! One vCPU: the thread that owns its `VcpuFd`, runs the guest and dispatches its exits,
//! and takes commands (pause, resume, exit) from the vmm thread.
//!
//! A command is sent on the vCPU's channel, then the thread is kicked with [`kick_signal`]:
//! the handler sets the vCPU's `immediate_exit`, so `KVM_RUN` returns at once whether the
//! signal lands inside the guest or just before the thread enters it. The thread answers
//! each command on a shared channel whose eventfd the vmm thread can wait on. A vCPU thread
//! never does host I/O; exits only reach device registers.

use std::cell::Cell;
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::arch;
use crate::devices::bus::Bus;
use crate::devices::legacy::ioapic::Ioapic;
use crate::metrics::METRICS;
use crate::seccomp::{Filters, ThreadKind};
use crate::stop::StopSignal;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot start the thread of vCPU {0}: {1}")]
    Spawn(u8, std::io::Error),
    #[error("cannot install the vCPU kick signal handler: {0}")]
    KickHandler(vmm_sys_util::errno::Error),
    #[error("cannot create the vCPU event channel: {0}")]
    Events(std::io::Error),
}

/// The real-time signal used to kick a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

/// The size of one element of the current port I/O exit (1, 2 or 4 bytes): the exit's data
/// holds `count` of them for a string instruction.
fn io_access_size() -> usize {
    let run = KVM_RUN.with(|p| p.get());
    if run.is_null() {
        return usize::MAX;
    }
    // SAFETY: `run` is this thread's vCPU kvm_run mapping, set before the first KVM_RUN and
    // valid while the vCPU fd lives; during an IO exit `io.size` is what KVM filled in. The
    // field lies apart from the data the exit hands out.
    let size = unsafe { (*run).__bindgen_anon_1.io.size };
    match size {
        1 | 2 | 4 => usize::from(size),
        _ => usize::MAX,
    }
}

thread_local! {
    /// The running vCPU's `kvm_run` area, for the kick handler. Null outside vCPU threads.
    static KVM_RUN: Cell<*mut kvm_bindings::kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Installs the kick handler: it asks KVM to leave (or not enter) the guest.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
        let run = KVM_RUN.with(Cell::get);
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set by the vCPU
            // thread before it could be kicked and valid for the thread's life.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
    }
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
    /// The vCPU thread could not be readied (its seccomp filter would not install).
    SetupError(String),
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
            VcpuOutcome::SetupError(e) => write!(f, "{e}"),
        }
    }
}

/// What the vmm thread tells a vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuCommand {
    /// Leave the guest and wait; answered with [`VcpuEvent::Paused`].
    Pause,
    /// Run the guest again; answered with [`VcpuEvent::Resumed`].
    Resume,
    /// End the thread; it answers with [`VcpuEvent::Exited`].
    Exit,
    /// While paused: read the vCPU's state for a snapshot into the handle's slot; answered
    /// with [`VcpuEvent::Saved`].
    #[cfg(target_arch = "x86_64")]
    SaveState,
}

/// What a vCPU tells the vmm thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuEvent {
    Paused,
    Resumed,
    /// The state asked for with [`VcpuCommand::SaveState`] is in the handle's slot.
    #[cfg(target_arch = "x86_64")]
    Saved,
    /// The thread ended, told to or on its own (guest reset, fault).
    Exited,
}

/// Where a vCPU thread leaves its saved state (or why it could not save it).
#[cfg(target_arch = "x86_64")]
pub type SavedStateSlot = Arc<Mutex<Option<Result<arch::x86_64::state::VcpuState, String>>>>;

/// The vCPUs' answers, with an eventfd that is readable while any wait.
pub struct VcpuEvents {
    rx: Receiver<(u8, VcpuEvent)>,
    tx: Sender<(u8, VcpuEvent)>,
    evt: Arc<EventFd>,
}

impl VcpuEvents {
    pub fn new() -> Result<Self, VcpuError> {
        let (tx, rx) = channel();
        Ok(VcpuEvents {
            rx,
            tx,
            evt: Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(VcpuError::Events)?),
        })
    }

    fn sender(&self) -> EventSender {
        EventSender {
            tx: self.tx.clone(),
            evt: self.evt.clone(),
        }
    }

    /// The answers that arrived so far.
    pub fn drain(&self) -> Vec<(u8, VcpuEvent)> {
        let _ = self.evt.read();
        std::iter::from_fn(|| self.rx.try_recv().ok()).collect()
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[derive(Clone)]
struct EventSender {
    tx: Sender<(u8, VcpuEvent)>,
    evt: Arc<EventFd>,
}

impl EventSender {
    fn send(&self, index: u8, event: VcpuEvent) {
        // The receiver lives as long as the VM; if it is gone nobody is waiting.
        let _ = self.tx.send((index, event));
        let _ = self.evt.write(1);
    }
}

/// What a running vCPU needs to dispatch exits and to stop.
#[derive(Clone)]
pub struct VcpuContext {
    pub pio_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    /// Raised by whatever ends the VM; the vCPU checks it before every entry.
    pub stop: StopSignal,
    /// The vCPU thread installs its filter before anything else.
    pub seccomp: Arc<Filters>,
    /// ember's I/O APIC (split irqchip): the local APIC's EOIs of level-triggered
    /// interrupts come to it through this vCPU's exits.
    pub ioapic: Option<Arc<Mutex<Ioapic>>>,
    /// The MSRs a snapshot saves (`state::msrs_to_save`), read once per VM.
    #[cfg(target_arch = "x86_64")]
    pub msrs_to_save: Arc<Vec<u32>>,
}

/// What a vCPU thread waits on and answers through.
struct Waiter<'a> {
    rx: &'a Receiver<VcpuCommand>,
    events: &'a EventSender,
    #[cfg(target_arch = "x86_64")]
    slot: &'a SavedStateSlot,
    #[cfg(target_arch = "x86_64")]
    msrs_to_save: &'a [u32],
}

/// A vCPU configured and ready to run.
pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
}

/// The vmm thread's handle on a running vCPU thread.
pub struct VcpuHandle {
    pub index: u8,
    commands: Sender<VcpuCommand>,
    #[cfg(target_arch = "x86_64")]
    pub saved: SavedStateSlot,
    thread: Option<JoinHandle<VcpuOutcome>>,
    /// Set once the thread has said it exited.
    exited: bool,
}

impl Vcpu {
    /// Starts the vCPU's thread, which installs its seccomp filter and waits for the first
    /// `Resume` before it enters the guest. The thread raises `ctx.stop` when it ends on
    /// its own.
    pub fn spawn(self, ctx: VcpuContext, events: &VcpuEvents) -> Result<VcpuHandle, VcpuError> {
        let index = self.index;
        let (commands, rx) = channel();
        let sender = events.sender();
        #[cfg(target_arch = "x86_64")]
        let saved: SavedStateSlot = Arc::new(Mutex::new(None));
        #[cfg(target_arch = "x86_64")]
        let slot = saved.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let mut vcpu = self;
                let waiter = Waiter {
                    rx: &rx,
                    events: &sender,
                    #[cfg(target_arch = "x86_64")]
                    slot: &slot,
                    #[cfg(target_arch = "x86_64")]
                    msrs_to_save: &ctx.msrs_to_save,
                };
                // Jailed before it waits for the first Resume, which comes only once the
                // vmm thread is jailed too: no guest code runs beside an unfiltered thread.
                let outcome = match ctx.seccomp.install(ThreadKind::Vcpu) {
                    Err(e) => VcpuOutcome::SetupError(e.to_string()),
                    Ok(()) if !vcpu.wait_paused(&waiter) => VcpuOutcome::Stopped,
                    Ok(()) => vcpu.run_loop(&ctx, &waiter),
                };
                if outcome != VcpuOutcome::Stopped {
                    if outcome.is_fault() {
                        METRICS.vcpu.failures.inc();
                        log::error!("vCPU {index}: {outcome}");
                    } else {
                        log::info!("vCPU {index}: {outcome}");
                    }
                    ctx.stop.request();
                }
                KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
                sender.send(index, VcpuEvent::Exited);
                outcome
            })
            .map_err(|e| VcpuError::Spawn(index, e))?;
        Ok(VcpuHandle {
            index,
            commands,
            #[cfg(target_arch = "x86_64")]
            saved,
            thread: Some(thread),
            exited: false,
        })
    }

    fn rip(&self) -> u64 {
        arch::instruction_pointer(&self.fd)
    }

    /// Logs where the vCPU was when the guest faulted, for whoever has to find out why.
    fn log_fault_state(&self) {
        log::error!("vCPU {}: {}", self.index, arch::fault_state(&self.fd));
    }

    /// Waits while paused. Returns false when told to exit.
    fn wait_paused(&mut self, w: &Waiter) -> bool {
        loop {
            match w.rx.recv() {
                Ok(VcpuCommand::Resume) => {
                    w.events.send(self.index, VcpuEvent::Resumed);
                    return true;
                }
                Ok(VcpuCommand::Pause) => w.events.send(self.index, VcpuEvent::Paused),
                #[cfg(target_arch = "x86_64")]
                Ok(VcpuCommand::SaveState) => {
                    let state = self.save_state(w.msrs_to_save);
                    *w.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(state);
                    w.events.send(self.index, VcpuEvent::Saved);
                }
                Ok(VcpuCommand::Exit) | Err(_) => return false,
            }
        }
    }

    /// The vCPU's state for a snapshot. The last exit's instruction is completed first
    /// (an `in` needs the value the device gave): KVM does that on an entry that leaves at
    /// once, without running guest code.
    #[cfg(target_arch = "x86_64")]
    fn save_state(
        &mut self,
        msrs_to_save: &[u32],
    ) -> Result<arch::x86_64::state::VcpuState, String> {
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => {
                return Err(format!(
                    "cannot complete vCPU {}'s last exit: {e}",
                    self.index
                ));
            }
            Ok(exit) => {
                return Err(format!(
                    "vCPU {} left KVM with {exit:?} while completing its last exit",
                    self.index
                ));
            }
        }
        self.fd.set_kvm_immediate_exit(0);
        arch::x86_64::state::save_vcpu(&self.fd, self.index, msrs_to_save)
            .map_err(|e| e.to_string())
    }

    fn run_loop(&mut self, ctx: &VcpuContext, w: &Waiter) -> VcpuOutcome {
        let (rx, events) = (w.rx, w.events);
        KVM_RUN.with(|p| p.set(self.fd.get_kvm_run() as *mut _));
        loop {
            match rx.try_recv() {
                Ok(VcpuCommand::Pause) => {
                    events.send(self.index, VcpuEvent::Paused);
                    if !self.wait_paused(w) {
                        return VcpuOutcome::Stopped;
                    }
                    continue;
                }
                // Only a paused vCPU saves its state; a running one says it could not.
                #[cfg(target_arch = "x86_64")]
                Ok(VcpuCommand::SaveState) => {
                    *w.slot.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(Err(format!("vCPU {} is not paused", self.index)));
                    events.send(self.index, VcpuEvent::Saved);
                }
                Ok(VcpuCommand::Resume) => events.send(self.index, VcpuEvent::Resumed),
                Ok(VcpuCommand::Exit) | Err(TryRecvError::Disconnected) => {
                    return VcpuOutcome::Stopped;
                }
                Err(TryRecvError::Empty) => {}
            }
            if ctx.stop.is_stopping() {
                return VcpuOutcome::Stopped;
            }
            if let Some(outcome) = self.run_once(ctx) {
                return outcome;
            }
        }
    }

    /// One entry into the guest and the exit that ends it; Some when the vCPU is done.
    fn run_once(&mut self, ctx: &VcpuContext) -> Option<VcpuOutcome> {
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                METRICS.vcpu.exit_io_in.inc();
                // A string instruction (`rep insb`) reads the port once per element.
                for element in data.chunks_mut(io_access_size()) {
                    if !ctx.pio_bus.read(u64::from(port), element) {
                        element.fill(0xff);
                    }
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                METRICS.vcpu.exit_io_out.inc();
                // `rep outsb` to a UART writes every byte, not just the first.
                for element in data.chunks(io_access_size()) {
                    ctx.pio_bus.write(u64::from(port), element);
                }
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
            Ok(VcpuExit::IoapicEoi(vector)) => {
                if let Some(ioapic) = &ctx.ioapic {
                    ioapic
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .end_of_interrupt(vector);
                }
            }
            Ok(VcpuExit::Hlt) => return Some(VcpuOutcome::GuestShutdown),
            Ok(VcpuExit::Shutdown) => {
                self.log_fault_state();
                return Some(VcpuOutcome::TripleFault { rip: self.rip() });
            }
            Ok(VcpuExit::InternalError) => {
                // SAFETY: after KVM_EXIT_INTERNAL_ERROR, `internal` is the union member KVM
                // filled in.
                let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                self.log_fault_state();
                return Some(VcpuOutcome::InternalError {
                    suberror,
                    rip: self.rip(),
                });
            }
            Ok(VcpuExit::FailEntry(reason, _)) => {
                self.log_fault_state();
                return Some(VcpuOutcome::FailEntry {
                    reason,
                    rip: self.rip(),
                });
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => {
                    ctx.stop.guest_reset();
                    return Some(VcpuOutcome::GuestShutdown);
                }
                KVM_SYSTEM_EVENT_CRASH => {
                    return Some(VcpuOutcome::GuestError {
                        what: "guest crash event".into(),
                        rip: self.rip(),
                    });
                }
                other => crate::rate_limited_log!(
                    log::Level::Warn,
                    "vCPU {}: ignoring system event {other}",
                    self.index
                ),
            },
            Ok(VcpuExit::Intr) => {}
            Ok(other) => {
                return Some(VcpuOutcome::GuestError {
                    what: format!("unexpected exit {other:?}"),
                    rip: self.rip(),
                });
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked: clear the request so the next entry runs the guest again.
                self.fd.set_kvm_immediate_exit(0);
            }
            Err(e) => return Some(VcpuOutcome::RunError(e.to_string())),
        }
        None
    }
}

impl VcpuHandle {
    /// Sends `command` and kicks the thread so it sees it now. False if the thread is gone.
    pub fn send(&self, command: VcpuCommand) -> bool {
        if self.exited || self.commands.send(command).is_err() {
            return false;
        }
        if let Some(t) = &self.thread
            && !t.is_finished()
        {
            let _ = t.kill(kick_signal());
        }
        true
    }

    pub fn mark_exited(&mut self) {
        self.exited = true;
    }

    pub fn has_exited(&self) -> bool {
        self.exited || self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits for the thread to end and returns how it ended.
    pub fn join(mut self) -> VcpuOutcome {
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| VcpuOutcome::RunError("vCPU thread panicked".into())),
            None => VcpuOutcome::Stopped,
        }
    }
}
