//! `kiln run` and `kiln scenario check`: corpus loading, selection, backend choice, Ctrl-C,
//! and the output layer (live lines, summary, `--json`, `--junit`). Exit codes (crate::exit):
//! SUCCESS all passed, FAILURES some failed, USAGE usage or configuration error (nothing
//! booted), ENVIRONMENT_DRIFT the host is not the one `--expect-environment` pins (nothing
//! booted), REGRESSIONS a scenario fails that did not fail in the `--baseline` (FAILURES then
//! means every failure was already there), INTERRUPTED Ctrl-C.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use clap::Args;

use kiln_backends::{self as backend, Backend};
use kiln_guest_build::registry::{self, Reference};

use crate::args::{BackendArg, KeepArg};
use crate::commands::artifacts::Budget;
use crate::exit;
use kiln_runner::baseline::{Baseline, Comparison};
use kiln_runner::environment::{Contract, Environment};
use kiln_runner::report::{self, LiveReporter};
use kiln_runner::select::{Filter, Partition};
use kiln_runner::{self as runner, artifacts::write_atomic, Control, RunOptions};
use kiln_scenario::{load_corpus, ImageRef, Scenario};

/// `kiln run` arguments.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Scenario files or directories.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Scenarios run at once (default: the number of CPUs).
    #[arg(long, short = 'j', value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub jobs: Option<u64>,
    /// Backend: kiln's VMM, QEMU, or auto (kiln with hardware KVM, else QEMU).
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    pub backend: BackendArg,
    /// Run only scenarios whose id is ID or matches REGEX (repeatable).
    #[arg(long, value_name = "ID|REGEX")]
    pub filter: Vec<Filter>,
    /// Run one shard: hash:I/N (by a stable hash of the id) or count:I/N (round-robin).
    #[arg(long, value_name = "hash:I/N|count:I/N")]
    pub partition: Option<Partition>,
    /// Where bundles go: <DIR>/<scenario-id>/<run-id>/.
    #[arg(long, value_name = "DIR", default_value = crate::args::DEFAULT_ARTIFACTS)]
    pub artifacts: PathBuf,
    /// Which bundles to keep.
    #[arg(long, value_enum, default_value_t = KeepArg::Always)]
    pub keep_artifacts: KeepArg,
    /// Keep each run's work dir (overlays, sockets) and pause before tearing down a failed VM.
    #[arg(long)]
    pub debug: bool,
    /// Pause before every teardown until Enter is pressed.
    #[arg(long)]
    pub pause_before_teardown: bool,
    /// Boot every VM cold. By default the kiln backend starts scenarios whose readiness is the
    /// agent's record from a snapshot of their guest shape, made once at KILN_READY and kept
    /// in the cache (~/.cache/kiln/snapshots).
    #[arg(long)]
    pub no_snapshot: bool,
    /// Print one JSON document with every result on stdout.
    #[arg(long)]
    pub json: bool,
    /// Write JUnit XML to FILE.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Stop starting scenarios after the first failure.
    #[arg(long)]
    pub fail_fast: bool,
    /// Run a failed scenario up to N more times.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub retries: u32,
    /// Fail before booting anything unless this host matches the environment contract FILE
    /// (TOML, or JSON when it ends in .json); `kiln doctor --environment` prints one.
    #[arg(long, value_name = "FILE")]
    pub expect_environment: Option<PathBuf>,
    #[command(flatten)]
    pub bundle: crate::args::BundleArgs,
    /// Budget for the whole artifacts dir (bytes or "2GiB"; default: `[artifacts] max_size` in
    /// the corpus's kiln.toml): its use is reported after the summary, with a warning when over.
    #[arg(long, value_name = "SIZE", value_parser = crate::args::parse_size)]
    pub max_size: Option<u64>,
    /// Fail before booting anything when the artifacts dir is already over its budget.
    #[arg(long)]
    pub enforce_budget: bool,
    /// Use this registry guest (oci://HOST/REPOSITORY@sha256:HEX, pulled into the cache and
    /// verified on first use) wherever a scenario asks for the default guest.
    #[arg(long, value_name = "oci://HOST/REPO@sha256:HEX")]
    pub guest: Option<String>,
    /// Compare with an earlier run: its artifacts dir (each <scenario-id>/latest/result.json)
    /// or its --json output. The summary and --json say per scenario what changed, regressed
    /// bundles get regression-summary.txt, and regressions exit 5 (failures the baseline already
    /// had exit 1).
    #[arg(long, value_name = "DIR|FILE")]
    pub baseline: Option<PathBuf>,
}

