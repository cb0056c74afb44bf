//! [`TestVm`]: a real guest for a Rust test, in a few lines.
//!
//! ```no_run
//! # fn main() -> Result<(), kiln::TestVmError> {
//! let dir = tempfile::tempdir()?;
//! let vm = kiln::TestVm::builder().share("out", dir.path()).boot()?;
//! let out = vm.exec(["uname", "-r"])?;
//! assert!(out.success());
//! vm.put("/out/hello.txt", b"hi\n")?;
//! assert_eq!(std::fs::read(dir.path().join("hello.txt"))?, b"hi\n");
//! # Ok(()) }
//! ```
//!
//! The builder picks the backend as `kiln run --backend auto` does (kiln's own VMM where the
//! host's KVM boots Linux, else QEMU) and the default guest (built into the user's cache on first
//! use) unless a kernel is named. Every operation has a deadline (boot: 5 minutes, each request:
//! 60 s, both adjustable), and the VM is torn down when the [`TestVm`] is dropped, on every path,
//! a panicking test included.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_agent_proto::client::Output;
use kiln_agent_proto::ExecRequest;
use kiln_backends::{
    doctor, BackendChoice, BackendError, Machine, MachineError, PlannedShare, ReadyError,
    ReadyReport, RunPlan,
};
use kiln_guest_build::GuestError;
use kiln_scenario::{BackendKind, Readiness, ReadinessKind, DEFAULT_MEMORY_MIB};

/// The most a [`TestVm::get`] reads unless told otherwise.
pub const DEFAULT_GET_LIMIT: u64 = 64 << 20;

/// Why a [`TestVm`] could not be booted or used.
#[derive(Debug, thiserror::Error)]
pub enum TestVmError {
    /// The default guest could not be found or built.
    #[error("the default guest is not available: {0}")]
    Guest(#[from] GuestError),
    /// The backend could not be set up or could not start the VM.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The guest did not get ready.
    #[error("the guest did not get ready: {reason}; console tail:\n{console}")]
    NotReady {
        /// Why, in one line.
        reason: String,
        /// The last console lines.
        console: String,
    },
    /// An agent request failed (timed out, the VM went away, the agent refused).
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// Host-side I/O (the run directory, a share).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// How to boot a [`TestVm`]; from [`TestVm::builder`].
#[derive(Debug, Clone)]
pub struct TestVmBuilder {
    backend: BackendChoice,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cmdline: String,
    memory_mib: u64,
    vcpus: u8,
    shares: Vec<PlannedShare>,
    boot_timeout: Duration,
    timeout: Duration,
}

impl Default for TestVmBuilder {
    fn default() -> Self {
        TestVmBuilder {
            backend: BackendChoice::Auto,
            kernel: None,
            initrd: None,
            cmdline: String::new(),
            memory_mib: DEFAULT_MEMORY_MIB,
            vcpus: 1,
            shares: Vec::new(),
            boot_timeout: Duration::from_secs(300),
            timeout: Duration::from_secs(60),
        }
    }
}

impl TestVmBuilder {
    /// Exports host directory `dir` read-write to the guest, mounted at `/<tag>`.
    pub fn share(self, tag: &str, dir: impl AsRef<Path>) -> Self {
        self.share_at(tag, dir, &format!("/{tag}"), false)
    }

    /// Exports `dir` read-only at `/<tag>`.
    pub fn share_ro(self, tag: &str, dir: impl AsRef<Path>) -> Self {
        self.share_at(tag, dir, &format!("/{tag}"), true)
    }

    /// Exports `dir` under `tag`, mounted at `mount` in the guest.
    pub fn share_at(mut self, tag: &str, dir: impl AsRef<Path>, mount: &str, ro: bool) -> Self {
        let dir = dir.as_ref();
        self.shares.push(PlannedShare {
            tag: tag.to_string(),
            host_dir: std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf()),
            mount: mount.to_string(),
            readonly: ro,
        });
        self
    }

    /// Boots this kernel (with [`initrd`](Self::initrd)) instead of the default guest. The
    /// initramfs must run kiln-agent, as the default guest's does.
    pub fn kernel(mut self, kernel: impl Into<PathBuf>) -> Self {
        self.kernel = Some(kernel.into());
        self
    }

    /// The initramfs for [`kernel`](Self::kernel).
    pub fn initrd(mut self, initrd: impl Into<PathBuf>) -> Self {
        self.initrd = Some(initrd.into());
        self
    }

    /// Extra kernel command line.
    pub fn cmdline(mut self, cmdline: &str) -> Self {
        self.cmdline = cmdline.to_string();
        self
    }

    /// Guest memory in MiB (default 256).
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }

    /// vCPUs (default 1).
    pub fn vcpus(mut self, vcpus: u8) -> Self {
        self.vcpus = vcpus;
        self
    }

    /// `Auto` (the default), `Kiln` or `Qemu`.
    pub fn backend(mut self, backend: BackendChoice) -> Self {
        self.backend = backend;
        self
    }

    /// How long the guest may take to get ready (default 5 minutes).
    pub fn boot_timeout(mut self, timeout: Duration) -> Self {
        self.boot_timeout = timeout;
        self
    }

