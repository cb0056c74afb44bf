//! x86_64 platform: ACPI tables, the MP table, CPUID, registers, MSRs, page tables.

pub mod acpi;
pub mod cpuid;
pub mod mptable;
pub mod regs;
