//! Helpers shared by kiln's cross-crate integration tests: building the bare-metal test guests
//! of tests/guests, and deciding whether a test can run on this machine.
//!
//! A test that cannot run here (no assembler, no usable /dev/kvm, no kernel given) prints
//! `skipped: <reason>` to stderr and returns; a guest that does not assemble is a failure.
//!
//! On CI (`CI` set) a missing tool that `.ci/install-deps` installs is a failure, never a quiet
//! skip ([`ci_requires`]): binutils, QEMU, qemu-img, iasl, nix-instantiate, docker-registry and
//! htpasswd. What CI cannot have by design stays a skip with its reason: hardware KVM (the nested
//! stage runs those tests, with `KILN_REQUIRE_LINUX_KVM` making a missing one a failure there),
//! and the reference daemons Debian bookworm does not package (virtiofsd, vhost-device-vsock).

#![allow(dead_code)]

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::SystemTime;

/// Prints `skipped: <reason>` to stderr and returns from the calling test.
#[macro_export]
macro_rules! skip {
    ($($arg:tt)*) => {{
        eprintln!("skipped: {}", format!($($arg)*));
        return;
    }};
}

/// Unwraps a `Result<T, String>` whose error says why the test cannot run here, or skips.
#[macro_export]
macro_rules! or_skip {
    ($e:expr) => {
        match $e {
            Ok(value) => value,
            Err(reason) => $crate::skip!("{}", reason),
        }
    };
}

/// Serialises builds inside one test process (tests run on several threads).
static BUILD_LOCK: Mutex<()> = Mutex::new(());

/// Directory of the guest sources and the linker script.
pub fn guests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("guests")
}

/// Assembles and links `tests/guests/<name>.S` into an ELF loaded at 1 MiB and returns its
/// path. `Err` (a reason to skip) when `as` or `ld` is missing; panics when the guest does not
/// build, since that is a bug in the guest, not in the machine.
pub fn build_guest(name: &str) -> Result<PathBuf, String> {
    build(name, &format!("{name}.elf"), &[])
}

/// Builds `<name>` with the PVH-to-64-bit shim (tests/guests/pvh_shim.S), so a reference VMM
/// that boots only PVH ELFs (QEMU) can run a 64-bit-entry guest.
pub fn build_guest_pvh_shim(name: &str) -> Result<PathBuf, String> {
    build(
        name,
        &format!("{name}-pvh-shim.elf"),
        &["--defsym", "PVH_SHIM=1"],
    )
}

