//! `compare_runs` on synthetic runs: no VM, no qemu-img.

use std::fs;
use std::path::Path;

use super::*;
use kiln_runner::artifacts::{Phases, Provenance, StepResult, StepStatus, Verdict};
use kiln_scenario::{IgnoreRule, Pattern};

/// A run whose step 0 printed `stdout` and exited `code`.
fn result(code: i32, stdout: &str) -> RunResult {
    RunResult {
        scenario: "s".into(),
        run_id: "r".into(),
        attempt: 1,
        verdict: Verdict::Pass,
        failure: None,
        started_at: String::new(),
        ready: Vec::new(),
        steps: vec![StepResult {
            index: 0,
            name: "step".into(),
            status: StepStatus::Pass,
            duration_ms: 1.0,
            exit_code: Some(code),
            signal: None,
            message: None,
            stdout: Some(stdout.into()),
            stderr: Some(String::new()),
        }],
        expectations: Vec::new(),
        phases: Phases::default(),
        provenance: Provenance::default(),
        environment: None,
        bundle: None,
        snapshot: None,
        console_tail: Vec::new(),
    }
}

/// Reads overlays as if they were raw already; a file starting "CORRUPT" fails the check.
struct FakeReader;

impl OverlayReader for FakeReader {
    fn check(&self, overlay: &Path) -> Result<(), OverlayError> {
        match fs::read(overlay) {
            Ok(d) if d.starts_with(b"CORRUPT") => Err(OverlayError::Bad("leaked clusters".into())),
            Ok(_) => Ok(()),
            Err(e) => Err(OverlayError::Tool(e.to_string())),
        }
    }
    fn flatten(&self, overlay: &Path, raw: &Path) -> Result<(), OverlayError> {
        fs::copy(overlay, raw)
            .map(|_| ())
            .map_err(|e| OverlayError::Tool(e.to_string()))
    }
}

struct Pair {
    dir: tempfile::TempDir,
    a: RunResult,
    b: RunResult,
}

impl Pair {
    fn new(a: RunResult, b: RunResult) -> Pair {
        let dir = tempfile::tempdir().expect("tempdir");
        for side in ["a", "b", "work"] {
            fs::create_dir_all(dir.path().join(side)).expect("mkdir");
        }
        Pair { dir, a, b }
    }
    fn file(&self, side: &str, rel: &str, data: &[u8]) {
        let p = self.dir.path().join(side).join(rel);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(p, data).expect("write");
    }
    fn both(&self, rel: &str, data: &[u8]) {
        self.file("a", rel, data);
        self.file("b", rel, data);
    }
    fn compare(&self, rules: &DiffRules) -> Vec<Fact> {
        let (fa, fb) = (self.dir.path().join("a"), self.dir.path().join("b"));
        let a = RunSide {
            label: "kiln",
            result: &self.a,
            fixtures: &fa,
        };
        let b = RunSide {
            label: "qemu",
            result: &self.b,
            fixtures: &fb,
        };
        compare_runs(&a, &b, rules, &FakeReader, &self.dir.path().join("work"))
    }
}

fn fact<'a>(facts: &'a [Fact], name: &str) -> &'a Fact {
    facts
        .iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("no fact {name:?} in {facts:#?}"))
}

fn divergent(facts: &[Fact]) -> Vec<&str> {
    facts
        .iter()
        .filter(|f| f.verdict == FactVerdict::Divergent)
        .map(|f| f.name.as_str())
        .collect()
}

fn ignore(regex: &str, reason: &str) -> DiffRules {
    DiffRules {
        ignore: vec![IgnoreRule {
            regex: Pattern(regex::Regex::new(regex).expect("regex")),
            reason: reason.into(),
        }],
        ..DiffRules::default()
    }
}

