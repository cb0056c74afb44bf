//! Host-side device configuration errors: each is one line naming the option and value (as
//! `kiln boot` words the VMM's error), and a failed start leaves nothing behind (no kept
//! overlay, no vsock socket).

#[macro_use]
mod common;

use kiln::vmm::{Vm, VmConfig};
use kiln_devices::virtio::block::DiskSpec;

fn start_error(config: VmConfig) -> String {
    match Vm::start(config) {
        Ok(_) => panic!("the VM started"),
        Err(e) => kiln_cli::boot_error::ByOption(&e).to_string(),
    }
}

#[test]
fn bad_device_options_fail_cleanly() {
    or_skip!(common::kvm_usable());
    let guest = or_skip!(common::build_guest("exit_code"));
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0x5a; 1 << 20]).expect("base");

    let missing = dir.path().join("missing.qcow2");
    let err = start_error(VmConfig::new(&guest).disk(DiskSpec::new(&missing)));
    assert!(
        err.starts_with(&format!("--disk {}", missing.display())),
        "{err}"
    );
    assert!(!err.contains('\n'), "{err}");

    let err = start_error(VmConfig::new(&guest).share("out", dir.path().join("nope"), false));
    assert!(err.starts_with("--share"), "{err}");
    assert!(err.contains("nope"), "{err}");

    // The vsock path is taken: the kept overlay created before it must be removed again.
    let in_use = dir.path().join("vsock.sock");
    std::fs::write(&in_use, b"").expect("placeholder");
    let overlay = dir.path().join("kept.qcow2");
    let spec: DiskSpec = format!("{},overlay={}", base.display(), overlay.display())
        .parse()
        .expect("spec");
    let err = start_error(VmConfig::new(&guest).disk(spec).vsock(&in_use));
    assert!(
        err.starts_with(&format!("--vsock {}", in_use.display())),
        "{err}"
    );
    assert!(
        !overlay.exists(),
        "a failed start left {} behind",
        overlay.display()
    );

    // A good start with a vsock socket removes the socket when the VM is gone.
    let uds = dir.path().join("ok.sock");
    let mut vm = Vm::start(VmConfig::new(&guest).vsock(&uds).memory_mib(16)).expect("start");
    assert!(uds.exists());
    vm.wait(std::time::Duration::from_secs(10));
    drop(vm);
    assert!(!uds.exists(), "the vsock socket outlived the VM");
}