    /// How long each `exec`/`put`/`get` may take (default 60 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Boots the guest and waits for its agent's `KILN_READY` record.
    pub fn boot(self) -> Result<TestVm, TestVmError> {
        let (kernel, initrd) = match self.kernel {
            Some(kernel) => (kernel, self.initrd),
            None => {
                let guest = kiln_guest_build::default_guest()?;
                (guest.kernel, Some(guest.initrd))
            }
        };
        let report = doctor::report();
        let kvm_kind = report.kvm.kind.to_string();
        let linux_capable = report.kvm.linux_capable();
        let (kind, _why) = kiln_backends::choose(self.backend, linux_capable, &kvm_kind);
        let backend = kiln_backends::construct(kind, linux_capable, &kvm_kind)?;

        let run_dir = tempfile::Builder::new().prefix("kiln-testvm-").tempdir()?;
        let console_log = run_dir.path().join("console.log");
        fs::File::create(&console_log)?;
        let mut cmdline: Vec<String> = vec![self.cmdline.clone()];
        for share in &self.shares {
            let ro = if share.readonly { ":ro" } else { "" };
            cmdline.push(format!("kiln.share={}:{}{ro}", share.tag, share.mount));
        }
        let plan = RunPlan {
            scenario_id: "testvm".into(),
            run_id: format!("testvm-{}", std::process::id()),
            kernel,
            initrd,
            cmdline: cmdline
                .into_iter()
                .filter(|c| !c.is_empty())
                .collect::<Vec<_>>()
                .join(" "),
            memory_mib: self.memory_mib,
            vcpus: self.vcpus,
            disks: Vec::new(),
            shares: self.shares,
            console_log,
            console_log_limit: kiln_backends::console::DEFAULT_CONSOLE_LOG_LIMIT,
            snapshot: None,
        };
        let mut machine = backend.boot(&plan, run_dir.path())?;
        let readiness = Readiness {
            timeout: self.boot_timeout,
            kind: ReadinessKind::Agent,
        };
        let cancel = AtomicBool::new(false);
        let deadline = Instant::now() + self.boot_timeout;
        let ready = match machine.wait_ready(&readiness, deadline, &cancel) {
            Ok(ready) => ready,
            Err(e) => {
                let console = machine.console().tail(40).join("\n");
                machine.kill();
                return Err(TestVmError::NotReady {
                    reason: describe(&e, self.boot_timeout),
                    console,
                });
            }
        };
        Ok(TestVm {
            machine: Mutex::new(machine),
            ready,
            backend: kind,
            timeout: self.timeout,
            _run_dir: run_dir,
        })
    }
}

fn describe(e: &ReadyError, timeout: Duration) -> String {
    match e {
        ReadyError::Timeout(what, own) => {
            format!("no {what} within {:?}", own.unwrap_or(timeout))
        }
        ReadyError::Panic(line) => format!("the guest kernel panicked: {line}"),
        ReadyError::Exited(why) => why.clone(),
        ReadyError::Cancelled => "cancelled".into(),
    }
}

/// A booted guest whose agent is ready. Dropping it kills the VM and removes everything the
/// backend created (overlays, sockets); [`shutdown`](TestVm::shutdown) powers it off cleanly.
pub struct TestVm {
    // Declared before the run directory: the VM is gone before its files are removed.
    machine: Mutex<Box<dyn Machine>>,
    ready: ReadyReport,
    backend: BackendKind,
    timeout: Duration,
    _run_dir: tempfile::TempDir,
}

impl std::fmt::Debug for TestVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestVm")
            .field("backend", &self.backend)
            .field("ready", &self.ready.record)
            .finish_non_exhaustive()
    }
}

impl TestVm {
    /// A builder with the defaults: auto backend, default guest, 256 MiB, 1 vCPU, no shares.
    pub fn builder() -> TestVmBuilder {
        TestVmBuilder::default()
    }

    /// Boots the default guest with the defaults.
    pub fn boot() -> Result<TestVm, TestVmError> {
        Self::builder().boot()
    }

    fn machine(&self) -> std::sync::MutexGuard<'_, Box<dyn Machine>> {
        self.machine.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }

    /// Which backend runs the VM.
    pub fn backend(&self) -> BackendKind {
        self.backend
    }

    /// The agent's `KILN_READY …` record (without whatever the console line held before it,
    /// such as a terminal reset).
    pub fn ready_record(&self) -> &str {
        let line = self.ready.record.as_deref().unwrap_or_default();
        line.find("KILN_READY").map_or(line, |at| &line[at..])
    }

    /// Runs `argv` in the guest (no shell) and returns its exit status and output.
    pub fn exec<I, S>(&self, argv: I) -> Result<Output, TestVmError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.exec_request(&ExecRequest::new(argv))
    }

    /// Runs a full request (stdin, environment, working directory, its own timeout).
    pub fn exec_request(&self, request: &ExecRequest) -> Result<Output, TestVmError> {
        let deadline = self.deadline();
        Ok(self.machine().exec(request, deadline)?)
    }

    /// Writes `data` to guest file `path` (mode 0644).
    pub fn put(&self, path: &str, data: &[u8]) -> Result<(), TestVmError> {
        self.put_mode(path, 0o644, data)
    }

    /// Writes `data` to guest file `path` with `mode`.
    pub fn put_mode(&self, path: &str, mode: u32, data: &[u8]) -> Result<(), TestVmError> {
        let deadline = self.deadline();
        Ok(self.machine().put(path, mode, data, deadline)?)
    }

    /// Reads guest file `path` (at most [`DEFAULT_GET_LIMIT`] bytes).
    pub fn get(&self, path: &str) -> Result<Vec<u8>, TestVmError> {
        let deadline = self.deadline();
        Ok(self.machine().get(path, DEFAULT_GET_LIMIT, deadline)?)
    }

    /// The last `lines` lines of the serial console.
    pub fn console_tail(&self, lines: usize) -> Vec<String> {
        self.machine().console().tail(lines)
    }

    /// Asks the guest to power off and waits for the VM to end (up to the request timeout).
    pub fn shutdown(self) -> Result<(), TestVmError> {
        let timeout = self.timeout;
        let result = self.machine().shutdown(timeout);
        Ok(result?)
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        self.machine().kill();
    }
}
