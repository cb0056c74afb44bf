//! Boot once, fork every scenario: on the kiln backend, scenarios of the same guest shape start
//! from one snapshot taken at the agent's `KILN_READY`.
//!
//! The shape is everything the guest saw while booting: kiln's version, kernel and initrd
//! (path, size, mtime), memory, vCPUs, the command line without the `kiln.share=` entries
//! (shares are mounted after the restore), each disk's base (path, size, mtime, format) and
//! each share's tag. Its SHA-256 names the snapshot in the cache (`<cache>/kiln/snapshots`),
//! made on first need under a lock so that parallel jobs make it once. A file that is missing,
//! from another kiln version, corrupt or for another shape is never used: the run cold-boots
//! and says why.

use std::fs::{self, File};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_agent_proto::{ReadyRecord, ResumeRequest, ResumeShare};
use kiln_vmm::snapshot::{read_header, RestoreTimings, SnapshotError};
use kiln_vmm::vm::{Vm, VmHandle};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::RunPlan;

/// Longest the boot that makes a snapshot may take to reach `KILN_READY`.
const TEMPLATE_READY_TIMEOUT: Duration = Duration::from_secs(300);

/// A snapshot no run has used for this long is removed when a new one is made: every kiln
/// version, kernel or base image makes a new shape, and the old files would stay forever.
pub const UNUSED_SNAPSHOT_LIFETIME: Duration = Duration::from_secs(14 * 24 * 3600);

/// Where a scenario may start from a snapshot (set by the runner when it may).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotPlan {
    /// The snapshot cache directory.
    pub dir: PathBuf,
}

/// What result.json says about snapshots for one run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RestoreRecord {
    /// Whether the VM was restored from a snapshot (false: cold boot).
    pub restored: bool,
    /// The snapshot's id (hash of its state and memory hashes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// The guest shape's hash (the snapshot's file name).
    pub shape: String,
    /// Whether this run made the snapshot, and how long that took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_ms: Option<f64>,
    /// The restore's phases.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreTimings>,
    /// The agent's resume (entropy, clock, shares, boot id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_ms: Option<f64>,
    /// Why the run cold-booted instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The command line the snapshot boots with: the plan's, less the `kiln.share=` entries.
pub fn shape_cmdline(cmdline: &str) -> String {
    cmdline
        .split_whitespace()
        .filter(|w| !w.starts_with("kiln.share="))
        .collect::<Vec<_>>()
        .join(" ")
}

fn file_identity(path: &Path) -> String {
    match fs::metadata(path) {
        Ok(m) => {
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            format!("{} {} {mtime}", path.display(), m.len())
        }
        Err(e) => format!("{} unreadable: {e}", path.display()),
    }
}

/// The guest shape of `plan`, as a SHA-256 hex string.
pub fn shape(plan: &RunPlan) -> String {
    let mut lines = vec![
        format!("kiln {}", env!("CARGO_PKG_VERSION")),
        format!("kernel {}", file_identity(&plan.kernel)),
        format!(
            "initrd {}",
            plan.initrd
                .as_deref()
                .map(file_identity)
                .unwrap_or_default()
        ),
        format!("memory {}", plan.memory_mib),
        format!("vcpus {}", plan.vcpus),
        format!("cmdline {}", shape_cmdline(&plan.cmdline)),
    ];
    for d in &plan.disks {
        lines.push(format!("disk {} {:?}", file_identity(&d.base), d.format));
    }
    for s in &plan.shares {
        lines.push(format!("share {}", s.tag));
    }
    hex(&Sha256::digest(lines.join("\n").as_bytes()))
}

/// Holds an exclusive lock on `<dir>/<shape>.lock` while a snapshot is made or checked.
struct Lock {
    _file: File,
}

impl Lock {
    fn take(path: &Path) -> Result<Lock, String> {
        let file = File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(format!(
                "{}: cannot lock: {}",
                path.display(),
                std::io::Error::last_os_error()
            ));
        }
        Ok(Lock { _file: file })
    }
}

