//! Boots tests/guests/virtio_guest.S, a bare-metal polling virtio-mmio driver, through kiln's
//! VMM and asserts on what it did with kiln's virtio devices: FUSE requests on virtio-fs (a file
//! read, a file created on the host), a vsock stream to a host listener (bytes both ways,
//! shutdown, reset), entropy from virtio-rng, and virtio-blk reads, writes, FLUSH and GET_ID
//! through a copy-on-write overlay that `qemu-img` then checks.
//!
//! The guest was checked against a reference before being trusted against kiln, so a wrong line
//! here points at kiln, not at the guest: QEMU 10.0.2 `-M microvm,acpi=off -accel tcg
//! -global virtio-mmio.force-legacy=false -device virtio-rng-device -drive
//! file=<qcow2 over a raw base>,if=none,id=d0 -device virtio-blk-device,drive=d0,serial=kiln-test`
//! (the guest built with tests/guests/pvh_shim.S) printed `virtio devices=2`, the two probe lines
//! (`size=0x200` windows from QEMU's `512@0xfeb00e00:12` entries), `rng ok len=64 nonzero=64`,
//! `blk capacity=2048`, `blk read=KILNBASE wrote=2 id=kiln-test`, `virtio done`, status 0; the
//! overlay then passed `qemu-img check`, was identical to the expected raw image under
//! `qemu-img compare`, and the base was unchanged. `qemu_reference_rng_and_blk` repeats that
//! wherever QEMU is installed. The vsock driver was checked the same way against rust-vmm's
//! vhost-device-vsock 0.3 (`cargo install vhost-device-vsock`) behind QEMU's
//! `vhost-user-vsock-device` (guest RAM a shared memfd): `vsock cid=3`, `vsock connected
//! port=5005`, `vsock got=pong from host`, `vsock closed`, and the host listener got
//! `ping from guest`; `qemu_reference_vsock` repeats it wherever vhost-device-vsock is on PATH.
//! The virtio-fs driver was checked against virtiofsd 1.14 (`cargo install virtiofsd`, with
//! `--sandbox none`) behind QEMU's `vhost-user-fs-device`: `fs tag=kilnshare`, `fs init major=7`,
//! `fs read=hello from the host`, `fs created`, and from-guest.txt held `written by the guest`;
//! `qemu_reference_virtio_fs` repeats it wherever virtiofsd is on PATH.

#[macro_use]
mod common;

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln::devices::virtio::block::{DiskMode, DiskSpec};
use kiln::vmm::{ExitReason, Vm, VmConfig};

const MEMORY_MIB: u64 = 64;
/// The host port the guest connects to (`kiln.vsock_port=`).
const VSOCK_PORT: u32 = 5005;
const TAG: &str = "kilnshare";
const HELLO: &str = "hello from the host";
const PING: &[u8] = b"ping from guest";
const PONG: &[u8] = b"pong from host";
/// Generous: the whole guest takes well under a second; a broken device makes the guest's
/// bounded polls give up after about 10 s.
const TIMEOUT: Duration = Duration::from_secs(60);

/// What one boot through kiln's VMM produced.
struct Boot {
    exit: ExitReason,
    text: String,
    elapsed: Duration,
}

impl Boot {
    fn context(&self) -> String {
        format!(
            "console:\n{}\n-- the VM ended with {:?} after {:?}",
            self.text, self.exit, self.elapsed
        )
    }
}

fn boot(cfg: VmConfig) -> Boot {
    let started = Instant::now();
    let mut vm = Vm::start(cfg).unwrap_or_else(|e| panic!("Vm::start failed: {e}"));
    let exit = vm.wait(TIMEOUT);
    Boot {
        exit,
        text: vm.console().text(),
        elapsed: started.elapsed(),
    }
}

/// Builds the guest, or says why this machine cannot run it.
fn runnable_guest() -> Result<PathBuf, String> {
    common::kvm_usable()?;
    common::build_guest("virtio_guest")
}

