//! One guest floods its virtio-blk queue with the largest reads a request may ask for (256 x
//! 240 MiB, 60 GiB, per notification) while a second VM runs: the second VM's deadline still fires on
//! time, and the flooding VM is torn down within 1 s of its own deadline. The device serves
//! a bounded slice per event-loop turn and teardown does not wait on a busy device.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use kiln::devices::virtio::block::{DiskMode, DiskSpec};
use kiln::vmm::{ExitReason, Vm, VmConfig};

/// How late past its deadline a VM may end.
const SLACK: Duration = Duration::from_secs(1);

#[test]
fn a_flooding_guest_delays_neither_its_own_teardown_nor_another_vms_deadline() {
    or_skip!(common::kvm_usable());
    let flood = or_skip!(common::build_guest("virtio_flood"));
    let spin = or_skip!(common::build_guest("spin"));
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk.raw");
    // Sparse: reads are zeroes from the page cache, as fast as the host can copy.
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(256 << 20))
        .expect("disk image");

    let mut hostile = Vm::start(
        VmConfig::new(&flood)
            .memory_mib(320)
            .virtio_cmdline(true)
            .rng(false)
            .disk(DiskSpec {
                path: disk,
                mode: DiskMode::ReadOnly,
            }),
    )
    .expect("start the flooding VM");
    let until = Instant::now() + Duration::from_secs(10);
    while !hostile.console().text().contains("flood\n") {
        assert!(
            Instant::now() < until,
            "the flood never started: {}",
            hostile.console().text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Let it flood for a while before the other VM starts.
    std::thread::sleep(Duration::from_millis(300));

    let other = std::thread::spawn(move || {
        let mut vm = Vm::start(VmConfig::new(&spin)).expect("start the second VM");
        let deadline = Duration::from_millis(500);
        let t = Instant::now();
        let exit = vm.wait(deadline);
        (exit, t.elapsed(), deadline)
    });

    let deadline = Duration::from_millis(800);
    let t = Instant::now();
    let exit = hostile.wait(deadline);
    let took = t.elapsed();
    assert_eq!(exit, ExitReason::Timeout, "{}", hostile.console().text());
    assert!(
        took < deadline + SLACK,
        "the flooding VM ended {:?} after its deadline",
        took - deadline
    );

    let (exit, took, deadline) = other.join().expect("second VM thread");
    assert_eq!(exit, ExitReason::Timeout);
    assert!(
        took < deadline + SLACK,
        "the second VM ended {:?} after its deadline",
        took - deadline
    );
}
