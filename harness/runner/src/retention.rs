//! What the artifacts dir holds and how much of it to keep: `kiln artifacts status` and
//! `prune`, and the budget `kiln run --max-size` reports. The layout is the one
//! [`crate::artifacts::Bundle`] writes: `<root>/<scenario>/<run-id>/` per published run, where a
//! run id is `<UTC stamp>-p<pid>-a<attempt>` (so it sorts by time), `<scenario>/latest` a link to
//! the newest, and hidden `.<run-id>.partial` staging dirs of runs in progress.
//!
//! Pruning never touches what is not a published run: staging dirs, links, files and dirs with
//! other names are left alone, and links are never followed (a scenario dir that is a link is
//! not looked into). A run is removed by renaming it to `<scenario>/.pruning-<run-id>` first and
//! then deleting that, so a prune killed half-way leaves nothing that looks like a run; the next
//! prune finishes such leftovers ([`finish_interrupted`]).
//!
//! Sizes are the files' lengths (not the blocks they occupy), so a sparse kept disk counts at
//! its full size: the budget bounds what copying or archiving the dir would cost.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The prefix of a run being removed.
const PRUNING: &str = ".pruning-";

/// One published run of a scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// Its run id (the directory's name).
    pub id: String,
    /// Its directory.
    pub path: PathBuf,
    /// When it started (from its id).
    pub started: SystemTime,
    /// The bytes of its files.
    pub bytes: u64,
    /// Whether the scenario's `latest` link points at it.
    pub latest: bool,
    /// Whether the `kiln run` that made it is still running (its pid exists): its reports may
    /// still name this bundle.
    pub in_progress: bool,
}

/// One scenario's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScenarioRuns {
    /// The scenario id (the directory's name).
    pub scenario: String,
    /// The bytes of everything in its directory (runs, staging, leftovers).
    pub bytes: u64,
    /// Its published runs, oldest first.
    pub runs: Vec<Run>,
}

/// What an artifacts dir holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Inventory {
    /// Its scenarios, by id.
    pub scenarios: Vec<ScenarioRuns>,
    /// The bytes of everything under the root.
    pub bytes: u64,
}

impl Inventory {
    /// The number of published runs.
    pub fn runs(&self) -> usize {
        self.scenarios.iter().map(|s| s.runs.len()).sum()
    }
}

/// When a run id `<YYYYMMDD>T<HHMMSS>[.mmm]Z-p<pid>-a<attempt>` started.
pub fn run_started(run_id: &str) -> Option<SystemTime> {
    crate::stale::run_id_pid(run_id)?;
    let stamp = run_id.split('-').next()?;
    let (date, time) = stamp.split_once('T')?;
    if date.len() != 8 || time.len() < 7 || !date.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let rfc = format!(
        "{}-{}-{}T{}:{}:{}",
        &date[..4],
        &date[4..6],
        &date[6..],
        time.get(..2)?,
        time.get(2..4)?,
        time.get(4..)?
    );
    humantime::parse_rfc3339(&rfc).ok()
}

/// The bytes of the files under `path` (itself if a file); links count as nothing and are
/// never followed. Entries that vanish while counting count as nothing.
pub fn tree_bytes(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    if meta.is_file() {
        return meta.len();
    }
    if !meta.is_dir() {
        return 0;
    }
    fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| tree_bytes(&e.path()))
        .sum()
}

/// Reads what `root` holds; a missing root holds nothing.
pub fn scan(root: &Path) -> io::Result<Inventory> {
    let entries = match fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Inventory::default()),
        Err(e) => return Err(e),
    };
    let mut scenarios = Vec::new();
    for entry in entries {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        scenarios.push(scan_scenario(name, &entry.path())?);
    }
    scenarios.sort_by(|a, b| a.scenario.cmp(&b.scenario));
    Ok(Inventory {
        scenarios,
        bytes: tree_bytes(root),
    })
}

