//! The QEMU backend: `qemu-system-x86_64` with direct kernel boot, `-accel kvm` where hardware
//! KVM boots Linux and `-accel tcg` otherwise; a `-accel kvm` that QEMU cannot initialise at run
//! time falls back to TCG once for that VM, saying so. Disks are per-run qcow2 overlays made with
//! `qemu-img create -b BASE -F FMT` (the base is never opened for writing), shares are 9p, the
//! agent talks over a virtio-serial port on a Unix chardev, the serial console is QEMU's stdout,
//! and QMP gives a clean `quit` at teardown with SIGKILL as the fallback.
//!
//! The flags are the recipe proven by tests/guest_qemu.rs: `-M pc` (the Debian kernel probes
//! virtio-pci; microvm under TCG stalls calibrating the TSC), `-no-reboot` with `panic=-1` so a
//! guest panic or poweroff ends QEMU.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::agent::{AgentAbort, AgentLink, AgentTransport};
use super::*;
use crate::doctor::{QEMU_IMG, QEMU_SYSTEM};

/// How long QEMU may take to come up (QMP answering) before `boot` gives up.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a QMP `quit` may take before SIGKILL.
const QUIT_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest Unix socket path (sun_path is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// QEMU stderr lines kept for error messages.
const STDERR_LINES: usize = 20;
/// Kernel arguments the backend always passes (before the plan's own).
const BASE_CMDLINE: &str = "console=ttyS0 quiet panic=-1";

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware KVM.
    Kvm,
    /// QEMU's software emulator.
    Tcg,
}

impl Accel {
    fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The QEMU backend.
pub struct QemuBackend {
    qemu: PathBuf,
    qemu_img: PathBuf,
    accel: Accel,
    /// QEMU's version number ("10.0.2").
    number: String,
}

fn error(message: impl Into<String>) -> BackendError {
    BackendError {
        backend: "qemu".into(),
        message: message.into(),
    }
}

/// `name` in PATH, or an error naming the Debian package to install.
fn find_tool(name: &str, package: &str) -> Result<PathBuf, BackendError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            error(format!(
                "{name} not found in PATH (apt-get install {package})"
            ))
        })
}

impl QemuBackend {
    /// Finds QEMU and its version; `hardware_kvm` selects `-accel kvm`.
    pub fn new(hardware_kvm: bool) -> Result<QemuBackend, BackendError> {
        let qemu = find_tool(QEMU_SYSTEM, "qemu-system-x86")?;
        let qemu_img = find_tool(QEMU_IMG, "qemu-utils")?;
        Self::with_tools(qemu, qemu_img, hardware_kvm)
    }

    /// The backend with these binaries (asks `qemu --version`); `hardware_kvm` selects
    /// `-accel kvm`.
    pub fn with_tools(
        qemu: PathBuf,
        qemu_img: PathBuf,
        hardware_kvm: bool,
    ) -> Result<QemuBackend, BackendError> {
        let out = Command::new(&qemu)
            .arg("--version")
            .output()
            .map_err(|e| error(format!("cannot run {}: {e}", qemu.display())))?;
        let first = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        let number = crate::doctor::parse_version(&first).unwrap_or_else(|| "unknown".into());
        let accel = if hardware_kvm { Accel::Kvm } else { Accel::Tcg };
        Ok(QemuBackend {
            qemu,
            qemu_img,
            accel,
            number,
        })
    }

    fn version_with(&self, accel: Accel) -> String {
        format!("QEMU {}, accel {}", self.number, accel.as_str())
    }

    /// The accelerator this backend uses.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    fn create_overlay(&self, disk: &PlannedDisk) -> Result<(), BackendError> {
        let format = match disk.format {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        };
        let out = Command::new(&self.qemu_img)
            .args(["create", "-q", "-f", "qcow2", "-b"])
            .arg(&disk.base)
            .args(["-F", format])
            .arg(&disk.overlay)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| error(format!("cannot run {}: {e}", self.qemu_img.display())))?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let why = stderr
            .lines()
            .map(|l| l.trim().trim_start_matches("qemu-img: "))
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(": ");
        Err(error(format!(
            "disk `{}`: cannot create an overlay over {} ({format}): {why}",
            disk.name,
            disk.base.display()
        )))
    }
}

