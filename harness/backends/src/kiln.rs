//! The kiln backend: scenarios run on kiln's own VMM (`kiln_vmm::Vm`). Disks are copy-on-write
//! overlays the VMM creates at the planned path (the base is never written), shares are
//! virtio-fs (the agent tries virtiofs before 9p), the agent answers on vsock port 1024 through
//! the VM's Firecracker-style Unix socket, and the serial console is read from the VMM's
//! in-memory log into the harness's [`Console`].
//!
//! A Linux guest needs hardware KVM: under PVM the guest kernel's own instructions (`xsave`,
//! `cmpxchg16b`, `int3`) stop the emulator, so on such a host a Linux kernel is refused at once
//! with an infra error instead of a VM that hangs until the readiness timeout. Small
//! bare-metal guests still run.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_disk::{qcow2, DiskMode, DiskSpec};
use kiln_vmm::vm::{Vm, VmConfig, VmHandle};
use kiln_vmm::ExitReason;

use super::agent::{AgentLink, AgentTransport};
use super::*;

/// How often the console is copied from the VMM's log.
const CONSOLE_POLL: Duration = Duration::from_millis(20);
/// The longest Unix socket path (sun_path is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// What a Linux guest needs that this host lacks, and what to do instead.
const NO_LINUX: &str = "this KVM cannot boot Linux guests; use --backend qemu";

/// The kiln backend.
pub struct KilnBackend {
    linux_capable: bool,
    kvm_kind: String,
}

fn error(message: impl Into<String>) -> BackendError {
    BackendError {
        backend: "kiln".into(),
        message: message.into(),
    }
}

impl KilnBackend {
    /// A backend for a host whose KVM is `kvm_kind`; `linux_capable` says whether it boots Linux.
    pub fn new(linux_capable: bool, kvm_kind: &str) -> KilnBackend {
        KilnBackend {
            linux_capable,
            kvm_kind: kvm_kind.to_string(),
        }
    }
}

/// Refuses a base whose header contradicts its declared format (as `qemu-img -F` would).
fn check_format(disk: &PlannedDisk) -> Result<(), BackendError> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let read = std::fs::File::open(&disk.base).and_then(|mut f| f.read(&mut magic));
    let n = read.map_err(|e| {
        error(format!(
            "disk `{}`: cannot read {}: {e}",
            disk.name,
            disk.base.display()
        ))
    })?;
    let is_qcow2 = qcow2::is_qcow2(&magic[..n]);
    match disk.format {
        DiskFormat::Qcow2 if !is_qcow2 => Err(error(format!(
            "disk `{}`: {} is declared qcow2 but has no qcow2 header",
            disk.name,
            disk.base.display()
        ))),
        DiskFormat::Raw if is_qcow2 => Err(error(format!(
            "disk `{}`: {} is declared raw but is a qcow2 image",
            disk.name,
            disk.base.display()
        ))),
        _ => Ok(()),
    }
}

/// The VMM configuration for `plan`: overlays at the planned paths, virtio-fs shares, a vsock
/// socket in `run_dir`, the console kept in memory (the harness copies it).
pub fn vm_config(plan: &RunPlan, run_dir: &Path) -> VmConfig {
    let mut config = VmConfig::new(&plan.kernel)
        .memory_mib(plan.memory_mib)
        .vcpus(plan.vcpus)
        .vsock(run_dir.join("vsock.sock"))
        .cmdline(format!("quiet {}", plan.cmdline).trim_end());
    if let Some(initrd) = &plan.initrd {
        config = config.initrd(initrd);
    }
    for disk in &plan.disks {
        config = config.disk(DiskSpec {
            path: disk.base.clone(),
            mode: DiskMode::KeptOverlay(disk.overlay.clone()),
        });
    }
    for share in &plan.shares {
        config = config.share(&share.tag, &share.host_dir, share.readonly);
    }
    config
}