/// A directory to share holding hello.txt.
fn share_dir(root: &Path) -> PathBuf {
    let dir = root.join("share");
    fs::create_dir(&dir).expect("create the share directory");
    fs::write(dir.join("hello.txt"), HELLO).expect("write hello.txt");
    dir
}

/// Listens at `<uds>_<port>` (where kiln connects a guest's stream to host port `port`) and,
/// on a thread, accepts one connection, expects PING, answers PONG and reads until the guest
/// shuts the stream down. Returns every byte the guest sent.
fn host_listener(uds: &Path, port: u32) -> JoinHandle<Result<Vec<u8>, String>> {
    let path = format!("{}_{port}", uds.display());
    let listener =
        UnixListener::bind(&path).unwrap_or_else(|e| panic!("cannot listen at {path}: {e}"));
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    std::thread::spawn(move || {
        let deadline = Instant::now() + TIMEOUT;
        let mut stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(format!("no connection at {path}: {e}")),
            }
        };
        let io = |what: &str, e: std::io::Error| format!("{what} on {path}: {e}");
        stream
            .set_nonblocking(false)
            .map_err(|e| io("set_nonblocking", e))?;
        stream
            .set_read_timeout(Some(TIMEOUT))
            .map_err(|e| io("set_read_timeout", e))?;
        let mut got = vec![0u8; PING.len()];
        stream
            .read_exact(&mut got)
            .map_err(|e| io("reading the guest's ping", e))?;
        stream
            .write_all(PONG)
            .map_err(|e| io("writing the pong", e))?;
        stream
            .read_to_end(&mut got)
            .map_err(|e| io("waiting for the guest's shutdown", e))?;
        Ok(got)
    })
}

/// The probe line the guest prints for kiln's virtio-mmio slot `index`.
fn probe_line(index: u64, device_id: u32) -> String {
    format!(
        "virtio {index}: base={:#x} size=0x1000 irq={} id={device_id}",
        0xd000_0000u64 + index * 0x1000,
        5 + index
    )
}

/// Asserts the console is exactly `expected`, where a line `rng ok len=64 nonzero=*` stands
/// for the rng line with any count of at least 40 (64 random bytes with more than 24 zeros do
/// not happen).
fn assert_console(boot: &Boot, expected: &[String]) {
    let context = boot.context();
    assert!(
        boot.text.ends_with('\n'),
        "console does not end with a newline; {context}"
    );
    let lines: Vec<&str> = boot.text.lines().collect();
    assert_eq!(
        lines.len(),
        expected.len(),
        "console has {} lines, expected {}: {expected:#?}; {context}",
        lines.len(),
        expected.len()
    );
    for (got, want) in lines.iter().zip(expected) {
        if want == "rng ok len=64 nonzero=*" {
            let count: u32 = got
                .strip_prefix("rng ok len=64 nonzero=")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("expected the rng line, got {got:?}; {context}"));
            assert!(
                (40..=64).contains(&count),
                "{count} of 64 random bytes are not zero; {context}"
            );
        } else {
            assert_eq!(*got, want.as_str(), "console line differs; {context}");
        }
    }
}

fn assert_exit(boot: &Boot, status: u8) {
    assert!(
        matches!(boot.exit, ExitReason::ExitPort(s) if s == status),
        "expected ExitPort({status}); {}",
        boot.context()
    );
}

