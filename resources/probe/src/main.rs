//! ember's probe guest: booted like a Linux `vmlinux`, it checks from inside the VM what
//! ember promises a guest (boot state, zero page, command line, memory map, CPUID, MP table)
//! and prints one `PROBE ...` line per check on the serial port.
//!
//! Guest code may run through KVM's instruction emulator, where every instruction costs about
//! a microsecond and SSE arithmetic is not emulated. Hence: built without SSE, no `core::fmt`
//! (the precompiled `core` uses SSE), no floats, and loops kept short.

#![no_std]
#![no_main]

mod bootparams;
mod cmdline;
mod cpu;
mod cpuid;
mod e820;
mod line;
mod longmode;
mod mem;
mod memory;
mod mptable;
mod paging;
mod phys;
mod report;
mod reset;
mod serial;

use bootparams::ZeroPage;
use cmdline::Cmdline;
use report::Report;

// The boot stack (0x8ff0) sits just below the boot page tables and is not ours to keep, so
// switch to our own before running any Rust code. .bss must be zeroed here because neither
// the bzImage loader (flat image) nor the ELF loader clears it.
core::arch::global_asm!(
    ".section .text.entry, \"ax\"",
    ".global _start",
    ".code64",
    "_start:",
    "    mov rsp, offset __stack_top",
    "    mov r12, rsi",
    "    mov rdi, offset __bss_start",
    "    mov rcx, offset __bss_end",
    "    sub rcx, rdi",
    "    shr rcx, 3",
    "    xor eax, eax",
    "    cld",
    "    rep stosq",
    "    mov rdi, r12",
    "    call {main}",
    "    ud2",
    main = sym probe_main,
);

/// What the checks share: where the boot protocol put things and what the VMM was asked for.
pub struct Boot {
    pub zero_page: Option<ZeroPage>,
    pub cmdline: Cmdline,
    /// End of the probe's own identity map, 0 until the memory check has built it.
    pub mapped_top: u64,
}

extern "C" fn probe_main(zero_page: u64) -> ! {
    serial::init();
    serial::write(b"PROBE START\n");

    let mut report = Report::new();
    let mut boot = Boot {
        zero_page: None,
        cmdline: Cmdline::empty(),
        mapped_top: 0,
    };

    report.check(b"longmode", longmode::check);
    report.check(b"zeropage", |d| {
        boot.zero_page = bootparams::check(zero_page, d);
        boot.zero_page.is_some()
    });
    report.check(b"cmdline", |d| {
        let (cmdline, ok) = cmdline::check(boot.zero_page.as_ref(), d);
        boot.cmdline = cmdline;
        ok
    });
    report.check(b"e820", |d| e820::check(&boot, d));
    report.check(b"memory", |d| memory::check(&mut boot, d));
    report.check(b"cpuid", |d| cpuid::check(&boot, d));
    report.check(b"mptable", |d| mptable::check(&boot, d));

    report.done();

    if boot.cmdline.get(b"probe.fault") == Some(b"triple") {
        serial::write(b"PROBE FAULT triple\n");
        reset::triple_fault();
    }
    if boot.cmdline.get(b"probe.wait") == Some(b"serial") {
        let byte = serial::read_byte();
        let mut line = line::Line::<24>::new();
        line.str(b"PROBE GOT ").hex_byte(byte).str(b"\n");
        serial::write(line.as_bytes());
    }
    reset::reset()
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // No message: formatting it would pull in core::fmt, which is built with SSE.
    serial::write(b"PROBE PANIC\n");
    reset::reset()
}
