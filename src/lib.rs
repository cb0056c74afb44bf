//! kiln: a microVM test harness with its own embedded VMM.
//!
//! This facade re-exports the crates a Rust test needs: `kiln::vmm` (the embedded VMM),
//! `kiln::devices`, `kiln::disk` (disk images: formats, backends, the qcow2 header parser), and
//! the harness's layers (scenarios, backends, runner, guest images).

pub use kiln_backends as backends;
pub use kiln_devices as devices;
pub use kiln_diff as diff;
pub use kiln_disk as disk;
pub use kiln_guest_build as guest;
pub use kiln_runner as runner;
pub use kiln_scenario as scenario;
pub use kiln_vmm as vmm;
pub use kiln_vmm::{ExitReason, Vm, VmConfig, VmHandle};
