//! Thin owners of KVM objects: the system handle, the VM and its vCPUs.

pub mod gsi_routes;
pub mod kvm;
pub mod vcpu;
pub mod vm;
