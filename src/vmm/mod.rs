//! The controller: builds the microVM, runs its event loop on the vmm thread, stops it and
//! decides the exit code.

pub mod builder;
pub mod console;
pub mod signals;

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::terminal::Terminal;

use crate::exit_code;
use crate::stop::StopSignal;
use crate::vstate::vcpu::{self, VcpuContext, VcpuError, VcpuOutcome};
use builder::MicroVm;
use console::ConsoleInput;
use signals::{SignalError, SignalHandler};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot create the event loop: {0}")]
    EventLoop(event_manager::Error),
    #[error("cannot duplicate an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("{0}")]
    Signals(#[from] SignalError),
    #[error("{0}")]
    Vcpu(#[from] VcpuError),
}

/// How the microVM ended, and the process exit code that says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmExit {
    pub code: u8,
    pub reason: String,
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Wakes the event loop when something raised the stop signal.
struct StopListener(StopSignal);

impl MutEventSubscriber for StopListener {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.eventfd().read();
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.eventfd(), EventSet::IN)) {
            log::error!("cannot watch the stop eventfd: {e}");
        }
    }
}

/// Puts a terminal on stdin into raw mode for the life of the VM, so keystrokes reach the
/// guest as typed, and restores it however the VM ends.
struct RawTerminal(bool);

impl RawTerminal {
    fn enter() -> Self {
        let stdin = std::io::stdin().lock();
        // SAFETY: isatty only inspects the descriptor.
        let tty = unsafe { libc::isatty(0) } == 1;
        let raw = tty && stdin.set_raw_mode().is_ok();
        RawTerminal(raw)
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if self.0 {
            let _ = std::io::stdin().lock().set_canon_mode();
        }
    }
}

/// Decides the exit from what the vCPUs reported, whether the guest asked to reset, and
/// which signal (if any) stopped ember. A guest fault wins over everything: the code must
/// never claim a clean shutdown for a guest that crashed, even if the crash raced with it.
pub fn decide_exit(outcomes: &[VcpuOutcome], guest_reset: bool, signal: i32) -> VmExit {
    if let Some((i, o)) = outcomes.iter().enumerate().find(|(_, o)| o.is_fault()) {
        let code = match o {
            VcpuOutcome::RunError(_) => exit_code::VMM_ERROR,
            _ => exit_code::GUEST_FAULT,
        };
        return VmExit {
            code,
            reason: format!("vCPU {i}: {o}"),
        };
    }
    if guest_reset || outcomes.contains(&VcpuOutcome::GuestShutdown) {
        return VmExit {
            code: exit_code::GUEST_SHUTDOWN,
            reason: "the guest reset or powered off".into(),
        };
    }
    if signal > 0 {
        return VmExit {
            code: exit_code::SIGNAL_BASE.saturating_add(signal as u8),
            reason: format!("stopped by signal {signal}"),
        };
    }
    VmExit {
        code: exit_code::VMM_ERROR,
        reason: "the VM stopped for no recorded reason".into(),
    }
}

/// Runs a built microVM until it stops; returns how it ended.
pub fn run(mut vm: MicroVm) -> Result<VmExit, VmmError> {
    let mut events: EventManager<Subscriber> = EventManager::new().map_err(VmmError::EventLoop)?;
    let received_signal = Arc::new(AtomicI32::new(0));
    events.add_subscriber(Arc::new(Mutex::new(SignalHandler::new(
        vm.stop.clone(),
        received_signal.clone(),
    )?)));
    events.add_subscriber(Arc::new(Mutex::new(StopListener(vm.stop.clone()))));
    let drained = vm
        .serial_input_drained
        .try_clone()
        .map_err(VmmError::EventFd)?;
    events.add_subscriber(Arc::new(Mutex::new(ConsoleInput::new(
        vm.serial.clone(),
        drained,
    ))));

    vcpu::install_kick_handler()?;
    let _terminal = RawTerminal::enter();

    let ctx = VcpuContext {
        pio_bus: vm.pio_bus.clone(),
        mmio_bus: vm.mmio_bus.clone(),
        stop: vm.stop.clone(),
    };
    let mut handles = Vec::with_capacity(vm.vcpus.len());
    for v in vm.vcpus.drain(..) {
        match v.spawn(ctx.clone()) {
            Ok(h) => handles.push(h),
            Err(e) => {
                vcpu::stop_all(&vm.stop, handles);
                return Err(e.into());
            }
        }
    }
    log::info!("microVM running with {} vCPUs", handles.len());

    while !vm.stop.is_stopping() {
        if let Err(e) = events.run() {
            log::error!("event loop failed: {e}; stopping the microVM");
            vm.stop.request();
        }
    }

    let outcomes = vcpu::stop_all(&vm.stop, handles);
    let exit = decide_exit(
        &outcomes,
        vm.stop.was_guest_reset(),
        received_signal.load(Ordering::SeqCst),
    );
    Ok(exit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_beats_reset_and_signal() {
        let outcomes = vec![
            VcpuOutcome::Stopped,
            VcpuOutcome::TripleFault { rip: 0x1234 },
        ];
        let exit = decide_exit(&outcomes, true, libc::SIGTERM);
        assert_eq!(exit.code, exit_code::GUEST_FAULT);
        assert!(
            exit.reason.contains("vCPU 1") && exit.reason.contains("0x1234"),
            "{}",
            exit.reason
        );
    }

    #[test]
    fn reset_is_clean() {
        let exit = decide_exit(&[VcpuOutcome::Stopped, VcpuOutcome::Stopped], true, 0);
        assert_eq!(exit.code, 0);
        let exit = decide_exit(&[VcpuOutcome::GuestShutdown], false, 0);
        assert_eq!(exit.code, 0);
    }

    #[test]
    fn signal_gives_128_plus_n() {
        let exit = decide_exit(&[VcpuOutcome::Stopped], false, libc::SIGTERM);
        assert_eq!(exit.code, 128 + 15);
    }

    #[test]
    fn internal_error_and_run_error_codes() {
        let e = decide_exit(
            &[VcpuOutcome::InternalError {
                suberror: 1,
                rip: 0,
            }],
            false,
            0,
        );
        assert_eq!(e.code, exit_code::GUEST_FAULT);
        assert!(e.reason.contains("emulation failure"));
        let e = decide_exit(&[VcpuOutcome::RunError("x".into())], false, 0);
        assert_eq!(e.code, exit_code::VMM_ERROR);
    }
}
