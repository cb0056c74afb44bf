//! `kiln artifacts status` and `kiln artifacts prune`, and the artifacts budget `kiln run`
//! reports (`--max-size`, `[artifacts] max_size` in kiln.toml) and enforces
//! (`--enforce-budget`). What counts as a run and what prune never removes is
//! kiln-runner's `retention` module. Exit codes (crate::exit): SUCCESS, ERROR when the dir
//! cannot be read or a run cannot be removed.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand};
use kiln_runner::report::plural;
use kiln_runner::retention::{self, Inventory, PruneRule};

use crate::exit;

/// `kiln artifacts`.
#[derive(Debug, Subcommand)]
pub enum ArtifactsCommand {
    /// Per scenario: runs kept, their size, the oldest and newest run; then the total.
    #[command(after_help = "Example:\n  kiln artifacts status --artifacts kiln-artifacts")]
    Status(StatusArgs),
    /// Remove old runs' bundles, keeping the newest N of each scenario.
    #[command(
        after_help = "Which runs go: of each scenario's runs (newest first), the first N \
        stay; of the rest, with --older-than AGE only those that started more than AGE ago go. \
        Never removed: the run the scenario's `latest` link points at, a run whose `kiln run` is \
        still running, staging dirs of runs in progress, anything that is not a run dir, and \
        anything behind a symbolic link. A run is renamed to `.pruning-<run>` before it is \
        deleted; a prune killed half-way is finished by the next, which also removes the staging \
        dirs that killed runs left (as `kiln run` does).\n\n\
        Examples:\n  kiln artifacts prune --keep 5\n  \
        kiln artifacts prune --keep 1 --older-than 7d --dry-run"
    )]
    Prune(PruneArgs),
}

/// `kiln artifacts status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The artifacts dir (`kiln run --artifacts`).
    #[arg(long, value_name = "DIR", default_value = crate::args::DEFAULT_ARTIFACTS)]
    pub artifacts: PathBuf,
    /// One JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// `kiln artifacts prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// The newest runs of each scenario to keep.
    #[arg(long, value_name = "N")]
    pub keep: usize,
    /// Of the runs beyond the newest N, remove only those started longer ago than AGE
    /// ("7d", "12h", "30m").
    #[arg(long, value_name = "AGE", value_parser = parse_age)]
    pub older_than: Option<Duration>,
    /// List what would be removed and the bytes freed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// The artifacts dir (`kiln run --artifacts`).
    #[arg(long, value_name = "DIR", default_value = crate::args::DEFAULT_ARTIFACTS)]
    pub artifacts: PathBuf,
}

/// Parses an age: "7d", "12h", "30m", "1h 30m".
pub fn parse_age(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{e}; expected an age like \"7d\", \"12h\" or \"30m\""))
}

/// Bytes for people: MiB with one decimal, or KiB or bytes below a MiB (so a small budget
/// does not read "0.0 MiB").
pub fn mib(bytes: u64) -> String {
    // Precision past 2^52 bytes does not matter for a display.
    #[allow(clippy::cast_precision_loss)]
    let b = bytes as f64;
    match bytes {
        0..1024 => format!("{bytes} B"),
        1024..0x10_0000 => format!("{:.1} KiB", b / 1024.0),
        _ => format!("{:.1} MiB", b / f64::from(1u32 << 20)),
    }
}

