//! The running vCPUs as one set: pause, resume and stop them all, and wait for their
//! answers without polling. While it waits, the vmm thread keeps running the work vCPUs
//! hand it (a device reset), since a vCPU may be waiting for exactly that.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::devices::work_queue::WorkQueue;
use crate::vstate::vcpu::{
    self, Vcpu, VcpuCommand, VcpuContext, VcpuError, VcpuEvent, VcpuEvents, VcpuHandle, VcpuOutcome,
};

/// A vCPU answers a kick within microseconds; this only bounds a bug.
const ANSWER_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum VcpuSetError {
    #[error("{0}")]
    Vcpu(#[from] VcpuError),
    #[error("vCPU {0} did not answer within {1} s")]
    NoAnswer(u8, u64),
    #[error("cannot save the vCPUs' state: {0}")]
    Save(String),
}

pub struct VcpuSet {
    handles: Vec<VcpuHandle>,
    events: VcpuEvents,
    work: Arc<WorkQueue>,
}

impl VcpuSet {
    /// Starts a thread per vCPU; each installs its seccomp filter and waits, outside the
    /// guest, for [`Self::resume`]. On failure the threads already started are stopped.
    pub fn start(
        vcpus: Vec<Vcpu>,
        ctx: VcpuContext,
        work: Arc<WorkQueue>,
    ) -> Result<Self, VcpuSetError> {
        vcpu::install_kick_handler()?;
        let mut set = VcpuSet {
            handles: Vec::with_capacity(vcpus.len()),
            events: VcpuEvents::new()?,
            work,
        };
        for v in vcpus {
            match v.spawn(ctx.clone(), &set.events) {
                Ok(h) => set.handles.push(h),
                Err(e) => {
                    set.stop();
                    return Err(e.into());
                }
            }
        }
        Ok(set)
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Sends `command` to every vCPU still running and waits until each answered `want`
    /// (or exited).
    fn command_all(&mut self, command: VcpuCommand, want: VcpuEvent) -> Result<(), VcpuSetError> {
        let mut waiting: Vec<u8> = Vec::new();
        for h in &self.handles {
            if h.send(command) {
                waiting.push(h.index);
            }
        }
        let deadline = Instant::now() + ANSWER_DEADLINE;
        while !waiting.is_empty() {
            for (index, event) in self.events.drain() {
                if event == VcpuEvent::Exited
                    && let Some(h) = self.handles.iter_mut().find(|h| h.index == index)
                {
                    h.mark_exited();
                }
                if event == want || event == VcpuEvent::Exited {
                    waiting.retain(|&i| i != index);
                }
            }
            if waiting.is_empty() {
                break;
            }
            if !self.wait_for_answer_or_work(deadline) {
                return Err(VcpuSetError::NoAnswer(
                    waiting[0],
                    ANSWER_DEADLINE.as_secs(),
                ));
            }
        }
        Ok(())
    }

    /// Blocks until a vCPU answers or hands over work (which it then runs); false once the
    /// deadline passed.
    fn wait_for_answer_or_work(&self, deadline: Instant) -> bool {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut fds = [
            libc::pollfd {
                fd: self.events.eventfd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.work.eventfd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: two valid pollfd structures that outlive the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms.max(1)) };
        if ready > 0 && fds[1].revents != 0 {
            self.work.run_pending();
        }
        // An interrupted poll just goes round again.
        true
    }

    /// Takes every vCPU out of the guest; none runs guest code until [`Self::resume`].
    pub fn pause(&mut self) -> Result<(), VcpuSetError> {
        self.command_all(VcpuCommand::Pause, VcpuEvent::Paused)
    }

    /// Every vCPU's state, in vCPU order, for a snapshot. The vCPUs must be paused.
    #[cfg(target_arch = "x86_64")]
    pub fn save_states(
        &mut self,
    ) -> Result<Vec<crate::arch::x86_64::state::VcpuState>, VcpuSetError> {
        self.command_all(VcpuCommand::SaveState, VcpuEvent::Saved)?;
        let mut states = Vec::with_capacity(self.handles.len());
        for h in &self.handles {
            match h.saved.lock().unwrap_or_else(|e| e.into_inner()).take() {
                Some(Ok(state)) => states.push(state),
                Some(Err(e)) => return Err(VcpuSetError::Save(e)),
                None => {
                    return Err(VcpuSetError::Save(format!(
                        "vCPU {} ended before it saved its state",
                        h.index
                    )));
                }
            }
        }
        Ok(states)
    }

    pub fn resume(&mut self) -> Result<(), VcpuSetError> {
        self.command_all(VcpuCommand::Resume, VcpuEvent::Resumed)
    }

    /// Ends every vCPU thread and returns how each ended, in vCPU order. Work vCPUs wait
    /// for is dropped first: the devices will not run again.
    pub fn stop(mut self) -> Vec<VcpuOutcome> {
        self.work.close();
        for h in &self.handles {
            h.send(VcpuCommand::Exit);
        }
        self.handles.drain(..).map(VcpuHandle::join).collect()
    }

    /// True once any vCPU thread has ended on its own.
    pub fn any_exited(&self) -> bool {
        self.handles.iter().any(VcpuHandle::has_exited)
    }
}

/// Stops the threads if the set is dropped without [`VcpuSet::stop`] (an early error).
impl Drop for VcpuSet {
    fn drop(&mut self) {
        if self.handles.is_empty() {
            return;
        }
        self.work.close();
        for h in &self.handles {
            h.send(VcpuCommand::Exit);
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

// They run real-mode x86 code in the vCPUs.
#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::devices::bus::Bus;
    use crate::memory::GuestMemoryMmap;
    use crate::stop::StopSignal;
    use crate::vstate::kvm::KvmContext;
    use crate::vstate::vm::Vm;
    use vm_memory::{Bytes, GuestAddress};

    /// A VM whose vCPUs run `code` in real mode from address 0, with RAM below 0x8000 and
    /// `mmio` at 0x8000.
    fn vm_running(n: u8, code: &[u8], mmio: Bus, work: Arc<WorkQueue>) -> (VcpuSet, Vm) {
        let kvm = KvmContext::open().unwrap();
        let mut vm = Vm::new(&kvm).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8000)]).unwrap();
        mem.write_slice(code, GuestAddress(0)).unwrap();
        vm.register_memory(&mem, false).unwrap();
        vm.create_interrupt_controllers(crate::config::Irqchip::Kernel)
            .unwrap();
        let vcpus: Vec<Vcpu> = (0..n)
            .map(|index| {
                let fd = vm.create_vcpu(index).unwrap();
                let mut sregs = fd.get_sregs().unwrap();
                for seg in [&mut sregs.cs, &mut sregs.ds] {
                    seg.base = 0;
                    seg.selector = 0;
                }
                fd.set_sregs(&sregs).unwrap();
                let mut regs = fd.get_regs().unwrap();
                regs.rip = 0;
                regs.rflags = 2;
                fd.set_regs(&regs).unwrap();
                // Every vCPU runnable, not waiting for INIT/SIPI.
                fd.set_mp_state(kvm_bindings::kvm_mp_state { mp_state: 0 })
                    .unwrap();
                Vcpu { index, fd }
            })
            .collect();
        let ctx = VcpuContext {
            pio_bus: Arc::new(Bus::new()),
            mmio_bus: Arc::new(mmio),
            stop: StopSignal::new().unwrap(),
            seccomp: Arc::new(crate::seccomp::Filters::none()),
            ioapic: None,
            msrs_to_save: Arc::new(Vec::new()),
        };
        let set = VcpuSet::start(vcpus, ctx, work).unwrap();
        // Let them into the guest without waiting for their answers: `resume` would run
        // work they hand over meanwhile, which a test may want left for `pause`.
        for h in &set.handles {
            h.send(VcpuCommand::Resume);
        }
        (set, vm)
    }

    fn work_queue() -> Arc<WorkQueue> {
        Arc::new(WorkQueue::new().unwrap())
    }

    /// `jmp $`: the vCPU stays inside the guest, where only a kick reaches it.
    const SPIN: [u8; 2] = [0xeb, 0xfe];

    #[test]
    fn pause_resume_and_stop_reach_vcpus_inside_the_guest() {
        let (mut set, _vm) = vm_running(2, &SPIN, Bus::new(), work_queue());
        std::thread::sleep(Duration::from_millis(20)); // let them enter the guest
        for _ in 0..3 {
            let t = Instant::now();
            set.pause().unwrap();
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "pause took {:?}",
                t.elapsed()
            );
            set.resume().unwrap();
        }
        let outcomes = set.stop();
        assert_eq!(outcomes, vec![VcpuOutcome::Stopped, VcpuOutcome::Stopped]);
    }

    /// A device register whose write hands a job to the vmm thread and waits for it, as a
    /// virtio reset does.
    struct WaitsForVmmThread {
        work: Arc<WorkQueue>,
        ran: Arc<std::sync::atomic::AtomicBool>,
    }

    impl crate::devices::bus::BusDevice for WaitsForVmmThread {
        fn read(&mut self, _offset: u64, _data: &mut [u8]) {}
        fn write(&mut self, _offset: u64, _data: &[u8]) {
            let ran = self.ran.clone();
            self.work
                .run(move || ran.store(true, std::sync::atomic::Ordering::SeqCst));
        }
    }

    #[test]
    fn pausing_runs_the_work_a_vcpu_waits_for_instead_of_deadlocking() {
        let work = work_queue();
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut mmio = Bus::new();
        mmio.insert(
            Arc::new(std::sync::Mutex::new(WaitsForVmmThread {
                work: work.clone(),
                ran: ran.clone(),
            })),
            0x8000,
            0x1000,
        )
        .unwrap();
        // mov byte [0x8000], 1 ; jmp $
        let code = [0xc6, 0x06, 0x00, 0x80, 0x01, 0xeb, 0xfe];
        let (mut set, _vm) = vm_running(1, &code, mmio, work.clone());
        // Wait until the vCPU has handed over its job (the queue's eventfd turns readable).
        let mut p = libc::pollfd {
            fd: work.eventfd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        assert_eq!(
            unsafe { libc::poll(&mut p, 1, 10_000) },
            1,
            "no job handed over"
        );
        // The vCPU blocks in the register write until the vmm thread runs its job; only a
        // pause that runs work while it waits can get its answer.
        set.pause().unwrap();
        assert!(ran.load(std::sync::atomic::Ordering::SeqCst));
        set.resume().unwrap();
        assert_eq!(set.stop(), vec![VcpuOutcome::Stopped]);
    }
}
