//! `kiln run --baseline`: what changed since an earlier run. A baseline is read from either
//! form an earlier run leaves behind — its artifacts dir (each `<scenario>/latest/result.json`)
//! or its `--json` document — before this run writes anything, so a run may compare against
//! the artifacts dir it is about to update.
//!
//! Each scenario gets one [`Change`]; a *regression* is a scenario failing now that did not fail
//! in the baseline (it passed there, or is new). The command line turns "some regression" and
//! "only failures the baseline already had" into different exit codes, and each regressed
//! scenario's bundle gets `regression-summary.txt` ([`regression_summary`]).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::artifacts::{write_atomic, ArtifactsMode, Failure, StepResult, StepStatus, Verdict};
use crate::{RunResult, RunSummary};

/// The file each regressed scenario's bundle gets.
pub const REGRESSION_SUMMARY: &str = "regression-summary.txt";

/// What a baseline remembers of one scenario: the fields of result.json a comparison needs.
/// Other fields are ignored, so result.json files of older kiln versions still read.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BaselineRecord {
    /// Scenario id.
    pub scenario: String,
    /// Run id (the bundle's directory name).
    #[serde(default)]
    pub run_id: String,
    /// Pass or fail.
    pub verdict: Verdict,
    /// Why it failed.
    #[serde(default)]
    pub failure: Option<Failure>,
    /// Step outcomes.
    #[serde(default)]
    pub steps: Vec<StepResult>,
    /// Its bundle, when one was kept.
    #[serde(default)]
    pub bundle: Option<PathBuf>,
}

impl BaselineRecord {
    fn passed(&self) -> bool {
        self.verdict == Verdict::Pass
    }
}

/// An earlier run's results, by scenario id.
#[derive(Debug, Clone, PartialEq)]
pub struct Baseline {
    /// The path it was read from.
    pub source: PathBuf,
    /// Each scenario's record.
    pub records: BTreeMap<String, BaselineRecord>,
}

