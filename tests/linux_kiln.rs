//! Linux through kiln's own VMM, with the default guest (Debian's kernel, kiln-agent as /init):
//! user-space output on the serial console (the agent's `KILN_READY` record goes through the
//! tty layer and the UART's interrupt, unlike the polling kernel console), host-initiated vsock
//! connections to the agent with data both ways, 1 and 2 vCPUs, and the expected failures of
//! `tests/scenarios/expected-fail` on `--backend kiln`.
//!
//! These need a KVM that boots Linux. On kiln's CI machines (PVM) they skip on the host and run
//! in the nested stage (`kiln nested`, an L1 with a nested SVM KVM), where they must pass.

#[macro_use]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln::vmm::{ExitReason, Vm, VmConfig, VmHandle};
use kiln_agent_proto::client::Client;
use kiln_agent_proto::message::ExecRequest;

/// Generous: under nested TCG the default guest takes tens of seconds to its record.
const READY_TIMEOUT: Duration = Duration::from_secs(240);

fn default_guest() -> kiln::guest::GuestImage {
    kiln::guest::default_guest()
        .unwrap_or_else(|e| panic!("the default guest cannot be built: {e}"))
}

/// Waits for `needle` on the console; panics with the console when it does not come.
fn wait_console(vm: &VmHandle, needle: &str, timeout: Duration) -> String {
    let until = Instant::now() + timeout;
    loop {
        let text = vm.console().text();
        // Whole lines only: the last one may still be arriving.
        let mut lines = text.split_inclusive('\n').filter(|l| l.ends_with('\n'));
        if let Some(line) = lines.find(|l| l.contains(needle)) {
            return line.trim_end().to_string();
        }
        if let Some(reason) = vm.exit_reason() {
            panic!("the VM ended ({reason:?}) before {needle:?}; console:\n{text}");
        }
        if Instant::now() >= until {
            panic!("no {needle:?} on the console within {timeout:?}; console:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn boot_default_guest(vcpus: u8, uds: &Path) -> VmHandle {
    let guest = default_guest();
    let config = VmConfig::new(&guest.kernel)
        .initrd(&guest.initrd)
        .memory_mib(256)
        .vcpus(vcpus)
        .vsock(uds)
        .cmdline("quiet");
    Vm::start(config).unwrap_or_else(|e| panic!("cannot start the default guest: {e}"))
}

#[test]
fn the_default_guest_gets_ready_and_its_agent_answers_host_connections_with_1_and_2_vcpus() {
    or_skip!(common::hardware_kvm());
    for vcpus in [1u8, 2] {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let mut vm = boot_default_guest(vcpus, &uds);
        let record = wait_console(&vm, "KILN_READY", READY_TIMEOUT);
        assert!(record.contains("transport=vsock:1024"), "{record}");

        // Several host-initiated connections, one after the other: each closes, and the next
        // socket gets the same fd number (which once went unwatched).
        for round in 0..3 {
            let stream = vm
                .vsock_connect(1024, Duration::from_secs(60))
                .unwrap_or_else(|e| {
                    panic!(
                        "{vcpus} vCPU(s), connection {round}: CONNECT 1024: {e}; console:\n{}",
                        vm.console().text()
                    )
                });
            let mut client = Client::new(stream);
            let mut request = ExecRequest::new(["sh", "-c", "nproc; cat"]);
            request.stdin = format!("ping {round}").into_bytes();
            let out = client.exec(&request).expect("exec through the agent");
            assert!(out.success(), "{out:?}");
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                format!("{vcpus}\nping {round}"),
                "{out:?}"
            );
        }
        // The CMOS RTC: Linux's rtc_cmos found it and it reads the host's UTC clock (before it
        // existed, port 0x71 read 0xff: no rtc0, and ~20,000 polling exits per boot).
        let mut client = Client::new(vm.vsock_connect(1024, Duration::from_secs(60)).unwrap());
        let out = client
            .exec(&ExecRequest::new([
                "cat",
                "/sys/class/rtc/rtc0/name",
                "/sys/class/rtc/rtc0/since_epoch",
            ]))
            .expect("exec through the agent");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.success() && text.contains("rtc_cmos"), "{out:?}");
        let guest_epoch: u64 = text
            .lines()
            .last()
            .and_then(|l| l.trim().parse().ok())
            .unwrap();
        let host_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(
            guest_epoch.abs_diff(host_epoch) <= 60,
            "the guest's RTC says {guest_epoch}, the host's clock {host_epoch}"
        );

        let mut client = Client::new(vm.vsock_connect(1024, Duration::from_secs(60)).unwrap());
        client.shutdown(false).expect("agent shutdown");
        let exit = vm.wait(Duration::from_secs(120));
        assert!(
            matches!(exit, ExitReason::Shutdown | ExitReason::Reset),
            "{vcpus} vCPU(s): {exit:?}"
        );
    }
}

#[test]
fn user_space_output_reaches_the_serial_console() {
    or_skip!(common::hardware_kvm());
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    let mut vm = boot_default_guest(1, &uds);
    wait_console(&vm, "KILN_READY", READY_TIMEOUT);
    let mut client = Client::new(vm.vsock_connect(1024, Duration::from_secs(60)).unwrap());
    // Written by a user-space process to the console device, through the tty layer.
    let out = client
        .exec(&ExecRequest::new([
            "sh",
            "-c",
            "echo written-by-user-space > /dev/ttyS0",
        ]))
        .expect("exec");
    assert!(out.success(), "{out:?}");
    wait_console(&vm, "written-by-user-space", Duration::from_secs(60));
    vm.kill();
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn each_expected_failure_fails_with_its_class_on_the_kiln_backend() {
    or_skip!(common::hardware_kvm());
    default_guest();
    let tmp = tempfile::tempdir().unwrap();
    let corpus = root().join("tests/scenarios/expected-fail");
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("run")
        .arg(&corpus)
        .args(["--backend", "kiln", "--jobs", "1", "--artifacts"])
        .arg(tmp.path())
        .env("KILN_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run kiln");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let mut checked = 0;
    for (id, expected) in common::corpus(&corpus) {
        let expected = expected.unwrap_or_else(|| panic!("{id}: no `# expected: CLASS` line"));
        let result = tmp.path().join(&id).join("latest/result.json");
        let result: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&result)
                .unwrap_or_else(|e| panic!("{id}: {}: {e}\n{stderr}", result.display())),
        )
        .unwrap();
        assert_eq!(result["provenance"]["backend"], "kiln", "{id}");
        assert_eq!(result["verdict"], "fail", "{id}: {result}");
        assert_eq!(result["failure"]["class"], expected, "{id}: {result}");
        if expected == "guest-panic" {
            // Seen when the guest resets after its panic, not at the step's two-minute timeout.
            let total = result["phases"]["total_ms"].as_f64().unwrap_or(f64::MAX);
            assert!(total < 100_000.0, "{id}: guest panic took {total} ms");
        }
        checked += 1;
    }
    assert!(checked >= 6, "only {checked} expected failures");
}

