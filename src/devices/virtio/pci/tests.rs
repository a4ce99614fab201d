use std::sync::{Arc, Mutex};

use crate::memory::GuestMemoryMmap;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::pci::msix::recorder::Recorder as Vector;
use crate::devices::virtio::test_utils::{FakeDevice, run_work_on_a_thread};
use crate::devices::virtio::{VIRTIO_F_VERSION_1, status};
use crate::vstate::gsi_routes::MsiMessage;

const BAR: u64 = 0x1_0000_0000;

struct Setup {
    f: VirtioPciFunction,
    dev: Arc<Mutex<FakeDevice>>,
    vectors: Vec<Vector>,
    evts: Vec<EventFd>,
}

/// A function for a device with two queues, BAR 0 at `BAR`, no VM behind it.
fn function() -> Setup {
    let dev = Arc::new(Mutex::new(FakeDevice::new(&[16, 16])));
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let work = Arc::new(WorkQueue::new().unwrap());
    run_work_on_a_thread(work.clone());
    let vectors: Vec<Vector> = (0..3).map(|_| Vector::default()).collect();
    let sinks = vectors
        .iter()
        .map(|v| Box::new(v.clone()) as Box<dyn VectorSink>)
        .collect();
    let evts: Vec<EventFd> = (0..2)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    let clones = evts.iter().map(|e| e.try_clone().unwrap()).collect();
    let f = VirtioPciFunction::new(dev.clone(), mem, work, BAR, sinks, clones, None).unwrap();
    Setup {
        f,
        dev,
        vectors,
        evts,
    }
}

fn read(f: &mut VirtioPciFunction, offset: u64, len: usize) -> u64 {
    let mut b = vec![0u8; len];
    f.read_bar(0, offset, &mut b);
    to_u64(&b)
}

fn write(f: &mut VirtioPciFunction, offset: u64, len: usize, value: u64) {
    f.write_bar(0, offset, &value.to_le_bytes()[..len]);
}

fn cfg_read(f: &mut VirtioPciFunction, offset: usize, len: usize) -> u64 {
    let mut b = vec![0u8; len];
    f.read_config(offset, &mut b);
    to_u64(&b)
}

/// The capabilities in list order: (offset, ID, virtio structure type or 0).
fn capabilities(f: &mut VirtioPciFunction) -> Vec<(usize, u8, u8)> {
    let mut caps = Vec::new();
    let mut at = cfg_read(f, 0x34, 1) as usize;
    while at != 0 {
        let id = cfg_read(f, at, 1) as u8;
        let kind = if id == CAP_VENDOR {
            cfg_read(f, at + 3, 1) as u8
        } else {
            0
        };
        caps.push((at, id, kind));
        at = cfg_read(f, at + 1, 1) as usize;
    }
    caps
}

/// The spec's initialisation up to DRIVER_OK, both queues set up with vectors 1 and 2 and
/// configuration changes on vector 0, MSI-X enabled and every vector unmasked.
fn drive_to_running(s: &mut Setup) {
    let f = &mut s.f;
    let msix_cap = capabilities(f)
        .into_iter()
        .find(|c| c.1 == msix::CAPABILITY_ID)
        .unwrap()
        .0;
    f.write_config(msix_cap + 2, &0x8000u16.to_le_bytes());
    for v in 0..3u64 {
        write(f, MSIX_TABLE + v * 16, 8, 0xfee0_0000);
        write(f, MSIX_TABLE + v * 16 + 8, 4, 0x40 + v);
        write(f, MSIX_TABLE + v * 16 + 12, 4, 0);
    }
    write(f, 0x14, 1, u64::from(status::ACKNOWLEDGE | status::DRIVER));
    write(f, 0x08, 4, 1);
    write(f, 0x0c, 4, 1 << (VIRTIO_F_VERSION_1 - 32));
    let s3 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    write(f, 0x14, 1, u64::from(s3));
    assert_eq!(read(f, 0x14, 1), u64::from(s3), "features accepted");
    write(f, 0x10, 2, 0);
    for q in 0..2u64 {
        write(f, 0x16, 2, q);
        write(f, 0x18, 2, 8);
        write(f, 0x1a, 2, q + 1);
        // 64-bit addresses written as two halves, as Linux does.
        write(f, 0x20, 4, 0x1000 + q * 0x1000);
        write(f, 0x24, 4, 0);
        write(f, 0x28, 4, 0x4000 + q * 0x1000);
        write(f, 0x2c, 4, 0);
        write(f, 0x30, 8, 0x8000 + q * 0x1000);
        write(f, 0x1c, 2, 1);
    }
    write(f, 0x14, 1, u64::from(s3 | status::DRIVER_OK));
}

