//! Backends turn a [`RunPlan`] into a running [`Machine`]. The runner is written once against
//! these two traits; the `qemu` and `kiln` backends plug in here, and [`fake`] simulates guests
//! for the runner's own tests.
//!
//! # Writing a backend
//!
//! `boot` must return once the VM is *started* (not ready): the runner waits for readiness on
//! [`Machine::console`]. A backend:
//! - creates a [`Console`] with [`RunPlan::console_log`] opened for append, and `push`es every
//!   serial byte into it from a reader thread, calling `close()` when the VM is gone;
//! - creates each disk's overlay at [`PlannedDisk::overlay`] over its base (never writing the base);
//! - exports each [`PlannedShare`] under its tag (9p or virtio-fs), appends [`RunPlan::cmdline`]
//!   (which already holds the agent's `kiln.share=` entries) to its own command line;
//! - connects to the agent (lazily, on the first request, is fine) and serves exec/put/get;
//! - stops everything it started in `kill` and in `Drop` (a `Machine` dropped while running is
//!   killed), so teardown happens on every path including a panicking worker;
//! - returns a [`KillSwitch`] that stops the VM from another thread (Ctrl-C, the global timeout),
//!   which must make any blocked `exec`/`put`/`get` return promptly.
//!
//! Everything a backend creates lives under the `run_dir` it is given (overlays, sockets), which
//! the runner deletes afterwards.

pub mod agent;
pub mod console;
pub mod doctor;
pub mod fake;
pub mod kiln;
pub mod qemu;
pub mod readiness;
pub mod snapshot;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use agent::{AgentError, AgentTransport};
pub use console::{CancelFlag, Console, ConsoleLine, ConsoleWait};
use kiln_agent_proto::client::ClientError;
pub use kiln_agent_proto::client::Output;
pub use kiln_agent_proto::ExecRequest;
pub use kiln_agent_proto::Transport;

use kiln_scenario::{BackendKind, DiskFormat, Readiness, ReadinessKind};

/// Everything a backend needs to start one scenario's VM; paths are absolute.
#[derive(Debug, Clone)]
pub struct RunPlan {
    /// The scenario's id.
    pub scenario_id: String,
    /// This run's id (unique per attempt).
    pub run_id: String,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initrd, if any.
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line: the scenario's plus the agent's `kiln.share=` entries.
    pub cmdline: String,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Disks in guest order (vda, vdb, ...).
    pub disks: Vec<PlannedDisk>,
    /// Shares to export.
    pub shares: Vec<PlannedShare>,
    /// Where the serial console must be written.
    pub console_log: PathBuf,
    /// Most bytes console.log may grow to (a note marks the cut).
    pub console_log_limit: u64,
    /// Start from a snapshot of the guest's shape where the backend can (kiln), made on first
    /// need in this cache; `None`: always boot cold.
    pub snapshot: Option<snapshot::SnapshotPlan>,
}

/// A disk: a copy-on-write overlay the backend creates over `base`.
#[derive(Debug, Clone)]
pub struct PlannedDisk {
    /// The scenario's name for it.
    pub name: String,
    /// The base image (opened read-only).
    pub base: PathBuf,
    /// The base's format.
    pub format: DiskFormat,
    /// Where to create the qcow2 overlay.
    pub overlay: PathBuf,
}

/// A host directory exported to the guest.
#[derive(Debug, Clone)]
pub struct PlannedShare {
    /// Mount tag.
    pub tag: String,
    /// Host directory.
    pub host_dir: PathBuf,
    /// Guest mount point (already in the cmdline; for backends that need it).
    pub mount: String,
    /// Read-only.
    pub readonly: bool,
}

/// Stops a machine from another thread; calling it more than once is harmless.
pub type KillSwitch = Arc<dyn Fn() + Send + Sync>;

/// Why a backend could not start a VM.
#[derive(Debug, thiserror::Error)]
#[error("{backend}: {message}")]
pub struct BackendError {
    /// Backend name.
    pub backend: String,
    /// One line: what failed.
    pub message: String,
}