#[test]
fn identical_runs_are_identical_fact_by_fact() {
    let p = Pair::new(result(0, "hello\n"), result(0, "hello\n"));
    p.both("output/a.csv", b"x,y\n");
    p.both("disks/scratch.qcow2", b"disk bytes");
    let facts = p.compare(&DiffRules::default());
    assert!(
        facts.iter().all(|f| f.verdict == FactVerdict::Identical),
        "{facts:#?}"
    );
    let names: Vec<&str> = facts.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "verdict",
            "steps[0] \"step\" exit",
            "steps[0] \"step\" stdout",
            "steps[0] \"step\" stderr",
            "fixture output/a.csv",
            "overlay disks/scratch.qcow2"
        ]
    );
}

#[test]
fn an_ignore_rule_tolerates_what_it_masks_and_names_itself() {
    let p = Pair::new(result(0, "at 12:01 ok\n"), result(0, "at 12:07 ok\n"));
    let facts = p.compare(&ignore(r"\d\d:\d\d", "wall clock"));
    assert_eq!(
        fact(&facts, "steps[0] \"step\" stdout").verdict,
        FactVerdict::Tolerated {
            rule: r"diff.ignore[0] /\d\d:\d\d/".into(),
            reason: "wall clock".into()
        }
    );
    // The rule does not hide a real difference next to what it masks.
    let p = Pair::new(result(0, "at 12:01 ok\n"), result(0, "at 12:07 KO\n"));
    let facts = p.compare(&ignore(r"\d\d:\d\d", "wall clock"));
    let f = fact(&facts, "steps[0] \"step\" stdout");
    assert_eq!(f.verdict, FactVerdict::Divergent);
    assert!(
        f.diff.as_deref().unwrap_or("").contains("<ignored>·KO⏎"),
        "{f:?}"
    );
}

#[test]
fn a_divergent_exit_code_is_named() {
    let p = Pair::new(result(0, ""), result(3, ""));
    let facts = p.compare(&DiffRules::default());
    assert_eq!(divergent(&facts), ["steps[0] \"step\" exit"]);
    let diff = fact(&facts, "steps[0] \"step\" exit").diff.clone();
    assert_eq!(
        diff.as_deref(),
        Some("    kiln: pass, exit code 0\n    qemu: pass, exit code 3\n")
    );
    // ignore_steps tolerates it, with its reason.
    let rules = DiffRules {
        ignore_steps: vec![0],
        reason: "flaky probe".into(),
        ..DiffRules::default()
    };
    let facts = p.compare(&rules);
    assert!(divergent(&facts).is_empty(), "{facts:#?}");
    assert_eq!(
        fact(&facts, "steps[0] \"step\" exit").verdict,
        FactVerdict::Tolerated {
            rule: "diff.ignore_steps".into(),
            reason: "flaky probe".into()
        }
    );
}

#[test]
fn a_whitespace_only_stdout_difference_is_shown_visibly() {
    let p = Pair::new(result(0, "a\tb \n"), result(0, "a b\n"));
    let facts = p.compare(&DiffRules::default());
    assert_eq!(divergent(&facts), ["steps[0] \"step\" stdout"]);
    let diff = fact(&facts, "steps[0] \"step\" stdout").diff.clone();
    assert_eq!(diff.as_deref(), Some("    + qemu a·b⏎\n    - kiln a→b·⏎\n"));
}

#[test]
fn a_divergent_fixture_is_caught_by_its_digest_with_a_diff() {
    let p = Pair::new(result(0, ""), result(0, ""));
    p.file("a", "output/flows.csv", b"src,dst\n1,2\n");
    p.file("b", "output/flows.csv", b"src,dst\n1,3\n");
    let facts = p.compare(&DiffRules::default());
    assert_eq!(divergent(&facts), ["fixture output/flows.csv"]);
    let diff = fact(&facts, "fixture output/flows.csv")
        .diff
        .clone()
        .unwrap_or_default();
    assert!(
        diff.contains("- kiln 1,2⏎") && diff.contains("+ qemu 1,3⏎"),
        "{diff}"
    );
    // Binary fixtures get digests and sizes instead.
    p.file("a", "bin", &[0xff, 0, 1]);
    p.file("b", "bin", &[0xff, 0, 2]);
    let facts = p.compare(&DiffRules::default());
    let diff = fact(&facts, "fixture bin").diff.clone().unwrap_or_default();
    assert!(
        diff.contains("sha256") && diff.contains("3 bytes"),
        "{diff}"
    );
}

