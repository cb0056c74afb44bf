//! The runner against the fake backend: verdicts, failure classes, timeouts, teardown on every
//! path, retries, fail-fast, Ctrl-C and the bundle's contents.

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use kiln_backends::fake::{FakeBackend, FakeExec, FakeGuest};
use kiln_scenario::{load_corpus, BackendKind};

struct Env {
    dir: tempfile::TempDir,
    opts: RunOptions,
}

fn env() -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("vmlinux"), b"kernel").expect("kernel");
    fs::write(dir.path().join("initrd"), b"initrd").expect("initrd");
    let mut opts = RunOptions::new(dir.path().join("artifacts"));
    let (k, i) = (dir.path().join("vmlinux"), dir.path().join("initrd"));
    opts.default_guest = Some(Arc::new(move |_| Ok((k.clone(), i.clone()))));
    Env { dir, opts }
}

impl Env {
    fn scenarios(&self, files: &[(&str, &str)]) -> Vec<Scenario> {
        let corpus = self.dir.path().join("corpus");
        fs::create_dir_all(&corpus).expect("mkdir");
        for (name, text) in files {
            fs::write(corpus.join(name), text).expect("write");
        }
        load_corpus(&[corpus]).unwrap_or_else(|e| panic!("{e:?}"))
    }

    fn run(&self, backend: &FakeBackend, scenarios: &[Scenario]) -> RunSummary {
        let summary = run(scenarios, backend, &self.opts, &Control::default(), &|_| {});
        assert_eq!(backend.live(), 0, "every machine torn down");
        summary
    }
}

fn one(summary: &RunSummary) -> &RunResult {
    &summary.outcomes[0].result
}

fn bundle(result: &RunResult) -> PathBuf {
    result.bundle.clone().expect("bundle kept")
}

fn no_work_dirs_left(id: &str) {
    let prefix = format!("kiln-{id}-");
    let left: Vec<_> = fs::read_dir(std::env::temp_dir())
        .expect("ls tmp")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "work dirs left: {left:?}");
}

const FIXTURES: &str = r#"
id = "rt-fixtures"
[[steps]]
shell = "gen-fixtures /mnt/output"
[[expect.files]]
path = "output/a.bin"
non_empty = true
verify = 'test -s "$1" && test "$KILN_FILE" = "$1"'
[[expect.files]]
path = "output/b.bin"
non_empty = true
[[expect.files]]
path = "output/c.bin"
min_size = 3
[[expect.files]]
path = "output/d.bin"
sha256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
"#;

fn fixture_writer() -> FakeBackend {
    FakeBackend::new(BackendKind::Qemu, |_| {
        FakeGuest::ready().with_exec(|_, view| {
            let out = &view.plan.shares[0].host_dir;
            for name in ["a.bin", "b.bin", "c.bin", "d.bin"] {
                if fs::write(out.join(name), b"abc").is_err() {
                    return FakeExec::exit(1, "");
                }
            }
            FakeExec::exit(0, "wrote 4 files\n")
        })
    })
}

#[test]
fn fixture_generation_passes_and_leaves_a_complete_bundle() {
    let env = env();
    let scenarios = env.scenarios(&[("f.toml", FIXTURES)]);
    let backend = fixture_writer();
    let summary = env.run(&backend, &scenarios);
    let r = one(&summary);
    assert!(r.passed(), "{:?}", r.failure);
    assert_eq!(summary.outcome(), RunOutcome::Passed);
    assert_eq!(r.expectations.len(), 4);
    let dir = bundle(r);
    for name in [
        "scenario.toml",
        "console.log",
        "harness.log",
        "agent.jsonl",
        "result.json",
        "readiness.json",
    ] {
        assert!(dir.join(name).is_file(), "{name} missing");
    }
    assert!(!dir.join("failure-summary.txt").exists());
    for f in ["a", "b", "c", "d"] {
        assert_eq!(
            fs::read(dir.join(format!("fixtures/output/{f}.bin"))).expect("fixture"),
            b"abc"
        );
    }
    let console = fs::read_to_string(dir.join("console.log")).expect("console");
    assert!(console.contains("KILN_READY v=1"), "{console}");
    let json: RunResult =
        serde_json::from_slice(&fs::read(dir.join("result.json")).expect("json")).expect("parse");
    assert_eq!(json.verdict, Verdict::Pass);
    assert_eq!(json.provenance.backend, "fake");
    assert_eq!(
        json.provenance
            .kernel
            .and_then(|k| k.sha256)
            .map(|s| s.len()),
        Some(64)
    );
    assert!(json.phases.ready_ms.is_some() && json.phases.teardown_ms.is_some());
    let latest = dir.parent().expect("parent").join("latest");
    assert_eq!(
        fs::canonicalize(latest).expect("latest"),
        fs::canonicalize(&dir).expect("dir")
    );
    let transcript = fs::read_to_string(dir.join("agent.jsonl")).expect("transcript");
    assert!(transcript.contains("\"op\":\"exec\""), "{transcript}");
    no_work_dirs_left("rt-fixtures");
}

fn class_of(
    scenario: &str,
    guest: impl Fn() -> FakeGuest + Send + Sync + 'static,
) -> (RunResult, Duration) {
    let env = env();
    let scenarios = env.scenarios(&[("s.toml", scenario)]);
    let backend = FakeBackend::new(BackendKind::Qemu, move |_| guest());
    let t = Instant::now();
    let summary = env.run(&backend, &scenarios);
    let r = one(&summary).clone();
    assert!(!r.passed());
    assert_eq!(summary.outcome(), RunOutcome::Failed);
    let dir = bundle(&r);
    let text = fs::read_to_string(dir.join("failure-summary.txt")).expect("summary");
    assert!(
        text.contains(r.class().map_or("", FailureClass::as_str)),
        "{text}"
    );
    (r, t.elapsed())
}

