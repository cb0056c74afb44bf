//! Running each operation with kiln (in process) and with qemu-img, and judging each pair.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::profile::{select, Detected, SelectError};
use super::rules::{judge, OpKind, Verdict};
use super::show::visible_diff;
use kiln_img::{self as img, chain, Output, Profile};

/// The operations `--ops` can select.
pub const ALL_OPS: &[&str] = &["info", "check", "map", "compare", "create", "convert"];

/// The operations run when `--ops` is not given (create and convert write two images per
/// operation and take longer; ask for them).
pub const DEFAULT_OPS: &[&str] = &["info", "check", "map", "compare"];

/// One compared operation.
#[derive(Debug, Clone)]
pub struct Finding {
    pub image: String,
    pub op: String,
    /// The qemu-img command compared (its arguments after `qemu-img`), for the record.
    pub command: Vec<String>,
    pub verdict: Verdict,
    pub diff: Option<String>,
    /// Both tools' outputs (kiln's, then qemu-img's), kept for tolerated and DIVERGENT
    /// findings only, for `--log`.
    pub outputs: Option<Box<(Output, Output)>>,
}

impl Finding {
    /// A judged pair: the diff for DIVERGENT, the outputs for anything not identical.
    pub fn judged(
        image: &str,
        op: String,
        command: Vec<String>,
        verdict: Verdict,
        kiln: &Output,
        qemu: &Output,
    ) -> Finding {
        let diff = (verdict == Verdict::Divergent).then(|| visible_diff(kiln, qemu));
        let keep = matches!(verdict, Verdict::Divergent | Verdict::Tolerated { .. });
        Finding {
            image: image.to_string(),
            op,
            command,
            verdict,
            diff,
            outputs: keep.then(|| Box::new((kiln.clone(), qemu.clone()))),
        }
    }

    /// An operation that could not be compared, and why.
    pub fn inconclusive(image: &str, op: String, command: Vec<String>, why: String) -> Finding {
        Finding {
            image: image.to_string(),
            op,
            command,
            verdict: Verdict::Inconclusive(why),
            diff: None,
            outputs: None,
        }
    }
}

/// The qemu-img compared with: its version and the profile its output is judged by.
#[derive(Debug, Clone)]
pub struct Target {
    /// The program as given (`qemu-img`, or a path).
    pub qemu_img: String,
    /// Its version, `None` when it could not be run (then nothing is compared).
    pub detected: Option<Detected>,
    pub profile: Profile,
    /// Whether the profile was asked for (`--profile`) rather than picked from the version.
    pub profile_given: bool,
    /// Why qemu-img is unavailable, when it is.
    pub unavailable: Option<String>,
}

impl Target {
    /// Runs `qemu_img --version` and settles the profile: its version's, which `requested` must
    /// equal when given. A qemu-img that cannot be run is not an error here: the report then
    /// says it is missing and every operation is inconclusive.
    pub fn detect(qemu_img: &str, requested: Option<Profile>) -> Result<Target, SelectError> {
        match super::profile::detect(qemu_img) {
            Ok(d) => Ok(Target {
                qemu_img: qemu_img.to_string(),
                profile: select(qemu_img, &d, requested)?,
                detected: Some(d),
                profile_given: requested.is_some(),
                unavailable: None,
            }),
            Err(e) => Ok(Target {
                qemu_img: qemu_img.to_string(),
                detected: None,
                profile: requested.unwrap_or(Profile::newest()),
                profile_given: requested.is_some(),
                unavailable: Some(e.to_string()),
            }),
        }
    }
}

/// Everything one `kiln diff img` run found.
#[derive(Debug, Clone)]
pub struct Report {
    pub qemu_img: String,
    pub version: Option<String>,
    /// The first line of `qemu-img --version`.
    pub version_line: Option<String>,
    pub profile: Profile,
    /// Whether the profile was asked for rather than picked from the version.
    pub profile_given: bool,
    pub notes: Vec<String>,
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn count(&self, f: impl Fn(&Verdict) -> bool) -> usize {
        self.findings.iter().filter(|x| f(&x.verdict)).count()
    }
    pub fn divergent(&self) -> usize {
        self.count(|v| *v == Verdict::Divergent)
    }