fn date(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Runs a `kiln artifacts` command; returns the exit code.
pub fn run(command: ArtifactsCommand) -> i32 {
    match command {
        ArtifactsCommand::Status(args) => status(&args),
        ArtifactsCommand::Prune(args) => prune(&args),
    }
}

fn scan(dir: &Path) -> Result<Inventory, i32> {
    retention::scan(dir).map_err(|e| {
        eprintln!("kiln: error: cannot read {}: {e}", dir.display());
        exit::ERROR
    })
}

fn status(args: &StatusArgs) -> i32 {
    let inv = match scan(&args.artifacts) {
        Ok(inv) => inv,
        Err(code) => return code,
    };
    if args.json {
        println!("{}", status_json(&args.artifacts, &inv));
    } else {
        print!("{}", status_table(&args.artifacts, &inv));
    }
    exit::SUCCESS
}

/// The status table: one row per scenario, then the total.
pub fn status_table(dir: &Path, inv: &Inventory) -> String {
    let width = inv
        .scenarios
        .iter()
        .map(|s| s.scenario.len())
        .chain(["SCENARIO".len(), "total".len()])
        .max()
        .unwrap_or(0);
    let mut out = format!(
        "{:<width$}  {:>5}  {:>11}  {:<20}  {}\n",
        "SCENARIO", "RUNS", "SIZE", "OLDEST", "NEWEST"
    );
    for s in &inv.scenarios {
        let (oldest, newest) = match (s.runs.first(), s.runs.last()) {
            (Some(o), Some(n)) => (date(o.started), date(n.started)),
            _ => ("-".into(), "-".into()),
        };
        out += &format!(
            "{:<width$}  {:>5}  {:>11}  {oldest:<20}  {newest}\n",
            s.scenario,
            s.runs.len(),
            mib(s.bytes)
        );
    }
    out += &format!(
        "{:<width$}  {:>5}  {:>11}  in {}\n",
        "total",
        inv.runs(),
        mib(inv.bytes),
        dir.display()
    );
    out
}

/// The status as one JSON object: sizes in bytes, dates RFC 3339.
pub fn status_json(dir: &Path, inv: &Inventory) -> serde_json::Value {
    let scenarios: Vec<serde_json::Value> = inv
        .scenarios
        .iter()
        .map(|s| {
            serde_json::json!({
                "scenario": s.scenario,
                "runs": s.runs.len(),
                "bytes": s.bytes,
                "oldest": s.runs.first().map(|r| date(r.started)),
                "newest": s.runs.last().map(|r| date(r.started)),
            })
        })
        .collect();
    serde_json::json!({
        "artifacts": dir.display().to_string(),
        "runs": inv.runs(),
        "bytes": inv.bytes,
        "scenarios": scenarios,
    })
}

fn prune(args: &PruneArgs) -> i32 {
    if !args.dry_run {
        // What killed prunes and killed runs left (never a run): gone first, as `kiln run` does.
        retention::finish_interrupted(&args.artifacts);
        kiln_runner::stale::sweep(&args.artifacts, &std::env::temp_dir());
    }
    let inv = match scan(&args.artifacts) {
        Ok(inv) => inv,
        Err(code) => return code,
    };
    let rule = PruneRule {
        keep: args.keep,
        older_than: args.older_than,
    };
    let doomed = retention::plan(&inv, &rule, SystemTime::now());
    let mut scenarios: Vec<&Path> = Vec::new();
    let (mut runs, mut freed, mut code) = (0, 0, exit::SUCCESS);
    for run in doomed {
        if args.dry_run {
            println!("would remove {} ({})", run.path.display(), mib(run.bytes));
        } else if let Err(e) = retention::remove(run) {
            eprintln!("kiln: error: cannot remove {}: {e}", run.path.display());
            code = exit::ERROR;
            continue;
        }
        runs += 1;
        freed += run.bytes;
        let scenario = run.path.parent().unwrap_or(Path::new("."));
        if !scenarios.contains(&scenario) {
            scenarios.push(scenario);
        }
    }
    let (verb, freed_verb) = if args.dry_run {
        ("would prune", "freeing")
    } else {
        ("pruned", "freed")
    };
    eprintln!(
        "kiln: {verb} {} of {}, {freed_verb} {}",
        plural(runs, "run"),
        plural(scenarios.len(), "scenario"),
        mib(freed)
    );
    code
}

/// The artifacts budget of a `kiln run`, and where it was set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    /// Bytes.
    pub bytes: u64,
    /// `--max-size`, or `max_size in PATH`.
    pub source: String,
}

impl Budget {
    /// `--max-size` if given, else the corpus's `[artifacts] max_size`.
    pub fn of_run(
        max_size: Option<u64>,
        paths: &[PathBuf],
    ) -> Result<Option<Budget>, kiln_scenario::ScenarioError> {
        if let Some(bytes) = max_size {
            return Ok(Some(Budget {
                bytes,
                source: "--max-size".into(),
            }));
        }
        Ok(
            kiln_scenario::artifacts_max_size(paths)?.map(|(bytes, file)| Budget {
                bytes,
                source: format!("max_size in {}", file.display()),
            }),
        )
    }

    /// The prune command that brings `dir` under the budget: the largest `--keep` that frees
    /// enough (0 when none does).
    fn prune_hint(&self, dir: &Path, inv: &Inventory) -> String {
        let most = inv
            .scenarios
            .iter()
            .map(|s| s.runs.len())
            .max()
            .unwrap_or(0);
        let now = SystemTime::now();
        let enough = |keep: usize| {
            let rule = PruneRule {
                keep,
                older_than: None,
            };
            let freed: u64 = retention::plan(inv, &rule, now)
                .iter()
                .map(|r| r.bytes)
                .sum();
            inv.bytes.saturating_sub(freed) <= self.bytes
        };
        let keep = (0..most).rev().find(|&k| enough(k)).unwrap_or(0);
        format!(
            "kiln artifacts prune --keep {keep} --artifacts {}",
            dir.display()
        )
    }