#[test]
fn a_fixture_missing_on_one_side_is_divergent() {
    let p = Pair::new(result(0, ""), result(0, ""));
    p.file("b", "output/only-qemu.txt", b"x");
    let facts = p.compare(&DiffRules::default());
    assert_eq!(divergent(&facts), ["fixture output/only-qemu.txt"]);
    let diff = fact(&facts, "fixture output/only-qemu.txt").diff.clone();
    assert_eq!(
        diff.as_deref(),
        Some("    kiln: missing\n    qemu: present\n")
    );
}

#[test]
fn a_divergent_overlay_names_the_first_differing_byte() {
    let p = Pair::new(result(0, ""), result(0, ""));
    p.file("a", "disks/scratch.qcow2", b"kiln-cow-pattern");
    p.file("b", "disks/scratch.qcow2", b"kiln-cow-pattexn");
    let facts = p.compare(&DiffRules::default());
    assert_eq!(divergent(&facts), ["overlay disks/scratch.qcow2"]);
    let diff = fact(&facts, "overlay disks/scratch.qcow2")
        .diff
        .clone()
        .unwrap_or_default();
    assert!(diff.contains("at byte 14 (0xe)"), "{diff}");
    // One side failing the check is divergent too, and says which.
    p.file("a", "disks/scratch.qcow2", b"CORRUPT");
    let facts = p.compare(&DiffRules::default());
    let diff = fact(&facts, "overlay disks/scratch.qcow2")
        .diff
        .clone()
        .unwrap_or_default();
    assert_eq!(diff, "    kiln: leaked clusters\n    qemu: checks clean\n");
    // The flattened copies are not left in the work directory.
    assert_eq!(
        fs::read_dir(p.dir.path().join("work")).expect("ls").count(),
        0
    );
}

#[test]
fn a_failed_run_on_one_side_diverges_in_its_verdict() {
    let mut b = result(0, "");
    b.verdict = Verdict::Fail;
    b.failure = Some(kiln_runner::artifacts::Failure {
        class: kiln_runner::FailureClass::ReadinessTimeout,
        message: "no KILN_READY".into(),
        step: None,
    });
    let p = Pair::new(result(0, ""), b);
    let facts = p.compare(&DiffRules::default());
    assert_eq!(divergent(&facts), ["verdict"]);
}

#[test]
fn the_report_and_its_exit_code() {
    use super::report::{RunDiffReport, ScenarioDiff};
    let p = Pair::new(result(0, "x \n"), result(0, "x\n"));
    let report = RunDiffReport {
        labels: ("kiln".into(), "qemu".into()),
        scenarios: vec![
            (
                "a".into(),
                ScenarioDiff::Compared(p.compare(&DiffRules::default())),
            ),
            (
                "b".into(),
                ScenarioDiff::Inconclusive("runs on one backend only".into()),
            ),
        ],
    };
    assert!(report.has_divergent());
    let text = report.to_text();
    assert!(
        text.contains("a: DIVERGENT (4 facts)\n  DIVERGENT    steps[0] \"step\" stdout\n"),
        "{text}"
    );
    assert!(
        text.contains("b: inconclusive (runs on one backend only)\n"),
        "{text}"
    );
    assert!(
        text.ends_with("0 identical, 0 tolerated, 1 inconclusive, 1 DIVERGENT\n"),
        "{text}"
    );
    let json = report.to_json(1);
    assert_eq!(json["summary"]["divergent"], 1);
    assert_eq!(json["scenarios"][0]["facts"][2]["verdict"], "divergent");
}
