//! `kiln run` end to end on the QEMU backend with the default guest (TCG here, KVM where the
//! host has it): the `scenarios/` corpus passes at `--jobs 2`; each expected-failure scenario
//! fails with the class its file names; bundles, result.json, JUnit and exit codes are checked;
//! and Ctrl-C in the middle of a run leaves no QEMU process, overlay or temp dir behind.
//!
//! The tests share two CPU cores in CI, so they take turns (one `kiln run` at a time).

mod common;

use common::describe;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln::guest::{default_guest, GuestError};
use serde_json::Value;

/// One `kiln run` at a time: each already runs two VMs.
static ONE_RUN: Mutex<()> = Mutex::new(());

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `Ok` when QEMU is installed and the default guest is cached or can be built here.
fn can_run() -> Result<(), String> {
    common::qemu()?;
    let qemu_img = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .any(|d| d.join("qemu-img").is_file());
    if !qemu_img {
        return common::ci_requires(
            "qemu-img not found on PATH (apt-get install qemu-utils)".into(),
        );
    }
    match default_guest() {
        Ok(_) => Ok(()),
        // No apt, no network or no package lists: the machine cannot fetch the kernel (CI can).
        Err(GuestError::Invalid(message))
            if message.contains("apt-get") || message.contains("cannot run dpkg-deb") =>
        {
            common::ci_requires(format!("cannot build the default guest here: {message}"))
        }
        Err(e) => panic!("building the default guest failed: {e}"),
    }
}

/// `kiln run --backend qemu PATH --jobs 2 --artifacts DIR --junit DIR/junit.xml` (+ `extra`).
fn kiln_run(corpus: &Path, artifacts: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.arg("run")
        .arg(corpus)
        .args(["--backend", "qemu", "--jobs", "2", "--artifacts"])
        .arg(artifacts)
        .arg("--junit")
        .arg(artifacts.join("junit.xml"))
        .args(extra)
        .env("KILN_LOG", "warn")
        .stdin(Stdio::null());
    cmd
}

fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run kiln: {e}"))
}

/// The latest bundle of `id`, checked to hold what every bundle holds.
fn bundle(artifacts: &Path, id: &str) -> (PathBuf, Value) {
    let dir = artifacts.join(id).join("latest");
    for file in ["scenario.toml", "console.log", "harness.log", "result.json"] {
        assert!(
            dir.join(file).is_file(),
            "{id}: no {file} in {}",
            dir.display()
        );
    }
    let result: Value =
        serde_json::from_slice(&fs::read(dir.join("result.json")).unwrap()).unwrap();
    assert_eq!(result["scenario"], id);
    assert_eq!(result["provenance"]["backend"], "qemu");
    let version = result["provenance"]["backend_version"]
        .as_str()
        .unwrap_or("");
    assert!(
        version.starts_with("QEMU ") && version.contains("accel "),
        "{version}"
    );
    assert!(
        result["provenance"]["kernel"]["sha256"].is_string(),
        "{result}"
    );
    (dir, result)
}

fn junit(artifacts: &Path) -> quick_junit::Report {
    let xml = fs::read_to_string(artifacts.join("junit.xml")).expect("junit.xml written");
    quick_junit::Report::deserialize_from_str(&xml).expect("junit.xml parses")
}

