//! The artifact bundle of one run, `<artifacts>/<scenario-id>/<run-id>/`, and the result record
//! it holds. A bundle is assembled in a hidden staging directory and renamed into place, so a
//! reader never sees half of one; files inside are written atomically too (temp + rename).

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// Writes `data` to `path` atomically: a temp file in the same directory, synced, renamed.
/// Write errors are the OS's alone (the caller names `path`), not the temp file's name.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    // The file's own Write, not NamedTempFile's, which adds "at path <temp file>" to errors.
    tmp.as_file_mut().write_all(data)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Why a run failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureClass {
    /// The guest never became ready in time.
    ReadinessTimeout,
    /// A step ran and its result did not match.
    StepFailed,
    /// A step (or the whole scenario) ran out of time.
    StepTimeout,
    /// The guest kernel panicked (seen on the console).
    GuestPanic,
    /// A file expectation did not hold.
    ExpectationFailed,
    /// The harness, backend or host failed (not the guest's fault).
    InfraError,
    /// Interrupted (Ctrl-C).
    Cancelled,
}

impl FailureClass {
    /// The kebab-case name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::ReadinessTimeout => "readiness-timeout",
            FailureClass::StepFailed => "step-failed",
            FailureClass::StepTimeout => "step-timeout",
            FailureClass::GuestPanic => "guest-panic",
            FailureClass::ExpectationFailed => "expectation-failed",
            FailureClass::InfraError => "infra-error",
            FailureClass::Cancelled => "cancelled",
        }
    }
}

/// The run's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Everything held.
    Pass,
    /// Something failed; see `failure`.
    Fail,
}

/// The failure of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// Its class.
    pub class: FailureClass,
    /// One line: what failed.
    pub message: String,
    /// Index of the failing step, when a step failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<usize>,
}

/// How a step went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    /// It ran and matched.
    Pass,
    /// It failed.
    Fail,
    /// An earlier failure stopped the run first.
    Skipped,
}

/// One step's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    /// Position in the scenario.
    pub index: usize,
    /// Its name.
    pub name: String,
    /// Pass, fail or skipped.
    pub status: StepStatus,
    /// Wall time in milliseconds.
    pub duration_ms: f64,
    /// Exit code of a command.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Signal that killed a command.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// A command's standard output (lossy UTF-8), for `kiln diff run` and readers of the bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<String>,
    /// A command's standard error (lossy UTF-8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
}

/// One file expectation's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpectationResult {
    /// Path under fixtures/.
    pub path: String,
    /// Whether it held.
    pub ok: bool,
    /// Why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Phase timings in milliseconds (absent: the phase did not run).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Phases {
    /// Backend boot call (VM created and started).
    pub vm_create_ms: Option<f64>,
    /// VM creation to kernel entry, when the backend knows it.
    pub kernel_entry_ms: Option<f64>,
    /// VM start to readiness.
    pub ready_ms: Option<f64>,
    /// Each step, in order.
    pub steps_ms: Vec<f64>,
    /// Teardown (shutdown or kill, then cleanup).
    pub teardown_ms: Option<f64>,
    /// Fixture copy and expectations.
    pub expectations_ms: Option<f64>,
    /// The whole attempt.
    pub total_ms: f64,
}

/// Where a run's inputs came from, so drift is detectable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// kiln's version.
    pub kiln_version: String,
    /// The git revision kiln was built from, if known.
    pub kiln_git_rev: Option<String>,
    /// Backend name.
    pub backend: String,
    /// Backend version.
    pub backend_version: String,
    /// Host KVM kind (from `kiln doctor`).
    pub host_kvm: String,
    /// Kernel path and sha256.
    pub kernel: Option<FileId>,
    /// Initrd path and sha256.
    pub initrd: Option<FileId>,
    /// Each disk's base image.
    pub disks: Vec<FileId>,
    /// The guest image this scenario booted: SHA-256 of its kernel's hex digest, a newline,
    /// and its initrd's (when it has one), so one value pins both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_image_sha256: Option<String>,
}

