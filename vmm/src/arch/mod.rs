//! Architecture-specific platform setup. kiln targets x86_64 only.

pub mod x86_64;