#[test]
fn identity_and_every_structure_the_spec_requires_are_announced() {
    let Setup { mut f, .. } = function();
    assert_eq!(cfg_read(&mut f, 0, 2), 0x1af4);
    assert_eq!(cfg_read(&mut f, 2, 2), 0x1042, "0x1040 + block");
    assert_eq!(
        cfg_read(&mut f, 8, 1),
        1,
        "modern devices have revision >= 1"
    );
    assert_eq!(cfg_read(&mut f, 0x09, 3), 0x018000, "other mass storage");
    assert_eq!(cfg_read(&mut f, 0x10, 4), u64::from(BAR as u32 | 0b100));
    assert_eq!(cfg_read(&mut f, 0x14, 4), BAR >> 32);
    let caps = capabilities(&mut f);
    let kinds: Vec<u8> = caps.iter().map(|c| c.2).collect();
    assert_eq!(kinds, [1, 2, 3, 4, 5, 0]);
    assert_eq!(caps[5].1, msix::CAPABILITY_ID);
    // The notify structure: its region and the multiplier.
    let notify = caps[1].0;
    assert_eq!(cfg_read(&mut f, notify + 2, 1), 20);
    assert_eq!(cfg_read(&mut f, notify + 8, 4), NOTIFY);
    assert_eq!(cfg_read(&mut f, notify + 12, 4), 8, "two queues of 4 bytes");
    assert_eq!(cfg_read(&mut f, notify + 16, 4), 4);
    // MSI-X: three vectors (two queues and configuration), table and PBA in BAR 0.
    let m = caps[5].0;
    assert_eq!(cfg_read(&mut f, m + 2, 2), 2);
    assert_eq!(cfg_read(&mut f, m + 4, 4), MSIX_TABLE);
    assert_eq!(cfg_read(&mut f, m + 8, 4), MSIX_PBA);
    // The common structure's read-only fields.
    assert_eq!(read(&mut f, 0x12, 2), 2, "num_queues");
    write(&mut f, 0x16, 2, 1);
    assert_eq!(
        read(&mut f, 0x18, 2),
        16,
        "queue_size starts at the maximum"
    );
    assert_eq!(read(&mut f, 0x1e, 2), 1, "queue_notify_off");
    write(&mut f, 0x16, 2, 2);
    assert_eq!(read(&mut f, 0x18, 2), 0, "no queue 2");
    assert_eq!(read(&mut f, 0x04, 4), 1 << 5);
    write(&mut f, 0x00, 4, 1);
    assert_eq!(read(&mut f, 0x04, 4), 1, "VERSION_1 in the high word");
    // The device's own configuration.
    assert_eq!(read(&mut f, DEVICE_CONFIG, 4), 0x1234);
}