/// Why a machine operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// The deadline passed before the operation finished.
    #[error("timed out: {what}{}", within(*.after))]
    Timeout {
        /// What did not finish (`exec ["true"]`, `the guest did not power off`).
        what: String,
        /// The time it had, where the backend knows it.
        after: Option<Duration>,
    },
    /// The VM exited or was killed.
    #[error("the VM is gone: {0}")]
    Gone(#[from] Gone),
    /// The agent answered with an error, or the conversation with it broke.
    #[error("agent: {0}")]
    Agent(#[from] AgentError),
    /// The agent could not be reached: its socket, or the vsock handshake.
    #[error(transparent)]
    Connect(ClientError),
    /// The VM process did not quit when asked and was killed.
    #[error("{process} did not quit; killed it")]
    DidNotQuit {
        /// The process (`QEMU`).
        process: &'static str,
    },
}

fn within(after: Option<Duration>) -> String {
    after.map_or_else(String::new, |d| format!(" within {d:?}"))
}

/// How a VM went away under an operation.
#[derive(Debug, thiserror::Error)]
pub enum Gone {
    /// The harness stopped it (kill switch, Ctrl-C), before or during an operation.
    #[error("the {vm} was stopped{}", during.as_ref().map_or_else(String::new, |d| format!(" during {d}")))]
    Stopped {
        /// Which VM (`VM`, `fake VM`).
        vm: &'static str,
        /// The operation it interrupted, if one was under way.
        during: Option<String>,
    },
    /// The harness killed it while an operation waited.
    #[error("the {vm} was killed")]
    Killed {
        /// Which VM.
        vm: &'static str,
    },
    /// It exited on its own.
    #[error("the {vm} exited")]
    Exited {
        /// Which VM.
        vm: &'static str,
    },
    /// The agent's connection closed in the middle of an operation.
    #[error("the agent connection closed during {during}")]
    AgentClosed {
        /// The operation.
        during: String,
    },
    /// The QEMU process exited.
    #[error("QEMU exited{}", status.map_or_else(String::new, |s| format!(" ({s})")))]
    QemuExited {
        /// Its status, when it has been reaped.
        status: Option<std::process::ExitStatus>,
    },
    /// kiln's VMM ended the VM, for this reason.
    #[error("the VM ended: {0:?}")]
    Ended(kiln_vmm::ExitReason),
}

/// What readiness found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyReport {
    /// The agent's record, when readiness waited for it.
    pub record: Option<String>,
    /// Each marker matched, with its time since VM creation.
    pub markers: Vec<(String, Duration)>,
}

/// Why readiness failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadyError {
    /// A marker (or the record) did not appear in time: names which, and the marker's own
    /// timeout when that (not the readiness timeout) ran out.
    Timeout(String, Option<Duration>),
    /// The guest kernel panicked.
    Panic(String),
    /// The VM exited before it was ready.
    Exited(String),
    /// Cancelled.
    Cancelled,
}

/// One running VM.
pub trait Machine: Send {
    /// The serial console.
    fn console(&self) -> &Console;

    /// Waits until the guest is ready as `spec` says, or `deadline`. The default reads the
    /// console (agent record, marker, or ordered sequence); a backend may override it.
    fn wait_ready(
        &mut self,
        spec: &Readiness,
        deadline: Instant,
        cancel: &AtomicBool,
    ) -> Result<ReadyReport, ReadyError> {
        wait_ready_on_console(self.console(), spec, deadline, cancel)
    }

    /// Runs a command through the agent; the host gives up at `deadline`.
    fn exec(&mut self, request: &ExecRequest, deadline: Instant) -> Result<Output, MachineError>;

    /// Writes a guest file.
    fn put(
        &mut self,
        path: &str,
        mode: u32,
        data: &[u8],
        deadline: Instant,
    ) -> Result<(), MachineError>;

    /// Reads a guest file of at most `max_size` bytes.
    fn get(
        &mut self,
        path: &str,
        max_size: u64,
        deadline: Instant,
    ) -> Result<Vec<u8>, MachineError>;

    /// Asks the guest to power off and waits up to `timeout` for the VM to exit.
    fn shutdown(&mut self, timeout: Duration) -> Result<(), MachineError>;

