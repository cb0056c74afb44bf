//! Scenarios: declarative TOML files, each one throwaway VM with readiness, steps and
//! expectations. Parsing keeps spans so every error names file:line:col and the field.
//!
//! A corpus is a set of files or directories; a directory contributes its `*.toml` files
//! (recursively, sorted) and its `kiln.toml` or `defaults.toml` holds `[defaults]` merged under
//! every scenario in that directory.

mod error;
mod raw;
mod resolve;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use regex::Regex;
use serde::{Serialize, Serializer};

pub use error::{ScenarioError, SourceFile};
pub use raw::{parse_size, MAX_DURATION};
pub use resolve::{parse_scenario, DefaultsSource};

/// Names of the defaults/profile file looked up in a corpus directory, in order.
pub const DEFAULTS_FILES: [&str; 2] = ["kiln.toml", "defaults.toml"];

/// Default whole-scenario time limit.
pub const DEFAULT_SCENARIO_TIMEOUT: Duration = Duration::from_secs(600);
/// Default [`Scenario::fixtures_limit`]: 1 GiB.
pub const DEFAULT_FIXTURES_LIMIT: u64 = 1 << 30;
/// Default time for the guest to become ready (TCG boots take seconds).
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Default per-step time limit.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Default guest memory in MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 256;
/// Tag of the share created when a scenario declares none.
pub const DEFAULT_SHARE_TAG: &str = "output";

/// A validated scenario with defaults merged and paths resolved.
#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    /// Unique id across the corpus (letters, digits, `.`, `_`, `-`).
    pub id: String,
    /// What the scenario claims.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// The file it came from.
    #[serde(skip)]
    pub file: PathBuf,
    /// The whole run's time limit (boot to teardown).
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// Most bytes copied from its shares into the bundle's fixtures/; past it the scenario
    /// fails.
    pub fixtures_limit: u64,
    /// Whether the kiln backend may start it from a snapshot of its guest shape (`snapshot =
    /// false` boots it cold every time; `kiln run --no-snapshot` does so for every scenario).
    pub snapshot: bool,
    /// Backends it may run on; empty means any.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendKind>,
    /// Guest kernel, initrd, size and command line.
    pub guest: GuestSpec,
    /// Disks: each base image gets a copy-on-write overlay per run.
    pub disks: Vec<DiskSpec>,
    /// Host directories shared into the guest.
    pub shares: Vec<ShareSpec>,
    /// When the guest counts as ready.
    pub readiness: Readiness,
    /// What to do in the guest, in order.
    pub steps: Vec<Step>,
    /// What must hold afterwards.
    pub expect: Expect,
    /// What `kiln diff run` tolerates between backends.
    #[serde(skip_serializing_if = "DiffRules::is_empty")]
    pub diff: DiffRules,
}

/// `[diff]`: differences between the two backends' runs that `kiln diff run` tolerates, each
/// reported with its rule and reason, never silently.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DiffRules {
    /// Regexes whose matches are masked in both sides' step outputs before comparing.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ignore: Vec<IgnoreRule>,
    /// Steps (indices) whose exit code and outputs may differ.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ignore_steps: Vec<usize>,
    /// Why: the reason reported for `ignore_steps` and for rules without their own.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

impl DiffRules {
    /// No rules at all.
    pub fn is_empty(&self) -> bool {
        self.ignore.is_empty() && self.ignore_steps.is_empty() && self.reason.is_empty()
    }
}

/// One `[diff] ignore` rule.
#[derive(Debug, Clone, Serialize)]
pub struct IgnoreRule {
    /// Matches are masked in step stdout and stderr on both sides.
    pub regex: Pattern,
    /// Why the masked text may differ.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// A concrete backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// kiln's own VMM (needs hardware KVM for Linux guests).
    Kiln,
    /// qemu-system-x86_64 (KVM when usable, TCG otherwise).
    Qemu,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Kiln => "kiln",
            BackendKind::Qemu => "qemu",
        })
    }
}