fn scan_scenario(scenario: String, dir: &Path) -> io::Result<ScenarioRuns> {
    let latest = fs::read_link(dir.join("latest"))
        .ok()
        .and_then(|target| target.file_name().map(|n| n.to_string_lossy().into_owned()));
    let me = std::process::id();
    let mut runs = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        let id = entry.file_name().to_string_lossy().into_owned();
        let Some(started) = run_started(&id) else {
            continue;
        };
        let pid = crate::stale::run_id_pid(&id).unwrap_or(0);
        let path = entry.path();
        runs.push(Run {
            bytes: tree_bytes(&path),
            latest: latest.as_deref() == Some(id.as_str()),
            in_progress: pid == me || crate::stale::alive(pid),
            id,
            path,
            started,
        });
    }
    runs.sort_by(|a, b| (a.started, &a.id).cmp(&(b.started, &b.id)));
    Ok(ScenarioRuns {
        scenario,
        bytes: tree_bytes(dir),
        runs,
    })
}

/// Which runs [`plan`] removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PruneRule {
    /// The newest runs of each scenario that stay, whatever their age.
    pub keep: usize,
    /// With it, of the runs beyond `keep` only those that started longer ago than this go.
    pub older_than: Option<Duration>,
}

/// The runs `rule` removes at `now`, oldest first per scenario: of each scenario's runs, those
/// beyond its newest `keep`, started longer than `older_than` ago when set, and never the one
/// `latest` points at nor one whose `kiln run` is still running.
pub fn plan<'a>(inventory: &'a Inventory, rule: &PruneRule, now: SystemTime) -> Vec<&'a Run> {
    let old_enough = |run: &Run| match rule.older_than {
        None => true,
        Some(age) => now
            .duration_since(run.started)
            .is_ok_and(|since| since > age),
    };
    inventory
        .scenarios
        .iter()
        .flat_map(|s| {
            let beyond = s.runs.len().saturating_sub(rule.keep);
            s.runs[..beyond]
                .iter()
                .filter(|r| !r.latest && !r.in_progress && old_enough(r))
        })
        .collect()
}

/// Removes one run: renamed to `.pruning-<id>` beside it, then deleted (never following links).
pub fn remove(run: &Run) -> io::Result<()> {
    let parent = run.path.parent().unwrap_or(Path::new("."));
    let doomed = parent.join(format!("{PRUNING}{}", run.id));
    fs::rename(&run.path, &doomed)?;
    fs::remove_dir_all(&doomed)
}