fn print_errors(errors: &[impl std::fmt::Display]) {
    for e in errors {
        eprintln!("kiln: error: {e}");
    }
}

/// `kiln scenario check PATH...`.
pub fn check(paths: &[PathBuf]) -> i32 {
    match load_corpus(paths) {
        Ok(scenarios) => {
            println!(
                "ok: {} valid",
                runner::report::plural(scenarios.len(), "scenario")
            );
            exit::SUCCESS
        }
        Err(errors) => {
            print_errors(&errors);
            eprintln!("kiln: {} error(s); nothing was run", errors.len());
            exit::USAGE
        }
    }
}

/// Loads and selects the scenarios `args` ask for.
pub fn select(args: &RunArgs) -> Result<Vec<Scenario>, Vec<String>> {
    let corpus = load_corpus(&args.paths)
        .map_err(|errs| errs.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    let unmatched: Vec<String> = args
        .filter
        .iter()
        .filter(|f| !corpus.iter().any(|s| f.matches(&s.id)))
        .map(|f| format!("--filter {:?} matches no scenario id", f.as_str()))
        .collect();
    if !unmatched.is_empty() {
        return Err(unmatched);
    }
    let mut selected: Vec<Scenario> = corpus
        .into_iter()
        .filter(|s| args.filter.is_empty() || args.filter.iter().any(|f| f.matches(&s.id)))
        .collect();
    if let Some(partition) = args.partition {
        let ids: Vec<&str> = selected.iter().map(|s| s.id.as_str()).collect();
        let keep: Vec<String> = partition
            .select(&ids)
            .into_iter()
            .map(str::to_string)
            .collect();
        selected.retain(|s| keep.contains(&s.id));
    }
    Ok(selected)
}

/// `kiln run`.
pub fn run(args: RunArgs) -> i32 {
    let scenarios = match select(&args) {
        Ok(s) => s,
        Err(errors) => {
            print_errors(&errors);
            return exit::USAGE;
        }
    };
    let contract = match args.expect_environment.as_deref().map(Contract::load) {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(e)) => {
            eprintln!("kiln: error: --expect-environment {e}");
            return exit::USAGE;
        }
    };
    // Read before anything runs: the baseline may be the artifacts dir this run updates.
    let baseline = match args.baseline.as_deref().map(Baseline::load) {
        None => None,
        Some(Ok(b)) => Some(b),
        Some(Err(e)) => {
            eprintln!("kiln: error: --baseline {e}");
            return exit::USAGE;
        }
    };
    let budget = match check_budget(&args) {
        Ok(budget) => budget,
        Err(error) => {
            eprintln!("kiln: error: {error}");
            return exit::USAGE;
        }
    };
    let doctor = kiln_backends::doctor::report();
    let kvm_kind = kvm_kind_name(&doctor);
    let environment = host_environment(&doctor);
    eprintln!("kiln: {}", environment.summary_line());
    if let Some(contract) = contract {
        let drift = contract.check(&environment);
        for d in &drift {
            eprintln!("kiln: environment drift: {d}");
        }
        if !drift.is_empty() {
            eprintln!(
                "kiln: environment drift in {} against {}; nothing was run",
                report::plural(drift.len(), "field"),
                contract.path.display()
            );
            return exit::ENVIRONMENT_DRIFT;
        }
    }
    let (kind, why) = backend::choose(args.backend.into(), doctor.kvm.linux_capable(), &kvm_kind);
    eprintln!("kiln: backend {kind} ({why})");
    let backend = match backend::construct(kind, doctor.kvm.linux_capable(), &kvm_kind) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("kiln: error: {e}");
            return exit::USAGE;
        }
    };
    let mut opts = options(&args);
    opts.provenance_base.host_kvm = kvm_kind;
    opts.environment = Some(environment);
    let resolver = match args.guest.as_deref().map(pinned_guest).transpose() {
        Ok(default) => guest_resolver(default),
        Err(e) => {
            eprintln!("kiln: error: --guest: {e}");
            return exit::USAGE;
        }
    };
    // Build, find or pull them before the first scenario starts, so that their progress lines
    // are not mixed into a scenario's.
    for guest in guests_wanted(&scenarios) {
        match resolver(guest.as_deref()) {
            // Hash the images for provenance once here rather than inside the first scenarios.
            Ok((kernel, initrd)) => {
                runner::artifacts::file_id(&kernel);
                runner::artifacts::file_id(&initrd);
            }
            Err(e) => eprintln!("kiln: error: {e}"),
        }
    }
    opts.default_guest = Some(resolver);
    let artifacts = opts.artifacts.clone();
    let code = run_with(&args, scenarios, backend.as_ref(), opts, baseline.as_ref());
    if let Some(budget) = budget {
        match runner::retention::scan(&artifacts) {
            Ok(inventory) => {
                for line in budget.report(&args.artifacts, &inventory) {
                    eprintln!("{line}");
                }
            }
            Err(e) => eprintln!(
                "kiln: warning: cannot measure {} against its budget: {e}",
                args.artifacts.display()
            ),
        }
    }
    code
}

