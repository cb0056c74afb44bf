//! The default guest (Debian's kernel package + kiln-agent as PID 1) end to end under QEMU TCG:
//! readiness record on the console, exec / put / get over the virtio-serial port, a file written
//! into a 9p share seen on the host, and shutdown ending QEMU. This is the guest `kiln run`
//! uses; the test builds it into the user's cache on first use (about a minute and a half).

mod common;

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::qemu::{qemu_binary, Qemu, QemuGuest};
use kiln::guest::{default_guest, GuestError};
use kiln_agent_proto::client::{connect_unix, Client};
use kiln_agent_proto::{ExecRequest, ReadyRecord, Transport, SERIAL_PORT_NAME};

/// Under TCG the Debian kernel takes tens of seconds to boot; allow for a loaded machine.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// The guest to boot: `KILN_GUEST_KERNEL` + `KILN_GUEST_INITRD` when set (flake.nix's check
/// boots its own guest this way), else the default guest.
struct Guest {
    kernel: PathBuf,
    initrd: PathBuf,
    release: Option<String>,
}

fn guest_or_skip() -> Result<Guest, String> {
    if let (Some(kernel), Some(initrd)) = (
        std::env::var_os("KILN_GUEST_KERNEL"),
        std::env::var_os("KILN_GUEST_INITRD"),
    ) {
        return Ok(Guest {
            kernel: kernel.into(),
            initrd: initrd.into(),
            release: None,
        });
    }
    match default_guest() {
        Ok(image) => Ok(Guest {
            kernel: image.kernel,
            initrd: image.initrd,
            release: image.manifest.kernel_release,
        }),
        // No apt, no network or no package lists: the machine cannot fetch the kernel.
        Err(GuestError::Invalid(message))
            if message.contains("apt-get") || message.contains("cannot run dpkg-deb") =>
        {
            Err(format!("cannot build the default guest here: {message}"))
        }
        Err(e) => panic!("building the default guest failed: {e}"),
    }
}

fn connect(socket: &std::path::Path) -> Client<UnixStream> {
    let stream = connect_unix(socket).unwrap_or_else(|e| panic!("agent socket: {e}"));
    Client::new_shared(stream)
}

#[test]
fn default_guest_boots_under_qemu_tcg_and_serves_the_agent() {
    or_skip!(qemu_binary());
    let guest = or_skip!(guest_or_skip());
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    fs::create_dir(&share).unwrap();
    fs::write(share.join("from-host.txt"), b"hello from the host\n").unwrap();

    let mut qemu = Qemu::start(&QemuGuest {
        kernel: &guest.kernel,
        initrd: &guest.initrd,
        share: &share,
        run_dir: dir.path(),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let line = qemu
        .wait_for_line("KILN_READY", READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let ready_after = qemu.started.elapsed();
    let record = ReadyRecord::parse(&line).unwrap_or_else(|| panic!("not a record: {line:?}"));
    assert_eq!(record.version, 1);
    assert_eq!(
        record.transports,
        [Transport::Serial(SERIAL_PORT_NAME.into())],
        "{line}"
    );
    eprintln!(
        "KILN_READY {:.1} s after QEMU started (TCG), t={} ms after kernel start; kernel {}",
        ready_after.as_secs_f64(),
        record.t_ms,
        guest.release.as_deref().unwrap_or("?")
    );

    let mut client = connect(&qemu.agent_socket);
    let uname = client.exec(&ExecRequest::new(["uname", "-r"])).unwrap();
    assert!(uname.success(), "{uname:?}");
    let release = String::from_utf8_lossy(&uname.stdout).trim().to_owned();
    match &guest.release {
        Some(expected) => assert_eq!(&release, expected),
        None => assert!(!release.is_empty()),
    }

    // How long the agent took from its own start (PID 1's start time, in clock ticks since
    // boot; 100 Hz on x86) to its readiness record (`t=`, ms since boot).
    let stat = client
        .exec(&ExecRequest::new(["cat", "/proc/1/stat"]))
        .unwrap();
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
    eprintln!(
        "agent ready {} ms after it started (PID 1 started at ~{} ms, record t={} ms; 10 ms resolution)",
        record.t_ms.saturating_sub(agent_start_ms),
        agent_start_ms,
        record.t_ms
    );

    let started = Instant::now();
    let out = client
        .exec(&ExecRequest::new([
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

    client.put("/tmp/put.bin", 0o640, b"\x00kiln\xff").unwrap();
    let back = client.get("/tmp/put.bin", 1024).unwrap();
    assert_eq!(
        (back.data.as_slice(), back.mode & 0o777),
        (&b"\x00kiln\xff"[..], 0o640)
    );

    let host_file = client.get("/fixtures/from-host.txt", 1024).unwrap();
    assert_eq!(host_file.data, b"hello from the host\n");
    client
        .put("/fixtures/from-guest.txt", 0o644, b"written in the guest\n")
        .unwrap();
    assert_eq!(
        fs::read(share.join("from-guest.txt")).unwrap(),
        b"written in the guest\n"
    );

    client.shutdown(false).unwrap();
    let status = qemu
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", qemu.console_tail()));
    assert!(status.success(), "QEMU exit status {status}");
}
