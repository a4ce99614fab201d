//! Emulated devices and the buses that route guest accesses to them.

pub mod bus;
pub mod legacy;
pub mod pci;
pub mod vfio;
pub mod virtio;
pub mod work_queue;