#[test]
fn a_guest_that_never_gets_ready_is_a_readiness_timeout() {
    let (r, t) = class_of("id = \"x\"\n[readiness]\ntimeout = 0.2\n", || FakeGuest {
        boot_lines: vec![(Duration::ZERO, "booting".into())],
        ..FakeGuest::ready()
    });
    assert_eq!(r.class(), Some(FailureClass::ReadinessTimeout));
    assert_eq!(
        r.failure.as_ref().map(|f| f.message.as_str()),
        Some("the agent's KILN_READY record did not appear within the readiness timeout of 200ms")
    );
    assert!(r
        .steps
        .iter()
        .all(|s| s.status == artifacts::StepStatus::Skipped));
    assert!(t < Duration::from_secs(3), "{t:?}");
}

#[test]
fn a_sequence_marker_past_its_own_timeout_names_that_timeout() {
    let s = "id = \"x\"\n[readiness]\ntimeout = 60\n\
             sequence = [{ marker = 'booting' }, { marker = 'never', timeout = 0.2 }]\n";
    let (r, t) = class_of(s, || FakeGuest {
        boot_lines: vec![(Duration::ZERO, "booting".into())],
        ..FakeGuest::ready()
    });
    assert_eq!(r.class(), Some(FailureClass::ReadinessTimeout));
    assert_eq!(
        r.failure.as_ref().map(|f| f.message.as_str()),
        Some("marker 2/2 /never/ after /booting/ did not appear within its own timeout of 200ms")
    );
    assert!(t < Duration::from_secs(10), "{t:?}");
}

#[test]
fn a_wrong_exit_code_is_a_failed_step() {
    let s = "id = \"x\"\n[[steps]]\nrun = [\"false\"]\n[[steps]]\nrun = [\"true\"]\n";
    let (r, _) = class_of(s, || {
        FakeGuest::ready().with_exec(|req, _| FakeExec::exit(i32::from(req.argv[0] == "false"), ""))
    });
    assert_eq!(r.class(), Some(FailureClass::StepFailed));
    assert_eq!(r.failure.as_ref().and_then(|f| f.step), Some(0));
    assert_eq!(
        r.failure.as_ref().map(|f| f.message.as_str()),
        Some("expected exit code 0, got exit code 1")
    );
    assert_eq!(r.steps[1].status, artifacts::StepStatus::Skipped);
}

#[test]
fn stdout_expectations_fail_the_step() {
    let s = "id = \"x\"\n[[steps]]\nrun = [\"echo\"]\nstdout_contains = \"hello\"\n";
    let (r, _) = class_of(s, || {
        FakeGuest::ready().with_exec(|_, _| FakeExec::exit(0, "bye"))
    });
    assert_eq!(r.class(), Some(FailureClass::StepFailed));
    assert_eq!(
        r.failure.map(|f| f.message),
        Some("stdout does not contain \"hello\"".into())
    );
}

#[test]
fn a_hanging_command_is_a_step_timeout() {
    let s = "id = \"x\"\n[[steps]]\nrun = [\"sleep\", \"1000\"]\ntimeout = 0.2\n";
    let (r, t) = class_of(s, || FakeGuest::ready().with_exec(|_, _| FakeExec::Hang));
    assert_eq!(r.class(), Some(FailureClass::StepTimeout));
    assert!(t < Duration::from_secs(3), "{t:?}");
}

#[test]
fn the_scenario_timeout_stops_a_step_with_a_long_timeout() {
    let s = "id = \"x\"\ntimeout = 0.3\n[[steps]]\nrun = [\"sleep\", \"1000\"]\ntimeout = 600\n";
    let (r, t) = class_of(s, || FakeGuest::ready().with_exec(|_, _| FakeExec::Hang));
    assert_eq!(r.class(), Some(FailureClass::StepTimeout));
    assert!(r
        .failure
        .map(|f| f.message)
        .unwrap_or_default()
        .contains("scenario timeout"));
    assert!(t < Duration::from_secs(3), "{t:?}");
}

#[test]
fn a_kernel_panic_fails_fast_not_at_the_timeout() {
    let s = "id = \"x\"\n[readiness]\ntimeout = 60\n";
    let (r, t) = class_of(s, || FakeGuest {
        boot_lines: vec![(
            Duration::from_millis(10),
            "Kernel panic - not syncing: VFS: Unable to mount root fs".into(),
        )],
        ..FakeGuest::ready()
    });
    assert_eq!(r.class(), Some(FailureClass::GuestPanic));
    assert!(t < Duration::from_secs(3), "{t:?}");
    let s = "id = \"x\"\n[[steps]]\nrun = [\"crash\"]\ntimeout = 60\n";
    let (r, t) = class_of(s, || {
        FakeGuest::ready().with_exec(|_, _| {
            FakeExec::KernelPanic("Kernel panic - not syncing: sysrq triggered crash".into())
        })
    });
    assert_eq!(r.class(), Some(FailureClass::GuestPanic));
    assert!(
        r.console_tail.iter().any(|l| l.contains("sysrq")),
        "{:?}",
        r.console_tail
    );
    assert!(t < Duration::from_secs(3), "{t:?}");
}

#[test]
fn a_missing_file_is_an_expectation_failure() {
    let s = "id = \"x\"\n[[expect.files]]\npath = \"output/missing\"\n";
    let (r, _) = class_of(s, FakeGuest::ready);
    assert_eq!(r.class(), Some(FailureClass::ExpectationFailed));
    assert_eq!(r.expectations[0].message.as_deref(), Some("does not exist"));
}

#[test]
fn a_boot_failure_is_an_infra_error() {
    let (r, _) = class_of("id = \"x\"\n", || FakeGuest {
        boot_error: Some("qemu-system-x86_64: not found".into()),
        ..FakeGuest::ready()
    });
    assert_eq!(r.class(), Some(FailureClass::InfraError));
}

#[test]
fn a_panicking_worker_is_an_infra_error_and_the_vm_is_torn_down() {
    let s = "id = \"x\"\n[[steps]]\nrun = [\"x\"]\n";
    let (r, _) = class_of(s, || {
        FakeGuest::ready().with_exec(|_, _| FakeExec::HarnessPanic)
    });
    assert_eq!(r.class(), Some(FailureClass::InfraError));
    assert!(r
        .failure
        .map(|f| f.message)
        .unwrap_or_default()
        .contains("harness panicked"));
}