    /// The machine-readable report (`--json`).
    pub fn to_json(&self) -> Value {
        json!({
            "qemu-img": self.qemu_img,
            "version": self.version,
            "version-line": self.version_line,
            "profile": self.profile.to_string(),
            "profile-from": if self.profile_given { "--profile" } else { "version" },
            "notes": self.notes,
            "summary": {
                "identical": self.count(|v| *v == Verdict::Identical),
                "tolerated": self.count(|v| matches!(v, Verdict::Tolerated { .. })),
                "unsupported": self.count(|v| matches!(v, Verdict::Unsupported(_))),
                "inconclusive": self.count(|v| matches!(v, Verdict::Inconclusive(_))),
                "divergent": self.divergent(),
            },
            "findings": self.findings.iter().map(|f| {
                let (verdict, rule, reason) = match &f.verdict {
                    Verdict::Identical => ("identical", None, None),
                    Verdict::Tolerated { rule, reason } => ("tolerated", Some(*rule), Some(reason.to_string())),
                    Verdict::Unsupported(x) => ("unsupported", None, Some(x.clone())),
                    Verdict::Inconclusive(x) => ("inconclusive", None, Some(x.clone())),
                    Verdict::Divergent => ("divergent", None, None),
                };
                json!({"image": f.image, "op": f.op, "verdict": verdict, "rule": rule,
                       "reason": reason, "diff": f.diff})
            }).collect::<Vec<_>>(),
        })
    }

    /// One line per non-identical finding, then a summary.
    pub fn to_text(&self, verbose: bool) -> String {
        let mut s = String::new();
        for n in &self.notes {
            s.push_str(&format!("note: {n}\n"));
        }
        for f in &self.findings {
            if f.verdict == Verdict::Identical && !verbose {
                continue;
            }
            s.push_str(&format!("{:<9} {}  {}\n", f.op, f.image, f.verdict.label()));
            if let Some(d) = &f.diff {
                s.push_str(d);
            }
        }
        s.push_str(&format!(
            "kiln diff img: qemu-img {} (profile {}{}): {} identical, {} tolerated, \
             {} unsupported, {} inconclusive, {} DIVERGENT\n",
            self.version.as_deref().unwrap_or("missing"),
            self.profile,
            if self.profile_given || self.version.is_none() {
                ""
            } else {
                ", from its version"
            },
            self.count(|v| *v == Verdict::Identical),
            self.count(|v| matches!(v, Verdict::Tolerated { .. })),
            self.count(|v| matches!(v, Verdict::Unsupported(_))),
            self.count(|v| matches!(v, Verdict::Inconclusive(_))),
            self.divergent()
        ));
        s
    }
}

/// Why qemu-img gave no answer to compare.
#[derive(Debug, thiserror::Error)]
pub enum QemuImgError {
    /// It could not be started.
    #[error("{qemu_img}: {source}")]
    Spawn {
        /// The program.
        qemu_img: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// It ran past its limit and was killed.
    #[error("qemu-img {args} timed out")]
    TimedOut {
        /// Its arguments, space-separated.
        args: String,
    },
    /// Waiting for it failed.
    #[error(transparent)]
    Wait(std::io::Error),
}

/// Runs qemu-img with `args`, killing it after `limit`.
pub fn run_qemu_img(
    qemu_img: &str,
    args: &[&str],
    limit: Duration,
) -> Result<Output, QemuImgError> {
    let mut child = Command::new(qemu_img)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| QemuImgError::Spawn {
            qemu_img: qemu_img.to_string(),
            source,
        })?;
    let mut out_pipe = child.stdout.take();
    let mut err_pipe = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut o = String::new();
        if let Some(p) = out_pipe.as_mut() {
            let _ = p.read_to_string(&mut o);
        }
        o
    });
    let mut stderr = String::new();
    if let Some(p) = err_pipe.as_mut() {
        let _ = p.read_to_string(&mut stderr);
    }
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(QemuImgError::TimedOut {
                    args: args.join(" "),
                });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => return Err(QemuImgError::Wait(e)),
        }
    };
    let stdout = reader.join().unwrap_or_default();
    Ok(Output {
        stdout,
        stderr,
        code: status.code().unwrap_or(-1),
    })
}

/// One operation: its name, kind, qemu-img arguments, and the in-process kiln call.
type Op<'a> = (String, OpKind, Vec<&'a str>, Box<dyn Fn() -> Output + 'a>);