/// The guest-cache alias of a guest built from `guest/kernel/kiln.config`
/// (`kiln guest build --from-source linux.tar.xz --alias kiln-config`, about 9 minutes on two
/// cores; docs/nested.md). Not built in CI: the test runs only with KILN_TEST_KILN_CONFIG_GUEST=1.
const KILN_CONFIG_ALIAS: &str = "kiln-config";

fn kiln_config_guest() -> Result<kiln::guest::GuestImage, String> {
    // Opt-in: the guest takes minutes to build and CI does not build it (docs/nested.md has the
    // result and the command).
    if std::env::var_os("KILN_TEST_KILN_CONFIG_GUEST").is_none() {
        return Err("set KILN_TEST_KILN_CONFIG_GUEST=1 to boot the kiln.config guest".into());
    }
    let cache = kiln::guest::Cache::default_location().map_err(|e| e.to_string())?;
    cache.find(KILN_CONFIG_ALIAS).map_err(|e| {
        format!(
            "no `{KILN_CONFIG_ALIAS}` guest in the cache ({e}); build it with \
             `kiln guest build --from-source /usr/src/linux-source-6.1.tar.xz --alias {KILN_CONFIG_ALIAS}`"
        )
    })
}

/// With `acpi=off` the guest sees no DSDT, so the only way it can find the virtio devices is the
/// `virtio_mmio.device=` entries `virtio_cmdline(true)` adds (VIRTIO_MMIO_CMDLINE_DEVICES in
/// kiln.config). The agent gets ready over vsock, mounts the share over virtio-fs and reads the disk.
#[test]
fn a_kiln_config_kernel_finds_every_device_from_the_command_line_alone() {
    or_skip!(common::hardware_kvm());
    let guest = or_skip!(kiln_config_guest());
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("from-host.txt"), b"over virtio-fs\n").unwrap();
    let disk = dir.path().join("disk.raw");
    let mut bytes = vec![0u8; 1 << 20];
    bytes[..12].copy_from_slice(b"kiln-disk-ok");
    std::fs::write(&disk, &bytes).unwrap();
    let config = VmConfig::new(&guest.kernel)
        .initrd(&guest.initrd)
        .memory_mib(256)
        .disk(kiln::devices::virtio::block::DiskSpec::new(&disk))
        .share("fixtures", &share, false)
        .vsock(&uds)
        .virtio_cmdline(true)
        .cmdline("acpi=off kiln.share=fixtures:/fixtures");
    let mut vm = Vm::start(config).unwrap_or_else(|e| panic!("cannot start: {e}"));
    let record = wait_console(&vm, "KILN_READY", READY_TIMEOUT);
    assert!(record.contains("transport=vsock:1024"), "{record}");
    let mut client = Client::new(vm.vsock_connect(1024, Duration::from_secs(60)).unwrap());
    let script = "cat /proc/cmdline; ls /sys/firmware/acpi/tables 2>&1 | head -1; \
                  ls /sys/bus/virtio/devices | wc -l; cat /fixtures/from-host.txt; \
                  head -c 12 /dev/vda; echo";
    let out = client
        .exec(&ExecRequest::new(["sh", "-c", script]))
        .expect("exec");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "guest said:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.success(), "{out:?}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].contains("virtio_mmio.device=4K@0xd0000000:"),
        "{text}"
    );
    assert!(lines[0].contains("acpi=off"), "{text}");
    // No ACPI tables, so the devices came from the command line: disk, share, vsock, rng.
    assert!(!lines[1].contains("DSDT"), "{text}");
    assert_eq!(lines[2], "4", "{text}");
    assert_eq!(lines[3], "over virtio-fs", "{text}");
    assert_eq!(lines[4], "kiln-disk-ok", "{text}");
    vm.kill();
}

