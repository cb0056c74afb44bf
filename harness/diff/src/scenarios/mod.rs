//! `kiln diff run`: one scenario run on two backends, judged fact by fact. [`compare_runs`] is
//! the judgement: a function of the two runs' result.json and fixtures/ directories (and of the
//! overlay reader it is given), so it is tested with synthetic runs and no VM.

pub mod report;
/// Why two bundles could not be compared (the comparison is inconclusive then).
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// A bundle could not be read back.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// No work directory for the flattened disks.
    #[error(transparent)]
    TempDir(#[from] crate::TempDirError),
}

/// Why a kept bundle could not be read back; each names its result.json.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// result.json could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// result.json.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// result.json is not a run result.
    #[error("{}: {source}", path.display())]
    Parse {
        /// result.json.
        path: PathBuf,
        /// What serde_json said.
        source: serde_json::Error,
    },
}

/// Compares two kept bundles of one scenario (`<artifacts>/<id>/latest` or a run dir).
pub fn compare_bundles(
    a: (&str, &Path),
    b: (&str, &Path),
    rules: &DiffRules,
    reader: &dyn OverlayReader,
) -> Result<Vec<Fact>, CompareError> {
    let work = crate::TempDir::new("kiln-diff-run").map_err(crate::TempDirError)?;
    compare_bundles_in(a, b, rules, reader, work.path())
}

/// [`compare_bundles`] with a caller-owned scratch dir `work` (which the caller removes, also
/// when Ctrl-C ends the process without unwinding).
pub fn compare_bundles_in(
    a: (&str, &Path),
    b: (&str, &Path),
    rules: &DiffRules,
    reader: &dyn OverlayReader,
    work: &Path,
) -> Result<Vec<Fact>, CompareError> {
    let (ba, bb) = (load_bundle(a.1)?, load_bundle(b.1)?);
    let side = |label, l: &'_ LoadedBundle| (label, l.result.clone(), l.fixtures.clone());
    let (sa, sb) = (side(a.0, &ba), side(b.0, &bb));
    Ok(compare_runs(
        &RunSide {
            label: sa.0,
            result: &sa.1,
            fixtures: &sa.2,
        },
        &RunSide {
            label: sb.0,
            result: &sb.1,
            fixtures: &sb.2,
        },
        rules,
        reader,
        work,
    ))
}

#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::show::labeled_line_diff;
use kiln_runner::artifacts::sha256_file;
use kiln_runner::RunResult;
use kiln_scenario::DiffRules;

/// Text outputs up to this size get a line diff; larger ones a digest and size line.
const TEXT_DIFF_MAX: u64 = 64 * 1024;

/// What masked text is replaced with in both outputs.
const MASK: &str = "<ignored>";

/// One side of the comparison: a finished run of the scenario on one backend.
#[derive(Debug, Clone, Copy)]
pub struct RunSide<'a> {
    /// Its name in reports ("kiln", "qemu").
    pub label: &'a str,
    /// Its result.json.
    pub result: &'a RunResult,
    /// Its bundle's fixtures/ directory (may be absent: no fixtures).
    pub fixtures: &'a Path,
}

/// How one fact compared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FactVerdict {
    /// The same on both sides.
    Identical,
    /// Different, but a rule allows it.
    Tolerated {
        /// Which rule (`diff.ignore[0] /\d+ms/`, `diff.ignore_steps`).
        rule: String,
        /// Why it may differ.
        reason: String,
    },
    /// Different, and nothing explains it: a bug in one of the backends.
    Divergent,
    /// It could not be compared (a tool missing, a file unreadable); says why.
    Inconclusive(String),
}

/// One compared fact of a scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fact {
    /// What was compared (`steps[1] "read back" stdout`, `fixture output/a.csv`).
    pub name: String,
    /// How it compared.
    pub verdict: FactVerdict,
    /// For a divergence: what differs, whitespace made visible.
    pub diff: Option<String>,
}

impl Fact {
    fn new(name: impl Into<String>, verdict: FactVerdict, diff: Option<String>) -> Fact {
        Fact {
            name: name.into(),
            verdict,
            diff,
        }
    }
}