fn lines(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn virtio_guest_drives_fs_vsock_and_rng() {
    let kernel = or_skip!(runnable_guest());
    let dir = tempfile::tempdir().expect("tempdir");
    let share = share_dir(dir.path());
    let uds = dir.path().join("vsock.sock");
    let listener = host_listener(&uds, VSOCK_PORT);
    let cfg = VmConfig::new(kernel)
        .cmdline(format!("kiln.vsock_port={VSOCK_PORT}"))
        .memory_mib(MEMORY_MIB)
        .virtio_cmdline(true)
        .share(TAG, &share, false)
        .vsock(&uds);
    let boot = boot(cfg);

    let mut expected = vec!["virtio devices=3".to_string(), probe_line(0, 26)];
    expected.extend(lines(&[
        "fs tag=kilnshare",
        "fs init major=7",
        "fs read=hello from the host",
        "fs created",
    ]));
    expected.push(probe_line(1, 19));
    expected.extend(lines(&[
        "vsock cid=3",
        "vsock connected port=5005",
        "vsock got=pong from host",
        "vsock closed",
    ]));
    expected.push(probe_line(2, 4));
    expected.extend(lines(&["rng ok len=64 nonzero=*", "virtio done"]));
    assert_console(&boot, &expected);
    assert_exit(&boot, 0);

    let created = share.join("from-guest.txt");
    let text = fs::read_to_string(&created)
        .unwrap_or_else(|e| panic!("{}: {e}; {}", created.display(), boot.context()));
    assert_eq!(text, "written by the guest");
    let mode = fs::metadata(&created).expect("stat").permissions().mode();
    assert_eq!(mode & 0o7777, 0o644, "CREATE asked for 0644 with umask 022");
    assert_eq!(
        fs::read_to_string(share.join("hello.txt")).expect("hello.txt"),
        HELLO,
        "reading changed hello.txt"
    );

    let got = listener
        .join()
        .expect("listener thread")
        .unwrap_or_else(|e| panic!("{e}; {}", boot.context()));
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(PING),
        "bytes the host listener received"
    );
}

#[test]
fn virtio_guest_sees_no_devices_without_cmdline_entries() {
    let kernel = or_skip!(runnable_guest());
    // The rng is attached, but only ACPI announces it.
    let cfg = VmConfig::new(kernel).memory_mib(MEMORY_MIB);
    let boot = boot(cfg);
    assert_console(&boot, &lines(&["virtio devices=0", "virtio done"]));
    assert_exit(&boot, 0);
}

#[test]
fn virtio_guest_is_reset_when_no_host_listens() {
    let kernel = or_skip!(runnable_guest());
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = VmConfig::new(kernel)
        .cmdline(format!("kiln.vsock_port={VSOCK_PORT}"))
        .memory_mib(MEMORY_MIB)
        .virtio_cmdline(true)
        .rng(false)
        .vsock(dir.path().join("vsock.sock"));
    let boot = boot(cfg);
    let mut expected = vec!["virtio devices=1".to_string(), probe_line(0, 19)];
    expected.extend(lines(&[
        "vsock cid=3",
        "virtio error: vsock: the host reset the connection while the guest waited for op 0x2",
    ]));
    assert_console(&boot, &expected);
    assert_exit(&boot, 1);
}

#[test]
fn virtio_guest_cannot_create_on_a_read_only_share() {
    let kernel = or_skip!(runnable_guest());
    let dir = tempfile::tempdir().expect("tempdir");
    let share = share_dir(dir.path());
    let cfg = VmConfig::new(kernel)
        .memory_mib(MEMORY_MIB)
        .virtio_cmdline(true)
        .rng(false)
        .share(TAG, &share, true);
    let boot = boot(cfg);
    let mut expected = vec!["virtio devices=1".to_string(), probe_line(0, 26)];
    expected.extend(lines(&[
        "fs tag=kilnshare",
        "fs init major=7",
        "fs read=hello from the host",
        // FUSE_CREATE (35) refused with EROFS (30).
        "virtio error: fs: FUSE opcode 35 failed: error=-30",
    ]));
    assert_console(&boot, &expected);
    assert_exit(&boot, 1);
    assert!(
        !share.join("from-guest.txt").exists(),
        "a read-only share got a new file"
    );
}

// ---- virtio-blk over a copy-on-write overlay ----

/// `Ok` when `tool` is on PATH.
fn found_on_path(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| dir.join(tool).is_file())
}

/// A tool CI installs (QEMU, qemu-img): `Err` to skip on locally, a failure on CI.
fn on_path(tool: &str) -> Result<(), String> {
    if found_on_path(tool) {
        Ok(())
    } else {
        common::ci_requires(format!(
            "{tool} not found on PATH (apt-get install qemu-system-x86 qemu-utils)"
        ))
    }
}