/// `[guest]`.
#[derive(Debug, Clone, Serialize)]
pub struct GuestSpec {
    /// The kernel image, or the default guest.
    pub kernel: ImageRef,
    /// The initrd; `None` with an explicit kernel means none, with the default guest its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Memory in MiB.
    pub memory: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Extra kernel command line (appended to the backend's).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub cmdline: String,
}

/// A guest image: kiln's default guest (kernel + initramfs with the agent) or a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// `"default"`: the cached default guest.
    Default,
    /// A file on the host.
    Path(PathBuf),
    /// `"oci://HOST[:PORT]/REPOSITORY[:TAG]@sha256:HEX"`: a guest (kernel and initrd) pulled
    /// from an OCI registry by digest into the guest cache, verified, on first use.
    Registry(String),
}

impl Serialize for ImageRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ImageRef::Default => s.serialize_str("default"),
            ImageRef::Path(p) => s.serialize_str(&p.display().to_string()),
            ImageRef::Registry(r) => s.serialize_str(r),
        }
    }
}

/// Format of a disk's base image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// Raw bytes.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
}

/// One `[[disks]]` entry; the guest sees them as /dev/vda, /dev/vdb, ... in order.
#[derive(Debug, Clone, Serialize)]
pub struct DiskSpec {
    /// Name of the overlay kept in the bundle (`fixtures/disks/<name>.qcow2`).
    pub name: String,
    /// The base image, opened read-only and never written.
    pub base: PathBuf,
    /// The base image's format.
    pub format: DiskFormat,
    /// Keep the per-run overlay in the artifact bundle.
    pub keep: bool,
}

/// One `[[shares]]` entry.
#[derive(Debug, Clone, Serialize)]
pub struct ShareSpec {
    /// The mount tag the guest mounts by.
    pub tag: String,
    /// Host directory; `None` gives a fresh empty directory per run, copied to `fixtures/<tag>/`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<PathBuf>,
    /// Where the agent mounts it in the guest.
    pub mount: String,
    /// Read-only in the guest.
    #[serde(rename = "mode", serialize_with = "ser_share_mode")]
    pub readonly: bool,
}

/// `[readiness]`: when the guest counts as ready.
#[derive(Debug, Clone)]
pub struct Readiness {
    /// Limit for the whole readiness phase.
    pub timeout: Duration,
    /// What to wait for.
    pub kind: ReadinessKind,
}

/// What readiness waits for on the console.
#[derive(Debug, Clone)]
pub enum ReadinessKind {
    /// The agent's `KILN_READY v=1 …` record.
    Agent,
    /// A console line matching a regex.
    Marker(Pattern),
    /// Console lines matching these regexes, in this order, each within its own timeout.
    Sequence(Vec<SequenceMarker>),
}

/// One marker of a readiness sequence.
#[derive(Debug, Clone, Serialize)]
pub struct SequenceMarker {
    /// The regex a console line must match.
    pub marker: Pattern,
    /// Time allowed since the previous marker (or since boot for the first).
    #[serde(serialize_with = "ser_opt_duration")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
}

impl Serialize for Readiness {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry(
            "timeout",
            &humantime::format_duration(self.timeout).to_string(),
        )?;
        match &self.kind {
            ReadinessKind::Agent => {}
            ReadinessKind::Marker(p) => map.serialize_entry("marker", p)?,
            ReadinessKind::Sequence(seq) => map.serialize_entry("sequence", seq)?,
        }
        map.end()
    }
}

/// A compiled regex that serializes as its source.
#[derive(Debug, Clone)]
pub struct Pattern(pub Regex);

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.as_str())
    }
}

/// One `[[steps]]` entry.
#[derive(Debug, Clone)]
pub struct Step {
    /// A name for reports; defaults to a summary of the action.
    pub name: String,
    /// What the step does.
    pub action: StepAction,
    /// Time limit for this step.
    pub timeout: Duration,
}