/// A file and its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    /// Absolute path.
    pub path: String,
    /// Lower-case hex SHA-256 (absent when unreadable).
    pub sha256: Option<String>,
}

/// result.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// Scenario id.
    pub scenario: String,
    /// Run id (bundle directory name).
    pub run_id: String,
    /// 1 for the first try, 2 for the first retry, ...
    pub attempt: u32,
    /// Pass or fail.
    pub verdict: Verdict,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    /// When it started (RFC 3339, UTC).
    pub started_at: String,
    /// The readiness record or markers seen.
    pub ready: Vec<String>,
    /// Step outcomes, every step listed.
    pub steps: Vec<StepResult>,
    /// Expectation outcomes.
    pub expectations: Vec<ExpectationResult>,
    /// Phase timings.
    pub phases: Phases,
    /// Provenance.
    pub provenance: Provenance,
    /// Where it ran: host, kiln, operator (absent when the caller probed none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<crate::environment::Environment>,
    /// The bundle directory, when one was kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle: Option<PathBuf>,
    /// The last console lines.
    pub console_tail: Vec<String>,
    /// Snapshots (kiln backend): whether the VM was restored, from which snapshot, the
    /// restore's phase timings, or why it booted cold. Absent where snapshots were off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<serde_json::Value>,
}

impl RunResult {
    /// Whether it passed.
    pub fn passed(&self) -> bool {
        self.verdict == Verdict::Pass
    }

    /// The failure class, if it failed.
    pub fn class(&self) -> Option<FailureClass> {
        self.failure.as_ref().map(|f| f.class)
    }

    /// failure-summary.txt: the failure, the failing step and the console's last lines.
    pub fn failure_summary(&self) -> String {
        let mut out = format!("scenario: {}\nrun: {}\n", self.scenario, self.run_id);
        if let Some(f) = &self.failure {
            out += &format!("failure: {}: {}\n", f.class.as_str(), f.message);
            if let Some(step) = f.step.and_then(|i| self.steps.get(i)) {
                out += &format!("failing step: [{}] {}\n", step.index, step.name);
            }
        }
        for e in self.expectations.iter().filter(|e| !e.ok) {
            out += &format!(
                "expectation: {}: {}\n",
                e.path,
                e.message.as_deref().unwrap_or("failed")
            );
        }
        out += &format!("\nlast {} console lines:\n", self.console_tail.len());
        for line in &self.console_tail {
            out += line;
            out.push('\n');
        }
        out
    }
}

/// When to keep bundles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepPolicy {
    /// Every run's bundle.
    Always,
    /// Only failed runs' bundles.
    Failed,
    /// None (reports only).
    Never,
}

/// Why a bundle could not be finished; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// A bundle not to keep could not be removed.
    #[error("cannot remove {}: {source}", path.display())]
    Remove {
        /// The staging directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A result file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The result record could not be serialized.
    #[error("cannot serialize result.json: {0}")]
    Serialize(#[source] serde_json::Error),
    /// The staging directory could not be renamed into place.
    #[error("cannot rename {} to {}: {source}", from.display(), to.display())]
    Rename {
        /// The staging directory.
        from: PathBuf,
        /// The bundle directory.
        to: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// Who may read bundles: they hold what guests wrote, so by default only their owner.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ArtifactsMode {
    /// Directories 0700, files without group or other bits.
    #[default]
    Private,
    /// Directories 0755, files readable by everyone (0644, or 0755 when executable).
    Shared,
}

impl ArtifactsMode {
    /// The mode of a directory the harness creates in a bundle.
    pub fn dir_mode(self) -> u32 {
        match self {
            ArtifactsMode::Private => 0o700,
            ArtifactsMode::Shared => 0o755,
        }
    }

    /// The mode a file of mode `mode` gets in a bundle: never setuid, setgid or sticky, always
    /// readable and writable by its owner, and by this policy for others.
    pub fn file_mode(self, mode: u32) -> u32 {
        let owner = (mode & 0o700) | 0o600;
        match self {
            ArtifactsMode::Private => owner,
            ArtifactsMode::Shared => owner | ((owner >> 3) & 0o050) | ((owner >> 6) & 0o005),
        }
    }

    /// Creates `dir` and any missing parents with [`Self::dir_mode`] (existing ones are left
    /// as they are).
    pub fn create_dir_all(self, dir: &Path) -> io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(self.dir_mode())
            .create(dir)
    }
}

/// Sets every directory and file under `dir` (itself included) to `mode`'s permissions;
/// links are left alone (never followed).
pub fn restrict_tree(dir: &Path, mode: ArtifactsMode) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode.dir_mode()))?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            restrict_tree(&entry.path(), mode)?;
        } else if kind.is_file() {
            let current = entry.metadata()?.permissions().mode();
            fs::set_permissions(
                entry.path(),
                fs::Permissions::from_mode(mode.file_mode(current)),
            )?;
        }
    }
    Ok(())
}

