//! The PCI root complex `--enable-pci` gives the guest: one segment with one bus, a host
//! bridge at 00:00.0, configuration space through both the legacy port I/O mechanism
//! (0xCF8/0xCFC) and ECAM (memory-mapped, 4 KiB per function), and the functions' memory
//! BARs routed wherever the guest places them inside the root's MMIO windows. ACPI
//! describes it (a `PNP0A08` host bridge in the DSDT, MCFG for ECAM): see
//! `arch::x86_64::acpi`. docs/pci.md is the user's view.

pub mod config_access;
pub mod config_space;
pub mod msi;
pub mod msix;
pub mod root;

pub use config_access::{EcamWindow, PortIoConfig};
pub use config_space::{BarKind, BarRegion, ConfigSpace, ConfigSpaceError, Identity};
pub use root::{HostBridge, PciDevice, PciRoot, PciRootError};
