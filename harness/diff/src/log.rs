//! `kiln diff img --log DIR`: every DIVERGENT and tolerated finding as one JSON file, and
//! `summary.json`, so a run on CI leaves the evidence behind: both tools' versions, the profile,
//! how the image was made, the operation and both outputs. Each file is written atomically
//! (temp file + rename): a reader never sees half of one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use kiln_img::Output;
use kiln_runner::artifacts::write_atomic;

use super::ops::{Finding, Report};
use super::rules::Verdict;

/// How the findings' images came to be, for the log.
#[derive(Debug, Clone, Default)]
pub struct Provenance {
    /// `--generate N` and `--seed S`, when the images were generated.
    pub generated: Option<(usize, u64)>,
    /// Per image path: the generator's recipe (what it was meant to exercise) and the commands
    /// that made it.
    pub recipes: HashMap<String, (String, Vec<String>)>,
}

/// A log file could not be written.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct LogError {
    /// The file (or the directory) that failed.
    pub path: PathBuf,
    /// The OS error.
    pub source: std::io::Error,
}

/// kiln's version and git revision.
fn kiln_version() -> Value {
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "git-rev": kiln_runner::git_rev(),
    })
}

fn output_json(o: &Output) -> Value {
    json!({"exit-code": o.code, "stdout": o.stdout, "stderr": o.stderr})
}

fn verdict_json(v: &Verdict) -> (&'static str, Value) {
    match v {
        Verdict::Tolerated { rule, reason } => {
            ("tolerated", json!({"rule": rule, "reason": reason}))
        }
        Verdict::Divergent => ("divergent", Value::Null),
        Verdict::Identical => ("identical", Value::Null),
        Verdict::Unsupported(x) => ("unsupported", json!({"reason": x})),
        Verdict::Inconclusive(x) => ("inconclusive", json!({"reason": x})),
    }
}

/// A file name for a finding: its index, the image's file name and the operation, in
/// characters any file system takes.
fn file_name(index: usize, f: &Finding) -> String {
    let image = Path::new(&f.image)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let (kind, _) = verdict_json(&f.verdict);
    format!("{index:05}-{kind}-{}-{}.json", clean(&image), clean(&f.op))
}

fn tools(report: &Report) -> Value {
    json!({
        "kiln": kiln_version(),
        "qemu-img": {
            "program": report.qemu_img,
            "version": report.version,
            "version-line": report.version_line,
        },
        "profile": report.profile.to_string(),
        "profile-from": if report.profile_given { "--profile" } else { "version" },
    })
}

fn write(path: PathBuf, v: &Value) -> Result<(), LogError> {
    let mut text = serde_json::to_string_pretty(v).unwrap_or_default();
    text.push('\n');
    write_atomic(&path, text.as_bytes()).map_err(|source| LogError { path, source })
}

/// Writes one file per tolerated or DIVERGENT finding of `report` into `dir` (created if
/// missing), then `summary.json`; returns how many finding files were written.
pub fn write_log(dir: &Path, report: &Report, prov: &Provenance) -> Result<usize, LogError> {
    std::fs::create_dir_all(dir).map_err(|source| LogError {
        path: dir.to_path_buf(),
        source,
    })?;
    let tools = tools(report);
    let mut written = 0;
    for (i, f) in report.findings.iter().enumerate() {
        if !matches!(f.verdict, Verdict::Divergent | Verdict::Tolerated { .. }) {
            continue;
        }
        let (verdict, detail) = verdict_json(&f.verdict);
        let (recipe, commands) = prov
            .recipes
            .get(&f.image)
            .map_or((None, None), |(r, c)| (Some(r), Some(c)));
        let (kiln, qemu) = f
            .outputs
            .as_deref()
            .map_or((Value::Null, Value::Null), |(k, q)| {
                (output_json(k), output_json(q))
            });
        let v = json!({
            "verdict": verdict,
            "tolerance": detail,
            "tools": tools,
            "image": {
                "path": f.image,
                "recipe": recipe,
                "made-by": commands,
            },
            "operation": {
                "name": f.op,
                "qemu-img-args": f.command,
            },
            "kiln": kiln,
            "qemu-img": qemu,
            "diff": f.diff,
        });
        write(dir.join(file_name(i, f)), &v)?;
        written += 1;
    }
    let sums = report.to_json()["summary"].clone();
    let count = |k: &str| sums[k].clone();
    let summary = json!({
        "tools": tools,
        "generate": prov.generated.map(|(n, _)| n),
        "seed": prov.generated.map(|(_, s)| s),
        "images": report
            .findings
            .iter()
            .map(|f| f.image.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        "identical": count("identical"),
        "tolerated": count("tolerated"),
        "divergent": count("divergent"),
        "unsupported": count("unsupported"),
        "inconclusive": count("inconclusive"),
        "finding-files": written,
        "notes": report.notes,
    });
    write(dir.join("summary.json"), &summary)?;
    Ok(written)
}