#[test]
fn a_running_device_interrupts_through_its_queues_vectors() {
    let mut s = function();
    drive_to_running(&mut s);
    let dev = s.dev.lock().unwrap();
    assert_eq!(dev.activated_with, Some((1 << VIRTIO_F_VERSION_1, 2)));
    let irq = dev.interrupt.clone().unwrap();
    drop(dev);
    irq.trigger(VirtioInterruptType::Queue(1));
    assert_eq!(s.vectors[2].sent(), 1);
    assert_eq!(s.vectors[1].sent(), 0);
    // With MSI-X, only configuration changes show in the ISR.
    assert_eq!(read(&mut s.f, ISR, 1), 0);
    irq.trigger(VirtioInterruptType::Config);
    assert_eq!(s.vectors[0].sent(), 1);
    assert_eq!(read(&mut s.f, ISR, 1), u64::from(ISR_CONFIG));
    assert_eq!(read(&mut s.f, ISR, 1), 0, "reading acknowledges");
    // Vector routes carry what the table says.
    assert_eq!(
        s.vectors[2].last_route(),
        Some(MsiMessage {
            address: 0xfee0_0000,
            data: 0x42
        })
    );
    // Queue addresses read back whole or in halves.
    write(&mut s.f, 0x16, 2, 1);
    assert_eq!(read(&mut s.f, 0x20, 8), 0x2000);
    assert_eq!(read(&mut s.f, 0x30, 4), 0x9000);
    assert_eq!(read(&mut s.f, 0x1c, 2), 1);
    // Queue set-up is over: a new address is ignored.
    write(&mut s.f, 0x20, 8, 0x7000);
    assert_eq!(read(&mut s.f, 0x20, 8), 0x2000);
}

#[test]
fn vectors_the_table_lacks_are_refused_and_reset_forgets_the_choice() {
    let mut s = function();
    write(&mut s.f, 0x10, 2, 3);
    assert_eq!(read(&mut s.f, 0x10, 2), u64::from(NO_VECTOR));
    write(&mut s.f, 0x16, 2, 0);
    write(&mut s.f, 0x1a, 2, 2);
    assert_eq!(read(&mut s.f, 0x1a, 2), 2);
    drive_to_running(&mut s);
    write(&mut s.f, 0x14, 1, 0);
    assert_eq!(read(&mut s.f, 0x14, 1), 0);
    assert_eq!(s.dev.lock().unwrap().resets, 1);
    assert_eq!(read(&mut s.f, 0x10, 2), u64::from(NO_VECTOR));
    write(&mut s.f, 0x16, 2, 0);
    assert_eq!(read(&mut s.f, 0x1a, 2), u64::from(NO_VECTOR));
}

#[test]
fn notify_writes_that_reach_the_transport_are_forwarded() {
    let mut s = function();
    write(&mut s.f, NOTIFY + 4, 2, 1);
    assert_eq!(s.evts[1].read().unwrap(), 1);
    assert!(s.evts[0].read().is_err(), "queue 0 was not notified");
}

#[test]
fn the_configuration_access_window_reaches_bar_0() {
    let Setup { mut f, .. } = function();
    let cap = capabilities(&mut f)
        .into_iter()
        .find(|c| c.2 == CAP_PCI_CFG)
        .unwrap()
        .0;
    // Select the high feature word through the window, then read it through the window.
    f.write_config(cap + PCI_CFG_BAR, &[0]);
    f.write_config(cap + PCI_CFG_OFFSET, &0u32.to_le_bytes());
    f.write_config(cap + PCI_CFG_LENGTH, &4u32.to_le_bytes());
    f.write_config(cap + PCI_CFG_DATA, &1u32.to_le_bytes());
    assert_eq!(read(&mut f, 0x00, 4), 1);
    f.write_config(cap + PCI_CFG_OFFSET, &4u32.to_le_bytes());
    assert_eq!(cfg_read(&mut f, cap + PCI_CFG_DATA, 4), 1);
    // A length the spec does not allow does nothing.
    f.write_config(cap + PCI_CFG_OFFSET, &0u32.to_le_bytes());
    f.write_config(cap + PCI_CFG_LENGTH, &3u32.to_le_bytes());
    f.write_config(cap + PCI_CFG_DATA, &0u32.to_le_bytes());
    assert_eq!(read(&mut f, 0x00, 4), 1);
}

#[test]
fn a_function_needs_a_vector_per_queue_plus_one() {
    let dev = Arc::new(Mutex::new(FakeDevice::new(&[16, 16])));
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let work = Arc::new(WorkQueue::new().unwrap());
    let one: Vec<Box<dyn VectorSink>> = vec![Box::new(Vector::default())];
    let err = VirtioPciFunction::new(dev, mem, work, BAR, one, Vec::new(), None)
        .err()
        .unwrap();
    assert!(
        matches!(err, VirtioPciError::Vectors { got: 1, queues: 2 }),
        "{err}"
    );
}