/// Why a baseline could not be read; each names the path and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    /// Nothing readable is at the path given.
    #[error(
        "{}: {source} (expected an artifacts dir of a kiln run or a `kiln run --json` document)",
        path.display()
    )]
    Missing {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A file or directory in it could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A directory without any `<scenario>/latest/result.json`.
    #[error(
        "{}: not an artifacts dir of a kiln run (no <scenario-id>/latest/result.json in it) \
         nor a `kiln run --json` document",
        .0.display()
    )]
    NoRuns(PathBuf),
    /// A file that is not a `kiln run --json` document.
    #[error(
        "{}: not a `kiln run --json` document ({reason}) nor an artifacts dir of a kiln run",
        path.display()
    )]
    NotJson {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A result.json in an artifacts dir that does not parse.
    #[error("{}: not a kiln result record: {reason}", path.display())]
    BadRecord {
        /// The result.json.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// One scenario of the `--json` document, as far as a baseline reads it.
#[derive(Deserialize)]
struct JsonScenario {
    result: BaselineRecord,
}

/// The `--json` document, as far as a baseline reads it.
#[derive(Deserialize)]
struct JsonDocument {
    #[allow(dead_code)]
    kiln_version: String,
    scenarios: Vec<JsonScenario>,
}

impl Baseline {
    /// Reads an artifacts dir or a `--json` document.
    pub fn load(path: &Path) -> Result<Baseline, BaselineError> {
        let meta = fs::metadata(path).map_err(|source| BaselineError::Missing {
            path: path.to_path_buf(),
            source,
        })?;
        let records = if meta.is_dir() {
            Self::from_artifacts(path)?
        } else {
            Self::from_json(path)?
        };
        Ok(Baseline {
            source: path.to_path_buf(),
            records,
        })
    }

    fn from_json(path: &Path) -> Result<BTreeMap<String, BaselineRecord>, BaselineError> {
        let text = fs::read(path).map_err(|source| BaselineError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let doc: JsonDocument =
            serde_json::from_slice(&text).map_err(|e| BaselineError::NotJson {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        Ok(doc
            .scenarios
            .into_iter()
            .map(|s| (s.result.scenario.clone(), s.result))
            .collect())
    }

    fn from_artifacts(dir: &Path) -> Result<BTreeMap<String, BaselineRecord>, BaselineError> {
        let read_err = |source| BaselineError::Read {
            path: dir.to_path_buf(),
            source,
        };
        let mut records = BTreeMap::new();
        for entry in fs::read_dir(dir).map_err(read_err)? {
            let entry = entry.map_err(read_err)?;
            let name = entry.file_name();
            // Hidden entries are kiln's own staging and stamps, not scenarios.
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let file = entry.path().join("latest").join("result.json");
            let text = match fs::read(&file) {
                Ok(text) => text,
                // A scenario dir whose runs were all pruned, or not a scenario dir at all.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) if e.kind() == io::ErrorKind::NotADirectory => continue,
                Err(source) => return Err(BaselineError::Read { path: file, source }),
            };
            let record: BaselineRecord =
                serde_json::from_slice(&text).map_err(|e| BaselineError::BadRecord {
                    path: file.clone(),
                    reason: e.to_string(),
                })?;
            records.insert(record.scenario.clone(), record);
        }
        if records.is_empty() {
            return Err(BaselineError::NoRuns(dir.to_path_buf()));
        }
        Ok(records)
    }
}

/// How one scenario compares with the baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Change {
    /// Passed in the baseline, fails now: a regression.
    NewlyFailing,
    /// Failed in the baseline, passes now.
    NewlyPassing,
    /// Failed in the baseline and fails now.
    StillFailing,
    /// Passed in the baseline and passes now.
    StillPassing,
    /// Not in the baseline; passes now.
    NewPassing,
    /// Not in the baseline; fails now: a regression too, since the baseline did not have it.
    NewFailing,
    /// In the baseline, not run this time (removed from the corpus, or not selected).
    Removed,
}

impl Change {
    /// The kebab-case name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Change::NewlyFailing => "newly-failing",
            Change::NewlyPassing => "newly-passing",
            Change::StillFailing => "still-failing",
            Change::StillPassing => "still-passing",
            Change::NewPassing => "new-passing",
            Change::NewFailing => "new-failing",
            Change::Removed => "removed",
        }
    }

    /// A failure the baseline did not have.
    pub fn is_regression(self) -> bool {
        matches!(self, Change::NewlyFailing | Change::NewFailing)
    }

    /// The change of a scenario that passed (`Some(true)`) or failed in the baseline (`before`,
    /// `None` when absent) and now (`now`, `None` when it did not run).
    pub fn of(before: Option<bool>, now: Option<bool>) -> Option<Change> {
        Some(match (before, now?) {
            (Some(true), false) => Change::NewlyFailing,
            (Some(false), true) => Change::NewlyPassing,
            (Some(false), false) => Change::StillFailing,
            (Some(true), true) => Change::StillPassing,
            (None, true) => Change::NewPassing,
            (None, false) => Change::NewFailing,
        })
    }
}

/// One scenario's entry in a [`Comparison`].
#[derive(Debug, Clone, PartialEq)]
pub struct ScenarioChange {
    /// Scenario id.
    pub id: String,
    /// What changed.
    pub change: Change,
    /// Its baseline record, when it had one.
    pub before: Option<BaselineRecord>,
}

/// This run against a baseline, scenario by scenario (this run's order, then the removed ones
/// by id). Scenarios this run did not get to (fail-fast, Ctrl-C) are left out.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// Where the baseline was read from.
    pub source: PathBuf,
    /// Every scenario's change.
    pub changes: Vec<ScenarioChange>,
}

impl Comparison {
    /// Compares `summary` with `baseline`.
    pub fn new(baseline: &Baseline, summary: &RunSummary) -> Comparison {
        let mut changes: Vec<ScenarioChange> = summary
            .outcomes
            .iter()
            .filter_map(|o| {
                let id = &o.result.scenario;
                let before = baseline.records.get(id);
                Some(ScenarioChange {
                    id: id.clone(),
                    change: Change::of(before.map(BaselineRecord::passed), Some(o.passed()))?,
                    before: before.cloned(),
                })
            })
            .collect();
        let ran = |id: &str| {
            summary.outcomes.iter().any(|o| o.result.scenario == id)
                || summary.not_run.iter().any(|n| n == id)
        };
        changes.extend(
            baseline
                .records
                .iter()
                .filter(|(id, _)| !ran(id))
                .map(|(id, record)| ScenarioChange {
                    id: id.clone(),
                    change: Change::Removed,
                    before: Some(record.clone()),
                }),
        );
        Comparison {
            source: baseline.source.clone(),
            changes,
        }
    }

    /// How many scenarios have `change`.
    pub fn count(&self, change: Change) -> usize {
        self.changes.iter().filter(|c| c.change == change).count()
    }

    /// Whether any scenario regressed.
    pub fn has_regressions(&self) -> bool {
        self.changes.iter().any(|c| c.change.is_regression())
    }

    /// The change of scenario `id`.
    pub fn change_of(&self, id: &str) -> Option<Change> {
        self.changes.iter().find(|c| c.id == id).map(|c| c.change)
    }

    /// The summary's baseline section: one line of counts, then one line per scenario that
    /// did not simply pass again.
    pub fn summary_text(&self, summary: &RunSummary) -> String {
        let mut out = format!(
            "  Baseline {}: {} newly failing, {} newly passing, {} still failing, {} new, {} removed\n",
            self.source.display(),
            self.count(Change::NewlyFailing),
            self.count(Change::NewlyPassing),
            self.count(Change::StillFailing),
            self.count(Change::NewPassing) + self.count(Change::NewFailing),
            self.count(Change::Removed),
        );
        for c in self
            .changes
            .iter()
            .filter(|c| c.change != Change::StillPassing)
        {
            out += &format!("  {:>18}  {}", c.change.as_str(), c.id);
            let bundle = summary
                .outcomes
                .iter()
                .find(|o| o.result.scenario == c.id)
                .and_then(|o| o.result.bundle.as_ref());
            if let (true, Some(dir)) = (c.change.is_regression(), bundle) {
                out += &format!("  {}", dir.join(REGRESSION_SUMMARY).display());
            }
            out.push('\n');
        }
        out
    }

    /// The `--json` document's `baseline` object: the source, counts, and the removed ids
    /// (every other scenario carries its own `change`).
    pub fn json(&self) -> serde_json::Value {
        let removed: Vec<&str> = self
            .changes
            .iter()
            .filter(|c| c.change == Change::Removed)
            .map(|c| c.id.as_str())
            .collect();
        let mut counts = serde_json::Map::new();
        for change in [
            Change::NewlyFailing,
            Change::NewlyPassing,
            Change::StillFailing,
            Change::StillPassing,
            Change::NewPassing,
            Change::NewFailing,
            Change::Removed,
        ] {
            counts.insert(change.as_str().into(), self.count(change).into());
        }
        serde_json::json!({
            "source": self.source,
            "regressions": self.changes.iter().filter(|c| c.change.is_regression()).count(),
            "counts": counts,
            "removed": removed,
        })
    }

    /// Adds the comparison to a `--json` document: its `baseline` object, and each scenario's
    /// `change`.
    pub fn annotate(&self, doc: &mut serde_json::Value) {
        if let Some(scenarios) = doc
            .get_mut("scenarios")
            .and_then(serde_json::Value::as_array_mut)
        {
            for s in scenarios {
                let change = s
                    .get("id")
                    .and_then(serde_json::Value::as_str)
                    .and_then(|id| self.change_of(id));
                if let (Some(change), Some(obj)) = (change, s.as_object_mut()) {
                    obj.insert("change".into(), change.as_str().into());
                }
            }
        }
        if let Some(obj) = doc.as_object_mut() {
            obj.insert("baseline".into(), self.json());
        }
    }

    /// Writes `regression-summary.txt` into the bundle of every regressed scenario that has
    /// one (atomically, with the bundle's permissions); returns one error line per file that
    /// could not be written.
    pub fn write_regression_summaries(
        &self,
        summary: &RunSummary,
        mode: ArtifactsMode,
    ) -> Vec<String> {
        let mut errors = Vec::new();
        for c in self.changes.iter().filter(|c| c.change.is_regression()) {
            let Some(result) = summary
                .outcomes
                .iter()
                .map(|o| &o.result)
                .find(|r| r.scenario == c.id)
            else {
                continue;
            };
            let Some(dir) = &result.bundle else {
                continue;
            };
            let path = dir.join(REGRESSION_SUMMARY);
            let text = regression_summary(&self.source, c, result);
            if let Err(e) = write_with_mode(&path, text.as_bytes(), mode) {
                errors.push(format!("cannot write {}: {e}", path.display()));
            }
        }
        errors
    }
}

fn write_with_mode(path: &Path, data: &[u8], mode: ArtifactsMode) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    write_atomic(path, data)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode.file_mode(0o600)))
}

