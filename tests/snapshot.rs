//! Snapshots through kiln's VMM with a bare-metal guest (tests/guests/counter.S): take one
//! while the guest runs, restore it into a new VM, and check the guest goes on exactly where
//! it stopped; and that bad snapshot files are refused before anything runs.
//!
//! Linux guests restored from a snapshot are tested where hardware KVM boots them
//! (tests/linux_kiln.rs, in the nested stage of CI).

#[macro_use]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use kiln::vmm::snapshot::{read_header, SnapshotError};
use kiln::vmm::{Vm, VmConfig};

const SHAPE: &str = "counter-test-shape";

fn counter_config(kernel: &Path) -> VmConfig {
    VmConfig::new(kernel).memory_mib(64).rng(false)
}

/// Waits until `text()` holds at least `lines` complete counter lines.
fn wait_lines(text: impl Fn() -> String, lines: usize, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let t = text();
        if t.matches("\nn=").count() >= lines || Instant::now() > deadline {
            return t;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The counter values of the complete lines of `text` (a last line without its newline is
/// still being written: "n=1" of "n=109").
fn counts(text: &str) -> Vec<u64> {
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.trim_end().strip_prefix("n=").and_then(|n| n.parse().ok()))
        .collect()
}

/// Takes a snapshot of a running counter guest at `path`; returns the console up to the pause.
fn snapshot_counter(kernel: &Path, path: &Path) -> String {
    let mut vm = Vm::start(counter_config(kernel)).expect("start the counter guest");
    let console = vm.console();
    wait_lines(|| console.text(), 50, Duration::from_secs(20));
    let info = vm.snapshot(path, SHAPE).expect("snapshot");
    assert_eq!(info.header.shape, SHAPE);
    console.text()
}

#[test]
fn a_restored_guest_continues_exactly_where_it_stopped() {
    let kernel = or_skip!(common::kvm_usable().and_then(|()| common::build_guest("counter")));
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("counter.snap");
    let before = snapshot_counter(&kernel, &snap);
    let n_before = counts(&before);
    assert!(
        n_before.len() >= 50,
        "the guest printed too little: {before:?}"
    );

    // Two VMs from the same file: each continues from the same point.
    for round in 0..2 {
        let t = Instant::now();
        let (mut vm, info) = Vm::restore(&snap, SHAPE, counter_config(&kernel)).expect("restore");
        eprintln!(
            "restore {round}: {:?} until the vCPU runs ({:?})",
            t.elapsed(),
            info.timings
        );
        assert_eq!(
            info.verified_memory,
            round == 0,
            "memory hashed once per process"
        );
        let console = vm.console();
        let after = wait_lines(|| console.text(), 50, Duration::from_secs(20));
        vm.kill();
        assert!(
            !after.contains("MISMATCH"),
            "registers or memory lost: {after:?}"
        );
        let joined = format!("{before}{after}");
        let all = counts(&joined);
        assert!(
            all.len() >= n_before.len() + 50,
            "the restored guest did not run: {after:?}"
        );
        let expected: Vec<u64> = (1..=all.len() as u64).collect();
        assert_eq!(
            all, expected,
            "output after the restore must continue without a gap or a repeat (round {round})"
        );
    }
}

#[test]
fn bad_snapshot_files_are_refused_before_anything_runs() {
    let kernel = or_skip!(common::kvm_usable().and_then(|()| common::build_guest("counter")));
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("counter.snap");
    snapshot_counter(&kernel, &snap);
    let good = std::fs::read(&snap).unwrap();
    let header = read_header(&snap).unwrap();

    let refused = |name: &str, bytes: &[u8], shape: &str, config: VmConfig| -> String {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        match Vm::restore(&path, shape, config) {
            Ok(_) => panic!("{name}: restored"),
            Err(e) => {
                let text = e.to_string();
                assert!(
                    text.contains(name),
                    "{name}: the error names the file: {text}"
                );
                assert!(!text.contains('\n'), "{name}: one line: {text}");
                text
            }
        }
    };
    let cfg = || counter_config(&kernel);

    let e = refused("truncated.snap", &good[..good.len() / 2], SHAPE, cfg());
    assert!(e.contains("truncated"), "{e}");
    let e = refused("empty.snap", b"", SHAPE, cfg());
    assert!(e.contains("not a kiln snapshot"), "{e}");
    let e = refused("foreign.snap", &[0x7f; 8192], SHAPE, cfg());
    assert!(e.contains("not a kiln snapshot"), "{e}");

    let mut state = good.clone();
    state[4096 + 10] ^= 0x01;
    let e = refused("state-flip.snap", &state, SHAPE, cfg());
    assert!(
        e.contains("machine state does not match its checksum"),
        "{e}"
    );

    let mut memory = good.clone();
    let at = header.memory_offset as usize + 0x10_0000; // the guest's code at 1 MiB
    memory[at] ^= 0x01;
    let e = refused("memory-flip.snap", &memory, SHAPE, cfg());
    assert!(
        e.contains("guest memory does not match its checksum"),
        "{e}"
    );

    let other_version = String::from_utf8_lossy(&good[..4096]).replace(
        &format!("\"kiln_version\":\"{}\"", env!("CARGO_PKG_VERSION")),
        "\"kiln_version\":\"0.0.1-other\"",
    );
    let mut versioned = other_version.into_bytes();
    versioned.resize(4096, 0);
    versioned.extend_from_slice(&good[4096..]);
    let e = refused("version.snap", &versioned, SHAPE, cfg());
    assert!(e.contains("written by kiln 0.0.1-other"), "{e}");

    let e = refused("shape.snap", &good, "another-shape", cfg());
    assert!(e.contains("guest shape"), "{e}");
    let e = refused("memory-size.snap", &good, SHAPE, cfg().memory_mib(128));
    assert!(e.contains("64 MiB"), "{e}");
    let e = refused("vcpus.snap", &good, SHAPE, cfg().vcpus(2));
    assert!(e.contains("vCPUs"), "{e}");
    let e = refused("devices.snap", &good, SHAPE, cfg().rng(true));
    assert!(e.contains("virtio devices"), "{e}");
}

#[test]
fn a_snapshot_that_cannot_be_written_leaves_nothing_behind() {
    let kernel = or_skip!(common::kvm_usable().and_then(|()| common::build_guest("counter")));
    let dir = tempfile::tempdir().unwrap();
    let mut vm = Vm::start(counter_config(&kernel)).unwrap();
    let missing = dir.path().join("no-such-dir/counter.snap");
    let err = vm.snapshot(&missing, SHAPE).unwrap_err();
    assert!(matches!(err, SnapshotError::Io { .. }), "{err}");
    assert!(err.to_string().contains("no-such-dir"), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// Benchmark (not a test; `docs/benchmarks.md`, "Snapshots"): restore time against guest memory
/// size, for the counter guest on this host's /dev/kvm. The second restore of each file is
/// timed (the first also hashes the memory once per process).
#[test]
#[ignore = "benchmark: cargo test --test snapshot -- --ignored --nocapture restore_time"]
fn restore_time_against_memory_size() {
    let kernel = or_skip!(common::kvm_usable().and_then(|()| common::build_guest("counter")));
    let dir = tempfile::tempdir().unwrap();
    eprintln!("| guest memory | snapshot file on disk | restore, median of 5 | first restore (hashes memory) |");
    eprintln!("|---|---|---|---|");
    for mib in [64u64, 256, 1024, 2048] {
        let snap = dir.path().join(format!("{mib}.snap"));
        let config = || counter_config(&kernel).memory_mib(mib);
        let mut vm = Vm::start(config()).unwrap();
        let console = vm.console();
        wait_lines(|| console.text(), 20, Duration::from_secs(20));
        vm.snapshot(&snap, SHAPE).unwrap();
        let on_disk = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&snap).unwrap().blocks() * 512
        };
        let mut times = Vec::new();
        let mut first = Duration::ZERO;
        for i in 0..6 {
            let t = Instant::now();
            let (mut vm, _) = Vm::restore(&snap, SHAPE, config()).unwrap();
            let took = t.elapsed();
            vm.kill();
            if i == 0 {
                first = took;
            } else {
                times.push(took);
            }
        }
        times.sort();
        eprintln!(
            "| {mib} MiB | {:.1} MiB | {:.1} ms | {:.0} ms |",
            on_disk as f64 / (1 << 20) as f64,
            times[2].as_secs_f64() * 1e3,
            first.as_secs_f64() * 1e3
        );
    }
}

#[test]
fn a_full_disk_while_writing_a_snapshot_is_an_error_and_leaves_nothing() {
    let kernel = or_skip!(common::kvm_usable().and_then(|()| common::build_guest("counter")));
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16k", "tmpfs"])
        .arg(&small)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        skip!("cannot mount a 16 KiB tmpfs here (not root, or no CAP_SYS_ADMIN)");
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(small.clone());
    let mut vm = Vm::start(counter_config(&kernel)).unwrap();
    let console = vm.console();
    wait_lines(|| console.text(), 5, Duration::from_secs(20));
    let err = vm.snapshot(&small.join("g.snap"), SHAPE).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, SnapshotError::Io { .. }), "{text}");
    assert!(text.contains("g.snap") && !text.contains('\n'), "{text}");
    assert!(
        text.contains("No space left on device"),
        "the cause is named: {text}"
    );
    assert_eq!(
        std::fs::read_dir(&small).unwrap().count(),
        0,
        "nothing half-written"
    );
}