/// virtiofsd on PATH or where Debian's package puts it (/usr/libexec/virtiofsd). A skip even
/// on CI: Debian bookworm (CI's distribution) does not package it (trixie does, and there
/// .ci/install-deps installs it), and `cargo install virtiofsd` would build a daemon and its
/// dependencies (and need libseccomp-dev, libcap-ng-dev) for this one reference test; kiln's
/// own virtio-fs device is tested without it, and under Linux in the nested stage.
fn virtiofsd() -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("virtiofsd"))
        .chain([PathBuf::from("/usr/libexec/virtiofsd")])
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "virtiofsd not found on PATH or at /usr/libexec/virtiofsd (apt-get install \
             virtiofsd where Debian packages it, trixie and later; bookworm does not, so CI \
             skips this reference test)"
                .to_string()
        })
}

fn run_tool(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "{program} {args:?} failed with {}:\n{text}",
        output.status
    );
    text
}

/// The raw base image: "KILNBASE" at the start of sector 0, zeros after.
fn write_base(path: &Path) -> Vec<u8> {
    let mut base = vec![0u8; 1 << 20];
    base[..16].copy_from_slice(b"KILNBASE-sector0");
    fs::write(path, &base).expect("write the base image");
    base
}

/// The base with the guest's writes: sectors 1 and 2 full of "kiln-blk".
fn expected_disk(base: &[u8]) -> Vec<u8> {
    let mut disk = base.to_vec();
    disk[512..1536].copy_from_slice(&b"kiln-blk".repeat(128));
    disk
}

/// Checks the overlay the guest wrote through: `qemu-img check` clean, `qemu-img compare`
/// identical to the base plus the guest's writes, and the base itself byte for byte untouched.
fn assert_overlay(overlay: &Path, base: &Path, base_bytes: &[u8], context: &str) {
    let dir = overlay.parent().expect("overlay in a directory");
    let expected = dir.join("expected.raw");
    fs::write(&expected, expected_disk(base_bytes)).expect("write the expected image");
    let overlay = overlay.to_str().expect("utf-8 path");
    let check = run_tool("qemu-img", &["check", overlay]);
    assert!(check.contains("No errors were found"), "{check}\n{context}");
    let compare = run_tool(
        "qemu-img",
        &["compare", overlay, expected.to_str().expect("utf-8 path")],
    );
    assert!(
        compare.contains("Images are identical"),
        "{compare}\n{context}"
    );
    assert!(
        fs::read(base).expect("read the base image") == base_bytes,
        "the base image {} changed",
        base.display()
    );
}

#[test]
fn virtio_guest_writes_through_a_cow_overlay() {
    let kernel = or_skip!(runnable_guest());
    or_skip!(on_path("qemu-img"));
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.raw");
    let overlay = dir.path().join("overlay.qcow2");
    let base_bytes = write_base(&base);
    let cfg = VmConfig::new(kernel)
        .memory_mib(MEMORY_MIB)
        .virtio_cmdline(true)
        .rng(false)
        .disk(DiskSpec {
            path: base.clone(),
            mode: DiskMode::KeptOverlay(overlay.clone()),
        });
    let boot = boot(cfg);
    let mut expected = vec!["virtio devices=1".to_string(), probe_line(0, 2)];
    expected.extend(lines(&[
        "blk capacity=2048",
        // GET_ID: kiln's serial is the image's file name.
        "blk read=KILNBASE wrote=2 id=base.raw",
        "virtio done",
    ]));
    assert_console(&boot, &expected);
    assert_exit(&boot, 0);
    assert_overlay(&overlay, &base, &base_bytes, &boot.context());
}

#[test]
fn virtio_guest_sees_a_read_only_disk() {
    let kernel = or_skip!(runnable_guest());
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.raw");
    let base_bytes = write_base(&base);
    let cfg = VmConfig::new(kernel)
        .memory_mib(MEMORY_MIB)
        .virtio_cmdline(true)
        .rng(false)
        .disk(DiskSpec {
            path: base.clone(),
            mode: DiskMode::ReadOnly,
        });
    let boot = boot(cfg);
    let mut expected = vec!["virtio devices=1".to_string(), probe_line(0, 2)];
    expected.push("virtio error: blk: the device is read-only (VIRTIO_BLK_F_RO)".to_string());
    assert_console(&boot, &expected);
    assert_exit(&boot, 1);
    assert!(fs::read(&base).expect("read the base") == base_bytes);
}

