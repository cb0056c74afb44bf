//! Boots the bare-metal test guests of tests/guests through kiln's VMM (`kiln::vmm`) and through
//! the `kiln boot` command, and asserts on their exact serial output, exit reasons and phases.
//!
//! The guests were checked against a reference VMM before being trusted against kiln, so a
//! wrong line here points at kiln, not at the guest. Checked with QEMU 7.2 (Debian 12), both
//! `-accel tcg` and `-accel kvm`, `qemu-system-x86_64 -M microvm,acpi=off -m 64M -display none
//! -monitor none -no-reboot -serial stdio -device isa-debug-exit,iobase=0x501,iosize=1
//! -kernel <elf> -append <cmdline> [-initrd <file>]`:
//! - pvh_info: `PVH magic=0x336ec578`, `cmdline=hello world`, QEMU's six memmap entries (RAM
//!   `addr=0x0 size=0x9fc00 type=1` .. `addr=0x100000 size=0x3f00000 type=1`), `modules=1`,
//!   `module addr=0x3fff000 size=0x16 first=hello-in` for a 22-byte initrd, `rsdp=0x0`
//!   (`rsdp=0xf34d0` with `acpi=on`), `PVH done`, status 0 (QEMU exit (0<<1)|1 = 1).
//! - the 64-bit-entry guests, built with tests/guests/pvh_shim.S (PVH entry that turns
//!   hvm_start_info into boot_params and enters `_start` as kiln does): boot64_info printed the
//!   same map as e820 lines, the initrd line, `initrd none` without one; exit_code gave status 7
//!   for `a=1 kiln.exit=7`, 5 for `kiln.exit=5`, 42 (the default) for no command line, for
//!   `xkiln.exit=5` and for `kiln.exit=`, 44 for `kiln.exit=300`; spin ran until `timeout 5`
//!   killed it; triple_fault ended at once, `-d int` logging `check_exception old: 0x8 new 0xd`
//!   then `Triple fault`; reset (under `-M pc`: microvm has no i8042) ended in 0.14 s; smp
//!   printed `cpus=1`, `cpus=2`, `cpus=4` under `-smp 1/2/4`, with and without `kiln.cpus=`,
//!   with TCG and with KVM (kvm_pvm).
//!
//! The `qemu_reference_*` tests below repeat the PVH and shim checks wherever QEMU is installed.

#[macro_use]
mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln::vmm::{ExitReason, Phase, Vm, VmConfig};

/// Guest memory of the tests, and the map kiln must describe for it.
const MEMORY_MIB: u64 = 64;
/// Start of kiln's default command line; the test's own parts come after it.
const DEFAULT_CMDLINE_PREFIX: &str = "console=ttyS0 reboot=k panic=-1";
/// Contents of the initrd the tests hand over: the guests print its first 8 bytes.
const INITRD_HEAD: &[u8] = b"KILNINIT";
const INITRD_SIZE: usize = 5000;

/// What one boot through kiln's VMM produced.
struct Boot {
    exit: ExitReason,
    text: String,
    phases: Vec<Phase>,
    elapsed: Duration,
}

/// Starts `cfg` and waits at most `timeout` for the guest to end.
fn boot(cfg: VmConfig, timeout: Duration) -> Boot {
    let started = Instant::now();
    let mut vm = Vm::start(cfg).unwrap_or_else(|e| panic!("Vm::start failed: {e}"));
    let exit = vm.wait(timeout);
    let elapsed = started.elapsed();
    Boot {
        exit,
        text: vm.console().text(),
        phases: vm.phases(),
        elapsed,
    }
}

/// Builds the guest, or says why this machine cannot run a guest test.
fn runnable_guest(name: &str) -> Result<PathBuf, String> {
    common::kvm_usable()?;
    common::build_guest(name)
}

/// Writes an initrd of INITRD_SIZE bytes starting with INITRD_HEAD.
fn write_initrd(dir: &Path) -> PathBuf {
    let mut contents = INITRD_HEAD.to_vec();
    contents.resize(INITRD_SIZE, b'.');
    let path = dir.join("initrd.img");
    fs::write(&path, contents).expect("write initrd");
    path
}

