//! VM failures the guest causes: reported with what a person needs to see why.

#[macro_use]
mod common;

use std::time::Duration;

use kiln::vmm::{ExitReason, Vm, VmConfig};

/// An emulation failure (PVM has no SSE in its instruction emulator) ends the VM with an
/// internal error that names the vCPU and shows its registers, and frees everything.
#[test]
fn emulation_failure_is_reported_with_registers() {
    or_skip!(common::kvm_usable());
    if !std::path::Path::new("/sys/module/kvm_pvm").exists() {
        skip!("only PVM's emulator is known to fail on SSE; on this KVM the guest triple-faults");
    }
    let guest = or_skip!(common::build_guest("sse"));
    let mut vm = Vm::start(VmConfig::new(&guest).memory_mib(16)).expect("start");
    let exit = vm.wait(Duration::from_secs(10));
    match &exit {
        ExitReason::InternalError(detail) => {
            assert!(detail.starts_with("vCPU 0: "), "{detail}");
            assert!(detail.contains("rip=0x"), "{detail}");
            assert!(detail.contains("cr0=0x"), "{detail}");
        }
        other => panic!("expected an internal error, got {other:?}"),
    }
    assert_eq!(exit.exit_code(), 1);
    assert_eq!(vm.console().text(), "sse guest\n");
}
