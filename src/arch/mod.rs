//! Architecture-specific guest set-up. ember runs x86_64 guests today.

pub mod x86_64;