/// The memory map lines kiln must report for a guest of `mib` MiB (after the given prefix).
fn expected_map(prefix: &str, mib: u64) -> Vec<String> {
    vec![
        format!("{prefix}addr=0x0 size=0x9fc00 type=1"),
        format!("{prefix}addr=0xe0000 size=0x20000 type=2"),
        format!(
            "{prefix}addr=0x100000 size={:#x} type=1",
            (mib << 20) - 0x10_0000
        ),
    ]
}

/// Where kiln puts an initrd of `size` bytes: page-aligned at the top of low memory.
fn expected_initrd_addr(mib: u64, size: u64) -> u64 {
    ((mib << 20) - size) & !0xfff
}

/// Asserts that the console is exactly `expected`, except the line starting with `cmdline=`,
/// which must start with kiln's defaults and end with " <user_cmdline>".
fn assert_console(boot: &Boot, expected: &[String], user_cmdline: &str) {
    let text = &boot.text;
    let context = format!(
        "console:\n{text}\n-- the VM ended with {:?} after {:?}",
        boot.exit, boot.elapsed
    );
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        text.ends_with('\n'),
        "console does not end with a newline; {context}"
    );
    assert_eq!(
        lines.len(),
        expected.len(),
        "console has {} lines, expected {}; {context}",
        lines.len(),
        expected.len()
    );
    for (got, want) in lines.iter().zip(expected) {
        if want == "cmdline=" {
            let cmdline = got
                .strip_prefix("cmdline=")
                .unwrap_or_else(|| panic!("expected the cmdline line, got {got:?}; {context}"));
            assert!(
                cmdline.starts_with(DEFAULT_CMDLINE_PREFIX),
                "command line {cmdline:?} does not start with kiln's defaults \
                 {DEFAULT_CMDLINE_PREFIX:?}"
            );
            assert!(
                cmdline.ends_with(&format!(" {user_cmdline}")),
                "command line {cmdline:?} does not end with the test's part {user_cmdline:?}"
            );
        } else {
            assert_eq!(*got, want.as_str(), "console line differs; {context}");
        }
    }
}

fn assert_exit_port(boot: &Boot, status: u8) {
    assert!(
        matches!(boot.exit, ExitReason::ExitPort(s) if s == status),
        "expected ExitPort({status}), got {:?}; console:\n{}",
        boot.exit,
        boot.text
    );
    assert_eq!(boot.exit.exit_code(), i32::from(status));
}

#[test]
fn pvh_guest_sees_start_info() {
    let kernel = or_skip!(runnable_guest("pvh_info"));
    let dir = tempfile::tempdir().expect("tempdir");
    let initrd = write_initrd(dir.path());
    let user = "kiln.test=pvh hello";
    let cfg = VmConfig::new(kernel)
        .initrd(initrd)
        .cmdline(user)
        .memory_mib(MEMORY_MIB as _)
        .vcpus(1);
    let boot = boot(cfg, Duration::from_secs(10));

    let mut expected = vec![
        "PVH magic=0x336ec578".to_string(),
        "cmdline=".to_string(),
        "memmap entries=3".to_string(),
    ];
    expected.extend(expected_map("memmap ", MEMORY_MIB));
    expected.push("modules=1".to_string());
    expected.push(format!(
        "module addr={:#x} size={:#x} first=KILNINIT",
        expected_initrd_addr(MEMORY_MIB, INITRD_SIZE as u64),
        INITRD_SIZE
    ));
    expected.push("rsdp=0xe0000".to_string());
    expected.push("PVH done".to_string());
    assert_console(&boot, &expected, user);
    assert_exit_port(&boot, 0);
}

