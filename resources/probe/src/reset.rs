//! The two ways the probe ends the VM.

use core::arch::asm;

use crate::cpu::{DescriptorTable, PORT_I8042_COMMAND, outb};

const I8042_CMD_RESET: u8 = 0xfe;

/// Asks the i8042 to pulse the reset line; ember treats that as a clean guest exit.
pub fn reset() -> ! {
    outb(PORT_I8042_COMMAND, I8042_CMD_RESET);
    // The VMM stops the vCPU on the reset; hlt only parks it until then (interrupts are off).
    loop {
        // SAFETY: hlt with interrupts disabled just stops this vCPU.
        unsafe { asm!("hlt", options(nomem, nostack)) };
    }
}

/// Ends the VM with a triple fault, so tests can see how ember reports a crashed guest.
pub fn triple_fault() -> ! {
    // With an empty IDT, #UD cannot be delivered (-> #GP), nor can #GP (-> #DF), nor #DF:
    // the CPU shuts down.
    let idt = DescriptorTable { limit: 0, base: 0 };
    // SAFETY: deliberately fatal; nothing runs after this.
    unsafe { asm!("lidt [{}]", "ud2", in(reg) &raw const idt, options(noreturn, nostack)) }
}
