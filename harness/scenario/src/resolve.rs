//! From the file as written to a checked [`Scenario`]: defaults merged, paths resolved against
//! the file that named them, regexes compiled, and every problem reported with its place.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::de::DeserializeOwned;
use toml::Spanned;

use super::error::{explain_serde_message, ScenarioError, SourceFile};
use super::raw::*;
use super::*;

/// A parsed defaults file and its text (for positions of the values it supplies).
#[derive(Debug)]
pub struct DefaultsSource {
    source: SourceFile,
    raw: RawDefaults,
    artifacts_max_size: Option<u64>,
}

impl DefaultsSource {
    /// The file these defaults were read from.
    pub fn path(&self) -> &Path {
        &self.source.path
    }

    /// `[artifacts] max_size`: the artifacts dir's budget in bytes, if set.
    pub fn artifacts_max_size(&self) -> Option<u64> {
        self.artifacts_max_size
    }
}

/// Reads the defaults file of `dir`, if it has one.
pub fn load_defaults(dir: &Path) -> Result<Option<DefaultsSource>, ScenarioError> {
    for name in DEFAULTS_FILES {
        let path = dir.join(name);
        if !path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|e| ScenarioError {
            file: path.clone(),
            position: None,
            field: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        let source = SourceFile { path, text };
        let file: RawDefaultsFile = deserialize(&source)?;
        let artifacts_max_size = file.artifacts.max_size.map(|s| s.into_inner().0);
        return Ok(Some(DefaultsSource {
            source,
            raw: file.defaults,
            artifacts_max_size,
        }));
    }
    Ok(None)
}

/// Deserializes a TOML document, turning errors into one-line errors with position and field.
fn deserialize<T: DeserializeOwned>(source: &SourceFile) -> Result<T, ScenarioError> {
    let de = toml::Deserializer::parse(&source.text)
        .map_err(|e| source.error(e.span(), "", explain_serde_message(e.message())))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        // toml's Spanned<T> shows up as a private field name in the path: drop it.
        let field = match e.path().to_string() {
            p if p == "." => String::new(),
            p => p.replace(".$__serde_spanned_private_value", ""),
        };
        let inner = e.into_inner();
        source.error(inner.span(), field, explain_serde_message(inner.message()))
    })
}

/// A value and the file it came from (the scenario or its defaults).
type Located<'a, T> = (&'a Spanned<T>, &'a SourceFile);

/// The scenario's own value if set, else the defaults' value.
fn pick<'a, T>(
    own: &'a Option<Spanned<T>>,
    own_src: &'a SourceFile,
    default: Option<(&'a Option<Spanned<T>>, &'a SourceFile)>,
) -> Option<Located<'a, T>> {
    if let Some(v) = own {
        return Some((v, own_src));
    }
    let (v, src) = default?;
    v.as_ref().map(|v| (v, src))
}

/// Parses and checks one scenario file; returns it and the position of its `id`.
pub fn parse_scenario(
    source: &SourceFile,
    defaults: Option<&DefaultsSource>,
) -> Result<(Scenario, (usize, usize)), Vec<ScenarioError>> {
    let raw: RawScenario = deserialize(source).map_err(|e| vec![e])?;
    let mut cx = Checker { errors: Vec::new() };
    let scenario = cx.scenario(source, raw, defaults);
    match scenario {
        Some(s) if cx.errors.is_empty() => Ok(s),
        _ => Err(cx.errors),
    }
}

struct Checker {
    errors: Vec<ScenarioError>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    File,
    Dir,
}

impl Checker {
    fn err(&mut self, src: &SourceFile, span: std::ops::Range<usize>, field: &str, msg: String) {
        self.errors.push(src.error(Some(span), field, msg));
    }

