//! ember's probe guest: booted like a Linux `vmlinux`, it checks from inside the VM what
//! ember promises a guest (boot state, zero page, command line, memory map, CPUID, MP table,
//! ACPI tables, virtio-blk and virtio-net devices) and prints one `PROBE ...` line per check
//! on the serial port; on request it then behaves as a hostile guest would (src/hostile.rs)
//! or waits for input the host sends (a serial byte, Ctrl+Alt+Del). With the `pvh` feature
//! it also has a PVH entry (src/pvh.rs), and a VMM that honours the note enters it there.
//!
//! Guest code may run through KVM's instruction emulator, where every instruction costs about
//! a microsecond and SSE arithmetic is not emulated. Hence: built without SSE, no `core::fmt`
//! (the precompiled `core` uses SSE), no floats, and loops kept short.

#![no_std]
#![no_main]

mod acpi;
mod blkcheck;
mod bootinfo;
mod bootparams;
mod cmdline;
mod counter;
mod cpu;
mod cpuid;
mod e820;
mod hostile;
mod initrd;
mod kbd;
mod line;
mod longmode;
mod mem;
mod memory;
mod mptable;
mod netcheck;
mod paging;
mod pci;
mod phys;
#[cfg(feature = "pvh")]
mod pvh;
mod report;
mod reset;
mod serial;
mod startinfo;
mod timeout;
mod transport;
mod virtio;
mod virtio_blk;
mod virtio_mmio;
mod virtio_net;
mod virtio_pci;
mod virtq;

use bootinfo::{BootInfo, Entry};
use cmdline::Cmdline;
use line::Detail;
use report::Report;
use transport::Transport;
use virtio_mmio::Mmio;
use virtio_pci::PciTransport;

/// How the entry code tells `probe_main` the way the probe was entered.
const ENTRY_LINUX64: u64 = 0;
const ENTRY_PVH: u64 = 1;

// The boot stack (0x8ff0) sits just below the boot page tables and is not ours to keep, so
// switch to our own before running any Rust code. .bss must be zeroed here because neither
// the bzImage loader (flat image) nor the ELF loader clears it. The PVH entry joins at
// start64 once in long mode, with its start info in r12 and ENTRY_PVH in r13.
core::arch::global_asm!(
    ".section .text.entry, \"ax\"",
    ".global _start",
    ".global start64",
    ".code64",
    "_start:",
    "    mov r12, rsi",
    "    mov r13d, {linux64}",
    "start64:",
    "    mov rsp, offset __stack_top",
    "    mov rdi, offset __bss_start",
    "    mov rcx, offset __bss_end",
    "    sub rcx, rdi",
    "    shr rcx, 3",
    "    xor eax, eax",
    "    cld",
    "    rep stosq",
    "    mov rdi, r12",
    "    mov rsi, r13",
    "    call {main}",
    "    ud2",
    linux64 = const ENTRY_LINUX64,
    main = sym probe_main,
);

/// What the checks share: where the boot protocol put things and what the VMM was asked for.
pub struct Boot {
    pub entry: Entry,
    /// The zero page or the PVH start info, once the first check has found it sound.
    pub info: Option<BootInfo>,
    pub cmdline: Cmdline,
    /// End of the probe's own identity map, 0 until the memory check has built it.
    pub mapped_top: u64,
}

impl Boot {
    /// The boot protocol's data, or None with the reason in `d`.
    pub fn require_info(&self, d: &mut Detail) -> Option<BootInfo> {
        if self.info.is_none() {
            d.str(match self.entry {
                Entry::Linux64 => b"no zero page".as_slice(),
                Entry::Pvh => b"no start info",
            });
        }
        self.info
    }
}