/// Deletes what an interrupted prune left (`<scenario>/.pruning-*`); returns what it removed.
pub fn finish_interrupted(root: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let scenario_dirs = fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()));
    for scenario in scenario_dirs {
        for entry in fs::read_dir(scenario.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let doomed = entry.file_name().to_string_lossy().starts_with(PRUNING)
                && entry.file_type().is_ok_and(|t| t.is_dir());
            if doomed && fs::remove_dir_all(entry.path()).is_ok() {
                removed.push(entry.path());
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pid of a process that has ended.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        child.wait().expect("wait");
        pid
    }

    /// Writes a published run `<root>/<scenario>/<stamp>-p<pid>-a1` with `bytes` of console.
    fn run(root: &Path, scenario: &str, stamp: &str, pid: u32, bytes: usize) -> PathBuf {
        let dir = root.join(scenario).join(format!("{stamp}-p{pid}-a1"));
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(dir.join("console.log"), vec![b'x'; bytes]).expect("write");
        dir
    }

    fn at(rfc: &str) -> SystemTime {
        humantime::parse_rfc3339(rfc).expect("time")
    }

    #[test]
    fn run_ids_give_their_start() {
        assert_eq!(
            run_started("20261206T133127.442Z-p8544-a1"),
            Some(at("2026-12-06T13:31:27.442Z"))
        );
        assert_eq!(run_started("latest"), None);
        assert_eq!(run_started("2026T1331Z-p1-a1"), None);
        assert_eq!(run_started("20261206T133127.442Z"), None);
    }

    #[test]
    fn scan_counts_runs_and_bytes_and_knows_latest_and_live_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let dead = dead_pid();
        run(root, "a", "20261201T000000.000Z", dead, 100);
        let newest = run(root, "a", "20261203T000000.000Z", dead, 10);
        run(root, "a", "20261202T000000.000Z", std::process::id(), 1);
        fs::create_dir_all(root.join(format!("a/.20261204T000000.000Z-p{dead}-a1.partial")))
            .expect("staging");
        fs::write(root.join("a/.partial-junk"), b"12345").expect("junk");
        std::os::unix::fs::symlink(newest.file_name().expect("name"), root.join("a/latest"))
            .expect("link");
        std::os::unix::fs::symlink("/", root.join("b")).expect("link");
        let inv = scan(root).expect("scan");
        assert_eq!(inv.scenarios.len(), 1, "a link is not a scenario: {inv:?}");
        let a = &inv.scenarios[0];
        let sizes: Vec<(u64, bool, bool)> = a
            .runs
            .iter()
            .map(|r| (r.bytes, r.latest, r.in_progress))
            .collect();
        assert_eq!(
            sizes,
            [(100, false, false), (1, false, true), (10, true, false)]
        );
        assert_eq!((a.bytes, inv.bytes, inv.runs()), (116, 116, 3));
        assert_eq!(
            scan(&root.join("missing")).expect("empty"),
            Inventory::default()
        );
    }

    #[test]
    fn plan_keeps_the_newest_the_latest_and_live_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let dead = dead_pid();
        for day in 1..=6 {
            let pid = if day == 2 { std::process::id() } else { dead };
            run(root, "a", &format!("2026120{day}T000000.000Z"), pid, 1);
        }
        std::os::unix::fs::symlink(
            format!("20261201T000000.000Z-p{dead}-a1"),
            root.join("a/latest"),
        )
        .expect("link");
        run(root, "b", "20261201T000000.000Z", dead, 1);
        let inv = scan(root).expect("scan");
        let now = at("2026-12-07T00:00:00Z");
        let ids = |rule: PruneRule| -> Vec<String> {
            plan(&inv, &rule, now)
                .iter()
                .map(|r| r.id[..8].to_string())
                .collect()
        };
        let keep = |keep, older_than| PruneRule { keep, older_than };
        // Day 1 is latest, day 2 still running; 5 and 6 are the newest two.
        assert_eq!(ids(keep(2, None)), ["20261203", "20261204"]);
        // b's only run has no latest link pointing at it: only `keep` holds it.
        assert_eq!(
            ids(keep(0, None)),
            ["20261203", "20261204", "20261205", "20261206", "20261201"]
        );
        assert_eq!(
            ids(keep(0, Some(Duration::from_secs(3 * 86400 - 1)))),
            ["20261203", "20261204", "20261201"]
        );
        assert_eq!(ids(keep(6, None)), Vec::<String>::new());
    }

    #[test]
    fn removal_renames_first_and_an_interrupted_one_is_finished() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let dead = dead_pid();
        let path = run(root, "a", "20261201T000000.000Z", dead, 3);
        let outside = tempfile::tempdir().expect("tempdir");
        fs::write(outside.path().join("keep"), b"k").expect("write");
        std::os::unix::fs::symlink(outside.path(), path.join("link")).expect("link");
        let inv = scan(root).expect("scan");
        remove(&inv.scenarios[0].runs[0]).expect("remove");
        assert!(!path.exists());
        assert!(outside.path().join("keep").exists(), "a link was followed");
        fs::create_dir_all(root.join("a/.pruning-x/vm")).expect("leftover");
        assert_eq!(finish_interrupted(root), [root.join("a/.pruning-x")]);
        assert_eq!(fs::read_dir(root.join("a")).expect("dir").count(), 0);
    }
}
