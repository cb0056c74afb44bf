//! kiln: a microVM test harness with its own embedded VMM.
//!
//! This facade re-exports the crates a Rust test needs: `kiln::vmm` (the embedded VMM),
//! `kiln::devices`, `kiln::disk` (disk images: formats, backends, the qcow2 header parser), the
//! harness's layers (scenarios, backends, runner, guest images), and
//! [`TestVm`], a real guest for a Rust test: boot, `exec`, `put`/`get`, torn down on drop.

mod testvm;

pub use kiln_agent_proto::client::Output;
pub use kiln_agent_proto::ExecRequest;
pub use kiln_backends::BackendChoice;
pub use testvm::{TestVm, TestVmBuilder, TestVmError, DEFAULT_GET_LIMIT};

pub use kiln_backends as backends;
pub use kiln_devices as devices;
pub use kiln_diff as diff;
pub use kiln_disk as disk;
pub use kiln_guest_build as guest;
pub use kiln_runner as runner;
pub use kiln_scenario as scenario;
pub use kiln_vmm as vmm;
pub use kiln_vmm::{ExitReason, Vm, VmConfig, VmHandle};

// The README's Rust examples are doctests: they must compile, and the TestVm one runs.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