/// A bundle being assembled.
#[derive(Debug)]
pub struct Bundle {
    /// The staging directory (files go here).
    pub staging: PathBuf,
    /// The final directory.
    pub dir: PathBuf,
    /// Who may read it.
    pub mode: ArtifactsMode,
}

impl Bundle {
    /// Creates the staging directory for `<root>/<scenario>/<run_id>`, owner-only unless
    /// `mode` says otherwise.
    pub fn create(
        root: &Path,
        scenario: &str,
        run_id: &str,
        mode: ArtifactsMode,
    ) -> io::Result<Bundle> {
        let parent = root.join(scenario);
        let staging = parent.join(format!(".{run_id}.partial"));
        mode.create_dir_all(&staging)?;
        Ok(Bundle {
            staging,
            dir: parent.join(run_id),
            mode,
        })
    }

    /// A path inside the staging directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.staging.join(name)
    }

    /// Writes the result files, renames the bundle into place and points `latest` at it; or, by
    /// `keep`, removes it. Returns the final directory when kept. When a file cannot be written
    /// (a full disk, say) the staging dir is removed rather than published: a bundle without its
    /// result.json must not look complete, and a full disk must not stay full of partial bundles
    /// for the scenarios still to run. The error names the file.
    pub fn finish(
        self,
        result: &RunResult,
        keep: KeepPolicy,
    ) -> Result<Option<PathBuf>, BundleError> {
        let kept = match keep {
            KeepPolicy::Always => true,
            KeepPolicy::Failed => !result.passed(),
            KeepPolicy::Never => false,
        };
        if !kept {
            fs::remove_dir_all(&self.staging).map_err(|source| BundleError::Remove {
                path: self.staging.clone(),
                source,
            })?;
            return Ok(None);
        }
        if let Err(e) = self.publish(result) {
            self.discard();
            return Err(e);
        }
        if let Err(e) = update_latest(&self.dir) {
            // The bundle itself is complete; only the convenience link is stale.
            tracing::warn!(
                "cannot update the latest link next to {}: {e}",
                self.dir.display()
            );
        }
        Ok(Some(self.dir))
    }

    /// result.json, failure-summary.txt, then the rename that makes the bundle visible.
    fn publish(&self, result: &RunResult) -> Result<(), BundleError> {
        let write = |name: &str, data: &[u8]| {
            let path = self.path(name);
            write_atomic(&path, data).map_err(|source| BundleError::Write { path, source })
        };
        let mut record = result.clone();
        record.bundle = Some(self.dir.clone());
        let json = serde_json::to_vec_pretty(&record).map_err(BundleError::Serialize)?;
        write("result.json", &json)?;
        if !result.passed() {
            write("failure-summary.txt", result.failure_summary().as_bytes())?;
        }
        // Whatever wrote into the bundle (the console, the log, fixtures, kept overlays), what
        // is published has the bundle's permissions.
        restrict_tree(&self.staging, self.mode).map_err(|source| BundleError::Write {
            path: self.staging.clone(),
            source,
        })?;
        fs::rename(&self.staging, &self.dir).map_err(|source| BundleError::Rename {
            from: self.staging.clone(),
            to: self.dir.clone(),
            source,
        })
    }

    /// Removes a bundle that cannot be finished.
    pub fn discard(&self) {
        if let Err(e) = fs::remove_dir_all(&self.staging) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!("cannot remove {}: {e}", self.staging.display());
            }
        }
    }
}