/// regression-summary.txt: what the scenario did in the baseline and now, and each step whose
/// status changed.
pub fn regression_summary(source: &Path, change: &ScenarioChange, now: &RunResult) -> String {
    let mut out = format!(
        "scenario: {}\nchange: {}\nbaseline: {}\n",
        now.scenario,
        change.change.as_str(),
        source.display()
    );
    match &change.before {
        Some(before) => {
            let verdict = if before.passed() { "passed" } else { "failed" };
            out += &format!("baseline run: {} {verdict}", before.run_id);
            if let Some(dir) = &before.bundle {
                out += &format!(" ({})", dir.display());
            }
            out.push('\n');
        }
        None => out += "baseline run: none (the scenario is new)\n",
    }
    out += &format!("run: {}\n", now.run_id);
    if let Some(f) = &now.failure {
        out += &format!("failure: {}: {}\n", f.class.as_str(), f.message);
    }
    if let Some(before) = &change.before {
        let changed: Vec<String> = now
            .steps
            .iter()
            .filter_map(|step| {
                let was = before.steps.iter().find(|b| b.index == step.index)?;
                (was.status != step.status).then(|| {
                    format!(
                        "  [{}] {}: {} -> {}{}",
                        step.index,
                        step.name,
                        status_name(was.status),
                        status_name(step.status),
                        step.message
                            .as_ref()
                            .map_or(String::new(), |m| format!(": {m}"))
                    )
                })
            })
            .collect();
        if !changed.is_empty() {
            out += "steps that changed:\n";
            for line in changed {
                out += &line;
                out.push('\n');
            }
        }
    }
    if let Some(dir) = &now.bundle {
        out += &format!("details: {}\n", dir.join("failure-summary.txt").display());
    }
    out
}