#[test]
fn boot64_guest_sees_boot_params() {
    let kernel = or_skip!(runnable_guest("boot64_info"));
    let dir = tempfile::tempdir().expect("tempdir");
    let initrd = write_initrd(dir.path());
    let user = "kiln.test=boot64";
    let cfg = VmConfig::new(kernel)
        .initrd(initrd)
        .cmdline(user)
        .memory_mib(MEMORY_MIB as _)
        .vcpus(1);
    let boot = boot(cfg, Duration::from_secs(10));

    let mut expected = vec![
        "BOOT64 hdr=0x53726448".to_string(),
        "cmdline=".to_string(),
        "e820 entries=3".to_string(),
    ];
    expected.extend(expected_map("e820 ", MEMORY_MIB));
    expected.push(format!(
        "initrd addr={:#x} size={:#x} first=KILNINIT",
        expected_initrd_addr(MEMORY_MIB, INITRD_SIZE as u64),
        INITRD_SIZE
    ));
    expected.push("rsdp=0xe0000".to_string());
    expected.push("BOOT64 done".to_string());
    assert_console(&boot, &expected, user);
    assert_exit_port(&boot, 0);
}

#[test]
fn boot64_guest_without_initrd_and_more_memory() {
    let kernel = or_skip!(runnable_guest("boot64_info"));
    let mib = 256;
    let user = "second";
    let cfg = VmConfig::new(kernel)
        .cmdline(user)
        .memory_mib(mib as _)
        .vcpus(1);
    let boot = boot(cfg, Duration::from_secs(10));

    let mut expected = vec![
        "BOOT64 hdr=0x53726448".to_string(),
        "cmdline=".to_string(),
        "e820 entries=3".to_string(),
    ];
    expected.extend(expected_map("e820 ", mib));
    expected.push("initrd none".to_string());
    expected.push("rsdp=0xe0000".to_string());
    expected.push("BOOT64 done".to_string());
    assert_console(&boot, &expected, user);
    assert_exit_port(&boot, 0);
}

#[test]
fn exit_port_status_and_phases() {
    let kernel = or_skip!(runnable_guest("exit_code"));
    let cfg = VmConfig::new(kernel)
        .cmdline("kiln.exit=7")
        .memory_mib(MEMORY_MIB as _)
        .vcpus(1);
    let boot = boot(cfg, Duration::from_secs(10));

    assert_eq!(boot.text, "exit guest\n");
    assert_exit_port(&boot, 7);
    let ids: Vec<u32> = boot.phases.iter().map(|p| p.id).collect();
    assert_eq!(ids, [1, 2, 3], "phases: {:?}", boot.phases);
    assert!(
        boot.phases.windows(2).all(|w| w[0].at <= w[1].at),
        "phase times go backwards: {:?}",
        boot.phases
    );
    assert!(
        boot.phases.iter().all(|p| p.at <= boot.elapsed),
        "a phase is later than the end of the boot ({:?}): {:?}",
        boot.elapsed,
        boot.phases
    );
}

#[test]
fn exit_port_default_status() {
    let kernel = or_skip!(runnable_guest("exit_code"));
    let cfg = VmConfig::new(kernel).memory_mib(MEMORY_MIB as _).vcpus(1);
    let boot = boot(cfg, Duration::from_secs(10));
    assert_eq!(boot.text, "exit guest\n");
    assert_exit_port(&boot, 0x2a);
}

#[test]
fn i8042_reset_ends_the_vm() {
    let kernel = or_skip!(runnable_guest("reset"));
    let cfg = VmConfig::new(kernel).memory_mib(MEMORY_MIB as _).vcpus(1);
    let boot = boot(cfg, Duration::from_secs(10));
    assert_eq!(boot.text, "reset guest\n");
    assert!(
        matches!(boot.exit, ExitReason::Reset),
        "expected Reset, got {:?} after {:?}; console:\n{}",
        boot.exit,
        boot.elapsed,
        boot.text
    );
    assert_eq!(boot.exit.exit_code(), 0);
}