/// Points `<scenario>/latest` at `dir` atomically (a new link renamed over the old).
fn update_latest(dir: &Path) -> io::Result<()> {
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Ok(());
    };
    let tmp = parent.join(format!(".latest-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(name, &tmp)?;
    fs::rename(&tmp, parent.join("latest"))
}

/// How [`copy_tree`] copies fixtures out of a share.
#[derive(Debug, Clone, Copy)]
pub struct CopyOptions {
    /// The bundle's permissions.
    pub mode: ArtifactsMode,
    /// Most bytes of file contents to copy; a file that would go past it is not copied, and
    /// the copy stops there.
    pub limit: u64,
}

/// What [`copy_tree`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CopyReport {
    /// Bytes copied.
    pub bytes: u64,
    /// Entries not copied, each `PATH: why` (links, device nodes, fifos, sockets).
    pub skipped: Vec<String>,
    /// The limit stopped the copy (the path it stopped at).
    pub over_limit: Option<PathBuf>,
}

/// Copies the directory tree `from` into `to`: regular files and directories only, with
/// `opts.mode`'s permissions (never setuid, setgid or sticky), at most `opts.limit` bytes.
/// Links, device nodes, fifos and sockets are skipped and listed in the report.
pub fn copy_tree(from: &Path, to: &Path, opts: &CopyOptions) -> io::Result<CopyReport> {
    let mut report = CopyReport::default();
    copy_dir(from, to, opts, &mut report)?;
    Ok(report)
}

fn copy_dir(from: &Path, to: &Path, opts: &CopyOptions, report: &mut CopyReport) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
    match fs::DirBuilder::new().mode(opts.mode.dir_mode()).create(to) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && to.is_dir() => {}
        other => other?,
    }
    let mut entries = fs::read_dir(from)?.collect::<io::Result<Vec<_>>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        if report.over_limit.is_some() {
            return Ok(());
        }
        let kind = entry.file_type()?;
        let source = entry.path();
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_dir(&source, &target, opts, report)?;
        } else if kind.is_file() {
            let mut file = fs::File::open(&source)?;
            let meta = file.metadata()?;
            let room = opts.limit.saturating_sub(report.bytes);
            if meta.len() > room {
                report.over_limit = Some(source);
                return Ok(());
            }
            let mode = opts.mode.file_mode(meta.permissions().mode());
            // Never write through whatever is at the target already.
            match fs::remove_file(&target) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            let mut out = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&target)?;
            // create_new's mode is masked by the umask; say it exactly.
            out.set_permissions(fs::Permissions::from_mode(mode))?;
            // A file that grew since its size was read still stops at the limit.
            let copied = io::copy(&mut io::Read::take(&mut file, room + 1), &mut out)?;
            if copied > room {
                out.set_len(room)?;
                report.bytes += room;
                report.over_limit = Some(source);
                return Ok(());
            }
            report.bytes += copied;
        } else {
            let what = if kind.is_symlink() {
                "a symbolic link"
            } else if kind.is_fifo() {
                "a fifo"
            } else if kind.is_socket() {
                "a socket"
            } else if kind.is_block_device() || kind.is_char_device() {
                "a device node"
            } else {
                "not a regular file"
            };
            report
                .skipped
                .push(format!("{}: {what}, not copied", source.display()));
        }
    }
    Ok(())
}

/// What a cached digest is valid for: the file's path, size and modification time.
type DigestKey = (PathBuf, u64, SystemTime);

/// The SHA-256 of a file, cached by (path, size, mtime) so repeated runs do not re-hash images.
pub fn file_id(path: &Path) -> FileId {
    static CACHE: Mutex<Option<HashMap<DigestKey, String>>> = Mutex::new(None);
    let key = fs::metadata(path)
        .ok()
        .and_then(|m| Some((path.to_path_buf(), m.len(), m.modified().ok()?)));
    let cached = key.as_ref().and_then(|k| {
        let cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
        cache.as_ref().and_then(|c| c.get(k).cloned())
    });
    let sha256 = cached.or_else(|| {
        let digest = sha256_file(path).ok()?;
        if let Some(k) = key {
            let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
            cache
                .get_or_insert_with(HashMap::new)
                .insert(k, digest.clone());
        }
        Some(digest)
    });
    FileId {
        path: path.display().to_string(),
        sha256,
    }
}