/// Serializes in the shape a scenario file is written in, so the "as run" copy parses again.
impl Serialize for Step {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("name", &self.name)?;
        match &self.action {
            StepAction::Run(run) => {
                map.serialize_entry("run", &run.argv)?;
                if !run.env.is_empty() {
                    map.serialize_entry("env", &run.env)?;
                }
                if let Some(cwd) = &run.cwd {
                    map.serialize_entry("cwd", cwd)?;
                }
                if !run.stdin.is_empty() {
                    map.serialize_entry("stdin", &run.stdin)?;
                }
                map.serialize_entry("exit_code", &run.exit_code)?;
                if !run.stdout_contains.is_empty() {
                    map.serialize_entry("stdout_contains", &run.stdout_contains)?;
                }
                if let Some(r) = &run.stdout_regex {
                    map.serialize_entry("stdout_regex", r)?;
                }
                if !run.stderr_contains.is_empty() {
                    map.serialize_entry("stderr_contains", &run.stderr_contains)?;
                }
                if let Some(r) = &run.stderr_regex {
                    map.serialize_entry("stderr_regex", r)?;
                }
            }
            put @ StepAction::Put { .. } => map.serialize_entry("put", put)?,
            get @ StepAction::Get { .. } => map.serialize_entry("get", get)?,
            StepAction::WaitConsole(p) => map.serialize_entry("wait_console", p)?,
        }
        map.serialize_entry(
            "timeout",
            &humantime::format_duration(self.timeout).to_string(),
        )?;
        map.end()
    }
}

/// What a step does.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum StepAction {
    /// Run a command through the agent.
    #[serde(skip_serializing)]
    Run(Box<RunStep>),
    /// Copy a host file (or literal content) into the guest.
    Put {
        /// Host file to copy (exclusive with `content`).
        #[serde(skip_serializing_if = "Option::is_none")]
        src: Option<PathBuf>,
        /// Literal content to write (exclusive with `src`).
        #[serde(skip_serializing_if = "Option::is_none")]
        content: Option<String>,
        /// Guest path.
        dest: String,
        /// Permission bits.
        mode: u32,
    },
    /// Copy a guest file into the bundle's `fixtures/`.
    Get {
        /// Guest path.
        src: String,
        /// Path under `fixtures/`.
        dest: String,
    },
    /// Wait for a console line matching a regex.
    WaitConsole(Pattern),
}

/// A command step.
#[derive(Debug, Clone)]
pub struct RunStep {
    /// Program and arguments (`shell` becomes `["/bin/sh", "-c", script]`).
    pub argv: Vec<String>,
    /// Environment added for the command.
    pub env: BTreeMap<String, String>,
    /// Working directory in the guest.
    pub cwd: Option<String>,
    /// Bytes for standard input.
    pub stdin: String,
    /// Expected exit code.
    pub exit_code: i32,
    /// Substrings standard output must contain.
    pub stdout_contains: Vec<String>,
    /// A regex standard output must match.
    pub stdout_regex: Option<Pattern>,
    /// Substrings standard error must contain.
    pub stderr_contains: Vec<String>,
    /// A regex standard error must match.
    pub stderr_regex: Option<Pattern>,
}

/// `[expect]`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Expect {
    /// Expectations on files under the bundle's `fixtures/`.
    pub files: Vec<FileExpect>,
}

/// One `[[expect.files]]` entry; `path` is relative to the bundle's `fixtures/` directory, where
/// each per-run share appears as `<tag>/` and each `get` step's file at its `dest`.
#[derive(Debug, Clone, Serialize)]
pub struct FileExpect {
    /// Path under `fixtures/`.
    pub path: String,
    /// The file must exist (false: must not exist).
    pub exists: bool,
    /// The file must not be empty.
    pub non_empty: bool,
    /// Smallest allowed size in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_size: Option<u64>,
    /// Largest allowed size in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_size: Option<u64>,
    /// Expected lower-case hex SHA-256.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Host shell command run on the file (`$1` and `$KILN_FILE` are its path,
    /// `$KILN_SCENARIO_DIR` the scenario's directory); must exit 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<String>,
}

impl Scenario {
    /// The scenario as run, defaults merged, as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# not serializable: {e}\n"))
    }

    /// Whether the scenario may run on `backend`.
    pub fn allows(&self, backend: BackendKind) -> bool {
        self.backends.is_empty() || self.backends.contains(&backend)
    }
}

fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

fn ser_share_mode<S: Serializer>(readonly: &bool, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(if *readonly { "ro" } else { "rw" })
}