    /// Stops the VM at once.
    fn kill(&mut self);

    /// A handle that stops the VM from another thread.
    fn kill_switch(&self) -> KillSwitch;

    /// The agent transport the host reaches the guest's agent through (the one steps use),
    /// when the backend has one.
    fn agent_transport(&self) -> Option<Transport> {
        None
    }

    /// This VM's backend version when it differs from [`Backend::version`] (QEMU that fell back
    /// from KVM to TCG).
    fn version(&self) -> Option<String> {
        None
    }

    /// Time from VM creation to the kernel's first instruction, when the backend knows it.
    fn kernel_entry(&self) -> Option<Duration> {
        None
    }

    /// Whether the VM was restored from a snapshot, from which, and the restore's timings
    /// (`None` where snapshots were not asked for).
    fn restore_record(&self) -> Option<snapshot::RestoreRecord> {
        None
    }

    /// Lets another client (`kiln shell` while the run is paused) reach the guest agent: drops
    /// the harness's own connection, since a virtio-serial chardev takes one client at a time, and
    /// says where the agent is. The next request of the harness connects again. `None`: this
    /// machine has no agent another process can reach.
    fn release_agent(&mut self) -> Option<AgentTransport> {
        None
    }
}

/// Readiness read from the console, shared by every backend.
pub fn wait_ready_on_console(
    console: &Console,
    spec: &Readiness,
    deadline: Instant,
    cancel: &AtomicBool,
) -> Result<ReadyReport, ReadyError> {
    let fail_within = |what: &str, wait: ConsoleWait, own: Option<Duration>| match wait {
        ConsoleWait::Panic(line) => ReadyError::Panic(line),
        ConsoleWait::Closed => ReadyError::Exited(format!("the VM exited before {what}")),
        ConsoleWait::Cancelled => ReadyError::Cancelled,
        _ => ReadyError::Timeout(what.to_string(), own),
    };
    let fail = |what: &str, wait: ConsoleWait| fail_within(what, wait, None);
    let mut report = ReadyReport {
        record: None,
        markers: Vec::new(),
    };
    match &spec.kind {
        ReadinessKind::Agent => {
            let accepted =
                |l: &ConsoleLine| matches!(readiness::check(l), readiness::Check::Accepted(_));
            match console.wait_until_line(0, &accepted, deadline, cancel) {
                ConsoleWait::Matched { line, .. } => report.record = Some(line.text),
                other => return Err(fail("the agent's KILN_READY record", other)),
            }
        }
        ReadinessKind::Marker(p) => match console.wait_for(0, &p.0, deadline, cancel) {
            ConsoleWait::Matched { line, .. } => report.markers.push((line.text, line.at)),
            other => return Err(fail(&format!("marker /{}/", p.0.as_str()), other)),
        },
        ReadinessKind::Sequence(markers) => {
            let mut from = 0;
            for (i, m) in markers.iter().enumerate() {
                let own = m.timeout.map(|t| Instant::now() + t);
                let until = own.map_or(deadline, |o| o.min(deadline));
                // Which timeout ends this wait, for the message when it runs out.
                let own_timeout = m.timeout.filter(|_| own.is_some_and(|o| o < deadline));
                let what = format!(
                    "marker {}/{} /{}/{}",
                    i + 1,
                    markers.len(),
                    m.marker.0.as_str(),
                    if i == 0 {
                        String::new()
                    } else {
                        format!(" after /{}/", markers[i - 1].marker.0.as_str())
                    }
                );
                match console.wait_for(from, &m.marker.0, until, cancel) {
                    ConsoleWait::Matched { index, line } => {
                        report.markers.push((line.text, line.at));
                        from = index + 1;
                    }
                    other => return Err(fail_within(&what, other, own_timeout)),
                }
            }
        }
    }
    Ok(report)
}

/// A backend: starts VMs for run plans.
pub trait Backend: Send + Sync {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// Its name in reports ("qemu", "kiln", "fake").
    fn name(&self) -> &str;