    /// Why a run with `--enforce-budget` must not start, when `dir` already holds `inv`.
    pub fn refusal(&self, dir: &Path, inv: &Inventory) -> Option<String> {
        (inv.bytes > self.bytes).then(|| {
            format!(
                "{} holds {}, over its budget of {} ({}); nothing was run; make room with `{}`",
                dir.display(),
                mib(inv.bytes),
                mib(self.bytes),
                self.source,
                self.prune_hint(dir, inv)
            )
        })
    }

    /// The lines `kiln run` prints after its summary: the use, and a warning when over.
    pub fn report(&self, dir: &Path, inv: &Inventory) -> Vec<String> {
        let mut lines = vec![format!(
            "kiln: artifacts: {} of budget {} in {}",
            mib(inv.bytes),
            mib(self.bytes),
            dir.display()
        )];
        if inv.bytes > self.bytes {
            lines.push(format!(
                "kiln: warning: {} is over its budget ({}) by {}; make room with `{}`",
                dir.display(),
                self.source,
                mib(inv.bytes - self.bytes),
                self.prune_hint(dir, inv)
            ));
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(subcommand)]
        command: ArtifactsCommand,
    }

    fn usage_error(argv: &[&str]) -> String {
        let err = Wrapper::try_parse_from(argv).map(|_| ()).unwrap_err();
        assert_eq!(err.exit_code(), exit::USAGE, "{argv:?}");
        err.to_string()
    }

    #[test]
    fn bad_values_name_the_flag_and_value() {
        let e = usage_error(&["k", "prune", "--keep", "abc"]);
        assert!(e.contains("'abc'") && e.contains("--keep"), "{e}");
        let e = usage_error(&["k", "prune", "--keep", "1", "--older-than", "3x"]);
        assert!(e.contains("'3x'") && e.contains("--older-than"), "{e}");
        usage_error(&["k", "prune"]);
        assert_eq!(parse_age("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert_eq!(parse_age("30m"), Ok(Duration::from_secs(1800)));
    }

    /// An inventory of one scenario with runs of `sizes` bytes, oldest first, none latest.
    fn inventory(sizes: &[u64]) -> Inventory {
        let runs = sizes
            .iter()
            .enumerate()
            .map(|(i, &bytes)| retention::Run {
                id: format!("r{i}"),
                path: PathBuf::from(format!("/a/s/r{i}")),
                started: SystemTime::UNIX_EPOCH + Duration::from_secs(i as u64),
                bytes,
                latest: false,
                in_progress: false,
            })
            .collect();
        let bytes = sizes.iter().sum();
        Inventory {
            scenarios: vec![retention::ScenarioRuns {
                scenario: "s".into(),
                bytes,
                runs,
            }],
            bytes,
        }
    }

    #[test]
    fn budget_lines_say_use_budget_and_the_prune_command_that_fits() {
        let budget = Budget {
            bytes: 10 << 20,
            source: "--max-size".into(),
        };
        let dir = Path::new("/a");
        assert_eq!(
            budget.report(dir, &inventory(&[1 << 20, 2 << 20])),
            ["kiln: artifacts: 3.0 MiB of budget 10.0 MiB in /a"]
        );
        // 12 MiB in runs of 4 MiB each: keeping 2 leaves 8 MiB.
        let over = budget.report(dir, &inventory(&[4 << 20, 4 << 20, 4 << 20]));
        assert_eq!(over.len(), 2);
        assert!(over[1].contains("over its budget (--max-size) by 2.0 MiB"));
        assert!(over[1].ends_with("`kiln artifacts prune --keep 2 --artifacts /a`"));
        assert_eq!(budget.refusal(dir, &inventory(&[10 << 20])), None);
        let refusal = budget.refusal(dir, &inventory(&[11 << 20])).expect("over");
        assert!(refusal.starts_with("/a holds 11.0 MiB, over its budget of 10.0 MiB"));
        assert!(refusal.ends_with("--keep 0 --artifacts /a`"), "{refusal}");
        assert_eq!(
            [mib(0), mib(1536), mib(3 << 19)],
            ["0 B", "1.5 KiB", "1.5 MiB"]
        );
    }
}