/// The guest image digest from the kernel's and initrd's (see
/// [`Provenance::guest_image_sha256`]); `None` when either could not be read.
pub fn guest_image_sha256(kernel: &FileId, initrd: Option<&FileId>) -> Option<String> {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(kernel.sha256.as_deref()?);
    hasher.update(b"\n");
    if let Some(initrd) = initrd {
        hasher.update(initrd.sha256.as_deref()?);
    }
    Some(
        hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

/// Lower-case hex SHA-256 of a file's contents, streamed.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut file = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher)?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// A console line as result.json records it: terminal escape sequences (CSI `ESC [ … final`,
/// OSC `ESC ] … BEL/ST`, two-byte `ESC x`) and other control characters removed, tabs kept.
/// Firmware clears the screen before the kernel starts ("Booting from ROM..\x1bc…"); the raw
/// console.log keeps every byte.
pub fn printable(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => match chars.next() {
                Some('[') => {
                    // Parameters and intermediates, then one final byte in @..~.
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                Some(']') => {
                    while let Some(c) = chars.next() {
                        if c == '\x07' || (c == '\x1b' && chars.next_if_eq(&'\\').is_some()) {
                            break;
                        }
                    }
                }
                _ => {}
            },
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// Milliseconds as f64 with microsecond resolution.
pub fn ms(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_lose_escape_sequences_and_control_characters() {
        assert_eq!(
            printable("Booting from ROM..\x1bc\x1b[?7l\x1b[2JKILN_READY t=12\r"),
            "Booting from ROM..KILN_READY t=12"
        );
        assert_eq!(printable("\x1b]0;title\x07a\tb\x1b]2;x\x1b\\c"), "a\tbc");
        assert_eq!(printable("plain ü line"), "plain ü line");
        assert_eq!(printable("cut \x1b["), "cut ");
    }

    #[test]
    fn atomic_write_replaces_whole_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        write_atomic(&p, b"one").expect("write");
        write_atomic(&p, b"two").expect("write");
        assert_eq!(fs::read(&p).expect("read"), b"two");
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 1);
    }

    #[test]
    fn a_bundle_that_cannot_be_written_is_removed_not_published() {
        let root = tempfile::tempdir().expect("tempdir");
        let bundle =
            Bundle::create(root.path(), "s", "r1", ArtifactsMode::Private).expect("create");
        fs::write(bundle.path("console.log"), b"boot\n").expect("console");
        // A directory where result.json goes: its atomic rename fails, as a write on a full
        // disk would.
        fs::create_dir(bundle.path("result.json")).expect("mkdir");
        let (staging, dir) = (bundle.staging.clone(), bundle.dir.clone());
        let result = RunResult {
            scenario: "s".into(),
            run_id: "r1".into(),
            attempt: 1,
            verdict: Verdict::Pass,
            failure: None,
            started_at: String::new(),
            ready: Vec::new(),
            steps: Vec::new(),
            expectations: Vec::new(),
            phases: Phases::default(),
            provenance: Provenance::default(),
            environment: None,
            bundle: None,
            console_tail: Vec::new(),
            snapshot: None,
        };
        let err = bundle
            .finish(&result, KeepPolicy::Always)
            .expect_err("cannot finish")
            .to_string();
        let want = format!("cannot write {}/result.json: ", staging.display());
        assert!(err.starts_with(&want), "{err}");
        assert!(!dir.exists(), "not renamed into place");
        assert!(!staging.exists(), "staging removed");
        assert!(!root.path().join("s/latest").exists());
    }

    #[test]
    fn file_digest_is_the_known_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        fs::write(&p, b"abc").expect("write");
        let id = file_id(&p);
        assert_eq!(
            id.sha256.as_deref(),
            Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
    }
}
