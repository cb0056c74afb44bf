//! kiln: a microVM test harness with its own embedded VMM.
//!
//! This facade re-exports the crates a Rust test needs: `kiln::vmm` (the embedded VMM) and
//! `kiln::devices`.

pub use kiln_devices as devices;
pub use kiln_harness as harness;
pub use kiln_vmm as vmm;
pub use kiln_vmm::{ExitReason, Vm, VmConfig, VmHandle};