/// The run's artifacts budget; with `--enforce-budget`, an error when there is none or the
/// artifacts dir is already over it (before anything boots).
fn check_budget(args: &RunArgs) -> Result<Option<Budget>, String> {
    let budget = Budget::of_run(args.max_size, &args.paths).map_err(|e| e.to_string())?;
    if !args.enforce_budget {
        return Ok(budget);
    }
    let Some(budget) = budget else {
        return Err(
            "--enforce-budget needs a budget: --max-size SIZE, or [artifacts] \
                    max_size in the corpus's kiln.toml"
                .into(),
        );
    };
    let inventory = runner::retention::scan(&args.artifacts).map_err(|e| {
        format!(
            "--enforce-budget: cannot read {}: {e}",
            args.artifacts.display()
        )
    })?;
    match budget.refusal(&args.artifacts, &inventory) {
        Some(refusal) => Err(refusal),
        None => Ok(Some(budget)),
    }
}

/// The KVM kind as `kiln doctor --json` spells it ("hardware", "pvm", ...).
pub(crate) fn kvm_kind_name(doctor: &kiln_backends::doctor::DoctorReport) -> String {
    serde_json::to_value(doctor.kvm.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// This host's identity, from the doctor probe the run already made (QEMU asked once).
pub(crate) fn host_environment(doctor: &kiln_backends::doctor::DoctorReport) -> Environment {
    Environment::probe(&kvm_kind_name(doctor), doctor.qemu_system.version.clone())
}

/// The guests `scenarios` ask for, each once: `None` the default guest, `Some` a registry one.
pub(crate) fn guests_wanted(scenarios: &[Scenario]) -> Vec<Option<String>> {
    let mut wanted = Vec::new();
    for scenario in scenarios {
        let guest = match &scenario.guest.kernel {
            ImageRef::Default => None,
            ImageRef::Registry(reference) => Some(reference.clone()),
            ImageRef::Path(_) => continue,
        };
        if !wanted.contains(&guest) {
            wanted.push(guest);
        }
    }
    wanted
}

/// Resolves guests once per run: the first scenario that needs one builds it into the cache, or
/// pulls it from its registry (progress on stderr), while the others wait; every later call gets
/// the cached answer. With `default` (`--guest`), the default guest is that registry guest.
pub(crate) fn guest_resolver(default: Option<Reference>) -> runner::GuestResolver {
    type Resolved = Result<(PathBuf, PathBuf), runner::GuestUnavailable>;
    let resolved: Arc<Mutex<HashMap<Option<String>, Resolved>>> = Arc::default();
    Arc::new(move |guest: Option<&str>| {
        let mut slots = resolved.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .entry(guest.map(str::to_owned))
            .or_insert_with(|| {
                let unavailable =
                    |e: kiln_guest_build::GuestError| runner::GuestUnavailable(Arc::new(e));
                let reference = match guest {
                    Some(given) => {
                        Some(Reference::parse(given).map_err(|e| unavailable(e.into()))?)
                    }
                    None => default.clone(),
                };
                let image = match reference {
                    Some(reference) => {
                        kiln_guest_build::Cache::default_location().and_then(|cache| {
                            registry::pull(&cache, &reference, &kiln_guest_build::stderr_progress)
                        })
                    }
                    None => kiln_guest_build::default_guest(),
                };
                image.map(|g| (g.kernel, g.initrd)).map_err(unavailable)
            })
            .clone()
    })
}

/// `--guest`: a registry reference pinned by digest.
fn pinned_guest(given: &str) -> Result<Reference, String> {
    let reference = Reference::parse(given).map_err(|e| e.to_string())?;
    if reference.digest.is_none() {
        return Err(format!(
            "{given:?} has no digest: a run pins its guest by digest \
             (oci://HOST/REPOSITORY@sha256:HEX, as `kiln guest push` prints it)"
        ));
    }
    Ok(reference)
}

/// Run options from the arguments (everything but the backend-dependent parts).
pub fn options(args: &RunArgs) -> RunOptions {
    // Absolute, because host-side verify commands run in the scenario's directory and get
    // bundle paths as arguments.
    let artifacts = std::path::absolute(&args.artifacts).unwrap_or_else(|_| args.artifacts.clone());
    let mut opts = RunOptions::new(artifacts);
    opts.jobs = args.jobs.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |j| usize::try_from(j).unwrap_or(1),
    );
    opts.keep = args.keep_artifacts.into();
    opts.debug = args.debug;
    opts.pause_before_teardown = args.pause_before_teardown;
    opts.snapshot_cache = if args.no_snapshot {
        None
    } else {
        kiln_guest_build::cache::cache_root()
            .ok()
            .and_then(|guests| guests.parent().map(|p| p.join("snapshots")))
    };
    opts.fail_fast = args.fail_fast;
    opts.retries = args.retries;
    args.bundle.apply(&mut opts);
    let prompt = Arc::new(Mutex::new(()));
    // `kiln shell` looks in the default artifacts dir unless told otherwise.
    let artifacts_flag = if args.artifacts == Path::new(crate::args::DEFAULT_ARTIFACTS) {
        String::new()
    } else {
        format!(" --artifacts {}", args.artifacts.display())
    };
    opts.pause = Some(Arc::new(move |pause: &runner::Pause| {
        let _one_at_a_time = prompt.lock().unwrap_or_else(|p| p.into_inner());
        eprintln!("kiln: paused: {}", pause.what);
        if pause.record.is_some() {
            let id = &pause.scenario;
            eprintln!(
                "kiln: paused; reach the VM with: kiln shell {id}{artifacts_flag}  |  \
                 kiln exec {id}{artifacts_flag} -- CMD"
            );
        }
        eprintln!("kiln: press Enter to tear down");
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
    }));
    opts
}

/// Runs the selected scenarios on `backend` and writes the reports, compared with `baseline`
/// when there is one; returns the exit code.
pub fn run_with(
    args: &RunArgs,
    scenarios: Vec<Scenario>,
    backend: &dyn Backend,
    opts: RunOptions,
    baseline: Option<&Baseline>,
) -> i32 {
    let (runnable, skipped): (Vec<Scenario>, Vec<Scenario>) = scenarios
        .into_iter()
        .partition(|s| s.allows(backend.kind()));
    for s in &skipped {
        let on: Vec<String> = s.backends.iter().map(ToString::to_string).collect();
        eprintln!("{:>6} {}: runs only on {}", "SKIP", s.id, on.join(", "));
    }
    sweep_stale(&opts.artifacts);
    let control = Control::new();
    let handler_control = control.clone();
    let handler = ctrlc::set_handler(move || {
        if handler_control.interrupt() {
            eprintln!("kiln: interrupted again: killed every VM, removed work dirs; exiting");
            std::process::exit(exit::INTERRUPTED);
        }
        eprintln!(
            "kiln: interrupted: tearing down running scenarios (Ctrl-C again to exit at once)"
        );
    });
    if let Err(e) = handler {
        tracing::warn!("no Ctrl-C handler: {e}");
    }
    let reporter = LiveReporter::new(runnable.len(), report::progress_wanted() && !args.json);
    let summary = runner::run(&runnable, backend, &opts, &control, &|e| {
        reporter.on_event(e)
    });
    reporter.finish();
    let comparison = baseline.map(|b| Comparison::new(b, &summary));
    let code = match &comparison {
        Some(c) => exit::of_run_against(summary.outcome(), c),
        None => exit::of_run(summary.outcome()),
    };
    eprint!("{}", report::summary_text(&summary, backend.name()));
    if let Some(c) = &comparison {
        eprint!("{}", c.summary_text(&summary));
        for error in c.write_regression_summaries(&summary, opts.artifacts_mode) {
            eprintln!("kiln: error: {error}");
        }
    }
    if let Some(path) = &args.junit {
        if let Err(e) = write_junit(path, &summary) {
            eprintln!("kiln: error: --junit {}: {e}", path.display());
        }
    }
    if args.json {
        let mut doc = report::json_document(&summary, backend.name(), code);
        if let Some(c) = &comparison {
            c.annotate(&mut doc);
        }
        println!("{doc}");
    }
    code
}

/// Removes what runs killed without warning left in the artifacts dir and TMPDIR (staging
/// bundles, work dirs with overlays and sockets), saying so in one line.
fn sweep_stale(artifacts: &std::path::Path) {
    let tmp = std::env::temp_dir();
    let swept = runner::stale::sweep(artifacts, &tmp);
    if !swept.removed.is_empty() {
        let pids: Vec<String> = swept.pids.iter().map(u32::to_string).collect();
        eprintln!(
            "kiln: removed {} {} (staging bundles, work dirs) left by killed runs (pid {}) \
             under {} and {}",
            swept.removed.len(),
            if swept.removed.len() == 1 {
                "entry"
            } else {
                "entries"
            },
            pids.join(", "),
            artifacts.display(),
            tmp.display()
        );
    }
    for failed in &swept.failed {
        eprintln!("kiln: warning: cannot remove what a killed run left: {failed}");
    }
}

/// Why the `--junit` report was not written.
#[derive(Debug, thiserror::Error)]
enum JunitError {
    #[error(transparent)]
    Xml(#[from] quick_junit::SerializeError),
    #[error(transparent)]
    Write(#[from] std::io::Error),
}

fn write_junit(path: &std::path::Path, summary: &runner::RunSummary) -> Result<(), JunitError> {
    let xml = report::junit::to_xml(summary)?;
    write_atomic(path, xml.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use kiln_backends::fake::{FakeBackend, FakeExec, FakeGuest};
    use kiln_scenario::BackendKind;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: RunArgs,
    }

    fn args(argv: &[&str]) -> RunArgs {
        let mut full = vec!["kiln-run"];
        full.extend_from_slice(argv);
        Wrapper::parse_from(full).args
    }

    #[test]
    fn the_example_corpora_are_valid() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
        assert_eq!(check(&[root.join("scenarios")]), 0);
        let xfail = load_corpus(&[root.join("tests/scenarios/expected-fail")]).expect("valid");
        assert_eq!(xfail.len(), 6);
    }

    #[test]
    fn usage_errors_are_caught_before_anything_runs() {
        let bad = |argv: &[&str]| {
            Wrapper::try_parse_from(argv)
                .map(|_| ())
                .unwrap_err()
                .exit_code()
        };
        assert_eq!(bad(&["k", "x", "--partition", "hash:3/2"]), 2);
        assert_eq!(bad(&["k", "x", "--partition", "count:0/2"]), 2);
        assert_eq!(bad(&["k", "x", "--jobs", "0"]), 2);
        assert_eq!(bad(&["k", "x", "--filter", "("]), 2);
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scenarios");
        let root = root.display().to_string();
        let err = select(&args(&[&root, "--filter", "nope"])).expect_err("no match");
        assert_eq!(err, ["--filter \"nope\" matches no scenario id"]);
        let picked = select(&args(&[&root, "--filter", "^cow-disk$"])).expect("selected");
        assert_eq!(picked.len(), 1);
    }

    #[test]
    fn a_bad_corpus_exits_2_before_a_backend_is_chosen() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.toml"), "id = \"a\"\nstesp = []\n").expect("write");
        std::fs::write(dir.path().join("b.toml"), "id = \"a\"\n").expect("write");
        let corpus = dir.path().to_str().unwrap_or_default();
        assert_eq!(check(&[dir.path().to_path_buf()]), 2);
        // `run` returns before probing KVM or constructing a backend, so nothing can boot.
        let a = args(&[corpus, "--backend", "qemu"]);
        assert!(select(&a).is_err());
        assert_eq!(run(a), 2);
    }

    #[test]
    fn a_bad_or_drifting_environment_contract_stops_the_run_before_a_backend() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scenarios");
        let artifacts = dir.path().join("art");
        let run_with_contract = |text: &str| {
            let contract = dir.path().join("gate.toml");
            std::fs::write(&contract, text).expect("write");
            run(args(&[
                root.to_str().unwrap_or_default(),
                "--artifacts",
                artifacts.to_str().unwrap_or_default(),
                "--expect-environment",
                contract.to_str().unwrap_or_default(),
            ]))
        };
        assert_eq!(
            run_with_contract(
                "[host]
kvm_kind = \"\"\n"
            ),
            exit::ENVIRONMENT_DRIFT
        );
        assert_eq!(
            run_with_contract(
                "[host]
kvm = \"pvm\"\n"
            ),
            exit::USAGE
        );
        let missing = args(&[
            root.to_str().unwrap_or_default(),
            "--expect-environment",
            dir.path().join("nope.toml").to_str().unwrap_or_default(),
        ]);
        assert_eq!(run(missing), exit::USAGE);
        assert!(!artifacts.exists(), "nothing ran");
    }

    #[test]
    fn a_run_writes_json_and_junit_and_returns_the_exit_code() {
        let dir = tempfile::tempdir().expect("tempdir");
        let corpus = dir.path().join("c");
        std::fs::create_dir_all(&corpus).expect("mkdir");
        std::fs::write(dir.path().join("k"), b"k").expect("kernel");
        for (id, cmd) in [("ok", "true"), ("bad", "false"), ("only-kiln", "true")] {
            let extra = if id == "only-kiln" {
                "backends = [\"kiln\"]\n"
            } else {
                ""
            };
            let text = format!(
                "id = \"{id}\"\n{extra}[guest]\nkernel = \"../k\"\n[[steps]]\nrun = [\"{cmd}\"]\n"
            );
            std::fs::write(corpus.join(format!("{id}.toml")), text).expect("write");
        }
        let junit = dir.path().join("out.xml");
        let a = args(&[
            corpus.to_str().unwrap_or_default(),
            "--artifacts",
            dir.path().join("art").to_str().unwrap_or_default(),
            "--junit",
            junit.to_str().unwrap_or_default(),
            "--jobs",
            "2",
        ]);
        let scenarios = select(&a).expect("valid");
        let backend = FakeBackend::new(BackendKind::Qemu, |_| {
            FakeGuest::ready()
                .with_exec(|req, _| FakeExec::exit(i32::from(req.argv[0] == "false"), ""))
        });
        let code = run_with(&a, scenarios, &backend, options(&a), None);
        assert_eq!(code, 1);
        let xml = std::fs::read_to_string(&junit).expect("junit written");
        let report = quick_junit::Report::deserialize_from_str(&xml).expect("junit parses");
        assert_eq!((report.tests, report.failures), (2, 1));
    }

    #[test]
    fn a_baseline_tells_regressions_from_old_failures() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().expect("tempdir");
        let corpus = dir.path().join("c");
        std::fs::create_dir_all(&corpus).expect("mkdir");
        std::fs::write(dir.path().join("k"), b"k").expect("kernel");
        for id in ["steady", "flips", "old-bad"] {
            let text =
                format!("id = \"{id}\"\n[guest]\nkernel = \"../k\"\n[[steps]]\nrun = [\"{id}\"]\n");
            std::fs::write(corpus.join(format!("{id}.toml")), text).expect("write");
        }
        let art = dir.path().join("art");
        let a = args(&[
            corpus.to_str().unwrap_or_default(),
            "--artifacts",
            art.to_str().unwrap_or_default(),
            "--jobs",
            "1",
        ]);
        let flips_fails = Arc::new(AtomicBool::new(false));
        let flag = flips_fails.clone();
        let backend = FakeBackend::new(BackendKind::Qemu, move |_| {
            let flag = flag.clone();
            FakeGuest::ready().with_exec(move |req, _| {
                let fails = match req.argv[0].as_str() {
                    "old-bad" => true,
                    "flips" => flag.load(Ordering::SeqCst),
                    _ => false,
                };
                FakeExec::exit(i32::from(fails), "")
            })
        });
        let run_once = |baseline: Option<&Baseline>| {
            let scenarios = select(&a).expect("valid");
            run_with(&a, scenarios, &backend, options(&a), baseline)
        };
        // Without a baseline an old failure is a failure; against itself it is only an old one.
        assert_eq!(run_once(None), exit::FAILURES);
        let baseline = Baseline::load(&art).expect("the artifacts dir is a baseline");
        assert_eq!(run_once(Some(&baseline)), exit::FAILURES);
        let latest = |id: &str| art.join(id).join("latest");
        for id in ["steady", "flips", "old-bad"] {
            assert!(!latest(id).join("regression-summary.txt").exists(), "{id}");
        }
        // `flips` now fails where the baseline passed: a regression, with its summary file.
        flips_fails.store(true, Ordering::SeqCst);
        assert_eq!(run_once(Some(&baseline)), exit::REGRESSIONS);
        let summary = std::fs::read_to_string(latest("flips").join("regression-summary.txt"))
            .expect("regressed bundle has regression-summary.txt");
        assert!(summary.contains("change: newly-failing"), "{summary}");
        assert!(!latest("old-bad").join("regression-summary.txt").exists());
        assert!(!latest("steady").join("regression-summary.txt").exists());
    }
}