#[test]
fn spinning_guest_times_out() {
    let kernel = or_skip!(runnable_guest("spin"));
    let timeout = Duration::from_secs(2);
    let cfg = VmConfig::new(kernel).memory_mib(MEMORY_MIB as _).vcpus(1);
    let boot = boot(cfg, timeout);
    assert_eq!(boot.text, "spin guest\n");
    assert!(
        matches!(boot.exit, ExitReason::Timeout),
        "expected Timeout, got {:?}; console:\n{}",
        boot.exit,
        boot.text
    );
    assert_eq!(boot.exit.exit_code(), 124);
    assert!(
        boot.elapsed >= timeout && boot.elapsed < timeout + Duration::from_secs(1),
        "a {timeout:?} timeout took {:?}",
        boot.elapsed
    );
}

#[test]
fn smp_guest_starts_the_other_vcpus() {
    let kernel = or_skip!(runnable_guest("smp"));
    let cfg = VmConfig::new(kernel)
        .cmdline("kiln.cpus=2")
        .memory_mib(MEMORY_MIB as _)
        .vcpus(2);
    let boot = boot(cfg, Duration::from_secs(10));
    assert_eq!(boot.text, "cpus=2\n", "exit {:?}", boot.exit);
    assert_exit_port(&boot, 0);
}

#[test]
fn triple_fault_is_reported() {
    let kernel = or_skip!(runnable_guest("triple_fault"));
    let cfg = VmConfig::new(kernel).memory_mib(MEMORY_MIB as _).vcpus(1);
    let boot = boot(cfg, Duration::from_secs(10));
    assert_eq!(boot.text, "triple fault guest\n");
    assert!(
        matches!(boot.exit, ExitReason::TripleFault),
        "expected TripleFault, got {:?} after {:?}; console:\n{}",
        boot.exit,
        boot.elapsed,
        boot.text
    );
}

/// Boots a real Linux kernel to a console marker: needs a KVM that boots Linux (hardware, or
/// the nested stage's L1; a Linux guest is far too slow under kvm_pvm's instruction emulation).
/// The kernel is `KILN_TEST_KERNEL` (with `KILN_TEST_INITRD`) or else the default guest's.
#[test]
fn linux_boots_to_marker() {
    or_skip!(common::hardware_kvm());
    let (kernel, initrd) = match std::env::var_os("KILN_TEST_KERNEL") {
        Some(kernel) => (
            PathBuf::from(kernel),
            std::env::var_os("KILN_TEST_INITRD").map(PathBuf::from),
        ),
        None => {
            let guest = kiln::guest::default_guest()
                .unwrap_or_else(|e| panic!("the default guest cannot be built: {e}"));
            (guest.kernel, Some(guest.initrd))
        }
    };
    let marker = std::env::var("KILN_TEST_MARKER").unwrap_or_else(|_| "Linux version".into());
    let mut cfg = VmConfig::new(kernel)
        .cmdline("console=ttyS0")
        .memory_mib(256)
        .vcpus(1);
    if let Some(initrd) = initrd {
        cfg = cfg.initrd(initrd);
    }
    // Any end (a panic without a root file system resets with kiln's `panic=-1 reboot=k`) is
    // fine as long as the marker was printed first; once it is, the VM is stopped.
    let started = Instant::now();
    let mut vm = Vm::start(cfg).unwrap_or_else(|e| panic!("Vm::start failed: {e}"));
    while !vm.console().text().contains(&marker)
        && vm.exit_reason().is_none()
        && started.elapsed() < Duration::from_secs(120)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = vm.console().text();
    let exit = vm.kill();
    assert!(
        text.contains(&marker),
        "marker {marker:?} not on the console (exit {exit:?} after {:?}):\n{text}",
        started.elapsed(),
    );
}

// ---- the `kiln boot` command ----

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("run kiln")
}

fn describe(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn cli_boot_exit_status() {
    let kernel = or_skip!(runnable_guest("exit_code"));
    let kernel = kernel.to_str().expect("utf-8 path");
    let output = kiln(&[
        "boot",
        "--kernel",
        kernel,
        "--cmdline",
        "kiln.exit=5",
        "--timeout",
        "10",
    ]);
    assert_eq!(output.status.code(), Some(5), "{}", describe(&output));
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("exit guest"),
        "{}",
        describe(&output)
    );
}

