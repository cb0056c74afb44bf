//! `kiln::TestVm` on whichever backend `auto` picks: QEMU on a host whose KVM cannot boot Linux,
//! kiln's own VMM where it can (the nested stage runs this file with `KILN_REQUIRE_LINUX_KVM=1`,
//! so there it must be kiln's VMM). The README's TestVm example is the same flow, as a doctest.

#[macro_use]
mod common;

use std::fs;
use std::time::Duration;

use kiln::scenario::BackendKind;
use kiln::{ExecRequest, TestVm, TestVmError};

/// Which backend `auto` must pick here, or why this machine cannot run the test.
fn expected_backend() -> Result<BackendKind, String> {
    match common::hardware_kvm() {
        Ok(()) => Ok(BackendKind::Kiln),
        Err(_) => common::qemu().map(|_| BackendKind::Qemu),
    }
}

#[test]
fn a_test_vm_runs_commands_moves_files_and_shares_a_directory() {
    let expected = or_skip!(expected_backend());
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("in.txt"), b"from the host\n").unwrap();
    let vm = TestVm::builder()
        .share("out", dir.path())
        .vcpus(2)
        .boot()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(vm.backend(), expected, "{vm:?}");
    assert!(vm.ready_record().starts_with("KILN_READY"), "{vm:?}");

    let nproc = vm.exec(["nproc"]).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&nproc.stdout).trim(),
        "2",
        "{nproc:?}"
    );

    let mut cat = ExecRequest::new(["sh", "-c", "cat /out/in.txt; cat; exit 4"]);
    cat.stdin = b"and stdin\n".to_vec();
    let out = vm.exec_request(&cat).unwrap();
    assert_eq!(out.code, Some(4), "{out:?}");
    assert_eq!(out.stdout, b"from the host\nand stdin\n");

    vm.put("/out/hello.txt", b"hello from the guest\n").unwrap();
    assert_eq!(
        fs::read(dir.path().join("hello.txt")).unwrap(),
        b"hello from the guest\n"
    );
    vm.put_mode("/tmp/x", 0o600, b"\x00\xff").unwrap();
    assert_eq!(vm.get("/tmp/x").unwrap(), b"\x00\xff");
    match vm.get("/no/such/file") {
        Err(TestVmError::Machine(e)) => assert!(e.to_string().contains("/no/such/file"), "{e}"),
        other => panic!("reading a missing file: {other:?}"),
    }
    vm.shutdown().unwrap_or_else(|e| panic!("shutdown: {e}"));
}

#[test]
fn a_guest_that_never_gets_ready_fails_within_its_boot_timeout() {
    let _ = or_skip!(expected_backend());
    // A kernel that is not a kernel: the backend refuses it or the guest never says KILN_READY.
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("bogus-kernel");
    fs::write(&bogus, vec![0u8; 4096]).unwrap();
    let started = std::time::Instant::now();
    let err = TestVm::builder()
        .kernel(&bogus)
        .boot_timeout(Duration::from_secs(20))
        .boot()
        .expect_err("a zero-filled kernel cannot boot");
    assert!(started.elapsed() < Duration::from_secs(60), "{err}");
    let text = err.to_string();
    assert!(
        matches!(err, TestVmError::Backend(_) | TestVmError::NotReady { .. }),
        "{text}"
    );
}
