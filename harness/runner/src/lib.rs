//! `kiln run`: N job slots (threads), each scenario in its own VM and temp dir, retries,
//! fail-fast, a global-timeout watchdog and Ctrl-C handling (first: stop scheduling and tear
//! down running VMs; second: kill everything, remove the running scenarios' work dirs and exit
//! at once).

pub mod artifacts;
pub mod baseline;
pub mod environment;
mod execute;
mod expect;
pub mod paused;
pub mod readiness;
pub mod report;
pub mod retention;
pub mod select;
pub mod stale;
pub mod tracelog;

use std::collections::{BTreeMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use artifacts::{ArtifactsMode, FailureClass, KeepPolicy, Provenance, RunResult, Verdict};
pub use environment::Environment;
pub use execute::CONSOLE_TAIL;

use kiln_backends::{Backend, CancelFlag, KillSwitch};
use kiln_scenario::Scenario;

/// Resolves a guest to (kernel, initrd): `None` the default guest, `Some(reference)` a registry
/// guest (`oci://…@sha256:…`, as in `guest.kernel`).
pub type GuestResolver =
    Arc<dyn Fn(Option<&str>) -> Result<(PathBuf, PathBuf), GuestUnavailable> + Send + Sync>;

/// The guest could not be had (built, found or pulled); the resolver's own error says why.
/// Cheap to clone, so one answer can serve every scenario of a run.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the guest is not available: {0}")]
pub struct GuestUnavailable(#[source] pub Arc<dyn std::error::Error + Send + Sync>);
/// Called before a VM is torn down with `--pause-before-teardown`; returns when to continue.
pub type PauseHook = Arc<dyn Fn(&Pause) + Send + Sync>;

/// What a pause tells the person at the terminal.
#[derive(Debug, Clone)]
pub struct Pause {
    /// One line: the scenario, the run, its work dir and staging bundle.
    pub what: String,
    /// The scenario's id.
    pub scenario: String,
    /// The run's [`paused`] record when its guest agent can be reached meanwhile (`kiln shell`).
    pub record: Option<PathBuf>,
}

/// How to run.
#[derive(Clone)]
pub struct RunOptions {
    /// Parallel job slots (≥ 1).
    pub jobs: usize,
    /// Artifact root.
    pub artifacts: PathBuf,
    /// Which bundles to keep.
    pub keep: KeepPolicy,
    /// Keep work dirs, pause on failure.
    pub debug: bool,
    /// Pause before every teardown.
    pub pause_before_teardown: bool,
    /// Stop scheduling after the first failure.
    pub fail_fast: bool,
    /// Extra attempts for a failed scenario.
    pub retries: u32,
    /// The default guest and registry guests, when available.
    pub default_guest: Option<GuestResolver>,
    /// The pause prompt.
    pub pause: Option<PauseHook>,
    /// Provenance shared by every run (kiln version, host KVM).
    pub provenance_base: Provenance,
    /// Who may read bundles (owner only by default).
    pub artifacts_mode: ArtifactsMode,
    /// Most bytes of console.log per run.
    pub console_log_limit: u64,
    /// Overrides every scenario's `fixtures_limit` (bytes copied from its shares).
    pub fixtures_limit: Option<u64>,
    /// Where the run runs, recorded in every result and the summary (none by default).
    pub environment: Option<Environment>,
    /// The snapshot cache: on the kiln backend, scenarios whose readiness is the agent's record
    /// start from a snapshot of their guest shape kept here (`None`: every VM boots cold).
    pub snapshot_cache: Option<PathBuf>,
}

/// The git revision kiln was built from ("0123456789ab", "-dirty" when the tree had changes),
/// `None` outside a git checkout.
pub fn git_rev() -> Option<&'static str> {
    option_env!("KILN_GIT_REV")
}

impl RunOptions {
    /// Options with defaults: 1 job, keep always, no retries.
    pub fn new(artifacts: PathBuf) -> RunOptions {
        RunOptions {
            jobs: 1,
            artifacts,
            keep: KeepPolicy::Always,
            debug: false,
            pause_before_teardown: false,
            fail_fast: false,
            retries: 0,
            default_guest: None,
            pause: None,
            provenance_base: Provenance {
                kiln_version: env!("CARGO_PKG_VERSION").into(),
                kiln_git_rev: git_rev().map(str::to_string),
                ..Provenance::default()
            },
            artifacts_mode: ArtifactsMode::Private,
            console_log_limit: kiln_backends::console::DEFAULT_CONSOLE_LOG_LIMIT,
            fixtures_limit: None,
            snapshot_cache: None,
            environment: None,
        }
    }
}

/// Progress of a run, for reporters.
#[derive(Debug)]
pub enum RunEvent<'a> {
    /// An attempt started.
    Started {
        /// Scenario id.
        id: &'a str,
        /// Attempt number.
        attempt: u32,
    },
    /// An attempt failed and will be retried.
    Retrying(&'a RunResult),
    /// A scenario finished (its last attempt).
    Finished(&'a ScenarioOutcome),
}

/// The final outcome of one scenario.
#[derive(Debug, Clone)]
pub struct ScenarioOutcome {
    /// The last attempt's result.
    pub result: RunResult,
    /// Earlier failed attempts.
    pub retries: Vec<RunResult>,
}

impl ScenarioOutcome {
    /// Passed, possibly after retries.
    pub fn passed(&self) -> bool {
        self.result.passed()
    }
}

/// Everything a run produced.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Finished scenarios, in corpus order.
    pub outcomes: Vec<ScenarioOutcome>,
    /// Scenarios never started (fail-fast, Ctrl-C).
    pub not_run: Vec<String>,
    /// Whether the run was interrupted.
    pub cancelled: bool,
    /// Wall time.
    pub elapsed: Duration,
    /// Where it ran ([`RunOptions::environment`]).
    pub environment: Option<Environment>,
}

/// How a run ended as a whole; the command line turns it into its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// Every scenario ran and passed.
    Passed,
    /// A scenario failed, or was never started (fail-fast).
    Failed,
    /// Ctrl-C stopped the run.
    Interrupted,
}

