//! x86_64 platform: ACPI tables, CPUID, registers, MSRs, page tables.

pub mod acpi;
pub mod cpuid;
pub mod regs;
