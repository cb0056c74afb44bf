//! A paused run's way in. While `kiln run` waits before tearing a VM down, the run's staging
//! bundle `<artifacts>/<id>/.<run>.partial` holds `paused.json`: the scenario, the run, and where
//! its guest agent listens (the harness has let go of the agent so another client can take it).
//! `kiln shell` and `kiln exec` find it from a scenario id or a directory; the file is removed when
//! the pause ends, so it never reaches a published bundle.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use kiln_backends::AgentTransport;
use serde::{Deserialize, Serialize};

use crate::artifacts::write_atomic;
use crate::stale::{alive, run_id_pid};

/// The record's file name inside the staging bundle.
pub const PAUSED_FILE: &str = "paused.json";

/// A paused run, as `paused.json` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PausedRun {
    /// The scenario's id.
    pub scenario: String,
    /// The run's id (`<stamp>-p<pid>-a<attempt>`).
    pub run_id: String,
    /// Where the guest agent is.
    pub agent: AgentTransport,
}

/// Why no paused run was found for a target.
#[derive(Debug, thiserror::Error)]
pub enum FindError {
    /// Neither a directory nor a scenario with runs under the artifacts dir.
    #[error("no scenario `{target}` under {} and no directory of that name", artifacts.display())]
    Unknown {
        /// What was asked for.
        target: String,
        /// The artifacts dir searched.
        artifacts: PathBuf,
    },
    /// The scenario or directory exists, but no run of it is paused now.
    #[error("{what} is not paused (no live run has {PAUSED_FILE} there)")]
    NotPaused {
        /// The scenario or directory.
        what: String,
    },
    /// A record exists but its `kiln run` has exited (killed while paused).
    #[error(
        "run {run_id} of `{scenario}` is not paused any more: its kiln run (pid {pid}) has exited"
    )]
    Ended {
        /// The scenario.
        scenario: String,
        /// The run.
        run_id: String,
        /// Its process.
        pid: u32,
    },
    /// A record could not be read or parsed.
    #[error("cannot read {}: {reason}", path.display())]
    Read {
        /// The record.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Writes `run`'s record into the staging bundle `staging` (atomically) and returns its path.
pub fn record(staging: &Path, run: &PausedRun) -> io::Result<PathBuf> {
    let path = staging.join(PAUSED_FILE);
    let json = serde_json::to_vec_pretty(run).map_err(io::Error::other)?;
    write_atomic(&path, &json)?;
    Ok(path)
}

/// The paused run `target` names: a directory holding `paused.json` (a staging bundle), a
/// scenario's directory, or a scenario id under `artifacts`. Of several paused runs of one
/// scenario, the newest.
pub fn find(artifacts: &Path, target: &str) -> Result<PausedRun, FindError> {
    let as_dir = Path::new(target);
    if as_dir.join(PAUSED_FILE).is_file() {
        return live(read(&as_dir.join(PAUSED_FILE))?);
    }
    let scenario_dir = if as_dir.is_dir() {
        as_dir.to_path_buf()
    } else {
        let dir = artifacts.join(target);
        if !dir.is_dir() || target.contains('/') {
            return Err(FindError::Unknown {
                target: target.to_string(),
                artifacts: artifacts.to_path_buf(),
            });
        }
        dir
    };
    let not_paused = || FindError::NotPaused {
        what: if as_dir.is_dir() {
            as_dir.display().to_string()
        } else {
            format!("scenario `{target}`")
        },
    };
    // Staging dirs are `.<run-id>.partial`, and run ids start with a UTC time stamp: the
    // greatest name is the newest run.
    let mut records: Vec<PathBuf> = fs::read_dir(&scenario_dir)
        .map_err(|_| not_paused())?
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with('.') && name.ends_with(".partial")
        })
        .map(|e| e.path().join(PAUSED_FILE))
        .filter(|p| p.is_file())
        .collect();
    records.sort();
    let mut ended = None;
    for path in records.iter().rev() {
        match live(read(path)?) {
            Ok(run) => return Ok(run),
            Err(e) => {
                ended.get_or_insert(e);
            }
        }
    }
    Err(ended.unwrap_or_else(not_paused))
}