impl RunSummary {
    /// Interrupted when cancelled, else Passed when every scenario ran and passed.
    pub fn outcome(&self) -> RunOutcome {
        if self.cancelled {
            RunOutcome::Interrupted
        } else if self.outcomes.iter().all(ScenarioOutcome::passed) && self.not_run.is_empty() {
            RunOutcome::Passed
        } else {
            RunOutcome::Failed
        }
    }
}

struct ActiveRun {
    kill: KillSwitch,
    deadline: Instant,
    expired: Arc<AtomicBool>,
}

/// How long the second Ctrl-C spends removing work dirs before the process exits anyway.
pub const ABORT_CLEANUP_LIMIT: Duration = Duration::from_secs(3);
/// How long the second Ctrl-C waits for the kills it fired before it removes work dirs.
pub const ABORT_KILL_WAIT: Duration = Duration::from_secs(1);

/// Cancellation and the registries of running VMs and their work dirs, shared with the Ctrl-C
/// handler and the global-timeout watchdog.
#[derive(Default)]
pub struct Control {
    cancel: CancelFlag,
    interrupts: AtomicUsize,
    next: AtomicU64,
    active: Mutex<BTreeMap<u64, ActiveRun>>,
    work_dirs: Mutex<BTreeMap<u64, PathBuf>>,
}

/// Unregisters a work dir when dropped (its owner removes it itself then).
pub struct WorkDirGuard<'a> {
    control: &'a Control,
    key: u64,
}

impl Drop for WorkDirGuard<'_> {
    fn drop(&mut self) {
        self.control.work_dirs().remove(&self.key);
    }
}

/// Unregisters a running VM when dropped.
pub struct ActiveGuard<'a> {
    control: &'a Control,
    key: u64,
    expired: Arc<AtomicBool>,
}

impl ActiveGuard<'_> {
    /// Whether the watchdog killed the VM at the scenario's deadline.
    pub fn expired(&self) -> bool {
        self.expired.load(Ordering::SeqCst)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.control.lock().remove(&self.key);
    }
}