    /// Its version for provenance (e.g. "QEMU 7.2.0, accel tcg").
    fn version(&self) -> String;

    /// Starts a VM for `plan`; everything it creates goes under `run_dir`.
    fn boot(&self, plan: &RunPlan, run_dir: &Path) -> Result<Box<dyn Machine>, BackendError>;
}

/// `--backend`: a concrete backend or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// kiln's VMM where hardware KVM is usable, else QEMU.
    Auto,
    /// kiln's own VMM.
    Kiln,
    /// qemu-system-x86_64.
    Qemu,
}

/// Chooses the backend for `choice`: `auto` takes kiln where KVM boots Linux, else QEMU.
/// Returns the kind and one sentence saying why.
pub fn choose(
    choice: BackendChoice,
    kvm_linux_capable: bool,
    kvm_kind: &str,
) -> (BackendKind, String) {
    match choice {
        BackendChoice::Kiln => (BackendKind::Kiln, "requested with --backend kiln".into()),
        BackendChoice::Qemu => (BackendKind::Qemu, "requested with --backend qemu".into()),
        BackendChoice::Auto if kvm_linux_capable => (
            BackendKind::Kiln,
            format!("auto: {kvm_kind} KVM boots Linux through kiln's own VMM"),
        ),
        BackendChoice::Auto => (
            BackendKind::Qemu,
            format!("auto: {kvm_kind} KVM cannot boot Linux guests; using QEMU"),
        ),
    }
}

/// Constructs the backend of `kind` for a host whose KVM is `kvm_kind`; `linux_capable` is
/// `kiln doctor`'s verdict that it boots Linux (QEMU then uses `-accel kvm`; kiln's VMM refuses
/// Linux kernels without it).
pub fn construct(
    kind: BackendKind,
    linux_capable: bool,
    kvm_kind: &str,
) -> Result<Arc<dyn Backend>, BackendError> {
    match kind {
        BackendKind::Qemu => Ok(Arc::new(qemu::QemuBackend::new(linux_capable)?)),
        BackendKind::Kiln => Ok(Arc::new(kiln::KilnBackend::new(linux_capable, kvm_kind))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_errors_read_as_before_they_were_typed() {
        let timeout = |what: &str, after| MachineError::Timeout {
            what: what.into(),
            after,
        };
        assert_eq!(
            timeout("exec [\"true\"]", None).to_string(),
            "timed out: exec [\"true\"]"
        );
        assert_eq!(
            timeout("the guest did not power off", Some(Duration::from_secs(5))).to_string(),
            "timed out: the guest did not power off within 5s"
        );
        let gone = |g: Gone| MachineError::from(g).to_string();
        assert_eq!(
            gone(Gone::Stopped {
                vm: "VM",
                during: Some("get /x".into())
            }),
            "the VM is gone: the VM was stopped during get /x"
        );
        assert_eq!(
            gone(Gone::Killed { vm: "fake VM" }),
            "the VM is gone: the fake VM was killed"
        );
        assert_eq!(
            gone(Gone::QemuExited { status: None }),
            "the VM is gone: QEMU exited"
        );
        assert_eq!(
            gone(Gone::Ended(kiln_vmm::ExitReason::TripleFault)),
            "the VM is gone: the VM ended: TripleFault"
        );
        assert_eq!(
            MachineError::from(AgentError::Refused("get /x: no such file".into())).to_string(),
            "agent: get /x: no such file"
        );
        assert_eq!(
            MachineError::DidNotQuit { process: "QEMU" }.to_string(),
            "QEMU did not quit; killed it"
        );
    }

    #[test]
    fn auto_prefers_kiln_only_with_linux_capable_kvm() {
        assert_eq!(
            choose(BackendChoice::Auto, true, "hardware").0,
            BackendKind::Kiln
        );
        let (kind, why) = choose(BackendChoice::Auto, false, "pvm");
        assert_eq!(kind, BackendKind::Qemu);
        assert_eq!(why, "auto: pvm KVM cannot boot Linux guests; using QEMU");
        assert_eq!(
            choose(BackendChoice::Kiln, false, "none").0,
            BackendKind::Kiln
        );
    }
}