/// Boots the default guest once to `KILN_READY`, snapshots it, and restores it twice: each
/// restored guest answers its agent over a new vsock connection, takes the resume (entropy,
/// clock, boot id), and then reads other random bytes than its sibling. Prints cold boot and
/// restore times (ratios only: this runs in the nested L1).
#[test]
fn a_linux_guest_restored_from_a_snapshot_resumes_and_differs_from_its_sibling() {
    or_skip!(common::hardware_kvm());
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    let cold = Instant::now();
    let mut vm = boot_default_guest(1, &uds);
    wait_console(&vm, "KILN_READY", READY_TIMEOUT);
    let cold_ready = cold.elapsed();
    let snap = dir.path().join("guest.snap");
    let info = vm
        .snapshot(&snap, "linux-test")
        .unwrap_or_else(|e| panic!("snapshot: {e}"));
    eprintln!(
        "snapshot: pause {:?}, write {:?}, {} MiB memory",
        info.pause,
        info.write,
        info.header.memory_len >> 20
    );
    let guest = default_guest();
    let mut randoms = Vec::new();
    for round in 0..2 {
        let uds = dir.path().join(format!("vsock{round}.sock"));
        let config = VmConfig::new(&guest.kernel)
            .initrd(&guest.initrd)
            .memory_mib(256)
            .vcpus(1)
            .vsock(&uds);
        let t = Instant::now();
        let (mut vm, info) = Vm::restore(&snap, "linux-test", config)
            .unwrap_or_else(|e| panic!("restore {round}: {e}"));
        let restored = t.elapsed();
        let stream = vm.vsock_connect(1024, Duration::from_secs(60));
        let stream = stream.unwrap_or_else(|e| {
            std::thread::sleep(Duration::from_millis(500));
            panic!(
                "restore {round}: CONNECT 1024: {e}; exit {:?}; console:\n{}",
                vm.exit_reason(),
                vm.console().text()
            )
        });
        let mut client = Client::new(stream);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let request = kiln_agent_proto::ResumeRequest {
            entropy: (0..64u8).map(|i| i.wrapping_mul(round + 3)).collect(),
            unix_secs: now.as_secs(),
            unix_nanos: now.subsec_nanos(),
            boot_id: format!("restored-{round}"),
            shares: Vec::new(),
        };
        client.resume(&request).unwrap_or_else(|e| {
            panic!(
                "restore {round}: resume: {e}; exit {:?}; console:\n{}",
                vm.exit_reason(),
                vm.console().text()
            )
        });
        let answered = t.elapsed();
        let record = wait_console(&vm, "boot=restored-", Duration::from_secs(30));
        assert!(
            record.contains(&format!("boot=restored-{round}")),
            "{record}"
        );
        let mut client = Client::new(vm.vsock_connect(1024, Duration::from_secs(60)).unwrap());
        let out = client
            .exec(&ExecRequest::new([
                "sh",
                "-c",
                "head -c 16 /dev/urandom | od -An -tx1; date +%s",
            ]))
            .expect("exec in the restored guest");
        assert!(out.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let clock: u64 = text.lines().last().unwrap().trim().parse().unwrap();
        assert!(
            clock.abs_diff(now.as_secs()) < 60,
            "guest clock {clock}: {text}"
        );
        randoms.push(text.lines().next().unwrap().to_string());
        eprintln!(
            "restore {round}: vCPUs running after {restored:?} ({:?}), agent answered the resume after {answered:?}; cold boot to KILN_READY took {cold_ready:?}",
            info.timings
        );
        vm.kill();
    }
    assert_ne!(
        randoms[0], randoms[1],
        "two restored guests read the same random bytes"
    );
}

/// The process's anonymous memory in KiB (/proc/self/smaps_rollup): what guest pages cost
/// that are not shared with a file.
fn anonymous_kib() -> u64 {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup").expect("smaps_rollup");
    text.lines()
        .find_map(|l| l.strip_prefix("Anonymous:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("Anonymous: in smaps_rollup")
}

/// Benchmark (not a test; `docs/benchmarks.md`, "Snapshots"): 16 guests restored from one
/// snapshot, all running at once, against 16 booted cold one after another, each up to its
/// agent answering; prints the anonymous memory they add to the process (from /proc: for the
/// restored ones together, for the cold ones the sum of each alone) and the times. Run in the nested L1:
/// `kiln nested -- target/debug/deps/linux_kiln-* --ignored --nocapture snapshot_benchmark`.
#[test]
#[ignore = "benchmark: run by hand in the nested L1 (docs/benchmarks.md)"]
fn snapshot_benchmark_16_restored_against_16_cold() {
    or_skip!(common::hardware_kvm());
    const N: usize = 16;
    let dir = tempfile::tempdir().unwrap();
    let guest = default_guest();
    let config = |uds: &Path| {
        VmConfig::new(&guest.kernel)
            .initrd(&guest.initrd)
            .memory_mib(256)
            .vcpus(1)
            .vsock(uds)
            .cmdline("quiet")
    };
    let answer = |vm: &VmHandle| {
        let mut client = Client::new(vm.vsock_connect(1024, Duration::from_secs(600)).unwrap())
            .io_timeout(Some(Duration::from_secs(600)));
        let out = client.exec(&ExecRequest::new(["true"])).expect("exec");
        assert!(out.success());
    };
    // The snapshot, from one cold boot.
    let mut vm = Vm::start(config(&dir.path().join("template.sock"))).unwrap();
    wait_console(&vm, "KILN_READY", READY_TIMEOUT);
    let snap = dir.path().join("guest.snap");
    vm.snapshot(&snap, "bench").unwrap();
    // First restore hashes the memory once; not part of the figures.
    let (mut warm, _) = Vm::restore(&snap, "bench", config(&dir.path().join("warm.sock"))).unwrap();
    warm.kill();

    let base = anonymous_kib();
    let t = Instant::now();
    let mut restored = Vec::new();
    for i in 0..N {
        let uds = dir.path().join(format!("r{i}.sock"));
        let (vm, _) = Vm::restore(&snap, "bench", config(&uds)).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let mut client = Client::new(vm.vsock_connect(1024, Duration::from_secs(600)).unwrap())
            .io_timeout(Some(Duration::from_secs(600)));
        client
            .resume(&kiln_agent_proto::ResumeRequest {
                entropy: vec![i as u8; 64],
                unix_secs: now.as_secs(),
                unix_nanos: now.subsec_nanos(),
                boot_id: format!("bench-{i}"),
                shares: Vec::new(),
            })
            .unwrap();
        answer(&vm);
        restored.push(vm);
    }
    let restored_time = t.elapsed();
    let restored_kib = anonymous_kib().saturating_sub(base);
    for mut vm in restored {
        vm.kill();
    }
    std::thread::sleep(Duration::from_secs(1));

    // Cold: one at a time (16 Linux boots at once overload the L1's two emulated CPUs until
    // guests soft-lock), each measured alone while it runs and then killed; the sum is what 16
    // would hold at once.
    // An L2 boot in this L1 now and then triple-faults early (docs/nested.md): such a boot is
    // counted and done again.
    eprintln!(
        "restored: {N} running at once added {} MiB, all answered after {:.1} s",
        restored_kib / 1024,
        restored_time.as_secs_f64()
    );
    let mut cold_kib = 0;
    let mut failed_boots = 0;
    let t = Instant::now();
    for i in 0..N {
        loop {
            let base = anonymous_kib();
            let mut vm = Vm::start(config(&dir.path().join(format!("c{i}.sock")))).unwrap();
            let up = Instant::now() + READY_TIMEOUT;
            while !vm.console().text().contains("KILN_READY")
                && vm.exit_reason().is_none()
                && Instant::now() < up
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            if vm.exit_reason().is_some() || !vm.console().text().contains("KILN_READY") {
                failed_boots += 1;
                eprintln!(
                    "cold boot {i} failed ({:?}); booting it again",
                    vm.exit_reason()
                );
                vm.kill();
                assert!(failed_boots < 4, "too many failed cold boots");
                let _ = std::fs::remove_file(dir.path().join(format!("c{i}.sock")));
                continue;
            }
            answer(&vm);
            cold_kib += anonymous_kib().saturating_sub(base);
            vm.kill();
            break;
        }
    }
    let cold_time = t.elapsed();
    eprintln!("cold boots that failed and were done again: {failed_boots}");
    eprintln!("| {N} VMs, 256 MiB, 1 vCPU | restored | cold | cold / restored |");
    eprintln!("|---|---|---|---|");
    eprintln!(
        "| anonymous memory added | {} MiB | {} MiB | {:.1} |",
        restored_kib / 1024,
        cold_kib / 1024,
        cold_kib as f64 / restored_kib.max(1) as f64
    );
    eprintln!(
        "| all up to the agent answering (restored: all running at once; cold: one after another) | {:.1} s | {:.1} s | {:.1} |",
        restored_time.as_secs_f64(),
        cold_time.as_secs_f64(),
        cold_time.as_secs_f64() / restored_time.as_secs_f64()
    );
}
