//! `boot-source`: which kernel, initrd and command line the guest boots with.

use serde::{Deserialize, Serialize};

/// Linux on x86 reads at most this many bytes of command line (COMMAND_LINE_SIZE), and the
/// boot protocol's `cmdline_size` tells the guest the same bound. The terminating NUL is extra.
pub use crate::arch::CMDLINE_MAX_LEN;

/// The command line used when a client gives none. It is Firecracker's default, so a client
/// that relies on it gets the same guest: a reboot that goes through the keyboard controller
/// (ending the VM), no PCI probing, no serial console (pass `console=ttyS0` for one), and a
/// plain i8042 keyboard without mouse, multiplexer or PnP probing.
pub const DEFAULT_BOOT_ARGS: &str = "reboot=k panic=1 pci=off nomodule 8250.nr_uarts=0 \
    i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// The `boot-source` body and config-file key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BootSourceConfig {
    /// Host path of the guest kernel: an ELF `vmlinux` or a `bzImage`.
    pub kernel_image_path: String,
    /// Host path of an initial ramdisk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// Kernel command line; [`DEFAULT_BOOT_ARGS`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// Why a `boot-source` was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BootSourceError {
    #[error("boot-source.kernel_image_path must not be empty")]
    EmptyKernelPath,
    #[error("boot-source.initrd_path must not be empty when given")]
    EmptyInitrdPath,
    #[error(
        "boot-source.boot_args is {len} bytes; the x86 boot protocol allows at most {max} (including what ember appends)"
    )]
    CmdlineTooLong { len: usize, max: usize },
    #[error("boot-source.boot_args contains a NUL byte")]
    CmdlineNul,
}

impl BootSourceConfig {
    /// The command line the guest gets before devices add their own parameters.
    pub fn boot_args(&self) -> &str {
        self.boot_args.as_deref().unwrap_or(DEFAULT_BOOT_ARGS)
    }

    /// Checks what can be checked without touching the host: paths present, command line
    /// within the boot protocol's bound. Whether the files exist is checked when the VM is
    /// built, because a file may appear between configuration and start.
    pub fn validate(&self) -> Result<(), BootSourceError> {
        if self.kernel_image_path.is_empty() {
            return Err(BootSourceError::EmptyKernelPath);
        }
        if self.initrd_path.as_deref() == Some("") {
            return Err(BootSourceError::EmptyInitrdPath);
        }
        let args = self.boot_args();
        if args.contains('\0') {
            return Err(BootSourceError::CmdlineNul);
        }
        if args.len() > CMDLINE_MAX_LEN {
            return Err(BootSourceError::CmdlineTooLong {
                len: args.len(),
                max: CMDLINE_MAX_LEN,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(args: Option<&str>) -> BootSourceConfig {
        BootSourceConfig {
            kernel_image_path: "/k".into(),
            initrd_path: None,
            boot_args: args.map(str::to_owned),
        }
    }

    #[test]
    fn default_args_used_when_absent() {
        assert_eq!(source(None).boot_args(), DEFAULT_BOOT_ARGS);
        assert_eq!(source(Some("x=1")).boot_args(), "x=1");
    }

    #[test]
    fn cmdline_length_bound() {
        let ok = "a".repeat(CMDLINE_MAX_LEN);
        assert_eq!(source(Some(&ok)).validate(), Ok(()));
        let long = "a".repeat(CMDLINE_MAX_LEN + 1);
        assert_eq!(
            source(Some(&long)).validate(),
            Err(BootSourceError::CmdlineTooLong {
                len: CMDLINE_MAX_LEN + 1,
                max: CMDLINE_MAX_LEN
            })
        );
    }

    #[test]
    fn empty_paths_and_nul_rejected() {
        let mut s = source(None);
        s.kernel_image_path.clear();
        assert_eq!(s.validate(), Err(BootSourceError::EmptyKernelPath));
        let mut s = source(None);
        s.initrd_path = Some(String::new());
        assert_eq!(s.validate(), Err(BootSourceError::EmptyInitrdPath));
        assert_eq!(
            source(Some("a\0b")).validate(),
            Err(BootSourceError::CmdlineNul)
        );
    }

    #[test]
    fn unknown_field_rejected() {
        let err = serde_json::from_str::<BootSourceConfig>(
            r#"{"kernel_image_path":"/k","kernel_args":"x"}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("unknown field `kernel_args`"),
            "{err}"
        );
    }
}