fn read(path: &Path) -> Result<PausedRun, FindError> {
    let error = |reason: String| FindError::Read {
        path: path.to_path_buf(),
        reason,
    };
    let text = fs::read(path).map_err(|e| error(e.to_string()))?;
    serde_json::from_slice(&text).map_err(|e| error(e.to_string()))
}

/// `run`, unless the `kiln run` that wrote it no longer exists.
fn live(run: PausedRun) -> Result<PausedRun, FindError> {
    match run_id_pid(&run.run_id) {
        Some(pid) if !alive(pid) => Err(FindError::Ended {
            scenario: run.scenario,
            run_id: run.run_id,
            pid,
        }),
        _ => Ok(run),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(scenario: &str, run_id: &str) -> PausedRun {
        PausedRun {
            scenario: scenario.into(),
            run_id: run_id.into(),
            agent: AgentTransport::Serial(PathBuf::from("/tmp/kiln-x/vm/agent.sock")),
        }
    }

    fn staging(artifacts: &Path, scenario: &str, run_id: &str) -> PathBuf {
        let dir = artifacts.join(scenario).join(format!(".{run_id}.partial"));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_scenario_id_finds_its_newest_live_paused_run() {
        let tmp = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let older = format!("20261206T100000.000Z-p{me}-a1");
        let newer = format!("20261206T110000.000Z-p{me}-a1");
        record(&staging(tmp.path(), "boot", &older), &run("boot", &older)).unwrap();
        let dir = staging(tmp.path(), "boot", &newer);
        let path = record(&dir, &run("boot", &newer)).unwrap();
        assert_eq!(path, dir.join(PAUSED_FILE));
        assert_eq!(find(tmp.path(), "boot").unwrap().run_id, newer);
        // The staging dir itself names the run.
        let dir = staging(tmp.path(), "boot", &older);
        assert_eq!(
            find(tmp.path(), dir.to_str().unwrap()).unwrap().run_id,
            older
        );
        // So does the scenario's directory.
        let scenario_dir = tmp.path().join("boot");
        assert_eq!(
            find(tmp.path(), scenario_dir.to_str().unwrap())
                .unwrap()
                .run_id,
            newer
        );
    }

    #[test]
    fn a_run_whose_kiln_run_exited_is_not_paused_any_more() {
        let tmp = tempfile::tempdir().unwrap();
        // Pid 0x7ffffffe is above any pid_max Linux allows.
        let dead = "20261206T100000.000Z-p2147483646-a1";
        record(&staging(tmp.path(), "boot", dead), &run("boot", dead)).unwrap();
        let err = find(tmp.path(), "boot").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("run {dead} of `boot` is not paused any more: its kiln run (pid 2147483646) has exited")
        );
    }

    #[test]
    fn unknown_and_unpaused_targets_are_one_line_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let err = find(tmp.path(), "nope").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "no scenario `nope` under {} and no directory of that name",
                tmp.path().display()
            )
        );
        // A scenario with a finished bundle and nothing paused.
        fs::create_dir_all(tmp.path().join("boot/20261206T100000.000Z-p1-a1")).unwrap();
        let err = find(tmp.path(), "boot").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("scenario `boot` is not paused (no live run has {PAUSED_FILE} there)")
        );
    }

    #[test]
    fn a_corrupt_record_names_its_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = staging(tmp.path(), "boot", "20261206T100000.000Z-p1-a1");
        fs::write(dir.join(PAUSED_FILE), b"{").unwrap();
        let err = find(tmp.path(), "boot").unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("cannot read {}", dir.join(PAUSED_FILE).display())),
            "{err}"
        );
    }
}