fn ser_opt_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_duration(d, s),
        None => s.serialize_none(),
    }
}

/// The artifacts budget a corpus sets: `[artifacts] max_size` in the `kiln.toml` (or
/// `defaults.toml`) of the first of `paths` (a directory, or a scenario file's directory) that
/// sets one, with that file. `None` when none does: no budget.
pub fn artifacts_max_size(paths: &[PathBuf]) -> Result<Option<(u64, PathBuf)>, ScenarioError> {
    for path in paths {
        let dir = if path.is_dir() {
            path.as_path()
        } else {
            path.parent().unwrap_or(Path::new("."))
        };
        if let Some(defaults) = resolve::load_defaults(dir)? {
            if let Some(size) = defaults.artifacts_max_size() {
                return Ok(Some((size, defaults.path().to_path_buf())));
            }
        }
    }
    Ok(None)
}

/// Loads every scenario under `paths` (files or directories), checking each and the corpus as a
/// whole (duplicate ids). Returns all errors found, not just the first.
pub fn load_corpus(paths: &[PathBuf]) -> Result<Vec<Scenario>, Vec<ScenarioError>> {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        collect_files(path, &mut files, &mut errors);
    }
    let mut defaults_cache: BTreeMap<PathBuf, Option<DefaultsSource>> = BTreeMap::new();
    let mut scenarios: Vec<(Scenario, (usize, usize))> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for file in files {
        if !seen.insert(file.clone()) {
            continue;
        }
        let dir = file.parent().unwrap_or(Path::new(".")).to_path_buf();
        let defaults = defaults_cache.entry(dir.clone()).or_insert_with(|| {
            match resolve::load_defaults(&dir) {
                Ok(d) => d,
                Err(e) => {
                    errors.push(e);
                    None
                }
            }
        });
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                errors.push(ScenarioError {
                    file: file.clone(),
                    position: None,
                    field: String::new(),
                    message: format!("cannot read: {e}"),
                });
                continue;
            }
        };
        let source = SourceFile { path: file, text };
        match parse_scenario(&source, defaults.as_ref()) {
            Ok((scenario, id_pos)) => {
                if let Some((first, pos)) = scenarios.iter().find(|(s, _)| s.id == scenario.id) {
                    errors.push(ScenarioError {
                        file: scenario.file.clone(),
                        position: Some(id_pos),
                        field: "id".into(),
                        message: format!(
                            "duplicate id `{}`; already used by {}:{}:{}",
                            scenario.id,
                            first.file.display(),
                            pos.0,
                            pos.1
                        ),
                    });
                } else {
                    scenarios.push((scenario, id_pos));
                }
            }
            Err(mut errs) => errors.append(&mut errs),
        }
    }
    if scenarios.is_empty() && errors.is_empty() {
        errors.push(ScenarioError {
            file: paths.first().cloned().unwrap_or_default(),
            position: None,
            field: String::new(),
            message: "no scenario files (*.toml) found".into(),
        });
    }
    if errors.is_empty() {
        Ok(scenarios.into_iter().map(|(s, _)| s).collect())
    } else {
        Err(errors)
    }
}

/// Adds `path` (a scenario file) or the scenario files under it (a directory) to `files`.
fn collect_files(path: &Path, files: &mut Vec<PathBuf>, errors: &mut Vec<ScenarioError>) {
    let io_error = |e: std::io::Error| ScenarioError {
        file: path.to_path_buf(),
        position: None,
        field: String::new(),
        message: format!("cannot read: {e}"),
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return errors.push(io_error(e)),
    };
    if !meta.is_dir() {
        files.push(path.to_path_buf());
        return;
    }
    let entries = match std::fs::read_dir(path) {
        Ok(rd) => rd,
        Err(e) => return errors.push(io_error(e)),
    };
    let mut children: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    children.sort();
    for child in children {
        let name = child.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if child.is_dir() {
            if !name.starts_with('.') {
                collect_files(&child, files, errors);
            }
        } else if name.ends_with(".toml") && !DEFAULTS_FILES.contains(&name) {
            files.push(child);
        }
    }
}

#[cfg(test)]
mod tests;
