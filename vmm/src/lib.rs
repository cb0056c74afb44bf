//! kiln-vmm: the embedded VMM. Boots a guest through /dev/kvm from inside the calling process.
//!
//! ```no_run
//! use std::time::Duration;
//! use kiln_vmm::{Vm, VmConfig};
//! let mut vm = Vm::start(VmConfig::new("guest.elf").cmdline("quiet").memory_mib(64))?;
//! let exit = vm.wait(Duration::from_secs(10));
//! println!("{exit}: {}", vm.console().text());
//! # Ok::<(), kiln_vmm::Error>(())
//! ```

pub mod arch;
pub mod boot;
pub mod device_manager;
pub mod event_loop;
pub mod exit;
pub mod host_fds;
pub mod kvm;
pub mod layout;
pub mod memory;
pub mod snapshot;
pub mod vcpu;
pub mod vm;

pub use exit::ExitReason;
pub use kiln_devices::console::{ConsoleLog, ConsoleOutput, MarkerHit};
pub use kiln_devices::legacy::Phase;
pub use vm::{BootInfo, Error, ShareConfig, VcpusProblem, Vm, VmConfig, VmHandle};