#[test]
fn the_corpus_passes_and_each_expected_failure_fails_with_its_class() {
    or_skip!(can_run());
    let _turn = ONE_RUN.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();

    // A relative --artifacts (the default is `kiln-artifacts`), as a user in a checkout runs it.
    let artifacts = tmp.path().join("pass");
    let started = Instant::now();
    let out =
        output(kiln_run(&root().join("scenarios"), Path::new("pass"), &[]).current_dir(tmp.path()));
    eprintln!("scenarios/ at --jobs 2: {:?}", started.elapsed());
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let ids = common::corpus(&root().join("scenarios"));
    assert!(ids.len() >= 3, "{ids:?}");
    for (id, _) in &ids {
        let (dir, result) = bundle(&artifacts, id);
        assert_eq!(result["verdict"], "pass", "{id}: {result}");
        assert!(
            dir.join("agent.jsonl").is_file(),
            "{id}: no agent transcript"
        );
        assert!(!dir.join("failure-summary.txt").exists());
        let phases = &result["phases"];
        for phase in ["vm_create_ms", "ready_ms", "teardown_ms", "total_ms"] {
            assert!(
                phases[phase].as_f64().is_some(),
                "{id}: no {phase}: {phases}"
            );
        }
    }
    let fixtures = artifacts.join("fixture-generation/latest/fixtures/output");
    for file in [
        "flows.csv",
        "summary.json",
        "handshake.txt",
        "checksums.sha256",
    ] {
        let len = fs::metadata(fixtures.join(file)).map_or(0, |m| m.len());
        assert!(len > 0, "fixture {file} missing or empty");
    }
    let overlay = artifacts.join("cow-disk/latest/fixtures/disks/scratch.qcow2");
    let data = fs::read(&overlay).expect("the kept overlay");
    assert!(data.starts_with(b"QFI\xfb"), "not a qcow2 overlay");
    let report = junit(&artifacts);
    assert_eq!(
        (report.tests, report.failures, report.errors),
        (ids.len(), 0, 0)
    );

    let artifacts = tmp.path().join("xfail");
    let xfail_dir = root().join("tests/scenarios/expected-fail");
    let started = Instant::now();
    let out = output(&mut kiln_run(&xfail_dir, &artifacts, &[]));
    eprintln!("expected-fail/ at --jobs 2: {:?}", started.elapsed());
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let ids = common::corpus(&xfail_dir);
    for (id, expected) in &ids {
        let expected = expected
            .as_deref()
            .unwrap_or_else(|| panic!("{id}: no `# expected: CLASS` line"));
        let (dir, result) = bundle(&artifacts, id);
        assert_eq!(result["verdict"], "fail", "{id}: {result}");
        assert_eq!(result["failure"]["class"], expected, "{id}: {result}");
        let summary = fs::read_to_string(dir.join("failure-summary.txt"))
            .unwrap_or_else(|e| panic!("{id}: failure-summary.txt: {e}"));
        assert!(summary.contains(expected), "{id}: {summary}");
    }
    // Detected on the console at once, not at the step's two-minute timeout.
    let (_, panic) = bundle(&artifacts, "xfail-guest-panic");
    let total = panic["phases"]["total_ms"].as_f64().unwrap_or(f64::MAX);
    assert!(total < 100_000.0, "guest panic took {total} ms");
    let report = junit(&artifacts);
    assert_eq!(report.tests, ids.len());
    assert_eq!(report.failures + report.errors, ids.len());
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(raw) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push((pid, cmdline));
        }
    }
    found
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "no {what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kills the child if the test fails before it exits.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn ctrl_c_mid_run_leaves_no_vm_overlay_or_temp_dir() {
    or_skip!(can_run());
    let _turn = ONE_RUN.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    // kiln's work dirs (overlays, sockets, shares) go under TMPDIR: a fresh one shows leftovers.
    let work = tmp.path().join("tmp");
    fs::create_dir(&work).unwrap();
    let artifacts = tmp.path().join("artifacts");
    let mut cmd = kiln_run(&root().join("scenarios"), &artifacts, &[]);
    cmd.env("TMPDIR", &work)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut kiln = Reap(cmd.spawn().expect("kiln starts"));
    let needle = work.display().to_string();

    let overlays = || {
        fs::read_dir(&work)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|d| fs::read_dir(d.path()).ok())
            .flatten()
            .flatten()
            .filter(|f| f.path().extension().is_some_and(|e| e == "qcow2"))
            .count()
    };
    // Mid-run: two VMs up, and at least one guest ready (running its steps).
    wait_for("two QEMU processes", Duration::from_secs(60), || {
        processes_mentioning(&needle)
            .iter()
            .filter(|(_, c)| c.contains("qemu-system"))
            .count()
            == 2
    });
    assert_eq!(overlays(), 1, "cow-disk's overlay exists while it runs");
    wait_for("a ready guest", Duration::from_secs(120), || {
        fs::read_dir(&artifacts)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|scenario| fs::read_dir(scenario.path()).ok())
            .flatten()
            .flatten()
            .any(|run| {
                fs::read_to_string(run.path().join("console.log"))
                    .is_ok_and(|c| c.contains("KILN_READY"))
            })
    });

    let pid = i32::try_from(kiln.0.id()).unwrap();
    // SAFETY: kill(2) with a valid signal to our own child; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let interrupted = Instant::now();
    let status = loop {
        if let Some(status) = kiln.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            interrupted.elapsed() < Duration::from_secs(30),
            "kiln still running 30 s after Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("kiln exited {:?} after Ctrl-C", interrupted.elapsed());
    let mut stderr = String::new();
    if let Some(mut pipe) = kiln.0.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");

    let left = processes_mentioning(&needle);
    assert!(left.is_empty(), "processes left behind: {left:?}");
    let leftovers: Vec<_> = fs::read_dir(&work)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(leftovers.is_empty(), "left in TMPDIR: {leftovers:?}");
    // The interrupted scenarios still wrote their bundles, marked cancelled.
    let cancelled = fs::read_dir(&artifacts)
        .unwrap()
        .flatten()
        .filter(|d| d.path().join("latest/result.json").is_file())
        .count();
    assert!(cancelled >= 1, "no bundle written for the interrupted runs");
}