impl Control {
    /// A fresh control.
    pub fn new() -> Arc<Control> {
        Arc::new(Control::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ActiveRun>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn work_dirs(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, PathBuf>> {
        self.work_dirs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a running scenario's work dir, which the second Ctrl-C removes: the process
    /// exits then without unwinding, so the `TempDir` owning it never gets to.
    pub fn register_work_dir(&self, dir: &Path) -> WorkDirGuard<'_> {
        let key = self.next.fetch_add(1, Ordering::SeqCst);
        self.work_dirs().insert(key, dir.to_path_buf());
        WorkDirGuard { control: self, key }
    }

    /// The cancellation flag.
    pub fn cancel_flag(&self) -> CancelFlag {
        self.cancel.clone()
    }

    /// Whether the run was cancelled.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Registers a running VM that must die at `deadline`.
    pub fn register(&self, kill: KillSwitch, deadline: Instant) -> ActiveGuard<'_> {
        let key = self.next.fetch_add(1, Ordering::SeqCst);
        let expired = Arc::new(AtomicBool::new(false));
        self.lock().insert(
            key,
            ActiveRun {
                kill,
                deadline,
                expired: expired.clone(),
            },
        );
        ActiveGuard {
            control: self,
            key,
            expired,
        }
    }

    /// Ctrl-C: the first stops scheduling and stops running VMs (their scenarios then tear down
    /// and write bundles); a later one kills every VM again, removes the running scenarios' work
    /// dirs (overlays, sockets, output shares; at most [`ABORT_CLEANUP_LIMIT`]) and returns
    /// `true`, meaning "exit now".
    pub fn interrupt(&self) -> bool {
        let n = self.interrupts.fetch_add(1, Ordering::SeqCst);
        self.cancel.store(true, Ordering::SeqCst);
        // Kill first, so no VM writes into a work dir while it is being removed; the kills run
        // on their own threads, so one stuck VM cannot keep this handler (and the next Ctrl-C)
        // waiting.
        let kills = self.kill_all();
        if n == 0 {
            return false;
        }
        if !kills.wait(ABORT_KILL_WAIT) {
            tracing::warn!(
                "VMs not dead within {}; removing work dirs anyway",
                humantime::format_duration(ABORT_KILL_WAIT)
            );
        }
        let dirs: Vec<PathBuf> = self.work_dirs().values().cloned().collect();
        remove_dirs_within(dirs, ABORT_CLEANUP_LIMIT);
        true
    }

    /// Starts killing every running VM, each on its own thread; the returned [`Kills`] says
    /// when they are done.
    pub fn kill_all(&self) -> Kills {
        let kills: Vec<KillSwitch> = self.lock().values().map(|a| a.kill.clone()).collect();
        Kills::start(kills)
    }

    /// Starts killing the VMs past their deadline, each on its own thread: the watchdog goes
    /// straight back to the other deadlines, however long one VM takes to die.
    fn reap_expired(&self) {
        let now = Instant::now();
        let kills: Vec<KillSwitch> = self
            .lock()
            .values()
            .filter(|a| a.deadline <= now && !a.expired.swap(true, Ordering::SeqCst))
            .map(|a| a.kill.clone())
            .collect();
        if !kills.is_empty() {
            tracing::warn!("scenario deadline passed: stopping its VM");
            Kills::start(kills);
        }
    }
}

/// Kill switches running on their own threads (`kiln-kill`). A kill switch may block for as
/// long as its VM takes to die; nobody has to wait for it.
pub struct Kills {
    done: std::sync::mpsc::Receiver<()>,
    count: usize,
}

impl Kills {
    fn start(kills: Vec<KillSwitch>) -> Kills {
        let (tx, done) = std::sync::mpsc::channel();
        let mut count = 0;
        for kill in kills {
            let tx = tx.clone();
            let spawned = std::thread::Builder::new()
                .name("kiln-kill".into())
                .spawn(move || {
                    kill();
                    let _ = tx.send(());
                });
            match spawned {
                Ok(_) => count += 1,
                Err(e) => tracing::warn!("cannot start a kill thread ({e}); the VM lives on"),
            }
        }
        Kills { done, count }
    }

    /// Waits up to `limit` for every kill to return; returns whether they all did.
    pub fn wait(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        for _ in 0..self.count {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.done.recv_timeout(left).is_err() {
                return false;
            }
        }
        true
    }
}

/// Removes `dirs` (best effort) on a helper thread and waits for it at most `limit`: a removal
/// stuck on a hung filesystem must not keep the second Ctrl-C from exiting.
fn remove_dirs_within(dirs: Vec<PathBuf>, limit: Duration) {
    if dirs.is_empty() {
        return;
    }
    let (done, wait) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("kiln-abort-cleanup".into())
        .spawn(move || {
            for dir in dirs {
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!("cannot remove {}: {e}", dir.display());
                    }
                }
            }
            let _ = done.send(());
        });
    match spawned {
        Ok(_) => {
            if wait.recv_timeout(limit).is_err() {
                tracing::warn!(
                    "work dirs not removed within {}; exiting anyway",
                    humantime::format_duration(limit)
                );
            }
        }
        Err(e) => tracing::warn!("cannot start the cleanup thread: {e}"),
    }
}