#[test]
fn cli_boot_timeout() {
    let kernel = or_skip!(runnable_guest("spin"));
    let kernel = kernel.to_str().expect("utf-8 path");
    let started = Instant::now();
    let output = kiln(&["boot", "--kernel", kernel, "--timeout", "1"]);
    assert_eq!(output.status.code(), Some(124), "{}", describe(&output));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a 1 s timeout took {:?}",
        started.elapsed()
    );
}

#[test]
fn cli_boot_rejects_a_non_elf_kernel() {
    or_skip!(common::kvm_usable());
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = dir.path().join("not-a-kernel.txt");
    fs::write(&kernel, "this is not an ELF file\n").expect("write kernel");
    let kernel = kernel.to_str().expect("utf-8 path");
    let output = kiln(&["boot", "--kernel", kernel, "--timeout", "10"]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one error line; {}",
        describe(&output)
    );
    assert!(
        lines[0].contains(kernel),
        "the error does not name {kernel}; {}",
        describe(&output)
    );
}

#[test]
fn cli_boot_rejects_zero_vcpus() {
    // A kernel that exists, so only the vCPU count is wrong.
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = dir.path().join("kernel");
    fs::write(&kernel, "not read: the arguments are rejected first\n").expect("write kernel");
    let kernel = kernel.to_str().expect("utf-8 path");
    let output = kiln(&["boot", "--kernel", kernel, "--vcpus", "0", "--timeout", "1"]);
    assert_eq!(output.status.code(), Some(2), "{}", describe(&output));
    assert!(
        !output.stderr.is_empty(),
        "no usage message; {}",
        describe(&output)
    );
}

// ---- the guests against the reference VMM (QEMU) ----

/// What one boot under QEMU produced.
struct QemuRun {
    text: String,
    /// The byte the guest wrote to isa-debug-exit (QEMU exits with `(value << 1) | 1`).
    status: Option<i32>,
    timed_out: bool,
}