/// The sockets of one VM.
struct Sockets {
    agent: PathBuf,
    qmp: PathBuf,
}

impl Sockets {
    fn in_dir(run_dir: &Path) -> Result<Sockets, BackendError> {
        let sockets = Sockets {
            agent: run_dir.join("agent.sock"),
            qmp: run_dir.join("qmp.sock"),
        };
        for p in [&sockets.agent, &sockets.qmp] {
            if p.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(error(format!(
                    "socket path {} is longer than {MAX_SOCKET_PATH} bytes: set TMPDIR to a shorter directory",
                    p.display()
                )));
            }
        }
        Ok(sockets)
    }

    fn remove(&self) {
        for p in [&self.agent, &self.qmp] {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// QEMU's arguments for `plan` (everything but the binary).
pub fn command_line(plan: &RunPlan, run_dir: &Path, accel: Accel) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
    push(&["-accel", accel.as_str()]);
    if accel == Accel::Kvm {
        push(&["-cpu", "host"]);
    }
    let memory = plan.memory_mib.to_string();
    let vcpus = plan.vcpus.to_string();
    push(&["-M", "pc", "-m", &memory, "-smp", &vcpus]);
    push(&["-nographic", "-nodefaults", "-no-user-config", "-no-reboot"]);
    push(&["-serial", "stdio"]);
    let mut path_arg = |flag: &str, path: &Path| {
        args.push(flag.into());
        args.push(path.into());
    };
    path_arg("-kernel", &plan.kernel);
    if let Some(initrd) = &plan.initrd {
        path_arg("-initrd", initrd);
    }
    let cmdline = [BASE_CMDLINE, plan.cmdline.as_str()]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    args.push("-append".into());
    args.push(cmdline.into());

    let mut opt = |flag: &str, value: String| {
        args.push(flag.into());
        args.push(value.into());
    };
    let agent = run_dir.join("agent.sock");
    let qmp = run_dir.join("qmp.sock");
    opt("-qmp", format!("unix:{},server=on,wait=off", escape(&qmp)));
    opt("-device", "virtio-serial-pci".into());
    opt(
        "-chardev",
        format!("socket,id=agent,path={},server=on,wait=off", escape(&agent)),
    );
    opt(
        "-device",
        format!(
            "virtserialport,chardev=agent,name={}",
            kiln_agent_proto::SERIAL_PORT_NAME
        ),
    );
    for (i, disk) in plan.disks.iter().enumerate() {
        opt(
            "-drive",
            format!(
                "file={},format=qcow2,if=none,id=disk{i},cache=writeback",
                escape(&disk.overlay)
            ),
        );
        opt("-device", format!("virtio-blk-pci,drive=disk{i}"));
    }
    for (i, share) in plan.shares.iter().enumerate() {
        let ro = if share.readonly { ",readonly=on" } else { "" };
        opt(
            "-fsdev",
            format!(
                "local,security_model=none,id=fs{i},path={}{ro}",
                escape(&share.host_dir)
            ),
        );
        opt(
            "-device",
            format!("virtio-9p-pci,fsdev=fs{i},mount_tag={}", share.tag),
        );
    }
    args
}

/// A path inside a QEMU option value: commas are doubled.
fn escape(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// The QEMU child process: reaped exactly once, killable from any thread.
struct Process {
    child: Mutex<Child>,
}

impl Process {
    fn lock(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The exit status once QEMU has exited (reaping it).
    fn exited(&self) -> Option<ExitStatus> {
        self.lock().try_wait().ok().flatten()
    }

    /// SIGKILL, unless it was already reaped (std never signals a reaped pid).
    fn sigkill(&self) {
        let _ = self.lock().kill();
    }

    /// Waits until QEMU exits or `until`; returns whether it exited.
    fn wait_until(&self, until: Instant) -> bool {
        loop {
            if self.exited().is_some() {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Why the QMP session could not be set up.
#[derive(Debug, thiserror::Error)]
enum QmpError {
    /// QEMU exited before its QMP socket answered (a bad option, a missing file).
    #[error("QEMU exited during startup ({0})")]
    Exited(ExitStatus),
    /// The socket did not appear by the deadline.
    #[error("QMP socket {} did not open: {source}", path.display())]
    NoSocket {
        /// The socket path.
        path: PathBuf,
        /// The last connect(2) error.
        source: std::io::Error,
    },
    /// Timeouts could not be set on the socket.
    #[error("QMP socket: {0}")]
    Timeouts(#[source] std::io::Error),
    /// A command could not be sent.
    #[error("QMP write: {0}")]
    Write(#[source] std::io::Error),
    /// QEMU closed the socket before answering.
    #[error("QMP closed before the {what} reply (QEMU exited)")]
    Closed {
        /// The reply awaited.
        what: &'static str,
    },
    /// QEMU answered with an error.
    #[error("QMP {what}: {line}")]
    Refused {
        /// The reply awaited.
        what: &'static str,
        /// QEMU's error reply.
        line: String,
    },
    /// Reading the reply failed.
    #[error("QMP {what}: {source}")]
    Read {
        /// The reply awaited.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A QMP session.
struct Qmp {
    stream: UnixStream,
}

impl Qmp {
    /// Connects once QEMU has created the socket, and negotiates capabilities. Fails when QEMU
    /// exits first (bad option, missing file) or does not answer by `deadline`.
    fn connect(path: &Path, process: &Process, deadline: Instant) -> Result<Qmp, QmpError> {
        let stream = loop {
            if let Some(status) = process.exited() {
                return Err(QmpError::Exited(status));
            }
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(source) if Instant::now() >= deadline => {
                    return Err(QmpError::NoSocket {
                        path: path.to_path_buf(),
                        source,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        stream
            .set_read_timeout(Some(left))
            .and_then(|()| stream.set_write_timeout(Some(left)))
            .map_err(QmpError::Timeouts)?;
        let mut qmp = Qmp { stream };
        qmp.expect("greeting", "\"QMP\"")?;
        qmp.send("{\"execute\":\"qmp_capabilities\"}")?;
        qmp.expect("qmp_capabilities", "\"return\"")?;
        Ok(qmp)
    }

    fn send(&mut self, command: &str) -> Result<(), QmpError> {
        self.stream
            .write_all(format!("{command}\n").as_bytes())
            .map_err(QmpError::Write)
    }

    /// Reads lines until one contains `needle` (events may come first).
    fn expect(&mut self, what: &'static str, needle: &str) -> Result<(), QmpError> {
        let mut reader = BufReader::new(&self.stream);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) => return Err(QmpError::Closed { what }),
                Ok(_) if line.contains(needle) => return Ok(()),
                Ok(_) if line.contains("\"error\"") => {
                    return Err(QmpError::Refused {
                        what,
                        line: line.trim().to_string(),
                    })
                }
                Ok(_) => {}
                Err(source) => return Err(QmpError::Read { what, source }),
            }
        }
    }

    fn quit(&mut self) {
        let _ = self.send("{\"execute\":\"quit\"}");
    }
}

/// Copies QEMU's stdout (the serial console) into the console, closing it at EOF.
fn spawn_console_reader(
    mut stdout: impl Read + Send + 'static,
    console: Console,
    span: tracing::Span,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("qemu-console".into())
        .spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                match stdout.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => console.push(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        span.in_scope(|| tracing::warn!("reading QEMU's console: {e}"));
                        break;
                    }
                }
            }
            console.close();
        })
}

/// Logs QEMU's stderr into harness.log and keeps its last lines for error messages.
fn spawn_stderr_reader(
    stderr: impl Read + Send + 'static,
    lines: Arc<Mutex<Vec<String>>>,
    span: tracing::Span,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("qemu-stderr".into())
        .spawn(move || {
            // Split on bytes, so a non-UTF-8 line cannot stop the draining (QEMU would block).
            for line in BufReader::new(stderr).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line).trim_end().to_string();
                span.in_scope(|| tracing::info!("qemu: {line}"));
                let mut kept = lines.lock().unwrap_or_else(|p| p.into_inner());
                if kept.len() == STDERR_LINES {
                    kept.remove(0);
                }
                kept.push(line);
            }
        })
}

impl Backend for QemuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    fn name(&self) -> &str {
        "qemu"
    }

    fn version(&self) -> String {
        self.version_with(self.accel)
    }

    /// Starts QEMU; when `-accel kvm` fails because KVM is not there after all (QEMU's own
    /// "failed to initialize kvm"), once more with TCG, saying so in harness.log and in the
    /// machine's [`Machine::version`] (result.json's provenance).
    fn boot(&self, plan: &RunPlan, run_dir: &Path) -> Result<Box<dyn Machine>, BackendError> {
        for disk in &plan.disks {
            self.create_overlay(disk)?;
        }
        match self.start(plan, run_dir, self.accel) {
            Ok(machine) => Ok(Box::new(machine)),
            Err(StartFailure {
                no_kvm: Some(why), ..
            }) => {
                tracing::warn!(
                    "QEMU could not use KVM ({why}); starting it again with -accel tcg                      (much slower)"
                );
                let mut machine = self.start(plan, run_dir, Accel::Tcg).map_err(|f| f.error)?;
                machine.version = Some(format!(
                    "{} (KVM unavailable at run time: {why})",
                    self.version_with(Accel::Tcg)
                ));
                Ok(Box::new(machine))
            }
            Err(failure) => Err(failure.error),
        }
    }
}

/// Why QEMU did not start.
struct StartFailure {
    error: BackendError,
    /// QEMU's line saying KVM could not be used, when that is why `-accel kvm` failed.
    no_kvm: Option<String>,
}

impl From<BackendError> for StartFailure {
    fn from(error: BackendError) -> Self {
        StartFailure {
            error,
            no_kvm: None,
        }
    }
}

/// QEMU's line saying `-accel kvm` found no usable KVM ("-accel kvm: failed to initialize kvm:
/// No such file or directory", after "Could not access KVM kernel module: …").
fn kvm_unavailable(stderr: &[String]) -> Option<String> {
    stderr
        .iter()
        .find(|l| l.contains("failed to initialize kvm"))
        .or_else(|| {
            stderr
                .iter()
                .find(|l| l.contains("Could not access KVM kernel module"))
        })
        .map(|l| {
            l.trim()
                .trim_start_matches(QEMU_SYSTEM)
                .trim_start_matches(": ")
                .to_string()
        })
}

impl QemuBackend {
    /// Starts one QEMU with `accel` for `plan` (overlays already made).
    fn start(
        &self,
        plan: &RunPlan,
        run_dir: &Path,
        accel: Accel,
    ) -> Result<QemuMachine, StartFailure> {
        let sockets = Sockets::in_dir(run_dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&plan.console_log)
            .map_err(|e| error(format!("cannot open {}: {e}", plan.console_log.display())))?;
        let console = Console::with_limits(
            Some(log),
            crate::console::ConsoleLimits {
                log_bytes: plan.console_log_limit,
                ..Default::default()
            },
        );
        let mut command = Command::new(&self.qemu);
        command
            .args(command_line(plan, run_dir, accel))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a terminal's Ctrl-C reaches kiln, which tears QEMU down.
            .process_group(0);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory; it makes
        // the kernel kill QEMU if the thread that started it dies without tearing it down.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        tracing::debug!(?command, "starting QEMU");
        let mut child = command
            .spawn()
            .map_err(|e| error(format!("cannot start {}: {e}", self.qemu.display())))?;
        let span = tracing::Span::current();
        let stderr_lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        // From here on the machine owns QEMU: any early return drops (and kills) it.
        let mut machine = QemuMachine {
            process: Arc::new(Process {
                child: Mutex::new(child),
            }),
            console: console.clone(),
            agent: AgentLink::new(AgentTransport::Serial(sockets.agent.clone())),
            qmp: None,
            sockets,
            readers: Vec::new(),
            stderr_lines: stderr_lines.clone(),
            version: None,
        };
        let spawned = [
            stdout.map(|s| spawn_console_reader(s, console.clone(), span.clone())),
            stderr.map(|s| spawn_stderr_reader(s, stderr_lines, span.clone())),
        ];
        for handle in spawned.into_iter().flatten() {
            let handle = handle.map_err(|e| error(format!("cannot start a reader thread: {e}")))?;
            machine.readers.push(handle);
        }
        let deadline = Instant::now() + START_TIMEOUT;
        match Qmp::connect(&machine.sockets.qmp, &machine.process, deadline) {
            Ok(qmp) => machine.qmp = Some(qmp),
            Err(why) => {
                // Wait briefly for QEMU's own one-line reason on stderr.
                machine
                    .process
                    .wait_until(Instant::now() + Duration::from_millis(500));
                machine.kill();
                let no_kvm = match accel {
                    Accel::Kvm => kvm_unavailable(
                        &machine
                            .stderr_lines
                            .lock()
                            .unwrap_or_else(|p| p.into_inner()),
                    ),
                    Accel::Tcg => None,
                };
                return Err(StartFailure {
                    error: error(match machine.last_stderr() {
                        Some(line) => format!("{why}: {line}"),
                        None => why.to_string(),
                    }),
                    no_kvm,
                });
            }
        }
        Ok(machine)
    }
}

/// One QEMU VM.
struct QemuMachine {
    process: Arc<Process>,
    console: Console,
    agent: AgentLink,
    qmp: Option<Qmp>,
    sockets: Sockets,
    readers: Vec<JoinHandle<()>>,
    stderr_lines: Arc<Mutex<Vec<String>>>,
    /// Set when this VM runs on another accelerator than the backend's.
    version: Option<String>,
}

impl QemuMachine {
    fn last_stderr(&self) -> Option<String> {
        let lines = self.stderr_lines.lock().unwrap_or_else(|p| p.into_inner());
        lines
            .iter()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| l.trim().to_string())
    }

    /// Turns an agent error into "the VM is gone" when QEMU has exited.
    fn check<T>(&self, r: Result<T, MachineError>) -> Result<T, MachineError> {
        match r {
            Err(MachineError::Gone(_))
            | Err(MachineError::Connect(_))
            | Err(MachineError::Agent(_))
                if self.process.exited().is_some() =>
            {
                let status = self.process.exited();
                Err(Gone::QemuExited { status }.into())
            }
            other => other,
        }
    }

    /// QMP `quit`, then SIGKILL if QEMU is still there after [`QUIT_TIMEOUT`].
    fn quit_or_kill(&mut self) -> bool {
        let mut clean = false;
        if self.process.exited().is_none() {
            if let Some(qmp) = self.qmp.as_mut() {
                qmp.quit();
                clean = self.process.wait_until(Instant::now() + QUIT_TIMEOUT);
            }
        }
        if self.process.exited().is_none() {
            self.process.sigkill();
            self.process.wait_until(Instant::now() + QUIT_TIMEOUT);
        }
        clean
    }
}

impl Machine for QemuMachine {
    fn console(&self) -> &Console {
        &self.console
    }

    fn agent_transport(&self) -> Option<Transport> {
        Some(Transport::Serial(kiln_agent_proto::SERIAL_PORT_NAME.into()))
    }

    fn version(&self) -> Option<String> {
        self.version.clone()
    }

    fn exec(&mut self, request: &ExecRequest, deadline: Instant) -> Result<Output, MachineError> {
        let r = self.agent.exec(request, deadline);
        self.check(r)
    }

    fn put(
        &mut self,
        path: &str,
        mode: u32,
        data: &[u8],
        deadline: Instant,
    ) -> Result<(), MachineError> {
        let r = self.agent.put(path, mode, data, deadline);
        self.check(r)
    }

    fn get(
        &mut self,
        path: &str,
        max_size: u64,
        deadline: Instant,
    ) -> Result<Vec<u8>, MachineError> {
        let r = self.agent.get(path, max_size, deadline);
        self.check(r)
    }

    /// A guest whose agent has answered powers off through it (sync, then ACPI poweroff, which
    /// `-no-reboot` turns into QEMU exiting); otherwise, or if that stalls, QMP `quit`.
    fn shutdown(&mut self, timeout: Duration) -> Result<(), MachineError> {
        let deadline = Instant::now() + timeout;
        if self.process.exited().is_some() {
            return Ok(());
        }
        if self.agent.answered() {
            match self.agent.poweroff(deadline) {
                Ok(()) if self.process.wait_until(deadline) => return Ok(()),
                Ok(()) => tracing::warn!("the guest did not power off in {timeout:?}"),
                Err(e) => tracing::warn!("agent shutdown failed: {e}"),
            }
        }
        if self.quit_or_kill() {
            Ok(())
        } else {
            Err(MachineError::DidNotQuit { process: "QEMU" })
        }
    }

    fn kill(&mut self) {
        self.agent.abort_handle().abort();
        self.quit_or_kill();
        self.qmp = None;
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        self.console.close();
        self.sockets.remove();
    }

    fn release_agent(&mut self) -> Option<AgentTransport> {
        Some(self.agent.release())
    }

    fn kill_switch(&self) -> KillSwitch {
        let process = self.process.clone();
        let abort: AgentAbort = self.agent.abort_handle();
        Arc::new(move || {
            abort.abort();
            process.sigkill();
        })
    }
}

impl Drop for QemuMachine {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> RunPlan {
        RunPlan {
            scenario_id: "s".into(),
            run_id: "r".into(),
            kernel: "/k/bzImage".into(),
            initrd: Some("/k/initrd.gz".into()),
            cmdline: "kiln.share=output:/mnt/output".into(),
            memory_mib: 256,
            vcpus: 2,
            disks: vec![PlannedDisk {
                name: "scratch".into(),
                base: "/img/base,1.img".into(),
                format: DiskFormat::Raw,
                overlay: "/run/scratch.qcow2".into(),
            }],
            shares: vec![PlannedShare {
                tag: "output".into(),
                host_dir: "/run/shares/output".into(),
                mount: "/mnt/output".into(),
                readonly: true,
            }],
            console_log: "/b/console.log".into(),
            console_log_limit: crate::console::DEFAULT_CONSOLE_LOG_LIMIT,
            snapshot: None,
        }
    }

    #[test]
    fn the_command_line_follows_the_proven_recipe() {
        let args: Vec<String> = command_line(&plan(), Path::new("/run/vm"), Accel::Tcg)
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let line = args.join(" ");
        assert!(
            line.starts_with("-accel tcg -M pc -m 256 -smp 2 "),
            "{line}"
        );
        for want in [
            "-no-reboot",
            "-serial stdio",
            "-kernel /k/bzImage -initrd /k/initrd.gz",
            "-qmp unix:/run/vm/qmp.sock,server=on,wait=off",
            "-chardev socket,id=agent,path=/run/vm/agent.sock,server=on,wait=off",
            "-device virtserialport,chardev=agent,name=org.kiln.agent.0",
            "-drive file=/run/scratch.qcow2,format=qcow2,if=none,id=disk0",
            "-device virtio-blk-pci,drive=disk0",
            "-fsdev local,security_model=none,id=fs0,path=/run/shares/output,readonly=on",
            "-device virtio-9p-pci,fsdev=fs0,mount_tag=output",
        ] {
            assert!(line.contains(want), "missing {want:?} in {line}");
        }
        let append = args.iter().position(|a| a == "-append").unwrap();
        assert_eq!(
            args[append + 1],
            "console=ttyS0 quiet panic=-1 kiln.share=output:/mnt/output"
        );
        let kvm = command_line(&plan(), Path::new("/run/vm"), Accel::Kvm);
        assert_eq!(
            kvm[..4],
            ["-accel", "kvm", "-cpu", "host"].map(OsString::from)
        );
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        assert_eq!(escape(Path::new("/a,b/c")), "/a,,b/c");
    }
}