impl Backend for KilnBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Kiln
    }

    fn name(&self) -> &str {
        "kiln"
    }

    fn version(&self) -> String {
        format!(
            "kiln-vmm {}, {} KVM",
            env!("CARGO_PKG_VERSION"),
            self.kvm_kind
        )
    }

    fn boot(&self, plan: &RunPlan, run_dir: &Path) -> Result<Box<dyn Machine>, BackendError> {
        if !self.linux_capable {
            let linux = kiln_vmm::boot::is_bzimage(&plan.kernel)
                .map_err(|e| error(format!("cannot read {}: {e}", plan.kernel.display())))?;
            if linux {
                return Err(error(format!("{} KVM: {NO_LINUX}", self.kvm_kind)));
            }
        }
        for disk in &plan.disks {
            check_format(disk)?;
        }
        let config = vm_config(plan, run_dir);
        if let Some(uds) = config.vsock.as_ref() {
            if uds.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(error(format!(
                    "socket path {} is longer than {MAX_SOCKET_PATH} bytes: set TMPDIR to a shorter directory",
                    uds.display()
                )));
            }
        }
        let uds = config.vsock.clone().unwrap_or_default();
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
        let mut restore = None;
        let handle = match &plan.snapshot {
            Some(sp) => match restore_from_snapshot(plan, sp, config.clone()) {
                Ok((handle, record)) => {
                    restore = Some(record);
                    handle
                }
                Err(record) => {
                    tracing::warn!(
                        "snapshot: {}; booting cold",
                        record.fallback.as_deref().unwrap_or("unknown")
                    );
                    restore = Some(*record);
                    Vm::start(config).map_err(|e| error(e.to_string()))?
                }
            },
            None => Vm::start(config).map_err(|e| error(e.to_string()))?,
        };
        let log = handle.console();
        let vm = Arc::new(Mutex::new(handle));
        let mut machine = KilnMachine {
            vm: vm.clone(),
            console: console.clone(),
            agent: AgentLink::new(AgentTransport::Vsock {
                uds: uds.clone(),
                port: kiln_agent_proto::VSOCK_PORT,
            }),
            poller: None,
            uds,
            restore,
        };
        let abort = machine.agent.abort_handle();
        let poller = std::thread::Builder::new()
            .name("kiln-console".into())
            .spawn(move || {
                copy_console(&log, &vm, &console);
                // The guest is gone (reset after a panic, power-off, triple fault): a request
                // waiting for its answer gets none, so end it now instead of at its deadline.
                abort.abort();
            })
            .map_err(|e| error(format!("cannot start the console thread: {e}")))?;
        machine.poller = Some(poller);
        if machine.restore.as_ref().is_some_and(|r| r.restored) {
            // The restored guest must become a fresh one before anything else talks to it.
            let t = Instant::now();
            let resumed = crate::snapshot::resume_request(plan)
                .map_err(error)
                .and_then(|req| {
                    machine
                        .agent
                        .resume(&req, Instant::now() + RESUME_TIMEOUT)
                        .map_err(|e| {
                            error(format!(
                                "the agent could not resume the restored guest: {e}"
                            ))
                        })
                });
            // A guest that cannot be resumed is a real failure (entropy, clock or a share):
            // the run says so rather than hiding it behind a cold boot.
            resumed?;
            if let Some(r) = machine.restore.as_mut() {
                r.resume_ms = Some(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        Ok(Box::new(machine))
    }
}

/// Longest the agent may take to resume a restored guest (mounting shares included).
const RESUME_TIMEOUT: Duration = Duration::from_secs(30);

/// Restores `plan`'s VM from its shape's snapshot (making it on first need); on any failure
/// the record says why, and the caller boots cold.
fn restore_from_snapshot(
    plan: &RunPlan,
    sp: &crate::snapshot::SnapshotPlan,
    config: VmConfig,
) -> Result<(VmHandle, crate::snapshot::RestoreRecord), Box<crate::snapshot::RestoreRecord>> {
    let shape = crate::snapshot::shape(plan);
    let mut record = crate::snapshot::RestoreRecord {
        shape: shape.clone(),
        ..Default::default()
    };
    let (path, made) = match crate::snapshot::ensure(plan, sp, &shape) {
        Ok(found) => found,
        Err(why) => {
            record.fallback = Some(why);
            return Err(Box::new(record));
        }
    };
    record.created_ms = made.map(|d| d.as_secs_f64() * 1e3);
    match Vm::restore(&path, &shape, config) {
        Ok((handle, info)) => {
            record.restored = true;
            record.snapshot = Some(info.id);
            record.restore = Some(info.timings);
            Ok((handle, record))
        }
        Err(e) => {
            if matches!(e, kiln_vmm::snapshot::SnapshotError::Invalid { .. }) {
                // Corrupt or stale: the next run makes a new one.
                let _ = std::fs::remove_file(&path);
            }
            record.fallback = Some(e.to_string());
            Err(Box::new(record))
        }
    }
}

type SharedVm = Arc<Mutex<VmHandle>>;

fn lock(vm: &SharedVm) -> std::sync::MutexGuard<'_, VmHandle> {
    vm.lock().unwrap_or_else(|p| p.into_inner())
}

