//! The `kiln diff run` command: loads the scenarios, checks that both backends can run them,
//! runs the corpus on kiln's VMM and on QEMU through the ordinary runner (bundles under
//! `<artifacts>/kiln/` and `<artifacts>/qemu/`), and compares each scenario's two bundles.
//!
//! Exit codes (crate::exit): SUCCESS every scenario identical, tolerated or inconclusive;
//! FAILURES any DIVERGENT; USAGE usage or configuration error; UNAVAILABLE a backend is
//! unavailable (nothing is run then: a one-sided run proves nothing differential, and the QEMU
//! half alone costs minutes under TCG); INTERRUPTED Ctrl-C.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use crate::exit;

use kiln_backends::{self as backend, Backend};
use kiln_diff::scenarios::report::{RunDiffReport, ScenarioDiff};
use kiln_diff::scenarios::{compare_bundles_in, QemuImg};
use kiln_runner::{self as runner, Control, KeepPolicy, RunEvent, RunOptions, RunSummary};
use kiln_scenario::{load_corpus, BackendKind, Scenario};

/// Arguments of `kiln diff run`.
#[derive(Debug, Args)]
pub struct DiffRunArgs {
    /// Scenario files or directories.
    #[arg(required = true, value_name = "SCENARIO")]
    pub paths: Vec<PathBuf>,
    /// Machine-readable JSON report on stdout.
    #[arg(long)]
    pub json: bool,
    /// Where bundles go: <DIR>/kiln/<scenario-id>/<run-id>/ and <DIR>/qemu/….
    #[arg(long, value_name = "DIR", default_value = "kiln-diff-artifacts")]
    pub artifacts: PathBuf,
    /// Scenarios run at once on each backend (default: the number of CPUs).
    #[arg(long, short = 'j', value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub jobs: Option<u64>,
    /// The qemu-img that checks and flattens the overlays.
    #[arg(long, default_value = "qemu-img")]
    pub qemu_img: String,
    /// Run a scenario that failed on one backend up to N more times there; the last attempt's
    /// bundle is compared.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub retries: u32,
    #[command(flatten)]
    pub bundle: crate::args::BundleArgs,
}