fn build(name: &str, out_name: &str, as_args: &[&str]) -> Result<PathBuf, String> {
    let src_dir = guests_dir();
    let source = src_dir.join(format!("{name}.S"));
    assert!(
        source.is_file(),
        "no guest source {} (the guests are tests/guests/*.S)",
        source.display()
    );
    for tool in ["as", "ld"] {
        tool_available(tool)?;
    }

    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guests");
    fs::create_dir_all(&out_dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", out_dir.display()));
    let elf = out_dir.join(out_name);

    let _guard = BUILD_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // Guests include shared files (lib64.S, pvh32.S, ...), so any newer file in the directory
    // means a rebuild.
    if let Ok(built) = fs::metadata(&elf).and_then(|m| m.modified()) {
        if newest_mtime(&src_dir) <= built {
            return Ok(elf);
        }
    }

    // Build under process-unique names and rename, so concurrent test processes never see a
    // half-written ELF.
    let pid = std::process::id();
    let object = out_dir.join(format!("{out_name}.{pid}.o"));
    let partial = out_dir.join(format!("{out_name}.{pid}.tmp"));
    let mut assemble = Command::new("as");
    assemble
        .arg("--64")
        .arg("-I")
        .arg(&src_dir)
        .args(as_args)
        .arg("-o")
        .arg(&object)
        .arg(&source);
    run_tool(assemble, &source)?;
    let mut link = Command::new("ld");
    link.args(["-static", "-nostdlib", "-z", "noexecstack", "-T"])
        .arg(src_dir.join("guest.ld"))
        .arg("-o")
        .arg(&partial)
        .arg(&object);
    run_tool(link, &source)?;
    let _ = fs::remove_file(&object);
    fs::rename(&partial, &elf).unwrap_or_else(|e| {
        panic!(
            "cannot move {} to {}: {e}",
            partial.display(),
            elf.display()
        )
    });
    Ok(elf)
}

/// Whether this is a CI run (`CI` set, and not to "false" or "0").
pub fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// `reason` (a tool CI installs is missing) as an `Err` to skip on locally; on CI a failure:
/// .ci/install-deps installs it, so its absence is a broken CI machine, not a reason to pass.
pub fn ci_requires<T>(reason: String) -> Result<T, String> {
    if on_ci() {
        panic!("CI is set and {reason}; .ci/install-deps installs it, so this is a failure");
    }
    Err(reason)
}

/// `Ok` when `tool` runs; otherwise why not (a failure on CI, which installs binutils).
pub fn tool_available(tool: &str) -> Result<(), String> {
    match Command::new(tool).arg("--version").output() {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => ci_requires(format!(
            "`{tool}` not found on PATH (install binutils to build the test guests)"
        )),
        Err(e) => ci_requires(format!("cannot run `{tool}`: {e}")),
    }
}

fn run_tool(mut command: Command, source: &Path) -> Result<(), String> {
    let output = match command.output() {
        Ok(output) => output,
        Err(e) => return Err(format!("cannot run {command:?}: {e}")),
    };
    assert!(
        output.status.success(),
        "building guest {} failed: {command:?} exited with {}\n{}",
        source.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

fn newest_mtime(dir: &Path) -> SystemTime {
    let entries =
        fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    entries
        .filter_map(|entry| entry.ok()?.metadata().ok()?.modified().ok())
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// `Ok` when /dev/kvm opens read-write; otherwise why not.
pub fn kvm_usable() -> Result<(), String> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("/dev/kvm cannot be opened read-write: {e}"))
}

/// `Ok` when /dev/kvm is hardware-assisted KVM (VMX or SVM, not the PVM software fallback),
/// which a Linux guest needs to boot in reasonable time; otherwise why not.
pub fn hardware_kvm() -> Result<(), String> {
    let found = linux_capable_kvm();
    // The nested stage sets this: there a missing KVM is a failure, never a skip.
    if let (Err(reason), Some(_)) = (&found, std::env::var_os("KILN_REQUIRE_LINUX_KVM")) {
        panic!("KILN_REQUIRE_LINUX_KVM is set but this KVM cannot boot Linux: {reason}");
    }
    found
}

fn linux_capable_kvm() -> Result<(), String> {
    kvm_usable()?;
    let cpuinfo = fs::read_to_string("/proc/cpuinfo")
        .map_err(|e| format!("cannot read /proc/cpuinfo: {e}"))?;
    let hardware = cpuinfo
        .lines()
        .filter(|line| line.starts_with("flags"))
        .any(|line| line.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !hardware {
        return Err("the CPU has no vmx/svm flag: /dev/kvm is not hardware KVM".to_string());
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Err("/dev/kvm is kvm_pvm (nested, emulated guest code), not hardware KVM".into());
    }
    Ok(())
}

/// Path of `qemu-system-x86_64` on PATH, the reference VMM the guests are checked against.
pub fn qemu() -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("qemu-system-x86_64"))
        .find(|candidate| candidate.is_file())
        .map_or_else(
            || {
                ci_requires(
                    "qemu-system-x86_64 not found on PATH (apt-get install qemu-system-x86)".into(),
                )
            },
            Ok,
        )
}

/// The scenario ids of a corpus directory, with the class named on an `# expected: CLASS` line.
pub fn corpus(dir: &Path) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension() != Some("toml".as_ref()) || path.ends_with("kiln.toml") {
            continue;
        }
        let text = fs::read_to_string(&path).unwrap();
        let id = text
            .lines()
            .find_map(|l| l.strip_prefix("id = \""))
            .and_then(|l| l.strip_suffix('"'))
            .unwrap_or_else(|| panic!("{}: no id line", path.display()))
            .to_string();
        let expected = text
            .lines()
            .find_map(|l| l.strip_prefix("# expected: "))
            .and_then(|l| l.split_whitespace().next())
            .map(str::to_string);
        out.push((id, expected));
    }
    out.sort();
    out
}

/// A finished command for an assertion message: its exit status, stdout and stderr.
pub fn describe(out: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