/// The operations for one image.
fn ops_for<'a>(
    image: &'a str,
    other: Option<&'a str>,
    ops: &[String],
    profile: Profile,
) -> Vec<Op<'a>> {
    let mut v: Vec<Op<'a>> = Vec::new();
    let want = |o: &str| ops.iter().any(|x| x == o);
    if want("info") {
        v.push((
            "info".into(),
            OpKind::InfoHuman,
            vec!["info", image],
            Box::new(move || img::info(image, false, false, profile)),
        ));
        v.push((
            "info-json".into(),
            OpKind::InfoJson,
            vec!["info", "--output=json", image],
            Box::new(move || img::info(image, true, false, profile)),
        ));
        v.push((
            "info-chain".into(),
            OpKind::InfoHuman,
            vec!["info", "--backing-chain", image],
            Box::new(move || img::info(image, false, true, profile)),
        ));
        v.push((
            "info-chain-json".into(),
            OpKind::InfoJson,
            vec!["info", "--backing-chain", "--output=json", image],
            Box::new(move || img::info(image, true, true, profile)),
        ));
    }
    if want("check") {
        v.push((
            "check".into(),
            OpKind::Check,
            vec!["check", image],
            Box::new(move || img::check(image, false)),
        ));
        v.push((
            "check-json".into(),
            OpKind::CheckJson,
            vec!["check", "--output=json", image],
            Box::new(move || img::check(image, true)),
        ));
    }
    if want("map") {
        v.push((
            "map-json".into(),
            OpKind::MapJson,
            vec!["map", "--output=json", image],
            Box::new(move || img::map(image, true, profile)),
        ));
        v.push((
            "map".into(),
            OpKind::MapHuman,
            vec!["map", image],
            Box::new(move || img::map(image, false, profile)),
        ));
    }
    if want("compare") {
        let b = other.unwrap_or(image);
        v.push((
            "compare".into(),
            OpKind::Compare,
            vec!["compare", image, b],
            Box::new(move || img::compare(image, b, false, profile)),
        ));
        v.push((
            "compare-s".into(),
            OpKind::Compare,
            vec!["compare", "-s", image, b],
            Box::new(move || img::compare(image, b, true, profile)),
        ));
    }
    v
}

/// Why an image cannot be compared at all (unreadable, corrupt header, backing loop).
fn inconclusive_reason(image: &str) -> Option<String> {
    match chain::resolve_chain(image) {
        Ok(_) => None,
        Err(e @ img::ImgError::Unsupported { .. }) => {
            // The header parsed; data operations report unsupported per op.
            let _ = e;
            None
        }
        Err(e) => Some(e.to_string()),
    }
}

/// Diffs `images` (each compared with the next one for `compare`) against `target`.
pub fn diff_images(target: &Target, images: &[String], ops: &[String]) -> Report {
    let qemu_img = target.qemu_img.as_str();
    let profile = target.profile;
    let version = target.detected.as_ref().map(|d| d.version.clone());
    let notes: Vec<String> = target
        .unavailable
        .iter()
        .map(|e| format!("qemu-img unavailable: {e}"))
        .collect();
    let mut findings = Vec::new();
    for (i, image) in images.iter().enumerate() {
        let other = images.get(i + 1).map(String::as_str);
        let bad = if version.is_none() {
            Some("qemu-img missing".to_string())
        } else if !Path::new(image).exists() {
            Some(format!("{image}: no such file"))
        } else {
            inconclusive_reason(image).or_else(|| {
                other
                    .and_then(inconclusive_reason)
                    .map(|r| format!("compare partner: {r}"))
            })
        };
        if bad
            .as_deref()
            .is_none_or(|r| r.starts_with("compare partner"))
        {
            if ops.iter().any(|o| o == "create") {
                findings.extend(super::produce::create_findings(qemu_img, image, i, profile));
            }
            if ops.iter().any(|o| o == "convert") {
                findings.extend(super::produce::convert_findings(qemu_img, image, profile));
            }
        }
        for (name, kind, args, kiln) in ops_for(image, other, ops, profile) {
            let command: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            let inconclusive = match &bad {
                Some(r) if name.starts_with("compare") || !r.starts_with("compare partner") => {
                    Some(r.clone())
                }
                _ => None,
            };
            if let Some(reason) = inconclusive {
                findings.push(Finding::inconclusive(image, name, command, reason));
                continue;
            }
            let q = match run_qemu_img(qemu_img, &args, Duration::from_secs(60)) {
                Ok(q) => q,
                Err(e) => {
                    findings.push(Finding::inconclusive(image, name, command, e.to_string()));
                    continue;
                }
            };
            let k = kiln();
            let verdict = judge(kind, &k, &q, profile);
            findings.push(Finding::judged(image, name, command, verdict, &k, &q));
        }
    }
    Report {
        qemu_img: qemu_img.to_string(),
        version,
        version_line: target.detected.as_ref().map(|d| d.version_line.clone()),
        profile,
        profile_given: target.profile_given,
        notes,
        findings,
    }
}
