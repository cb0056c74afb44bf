//! One attempt at one scenario, written once against the [`Machine`] trait: plan, boot,
//! readiness, steps, teardown, fixtures, expectations, bundle. Every path tears the VM down:
//! the machine is dropped (killed) on early returns and while unwinding from a panic.

use std::fs;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use kiln_agent_proto::ExecRequest;
use serde_json::json;

use super::artifacts::*;
use super::expect::{check_file, check_output};
use super::paused::PausedRun;
use super::readiness::{ReadinessEvidence, READINESS_JSON};
use super::{Control, Pause, RunOptions};
use kiln_backends::{
    Backend, ConsoleWait, Machine, MachineError, PlannedDisk, PlannedShare, ReadyError, RunPlan,
};
use kiln_scenario::{BackendKind, ImageRef, ReadinessKind, Scenario, StepAction};

/// Extra time the host waits beyond a step's own timeout, for the agent to report it.
const AGENT_GRACE: Duration = Duration::from_secs(2);
/// How long a clean shutdown may take before the VM is killed.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// Limit for `get` steps (the protocol's own limit is 12 MiB − 64 KiB).
const GET_MAX: u64 = 12 * 1024 * 1024;
/// Console lines kept in reports.
pub const CONSOLE_TAIL: usize = 40;

/// Everything an attempt needs from the run.
pub struct Attempt<'a> {
    pub backend: &'a dyn Backend,
    pub opts: &'a RunOptions,
    pub control: &'a Control,
    pub scenario: &'a Scenario,
    pub attempt: u32,
}

/// The part of a result the VM phases produce.
#[derive(Default)]
struct Driven {
    failure: Option<Failure>,
    ready: Vec<String>,
    steps: Vec<StepResult>,
    console_tail: Vec<String>,
}

/// Why a scenario could not be turned into a backend plan.
#[derive(Debug, thiserror::Error)]
enum PlanError {
    /// The scenario wants the default guest and the resolver could not provide it.
    #[error(transparent)]
    DefaultGuest(#[from] super::GuestUnavailable),
    /// The scenario wants the default guest and the run has no resolver.
    #[error(
        "the default guest is not available: build it with `kiln guest build` or set guest.kernel"
    )]
    NoDefaultGuest,
    /// The scenario names a registry guest and the run has no resolver to pull it.
    #[error("guest {0} is not available: this run has no guest resolver to pull it")]
    NoRegistryGuest(String),
    /// A work file or directory could not be created.
    #[error("cannot create {}: {source}", path.display())]
    Create {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl PlanError {
    fn create(path: &Path) -> impl FnOnce(std::io::Error) -> PlanError + '_ {
        move |source| PlanError::Create {
            path: path.to_path_buf(),
            source,
        }
    }
}

fn fail(class: FailureClass, message: impl Into<String>, step: Option<usize>) -> Failure {
    Failure {
        class,
        message: message.into(),
        step,
    }
}

/// The work dir's name prefix: it holds the pid so that the next run can remove it when this
/// process is killed ([`super::stale`]); `--debug` ones are kept on purpose and never swept.
fn work_prefix(id: &str, debug: bool) -> String {
    if debug {
        format!("kiln-{id}-debug-")
    } else {
        format!("kiln-{id}-p{}-", std::process::id())
    }
}

/// A unique run id: UTC time to the millisecond, process id and attempt.
fn run_id(attempt: u32) -> String {
    let stamp: String = humantime::format_rfc3339_millis(SystemTime::now())
        .to_string()
        .chars()
        .filter(|c| !matches!(c, '-' | ':'))
        .collect();
    format!("{stamp}-p{}-a{attempt}", std::process::id())
}

