//! What a `kiln run` killed without warning (`kill -9`, the OOM killer, a lost machine) leaves
//! behind, and its removal by the next run: staging bundles `<artifacts>/<id>/.<run>.partial`,
//! half-made `latest` links `<artifacts>/<id>/.latest-<pid>`, and work dirs
//! `$TMPDIR/kiln-<id>-p<pid>-XXXXXX` (overlays, vsock sockets, output shares). Each name holds
//! the pid of the run that made it; only those whose process no longer exists are removed, so
//! runs sharing the directories at the same time never disturb each other. A `latest` link is
//! never stale: it is renamed into place only once its bundle is complete. `--debug` work dirs
//! (`kiln-<id>-debug-XXXXXX`) are kept on purpose and never removed.
//!
//! The pid is checked in this host's (pid namespace's) process table: two containers sharing
//! an artifacts dir must not run at once.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// What [`sweep`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Removed, each the path of a staging dir, link or work dir.
    pub removed: Vec<PathBuf>,
    /// Not removed though stale, each `PATH: why`.
    pub failed: Vec<String>,
    /// The pids of the dead runs they came from, sorted, each once.
    pub pids: Vec<u32>,
}

/// Whether process `pid` exists (EPERM: it does, owned by someone else).
pub(crate) fn alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return true; // never a run's pid; never treat as dead
    }
    // SAFETY: signal 0 sends nothing; it only checks that the process exists.
    let sent = unsafe { libc::kill(pid, 0) } == 0;
    sent || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The pid in a run id `<stamp>-p<pid>-a<attempt>`.
pub(crate) fn run_id_pid(run_id: &str) -> Option<u32> {
    let mut parts = run_id.rsplitn(3, '-');
    let attempt = parts.next()?.strip_prefix('a')?;
    let pid = parts.next()?.strip_prefix('p')?;
    parts.next()?;
    attempt.parse::<u32>().ok()?;
    pid.parse().ok()
}

/// The pid in a staging dir `.<run-id>.partial`, link `.latest-<pid>`, or work dir
/// `kiln-<id>-p<pid>-XXXXXX`.
fn owner(name: &str, in_tmp: bool) -> Option<u32> {
    if in_tmp {
        let rest = name.strip_prefix("kiln-")?;
        let mut parts = rest.rsplitn(3, '-');
        let random = parts.next()?;
        let pid = parts.next()?.strip_prefix('p')?;
        parts.next()?;
        if random.is_empty() || !random.chars().all(|c| c.is_ascii_alphanumeric()) {
            return None;
        }
        return pid.parse().ok();
    }
    if let Some(pid) = name.strip_prefix(".latest-") {
        return pid.parse().ok();
    }
    run_id_pid(name.strip_prefix('.')?.strip_suffix(".partial")?)
}

/// Removes what dead runs left under `artifacts` (one level of scenario dirs) and in `tmp`.
/// Missing directories are fine: nothing to sweep.
pub fn sweep(artifacts: &Path, tmp: &Path) -> Swept {
    let mut swept = Swept::default();
    let scenario_dirs = fs::read_dir(artifacts)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| (e.path(), false));
    let dirs: Vec<(PathBuf, bool)> = scenario_dirs.chain([(tmp.to_path_buf(), true)]).collect();
    for (dir, in_tmp) in dirs {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let Some(pid) = owner(&name.to_string_lossy(), in_tmp) else {
                continue;
            };
            if pid == std::process::id() || alive(pid) {
                continue;
            }
            let path = entry.path();
            let removed = match entry.file_type() {
                Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
                Ok(t) if !in_tmp => {
                    if t.is_symlink() {
                        fs::remove_file(&path)
                    } else {
                        continue;
                    }
                }
                Ok(_) => continue,
                Err(e) => Err(e),
            };
            match removed {
                Ok(()) => {
                    swept.removed.push(path);
                    swept.pids.push(pid);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => swept.failed.push(format!("{}: {e}", path.display())),
            }
        }
    }
    swept.removed.sort();
    swept.pids.sort_unstable();
    swept.pids.dedup();
    swept
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

    #[test]
    fn names_give_their_run_pid() {
        assert_eq!(
            owner(".20261206T133127.442Z-p8544-a1.partial", false),
            Some(8544)
        );
        assert_eq!(owner(".latest-77", false), Some(77));
        assert_eq!(owner("kiln-my-p3-id-p42-AbC123", true), Some(42));
        assert_eq!(owner("kiln-s-debug-AbC123", true), None);
        assert_eq!(owner("kiln-s-AbC123", true), None);
        assert_eq!(owner("20261206T133127.442Z-p8544-a1", false), None);
        assert_eq!(owner("latest", false), None);
    }

    #[test]
    fn only_what_dead_runs_left_is_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (art, tmp) = (dir.path().join("art"), dir.path().join("tmp"));
        let dead = dead_pid();
        let me = std::process::id();
        let stale = [
            art.join(format!("s/.20261206T133127.442Z-p{dead}-a1.partial")),
            tmp.join(format!("kiln-s-p{dead}-AbC123")),
        ];
        let live = [
            art.join(format!("s/.20261206T133127.442Z-p{me}-a1.partial")),
            art.join(format!("s/20261206T133127.442Z-p{dead}-a1")),
            tmp.join(format!("kiln-s-p{me}-AbC123")),
            tmp.join("kiln-s-debug-AbC123"),
            tmp.join("unrelated"),
        ];
        for d in stale.iter().chain(&live) {
            fs::create_dir_all(d.join("vm")).expect("mkdir");
        }
        std::os::unix::fs::symlink("x", art.join(format!("s/.latest-{dead}"))).expect("link");
        let swept = sweep(&art, &tmp);
        assert_eq!(swept.pids, [dead]);
        assert_eq!(swept.removed.len(), 3, "{swept:?}");
        assert!(swept.failed.is_empty());
        for d in &stale {
            assert!(!d.exists(), "{}", d.display());
        }
        for d in &live {
            assert!(d.is_dir(), "{}", d.display());
        }
        assert_eq!(sweep(&dir.path().join("none"), &tmp), Swept::default());
    }
}
