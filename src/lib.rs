//! ember: a KVM microVM monitor for edge hosts. One process runs one microVM.
//!
//! Layers, from the top: `cli` and `config` (what the user asked for), `vmm` (the
//! controller: builds the VM, runs the event loop, decides the exit), `vstate` (KVM VM and
//! vCPUs), `arch` (boot protocol and CPU set-up), `devices` (buses and device models),
//! `memory` (guest RAM). Lower layers never reach up.

pub mod api;
pub mod arch;
pub mod cli;
pub mod config;
pub mod devices;
pub mod exit_code;
pub mod host_file;
pub mod host_random;
pub mod logger;
pub mod memory;
pub mod metrics;
pub mod mmds;
pub mod rate_limiter;
pub mod seccomp;
pub mod snapshot;
pub mod stop;
pub mod version;
pub mod vmm;
pub mod vstate;