/// `boot_info` is the zero page (64-bit entry) or the PVH start info; `entry` says which.
extern "C" fn probe_main(boot_info: u64, entry: u64) -> ! {
    serial::init();
    serial::write(b"PROBE START\n");

    let mut report = Report::new();
    let mut boot = Boot {
        entry: if entry == ENTRY_PVH {
            Entry::Pvh
        } else {
            Entry::Linux64
        },
        info: None,
        cmdline: Cmdline::empty(),
        mapped_top: 0,
    };

    report.check(b"longmode", longmode::check);
    match boot.entry {
        Entry::Linux64 => report.check(b"zeropage", |d| {
            boot.info = bootparams::check(boot_info, d).map(BootInfo::ZeroPage);
            boot.info.is_some()
        }),
        Entry::Pvh => report.check(b"pvh", |d| {
            boot.info = startinfo::check(boot_info, d).map(BootInfo::StartInfo);
            boot.info.is_some()
        }),
    }
    report.check(b"cmdline", |d| {
        let Some(info) = boot.require_info(d) else {
            return false;
        };
        let (cmdline, ok) = cmdline::check(&info, d);
        boot.cmdline = cmdline;
        ok
    });
    // A VM's shortest life, for measuring the VMM's own start and stop.
    if boot.cmdline.get(b"probe.reset") == Some(b"now") {
        serial::write(b"PROBE RESET now\n");
        reset::reset();
    }
    report.check(b"e820", |d| e820::check(&boot, d));
    report.check(b"memory", |d| memory::check(&mut boot, d));
    // Only on request: most boots have no initrd. After memory, whose map reaches it.
    if boot.cmdline.get(b"probe.initrd_size").is_some() {
        report.check(b"initrd", |d| {
            let Some(expected) = boot.cmdline.require_u64(b"probe.initrd_size", d) else {
                return false;
            };
            initrd::check(&boot, expected, d)
        });
    }
    report.check(b"cpuid", |d| cpuid::check(&boot, d));
    report.check(b"mptable", |d| mptable::check(&boot, d));
    report.check(b"acpi", |d| acpi::check(&boot, d));
    // Only when asked: a VM without --enable-pci has no PCI bus. After memory, whose map
    // covers ECAM in the MMIO gap.
    if boot.cmdline.get(b"probe.pci").is_some() {
        report.check(b"pci", |d| pci::check(&boot, d));
    }
    // Block devices as virtio-pci functions (`--enable-pci`): the same checks as over MMIO,
    // with MSI-X in place of an interrupt line.
    if boot.cmdline.get(b"probe.pciblk").is_some() {
        let mut found = [None; pci::MAX_BLK];
        report.check(b"virtio-pci", |d| pci::virtio_blk(&boot, &mut found, d));
        for (n, t) in found.iter().flatten().enumerate() {
            blkcheck::run(&mut report, &boot.cmdline, n, Transport::Pci(*t));
        }
        if found[0].is_some() {
            report.check(b"msix", |d| {
                // Unmasking a pending vector sent its message: the local APIC holds it.
                let sent = PciTransport::apic_requested();
                d.str(b"vector=")
                    .hex(virtio_pci::MSI_VECTOR.into())
                    .str(b" apic_irr=")
                    .dec(u64::from(sent));
                sent
            });
        }
    }
    // Only when the test expects block or network devices or the VMM announces virtio
    // devices, so other boots keep their checks. Needs the memory check's map, which covers
    // the MMIO gap.
    let mut blk0 = None;
    if boot.cmdline.get(b"probe.blk").is_some()
        || boot.cmdline.get(b"probe.net").is_some()
        || virtio::announced(&boot.cmdline)
    {
        let mut found = virtio::Found::new();
        report.check(b"virtio", |d| virtio::check(&boot, &mut found, d));
        for (n, &base) in found.blk().iter().enumerate() {
            blkcheck::run(
                &mut report,
                &boot.cmdline,
                n,
                Transport::Mmio(Mmio::new(base)),
            );
        }
        blk0 = found.blk().first().copied();
        if netcheck::wanted(&boot.cmdline)
            && let Some(&base) = found.net().first()
        {
            netcheck::run(&mut report, &boot.cmdline, base);
        }
    }

    report.done();

    if boot.cmdline.get(b"probe.hostile") == Some(b"virtq") {
        match blk0 {
            Some(base) => hostile::virtq(base),
            None => serial::write(b"PROBE hostile FAIL no block device\n"),
        }
    }
    if boot.cmdline.get(b"probe.serial") == Some(b"rep") {
        serial::write_string_io(b"PROBE serial.rep written with rep outsb, every byte of it\n");
    }
    if boot.cmdline.get(b"probe.count").is_some() {
        counter::run(&boot.cmdline, blk0);
    }
    if boot.cmdline.get(b"probe.flood") == Some(b"serial") {
        hostile::flood_serial();
    }

    if boot.cmdline.get(b"probe.fault") == Some(b"triple") {
        serial::write(b"PROBE FAULT triple\n");
        reset::triple_fault();
    }
    match boot.cmdline.get(b"probe.wait") {
        Some(b"serial") => {
            let byte = serial::read_byte();
            let mut line = line::Line::<24>::new();
            line.str(b"PROBE GOT ").hex_byte(byte).str(b"\n");
            serial::write(line.as_bytes());
        }
        Some(b"kbd") => kbd::wait_and_report(),
        _ => {}
    }
    reset::reset()
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // No message: formatting it would pull in core::fmt, which is built with SSE.
    serial::write(b"PROBE PANIC\n");
    reset::reset()
}