// ---- the guest against the reference VMM (QEMU) ----

/// Runs the PVH-shim build of the guest under QEMU's microvm (TCG, virtio-mmio version 2) with
/// `extra` devices, killing it after 30 s; asserts it wrote 0 to isa-debug-exit and returns the
/// console and a description of the run for messages.
fn qemu_run(kernel: &Path, cmdline: &str, extra: &[&str]) -> (String, String) {
    let mut child = Command::new(common::qemu().expect("checked by the caller"))
        .args(["-M", "microvm,acpi=off,memory-backend=mem", "-m", "64M"])
        // vhost-user back ends map guest RAM, so it must be a shared memfd.
        .args(["-object", "memory-backend-memfd,id=mem,size=64M,share=on"])
        .args(["-accel", "tcg", "-display", "none", "-monitor", "none"])
        .args(["-no-reboot", "-serial", "stdio"])
        .args(["-device", "isa-debug-exit,iobase=0x501,iosize=1"])
        .args(["-global", "virtio-mmio.force-legacy=false"])
        .args(extra)
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run qemu");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait for qemu").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().expect("collect qemu output");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let context = format!(
        "QEMU ended with {}; console:\n{text}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    // isa-debug-exit: QEMU exits with (status << 1) | 1.
    assert_eq!(output.status.code(), Some(1), "{context}");
    (text, context)
}

/// A child process killed when the test ends, pass or fail.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn qemu_reference_rng_and_blk() {
    or_skip!(common::qemu());
    or_skip!(on_path("qemu-img"));
    let kernel = or_skip!(common::build_guest_pvh_shim("virtio_guest"));
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.raw");
    let overlay = dir.path().join("overlay.qcow2");
    let base_bytes = write_base(&base);
    let (base_s, overlay_s) = (
        base.to_str().expect("utf-8"),
        overlay.to_str().expect("utf-8"),
    );
    run_tool(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", base_s, "-F", "raw", overlay_s,
        ],
    );

    let drive = format!("file={overlay_s},if=none,id=d0,format=qcow2");
    let (text, context) = qemu_run(
        &kernel,
        "virtio test",
        &[
            "-device",
            "virtio-rng-device",
            "-drive",
            &drive,
            "-device",
            "virtio-blk-device,drive=d0,serial=kiln-test",
        ],
    );

    // QEMU places its windows itself (512@0xfeb00e00:12 and so on): check only their shape.
    let got: Vec<&str> = text.lines().collect();
    assert_eq!(got.len(), 7, "{context}");
    assert_eq!(got[0], "virtio devices=2", "{context}");
    for (line, id) in [(got[1], "id=4"), (got[3], "id=2")] {
        assert!(
            line.starts_with("virtio ") && line.contains(" size=0x200 ") && line.ends_with(id),
            "probe line {line:?}; {context}"
        );
    }
    assert!(got[2].starts_with("rng ok len=64 nonzero="), "{context}");
    assert_eq!(got[4], "blk capacity=2048", "{context}");
    assert_eq!(
        got[5], "blk read=KILNBASE wrote=2 id=kiln-test",
        "{context}"
    );
    assert_eq!(got[6], "virtio done", "{context}");

    assert_overlay(&overlay, &base, &base_bytes, &context);
}

