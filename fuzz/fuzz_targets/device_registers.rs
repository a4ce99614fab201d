//! Register access from a hostile guest: the input is a sequence of reads and writes of
//! any width at any offset, aimed at a virtio-mmio transport carrying a real virtio-blk
//! device and at the legacy port devices (UART, i8042, ACPI power management), as vCPU
//! exits deliver them, with a stand-in vmm thread running the jobs the transport hands it.
//! Any panic or hang is a bug.
//!
//! Checked beyond "no panic": whatever the guest wrote (resets, feature and queue set-up,
//! activation with garbage rings), the transport still answers with its magic value.

#![no_main]

#[path = "shared/disk.rs"]
mod disk;

use std::sync::{Arc, Mutex, OnceLock};

use disk::disk;
use ember::devices::bus::BusDevice;
use ember::devices::legacy::IrqLine;
use ember::devices::legacy::i8042::I8042;
use ember::devices::legacy::power::PowerManagement;
use ember::devices::legacy::serial::{ConsoleOutput, OutputBuffer, SerialDevice};
use ember::devices::virtio::VirtioDevice;
use ember::devices::virtio::block::{Block, BlockConfig};
use ember::devices::virtio::mmio::{MmioInterrupt, MmioTransport};
use ember::devices::work_queue::WorkQueue;
use ember::memory::GuestMemoryMmap;
use ember::stop::StopSignal;
use ember::vstate::kvm::KvmContext;
use ember::vstate::vm::Vm;
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 1 << 20;
const MMIO_WINDOW: u64 = 0x1000;

thread_local! {
    /// One VM for the whole run: only its irqfds are used, and KVM_CREATE_VM per input
    /// would cost more than the input itself.
    static VM: Vm = {
        let mut vm = Vm::new(&KvmContext::open().expect("/dev/kvm")).expect("a VM");
        vm.create_interrupt_controllers(ember::config::Irqchip::Kernel)
            .expect("irqchip");
        vm
    };
}

/// The work queue and a thread standing in for the vmm thread that runs its jobs (reset,
/// stopping a queue): the transport waits for them, as a vCPU does, so they must run on
/// another thread than the accesses.
fn vmm_thread() -> Arc<WorkQueue> {
    static WORK: OnceLock<Arc<WorkQueue>> = OnceLock::new();
    WORK.get_or_init(|| {
        let work = Arc::new(WorkQueue::new().expect("work queue"));
        let runner = work.clone();
        std::thread::spawn(move || {
            loop {
                let mut p = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(runner.eventfd()),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut p, 1, -1) } > 0 {
                    runner.run_pending();
                }
            }
        });
        work
    })
    .clone()
}

fn line() -> IrqLine {
    IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
}

fuzz_target!(|data: &[u8]| {
    VM.with(|vm| run(vm, data));
});

fn run(vm: &Vm, data: &[u8]) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("memory");
    let block = Block::new(BlockConfig {
        id: "fuzz".into(),
        path: disk().into(),
        read_only: false,
        flush: true,
        async_io: false,
        rate_limiter: None,
    })
    .expect("open the disk");
    let device: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(block));
    let queue_evts = (0..device.lock().expect("lock").queue_max_sizes().len())
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
        .collect();
    let irq = Arc::new(MmioInterrupt::new(Box::new(
        vm.irqfd(5, "fuzz").expect("irqfd"),
    )));
    let mut mmio = MmioTransport::new(device, mem, irq, queue_evts, vmm_thread());

    let stop = StopSignal::new().expect("stop signal");
    let out = Arc::new(OutputBuffer::new(4096).expect("output buffer"));
    let mut serial = SerialDevice::new(
        Box::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")),
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        ConsoleOutput::new(out, None),
    )
    .expect("serial port");
    let mut i8042 = I8042::new(stop.clone(), line());
    let mut power = PowerManagement::new(5, stop);

    // Each access: 1 byte selecting device, direction and width, 2 bytes of offset,
    // 8 bytes of value (fewer at the end of the input are zero).
    for op in data.chunks(11) {
        let sel = op[0];
        let offset = u64::from(u16::from_le_bytes([
            op.get(1).copied().unwrap_or(0),
            op.get(2).copied().unwrap_or(0),
        ]));
        let mut value = [0u8; 8];
        let rest = op.get(3..).unwrap_or(&[]);
        value[..rest.len()].copy_from_slice(rest);
        let width = [1usize, 2, 4, 8][usize::from((sel >> 1) & 3)];
        let write = sel & 1 == 1;
        let (dev, offset): (&mut dyn BusDevice, u64) = match (sel >> 3) % 4 {
            0 => (&mut mmio, offset % (MMIO_WINDOW + 8)),
            1 => (&mut serial, offset % 8),
            2 => (&mut i8042, offset % 8),
            _ => (&mut power, offset % 8),
        };
        if write {
            dev.write(offset, &value[..width]);
        } else {
            let mut buf = [0u8; 8];
            dev.read(offset, &mut buf[..width]);
        }
    }
    let mut magic = [0u8; 4];
    mmio.read(0, &mut magic);
    assert_eq!(&magic, b"virt", "the virtio-mmio magic value changed");
}