/// The snapshot for `plan`'s shape, made now if the cache has no usable one; returns its path
/// and how long making it took (None: it was there).
pub fn ensure(
    plan: &RunPlan,
    sp: &SnapshotPlan,
    shape: &str,
) -> Result<(PathBuf, Option<Duration>), String> {
    fs::create_dir_all(&sp.dir).map_err(|e| format!("{}: {e}", sp.dir.display()))?;
    let path = sp.dir.join(format!("{shape}.snap"));
    if usable(&path, shape) {
        mark_used(&path);
        return Ok((path, None));
    }
    let _lock = Lock::take(&sp.dir.join(format!("{shape}.lock")))?;
    // Another job may have made it while this one waited for the lock.
    if usable(&path, shape) {
        return Ok((path, None));
    }
    let _ = fs::remove_file(&path);
    let t = Instant::now();
    // One more try when the boot itself failed: an early guest fault is rare but real (the
    // nested L1 shows one in a few dozen boots), and every scenario of the shape waits on it.
    if let Err(first) = make(plan, &sp.dir, &path, shape) {
        tracing::warn!("snapshot: {first}; trying once more");
        make(plan, &sp.dir, &path, shape)
            .map_err(|second| format!("{second} (and before that: {first})"))?;
    }
    let made = t.elapsed();
    prune(&sp.dir, SystemTime::now(), UNUSED_SNAPSHOT_LIFETIME);
    Ok((path, Some(made)))
}

/// Records a use of the snapshot at `path` in its mtime, which [`prune`] goes by.
fn mark_used(path: &Path) {
    let touched = File::open(path).and_then(|f| f.set_modified(SystemTime::now()));
    if let Err(e) = touched {
        tracing::debug!("snapshot: {}: cannot mark it used: {e}", path.display());
    }
}

/// Removes the snapshots (and their lock files) in `dir` unused for longer than `lifetime` at
/// `now`. A restored VM maps its file privately, so removing one in use harms nobody.
fn prune(dir: &Path, now: SystemTime, lifetime: Duration) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let ours = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("snap" | "lock")
        );
        let age = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| now.duration_since(m).ok());
        if ours && age.is_some_and(|age| age > lifetime) {
            match fs::remove_file(&path) {
                Ok(()) => tracing::info!("snapshot: removed {} (unused)", path.display()),
                Err(e) => tracing::debug!("snapshot: cannot remove {}: {e}", path.display()),
            }
        }
    }
}

fn usable(path: &Path, shape: &str) -> bool {
    match read_header(path) {
        Ok(h) => h.shape == shape,
        Err(SnapshotError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            false
        }
        Err(e) => {
            tracing::warn!("snapshot: {e}; making a new one");
            false
        }
    }
}

