//! Artifact budgets (issue 13): `kiln artifacts status` and `prune` on a tree of dated runs laid
//! out as `kiln run` writes them, and `kiln run --max-size` / `--enforce-budget` / kiln.toml's
//! `[artifacts] max_size`. The runs that boot use a bare-metal guest (tests/guests) through the
//! kiln backend, so PVM is enough.

#[macro_use]
mod common;

use common::describe;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const MIB: usize = 1 << 20;

/// The pid of a process that has ended: its runs are finished.
fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

/// A published run `<artifacts>/<scenario>/<day>T…Z-p<pid>-a1` of December 2026 holding
/// `bytes` of console.log.
fn run(artifacts: &Path, scenario: &str, day: u32, pid: u32, bytes: usize) -> PathBuf {
    let dir = artifacts
        .join(scenario)
        .join(format!("202612{day:02}T101500.250Z-p{pid}-a1"));
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("console.log"), vec![b'x'; bytes]).unwrap();
    fs::write(dir.join("result.json"), b"{}").unwrap();
    dir
}

/// Points `<scenario>/latest` at `run`, as a finished run does.
fn latest(run: &Path) {
    let name = run.file_name().unwrap();
    std::os::unix::fs::symlink(name, run.parent().unwrap().join("latest")).unwrap();
}

fn kiln(args: &[&str], artifacts: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .arg("--artifacts")
        .arg(artifacts)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The run dirs of a scenario, by name.
fn runs(artifacts: &Path, scenario: &str) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(artifacts.join(scenario))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.') && n != "latest")
        .collect();
    names.sort();
    names
}

/// Two scenarios: `a` with 5 runs (days 1..=5, 1 MiB each; latest → day 1, day 2's kiln run
/// still running), `b` with 1 run of 2 MiB.
fn fabricated(artifacts: &Path) {
    let dead = dead_pid();
    for day in 1..=5 {
        let pid = if day == 2 { std::process::id() } else { dead };
        let dir = run(artifacts, "a", day, pid, MIB);
        if day == 1 {
            latest(&dir);
        }
    }
    latest(&run(artifacts, "b", 3, dead, 2 * MIB));
    // A staging dir of a run in progress: never a run, never pruned.
    fs::create_dir_all(artifacts.join(format!(
        "a/.20261206T000000.000Z-p{}-a1.partial",
        std::process::id()
    )))
    .unwrap();
}

#[test]
fn status_reports_runs_sizes_and_dates_per_scenario() {
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("art");
    fabricated(&art);
    let out = kiln(&["artifacts", "status", "--json"], &art);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["runs"], 6);
    assert_eq!(json["bytes"], 7 * MIB + 6 * 2);
    let a = &json["scenarios"][0];
    assert_eq!(a["scenario"], "a");
    assert_eq!(a["runs"], 5);
    assert_eq!(a["bytes"], 5 * MIB + 5 * 2);
    assert_eq!(a["oldest"], "2026-12-01T10:15:00Z");
    assert_eq!(a["newest"], "2026-12-05T10:15:00Z");
    assert_eq!(json["scenarios"][1]["runs"], 1);

    let out = kiln(&["artifacts", "status"], &art);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("a ") && l.contains("5.0 MiB")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("total") && l.contains("7.0 MiB")),
        "{table}"
    );
}

#[test]
fn prune_keeps_the_newest_n_latest_and_runs_in_progress() {
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("art");
    fabricated(&art);
    let before = runs(&art, "a");

    let out = kiln(&["artifacts", "prune", "--keep", "1", "--dry-run"], &art);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(runs(&art, "a"), before, "a dry run removed something");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("kiln: would prune 2 runs of 1 scenario, freeing 2.0 MiB"),
        "{stderr}"
    );
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains("20261203T") && listed.contains("20261204T"),
        "{listed}"
    );

    // What a killed prune and a killed run left: the prune finishes and removes them.
    let leftovers = [
        art.join("a/.pruning-20261130T000000.000Z-p1-a1"),
        art.join(format!(
            "a/.20261130T000000.000Z-p{}-a1.partial",
            dead_pid()
        )),
    ];
    for d in &leftovers {
        fs::create_dir_all(d.join("vm")).unwrap();
    }
    let out = kiln(&["artifacts", "prune", "--keep", "1"], &art);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    for d in &leftovers {
        assert!(!d.exists(), "{} left", d.display());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("kiln: pruned 2 runs of 1 scenario, freed 2.0 MiB"),
        "{stderr}"
    );
    // Day 5 is the newest, day 1 the latest, day 2's run still running.
    let left: Vec<String> = runs(&art, "a").iter().map(|n| n[..8].to_string()).collect();
    assert_eq!(left, ["20261201", "20261202", "20261205"]);
    assert_eq!(runs(&art, "b").len(), 1);
    assert!(fs::read_link(art.join("a/latest")).is_ok());
    assert!(art
        .join(format!(
            "a/.20261206T000000.000Z-p{}-a1.partial",
            std::process::id()
        ))
        .is_dir());
    let names: Vec<String> = fs::read_dir(art.join("a"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with(".pruning-")),
        "{names:?}"
    );
}