#[test]
fn put_and_get_round_trip_into_fixtures() {
    let env = env();
    let s = "id = \"pg\"\n[[steps]]\nput = { content = \"hi\", dest = \"/tmp/x\" }\n\
             [[steps]]\nget = { src = \"/tmp/x\", dest = \"got/x\" }\n\
             [[expect.files]]\npath = \"got/x\"\nsha256 = \"8f434346648f6b96df89dda901c5176b10a6d83961dd3c1ac88b59b2dc327aa4\"\n";
    let scenarios = env.scenarios(&[("s.toml", s)]);
    let backend = FakeBackend::new(BackendKind::Qemu, |_| FakeGuest::ready());
    let summary = env.run(&backend, &scenarios);
    assert!(one(&summary).passed(), "{:?}", one(&summary));
}

#[test]
fn retries_rerun_a_failed_scenario_until_it_passes() {
    let mut env = env();
    env.opts.retries = 2;
    let scenarios = env.scenarios(&[("s.toml", "id = \"flaky\"\n[[steps]]\nrun = [\"x\"]\n")]);
    let tries = Arc::new(AtomicUsize::new(0));
    let counter = tries.clone();
    let backend = FakeBackend::new(BackendKind::Qemu, move |_| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        FakeGuest::ready().with_exec(move |_, _| FakeExec::exit(i32::from(n == 0), ""))
    });
    let summary = env.run(&backend, &scenarios);
    let outcome = &summary.outcomes[0];
    assert!(outcome.passed());
    assert_eq!((outcome.retries.len(), outcome.result.attempt), (1, 2));
    assert_eq!(summary.outcome(), RunOutcome::Passed);
}

#[test]
fn fail_fast_stops_scheduling_after_the_first_failure() {
    let mut env = env();
    env.opts.fail_fast = true;
    let files: Vec<(String, String)> = (0..4)
        .map(|i| {
            (
                format!("{i}.toml"),
                format!("id = \"ff{i}\"\n[[steps]]\nrun = [\"false\"]\n"),
            )
        })
        .collect();
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let scenarios = env.scenarios(&refs);
    let backend = FakeBackend::new(BackendKind::Qemu, |_| {
        FakeGuest::ready().with_exec(|_, _| FakeExec::exit(1, ""))
    });
    let summary = env.run(&backend, &scenarios);
    assert_eq!(summary.outcomes.len(), 1);
    assert_eq!(summary.not_run, ["ff1", "ff2", "ff3"]);
    assert_eq!(summary.outcome(), RunOutcome::Failed);
}

