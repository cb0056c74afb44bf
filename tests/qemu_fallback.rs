//! The QEMU backend's fallback (issue 13): a `-accel kvm` that QEMU cannot initialise at run time
//! (KVM gone, or not accessible) starts the VM again with TCG, once, and says so. QEMU here is a
//! wrapper that answers `-accel kvm` with QEMU 10's own error lines (as it prints them when /dev/kvm
//! is missing) and runs the real QEMU otherwise; the guest is the bare-metal `pvh_info`, which
//! QEMU boots through PVH under TCG in well under a second.

#[macro_use]
mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use kiln_backends::qemu::QemuBackend;
use kiln_backends::{Backend, ConsoleWait, RunPlan};

/// A `qemu-system-x86_64` that fails `-accel kvm` with `lines` on stderr and runs `real` otherwise.
fn wrapper(dir: &Path, real: &Path, lines: &[&str]) -> PathBuf {
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).unwrap();
    let path = bin.join("qemu-system-x86_64");
    let echoes: String = lines
        .iter()
        .map(|l| format!("    echo '{l}' >&2\n"))
        .collect();
    fs::write(
        &path,
        format!(
            "#!/bin/sh\ncase \" $* \" in\n  *' -accel kvm '*)\n{echoes}    exit 1;;\nesac\n\
             exec '{}' \"$@\"\n",
            real.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn plan(dir: &Path, kernel: &Path) -> RunPlan {
    RunPlan {
        scenario_id: "fallback".into(),
        run_id: "r1".into(),
        kernel: kernel.to_path_buf(),
        initrd: None,
        cmdline: String::new(),
        memory_mib: 64,
        vcpus: 1,
        disks: Vec::new(),
        shares: Vec::new(),
        console_log: dir.join("console.log"),
        console_log_limit: 1 << 20,
        snapshot: None,
    }
}

#[test]
fn kvm_missing_at_run_time_falls_back_to_tcg_once_and_says_so() {
    let real = or_skip!(common::qemu());
    let guest = or_skip!(common::build_guest("pvh_info"));
    let dir = tempfile::tempdir().unwrap();
    let qemu = wrapper(
        dir.path(),
        &real,
        &[
            "qemu-system-x86_64: -accel kvm: Could not access KVM kernel module: No such file or directory",
            "qemu-system-x86_64: -accel kvm: failed to initialize kvm: No such file or directory",
        ],
    );
    // No disks: qemu-img is never run.
    let backend = QemuBackend::with_tools(qemu, "qemu-img".into(), true).unwrap();
    assert!(
        backend.version().ends_with("accel kvm"),
        "{}",
        backend.version()
    );
    let run_dir = dir.path().join("vm");
    fs::create_dir_all(&run_dir).unwrap();
    let mut machine = backend
        .boot(&plan(dir.path(), &guest), &run_dir)
        .unwrap_or_else(|e| panic!("no fallback to TCG: {e}"));
    let version = machine.version().expect("the machine says it runs on TCG");
    assert!(
        version.contains("accel tcg (KVM unavailable at run time: -accel kvm: failed to initialize kvm: No such file or directory)"),
        "{version}"
    );
    let seen = machine.console().wait_until(
        0,
        &|l| l.contains("PVH done"),
        Instant::now() + Duration::from_secs(60),
        &AtomicBool::new(false),
    );
    assert!(matches!(seen, ConsoleWait::Matched { .. }), "{seen:?}");
    machine.kill();
}

#[test]
fn other_kvm_start_failures_do_not_fall_back() {
    let real = or_skip!(common::qemu());
    let dir = tempfile::tempdir().unwrap();
    let qemu = wrapper(
        dir.path(),
        &real,
        &["qemu-system-x86_64: -accel kvm: unsupported machine type"],
    );
    let backend = QemuBackend::with_tools(qemu, "qemu-img".into(), true).unwrap();
    let run_dir = dir.path().join("vm");
    fs::create_dir_all(&run_dir).unwrap();
    let kernel = dir.path().join("k");
    fs::write(&kernel, b"x").unwrap();
    let err = match backend.boot(&plan(dir.path(), &kernel), &run_dir) {
        Ok(_) => panic!("booted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("unsupported machine type"), "{err}");
}
