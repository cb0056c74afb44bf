//! `kiln run --baseline` (issue 13) with the real binary: a scenario that passed in the baseline
//! and fails now is a regression (exit 5, regression-summary.txt in its bundle, `change` in the
//! JSON); one that failed there too is not (exit 1, no regression file). The scenarios boot the
//! bare-metal `pvh_info` guest through the kiln backend, so PVM is enough; a baseline path that
//! is neither kind is a usage error before anything boots. Each bundle keeps readiness.json.

#[macro_use]
mod common;

use common::describe;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Writes scenario `id` on the `pvh_info` guest: it passes when `marker` is what the guest
/// prints ("PVH done"), and fails at readiness otherwise (the guest exits without it).
fn scenario(corpus: &Path, guest: &Path, id: &str, marker: &str) {
    fs::write(
        corpus.join(format!("{id}.toml")),
        format!(
            "id = \"{id}\"\nbackends = [\"kiln\"]\n[guest]\nkernel = \"{}\"\nmemory = 64\n\
             [readiness]\nmarker = '{marker}'\ntimeout = \"30s\"\n",
            guest.display()
        ),
    )
    .unwrap();
}

fn run(corpus: &Path, art: &Path, baseline: Option<&Path>) -> Output {
    let mut args = vec![
        "run",
        corpus.to_str().unwrap(),
        "--backend",
        "kiln",
        "--jobs",
        "1",
        "--json",
        "--artifacts",
        art.to_str().unwrap(),
    ];
    if let Some(b) = baseline {
        args.extend(["--baseline", b.to_str().unwrap()]);
    }
    kiln(&args)
}

fn change_of(doc: &serde_json::Value, id: &str) -> String {
    doc["scenarios"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .map(|s| s["change"].as_str().unwrap_or("none").to_string())
        .unwrap_or_default()
}

fn latest(art: &Path, id: &str) -> PathBuf {
    art.join(id).join("latest")
}

#[test]
fn a_regression_exits_5_and_an_old_failure_exits_1() {
    or_skip!(common::kvm_usable());
    let guest = or_skip!(common::build_guest("pvh_info"));
    let dir = tempfile::tempdir().unwrap();
    let (corpus, art) = (dir.path().join("corpus"), dir.path().join("art"));
    fs::create_dir_all(&corpus).unwrap();
    scenario(&corpus, &guest, "steady", "PVH done");
    scenario(&corpus, &guest, "flips", "PVH done");
    scenario(&corpus, &guest, "old-bad", "never printed");

    let first = run(&corpus, &art, None);
    assert_eq!(first.status.code(), Some(1), "{}", describe(&first));
    let baseline_json = dir.path().join("first.json");
    fs::write(&baseline_json, &first.stdout).unwrap();

    // Against itself (its artifacts dir): the one failure was already there.
    let again = run(&corpus, &art, Some(&art));
    assert_eq!(again.status.code(), Some(1), "{}", describe(&again));
    let doc: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(change_of(&doc, "old-bad"), "still-failing");
    assert_eq!(change_of(&doc, "steady"), "still-passing");
    assert_eq!(doc["baseline"]["regressions"], 0);
    assert!(!latest(&art, "old-bad")
        .join("regression-summary.txt")
        .exists());
    // Each bundle keeps its readiness evidence.
    let readiness = |id: &str| -> serde_json::Value {
        serde_json::from_slice(&fs::read(latest(&art, id).join("readiness.json")).unwrap()).unwrap()
    };
    assert_eq!(readiness("steady")["outcome"], "ready");
    assert_eq!(readiness("steady")["kind"], "marker");
    assert_eq!(readiness("steady")["markers"][0]["line"], "PVH done");
    assert_eq!(readiness("old-bad")["outcome"], "vm-exited");

    // `flips` now fails: against the first run's --json output it is a regression.
    scenario(&corpus, &guest, "flips", "never printed");
    let regressed = run(&corpus, &art, Some(&baseline_json));
    assert_eq!(regressed.status.code(), Some(5), "{}", describe(&regressed));
    let doc: serde_json::Value = serde_json::from_slice(&regressed.stdout).unwrap();
    assert_eq!(doc["exit_code"], 5);
    assert_eq!(change_of(&doc, "flips"), "newly-failing");
    assert_eq!(change_of(&doc, "old-bad"), "still-failing");
    assert_eq!(doc["baseline"]["regressions"], 1);
    let summary = fs::read_to_string(latest(&art, "flips").join("regression-summary.txt"))
        .unwrap_or_else(|e| panic!("no regression-summary.txt: {e}\n{}", describe(&regressed)));
    assert!(summary.contains("change: newly-failing"), "{summary}");
    assert!(summary.contains("failure: readiness-timeout"), "{summary}");
    assert!(!latest(&art, "old-bad")
        .join("regression-summary.txt")
        .exists());
    let stderr = String::from_utf8_lossy(&regressed.stderr);
    assert!(
        stderr.contains("1 newly failing, 0 newly passing, 1 still failing, 0 new, 0 removed"),
        "{stderr}"
    );
}

#[test]
fn a_baseline_that_is_neither_kind_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    fs::create_dir_all(&corpus).unwrap();
    // Nothing may boot: the "kernel" is not one.
    let kernel = dir.path().join("not-a-kernel");
    fs::write(&kernel, b"x").unwrap();
    scenario(&corpus, &kernel, "s", "PVH done");
    let empty = dir.path().join("empty");
    fs::create_dir_all(&empty).unwrap();
    let art = dir.path().join("art");
    let out = run(&corpus, &art, Some(&empty));
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!("kiln: error: --baseline {}: ", empty.display())),
        "{stderr}"
    );
    assert!(!art.exists(), "a bundle was made");
}