fn status_name(status: StepStatus) -> &'static str {
    match status {
        StepStatus::Pass => "pass",
        StepStatus::Fail => "fail",
        StepStatus::Skipped => "skipped",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifacts::{FailureClass, Phases, Provenance};
    use crate::ScenarioOutcome;
    use std::time::Duration;

    fn result(id: &str, passed: bool, bundle: Option<&Path>) -> RunResult {
        RunResult {
            scenario: id.into(),
            run_id: format!("{id}-run"),
            attempt: 1,
            verdict: if passed { Verdict::Pass } else { Verdict::Fail },
            failure: (!passed).then(|| Failure {
                class: FailureClass::StepFailed,
                message: "exit 1, wanted 0".into(),
                step: Some(0),
            }),
            started_at: String::new(),
            ready: Vec::new(),
            steps: vec![StepResult {
                index: 0,
                name: "check".into(),
                status: if passed {
                    StepStatus::Pass
                } else {
                    StepStatus::Fail
                },
                duration_ms: 1.0,
                exit_code: Some(i32::from(!passed)),
                signal: None,
                message: (!passed).then(|| "exit 1, wanted 0".into()),
                stdout: None,
                stderr: None,
            }],
            expectations: Vec::new(),
            phases: Phases::default(),
            provenance: Provenance::default(),
            environment: None,
            bundle: bundle.map(Path::to_path_buf),
            snapshot: None,
            console_tail: Vec::new(),
        }
    }

    fn summary(results: Vec<RunResult>, not_run: &[&str]) -> RunSummary {
        RunSummary {
            outcomes: results
                .into_iter()
                .map(|result| ScenarioOutcome {
                    result,
                    retries: Vec::new(),
                })
                .collect(),
            not_run: not_run.iter().map(|s| s.to_string()).collect(),
            cancelled: false,
            elapsed: Duration::ZERO,
            environment: None,
        }
    }

    /// Writes `results` as `kiln run` leaves them: `<dir>/<id>/<run>/result.json` and `latest`.
    fn artifacts(dir: &Path, results: &[RunResult]) {
        for r in results {
            let run = dir.join(&r.scenario).join(&r.run_id);
            fs::create_dir_all(&run).expect("mkdir");
            fs::write(
                run.join("result.json"),
                serde_json::to_vec(r).expect("json"),
            )
            .expect("write");
            std::os::unix::fs::symlink(&r.run_id, dir.join(&r.scenario).join("latest"))
                .expect("link");
        }
    }

    #[test]
    fn every_pair_of_before_and_now_has_its_change() {
        use Change::*;
        let table = [
            (Some(true), Some(false), Some(NewlyFailing)),
            (Some(false), Some(true), Some(NewlyPassing)),
            (Some(false), Some(false), Some(StillFailing)),
            (Some(true), Some(true), Some(StillPassing)),
            (None, Some(true), Some(NewPassing)),
            (None, Some(false), Some(NewFailing)),
            (Some(true), None, None),
        ];
        for (before, now, want) in table {
            assert_eq!(Change::of(before, now), want, "{before:?} {now:?}");
        }
        let regressions: Vec<Change> = [
            NewlyFailing,
            NewlyPassing,
            StillFailing,
            StillPassing,
            NewPassing,
            NewFailing,
            Removed,
        ]
        .into_iter()
        .filter(|c| c.is_regression())
        .collect();
        assert_eq!(regressions, [NewlyFailing, NewFailing]);
    }

    #[test]
    fn a_run_is_compared_scenario_by_scenario_with_an_artifacts_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        artifacts(
            dir.path(),
            &[
                result("was-ok", true, None),
                result("was-bad", false, None),
                result("still-bad", false, None),
                result("still-ok", true, None),
                result("gone", true, None),
                result("skipped-by-fail-fast", true, None),
            ],
        );
        // Not scenarios: staging entries, a scenario whose runs were all pruned, a stray file.
        fs::create_dir_all(dir.path().join(".s.partial")).expect("mkdir");
        fs::create_dir_all(dir.path().join("pruned")).expect("mkdir");
        fs::write(dir.path().join("notes.txt"), b"x").expect("write");
        let baseline = Baseline::load(dir.path()).expect("baseline");
        assert_eq!(baseline.records.len(), 6);
        let now = summary(
            vec![
                result("was-ok", false, None),
                result("was-bad", true, None),
                result("still-bad", false, None),
                result("still-ok", true, None),
                result("brand-new", false, None),
            ],
            &["skipped-by-fail-fast"],
        );
        let cmp = Comparison::new(&baseline, &now);
        let got: Vec<(&str, Change)> = cmp
            .changes
            .iter()
            .map(|c| (c.id.as_str(), c.change))
            .collect();
        assert_eq!(
            got,
            [
                ("was-ok", Change::NewlyFailing),
                ("was-bad", Change::NewlyPassing),
                ("still-bad", Change::StillFailing),
                ("still-ok", Change::StillPassing),
                ("brand-new", Change::NewFailing),
                ("gone", Change::Removed),
            ]
        );
        assert!(cmp.has_regressions());
        let json = cmp.json();
        assert_eq!(json["regressions"], 2);
        assert_eq!(json["counts"]["still-failing"], 1);
        assert_eq!(json["removed"], serde_json::json!(["gone"]));
        let text = cmp.summary_text(&now);
        assert!(
            text.contains("1 newly failing, 1 newly passing, 1 still failing, 1 new, 1 removed"),
            "{text}"
        );
        assert!(!text.contains("still-ok"), "{text}");
    }

    #[test]
    fn only_old_failures_are_no_regression() {
        let baseline = Baseline {
            source: "b.json".into(),
            records: [("a".to_string(), record(&result("a", false, None)))].into(),
        };
        let cmp = Comparison::new(&baseline, &summary(vec![result("a", false, None)], &[]));
        assert_eq!(cmp.change_of("a"), Some(Change::StillFailing));
        assert!(!cmp.has_regressions());
    }

    fn record(r: &RunResult) -> BaselineRecord {
        serde_json::from_value(serde_json::to_value(r).expect("json")).expect("record")
    }

    #[test]
    fn a_json_document_is_a_baseline_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let run = summary(vec![result("a", true, None), result("b", false, None)], &[]);
        let doc = crate::report::json_document(&run, "fake", 1);
        let path = dir.path().join("run.json");
        fs::write(&path, doc.to_string()).expect("write");
        let baseline = Baseline::load(&path).expect("baseline");
        assert_eq!(baseline.records["a"].verdict, Verdict::Pass);
        assert_eq!(baseline.records["b"].verdict, Verdict::Fail);
        assert_eq!(baseline.records["b"].run_id, "b-run");
    }

    #[test]
    fn what_is_neither_is_a_one_line_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty");
        fs::create_dir(&empty).expect("mkdir");
        let text = dir.path().join("notes.txt");
        fs::write(&text, b"{\"scenarios\": 3}").expect("write");
        let bad_record = dir.path().join("art");
        fs::create_dir_all(bad_record.join("s/r1")).expect("mkdir");
        fs::write(bad_record.join("s/r1/result.json"), b"{}").expect("write");
        std::os::unix::fs::symlink("r1", bad_record.join("s/latest")).expect("link");
        for (path, want) in [
            (empty.clone(), "no <scenario-id>/latest/result.json in it"),
            (
                text.clone(),
                "not a `kiln run --json` document (invalid type",
            ),
            (
                dir.path().join("nope"),
                "No such file or directory (os error 2) (expected an artifacts dir",
            ),
            (
                bad_record.join("s/latest/result.json"),
                "not a `kiln run --json` document",
            ),
            (
                bad_record.clone(),
                "s/latest/result.json: not a kiln result record: missing field `scenario`",
            ),
        ] {
            let err = Baseline::load(&path)
                .expect_err("not a baseline")
                .to_string();
            assert!(
                err.starts_with(&path.display().to_string())
                    || err.contains("s/latest/result.json"),
                "{err}"
            );
            assert!(err.contains(want), "{want}: {err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
    }

    #[test]
    fn regressed_bundles_get_a_summary_and_others_do_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (bad, old_bad, ok) = (
            dir.path().join("bad"),
            dir.path().join("old-bad"),
            dir.path().join("ok"),
        );
        for d in [&bad, &old_bad, &ok] {
            fs::create_dir(d).expect("mkdir");
        }
        let baseline = Baseline {
            source: dir.path().join("base.json"),
            records: [
                ("bad".to_string(), record(&result("bad", true, None))),
                (
                    "old-bad".to_string(),
                    record(&result("old-bad", false, None)),
                ),
            ]
            .into(),
        };
        let now = summary(
            vec![
                result("bad", false, Some(&bad)),
                result("old-bad", false, Some(&old_bad)),
                result("ok", true, Some(&ok)),
            ],
            &[],
        );
        let cmp = Comparison::new(&baseline, &now);
        assert!(cmp
            .write_regression_summaries(&now, ArtifactsMode::Shared)
            .is_empty());
        let text = fs::read_to_string(bad.join(REGRESSION_SUMMARY)).expect("written");
        for part in [
            "scenario: bad\n",
            "change: newly-failing\n",
            "baseline run: bad-run passed\n",
            "failure: step-failed: exit 1, wanted 0\n",
            "  [0] check: pass -> fail: exit 1, wanted 0\n",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(bad.join(REGRESSION_SUMMARY))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
        assert!(!old_bad.join(REGRESSION_SUMMARY).exists());
        assert!(!ok.join(REGRESSION_SUMMARY).exists());
    }
}
