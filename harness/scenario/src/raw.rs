//! The scenario file as written: serde types that mirror the TOML, with spans on every value a
//! later check may need to point at. `deny_unknown_fields` everywhere, so a typo is an error.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use toml::Spanned;

/// A whole scenario file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawScenario {
    pub id: Spanned<String>,
    pub description: Option<String>,
    pub timeout: Option<Spanned<RawDuration>>,
    pub fixtures_limit: Option<Spanned<RawSize>>,
    pub snapshot: Option<bool>,
    #[serde(default)]
    pub guest: RawGuest,
    #[serde(default)]
    pub disks: Vec<Spanned<RawDisk>>,
    pub shares: Option<Vec<Spanned<RawShare>>>,
    pub readiness: Option<Spanned<RawReadiness>>,
    #[serde(default)]
    pub steps: Vec<Spanned<RawStep>>,
    #[serde(default)]
    pub expect: RawExpect,
    pub backends: Option<Spanned<Vec<BackendName>>>,
    pub diff: Option<RawDiff>,
}

/// `[diff]`: what `kiln diff run` tolerates between the two backends' runs.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDiff {
    #[serde(default)]
    pub ignore: Vec<Spanned<RawIgnore>>,
    #[serde(default)]
    pub ignore_steps: Vec<Spanned<RawStepRef>>,
    pub reason: Option<String>,
}

/// One `[diff] ignore` entry: a regex, or `{ regex = "...", reason = "..." }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawIgnore {
    Regex(String),
    Rule {
        regex: String,
        reason: Option<String>,
    },
}

/// A step named by its index (from 0) or its name.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawStepRef {
    Index(i64),
    Name(String),
}

/// A defaults/profile file (`kiln.toml` or `defaults.toml` in the corpus directory).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDefaultsFile {
    #[serde(default)]
    pub defaults: RawDefaults,
    #[serde(default)]
    pub artifacts: RawArtifacts,
}

/// `[artifacts]`: settings of the artifacts dir, for the whole run rather than each scenario.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawArtifacts {
    pub max_size: Option<Spanned<RawSize>>,
}

/// What `[defaults]` may set; each scenario's own values win.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDefaults {
    pub timeout: Option<Spanned<RawDuration>>,
    pub fixtures_limit: Option<Spanned<RawSize>>,
    #[serde(default)]
    pub guest: RawGuest,
    pub readiness: Option<Spanned<RawReadiness>>,
    #[serde(default)]
    pub steps: RawStepDefaults,
    pub backends: Option<Spanned<Vec<BackendName>>>,
}

/// `[defaults.steps]`: applied to every step that does not set its own.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStepDefaults {
    pub timeout: Option<Spanned<RawDuration>>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// `[guest]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGuest {
    pub kernel: Option<Spanned<String>>,
    pub initrd: Option<Spanned<String>>,
    pub memory: Option<Spanned<u64>>,
    pub vcpus: Option<Spanned<u8>>,
    pub cmdline: Option<String>,
}

/// One `[[disks]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDisk {
    pub name: Option<Spanned<String>>,
    pub base: Spanned<String>,
    pub format: Option<DiskFormatName>,
    #[serde(default)]
    pub keep: bool,
}

/// A base image's format.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormatName {
    Raw,
    Qcow2,
}

/// One `[[shares]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShare {
    pub tag: Spanned<String>,
    pub host: Option<Spanned<String>>,
    pub mount: Option<Spanned<String>>,
    pub mode: Option<ShareModeName>,
}

/// Read-only or read-write.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShareModeName {
    Ro,
    Rw,
}

/// A backend a scenario may run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendName {
    Kiln,
    Qemu,
}

/// `[readiness]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReadiness {
    pub timeout: Option<Spanned<RawDuration>>,
    pub marker: Option<Spanned<String>>,
    pub sequence: Option<Vec<Spanned<RawMarker>>>,
}

/// One marker of an ordered readiness sequence.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMarker {
    pub marker: Spanned<String>,
    pub timeout: Option<Spanned<RawDuration>>,
}