#[test]
fn jobs_run_scenarios_in_parallel() {
    let mut env = env();
    env.opts.jobs = 4;
    env.opts.keep = KeepPolicy::Never;
    let files: Vec<(String, String)> = (0..4)
        .map(|i| {
            (
                format!("{i}.toml"),
                format!("id = \"par{i}\"\n[[steps]]\nrun = [\"sleep\"]\n"),
            )
        })
        .collect();
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let scenarios = env.scenarios(&refs);
    let backend = FakeBackend::new(BackendKind::Qemu, |_| {
        FakeGuest::ready().with_exec(|_, _| {
            std::thread::sleep(Duration::from_millis(300));
            FakeExec::exit(0, "")
        })
    });
    let summary = env.run(&backend, &scenarios);
    assert_eq!(summary.outcome(), RunOutcome::Passed);
    assert!(
        summary.elapsed < Duration::from_millis(1100),
        "{:?}",
        summary.elapsed
    );
    assert!(summary.outcomes.iter().all(|o| o.result.bundle.is_none()));
    assert_eq!(
        fs::read_dir(env.opts.artifacts.join("par0"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
}

#[test]
fn keep_failed_removes_passing_bundles_only() {
    let mut env = env();
    env.opts.keep = KeepPolicy::Failed;
    let scenarios = env.scenarios(&[
        ("a.toml", "id = \"ok\"\n"),
        ("b.toml", "id = \"bad\"\n[[steps]]\nrun = [\"false\"]\n"),
    ]);
    let backend = FakeBackend::new(BackendKind::Qemu, |_| {
        FakeGuest::ready().with_exec(|_, _| FakeExec::exit(1, ""))
    });
    let summary = env.run(&backend, &scenarios);
    assert_eq!(summary.outcomes[0].result.scenario, "ok");
    assert!(summary.outcomes[0].result.bundle.is_none());
    assert!(summary.outcomes[1].result.bundle.is_some());
    assert!(!env.opts.artifacts.join("ok").join("latest").exists());
}

#[test]
fn ctrl_c_tears_down_running_scenarios_and_stops_scheduling() {
    let mut env = env();
    env.opts.jobs = 2;
    let files: Vec<(String, String)> = (0..5)
        .map(|i| {
            (
                format!("{i}.toml"),
                format!("id = \"cc{i}\"\n[[steps]]\nrun = [\"hang\"]\ntimeout = 600\n"),
            )
        })
        .collect();
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let scenarios = env.scenarios(&refs);
    let backend = FakeBackend::new(BackendKind::Qemu, |_| {
        FakeGuest::ready().with_exec(|_, _| FakeExec::Hang)
    });
    let control = Control::new();
    let interrupter = control.clone();
    let t = Instant::now();
    let ctrl_c = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        interrupter.interrupt()
    });
    let summary = run(&scenarios, &backend, &env.opts, &control, &|_| {});
    assert!(
        !ctrl_c.join().unwrap_or(true),
        "first Ctrl-C does not ask to exit"
    );
    assert!(control.interrupt(), "second Ctrl-C asks to exit at once");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(backend.live(), 0);
    assert_eq!(summary.outcome(), RunOutcome::Interrupted);
    assert_eq!(summary.outcomes.len(), 2);
    assert!(summary
        .outcomes
        .iter()
        .all(|o| o.result.class() == Some(FailureClass::Cancelled)));
    assert_eq!(summary.not_run, ["cc2", "cc3", "cc4"]);
    for o in &summary.outcomes {
        assert!(bundle(&o.result).join("result.json").is_file());
    }
    for i in 0..5 {
        no_work_dirs_left(&format!("cc{i}"));
    }
}

#[test]
fn an_unwritable_artifacts_dir_is_an_infra_error_not_a_crash() {
    let mut env = env();
    let file = env.dir.path().join("not-a-dir");
    fs::write(&file, b"x").expect("write");
    env.opts.artifacts = file;
    let scenarios = env.scenarios(&[("a.toml", "id = \"art\"\n")]);
    let backend = FakeBackend::new(BackendKind::Qemu, |_| FakeGuest::ready());
    let summary = env.run(&backend, &scenarios);
    assert_eq!(one(&summary).class(), Some(FailureClass::InfraError));
    assert_eq!(backend.booted(), 0);
}

/// A guest whose command finds its share gone, as a 9p or virtio-fs guest does when the host
/// dir is deleted under it: creating a file there fails, so the command exits non-zero.
fn share_deleter(tag: &'static str) -> FakeGuest {
    FakeGuest::ready().with_exec(move |_, view| {
        let Some(share) = view.plan.shares.iter().find(|s| s.tag == tag) else {
            return FakeExec::exit(2, "no such share");
        };
        if fs::remove_dir_all(&share.host_dir).is_err() {
            return FakeExec::exit(2, "could not delete the share");
        }
        match fs::write(share.host_dir.join("out.bin"), b"x") {
            Ok(()) => FakeExec::exit(0, ""),
            Err(_) => FakeExec::exit(1, "cannot create out.bin: No such file or directory"),
        }
    })
}

#[test]
fn a_share_dir_deleted_mid_run_is_an_infra_error_and_the_others_pass() {
    let mut env = env();
    env.opts.jobs = 2;
    fs::create_dir_all(env.dir.path().join("corpus/input")).expect("mkdir");
    let scenarios = env.scenarios(&[
        (
            "a.toml",
            "id = \"del-output\"\n[[steps]]\nrun = [\"gen\"]\n",
        ),
        (
            "b.toml",
            "id = \"del-host\"\n[[shares]]\ntag = \"in\"\nhost = \"input\"\n\
             [[steps]]\nrun = [\"gen\"]\n",
        ),
        ("c.toml", "id = \"untouched\"\n[[steps]]\nrun = [\"gen\"]\n"),
    ]);
    let backend = FakeBackend::new(BackendKind::Qemu, |plan| match plan.scenario_id.as_str() {
        "del-output" => share_deleter("output"),
        "del-host" => share_deleter("in"),
        _ => FakeGuest::ready(),
    });
    let summary = env.run(&backend, &scenarios);
    assert_eq!(summary.outcome(), RunOutcome::Failed);
    let by_id = |id: &str| {
        summary
            .outcomes
            .iter()
            .find(|o| o.result.scenario == id)
            .map(|o| o.result.clone())
            .unwrap_or_else(|| panic!("{id} not reported"))
    };
    for (id, tag) in [("del-output", "output"), ("del-host", "in")] {
        let r = by_id(id);
        let f = r.failure.clone().expect("failed");
        assert_eq!(f.class, FailureClass::InfraError, "{id}: {f:?}");
        assert_eq!(f.step, Some(0), "{id}: the step that tripped over it");
        assert!(
            f.message.starts_with(&format!("share `{tag}`: host dir "))
                && f.message.ends_with(" was deleted while the VM ran"),
            "{id}: {}",
            f.message
        );
        let dir = bundle(&r);
        assert!(dir.join("result.json").is_file(), "{id}: bundle written");
        let text = fs::read_to_string(dir.join("failure-summary.txt")).expect("summary");
        assert!(text.contains("infra-error: share"), "{text}");
        no_work_dirs_left(id);
    }
    assert!(by_id("untouched").passed());
}

#[test]
fn panics_in_boot_and_exec_are_infra_errors_and_the_others_finish() {
    let mut env = env();
    env.opts.jobs = 2;
    let scenarios = env.scenarios(&[
        ("a.toml", "id = \"boot-panic\"\n[[steps]]\nrun = [\"x\"]\n"),
        ("b.toml", "id = \"exec-panic\"\n[[steps]]\nrun = [\"x\"]\n"),
        ("c.toml", "id = \"fine-1\"\n[[steps]]\nrun = [\"x\"]\n"),
        ("d.toml", "id = \"fine-2\"\n[[steps]]\nrun = [\"x\"]\n"),
    ]);
    let backend = FakeBackend::new(BackendKind::Qemu, |plan| match plan.scenario_id.as_str() {
        "boot-panic" => FakeGuest {
            boot_panic: true,
            ..FakeGuest::ready()
        },
        "exec-panic" => FakeGuest::ready().with_exec(|_, _| FakeExec::HarnessPanic),
        _ => FakeGuest::ready(),
    });
    let summary = env.run(&backend, &scenarios);
    assert_eq!(summary.outcome(), RunOutcome::Failed);
    assert_eq!(summary.outcomes.len(), 4);
    assert!(summary.not_run.is_empty());
    for o in &summary.outcomes {
        let r = &o.result;
        if r.scenario.starts_with("fine") {
            assert!(r.passed(), "{}: {:?}", r.scenario, r.failure);
        } else {
            assert_eq!(r.class(), Some(FailureClass::InfraError), "{}", r.scenario);
            let message = r.failure.as_ref().map_or("", |f| f.message.as_str());
            assert!(
                message.starts_with("harness panicked: fake backend: scripted"),
                "{message}"
            );
            assert!(bundle(r).join("result.json").is_file());
        }
        no_work_dirs_left(&r.scenario);
    }
    // The exec panic happened with a VM running: it was killed while unwinding.
    assert_eq!(backend.booted(), 3);
}

#[test]
fn a_second_ctrl_c_removes_the_work_dirs_of_stuck_scenarios() {
    let mut env = env();
    env.opts.jobs = 2;
    let scenarios = env.scenarios(&[
        ("a.toml", "id = \"stuck-a\"\n[[steps]]\nrun = [\"x\"]\n"),
        ("b.toml", "id = \"stuck-b\"\n[[steps]]\nrun = [\"x\"]\n"),
    ]);
    // A step the kill switch cannot interrupt, as when a backend's teardown hangs: only the
    // second Ctrl-C, not the runner's own teardown, can clean up before the process exits.
    let entered = Arc::new(AtomicUsize::new(0));
    let seen = entered.clone();
    let backend = FakeBackend::new(BackendKind::Qemu, move |_| {
        let seen = seen.clone();
        FakeGuest::ready().with_exec(move |_, _| {
            seen.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(1500));
            FakeExec::exit(0, "")
        })
    });
    let work_dirs = |id: &str| -> Vec<PathBuf> {
        let prefix = format!("kiln-{id}-");
        fs::read_dir(std::env::temp_dir())
            .expect("ls tmp")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect()
    };
    let control = Control::new();
    let interrupter = control.clone();
    let checker = std::thread::spawn(move || {
        let t = Instant::now();
        while entered.load(Ordering::SeqCst) < 2 && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let before = [work_dirs("stuck-a"), work_dirs("stuck-b")];
        let first = interrupter.interrupt();
        let t = Instant::now();
        let second = interrupter.interrupt();
        let after = [work_dirs("stuck-a"), work_dirs("stuck-b")];
        (before, first, second, after, t.elapsed())
    });
    let summary = run(&scenarios, &backend, &env.opts, &control, &|_| {});
    let (before, first, second, after, took) = checker.join().expect("checker");
    assert!(
        before.iter().all(|d| d.len() == 1),
        "each scenario had its work dir: {before:?}"
    );
    assert!(!first && second, "the second Ctrl-C asks to exit");
    assert!(
        after.iter().all(Vec::is_empty),
        "work dirs left after the second Ctrl-C: {after:?}"
    );
    assert!(took < ABORT_CLEANUP_LIMIT, "{took:?}");
    assert_eq!(summary.outcome(), RunOutcome::Interrupted);
    assert_eq!(backend.live(), 0);
}