#[test]
fn older_than_only_removes_old_runs_beyond_keep() {
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("art");
    let dead = dead_pid();
    let now = std::time::SystemTime::now();
    // Runs 40 and 20 days old, and one from today.
    for (i, days) in [40u64, 20, 0].into_iter().enumerate() {
        let t = now - std::time::Duration::from_secs(days * 86400);
        let stamp: String = kiln_stamp(t);
        let d = art.join("s").join(format!("{stamp}-p{dead}-a{}", i + 1));
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("console.log"), b"c").unwrap();
    }
    let out = kiln(
        &["artifacts", "prune", "--keep", "1", "--older-than", "30d"],
        &art,
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(
        fs::read_dir(art.join("s")).unwrap().count(),
        2,
        "{}",
        describe(&out)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("pruned 1 run of 1 scenario"));
}

/// A run id's stamp for `t`, as `kiln run` writes it (RFC 3339 without `-` and `:`).
fn kiln_stamp(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}.000Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[test]
fn bad_values_are_one_line_errors_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    for (args, flag) in [
        (
            &["artifacts", "prune", "--keep", "abc"][..],
            "'abc' for '--keep",
        ),
        (
            &["artifacts", "prune", "--keep", "1", "--older-than", "3x"][..],
            "'3x' for '--older-than",
        ),
        (
            &["run", "scenarios", "--max-size", "12Q"][..],
            "'12Q' for '--max-size",
        ),
    ] {
        let out = kiln(args, dir.path());
        assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
        let first = String::from_utf8_lossy(&out.stderr)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        assert!(first.contains(flag), "{args:?}: {first}");
    }
}

/// A corpus of one scenario `s` on the bare-metal `pvh_info` guest, kiln backend.
fn corpus(dir: &Path, guest: &Path, kiln_toml: &str) -> PathBuf {
    let corpus = dir.join("corpus");
    fs::create_dir_all(&corpus).unwrap();
    fs::write(corpus.join("kiln.toml"), kiln_toml).unwrap();
    fs::write(
        corpus.join("s.toml"),
        format!(
            "id = \"s\"\nbackends = [\"kiln\"]\n[guest]\nkernel = \"{}\"\nmemory = 64\n\
             [readiness]\nmarker = 'PVH done'\ntimeout = \"30s\"\n",
            guest.display()
        ),
    )
    .unwrap();
    corpus
}

#[test]
fn enforce_budget_fails_before_booting_when_over() {
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("art");
    fabricated(&art);
    // No guest needed: nothing may boot. The "kernel" is not one.
    let kernel = dir.path().join("not-a-kernel");
    fs::write(&kernel, b"x").unwrap();
    let corpus = corpus(dir.path(), &kernel, "");
    let out = kiln(
        &[
            "run",
            corpus.to_str().unwrap(),
            "--backend",
            "kiln",
            "--max-size",
            "6MiB",
            "--enforce-budget",
        ],
        &art,
    );
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let line = stderr.lines().next().unwrap_or_default();
    for part in [
        art.to_str().unwrap(),
        "7.0 MiB",
        "6.0 MiB",
        "--max-size",
        "kiln artifacts prune --keep",
    ] {
        assert!(line.contains(part), "{part}: {line}");
    }
    assert!(!art.join("s").exists(), "a bundle was made");

    // --enforce-budget without a budget is a usage error, not a silent pass.
    let out = kiln(
        &[
            "run",
            corpus.to_str().unwrap(),
            "--backend",
            "kiln",
            "--enforce-budget",
        ],
        &art,
    );
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--enforce-budget needs a budget"));

    // The same budget from kiln.toml.
    let corpus = self::corpus(dir.path(), &kernel, "[artifacts]\nmax_size = \"6MiB\"\n");
    let out = kiln(
        &[
            "run",
            corpus.to_str().unwrap(),
            "--backend",
            "kiln",
            "--enforce-budget",
        ],
        &art,
    );
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("max_size in "),
        "{}",
        describe(&out)
    );
    assert!(!art.join("s").exists(), "a bundle was made");
}

#[test]
fn a_run_reports_its_budget_and_warns_when_over() {
    or_skip!(common::kvm_usable());
    let guest = or_skip!(common::build_guest("pvh_info"));
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("art");
    let corpus = corpus(dir.path(), &guest, "[artifacts]\nmax_size = \"1GiB\"\n");
    let out = kiln(
        &[
            "run",
            corpus.to_str().unwrap(),
            "--backend",
            "kiln",
            "--enforce-budget",
        ],
        &art,
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report = stderr
        .lines()
        .find(|l| l.starts_with("kiln: artifacts: "))
        .unwrap_or_default();
    assert!(
        report.ends_with(&format!("of budget 1024.0 MiB in {}", art.display())),
        "{stderr}"
    );
    assert!(!stderr.contains("warning"), "{stderr}");

    // Over a tiny budget: the run still runs (no --enforce-budget) and warns after its summary.
    let out = kiln(
        &[
            "run",
            corpus.to_str().unwrap(),
            "--backend",
            "kiln",
            "--max-size",
            "1KiB",
        ],
        &art,
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    let warning = lines.iter().position(|l| {
        l.starts_with("kiln: warning: ") && l.contains("over its budget (--max-size)")
    });
    assert_eq!(warning, Some(lines.len() - 1), "{stderr}");
    assert!(
        lines[lines.len() - 2].contains("of budget 1.0 KiB"),
        "{stderr}"
    );
    assert_eq!(runs(&art, "s").len(), 2);
}

#[test]
fn a_run_without_a_budget_says_nothing_about_one() {
    or_skip!(common::kvm_usable());
    let guest = or_skip!(common::build_guest("pvh_info"));
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("art");
    let corpus = corpus(dir.path(), &guest, "");
    let out = kiln(
        &["run", corpus.to_str().unwrap(), "--backend", "kiln"],
        &art,
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("budget"),
        "{}",
        describe(&out)
    );
}