/// Boots the shape cold (no shares mounted, throwaway overlays and share dirs), waits for the
/// agent's readiness record and snapshots the VM to `path`.
fn make(plan: &RunPlan, dir: &Path, path: &Path, shape: &str) -> Result<(), String> {
    let work = tempfile::Builder::new()
        .prefix(".make-")
        .tempdir_in(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut template = plan.clone();
    template.cmdline = shape_cmdline(&plan.cmdline);
    for (i, disk) in template.disks.iter_mut().enumerate() {
        disk.overlay = work.path().join(format!("disk{i}.qcow2"));
    }
    for (i, share) in template.shares.iter_mut().enumerate() {
        share.host_dir = work.path().join(format!("share{i}"));
        fs::create_dir_all(&share.host_dir).map_err(|e| format!("{e}"))?;
    }
    let config = crate::kiln::vm_config(&template, work.path());
    let mut vm = Vm::start(config).map_err(|e| format!("cannot boot the snapshot's guest: {e}"))?;
    wait_record(&vm, TEMPLATE_READY_TIMEOUT)?;
    vm.snapshot(path, shape)
        .map_err(|e| format!("cannot take the snapshot: {e}"))?;
    tracing::info!("snapshot: made {} for shape {shape}", path.display());
    Ok(())
}

fn wait_record(vm: &VmHandle, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let console = vm.console();
    loop {
        if console
            .text()
            .lines()
            .any(|l| ReadyRecord::parse(l).is_some())
        {
            return Ok(());
        }
        if let Some(reason) = vm.exit_reason() {
            return Err(format!(
                "the snapshot's guest ended before KILN_READY ({reason}); console tail: {:?}",
                tail(&console.text())
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the snapshot's guest printed no KILN_READY record within {timeout:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn tail(text: &str) -> String {
    let start = text.len().saturating_sub(300);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    text[start..].to_string()
}

/// What the agent needs to make the restored guest a fresh one.
pub fn resume_request(plan: &RunPlan) -> Result<ResumeRequest, String> {
    let mut entropy = vec![0u8; 64];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut entropy))
        .map_err(|e| format!("cannot read host entropy from /dev/urandom: {e}"))?;
    let mut id = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .map_err(|e| format!("cannot read host entropy from /dev/urandom: {e}"))?;
    let h = hex(&id);
    let boot_id = format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| format!("the host clock is before 1970: {e}"))?;
    Ok(ResumeRequest {
        entropy,
        unix_secs: now.as_secs(),
        unix_nanos: now.subsec_nanos(),
        boot_id,
        shares: plan
            .shares
            .iter()
            .map(|s| ResumeShare {
                tag: s.tag.clone(),
                mountpoint: s.mount.clone(),
                read_only: s.readonly,
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DiskFormat, PlannedDisk, PlannedShare};

    fn plan(dir: &Path) -> RunPlan {
        RunPlan {
            scenario_id: "s".into(),
            run_id: "r".into(),
            kernel: dir.join("bzImage"),
            initrd: Some(dir.join("initrd")),
            cmdline: "kiln.share=output:/mnt/output a=1 kiln.share=src:/src:ro".into(),
            memory_mib: 256,
            vcpus: 2,
            disks: vec![PlannedDisk {
                name: "d".into(),
                base: dir.join("base.img"),
                format: DiskFormat::Raw,
                overlay: dir.join("d.qcow2"),
            }],
            shares: vec![PlannedShare {
                tag: "output".into(),
                host_dir: dir.join("out"),
                mount: "/mnt/output".into(),
                readonly: false,
            }],
            console_log: dir.join("console.log"),
            console_log_limit: 1 << 20,
            snapshot: None,
        }
    }

    #[test]
    fn the_shape_ignores_per_run_paths_and_shares_mounts_but_not_the_guest() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["bzImage", "initrd", "base.img"] {
            fs::write(dir.path().join(f), f).unwrap();
        }
        let p = plan(dir.path());
        let base = shape(&p);
        assert_eq!(base.len(), 64);
        assert_eq!(shape_cmdline(&p.cmdline), "a=1");

        let mut q = p.clone();
        q.run_id = "other".into();
        q.disks[0].overlay = dir.path().join("elsewhere.qcow2");
        q.shares[0].host_dir = dir.path().join("elsewhere");
        q.shares[0].mount = "/other".into();
        q.cmdline = "a=1 kiln.share=output:/other".into();
        q.console_log = dir.path().join("c2.log");
        assert_eq!(
            shape(&q),
            base,
            "per-run paths and share mounts are not the shape"
        );

        type Change = Box<dyn Fn(&mut RunPlan)>;
        let changed: Vec<Change> = vec![
            Box::new(|p| p.memory_mib = 512),
            Box::new(|p| p.vcpus = 1),
            Box::new(|p| p.cmdline.push_str(" b=2")),
            Box::new(|p| p.shares[0].tag = "other".into()),
            Box::new(|p| p.disks.clear()),
            Box::new(|p| p.initrd = None),
        ];
        for (i, change) in changed.iter().enumerate() {
            let mut q = p.clone();
            change(&mut q);
            assert_ne!(shape(&q), base, "change {i} must give another shape");
        }
        // A base file that changed is another shape.
        std::thread::sleep(Duration::from_millis(10));
        fs::write(dir.path().join("base.img"), "changed").unwrap();
        assert_ne!(shape(&p), base);
    }

    #[test]
    fn a_resume_request_is_fresh_each_time() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan(dir.path());
        let a = resume_request(&p).unwrap();
        let b = resume_request(&p).unwrap();
        assert_ne!(a.entropy, b.entropy);
        assert_ne!(a.boot_id, b.boot_id);
        assert_eq!(a.boot_id.len(), 36);
        assert_eq!(a.entropy.len(), 64);
        assert_eq!(a.shares.len(), 1);
        assert_eq!(a.shares[0].mountpoint, "/mnt/output");
    }

    #[test]
    fn snapshots_unused_for_the_lifetime_are_pruned_and_a_use_keeps_one() {
        let dir = tempfile::tempdir().unwrap();
        let month = Duration::from_secs(30 * 24 * 3600);
        let old = SystemTime::now() - month;
        for name in ["old.snap", "old.lock", "used.snap", "notes.txt"] {
            let f = File::create(dir.path().join(name)).unwrap();
            f.set_modified(old).unwrap();
        }
        File::create(dir.path().join("new.snap")).unwrap();
        mark_used(&dir.path().join("used.snap"));
        prune(dir.path(), SystemTime::now(), UNUSED_SNAPSHOT_LIFETIME);
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["new.snap", "notes.txt", "used.snap"]);
        // A missing directory is nothing to prune.
        prune(
            &dir.path().join("absent"),
            SystemTime::now(),
            Duration::ZERO,
        );
    }

    #[test]
    fn an_unusable_file_in_the_cache_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.snap");
        assert!(!usable(&path, "x"));
        fs::write(&path, b"garbage").unwrap();
        assert!(!usable(&path, "x"));
    }
}