/// Runs `scenarios` on `backend`; `on_event` sees progress (from worker threads).
pub fn run(
    scenarios: &[Scenario],
    backend: &dyn Backend,
    opts: &RunOptions,
    control: &Control,
    on_event: &(dyn Fn(RunEvent<'_>) + Sync),
) -> RunSummary {
    let started = Instant::now();
    let queue: Mutex<VecDeque<(usize, &Scenario)>> =
        Mutex::new(scenarios.iter().enumerate().collect());
    let outcomes: Mutex<Vec<(usize, ScenarioOutcome)>> = Mutex::new(Vec::new());
    let failed = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                control.reap_expired();
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let workers: Vec<_> = (0..opts.jobs.max(1))
            .map(|_| {
                scope.spawn(|| loop {
                    if control.cancelled() || (opts.fail_fast && failed.load(Ordering::SeqCst)) {
                        return;
                    }
                    let Some((index, scenario)) =
                        queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front()
                    else {
                        return;
                    };
                    let outcome = run_scenario(scenario, backend, opts, control, on_event);
                    if !outcome.passed() {
                        failed.store(true, Ordering::SeqCst);
                    }
                    on_event(RunEvent::Finished(&outcome));
                    outcomes
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((index, outcome));
                })
            })
            .collect();
        for w in workers {
            let _ = w.join();
        }
        done.store(true, Ordering::SeqCst);
    });
    let mut outcomes = outcomes.into_inner().unwrap_or_else(|p| p.into_inner());
    outcomes.sort_by_key(|(i, _)| *i);
    let not_run = queue
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .map(|(_, s)| s.id.clone())
        .collect();
    RunSummary {
        outcomes: outcomes.into_iter().map(|(_, o)| o).collect(),
        not_run,
        cancelled: control.cancelled(),
        elapsed: started.elapsed(),
        environment: opts.environment.clone(),
    }
}

/// Runs one scenario with its retries; a panic escaping an attempt becomes an infra error.
fn run_scenario(
    scenario: &Scenario,
    backend: &dyn Backend,
    opts: &RunOptions,
    control: &Control,
    on_event: &(dyn Fn(RunEvent<'_>) + Sync),
) -> ScenarioOutcome {
    let mut retries = Vec::new();
    let mut attempt = 1;
    loop {
        on_event(RunEvent::Started {
            id: &scenario.id,
            attempt,
        });
        let result = catch_unwind(AssertUnwindSafe(|| {
            execute::Attempt {
                backend,
                opts,
                control,
                scenario,
                attempt,
            }
            .run()
        }))
        .unwrap_or_else(|_| panicked_result(scenario, attempt));
        let retry = !result.passed()
            && attempt <= opts.retries
            && !control.cancelled()
            && result.class() != Some(FailureClass::Cancelled);
        if !retry {
            return ScenarioOutcome { result, retries };
        }
        on_event(RunEvent::Retrying(&result));
        retries.push(result);
        attempt += 1;
    }
}

fn panicked_result(scenario: &Scenario, attempt: u32) -> RunResult {
    RunResult {
        scenario: scenario.id.clone(),
        run_id: String::new(),
        attempt,
        verdict: Verdict::Fail,
        failure: Some(artifacts::Failure {
            class: FailureClass::InfraError,
            message: "harness panicked outside the scenario's VM phases".into(),
            step: None,
        }),
        started_at: String::new(),
        ready: Vec::new(),
        steps: Vec::new(),
        expectations: Vec::new(),
        phases: artifacts::Phases::default(),
        provenance: Provenance::default(),
        environment: None,
        bundle: None,
        console_tail: Vec::new(),
        snapshot: None,
    }
}

#[cfg(test)]
mod tests;