    fn scenario(
        &mut self,
        src: &SourceFile,
        raw: RawScenario,
        defaults: Option<&DefaultsSource>,
    ) -> Option<(Scenario, (usize, usize))> {
        let d = defaults.map(|d| (&d.raw, &d.source));
        let id_pos = src.line_col(raw.id.span().start);
        let id = raw.id.get_ref().clone();
        if id.is_empty()
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            self.err(
                src,
                raw.id.span(),
                "id",
                format!("invalid id {id:?}: use letters, digits, `.`, `_` and `-`"),
            );
        }
        let timeout = pick(&raw.timeout, src, d.map(|(r, s)| (&r.timeout, s)))
            .map_or(DEFAULT_SCENARIO_TIMEOUT, |(v, _)| v.get_ref().0);
        let fixtures_limit = pick(
            &raw.fixtures_limit,
            src,
            d.map(|(r, s)| (&r.fixtures_limit, s)),
        )
        .map_or(DEFAULT_FIXTURES_LIMIT, |(v, _)| v.get_ref().0);
        let backends = pick(&raw.backends, src, d.map(|(r, s)| (&r.backends, s)));
        let backends = match backends {
            Some((b, bsrc)) if b.get_ref().is_empty() => {
                self.err(
                    bsrc,
                    b.span(),
                    "backends",
                    "empty list: name at least one of \"kiln\", \"qemu\" or leave it out".into(),
                );
                Vec::new()
            }
            Some((b, _)) => b
                .get_ref()
                .iter()
                .map(|b| match b {
                    BackendName::Kiln => BackendKind::Kiln,
                    BackendName::Qemu => BackendKind::Qemu,
                })
                .collect(),
            None => Vec::new(),
        };
        let guest = self.guest(src, &raw.guest, d.map(|(r, s)| (&r.guest, s)));
        let disks = self.disks(src, &raw.disks);
        let shares = self.shares(src, raw.shares.as_deref());
        let readiness = match (
            &raw.readiness,
            d.and_then(|(r, s)| Some((r.readiness.as_ref()?, s))),
        ) {
            (Some(r), _) => self.readiness(src, r),
            (None, Some((r, dsrc))) => self.readiness(dsrc, r),
            (None, None) => Readiness {
                timeout: DEFAULT_READY_TIMEOUT,
                kind: ReadinessKind::Agent,
            },
        };
        let step_defaults = d.map(|(r, s)| (&r.steps, s));
        let steps: Vec<Step> = raw
            .steps
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.step(src, i, s, step_defaults))
            .collect();
        let diff = match &raw.diff {
            Some(d) => self.diff(src, d, &steps),
            None => DiffRules::default(),
        };
        let files = raw
            .expect
            .files
            .iter()
            .enumerate()
            .filter_map(|(i, f)| self.file_expect(src, i, f))
            .collect();
        let scenario = Scenario {
            id,
            description: raw.description.unwrap_or_default(),
            file: src.path.clone(),
            timeout,
            fixtures_limit,
            snapshot: raw.snapshot.unwrap_or(true),
            backends,
            guest: guest?,
            disks,
            shares,
            readiness,
            steps,
            expect: Expect { files },
            diff,
        };
        Some((scenario, id_pos))
    }

    /// `[diff]`: compiles the ignore regexes and resolves `ignore_steps` to step indices.
    fn diff(&mut self, src: &SourceFile, raw: &RawDiff, steps: &[Step]) -> DiffRules {
        let mut rules = DiffRules {
            reason: raw.reason.clone().unwrap_or_default(),
            ..DiffRules::default()
        };
        for (i, entry) in raw.ignore.iter().enumerate() {
            let field = format!("diff.ignore[{i}]");
            let (regex, reason) = match entry.get_ref() {
                RawIgnore::Regex(r) => (r, None),
                RawIgnore::Rule { regex, reason } => (regex, reason.as_ref()),
            };
            let spanned = Spanned::new(entry.span(), regex.clone());
            if regex.is_empty() {
                self.err(
                    src,
                    entry.span(),
                    &field,
                    "empty regex: it would match everywhere and hide every output".into(),
                );
                continue;
            }
            if let Some(p) = self.regex(src, &spanned, &field) {
                rules.ignore.push(IgnoreRule {
                    regex: p,
                    reason: reason.cloned().unwrap_or_default(),
                });
            }
        }
        for (i, entry) in raw.ignore_steps.iter().enumerate() {
            let field = format!("diff.ignore_steps[{i}]");
            let index = match entry.get_ref() {
                RawStepRef::Index(n) => usize::try_from(*n).ok().filter(|n| *n < steps.len()),
                RawStepRef::Name(name) => steps.iter().position(|s| &s.name == name),
            };
            match index {
                Some(n) if !rules.ignore_steps.contains(&n) => rules.ignore_steps.push(n),
                Some(n) => self.err(
                    src,
                    entry.span(),
                    &field,
                    format!("step {n} is listed twice"),
                ),
                None => {
                    let what = match entry.get_ref() {
                        RawStepRef::Index(n) => format!("no step {n}"),
                        RawStepRef::Name(name) => format!("no step named {name:?}"),
                    };
                    let msg = format!(
                        "{what}: name a step by its index (0 to {}) or its name",
                        steps.len().saturating_sub(1)
                    );
                    self.err(src, entry.span(), &field, msg);
                }
            }
        }
        rules
    }

    /// Resolves a host path against the file that named it and checks it exists as `want`.
    fn host_path(
        &mut self,
        src: &SourceFile,
        value: &Spanned<String>,
        field: &str,
        want: Want,
    ) -> Option<PathBuf> {
        let given = value.get_ref();
        let path = src.dir().join(given);
        let ok = match want {
            Want::File => path.is_file(),
            Want::Dir => path.is_dir(),
        };
        // A file that exists but cannot be opened (its mode, an ACL, a dead mount) is the
        // scenario's error too, found here before anything boots rather than by the backend.
        let unreadable = match want {
            Want::File if ok => std::fs::File::open(&path).err(),
            _ => None,
        };
        if let Some(e) = unreadable {
            self.err(
                src,
                value.span(),
                field,
                format!(
                    "file {given:?} cannot be read: {e} (looked at {})",
                    path.display()
                ),
            );
            return None;
        }
        if ok {
            // Absolute, so it means the same file to a backend in another directory (QEMU
            // resolves a relative backing file against the overlay's directory).
            return Some(std::path::absolute(&path).unwrap_or(path));
        }
        let what = match want {
            Want::File => "file",
            Want::Dir => "directory",
        };
        let why = if path.exists() {
            format!("is not a {what}")
        } else {
            "does not exist".to_string()
        };
        self.err(
            src,
            value.span(),
            field,
            format!("{what} {given:?} {why} (looked at {})", path.display()),
        );
        None
    }

    fn guest(
        &mut self,
        src: &SourceFile,
        raw: &RawGuest,
        d: Option<(&RawGuest, &SourceFile)>,
    ) -> Option<GuestSpec> {
        let kernel = match pick(&raw.kernel, src, d.map(|(g, s)| (&g.kernel, s))) {
            None => ImageRef::Default,
            Some((k, _)) if k.get_ref() == "default" => ImageRef::Default,
            Some((k, ksrc)) if k.get_ref().starts_with(REGISTRY_SCHEME) => {
                match registry_reference(k.get_ref()) {
                    Ok(()) => ImageRef::Registry(k.get_ref().clone()),
                    Err(why) => {
                        self.err(ksrc, k.span(), "guest.kernel", why);
                        return None;
                    }
                }
            }
            Some((k, ksrc)) => {
                ImageRef::Path(self.host_path(ksrc, k, "guest.kernel", Want::File)?)
            }
        };
        let initrd = match pick(&raw.initrd, src, d.map(|(g, s)| (&g.initrd, s))) {
            None => None,
            Some((i, _)) if i.get_ref() == "default" => None,
            Some((i, isrc)) if kernel == ImageRef::Default => {
                self.err(
                    isrc,
                    i.span(),
                    "guest.initrd",
                    "the default guest brings its own initrd; set guest.kernel too or leave initrd out"
                        .into(),
                );
                None
            }
            Some((i, isrc)) if matches!(kernel, ImageRef::Registry(_)) => {
                self.err(
                    isrc,
                    i.span(),
                    "guest.initrd",
                    "a registry guest brings its own initrd; leave initrd out".into(),
                );
                None
            }
            Some((i, isrc)) => Some(self.host_path(isrc, i, "guest.initrd", Want::File)?),
        };
        let memory = match pick(&raw.memory, src, d.map(|(g, s)| (&g.memory, s))) {
            Some((m, msrc)) if *m.get_ref() < 16 => {
                let msg = format!("{} MiB is too small: at least 16", m.get_ref());
                self.err(msrc, m.span(), "guest.memory", msg);
                DEFAULT_MEMORY_MIB
            }
            Some((m, _)) => *m.get_ref(),
            None => DEFAULT_MEMORY_MIB,
        };
        let vcpus = match pick(&raw.vcpus, src, d.map(|(g, s)| (&g.vcpus, s))) {
            Some((v, vsrc)) if *v.get_ref() == 0 => {
                self.err(vsrc, v.span(), "guest.vcpus", "0 vCPUs: at least 1".into());
                1
            }
            Some((v, _)) => *v.get_ref(),
            None => 1,
        };
        let cmdline = [d.and_then(|(g, _)| g.cmdline.clone()), raw.cmdline.clone()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" ");
        Some(GuestSpec {
            kernel,
            initrd,
            memory,
            vcpus,
            cmdline,
        })
    }

    fn disks(&mut self, src: &SourceFile, raw: &[Spanned<RawDisk>]) -> Vec<DiskSpec> {
        let mut names = BTreeSet::new();
        let mut out = Vec::new();
        for (i, disk) in raw.iter().enumerate() {
            let field = format!("disks[{i}]");
            let name = match &disk.get_ref().name {
                Some(n) => {
                    if !valid_name(n.get_ref()) {
                        let msg = format!(
                            "invalid name {:?}: use letters, digits, `_`, `-`",
                            n.get_ref()
                        );
                        self.err(src, n.span(), &format!("{field}.name"), msg);
                    }
                    n.get_ref().clone()
                }
                None => format!("disk{i}"),
            };
            if !names.insert(name.clone()) {
                self.err(
                    src,
                    disk.span(),
                    &field,
                    format!("duplicate disk name `{name}`"),
                );
            }
            let d = disk.get_ref();
            let Some(base) = self.host_path(src, &d.base, &format!("{field}.base"), Want::File)
            else {
                continue;
            };
            let format = match d.format {
                Some(DiskFormatName::Raw) => DiskFormat::Raw,
                Some(DiskFormatName::Qcow2) => DiskFormat::Qcow2,
                None if base.extension().is_some_and(|e| e == "qcow2") => DiskFormat::Qcow2,
                None => DiskFormat::Raw,
            };
            out.push(DiskSpec {
                name,
                base,
                format,
                keep: d.keep,
            });
        }
        out
    }

    fn shares(&mut self, src: &SourceFile, raw: Option<&[Spanned<RawShare>]>) -> Vec<ShareSpec> {
        let output = ShareSpec {
            tag: DEFAULT_SHARE_TAG.into(),
            host: None,
            mount: format!("/mnt/{DEFAULT_SHARE_TAG}"),
            readonly: false,
        };
        let Some(raw) = raw else {
            return vec![output];
        };
        let mut tags = BTreeSet::new();
        let mut out = Vec::new();
        for (i, share) in raw.iter().enumerate() {
            let field = format!("shares[{i}]");
            let s = share.get_ref();
            let tag = s.tag.get_ref().clone();
            // 9p mount tags are limited to 31 bytes; virtio-fs tags to 36.
            if !valid_name(&tag) || tag.len() > 31 {
                let msg = format!("invalid tag {tag:?}: 1-31 letters, digits, `_`, `-`");
                self.err(src, s.tag.span(), &format!("{field}.tag"), msg);
            } else if !tags.insert(tag.clone()) {
                let msg = format!("duplicate tag `{tag}`");
                self.err(src, s.tag.span(), &format!("{field}.tag"), msg);
            }
            let mount = match &s.mount {
                Some(m)
                    if !m.get_ref().starts_with('/')
                        || m.get_ref().contains(char::is_whitespace) =>
                {
                    let msg = format!(
                        "mount point {:?} must be an absolute guest path without spaces",
                        m.get_ref()
                    );
                    self.err(src, m.span(), &format!("{field}.mount"), msg);
                    continue;
                }
                Some(m) => m.get_ref().clone(),
                None => format!("/mnt/{tag}"),
            };
            let host = match &s.host {
                Some(h) => match self.host_path(src, h, &format!("{field}.host"), Want::Dir) {
                    Some(p) => Some(p),
                    None => continue,
                },
                None => None,
            };
            out.push(ShareSpec {
                tag,
                host,
                mount,
                readonly: matches!(s.mode, Some(ShareModeName::Ro)),
            });
        }
        // Declaring shares keeps the default `output` share, unless a share takes its tag or
        // its mount point (then that share is the scenario's own choice).
        if !out
            .iter()
            .any(|s| s.tag == output.tag || s.mount == output.mount)
            && !tags.contains(DEFAULT_SHARE_TAG)
        {
            out.push(output);
        }
        out
    }

    fn regex(&mut self, src: &SourceFile, value: &Spanned<String>, field: &str) -> Option<Pattern> {
        match Regex::new(value.get_ref()) {
            Ok(r) => Some(Pattern(r)),
            Err(e) => {
                let text = e.to_string();
                let why = text
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("error: "))
                    .unwrap_or(text.lines().last().unwrap_or("invalid"))
                    .to_string();
                let msg = format!("invalid regex {:?}: {why}", value.get_ref());
                self.err(src, value.span(), field, msg);
                None
            }
        }
    }

    fn readiness(&mut self, src: &SourceFile, raw: &Spanned<RawReadiness>) -> Readiness {
        let r = raw.get_ref();
        let timeout = r
            .timeout
            .as_ref()
            .map_or(DEFAULT_READY_TIMEOUT, |t| t.get_ref().0);
        let kind = match (&r.marker, &r.sequence) {
            (Some(_), Some(_)) => {
                let msg = "set either `marker` or `sequence`, not both".to_string();
                self.err(src, raw.span(), "readiness", msg);
                ReadinessKind::Agent
            }
            (Some(m), None) => match self.regex(src, m, "readiness.marker") {
                Some(p) => ReadinessKind::Marker(p),
                None => ReadinessKind::Agent,
            },
            (None, Some(seq)) if seq.is_empty() => {
                let msg = "empty sequence: list at least one marker".to_string();
                self.err(src, raw.span(), "readiness.sequence", msg);
                ReadinessKind::Agent
            }
            (None, Some(seq)) => {
                let markers = seq
                    .iter()
                    .enumerate()
                    .filter_map(|(i, m)| {
                        let field = format!("readiness.sequence[{i}].marker");
                        let marker = self.regex(src, &m.get_ref().marker, &field)?;
                        Some(SequenceMarker {
                            marker,
                            timeout: m.get_ref().timeout.as_ref().map(|t| t.get_ref().0),
                        })
                    })
                    .collect();
                ReadinessKind::Sequence(markers)
            }
            (None, None) => ReadinessKind::Agent,
        };
        Readiness { timeout, kind }
    }

    fn step(
        &mut self,
        src: &SourceFile,
        index: usize,
        raw: &Spanned<RawStep>,
        defaults: Option<(&RawStepDefaults, &SourceFile)>,
    ) -> Option<Step> {
        let field = format!("steps[{index}]");
        let s = raw.get_ref();
        let actions = [
            s.run.is_some(),
            s.shell.is_some(),
            s.put.is_some(),
            s.get.is_some(),
            s.wait_console.is_some(),
        ];
        if actions.iter().filter(|a| **a).count() != 1 {
            let msg = "a step needs exactly one of `run`, `shell`, `put`, `get`, `wait_console`";
            self.err(src, raw.span(), &field, msg.into());
            return None;
        }
        let is_command = s.run.is_some() || s.shell.is_some();
        let command_only = [
            ("env", s.env.is_some()),
            ("cwd", s.cwd.is_some()),
            ("stdin", s.stdin.is_some()),
            ("exit_code", s.exit_code.is_some()),
            ("stdout_contains", s.stdout_contains.is_some()),
            ("stdout_regex", s.stdout_regex.is_some()),
            ("stderr_contains", s.stderr_contains.is_some()),
            ("stderr_regex", s.stderr_regex.is_some()),
        ];
        if !is_command {
            if let Some((name, _)) = command_only.iter().find(|(_, set)| *set) {
                let msg = format!("`{name}` applies only to `run` and `shell` steps");
                self.err(src, raw.span(), &format!("{field}.{name}"), msg);
            }
        }
        let timeout = s
            .timeout
            .as_ref()
            .map(|t| t.get_ref().0)
            .or_else(|| defaults.and_then(|(d, _)| d.timeout.as_ref().map(|t| t.get_ref().0)))
            .unwrap_or(DEFAULT_STEP_TIMEOUT);
        let (action, summary) = if let Some(argv) = &s.run {
            if argv.get_ref().is_empty() {
                self.err(
                    src,
                    argv.span(),
                    &format!("{field}.run"),
                    "empty argv".into(),
                );
                return None;
            }
            let summary = argv.get_ref().join(" ");
            (
                self.run_step(src, &field, s, argv.get_ref().clone(), defaults)?,
                summary,
            )
        } else if let Some(script) = &s.shell {
            let argv = vec!["/bin/sh".into(), "-c".into(), script.get_ref().clone()];
            let first = script.get_ref().lines().next().unwrap_or("").to_string();
            (
                self.run_step(src, &field, s, argv, defaults)?,
                format!("sh: {first}"),
            )
        } else if let Some(put) = &s.put {
            let p = put.get_ref();
            let host = match (&p.src, &p.content) {
                (Some(f), None) => {
                    Some(self.host_path(src, f, &format!("{field}.put.src"), Want::File)?)
                }
                (None, Some(_)) => None,
                _ => {
                    let msg = "`put` needs exactly one of `src` (host file) or `content`";
                    self.err(src, put.span(), &format!("{field}.put"), msg.into());
                    return None;
                }
            };
            let dest = self.guest_path(src, &p.dest, &format!("{field}.put.dest"))?;
            let summary = format!("put {dest}");
            let action = StepAction::Put {
                src: host,
                content: p.content.clone(),
                dest,
                mode: p.mode.unwrap_or(0o644),
            };
            (action, summary)
        } else if let Some(get) = &s.get {
            let g = get.get_ref();
            let from = self.guest_path(src, &g.src, &format!("{field}.get.src"))?;
            let dest = match &g.dest {
                Some(d) => self.relative_path(src, d, &format!("{field}.get.dest"))?,
                None => Path::new(&from)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "file".into()),
            };
            let summary = format!("get {from}");
            (StepAction::Get { src: from, dest }, summary)
        } else if let Some(marker) = &s.wait_console {
            let pattern = self.regex(src, marker, &format!("{field}.wait_console"))?;
            let summary = format!("wait_console /{}/", marker.get_ref());
            (StepAction::WaitConsole(pattern), summary)
        } else {
            return None;
        };
        let mut name = s.name.clone().unwrap_or(summary);
        if name.chars().count() > 60 {
            name = name.chars().take(57).collect::<String>() + "...";
        }
        Some(Step {
            name,
            action,
            timeout,
        })
    }

    fn run_step(
        &mut self,
        src: &SourceFile,
        field: &str,
        s: &RawStep,
        argv: Vec<String>,
        defaults: Option<(&RawStepDefaults, &SourceFile)>,
    ) -> Option<StepAction> {
        let mut env: BTreeMap<String, String> =
            defaults.map(|(d, _)| d.env.clone()).unwrap_or_default();
        env.extend(s.env.clone().unwrap_or_default());
        let stdout_regex = match &s.stdout_regex {
            Some(r) => Some(self.regex(src, r, &format!("{field}.stdout_regex"))?),
            None => None,
        };
        let stderr_regex = match &s.stderr_regex {
            Some(r) => Some(self.regex(src, r, &format!("{field}.stderr_regex"))?),
            None => None,
        };
        Some(StepAction::Run(Box::new(RunStep {
            argv,
            env,
            cwd: s.cwd.clone(),
            stdin: s.stdin.clone().unwrap_or_default(),
            exit_code: s.exit_code.unwrap_or(0),
            stdout_contains: s
                .stdout_contains
                .as_ref()
                .map(|v| v.to_vec())
                .unwrap_or_default(),
            stdout_regex,
            stderr_contains: s
                .stderr_contains
                .as_ref()
                .map(|v| v.to_vec())
                .unwrap_or_default(),
            stderr_regex,
        })))
    }

    fn guest_path(
        &mut self,
        src: &SourceFile,
        value: &Spanned<String>,
        field: &str,
    ) -> Option<String> {
        let p = value.get_ref();
        if p.starts_with('/') && !p.split('/').any(|c| c == "." || c == "..") {
            return Some(p.clone());
        }
        let msg = format!("guest path {p:?} must be absolute, without `.` or `..`");
        self.err(src, value.span(), field, msg);
        None
    }

    fn relative_path(
        &mut self,
        src: &SourceFile,
        value: &Spanned<String>,
        field: &str,
    ) -> Option<String> {
        let p = value.get_ref();
        if !p.is_empty() && !p.starts_with('/') && !p.split('/').any(|c| c == ".." || c.is_empty())
        {
            return Some(p.clone());
        }
        let msg = format!("path {p:?} must be relative to fixtures/, without `..` or empty parts");
        self.err(src, value.span(), field, msg);
        None
    }

    fn file_expect(
        &mut self,
        src: &SourceFile,
        index: usize,
        raw: &Spanned<RawFileExpect>,
    ) -> Option<FileExpect> {
        let field = format!("expect.files[{index}]");
        let f = raw.get_ref();
        let path = self.relative_path(src, &f.path, &format!("{field}.path"))?;
        if let (Some(min), Some(max)) = (f.min_size, f.max_size) {
            if min > max {
                let msg = format!("min_size {min} is larger than max_size {max}");
                self.err(src, raw.span(), &format!("{field}.min_size"), msg);
            }
        }
        let sha256 = match &f.sha256 {
            Some(h)
                if h.get_ref().len() == 64
                    && h.get_ref().chars().all(|c| c.is_ascii_hexdigit()) =>
            {
                Some(h.get_ref().to_ascii_lowercase())
            }
            Some(h) => {
                let msg = format!("{:?} is not a SHA-256: 64 hex digits", h.get_ref());
                self.err(src, h.span(), &format!("{field}.sha256"), msg);
                None
            }
            None => None,
        };
        if let Some(v) = &f.verify {
            if v.get_ref().trim().is_empty() {
                let msg = "empty command".to_string();
                self.err(src, v.span(), &format!("{field}.verify"), msg);
            }
        }
        let exists = f.exists.unwrap_or(true);
        Some(FileExpect {
            path,
            exists,
            non_empty: f.non_empty.unwrap_or(false),
            min_size: f.min_size,
            max_size: f.max_size,
            sha256,
            verify: f.verify.as_ref().map(|v| v.get_ref().clone()),
        })
    }
}

impl OneOrMany {
    fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
}

/// The prefix of a registry guest in `guest.kernel`.
const REGISTRY_SCHEME: &str = "oci://";

/// Checks the shape of `oci://HOST[:PORT]/REPOSITORY[:TAG]@sha256:HEX` (kiln-guest-build parses
/// it fully when pulling); a scenario must pin its guest by digest.
fn registry_reference(given: &str) -> Result<(), String> {
    let rest = &given[REGISTRY_SCHEME.len()..];
    let expected = "expected oci://HOST[:PORT]/REPOSITORY[:TAG]@sha256:<64 hex digits>";
    let Some((name, digest)) = rest.split_once("@sha256:") else {
        return Err(format!(
            "registry guest {given:?} has no digest: a scenario pins its guest by digest \
             ({expected}; `kiln guest push` prints it)"
        ));
    };
    let hex_ok = digest.len() == 64
        && digest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let name_ok = name
        .split_once('/')
        .is_some_and(|(host, repo)| !host.is_empty() && !repo.is_empty());
    if !hex_ok || !name_ok {
        return Err(format!("registry guest {given:?}: {expected}"));
    }
    Ok(())
}
