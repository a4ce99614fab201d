//! ember's process exit codes (documented in docs/exit-codes.md). The code always tells the
//! truth about the guest: 0 only when the guest itself reset or powered off.

/// The guest reset (i8042 0xFE) or powered off.
pub const GUEST_SHUTDOWN: u8 = 0;
/// The VMM failed after the VM was built (an internal error, a vCPU that would not run).
pub const VMM_ERROR: u8 = 1;
/// Bad command-line flags (clap's own code for usage errors).
pub const BAD_ARGUMENTS: u8 = 2;
/// The configuration is invalid: malformed JSON, unknown fields, values out of range,
/// kernel or initrd missing or unusable.
pub const BAD_CONFIGURATION: u8 = 3;
/// The host cannot run the VM: no usable /dev/kvm, a missing KVM capability, not enough
/// memory or huge pages.
pub const HOST_UNSUITABLE: u8 = 4;
/// The guest faulted: triple fault, KVM emulation failure or internal error, failed VM
/// entry, crash event.
pub const GUEST_FAULT: u8 = 5;
/// ember was stopped by signal N (SIGTERM, SIGINT, SIGHUP) and shut the VM down cleanly;
/// the exit code is 128 + N, as shells report for a signal.
pub const SIGNAL_BASE: u8 = 128;