/// Reads the CoW overlays: checks them and flattens them to raw bytes.
pub trait OverlayReader {
    /// Checks the overlay's consistency; `Err` says what is wrong (or that no checker exists).
    fn check(&self, overlay: &Path) -> Result<(), OverlayError>;
    /// Writes the guest-visible disk content (overlay over its backing chain) to `raw`.
    fn flatten(&self, overlay: &Path, raw: &Path) -> Result<(), OverlayError>;
}

/// Why an overlay could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverlayError {
    /// The overlay is bad (the checker says so): a fact about that backend.
    Bad(String),
    /// The tool is missing or failed to run: nothing can be said.
    Tool(String),
}

/// The reference reader: `qemu-img check` and `qemu-img convert -O raw`.
#[derive(Debug, Clone)]
pub struct QemuImg(pub String);

impl QemuImg {
    fn run(&self, args: &[&std::ffi::OsStr]) -> Result<(), OverlayError> {
        let out = Command::new(&self.0)
            .args(args)
            .output()
            .map_err(|e| OverlayError::Tool(format!("cannot run {}: {e}", self.0)))?;
        if out.status.success() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        Err(OverlayError::Bad(format!(
            "{} exited {}: {first}",
            self.0,
            out.status
                .code()
                .map_or("on a signal".into(), |c| c.to_string())
        )))
    }
}

impl OverlayReader for QemuImg {
    fn check(&self, overlay: &Path) -> Result<(), OverlayError> {
        self.run(&["check".as_ref(), "-q".as_ref(), overlay.as_os_str()])
            .map_err(|e| match e {
                OverlayError::Bad(m) => OverlayError::Bad(format!("qemu-img check: {m}")),
                tool => tool,
            })
    }

    fn flatten(&self, overlay: &Path, raw: &Path) -> Result<(), OverlayError> {
        let args = ["convert".as_ref(), "-O".as_ref(), "raw".as_ref()];
        let mut all: Vec<&std::ffi::OsStr> = args.to_vec();
        all.extend([overlay.as_os_str(), raw.as_os_str()]);
        self.run(&all).map_err(|e| match e {
            // A check passed, so a failing convert is the tool's problem, not the overlay's.
            OverlayError::Bad(m) => OverlayError::Tool(format!("qemu-img convert: {m}")),
            tool => tool,
        })
    }
}

/// Compares two runs of one scenario: the verdict, each step's exit code, stdout and stderr
/// (with `rules`), each fixture file (sha256) and each kept overlay (checked, flattened, compared
/// byte for byte in `work`).
pub fn compare_runs(
    a: &RunSide,
    b: &RunSide,
    rules: &DiffRules,
    overlays: &dyn OverlayReader,
    work: &Path,
) -> Vec<Fact> {
    let mut facts = vec![verdict_fact(a, b)];
    facts.extend(step_facts(a, b, rules));
    let (files_a, overlays_a) = fixture_files(a.fixtures);
    let (files_b, overlays_b) = fixture_files(b.fixtures);
    for rel in files_a.union(&files_b) {
        facts.push(fixture_fact(
            a,
            b,
            rel,
            files_a.contains(rel),
            files_b.contains(rel),
        ));
    }
    for rel in overlays_a.union(&overlays_b) {
        let present = (overlays_a.contains(rel), overlays_b.contains(rel));
        facts.push(overlay_fact(a, b, rel, present, overlays, work));
    }
    facts
}

fn verdict_fact(a: &RunSide, b: &RunSide) -> Fact {
    let describe = |r: &RunResult| match &r.failure {
        Some(f) => format!("fail ({}: {})", f.class.as_str(), f.message),
        None => "pass".to_string(),
    };
    let same = a.result.verdict == b.result.verdict && a.result.class() == b.result.class();
    if same {
        return Fact::new("verdict", FactVerdict::Identical, None);
    }
    let diff = format!(
        "    {}: {}\n    {}: {}\n",
        a.label,
        describe(a.result),
        b.label,
        describe(b.result)
    );
    Fact::new("verdict", FactVerdict::Divergent, Some(diff))
}

