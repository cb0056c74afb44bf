//! Every way a VM can end releases every thread and file descriptor it created: reset, exit
//! port, triple fault, timeout, host kill, and dropping the handle while the guest still runs.
//!
//! One test in its own binary (its own process), so no other test's threads or fds disturb the
//! counts.

#[macro_use]
mod common;

use std::time::Duration;

use kiln::vmm::{ExitReason, Vm, VmConfig};

/// How a test case ends its VM.
type Ending = Box<dyn Fn(&mut kiln::VmHandle) -> ExitReason>;

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

fn threads() -> usize {
    count("/proc/self/task")
}

fn fds() -> usize {
    count("/proc/self/fd")
}

#[test]
fn every_exit_path_releases_threads_and_fds() {
    or_skip!(common::kvm_usable());
    let exit = or_skip!(common::build_guest("exit_code"));
    let reset = or_skip!(common::build_guest("reset"));
    let spin = or_skip!(common::build_guest("spin"));
    let triple = or_skip!(common::build_guest("triple_fault"));

    // Warm up once: the kick signal handler and the stdout machinery are process-wide and
    // allocated on first use, not per VM.
    let mut vm = Vm::start(VmConfig::new(&exit).memory_mib(16)).expect("start");
    vm.wait(Duration::from_secs(10));
    drop(vm);
    let (threads0, fds0) = (threads(), fds());

    let cases: Vec<(&str, VmConfig, Ending)> = vec![
        (
            "exit port",
            VmConfig::new(&exit).cmdline("kiln.exit=3").vcpus(2),
            Box::new(|vm| vm.wait(Duration::from_secs(10))),
        ),
        (
            "reset",
            VmConfig::new(&reset),
            Box::new(|vm| vm.wait(Duration::from_secs(10))),
        ),
        (
            "triple fault",
            VmConfig::new(&triple),
            Box::new(|vm| vm.wait(Duration::from_secs(10))),
        ),
        (
            "timeout",
            VmConfig::new(&spin).vcpus(2),
            Box::new(|vm| vm.wait(Duration::from_millis(300))),
        ),
        (
            "kill",
            VmConfig::new(&spin),
            Box::new(|vm| {
                std::thread::sleep(Duration::from_millis(100));
                vm.kill()
            }),
        ),
    ];
    let expected = [
        ExitReason::ExitPort(3),
        ExitReason::Reset,
        ExitReason::TripleFault,
        ExitReason::Timeout,
        ExitReason::Killed,
    ];
    for ((what, config, end), want) in cases.into_iter().zip(expected) {
        for round in 0..3 {
            let mut vm = Vm::start(config.clone().memory_mib(16)).expect("start");
            let got = end(&mut vm);
            assert_eq!(got, want, "{what}, round {round}");
            assert_eq!(
                threads(),
                threads0,
                "threads left after {what}, round {round}"
            );
            drop(vm);
            assert_eq!(fds(), fds0, "fds left after {what}, round {round}");
        }
    }

    // Dropping a handle whose guest still runs kills and frees it too.
    let vm = Vm::start(VmConfig::new(&spin).memory_mib(16)).expect("start");
    std::thread::sleep(Duration::from_millis(50));
    drop(vm);
    assert_eq!(
        (threads(), fds()),
        (threads0, fds0),
        "after dropping a running VM"
    );
}