/// Copies new console bytes until the VM has ended, then closes the console.
fn copy_console(log: &kiln_devices::console::ConsoleLog, vm: &SharedVm, console: &Console) {
    let mut copied = 0usize;
    loop {
        let ended = lock(vm).exit_reason().is_some();
        // Only what is new: the VMM keeps up to 16 MiB, too much to copy every few ms.
        let new = log.bytes_since(copied);
        if !new.is_empty() {
            console.push(&new);
            copied += new.len();
        }
        if ended {
            break;
        }
        std::thread::sleep(CONSOLE_POLL);
    }
    console.close();
}

/// One VM on kiln's VMM.
struct KilnMachine {
    vm: SharedVm,
    console: Console,
    agent: AgentLink,
    poller: Option<JoinHandle<()>>,
    uds: PathBuf,
    restore: Option<crate::snapshot::RestoreRecord>,
}

impl KilnMachine {
    fn ended(&self) -> Option<ExitReason> {
        lock(&self.vm).exit_reason()
    }

    fn check<T>(&self, r: Result<T, MachineError>) -> Result<T, MachineError> {
        match (r, self.ended()) {
            (Err(_), Some(reason)) => Err(Gone::Ended(reason).into()),
            (r, _) => r,
        }
    }

    fn wait_exit(&self, until: Instant) -> bool {
        while self.ended().is_none() {
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

impl Machine for KilnMachine {
    fn console(&self) -> &Console {
        &self.console
    }

    fn agent_transport(&self) -> Option<Transport> {
        Some(Transport::Vsock(kiln_agent_proto::VSOCK_PORT))
    }

    fn wait_ready(
        &mut self,
        spec: &Readiness,
        deadline: Instant,
        cancel: &AtomicBool,
    ) -> Result<ReadyReport, ReadyError> {
        // The VMM knows why the VM ended (reset, power-off, triple fault, KVM error): say it.
        wait_ready_on_console(&self.console, spec, deadline, cancel).map_err(|e| match e {
            ReadyError::Exited(why) => match self.ended() {
                Some(reason) => ReadyError::Exited(format!("{why} (exit: {reason:?})")),
                None => ReadyError::Exited(why),
            },
            e => e,
        })
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

    /// Powers off through the agent when it is up (sync first); otherwise the VMM stops the VM,
    /// which closes and keeps the overlays either way.
    fn shutdown(&mut self, timeout: Duration) -> Result<(), MachineError> {
        let deadline = Instant::now() + timeout;
        if self.ended().is_some() {
            return Ok(());
        }
        if !self.agent.answered() {
            self.kill();
            return Ok(());
        }
        self.agent.poweroff(deadline)?;
        if self.wait_exit(deadline) {
            Ok(())
        } else {
            Err(MachineError::Timeout {
                what: "the guest did not power off".into(),
                after: Some(timeout),
            })
        }
    }

    fn kill(&mut self) {
        self.agent.abort_handle().abort();
        lock(&self.vm).kill();
        if let Some(poller) = self.poller.take() {
            let _ = poller.join();
        }
        self.console.close();
    }

    fn kernel_entry(&self) -> Option<Duration> {
        lock(&self.vm).kernel_entry()
    }

    fn restore_record(&self) -> Option<crate::snapshot::RestoreRecord> {
        self.restore.clone()
    }

    fn release_agent(&mut self) -> Option<AgentTransport> {
        Some(self.agent.release())
    }

    fn kill_switch(&self) -> KillSwitch {
        let vm = self.vm.clone();
        let abort = self.agent.abort_handle();
        Arc::new(move || {
            abort.abort();
            lock(&vm).kill();
        })
    }
}

impl Drop for KilnMachine {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.uds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_devices::console::ConsoleOutput;

    fn plan(dir: &Path) -> RunPlan {
        RunPlan {
            scenario_id: "s".into(),
            run_id: "r".into(),
            kernel: dir.join("bzImage"),
            initrd: Some(dir.join("initrd.gz")),
            cmdline: "kiln.share=output:/mnt/output".into(),
            memory_mib: 256,
            vcpus: 2,
            disks: vec![PlannedDisk {
                name: "scratch".into(),
                base: dir.join("base.img"),
                format: DiskFormat::Raw,
                overlay: dir.join("scratch.qcow2"),
            }],
            shares: vec![PlannedShare {
                tag: "output".into(),
                host_dir: dir.join("shares/output"),
                mount: "/mnt/output".into(),
                readonly: false,
            }],
            console_log: dir.join("console.log"),
            console_log_limit: crate::console::DEFAULT_CONSOLE_LOG_LIMIT,
            snapshot: None,
        }
    }

    #[test]
    fn a_plan_maps_to_the_vm_config_it_needs() {
        let dir = Path::new("/run/x");
        let c = vm_config(&plan(dir), &dir.join("vm"));
        assert_eq!(c.kernel, dir.join("bzImage"));
        assert_eq!(c.initrd.as_deref(), Some(dir.join("initrd.gz").as_path()));
        assert_eq!(
            c.cmdline.as_deref(),
            Some("quiet kiln.share=output:/mnt/output")
        );
        assert_eq!((c.memory_mib, c.vcpus), (256, 2));
        assert_eq!(
            c.disks,
            [DiskSpec {
                path: dir.join("base.img"),
                mode: DiskMode::KeptOverlay(dir.join("scratch.qcow2")),
            }]
        );
        assert_eq!(c.shares.len(), 1);
        assert_eq!(
            (c.shares[0].tag.as_str(), c.shares[0].read_only),
            ("output", false)
        );
        assert_eq!(c.shares[0].dir, dir.join("shares/output"));
        assert_eq!(
            c.vsock.as_deref(),
            Some(dir.join("vm/vsock.sock").as_path())
        );
        assert_eq!(c.console, ConsoleOutput::None);
    }

    #[test]
    fn a_linux_kernel_is_refused_at_once_without_hardware_kvm() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan(dir.path());
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        std::fs::write(&p.kernel, &bz).unwrap();
        let backend = KilnBackend::new(false, "pvm");
        let t = Instant::now();
        let err = backend.boot(&p, dir.path()).err().unwrap();
        assert_eq!(
            err.to_string(),
            "kiln: pvm KVM: this KVM cannot boot Linux guests; use --backend qemu"
        );
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_base_that_contradicts_its_declared_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = plan(dir.path());
        std::fs::write(&p.disks[0].base, vec![0u8; 4096]).unwrap();
        p.disks[0].format = DiskFormat::Qcow2;
        let err = check_format(&p.disks[0]).unwrap_err().to_string();
        assert!(
            err.contains("is declared qcow2 but has no qcow2 header"),
            "{err}"
        );
        p.disks[0].format = DiskFormat::Raw;
        assert!(check_format(&p.disks[0]).is_ok());
    }
}