/// The vsock driver against an independent device: rust-vmm's vhost-device-vsock (the same
/// `<uds>_<port>` host layout as kiln) behind QEMU's vhost-user-vsock-device.
#[test]
fn qemu_reference_vsock() {
    or_skip!(common::qemu());
    // A skip even on CI: no Debian release packages it, and `cargo install vhost-device-vsock`
    // builds a daemon with its whole dependency tree (minutes of CI time) for this one
    // reference test; kiln's own vsock device is tested without it, and under Linux (the
    // agent's transport) in the nested stage.
    or_skip!(found_on_path("vhost-device-vsock")
        .then_some(())
        .ok_or_else(|| {
            "vhost-device-vsock not found on PATH (cargo install vhost-device-vsock; CI does not \
         install it: not packaged by Debian, and building it costs minutes for one reference test)"
                .to_string()
        }));
    let kernel = or_skip!(common::build_guest_pvh_shim("virtio_guest"));
    let dir = tempfile::tempdir().expect("tempdir");
    let vhost = dir.path().join("vhost-user.sock");
    let uds = dir.path().join("vsock.sock");
    let listener = host_listener(&uds, VSOCK_PORT);
    let _backend = KillOnDrop(
        Command::new("vhost-device-vsock")
            .args(["--guest-cid", "3", "--socket"])
            .arg(&vhost)
            .arg("--uds-path")
            .arg(&uds)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run vhost-device-vsock"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !vhost.exists() {
        assert!(
            Instant::now() < deadline,
            "vhost-device-vsock did not create {}",
            vhost.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let chardev = format!("socket,id=vhost0,path={}", vhost.display());
    let (text, context) = qemu_run(
        &kernel,
        &format!("kiln.vsock_port={VSOCK_PORT}"),
        &[
            "-chardev",
            &chardev,
            "-device",
            "vhost-user-vsock-device,chardev=vhost0",
        ],
    );
    let got: Vec<&str> = text.lines().collect();
    assert_eq!(got.len(), 7, "{context}");
    assert_eq!(got[0], "virtio devices=1", "{context}");
    assert!(
        got[1].starts_with("virtio 0: base=") && got[1].ends_with(" id=19"),
        "{context}"
    );
    assert_eq!(
        got[2..],
        [
            "vsock cid=3",
            "vsock connected port=5005",
            "vsock got=pong from host",
            "vsock closed",
            "virtio done"
        ],
        "{context}"
    );
    let sent = listener
        .join()
        .expect("listener thread")
        .unwrap_or_else(|e| panic!("{e}; {context}"));
    assert_eq!(sent, PING, "bytes the host listener received");
}

/// The virtio-fs driver against an independent FUSE server: virtiofsd behind QEMU's
/// vhost-user-fs-device.
#[test]
fn qemu_reference_virtio_fs() {
    or_skip!(common::qemu());
    let virtiofsd = or_skip!(virtiofsd());
    let kernel = or_skip!(common::build_guest_pvh_shim("virtio_guest"));
    let dir = tempfile::tempdir().expect("tempdir");
    let share = share_dir(dir.path());
    let vhost = dir.path().join("virtiofsd.sock");
    let _backend = KillOnDrop(
        Command::new(&virtiofsd)
            .arg("--socket-path")
            .arg(&vhost)
            .arg("--shared-dir")
            .arg(&share)
            // The namespace sandbox needs privileges a test run may not have.
            .args(["--sandbox", "none"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run virtiofsd"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !vhost.exists() {
        assert!(
            Instant::now() < deadline,
            "virtiofsd did not create {}",
            vhost.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let chardev = format!("socket,id=vhost0,path={}", vhost.display());
    let device = format!("vhost-user-fs-device,chardev=vhost0,tag={TAG}");
    let (text, context) = qemu_run(&kernel, "", &["-chardev", &chardev, "-device", &device]);
    let got: Vec<&str> = text.lines().collect();
    assert_eq!(got.len(), 7, "{context}");
    assert_eq!(got[0], "virtio devices=1", "{context}");
    assert!(
        got[1].starts_with("virtio 0: base=") && got[1].ends_with(" id=26"),
        "{context}"
    );
    assert_eq!(
        got[2..],
        [
            "fs tag=kilnshare",
            "fs init major=7",
            "fs read=hello from the host",
            "fs created",
            "virtio done"
        ],
        "{context}"
    );
    let created = share.join("from-guest.txt");
    assert_eq!(
        fs::read_to_string(&created).unwrap_or_else(|e| panic!("{}: {e}", created.display())),
        "written by the guest"
    );
}