fn step_facts(a: &RunSide, b: &RunSide, rules: &DiffRules) -> Vec<Fact> {
    let (sa, sb) = (&a.result.steps, &b.result.steps);
    let mut facts = Vec::new();
    if sa.len() != sb.len() {
        let diff = format!(
            "    {}: {} steps\n    {}: {} steps\n",
            a.label,
            sa.len(),
            b.label,
            sb.len()
        );
        facts.push(Fact::new("steps", FactVerdict::Divergent, Some(diff)));
    }
    for (x, y) in sa.iter().zip(sb) {
        let name = format!("steps[{}] {:?}", x.index, x.name);
        let ignored = rules.ignore_steps.contains(&x.index);
        let tolerate = |verdict: FactVerdict| match verdict {
            FactVerdict::Divergent if ignored => FactVerdict::Tolerated {
                rule: "diff.ignore_steps".into(),
                reason: reason_or(&rules.reason, "the step is listed in [diff] ignore_steps"),
            },
            v => v,
        };
        let status = |s: &kiln_runner::artifacts::StepResult| {
            let mut t = format!("{:?}", s.status).to_lowercase();
            if let Some(c) = s.exit_code {
                t += &format!(", exit code {c}");
            }
            if let Some(sig) = s.signal {
                t += &format!(", signal {sig}");
            }
            t
        };
        let (ta, tb) = (status(x), status(y));
        if ta == tb {
            facts.push(Fact::new(
                format!("{name} exit"),
                FactVerdict::Identical,
                None,
            ));
        } else {
            let diff = format!("    {}: {ta}\n    {}: {tb}\n", a.label, b.label);
            let verdict = tolerate(FactVerdict::Divergent);
            let diff = (verdict == FactVerdict::Divergent).then_some(diff);
            facts.push(Fact::new(format!("{name} exit"), verdict, diff));
        }
        for (stream, oa, ob) in [
            ("stdout", &x.stdout, &y.stdout),
            ("stderr", &x.stderr, &y.stderr),
        ] {
            if oa.is_none() && ob.is_none() {
                continue;
            }
            let (verdict, diff) = output_verdict(a.label, b.label, oa, ob, rules);
            let verdict = tolerate(verdict);
            let diff = diff.filter(|_| verdict == FactVerdict::Divergent);
            facts.push(Fact::new(format!("{name} {stream}"), verdict, diff));
        }
    }
    facts
}

fn reason_or(reason: &str, default: &str) -> String {
    if reason.is_empty() {
        default.to_string()
    } else {
        reason.to_string()
    }
}

/// One output stream: identical, tolerated by the ignore rules that masked the difference, or
/// divergent with a visible diff of the masked texts.
fn output_verdict(
    la: &str,
    lb: &str,
    a: &Option<String>,
    b: &Option<String>,
    rules: &DiffRules,
) -> (FactVerdict, Option<String>) {
    let (a, b) = match (a, b) {
        (Some(a), Some(b)) => (a, b),
        _ => {
            let shown = |o: &Option<String>| o.as_ref().map_or("not recorded", |_| "recorded");
            let diff = format!("    {la}: {}\n    {lb}: {}\n", shown(a), shown(b));
            return (FactVerdict::Divergent, Some(diff));
        }
    };
    if a == b {
        return (FactVerdict::Identical, None);
    }
    let (mut ma, mut mb) = (a.clone(), b.clone());
    let mut applied = Vec::new();
    for (i, rule) in rules.ignore.iter().enumerate() {
        let na = rule.regex.0.replace_all(&ma, MASK).into_owned();
        let nb = rule.regex.0.replace_all(&mb, MASK).into_owned();
        if na != ma || nb != mb {
            applied.push((i, rule));
        }
        (ma, mb) = (na, nb);
    }
    if ma == mb {
        let rule = applied
            .iter()
            .map(|(i, r)| format!("diff.ignore[{i}] /{}/", r.regex.0.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        let reasons: Vec<&str> = applied
            .iter()
            .map(|(_, r)| r.reason.as_str())
            .filter(|r| !r.is_empty())
            .collect();
        let reason = if reasons.is_empty() {
            reason_or(&rules.reason, "masked by the scenario's [diff] ignore rule")
        } else {
            reasons.join("; ")
        };
        return (FactVerdict::Tolerated { rule, reason }, None);
    }
    let diff = labeled_line_diff(&ma, &mb, 20, (la, lb));
    (FactVerdict::Divergent, Some(diff))
}

/// The files under `fixtures` (relative paths): plain fixtures, and the kept overlays
/// (`disks/*.qcow2`).
fn fixture_files(fixtures: &Path) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut files = BTreeSet::new();
    walk(fixtures, "", &mut files);
    let (overlays, files) = files
        .into_iter()
        .partition(|f: &String| f.starts_with("disks/") && f.ends_with(".qcow2"));
    (files, overlays)
}

fn walk(dir: &Path, prefix: &str, out: &mut BTreeSet<String>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = format!("{prefix}{name}");
        match entry.file_type() {
            Ok(t) if t.is_dir() => walk(&entry.path(), &format!("{rel}/"), out),
            Ok(t) if t.is_file() => {
                out.insert(rel);
            }
            _ => {}
        }
    }
}