/// One `[[steps]]` entry: exactly one of `run`, `shell`, `put`, `get`, `wait_console`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStep {
    pub name: Option<String>,
    pub run: Option<Spanned<Vec<String>>>,
    pub shell: Option<Spanned<String>>,
    pub put: Option<Spanned<RawPut>>,
    pub get: Option<Spanned<RawGet>>,
    pub wait_console: Option<Spanned<String>>,
    pub env: Option<BTreeMap<String, String>>,
    pub cwd: Option<String>,
    pub stdin: Option<String>,
    pub timeout: Option<Spanned<RawDuration>>,
    pub exit_code: Option<i32>,
    pub stdout_contains: Option<OneOrMany>,
    pub stdout_regex: Option<Spanned<String>>,
    pub stderr_contains: Option<OneOrMany>,
    pub stderr_regex: Option<Spanned<String>>,
}

/// `put = { src = "host/file", dest = "/guest/file", mode = 0o644 }` (or `content` for `src`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPut {
    pub src: Option<Spanned<String>>,
    pub content: Option<String>,
    pub dest: Spanned<String>,
    pub mode: Option<u32>,
}

/// `get = { src = "/guest/file", dest = "name-in-fixtures" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGet {
    pub src: Spanned<String>,
    pub dest: Option<Spanned<String>>,
}

/// `[expect]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExpect {
    #[serde(default)]
    pub files: Vec<Spanned<RawFileExpect>>,
}

/// One `[[expect.files]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFileExpect {
    pub path: Spanned<String>,
    pub exists: Option<bool>,
    pub non_empty: Option<bool>,
    pub min_size: Option<u64>,
    pub max_size: Option<u64>,
    pub sha256: Option<Spanned<String>>,
    pub verify: Option<Spanned<String>>,
}

/// A string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// A duration: a number of seconds (`30`, `0.5`) or a string with a unit (`"30s"`, `"500ms"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawDuration(pub Duration);

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DurationVisitor)
    }
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = RawDuration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration: seconds (30) or a string like \"30s\", \"500ms\", \"2m\"")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawDuration, E> {
        u64::try_from(v)
            .map_err(|_| E::custom(format!("duration {v} is negative")))
            .and_then(|s| self.visit_u64(s))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawDuration, E> {
        bounded(v, Duration::from_secs(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawDuration, E> {
        Duration::try_from_secs_f64(v)
            .map_err(|_| E::custom(format!("duration {v} is not a number of seconds >= 0")))
            .and_then(|d| bounded(v, d))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<RawDuration, E> {
        humantime::parse_duration(v)
            .map_err(|e| {
                E::custom(format!(
                    "invalid duration \"{v}\" ({e}); write seconds (30) or \"30s\", \"500ms\", \"2m\""
                ))
            })
            .and_then(|d| bounded(format!("\"{v}\""), d))
    }
}

/// The longest duration a scenario may give: deadlines are `now + duration`, which must not
/// overflow (a panic), and nothing kiln runs needs a year.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

fn bounded<E: de::Error>(written: impl fmt::Display, d: Duration) -> Result<RawDuration, E> {
    if d > MAX_DURATION {
        return Err(E::custom(format!(
            "duration {written} is too long (at most {} seconds, a year)",
            MAX_DURATION.as_secs()
        )));
    }
    Ok(RawDuration(d))
}

/// A size in bytes: an integer, or a string like "512MiB", "1GiB", "64KiB".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawSize(pub u64);

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SizeVisitor)
    }
}

struct SizeVisitor;

impl Visitor<'_> for SizeVisitor {
    type Value = RawSize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size: bytes (1048576) or a string like \"512MiB\", \"1GiB\"")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawSize, E> {
        u64::try_from(v)
            .map(RawSize)
            .map_err(|_| E::custom(format!("size {v} is negative")))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawSize, E> {
        i64::try_from(v)
            .map(|_| RawSize(v))
            .map_err(|_| E::custom(format!("size {v} is too large")))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<RawSize, E> {
        parse_size(v).map(RawSize).map_err(E::custom)
    }
}

/// Parses a size: bytes, or a number with a suffix K, KiB, M, MiB, G, GiB, T, TiB (all powers
/// of 1024; `B` alone is bytes).
pub fn parse_size(v: &str) -> Result<u64, String> {
    let t = v.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        _ => {
            return Err(format!(
                "invalid size \"{v}\"; write bytes (1048576) or \"512MiB\", \"1GiB\""
            ))
        }
    };
    let n: u64 = num.parse().map_err(|_| {
        format!("invalid size \"{v}\"; write bytes (1048576) or \"512MiB\", \"1GiB\"")
    })?;
    n.checked_mul(1u64 << shift)
        .filter(|&b| i64::try_from(b).is_ok())
        .ok_or_else(|| format!("size \"{v}\" is too large"))
}