/// Runs `kiln diff run`; returns the exit code.
pub fn run(args: DiffRunArgs) -> i32 {
    let scenarios = match load_corpus(&args.paths) {
        Ok(s) => s,
        Err(errors) => {
            for e in &errors {
                eprintln!("kiln: error: {e}");
            }
            return exit::USAGE;
        }
    };
    let (both, one): (Vec<Scenario>, Vec<Scenario>) = scenarios
        .into_iter()
        .partition(|s| s.allows(BackendKind::Kiln) && s.allows(BackendKind::Qemu));
    let mut report = RunDiffReport {
        labels: ("kiln".into(), "qemu".into()),
        scenarios: Vec::new(),
    };
    let inconclusive: Vec<(String, ScenarioDiff)> = one
        .iter()
        .map(|s| {
            let why = "runs on one backend only".to_string();
            (s.id.clone(), ScenarioDiff::Inconclusive(why))
        })
        .collect();
    if both.is_empty() {
        report.scenarios = inconclusive;
        return print(&report, &args);
    }
    let doctor = kiln_backends::doctor::report();
    let kvm_kind = serde_json::to_value(doctor.kvm.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "unknown".into());
    let linux = doctor.kvm.linux_capable();
    let backends = if linux {
        backend::construct(BackendKind::Kiln, linux, &kvm_kind)
            .map_err(|e| format!("kiln backend unavailable: {e}"))
            .and_then(|k| {
                backend::construct(BackendKind::Qemu, linux, &kvm_kind)
                    .map(|q| (k, q))
                    .map_err(|e| format!("qemu backend unavailable: {e}"))
            })
    } else {
        Err(format!(
            "kiln backend unavailable: {kvm_kind} KVM cannot boot Linux guests"
        ))
    };
    let (kiln, qemu) = match backends {
        Ok(b) => b,
        Err(message) => {
            eprintln!(
                "kiln: {message}; nothing was run (exit {})",
                exit::UNAVAILABLE
            );
            if args.json {
                let doc = serde_json::json!({"error": message, "exit_code": exit::UNAVAILABLE});
                println!("{doc}");
            }
            return exit::UNAVAILABLE;
        }
    };
    let control = Control::new();
    let handler_control = control.clone();
    if let Err(e) = ctrlc::set_handler(move || {
        if handler_control.interrupt() {
            std::process::exit(exit::INTERRUPTED);
        }
        eprintln!("kiln: interrupted: tearing down running scenarios");
    }) {
        tracing::warn!("no Ctrl-C handler: {e}");
    }
    let mut opts = options(&args, &kvm_kind, &both);
    opts.environment = Some(crate::commands::run::host_environment(&doctor));
    let kiln_runs = run_side(&both, kiln.as_ref(), &opts, "kiln", &control);
    let qemu_runs = run_side(&both, qemu.as_ref(), &opts, "qemu", &control);
    if control.cancelled() {
        return exit::INTERRUPTED;
    }
    let reader = QemuImg(args.qemu_img.clone());
    // The comparisons' scratch dir, registered so that a second Ctrl-C (which exits without
    // unwinding) removes it too; a first one stops the comparisons and drops it.
    let work = match kiln_diff::TempDir::new("kiln-diff-run") {
        Ok(w) => w,
        Err(e) => {
            eprintln!("kiln: error: temporary directory: {e}");
            return exit::ERROR;
        }
    };
    let _registered = control.register_work_dir(work.path());
    for s in &both {
        if control.cancelled() {
            return exit::INTERRUPTED;
        }
        let pair = (kiln_runs.get(&s.id), qemu_runs.get(&s.id));
        let scratch = work.path().join(&s.id);
        let diff = match pair {
            (Some(Some(a)), Some(Some(b))) => match std::fs::create_dir(&scratch)
                .map_err(|e| format!("temporary directory {}: {e}", scratch.display()))
                .and_then(|()| {
                    compare_bundles_in(
                        ("kiln", a.as_path()),
                        ("qemu", b.as_path()),
                        &s.diff,
                        &reader,
                        &scratch,
                    )
                    .map_err(|e| e.to_string())
                }) {
                Ok(facts) => ScenarioDiff::Compared(facts),
                Err(e) => ScenarioDiff::Inconclusive(e),
            },
            _ => ScenarioDiff::Inconclusive("no bundle from one of the backends".into()),
        };
        report.scenarios.push((s.id.clone(), diff));
    }
    report.scenarios.extend(inconclusive);
    print(&report, &args)
}

fn print(report: &RunDiffReport, args: &DiffRunArgs) -> i32 {
    let code = exit::of_diff_run(report);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report.to_json(code)).unwrap_or_default()
        );
    } else {
        print!("{}", report.to_text());
    }
    code
}

fn options(args: &DiffRunArgs, kvm_kind: &str, scenarios: &[Scenario]) -> RunOptions {
    let artifacts = std::path::absolute(&args.artifacts).unwrap_or_else(|_| args.artifacts.clone());
    let mut opts = RunOptions::new(artifacts);
    opts.jobs = args.jobs.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |j| usize::try_from(j).unwrap_or(1),
    );
    // Both bundles are needed to compare, whatever the verdicts.
    opts.keep = KeepPolicy::Always;
    opts.retries = args.retries;
    args.bundle.apply(&mut opts);
    opts.provenance_base.host_kvm = kvm_kind.to_string();
    let resolver = crate::commands::run::guest_resolver(None);
    for guest in crate::commands::run::guests_wanted(scenarios) {
        if let Err(e) = resolver(guest.as_deref()) {
            eprintln!("kiln: error: {e}");
        }
    }
    opts.default_guest = Some(resolver);
    opts
}

/// Runs `scenarios` on one backend; returns each scenario's bundle directory, when kept.
fn run_side(
    scenarios: &[Scenario],
    backend: &dyn Backend,
    opts: &RunOptions,
    label: &str,
    control: &Arc<Control>,
) -> BTreeMap<String, Option<PathBuf>> {
    let mut opts = opts.clone();
    opts.artifacts = opts.artifacts.join(label);
    let summary: RunSummary = runner::run(scenarios, backend, &opts, control, &|e| {
        if let RunEvent::Finished(o) = e {
            eprintln!("{label}: {}", kiln_runner::report::status_line(o));
        }
    });
    summary
        .outcomes
        .into_iter()
        .map(|o| (o.result.scenario.clone(), o.result.bundle))
        .collect()
}