impl Attempt<'_> {
    /// Runs the attempt and returns its result; never panics on host-dependent failures.
    pub fn run(&self) -> RunResult {
        let started = Instant::now();
        let run_id = run_id(self.attempt);
        let mut result = RunResult {
            scenario: self.scenario.id.clone(),
            run_id: run_id.clone(),
            attempt: self.attempt,
            verdict: Verdict::Fail,
            failure: None,
            started_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            ready: Vec::new(),
            steps: Vec::new(),
            expectations: Vec::new(),
            phases: Phases::default(),
            provenance: self.opts.provenance_base.clone(),
            environment: self.opts.environment.clone(),
            bundle: None,
            console_tail: Vec::new(),
            snapshot: None,
        };
        result.provenance.backend = self.backend.name().to_string();
        result.provenance.backend_version = self.backend.version();
        let bundle = match Bundle::create(
            &self.opts.artifacts,
            &self.scenario.id,
            &run_id,
            self.opts.artifacts_mode,
        ) {
            Ok(b) => b,
            Err(e) => {
                let msg = format!(
                    "cannot create the bundle under {}: {e}",
                    self.opts.artifacts.display()
                );
                result.failure = Some(fail(FailureClass::InfraError, msg, None));
                result.phases.total_ms = ms(started.elapsed());
                return result;
            }
        };
        let span = tracing::info_span!("scenario", id = %self.scenario.id, run = %run_id);
        let log_guard = super::tracelog::register(&run_id, &bundle.path("harness.log"));
        let body = span.in_scope(|| {
            catch_unwind(AssertUnwindSafe(|| {
                self.body(&bundle, &run_id, &mut result)
            }))
        });
        if let Err(panic) = body {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            span.in_scope(|| tracing::error!("harness panicked: {what}"));
            result.failure = Some(fail(
                FailureClass::InfraError,
                format!("harness panicked: {what}"),
                None,
            ));
        }
        drop(log_guard);
        result.verdict = if result.failure.is_none() && result.expectations.iter().all(|e| e.ok) {
            Verdict::Pass
        } else {
            Verdict::Fail
        };
        if result.verdict == Verdict::Fail && result.failure.is_none() {
            result.failure = Some(fail(
                FailureClass::ExpectationFailed,
                "file expectations failed",
                None,
            ));
        }
        result.phases.total_ms = ms(started.elapsed());
        match bundle.finish(&result, self.opts.keep) {
            Ok(dir) => result.bundle = dir,
            Err(e) => {
                // The run's own failure, if any, stays its class (it is what happened first);
                // the reports still say that no bundle exists.
                // One line says it (the scenario's FAIL line): the run's log is not written.
                let msg = format!("bundle not written: {e}");
                tracing::debug!(scenario = %self.scenario.id, "{msg}");
                result.verdict = Verdict::Fail;
                match result.failure.as_mut() {
                    Some(f) => f.message = format!("{} ({msg})", f.message),
                    None => result.failure = Some(fail(FailureClass::InfraError, msg, None)),
                }
            }
        }
        result
    }

    fn body(&self, bundle: &Bundle, run_id: &str, result: &mut RunResult) {
        let s = self.scenario;
        tracing::info!(attempt = self.attempt, file = %s.file.display(), "starting");
        // The bundle is still a staging dir (published by rename once result.json is written),
        // so this file needs no fsync of its own.
        let toml = bundle.path("scenario.toml");
        if let Err(e) = fs::write(&toml, s.to_toml().as_bytes()) {
            result.failure = Some(fail(
                FailureClass::InfraError,
                format!("cannot write {}: {e}", toml.display()),
                None,
            ));
            return;
        }
        // Overlays, sockets and share dirs live in a temp dir removed on drop (kept with --debug).
        let work = match tempfile::Builder::new()
            .prefix(&work_prefix(&s.id, self.opts.debug))
            .tempdir()
        {
            Ok(w) => w,
            Err(e) => {
                result.failure = Some(fail(
                    FailureClass::InfraError,
                    format!("cannot create a temp dir: {e}"),
                    None,
                ));
                return;
            }
        };
        // --debug keeps work dirs on purpose, even when a second Ctrl-C ends the run.
        let _work_registered =
            (!self.opts.debug).then(|| self.control.register_work_dir(work.path()));
        let plan = match self.plan(run_id, work.path(), bundle) {
            Ok(p) => p,
            Err(e) => {
                result.failure = Some(fail(FailureClass::InfraError, e.to_string(), None));
                return;
            }
        };
        result.provenance.kernel = Some(file_id(&plan.kernel));
        result.provenance.initrd = plan.initrd.as_deref().map(file_id);
        result.provenance.guest_image_sha256 = result
            .provenance
            .kernel
            .as_ref()
            .and_then(|k| guest_image_sha256(k, result.provenance.initrd.as_ref()));
        result.provenance.disks = plan.disks.iter().map(|d| file_id(&d.base)).collect();
        let driven = self.drive(&plan, work.path(), bundle, result);
        result.failure = driven.failure;
        if let Some(gone) = self.vanished_share(&plan) {
            // A share's host dir deleted under a running VM is the host's doing, not the
            // guest's: the step that tripped over it (if any) failed as a consequence, so
            // the class is infra-error and the failing step, if any, is kept for the summary.
            tracing::error!("{gone}");
            let step = result.failure.as_ref().and_then(|f| f.step);
            result.failure = Some(fail(FailureClass::InfraError, gone, step));
        }
        result.ready = driven.ready;
        result.steps = driven.steps;
        result.console_tail = driven.console_tail;

        let t = Instant::now();
        let fixtures = bundle.path("fixtures");
        let mut copy_error = None;
        let mut over_limit = None;
        let limit = self.opts.fixtures_limit.unwrap_or(s.fixtures_limit);
        let mut copied = 0u64;
        // A vanished share has nothing to copy; its failure is already recorded.
        for share in plan.shares.iter().filter(|p| {
            p.host_dir.is_dir()
                && s.shares
                    .iter()
                    .any(|sh| sh.tag == p.tag && sh.host.is_none())
        }) {
            let target = fixtures.join(&share.tag);
            let copy = bundle.mode.create_dir_all(&fixtures).and_then(|()| {
                let opts = CopyOptions {
                    mode: bundle.mode,
                    limit: limit.saturating_sub(copied),
                };
                copy_tree(&share.host_dir, &target, &opts)
            });
            match copy {
                Ok(report) => {
                    copied += report.bytes;
                    for skipped in &report.skipped {
                        super::tracelog::note(run_id, &format!("share `{}`: {skipped}", share.tag));
                    }
                    if let Some(at) = report.over_limit {
                        over_limit = Some(format!(
                            "share `{}` holds more than the fixtures limit of {} bytes \
                             (fixtures_limit); copied {copied} bytes, stopped at {}",
                            share.tag,
                            limit,
                            at.display()
                        ));
                        break;
                    }
                }
                Err(e) => {
                    copy_error.get_or_insert(format!(
                        "cannot copy share `{}` from {} to {}: {e}",
                        share.tag,
                        share.host_dir.display(),
                        target.display()
                    ));
                }
            }
        }
        if let Some(msg) = over_limit {
            tracing::error!("{msg}");
            result
                .failure
                .get_or_insert(fail(FailureClass::ExpectationFailed, msg, None));
        }
        for (disk, spec) in
            plan.disks.iter().zip(&s.disks).filter(|(disk, spec)| {
                spec.keep && (disk.overlay.exists() || result.failure.is_none())
            })
        {
            let target = fixtures.join("disks").join(format!("{}.qcow2", spec.name));
            let moved = fs::create_dir_all(fixtures.join("disks")).and_then(|_| {
                fs::rename(&disk.overlay, &target)
                    .or_else(|_| fs::copy(&disk.overlay, &target).map(|_| ()))
            });
            if let Err(e) = moved {
                copy_error.get_or_insert(format!(
                    "cannot keep overlay {}: {e}",
                    disk.overlay.display()
                ));
            }
        }
        if let Some(msg) = copy_error {
            tracing::error!("{msg}");
            result
                .failure
                .get_or_insert(fail(FailureClass::InfraError, msg, None));
        }
        if result.failure.is_none() {
            let scenario_dir = s.file.parent().unwrap_or(Path::new("."));
            result.expectations = s
                .expect
                .files
                .iter()
                .map(|e| check_file(&fixtures, scenario_dir, e))
                .collect();
        }
        result.phases.expectations_ms = Some(ms(t.elapsed()));
        if self.opts.debug {
            let kept = work.keep();
            tracing::info!("--debug: kept the work dir {}", kept.display());
        }
    }

    /// The first share whose host dir no longer exists after the VM phases, as a message; none
    /// after Ctrl-C, whose second press removes the output shares itself. The guest only sees a
    /// symptom: QEMU's 9p server keeps an fd on the exported dir (`-fsdev local`) and resolves
    /// every request against it, so after the dir is deleted QEMU keeps running, creating files
    /// fails with ENOENT, and a dir re-created at the same path stays invisible to the guest.
    fn vanished_share(&self, plan: &RunPlan) -> Option<String> {
        if self.control.cancelled() {
            return None;
        }
        plan.shares
            .iter()
            .find(|share| !share.host_dir.is_dir())
            .map(|share| {
                format!(
                    "share `{}`: host dir {} was deleted while the VM ran",
                    share.tag,
                    share.host_dir.display()
                )
            })
    }

    /// Turns the scenario into a backend plan: images resolved, overlay and share paths chosen.
    fn plan(&self, run_id: &str, work: &Path, bundle: &Bundle) -> Result<RunPlan, PlanError> {
        let s = self.scenario;
        let (kernel, initrd) = match &s.guest.kernel {
            ImageRef::Path(k) => (k.clone(), s.guest.initrd.clone()),
            ImageRef::Default => match &self.opts.default_guest {
                Some(resolve) => {
                    let (k, i) = resolve(None)?;
                    (k, Some(i))
                }
                None => return Err(PlanError::NoDefaultGuest),
            },
            ImageRef::Registry(reference) => match &self.opts.default_guest {
                Some(resolve) => {
                    let (k, i) = resolve(Some(reference))?;
                    (k, Some(i))
                }
                None => return Err(PlanError::NoRegistryGuest(reference.clone())),
            },
        };
        let mut cmdline = vec![s.guest.cmdline.clone()];
        let mut shares = Vec::new();
        for share in &s.shares {
            let host_dir = match &share.host {
                Some(dir) => dir.clone(),
                None => {
                    let dir = work.join("shares").join(&share.tag);
                    fs::create_dir_all(&dir).map_err(PlanError::create(&dir))?;
                    dir
                }
            };
            let ro = if share.readonly { ":ro" } else { "" };
            cmdline.push(format!("kiln.share={}:{}{ro}", share.tag, share.mount));
            shares.push(PlannedShare {
                tag: share.tag.clone(),
                host_dir,
                mount: share.mount.clone(),
                readonly: share.readonly,
            });
        }
        let disks = s
            .disks
            .iter()
            .map(|d| PlannedDisk {
                name: d.name.clone(),
                base: d.base.clone(),
                format: d.format,
                overlay: work.join(format!("{}.qcow2", d.name)),
            })
            .collect();
        // Every bundle has a console.log, even when the VM never started.
        let console_log = bundle.path("console.log");
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&console_log)
            .map_err(PlanError::create(&console_log))?;
        let vm_dir = work.join("vm");
        fs::create_dir_all(&vm_dir).map_err(PlanError::create(&vm_dir))?;
        Ok(RunPlan {
            scenario_id: s.id.clone(),
            run_id: run_id.to_string(),
            kernel,
            initrd,
            cmdline: cmdline
                .into_iter()
                .filter(|c| !c.is_empty())
                .collect::<Vec<_>>()
                .join(" "),
            memory_mib: s.guest.memory,
            vcpus: s.guest.vcpus,
            disks,
            shares,
            console_log,
            console_log_limit: self.opts.console_log_limit,
            snapshot: match &self.opts.snapshot_cache {
                Some(dir)
                    if s.snapshot
                        && self.backend.kind() == BackendKind::Kiln
                        && matches!(s.readiness.kind, ReadinessKind::Agent) =>
                {
                    Some(kiln_backends::snapshot::SnapshotPlan { dir: dir.clone() })
                }
                _ => None,
            },
        })
    }

    /// Boot, readiness, steps and teardown. The machine never outlives this function.
    fn drive(
        &self,
        plan: &RunPlan,
        work: &Path,
        bundle: &Bundle,
        result: &mut RunResult,
    ) -> Driven {
        let s = self.scenario;
        let mut out = Driven::default();
        let start = Instant::now();
        let deadline = start + s.timeout;
        let cancel = self.control.cancel_flag();
        let t = Instant::now();
        let booted = self.backend.boot(plan, &work.join("vm"));
        result.phases.vm_create_ms = Some(ms(t.elapsed()));
        let mut machine = match booted {
            Ok(m) => m,
            Err(e) => {
                out.failure = Some(fail(
                    FailureClass::InfraError,
                    format!("boot failed: {e}"),
                    None,
                ));
                return out;
            }
        };
        tracing::info!(backend = self.backend.name(), "VM started");
        if let Some(version) = machine.version() {
            result.provenance.backend_version = version;
        }
        let active = self.control.register(machine.kill_switch(), deadline);
        result.phases.kernel_entry_ms = machine.kernel_entry().map(ms);
        result.snapshot = machine
            .restore_record()
            .and_then(|r| serde_json::to_value(r).ok());
        let ready_deadline = deadline.min(Instant::now() + s.readiness.timeout);
        let waiting = Instant::now();
        let ready = machine.wait_ready(&s.readiness, ready_deadline, &cancel);
        let waited = waiting.elapsed();
        let keep_evidence = |machine: &dyn Machine, message: Option<&str>| {
            let evidence = ReadinessEvidence::new(&s.readiness, machine, &ready, waited, message);
            let path = bundle.path(READINESS_JSON);
            let written = serde_json::to_vec_pretty(&evidence)
                .map_err(std::io::Error::other)
                .and_then(|json| write_atomic(&path, &json));
            if let Err(e) = written {
                tracing::warn!("cannot write {}: {e}", path.display());
            }
        };
        match ready.clone() {
            Ok(report) => {
                keep_evidence(machine.as_ref(), None);
                result.phases.ready_ms = Some(ms(t.elapsed()));
                out.ready = report
                    .record
                    .into_iter()
                    .chain(
                        report
                            .markers
                            .into_iter()
                            .map(|(l, at)| format!("{} {l}", ms(at))),
                    )
                    .map(|line| printable(&line))
                    .collect();
                tracing::info!("ready after {:.1} ms", ms(t.elapsed()));
                let mut transcript = Transcript::open(&bundle.path("agent.jsonl"));
                self.steps(
                    machine.as_mut(),
                    deadline,
                    &mut transcript,
                    bundle,
                    &mut out,
                    result,
                );
            }
            Err(e) => {
                // A VM stopped by Ctrl-C exits; that is the cancellation, not the guest's doing.
                let e = match e {
                    ReadyError::Exited(_) if cancel.load(std::sync::atomic::Ordering::SeqCst) => {
                        ReadyError::Cancelled
                    }
                    other => other,
                };
                let (class, msg) = match e {
                    ReadyError::Timeout(what, _) if active.expired() => (
                        FailureClass::ReadinessTimeout,
                        format!(
                            "scenario timeout of {} exceeded waiting for {what}",
                            humantime::format_duration(s.timeout)
                        ),
                    ),
                    ReadyError::Timeout(what, own) => (
                        FailureClass::ReadinessTimeout,
                        match own {
                            Some(own) => format!(
                                "{what} did not appear within its own timeout of {}",
                                humantime::format_duration(own)
                            ),
                            None => format!(
                                "{what} did not appear within the readiness timeout of {}",
                                humantime::format_duration(s.readiness.timeout)
                            ),
                        },
                    ),
                    ReadyError::Panic(line) => (
                        FailureClass::GuestPanic,
                        format!("guest kernel panic: {line}"),
                    ),
                    ReadyError::Exited(why) => (FailureClass::ReadinessTimeout, why),
                    ReadyError::Cancelled => (
                        FailureClass::Cancelled,
                        "cancelled before the guest was ready".into(),
                    ),
                };
                tracing::warn!("{msg}");
                keep_evidence(machine.as_ref(), Some(&msg));
                out.failure = Some(fail(class, msg, None));
                out.steps = skipped(s, 0);
            }
        }
        if self.opts.pause_before_teardown || (self.opts.debug && out.failure.is_some()) {
            if let Some(pause) = &self.opts.pause {
                if !cancel.load(std::sync::atomic::Ordering::SeqCst) {
                    let record = self.open_for_shell(machine.as_mut(), plan, bundle);
                    pause(&Pause {
                        what: format!(
                            "{} (run {}): VM still running; work dir {}; bundle {}",
                            s.id,
                            plan.run_id,
                            work.display(),
                            bundle.staging.display()
                        ),
                        scenario: s.id.clone(),
                        record: record.clone(),
                    });
                    if let Some(path) = record {
                        // Not part of the bundle: it described a VM that is about to go.
                        if let Err(e) = fs::remove_file(&path) {
                            tracing::warn!("cannot remove {}: {e}", path.display());
                        }
                    }
                }
            }
        }
        let t = Instant::now();
        if machine.console().is_closed() || cancel.load(std::sync::atomic::Ordering::SeqCst) {
            machine.kill();
        } else if let Err(e) = machine.shutdown(SHUTDOWN_TIMEOUT) {
            tracing::warn!("clean shutdown failed ({e}); killing the VM");
            machine.kill();
        }
        out.console_tail = machine
            .console()
            .tail(CONSOLE_TAIL)
            .iter()
            .map(|line| printable(line))
            .collect();
        drop(machine);
        drop(active);
        result.phases.teardown_ms = Some(ms(t.elapsed()));
        tracing::info!("torn down in {:.1} ms", ms(t.elapsed()));
        out
    }

    /// Lets `kiln shell`/`kiln exec` in while the run is paused: the machine lets go of its
    /// agent and `paused.json` in the staging bundle says where it is. The record's path, or
    /// `None` when the machine has no reachable agent or the record could not be written.
    fn open_for_shell(
        &self,
        machine: &mut dyn Machine,
        plan: &RunPlan,
        bundle: &Bundle,
    ) -> Option<PathBuf> {
        let agent = machine.release_agent()?;
        let run = PausedRun {
            scenario: self.scenario.id.clone(),
            run_id: plan.run_id.clone(),
            agent,
        };
        match super::paused::record(&bundle.staging, &run) {
            Ok(path) => Some(path),
            Err(e) => {
                tracing::warn!(
                    "cannot write {}: {e}",
                    bundle.path(super::paused::PAUSED_FILE).display()
                );
                None
            }
        }
    }

    fn steps(
        &self,
        machine: &mut dyn Machine,
        deadline: Instant,
        transcript: &mut Transcript,
        bundle: &Bundle,
        out: &mut Driven,
        result: &mut RunResult,
    ) {
        let s = self.scenario;
        let cancel = self.control.cancel_flag();
        let mut console_from = 0;
        for (index, step) in s.steps.iter().enumerate() {
            let t = Instant::now();
            let step_deadline = deadline.min(t + step.timeout);
            let mut record = StepResult {
                index,
                name: step.name.clone(),
                status: StepStatus::Pass,
                duration_ms: 0.0,
                exit_code: None,
                signal: None,
                message: None,
                stdout: None,
                stderr: None,
            };
            let outcome: Result<(), Failure> = match &step.action {
                StepAction::Run(run) => {
                    let request = ExecRequest {
                        argv: run.argv.clone(),
                        env: run
                            .env
                            .iter()
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect(),
                        cwd: run.cwd.clone(),
                        stdin: run.stdin.as_bytes().to_vec(),
                        timeout_ms: Some(step.timeout.as_millis().try_into().unwrap_or(u64::MAX)),
                    };
                    let answer =
                        machine.exec(&request, deadline.min(t + step.timeout + AGENT_GRACE));
                    transcript.record(json!({"op": "exec", "argv": request.argv, "result": match &answer {
                        Ok(o) => json!({"code": o.code, "signal": o.signal, "timed_out": o.timed_out, "stdout": String::from_utf8_lossy(&o.stdout), "stderr": String::from_utf8_lossy(&o.stderr)}),
                        Err(e) => json!({"error": e.to_string()}),
                    }, "ms": ms(t.elapsed())}));
                    match answer {
                        Ok(o) => {
                            record.exit_code = o.code;
                            record.signal = o.signal;
                            record.stdout = Some(String::from_utf8_lossy(&o.stdout).into_owned());
                            record.stderr = Some(String::from_utf8_lossy(&o.stderr).into_owned());
                            check_output(run, &o, step.timeout)
                                .map_err(|(class, m)| fail(class, m, Some(index)))
                        }
                        Err(e) => Err(self.machine_failure(machine, e, index, deadline)),
                    }
                }
                StepAction::Put {
                    src,
                    content,
                    dest,
                    mode,
                } => {
                    let data = match (src, content) {
                        (Some(path), _) => fs::read(path).map_err(|e| {
                            fail(
                                FailureClass::InfraError,
                                format!("cannot read {}: {e}", path.display()),
                                Some(index),
                            )
                        }),
                        (None, Some(c)) => Ok(c.as_bytes().to_vec()),
                        (None, None) => Ok(Vec::new()),
                    };
                    let answer = data.and_then(|d| {
                        machine
                            .put(dest, *mode, &d, step_deadline)
                            .map_err(|e| self.machine_failure(machine, e, index, deadline))
                    });
                    transcript.record(json!({"op": "put", "path": dest, "ok": answer.is_ok(), "ms": ms(t.elapsed())}));
                    answer
                }
                StepAction::Get { src, dest } => {
                    let answer = machine
                        .get(src, GET_MAX, step_deadline)
                        .map_err(|e| self.machine_failure(machine, e, index, deadline));
                    transcript.record(json!({"op": "get", "path": src, "ok": answer.is_ok(), "ms": ms(t.elapsed())}));
                    answer.and_then(|data| {
                        let target = bundle.path("fixtures").join(dest);
                        target
                            .parent()
                            .map_or(Ok(()), fs::create_dir_all)
                            .and_then(|_| write_atomic(&target, &data))
                            .map_err(|e| {
                                fail(
                                    FailureClass::InfraError,
                                    format!("cannot write {}: {e}", target.display()),
                                    Some(index),
                                )
                            })
                    })
                }
                StepAction::WaitConsole(p) => {
                    match machine
                        .console()
                        .wait_for(console_from, &p.0, step_deadline, &cancel)
                    {
                        ConsoleWait::Matched { index: i, .. } => {
                            console_from = i + 1;
                            Ok(())
                        }
                        ConsoleWait::Panic(l) => Err(fail(
                            FailureClass::GuestPanic,
                            format!("guest kernel panic: {l}"),
                            Some(index),
                        )),
                        ConsoleWait::Closed => Err(fail(
                            FailureClass::StepFailed,
                            format!("the VM exited before /{}/ appeared", p.0.as_str()),
                            Some(index),
                        )),
                        ConsoleWait::Cancelled => {
                            Err(fail(FailureClass::Cancelled, "cancelled", Some(index)))
                        }
                        ConsoleWait::TimedOut => Err(fail(
                            FailureClass::StepTimeout,
                            format!(
                                "no console line matched /{}/ within {}",
                                p.0.as_str(),
                                humantime::format_duration(step.timeout)
                            ),
                            Some(index),
                        )),
                    }
                }
            };
            // A panic seen on the console outranks whatever the step saw of it.
            let outcome = match (outcome, machine.console().panic_line()) {
                (Err(_), Some(line)) | (Ok(()), Some(line)) => Err(fail(
                    FailureClass::GuestPanic,
                    format!("guest kernel panic: {line}"),
                    Some(index),
                )),
                (o, None) => o,
            };
            record.duration_ms = ms(t.elapsed());
            result.phases.steps_ms.push(record.duration_ms);
            match outcome {
                Ok(()) => {
                    tracing::info!(
                        step = index,
                        "step `{}` passed in {:.1} ms",
                        step.name,
                        record.duration_ms
                    );
                    out.steps.push(record);
                }
                Err(f) => {
                    tracing::warn!(
                        step = index,
                        "step `{}` failed: {}: {}",
                        step.name,
                        f.class.as_str(),
                        f.message
                    );
                    record.status = StepStatus::Fail;
                    record.message = Some(f.message.clone());
                    out.steps.push(record);
                    out.steps.extend(skipped(s, index + 1));
                    out.failure = Some(f);
                    return;
                }
            }
        }
    }

    /// Classifies a failed machine operation.
    fn machine_failure(
        &self,
        machine: &dyn Machine,
        e: MachineError,
        index: usize,
        deadline: Instant,
    ) -> Failure {
        if let Some(line) = machine.console().panic_line() {
            return fail(
                FailureClass::GuestPanic,
                format!("guest kernel panic: {line}"),
                Some(index),
            );
        }
        if self
            .control
            .cancel_flag()
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return fail(FailureClass::Cancelled, "cancelled", Some(index));
        }
        if Instant::now() >= deadline {
            let msg = format!(
                "scenario timeout of {} exceeded",
                humantime::format_duration(self.scenario.timeout)
            );
            return fail(FailureClass::StepTimeout, msg, Some(index));
        }
        match e {
            MachineError::Timeout { .. } => {
                fail(FailureClass::StepTimeout, e.to_string(), Some(index))
            }
            MachineError::Agent(what) => {
                fail(FailureClass::StepFailed, what.to_string(), Some(index))
            }
            other => fail(FailureClass::InfraError, other.to_string(), Some(index)),
        }
    }
}

fn skipped(s: &Scenario, from: usize) -> Vec<StepResult> {
    s.steps
        .iter()
        .enumerate()
        .skip(from)
        .map(|(index, step)| StepResult {
            index,
            name: step.name.clone(),
            status: StepStatus::Skipped,
            duration_ms: 0.0,
            exit_code: None,
            signal: None,
            message: None,
            stdout: None,
            stderr: None,
        })
        .collect()
}

/// The agent transcript (agent.jsonl): one JSON line per request and its answer.
struct Transcript {
    file: Option<fs::File>,
}

impl Transcript {
    fn open(path: &PathBuf) -> Transcript {
        let file = fs::OpenOptions::new().create(true).append(true).open(path);
        if let Err(e) = &file {
            tracing::warn!("cannot open {}: {e}", path.display());
        }
        Transcript { file: file.ok() }
    }

    fn record(&mut self, entry: serde_json::Value) {
        if let Some(f) = self.file.as_mut() {
            if writeln!(f, "{entry}").is_err() {
                tracing::warn!("agent transcript write failed; stopping the transcript");
                self.file = None;
            }
        }
    }
}