fn missing_diff(a: &RunSide, b: &RunSide, present: (bool, bool)) -> String {
    let has = |p: bool| if p { "present" } else { "missing" };
    format!(
        "    {}: {}\n    {}: {}\n",
        a.label,
        has(present.0),
        b.label,
        has(present.1)
    )
}

fn fixture_fact(a: &RunSide, b: &RunSide, rel: &str, in_a: bool, in_b: bool) -> Fact {
    let name = format!("fixture {rel}");
    if !(in_a && in_b) {
        let diff = missing_diff(a, b, (in_a, in_b));
        return Fact::new(name, FactVerdict::Divergent, Some(diff));
    }
    let (pa, pb) = (a.fixtures.join(rel), b.fixtures.join(rel));
    let (ha, hb) = match (sha256_file(&pa), sha256_file(&pb)) {
        (Ok(x), Ok(y)) => (x, y),
        (Err(e), _) => return unreadable(name, &pa, e),
        (_, Err(e)) => return unreadable(name, &pb, e),
    };
    if ha == hb {
        return Fact::new(name, FactVerdict::Identical, None);
    }
    let text = |p: &Path| {
        fs::metadata(p)
            .ok()
            .filter(|m| m.len() <= TEXT_DIFF_MAX)
            .and_then(|_| fs::read_to_string(p).ok())
    };
    let size = |p: &Path| fs::metadata(p).map_or(0, |m| m.len());
    let diff = match (text(&pa), text(&pb)) {
        (Some(x), Some(y)) => labeled_line_diff(&x, &y, 20, (a.label, b.label)),
        _ => format!(
            "    {}: sha256 {ha}, {} bytes\n    {}: sha256 {hb}, {} bytes\n",
            a.label,
            size(&pa),
            b.label,
            size(&pb)
        ),
    };
    Fact::new(name, FactVerdict::Divergent, Some(diff))
}

fn unreadable(name: String, path: &Path, e: io::Error) -> Fact {
    let why = format!("cannot read {}: {e}", path.display());
    Fact::new(name, FactVerdict::Inconclusive(why), None)
}

