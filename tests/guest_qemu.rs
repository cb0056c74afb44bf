//! The default guest (Debian's kernel package + kiln-agent as PID 1) end to end on the QEMU
//! backend (TCG here), through `kiln::TestVm`: readiness record on the console, exec / put / get
//! over the virtio-serial port, a file written into a 9p share seen on the host, and shutdown
//! ending QEMU. This is the guest `kiln run` uses; the test builds it into the user's cache on
//! first use (about a minute and a half).

#[macro_use]
mod common;

use std::fs;
use std::time::{Duration, Instant};

use kiln::backends::BackendChoice;
use kiln::guest::{default_guest, GuestError};
use kiln::scenario::BackendKind;
use kiln::{ExecRequest, TestVm};
use kiln_agent_proto::{ReadyRecord, Transport, SERIAL_PORT_NAME};

/// Under TCG the Debian kernel takes tens of seconds to boot; allow for a loaded machine.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// The guest to boot: `KILN_GUEST_KERNEL` + `KILN_GUEST_INITRD` when set (flake.nix's check
/// boots its own guest this way), else the default guest (`None`: TestVm's own default).
fn guest_or_skip() -> Result<Option<(String, String)>, String> {
    if let (Some(kernel), Some(initrd)) = (
        std::env::var("KILN_GUEST_KERNEL").ok(),
        std::env::var("KILN_GUEST_INITRD").ok(),
    ) {
        return Ok(Some((kernel, initrd)));
    }
    match default_guest() {
        Ok(_) => Ok(None),
        // No apt, no network or no package lists: the machine cannot fetch the kernel.
        Err(GuestError::Invalid(message))
            if message.contains("apt-get") || message.contains("cannot run dpkg-deb") =>
        {
            Err(format!("cannot build the default guest here: {message}"))
        }
        Err(e) => panic!("building the default guest failed: {e}"),
    }
}

#[test]
fn default_guest_boots_under_qemu_tcg_and_serves_the_agent() {
    or_skip!(common::qemu());
    let guest = or_skip!(guest_or_skip());
    let expected_release = match &guest {
        None => default_guest().ok().and_then(|g| g.manifest.kernel_release),
        Some(_) => None,
    };
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    fs::create_dir(&share).unwrap();
    fs::write(share.join("from-host.txt"), b"hello from the host\n").unwrap();

    let mut builder = TestVm::builder()
        .backend(BackendChoice::Qemu)
        .boot_timeout(READY_TIMEOUT)
        .share_at("fixtures", &share, "/fixtures", false);
    if let Some((kernel, initrd)) = &guest {
        builder = builder.kernel(kernel).initrd(initrd);
    }
    let started = Instant::now();
    let vm = builder.boot().unwrap_or_else(|e| panic!("{e}"));
    let ready_after = started.elapsed();
    assert_eq!(vm.backend(), BackendKind::Qemu);
    let line = vm.ready_record();
    let record = ReadyRecord::parse(line).unwrap_or_else(|| panic!("not a record: {line:?}"));
    assert_eq!(record.version, 1);
    assert_eq!(
        record.transports,
        [Transport::Serial(SERIAL_PORT_NAME.into())],
        "{line}"
    );
    eprintln!(
        "KILN_READY {:.1} s after boot() was called (TCG), t={} ms after kernel start",
        ready_after.as_secs_f64(),
        record.t_ms,
    );

    let uname = vm.exec(["uname", "-r"]).unwrap();
    assert!(uname.success(), "{uname:?}");
    let release = String::from_utf8_lossy(&uname.stdout).trim().to_owned();
    match &expected_release {
        Some(expected) => assert_eq!(&release, expected),
        None => assert!(!release.is_empty()),
    }

    // How long the agent took from its own start (PID 1's start time, in clock ticks since
    // boot; 100 Hz on x86) to its readiness record (`t=`, ms since boot).
    let stat = vm.exec(["cat", "/proc/1/stat"]).unwrap();
    let stat = String::from_utf8_lossy(&stat.stdout).into_owned();
    let start_ticks: u64 = stat
        .rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().nth(19))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no start time in /proc/1/stat: {stat:?}"));
    let agent_start_ms = start_ticks * 10;
    assert!(
        agent_start_ms <= record.t_ms + 10,
        "{stat} vs t={}",
        record.t_ms
    );

    let started = Instant::now();
    let out = vm
        .exec_request(&ExecRequest::new([
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ]))
        .unwrap();
    eprintln!("exec round trip under TCG: {:?}", started.elapsed());
    assert_eq!(
        (out.stdout.as_slice(), out.stderr.as_slice(), out.code),
        (&b"out\n"[..], &b"err\n"[..], Some(3)),
        "{out:?}"
    );

    vm.put_mode("/tmp/put.bin", 0o640, b"\x00kiln\xff").unwrap();
    assert_eq!(vm.get("/tmp/put.bin").unwrap(), b"\x00kiln\xff");
    let mode = vm.exec(["stat", "-c", "%a", "/tmp/put.bin"]).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&mode.stdout).trim(),
        "640",
        "{mode:?}"
    );

    assert_eq!(
        vm.get("/fixtures/from-host.txt").unwrap(),
        b"hello from the host\n"
    );
    vm.put("/fixtures/from-guest.txt", b"written in the guest\n")
        .unwrap();
    assert_eq!(
        fs::read(share.join("from-guest.txt")).unwrap(),
        b"written in the guest\n"
    );

    vm.shutdown().unwrap_or_else(|e| panic!("shutdown: {e}"));
}