#[test]
fn the_second_ctrl_c_removes_only_registered_work_dirs() {
    let control = Control::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let kept = tempfile::tempdir().expect("tempdir");
    let _registered = control.register_work_dir(dir.path());
    {
        let _finished = control.register_work_dir(kept.path());
    }
    assert!(!control.interrupt());
    assert!(dir.path().is_dir(), "the first Ctrl-C removes nothing");
    assert!(control.interrupt());
    assert!(!dir.path().exists());
    assert!(kept.path().is_dir(), "an unregistered dir is not touched");
}

/// A tmpfs of `size` mounted at `dir`, unmounted on drop (also when the test panics).
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts one, or says why not (not root, no CAP_SYS_ADMIN, no `mount`).
    fn mount(dir: &std::path::Path, size: &str) -> std::io::Result<Tmpfs> {
        let context = |what: String| {
            move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{what}: {e}"))
        };
        fs::create_dir_all(dir).map_err(context(format!("cannot create {}", dir.display())))?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(context("cannot run mount".into()))?;
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(std::io::Error::other(why));
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy, so a file some thread still holds open cannot keep the mount alive.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_full_artifacts_disk_is_an_infra_error_without_a_half_written_bundle() {
    let mut env = env();
    let artifacts = env.dir.path().join("small-disk");
    let _mount = match Tmpfs::mount(&artifacts, "64k") {
        Ok(m) => m,
        Err(why) => {
            eprintln!("skipped: cannot mount a 64 KiB tmpfs for the artifacts dir: {why}");
            return;
        }
    };
    env.opts.artifacts = artifacts.clone();
    let scenarios = env.scenarios(&[
        (
            "a.toml",
            "id = \"fills-disk\"\n[[steps]]\nrun = [\"gen\"]\n",
        ),
        ("b.toml", "id = \"after-it\"\n[[steps]]\nrun = [\"gen\"]\n"),
    ]);
    let backend = FakeBackend::new(BackendKind::Qemu, |plan| {
        let big = plan.scenario_id == "fills-disk";
        FakeGuest::ready().with_exec(move |_, view| {
            let out = &view.plan.shares[0].host_dir;
            let size = if big { 256 * 1024 } else { 16 };
            match fs::write(out.join("data.bin"), vec![7u8; size]) {
                Ok(()) => FakeExec::exit(0, ""),
                Err(_) => FakeExec::exit(1, ""),
            }
        })
    });
    let summary = env.run(&backend, &scenarios);
    assert_eq!(summary.outcome(), RunOutcome::Failed);
    assert_eq!(summary.outcomes.len(), 2, "both scenarios reported");
    let full = &summary.outcomes[0].result;
    assert_eq!(full.scenario, "fills-disk");
    let f = full.failure.clone().expect("failed");
    assert_eq!(f.class, FailureClass::InfraError, "{f:?}");
    assert!(
        f.message.contains("cannot copy share `output`")
            && f.message.contains("No space left on device"),
        "{}",
        f.message
    );
    assert!(
        full.bundle.is_none(),
        "no bundle claimed: {:?}",
        full.bundle
    );
    let left: Vec<_> = fs::read_dir(artifacts.join("fills-disk"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "no partial or half bundle left: {left:?}");
    no_work_dirs_left("fills-disk");
    // The partial bundle was removed, so the disk had room again for the next scenario.
    let next = &summary.outcomes[1].result;
    assert!(next.passed(), "{:?}", next.failure);
    assert!(bundle(next).join("result.json").is_file());
}

#[test]
fn the_summary_counts_one_scenario_in_the_singular() {
    let env = env();
    let scenarios = env.scenarios(&[("s.toml", "id = \"x\"\n")]);
    let backend = FakeBackend::new(BackendKind::Qemu, |_| FakeGuest::ready());
    let summary = env.run(&backend, &scenarios);
    let text = crate::report::summary_text(&summary, "fake");
    assert!(
        text.contains("] 1 scenario run on fake: 1 passed, 0 failed"),
        "{text}"
    );
}

#[test]
fn the_environment_and_guest_image_hash_are_in_every_result_and_the_summary() {
    let mut env = env();
    let mut identity = Environment::probe("pvm", Some("10.0.2".into()));
    identity.operator.system_class = Some("ci-large".into());
    env.opts.environment = Some(identity.clone());
    let scenarios = env.scenarios(&[("s.toml", "id = \"x\"\n")]);
    let backend = FakeBackend::new(BackendKind::Qemu, |_| FakeGuest::ready());
    let summary = env.run(&backend, &scenarios);
    let r = one(&summary);
    let text = fs::read_to_string(bundle(r).join("result.json")).expect("result.json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("parse");
    assert_eq!(json["environment"]["host"]["kvm_kind"], "pvm");
    assert_eq!(json["environment"]["host"]["qemu_version"], "10.0.2");
    assert_eq!(json["environment"]["operator"]["system_class"], "ci-large");
    let kernel = artifacts::file_id(&env.dir.path().join("vmlinux"));
    let initrd = artifacts::file_id(&env.dir.path().join("initrd"));
    let image = artifacts::guest_image_sha256(&kernel, Some(&initrd)).expect("hashed");
    assert_eq!(json["provenance"]["guest_image_sha256"], image.as_str());
    assert_eq!(summary.environment.as_ref(), Some(&identity));
    let text = crate::report::summary_text(&summary, "fake");
    assert!(text.contains("environment: kvm pvm, kernel "), "{text}");
    let doc = crate::report::json_document(&summary, "fake", 0);
    assert_eq!(doc["environment"]["operator"]["system_class"], "ci-large");
}

#[test]
fn a_vm_whose_kill_blocks_does_not_delay_another_jobs_deadline() {
    let mut env = env();
    env.opts.jobs = 2;
    env.opts.keep = KeepPolicy::Never;
    let step = "[[steps]]\nrun = [\"flood\"]\ntimeout = 600\n";
    let scenarios = env.scenarios(&[
        ("a.toml", &format!("id = \"stuck\"\ntimeout = 0.2\n{step}")),
        ("b.toml", &format!("id = \"victim\"\ntimeout = 0.6\n{step}")),
    ]);
    // Both guests ignore their deadline (only the watchdog stops them); the first one's VMM
    // takes 3 s to die once killed.
    let backend = FakeBackend::new(BackendKind::Qemu, |plan| FakeGuest {
        kill_delay: if plan.scenario_id == "stuck" {
            Duration::from_secs(3)
        } else {
            Duration::ZERO
        },
        ..FakeGuest::ready().with_exec(|_, _| FakeExec::HangUntilKilled)
    });
    let finished: Mutex<BTreeMap<String, Instant>> = Mutex::default();
    let started = Instant::now();
    let summary = run(&scenarios, &backend, &env.opts, &Control::default(), &|e| {
        if let RunEvent::Finished(o) = e {
            finished
                .lock()
                .unwrap()
                .insert(o.result.scenario.clone(), Instant::now());
        }
    });
    assert_eq!(backend.live(), 0, "every machine torn down");
    assert!(summary.outcomes.iter().all(|o| !o.passed()));
    let victim = finished.lock().unwrap()["victim"] - started;
    assert!(
        victim < Duration::from_millis(1500),
        "the second job ended {victim:?} after the start (deadline 600ms)"
    );
}

#[test]
fn ctrl_c_returns_at_once_while_a_kill_blocks() {
    let control = Control::new();
    let stuck: KillSwitch = Arc::new(|| std::thread::sleep(Duration::from_secs(3)));
    let _guard = control.register(stuck, Instant::now() + Duration::from_secs(600));
    let t = Instant::now();
    assert!(!control.interrupt());
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    // The second Ctrl-C is heard and exits after a bounded wait for the kill.
    let t = Instant::now();
    assert!(control.interrupt());
    assert!(
        t.elapsed() < ABORT_KILL_WAIT + Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
}

/// A guest that fills its output share with a setuid file, a world-writable sticky dir, a
/// fifo, a socket and (as root) a device node, then `n` bytes of data.
fn hostile_writer(n: usize) -> FakeBackend {
    FakeBackend::new(BackendKind::Qemu, move |_| {
        FakeGuest::ready().with_exec(move |_, view| {
            use std::os::unix::fs::PermissionsExt;
            let out = view.plan.shares[0].host_dir.clone();
            let made = (|| -> std::io::Result<()> {
                fs::write(out.join("suid"), b"#!/bin/sh\n")?;
                fs::set_permissions(out.join("suid"), fs::Permissions::from_mode(0o6777))?;
                fs::create_dir(out.join("tmp"))?;
                fs::set_permissions(out.join("tmp"), fs::Permissions::from_mode(0o1777))?;
                fs::write(out.join("tmp/inner"), b"x")?;
                let fifo = std::process::Command::new("mkfifo")
                    .arg(out.join("fifo"))
                    .status()?;
                assert!(fifo.success(), "mkfifo");
                let _socket = std::os::unix::net::UnixListener::bind(out.join("sock"))?;
                std::os::unix::fs::symlink("/etc/passwd", out.join("link"))?;
                fs::write(out.join("big.bin"), vec![7u8; n])?;
                Ok(())
            })();
            match made {
                Ok(()) => FakeExec::exit(0, ""),
                Err(e) => FakeExec::exit(1, &e.to_string()),
            }
        })
    })
}

const HOSTILE: &str = "id = \"hostile\"\n[[steps]]\nshell = \"fill /mnt/output\"\n";

/// Bundles are owner-only, and a share's setuid bits, fifos, sockets and links never reach one.
#[test]
fn bundles_are_owner_only_and_never_hold_special_files_or_setuid_bits() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let env = env();
    let scenarios = env.scenarios(&[("h.toml", HOSTILE)]);
    let summary = env.run(&hostile_writer(10), &scenarios);
    let r = one(&summary);
    assert!(r.passed(), "{:?}", r.failure);
    let dir = bundle(r);
    let mode = |p: &std::path::Path| fs::symlink_metadata(p).expect("stat").permissions().mode();
    let mut stack = vec![dir.parent().expect("scenario dir").to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = fs::symlink_metadata(&p).expect("stat");
        let kind = meta.file_type();
        if kind.is_symlink() && p.file_name() == Some("latest".as_ref()) {
            continue;
        }
        assert!(
            kind.is_dir() || kind.is_file(),
            "{} is neither a file nor a dir",
            p.display()
        );
        assert!(!kind.is_fifo() && !kind.is_socket());
        assert_eq!(mode(&p) & 0o7077, 0, "{} is {:o}", p.display(), mode(&p));
        if kind.is_dir() {
            assert_eq!(mode(&p) & 0o777, 0o700, "{}", p.display());
            stack.extend(
                fs::read_dir(&p)
                    .expect("ls")
                    .map(|e| e.expect("entry").path()),
            );
        }
    }
    let out = dir.join("fixtures/output");
    assert_eq!(fs::read(out.join("tmp/inner")).expect("inner"), b"x");
    assert_eq!(mode(&out.join("suid")) & 0o7777, 0o700);
    for gone in ["fifo", "sock", "link"] {
        assert!(
            fs::symlink_metadata(out.join(gone)).is_err(),
            "{gone} copied"
        );
    }
    let log = fs::read_to_string(dir.join("harness.log")).expect("harness.log");
    for skipped in [
        "fifo: a fifo, not copied",
        "sock: a socket, not copied",
        "link: a symbolic link, not copied",
    ] {
        assert!(log.contains(skipped), "{skipped:?} not in\n{log}");
    }
}

/// `--artifacts-mode shared`: readable by everyone, still never setuid.
#[test]
fn shared_bundles_are_world_readable_but_never_setuid() {
    use std::os::unix::fs::PermissionsExt;
    let mut env = env();
    env.opts.artifacts_mode = ArtifactsMode::Shared;
    let scenarios = env.scenarios(&[("h.toml", HOSTILE)]);
    let summary = env.run(&hostile_writer(10), &scenarios);
    let dir = bundle(one(&summary));
    let mode = |p: PathBuf| fs::metadata(p).expect("stat").permissions().mode() & 0o7777;
    assert_eq!(mode(dir.clone()), 0o755);
    assert_eq!(mode(dir.join("result.json")), 0o644);
    assert_eq!(mode(dir.join("fixtures/output/suid")), 0o755);
    assert_eq!(mode(dir.join("fixtures/output/tmp")), 0o755);
}

/// A guest that writes more than the fixtures limit fails the scenario, naming the limit and
/// the share, and nothing past the limit is copied.
#[test]
fn a_share_over_the_fixtures_limit_fails_and_is_not_copied_past_it() {
    let env = env();
    let toml = HOSTILE.replace("\n[[steps]]", "\nfixtures_limit = \"1KiB\"\n[[steps]]");
    let scenarios = env.scenarios(&[("h.toml", &toml)]);
    assert_eq!(scenarios[0].fixtures_limit, 1024);
    let summary = env.run(&hostile_writer(4096), &scenarios);
    let r = one(&summary);
    let f = r.failure.as_ref().expect("failed");
    assert_eq!(f.class, FailureClass::ExpectationFailed);
    assert!(
        f.message
            .starts_with("share `output` holds more than the fixtures limit of 1024 bytes"),
        "{}",
        f.message
    );
    assert!(!f.message.contains('\n'));
    let mut total = 0;
    let mut stack = vec![bundle(r).join("fixtures")];
    while let Some(p) = stack.pop() {
        for e in fs::read_dir(&p).expect("ls") {
            let e = e.expect("entry");
            if e.file_type().expect("type").is_dir() {
                stack.push(e.path());
            } else {
                total += e.metadata().expect("stat").len();
            }
        }
    }
    assert!(total <= 1024, "{total} bytes copied");
    assert!(!bundle(r).join("fixtures/output/big.bin").exists());
    // The same scenario under the default limit passes, and the CLI's override wins.
    let mut env = env;
    env.opts.fixtures_limit = Some(1 << 20);
    assert!(one(&env.run(&hostile_writer(4096), &scenarios)).passed());
}

/// Each pause the hook saw, with what `kiln shell` would have found at that moment.
type SeenPauses = Arc<std::sync::Mutex<Vec<(Pause, Option<paused::PausedRun>)>>>;

#[test]
fn a_paused_run_records_its_agent_until_the_pause_ends() {
    let mut env = env();
    let agent = kiln_backends::AgentTransport::Serial(PathBuf::from("/run/fake/agent.sock"));
    let seen: SeenPauses = Arc::default();
    let hook_seen = seen.clone();
    let artifacts = env.opts.artifacts.clone();
    env.opts.pause_before_teardown = true;
    env.opts.pause = Some(Arc::new(move |pause: &Pause| {
        // What `kiln shell x` finds while the run waits here.
        let found = paused::find(&artifacts, "x").ok();
        hook_seen.lock().unwrap().push((pause.clone(), found));
    }));
    let scenarios = env.scenarios(&[("x.toml", "id = \"x\"\n")]);
    let with_agent = agent.clone();
    let backend = FakeBackend::new(BackendKind::Qemu, move |_| FakeGuest {
        agent: Some(with_agent.clone()),
        ..FakeGuest::ready()
    });
    let summary = env.run(&backend, &scenarios);
    let result = one(&summary);
    assert!(result.passed(), "{:?}", result.failure);
    let seen = seen.lock().unwrap();
    let (pause, found) = &seen[0];
    assert_eq!(pause.scenario, "x");
    let record = pause.record.as_ref().expect("a record while paused");
    assert!(record.ends_with(paused::PAUSED_FILE));
    let found = found.as_ref().expect("kiln shell finds the run");
    assert_eq!(
        (found.run_id.as_str(), &found.agent),
        (result.run_id.as_str(), &agent)
    );
    // Gone once the pause ended: neither in the published bundle nor findable.
    assert!(!bundle(result).join(paused::PAUSED_FILE).exists());
    assert!(paused::find(&env.opts.artifacts, "x").is_err());
}

#[test]
fn a_machine_without_a_reachable_agent_pauses_without_a_record() {
    let mut env = env();
    let seen: Arc<std::sync::Mutex<Vec<Pause>>> = Arc::default();
    let hook_seen = seen.clone();
    env.opts.pause_before_teardown = true;
    env.opts.pause = Some(Arc::new(move |pause: &Pause| {
        hook_seen.lock().unwrap().push(pause.clone())
    }));
    let scenarios = env.scenarios(&[("x.toml", "id = \"x\"\n")]);
    let backend = FakeBackend::new(BackendKind::Qemu, |_| FakeGuest::ready());
    env.run(&backend, &scenarios);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].record.is_none());
    assert!(seen[0].what.starts_with("x (run "), "{}", seen[0].what);
}

fn readiness_json(r: &RunResult) -> serde_json::Value {
    let text = fs::read(bundle(r).join("readiness.json")).expect("readiness.json in the bundle");
    serde_json::from_slice(&text).expect("readiness.json parses")
}

#[test]
fn readiness_json_keeps_rejected_and_accepted_records_and_the_transport() {
    let env = env();
    let scenarios = env.scenarios(&[("s.toml", "id = \"rd\"\n[[steps]]\nrun = [\"true\"]\n")]);
    let backend = FakeBackend::new(BackendKind::Qemu, |_| FakeGuest {
        boot_lines: vec![
            // Printed by a guest that had been up for 10 minutes: not this VM's boot.
            (
                Duration::from_millis(1),
                "KILN_READY v=1 boot=old transport=serial:org.kiln.agent.0 t=600000".into(),
            ),
            (Duration::from_millis(2), "KILN_READY v=1 boot=x".into()),
            (
                Duration::from_millis(3),
                "KILN_READY v=1 boot=new transport=serial:org.kiln.agent.0 t=1".into(),
            ),
        ],
        ..FakeGuest::ready()
    });
    let summary = env.run(&backend, &scenarios);
    let r = one(&summary);
    assert!(r.passed(), "{:?}", r.failure);
    assert_eq!(r.ready.len(), 1);
    assert!(r.ready[0].contains("boot=new"), "{:?}", r.ready);
    let doc = readiness_json(r);
    assert_eq!(doc["kind"], "agent");
    assert_eq!(doc["outcome"], "ready");
    assert_eq!(doc["signal_transport"], "console");
    assert_eq!(doc["agent_transport"], "serial:org.kiln.agent.0");
    assert_eq!(doc["agent_transport_offered"], true);
    let records = doc["records"].as_array().expect("records");
    let got: Vec<(&str, &str)> = records
        .iter()
        .map(|r| {
            (
                r["status"].as_str().unwrap_or_default(),
                r["reason"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("rejected", "earlier-boot"),
            ("rejected", "unparsable"),
            ("accepted", "-")
        ]
    );
    assert_eq!(records[2]["boot"], "new");
    assert!(records[0]["detail"]
        .as_str()
        .is_some_and(|d| d.contains("up 600000 ms")));
}

#[test]
fn a_record_from_an_earlier_boot_alone_is_a_readiness_timeout() {
    let env = env();
    let scenarios = env.scenarios(&[("s.toml", "id = \"x\"\n[readiness]\ntimeout = 0.3\n")]);
    let backend = FakeBackend::new(BackendKind::Qemu, |_| FakeGuest {
        boot_lines: vec![(
            Duration::from_millis(1),
            "KILN_READY v=1 boot=old transport=serial:org.kiln.agent.0 t=600000".into(),
        )],
        ..FakeGuest::ready()
    });
    let summary = env.run(&backend, &scenarios);
    let r = one(&summary);
    assert_eq!(r.class(), Some(FailureClass::ReadinessTimeout));
    let doc = readiness_json(r);
    assert_eq!(doc["outcome"], "timed-out");
    assert!(doc["message"]
        .as_str()
        .is_some_and(|m| m.contains("readiness timeout of 300ms")));
    assert_eq!(doc["records"][0]["status"], "rejected");
    assert_eq!(doc["records"][0]["reason"], "earlier-boot");
    assert_eq!(doc["records"].as_array().map(Vec::len), Some(1));
    assert_eq!(doc["agent_transport_offered"], serde_json::Value::Null);
}

#[test]
fn readiness_json_of_a_marker_wait_lists_the_markers() {
    let env = env();
    let scenarios = env.scenarios(&[(
        "s.toml",
        "id = \"mk\"\n[readiness]\nsequence = [{ marker = 'Linux' }, { marker = 'KILN_READY' }]\n",
    )]);
    let backend = FakeBackend::new(BackendKind::Qemu, |_| FakeGuest::ready());
    let summary = env.run(&backend, &scenarios);
    let r = one(&summary);
    assert!(r.passed(), "{:?}", r.failure);
    let doc = readiness_json(r);
    assert_eq!(doc["kind"], "sequence");
    assert_eq!(doc["outcome"], "ready");
    assert_eq!(doc["markers"].as_array().map(Vec::len), Some(2));
    assert_eq!(doc["records"].as_array().map(Vec::len), Some(0));
}

#[test]
fn a_machine_on_another_accelerator_says_so_in_result_json() {
    let env = env();
    let scenarios = env.scenarios(&[("s.toml", "id = \"fb\"\n")]);
    let backend = FakeBackend::new(BackendKind::Qemu, |_| FakeGuest {
        version: Some("QEMU 10.0.2, accel tcg (KVM unavailable at run time: x)".into()),
        ..FakeGuest::ready()
    });
    let summary = env.run(&backend, &scenarios);
    let r = one(&summary);
    assert!(r.passed(), "{:?}", r.failure);
    let written: serde_json::Value =
        serde_json::from_slice(&fs::read(bundle(r).join("result.json")).expect("result.json"))
            .expect("parses");
    assert_eq!(
        written["provenance"]["backend_version"],
        "QEMU 10.0.2, accel tcg (KVM unavailable at run time: x)"
    );
}