fn overlay_fact(
    a: &RunSide,
    b: &RunSide,
    rel: &str,
    present: (bool, bool),
    reader: &dyn OverlayReader,
    work: &Path,
) -> Fact {
    let name = format!("overlay {rel}");
    if !(present.0 && present.1) {
        let diff = missing_diff(a, b, present);
        return Fact::new(name, FactVerdict::Divergent, Some(diff));
    }
    let (pa, pb) = (a.fixtures.join(rel), b.fixtures.join(rel));
    match (reader.check(&pa), reader.check(&pb)) {
        (Ok(()), Ok(())) => {}
        (Err(OverlayError::Tool(t)), _) | (_, Err(OverlayError::Tool(t))) => {
            return Fact::new(name, FactVerdict::Inconclusive(t), None);
        }
        (Err(OverlayError::Bad(x)), Err(OverlayError::Bad(y))) => {
            let why = format!("both overlays fail the check: {x}; {y}");
            return Fact::new(name, FactVerdict::Inconclusive(why), None);
        }
        (ra, rb) => {
            let line = |r: &Result<(), OverlayError>| match r {
                Ok(()) => "checks clean".to_string(),
                Err(OverlayError::Bad(m) | OverlayError::Tool(m)) => m.clone(),
            };
            let diff = format!(
                "    {}: {}\n    {}: {}\n",
                a.label,
                line(&ra),
                b.label,
                line(&rb)
            );
            return Fact::new(name, FactVerdict::Divergent, Some(diff));
        }
    }
    let stem = rel.replace('/', "_");
    let (ra, rb) = (
        work.join(format!("a-{stem}.raw")),
        work.join(format!("b-{stem}.raw")),
    );
    let result = reader
        .flatten(&pa, &ra)
        .and_then(|()| reader.flatten(&pb, &rb))
        .map_err(|e| match e {
            OverlayError::Bad(m) | OverlayError::Tool(m) => m,
        })
        .and_then(|()| {
            first_difference(&ra, &rb).map_err(|e| format!("comparing flattened disks: {e}"))
        });
    let _ = fs::remove_file(&ra);
    let _ = fs::remove_file(&rb);
    match result {
        Err(why) => Fact::new(name, FactVerdict::Inconclusive(why), None),
        Ok(None) => Fact::new(name, FactVerdict::Identical, None),
        Ok(Some(d)) => {
            let diff = format!(
                "    flattened disks differ {d}\n    {}: {}\n    {}: {}\n",
                a.label,
                pa.display(),
                b.label,
                pb.display()
            );
            Fact::new(name, FactVerdict::Divergent, Some(diff))
        }
    }
}

/// Compares two files byte for byte; `Some` says where they first differ.
fn first_difference(a: &Path, b: &Path) -> io::Result<Option<String>> {
    let (la, lb) = (fs::metadata(a)?.len(), fs::metadata(b)?.len());
    if la != lb {
        return Ok(Some(format!("in size: {la} vs {lb} bytes")));
    }
    let (mut fa, mut fb) = (fs::File::open(a)?, fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut offset: u64 = 0;
    loop {
        let n = read_full(&mut fa, &mut ba)?;
        let m = read_full(&mut fb, &mut bb)?;
        let (ca, cb) = (&ba[..n], &bb[..m]);
        if let Some(i) = ca.iter().zip(cb).position(|(x, y)| x != y) {
            let at = offset + i as u64;
            return Ok(Some(format!("at byte {at} (0x{at:x})")));
        }
        if n != m {
            return Ok(Some(format!(
                "in length after byte {}",
                offset + n.min(m) as u64
            )));
        }
        if n == 0 {
            return Ok(None);
        }
        offset += n as u64;
    }
}

fn read_full(f: &mut fs::File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match f.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// A kept bundle read back: its result.json and fixtures/ directory.
#[derive(Debug, Clone)]
pub struct LoadedBundle {
    /// result.json.
    pub result: RunResult,
    /// fixtures/ (may not exist).
    pub fixtures: PathBuf,
}

/// Reads the bundle at `dir` (`<artifacts>/<scenario>/<run-id>` or `…/latest`).
pub fn load_bundle(dir: &Path) -> Result<LoadedBundle, LoadError> {
    let path = dir.join("result.json");
    let data = match fs::read(&path) {
        Ok(d) => d,
        Err(source) => return Err(LoadError::Read { path, source }),
    };
    let result: RunResult = match serde_json::from_slice(&data) {
        Ok(r) => r,
        Err(source) => return Err(LoadError::Parse { path, source }),
    };
    Ok(LoadedBundle {
        result,
        fixtures: dir.join("fixtures"),
    })
}