/// Runs a PVH ELF under QEMU's microvm (TCG), killing it after 20 s.
fn qemu_run(kernel: &Path, cmdline: &str, initrd: Option<&Path>, extra: &[&str]) -> QemuRun {
    let qemu = common::qemu().expect("checked by the caller");
    let mut command = Command::new(qemu);
    command
        .args(["-M", "microvm,acpi=off", "-accel", "tcg", "-m", "64M"])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .args([
            "-serial",
            "stdio",
            "-device",
            "isa-debug-exit,iobase=0x501,iosize=1",
        ])
        .args(extra)
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", cmdline]);
    if let Some(initrd) = initrd {
        command.arg("-initrd").arg(initrd);
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run qemu");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut timed_out = false;
    while child.try_wait().expect("wait for qemu").is_none() {
        if Instant::now() > deadline {
            timed_out = true;
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().expect("collect qemu output");
    let status = output
        .status
        .code()
        .filter(|code| code & 1 == 1)
        .map(|code| code >> 1);
    QemuRun {
        text: String::from_utf8_lossy(&output.stdout).into_owned(),
        status,
        timed_out,
    }
}

fn qemu_reference() -> Result<(), String> {
    common::qemu()?;
    Ok(())
}

#[test]
fn qemu_reference_pvh_and_boot64_guests_agree() {
    or_skip!(qemu_reference());
    let pvh = or_skip!(common::build_guest("pvh_info"));
    let boot64 = or_skip!(common::build_guest_pvh_shim("boot64_info"));
    let dir = tempfile::tempdir().expect("tempdir");
    let initrd = write_initrd(dir.path());

    let run = qemu_run(&pvh, "hello world", Some(&initrd), &[]);
    let pvh_text = run.text;
    assert_eq!(run.status, Some(0), "pvh_info under QEMU:\n{pvh_text}");
    let pvh_lines: Vec<&str> = pvh_text.lines().collect();
    assert_eq!(
        pvh_lines.first(),
        Some(&"PVH magic=0x336ec578"),
        "{pvh_text}"
    );
    assert_eq!(pvh_lines.get(1), Some(&"cmdline=hello world"), "{pvh_text}");
    assert_eq!(pvh_lines.last(), Some(&"PVH done"), "{pvh_text}");
    let module = pvh_lines
        .iter()
        .find(|l| l.starts_with("module addr=0x"))
        .unwrap_or_else(|| panic!("no module line:\n{pvh_text}"));
    assert!(
        module.ends_with(&format!(" size={INITRD_SIZE:#x} first=KILNINIT")),
        "{module}"
    );
    assert!(
        pvh_lines.contains(&"memmap addr=0x100000 size=0x3f00000 type=1"),
        "{pvh_text}"
    );

    // The shim hands QEMU's PVH data to boot64_info as boot_params: both guests must print the
    // same map, initrd and RSDP.
    let run = qemu_run(&boot64, "hello world", Some(&initrd), &[]);
    let b64_text = run.text;
    assert_eq!(run.status, Some(0), "boot64_info under QEMU:\n{b64_text}");
    let b64_lines: Vec<&str> = b64_text.lines().collect();
    assert_eq!(
        b64_lines.first(),
        Some(&"BOOT64 hdr=0x53726448"),
        "{b64_text}"
    );
    assert_eq!(b64_lines.get(1), Some(&"cmdline=hello world"), "{b64_text}");
    assert_eq!(b64_lines.last(), Some(&"BOOT64 done"), "{b64_text}");
    let pvh_map: Vec<String> = pvh_lines
        .iter()
        .filter_map(|l| l.strip_prefix("memmap "))
        .map(String::from)
        .collect();
    let b64_map: Vec<String> = b64_lines
        .iter()
        .filter_map(|l| l.strip_prefix("e820 "))
        .map(String::from)
        .collect();
    assert_eq!(b64_map, pvh_map);
    assert_eq!(
        b64_lines.iter().find(|l| l.starts_with("initrd ")),
        Some(&module.replacen("module", "initrd", 1).as_str())
    );
}

#[test]
fn qemu_reference_exit_code_parses_the_cmdline() {
    or_skip!(qemu_reference());
    let guest = or_skip!(common::build_guest_pvh_shim("exit_code"));
    for (cmdline, want) in [
        ("a=1 kiln.exit=7", 7),
        ("kiln.exit=5 b", 5),
        ("", 0x2a),
        ("xkiln.exit=5", 0x2a),
        ("kiln.exit=", 0x2a),
        ("kiln.exit=300", 300 & 0xff),
    ] {
        let run = qemu_run(&guest, cmdline, None, &[]);
        assert_eq!(run.text, "exit guest\n", "cmdline {cmdline:?}");
        assert_eq!(run.status, Some(want), "cmdline {cmdline:?}");
    }
}

#[test]
fn qemu_reference_triple_fault_and_smp() {
    or_skip!(qemu_reference());
    // With -no-reboot, QEMU exits (status 0, not through isa-debug-exit) on the triple fault.
    let guest = or_skip!(common::build_guest_pvh_shim("triple_fault"));
    let run = qemu_run(&guest, "", None, &[]);
    assert_eq!(run.text, "triple fault guest\n");
    assert!(
        !run.timed_out && run.status.is_none(),
        "triple_fault did not reset QEMU"
    );

    let guest = or_skip!(common::build_guest_pvh_shim("smp"));
    for cpus in [1, 2, 4] {
        let smp = cpus.to_string();
        let run = qemu_run(&guest, &format!("kiln.cpus={cpus}"), None, &["-smp", &smp]);
        assert_eq!(run.text, format!("cpus={cpus}\n"));
        assert_eq!(run.status, Some(0));
    }
}

#[test]
fn cli_boot_of_a_linux_kernel_fails_at_once_on_a_kvm_that_cannot_boot_linux() {
    if kiln::vmm::kvm::probe().linux_capable() {
        skip!("this host's KVM boots Linux: a bzImage would really boot here");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = dir.path().join("bzImage");
    let mut image = vec![0u8; 4096];
    image[0x202..0x206].copy_from_slice(b"HdrS");
    fs::write(&kernel, image).expect("write kernel");
    let started = Instant::now();
    let output = kiln(&[
        "boot",
        "--kernel",
        kernel.to_str().expect("utf-8"),
        "--timeout",
        "30",
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("is a Linux kernel") && stderr.contains("cannot boot Linux guests"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn cli_boot_refuses_a_timeout_too_large_for_a_duration() {
    let output = kiln(&["boot", "--kernel", "/nonexistent", "--timeout", "2e19"]);
    assert_eq!(output.status.code(), Some(2), "{}", describe(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("--timeout 20000000000000000000: too large"),
        "{}",
        describe(&output)
    );
}

/// `kiln boot --console FILE --vsock SOCK --disk IMG` on the spinning guest, with its temporary
/// overlay under `tmp`; returns once the guest has printed and the socket exists.
fn spawn_spinning_boot(kernel: &str, dir: &Path, tmp: &Path) -> std::process::Child {
    let console = dir.join("console.txt");
    let _ = fs::remove_file(&console);
    let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["boot", "--kernel", kernel, "--timeout", "60", "--console"])
        .arg(&console)
        .arg("--vsock")
        .arg(dir.join("vsock.sock"))
        .arg("--disk")
        .arg(dir.join("disk.img"))
        .env("TMPDIR", tmp)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln boot");
    let started = Instant::now();
    while !(fs::read_to_string(&console).is_ok_and(|t| t.contains("spin guest"))
        && dir.join("vsock.sock").exists())
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the spin guest did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Ctrl-C (and SIGTERM) on `kiln boot`: exit 130, the VM killed, its vsock socket and temporary
/// overlay gone, so a second run with the same paths works.
#[test]
fn cli_boot_ctrl_c_kills_the_vm_and_cleans_up() {
    let kernel = or_skip!(runnable_guest("spin"));
    let kernel = kernel.to_str().expect("utf-8 path");
    let dir = tempfile::tempdir().expect("tempdir");
    let tmp = dir.path().join("tmp");
    fs::create_dir(&tmp).expect("mkdir");
    fs::write(dir.path().join("disk.img"), vec![0u8; 1 << 20]).expect("disk");
    for signal in ["-INT", "-TERM", "-INT"] {
        let child = spawn_spinning_boot(kernel, dir.path(), &tmp);
        let sent = Command::new("kill")
            .arg(signal)
            .arg(child.id().to_string())
            .status()
            .expect("kill");
        assert!(sent.success());
        let started = Instant::now();
        let output = child.wait_with_output().expect("wait");
        assert_eq!(
            output.status.code(),
            Some(130),
            "{signal}: {}",
            describe(&output)
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            !dir.path().join("vsock.sock").exists(),
            "{signal}: the vsock socket is left"
        );
        let left: Vec<_> = fs::read_dir(&tmp).expect("ls").collect();
        assert!(left.is_empty(), "{signal}: left in TMPDIR: {left:?}");
    }
}

/// Durations that are not a number of seconds a deadline can hold: a usage error, never a panic.
#[test]
fn cli_durations_out_of_range_are_usage_errors() {
    for bad in ["2e19", "-1", "nan", "inf", "1e400"] {
        let output = kiln(&["boot", "--kernel", "/nonexistent", "--timeout", bad]);
        assert_eq!(
            output.status.code(),
            Some(2),
            "--timeout {bad}: {}",
            describe(&output)
        );
        assert!(!String::from_utf8_lossy(&output.stderr).contains("panicked"));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for bad in ["9000000000000000000", "1e300", "\"300000000 years\"", "-5"] {
        let path = dir.path().join("s.toml");
        fs::write(&path, format!("id = \"t\"\ntimeout = {bad}\n")).expect("write");
        let output = kiln(&["scenario", "check", path.to_str().expect("utf-8")]);
        assert_eq!(
            output.status.code(),
            Some(2),
            "timeout = {bad}: {}",
            describe(&output)
        );
        assert!(!String::from_utf8_lossy(&output.stderr).contains("panicked"));
    }
}
