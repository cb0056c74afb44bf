//! Where a run ran: the host (kernel, OS, CPU, KVM kind, QEMU), kiln itself (version, git
//! revision) and what the operator declares through `KILN_ENV_*` variables (set by the CI
//! runner, not the repository). Every result.json and the run summary carry it, so a release
//! gate can prove where it ran.
//!
//! A [`Contract`] (a TOML or JSON file checked into the repository) pins some of these fields;
//! [`Contract::check`] lists each pinned field whose actual value drifted. Only the fields the
//! contract names are compared; a field may list several allowed values.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The identity of the environment a run ran in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Environment {
    /// The host machine.
    pub host: Host,
    /// The kiln that ran.
    pub kiln: Kiln,
    /// What the operator declared (`KILN_ENV_*`).
    pub operator: Operator,
}

/// The host machine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// PRETTY_NAME from /etc/os-release.
    pub os: String,
    /// The first "model name" in /proc/cpuinfo.
    pub cpu_model: String,
    /// The KVM kind `kiln doctor` reports ("hardware", "nested", "pvm", "none").
    pub kvm_kind: String,
    /// qemu-system-x86_64's version, when installed.
    pub qemu_version: Option<String>,
}

/// The kiln that ran.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kiln {
    /// kiln's version.
    pub version: String,
    /// The git revision kiln was built from, when known.
    pub git_rev: Option<String>,
}

/// The operator-declared identity, from the environment the CI runner sets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operator {
    /// `KILN_ENV_NAME`: the environment's name ("ci-kvm-pool").
    pub name: Option<String>,
    /// `KILN_ENV_VERSION`: its version (an image tag, a date).
    pub version: Option<String>,
    /// `KILN_ENV_RUNNER_REF`: the runner that ran (a runner id, a job URL).
    pub runner_ref: Option<String>,
    /// `KILN_ENV_SYSTEM_CLASS`: the class of machine ("ci-large").
    pub system_class: Option<String>,
}

/// The variables [`Operator`] is read from, in field order.
pub const OPERATOR_VARS: [&str; 4] = [
    "KILN_ENV_NAME",
    "KILN_ENV_VERSION",
    "KILN_ENV_RUNNER_REF",
    "KILN_ENV_SYSTEM_CLASS",
];

/// Every field a contract may pin, as `section.field`.
pub const FIELDS: [&str; 11] = [
    "host.kernel",
    "host.os",
    "host.cpu_model",
    "host.kvm_kind",
    "host.qemu_version",
    "kiln.version",
    "kiln.git_rev",
    "operator.name",
    "operator.version",
    "operator.runner_ref",
    "operator.system_class",
];

impl Operator {
    /// From `var` (a lookup such as `std::env::var`); unset and empty variables are `None`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Operator {
        let get = |name: &str| var(name).filter(|v| !v.is_empty());
        Operator {
            name: get(OPERATOR_VARS[0]),
            version: get(OPERATOR_VARS[1]),
            runner_ref: get(OPERATOR_VARS[2]),
            system_class: get(OPERATOR_VARS[3]),
        }
    }
}

impl Environment {
    /// This host's identity; the caller knows the KVM kind and QEMU version (from the doctor
    /// probe it already ran), the rest is read from /proc, /etc and the process environment.
    pub fn probe(kvm_kind: &str, qemu_version: Option<String>) -> Environment {
        Environment {
            host: Host {
                kernel: read_trimmed("/proc/sys/kernel/osrelease"),
                os: os_pretty_name(&std::fs::read_to_string("/etc/os-release").unwrap_or_default()),
                cpu_model: cpu_model(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default()),
                kvm_kind: kvm_kind.to_string(),
                qemu_version,
            },
            kiln: Kiln {
                version: env!("CARGO_PKG_VERSION").to_string(),
                git_rev: crate::git_rev().map(str::to_string),
            },
            operator: Operator::from_vars(|name| std::env::var(name).ok()),
        }
    }

    /// The value of `field` (one of [`FIELDS`]); `None` for an unknown field, `Some(None)` for
    /// a known one that has no value here.
    pub fn field(&self, field: &str) -> Option<Option<&str>> {
        fn s(v: &str) -> Option<&str> {
            Some(v)
        }
        Some(match field {
            "host.kernel" => s(&self.host.kernel),
            "host.os" => s(&self.host.os),
            "host.cpu_model" => s(&self.host.cpu_model),
            "host.kvm_kind" => s(&self.host.kvm_kind),
            "host.qemu_version" => self.host.qemu_version.as_deref(),
            "kiln.version" => s(&self.kiln.version),
            "kiln.git_rev" => self.kiln.git_rev.as_deref(),
            "operator.name" => self.operator.name.as_deref(),
            "operator.version" => self.operator.version.as_deref(),
            "operator.runner_ref" => self.operator.runner_ref.as_deref(),
            "operator.system_class" => self.operator.system_class.as_deref(),
            _ => return None,
        })
    }

    /// The identity as a TOML contract pinning every field that has a value.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        let mut section = "";
        for field in FIELDS {
            let (sec, name) = field.split_once('.').unwrap_or(("", field));
            if sec != section {
                if !section.is_empty() {
                    out.push('\n');
                }
                out += &format!("[{sec}]\n");
                section = sec;
            }
            match self.field(field).flatten() {
                Some(v) => out += &format!("{name} = {}\n", toml_string(v)),
                None => out += &format!("# {name}: not set\n"),
            }
        }
        out
    }

    /// One line for the run summary: the fields that say most about where it ran.
    pub fn summary_line(&self) -> String {
        let mut parts = vec![
            format!("kvm {}", self.host.kvm_kind),
            format!("kernel {}", self.host.kernel),
            format!("os {:?}", self.host.os),
            format!(
                "kiln {} ({})",
                self.kiln.version,
                self.kiln.git_rev.as_deref().unwrap_or("unknown rev")
            ),
        ];
        if let Some(q) = &self.host.qemu_version {
            parts.push(format!("qemu {q}"));
        }
        if let Some(n) = &self.operator.name {
            parts.push(format!("operator {n}"));
        }
        if let Some(c) = &self.operator.system_class {
            parts.push(format!("class {c}"));
        }
        format!("environment: {}", parts.join(", "))
    }
}

fn toml_string(v: &str) -> String {
    toml::Value::String(v.to_string()).to_string()
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// PRETTY_NAME from os-release text, unquoted ("unknown" without one).
fn os_pretty_name(os_release: &str) -> String {
    os_release
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim().trim_matches('"').trim_matches('\'').to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// The first "model name" in /proc/cpuinfo text ("unknown" without one).
fn cpu_model(cpuinfo: &str) -> String {
    cpuinfo
        .lines()
        .find_map(|l| {
            let (key, value) = l.split_once(':')?;
            (key.trim() == "model name").then(|| value.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// A checked-in contract: the fields a gate pins and the values it allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contract {
    /// The file it was read from.
    pub path: PathBuf,
    /// The pinned fields, in file order.
    pub pins: Vec<Pin>,
}

/// One pinned field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// `section.field`, one of [`FIELDS`].
    pub field: &'static str,
    /// The values allowed (one, or the list the file gave).
    pub allowed: Vec<String>,
    /// The 1-based line it is on.
    pub line: usize,
}

/// A pinned field whose actual value is not allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    /// `section.field`.
    pub field: &'static str,
    /// The actual value (`None`: not set).
    pub actual: Option<String>,
    /// The values allowed.
    pub allowed: Vec<String>,
    /// Where the contract pins it.
    pub path: PathBuf,
    /// The line in that file.
    pub line: usize,
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.actual {
            Some(v) => write!(f, "{} is {v:?}", self.field)?,
            None => write!(f, "{} is not set", self.field)?,
        }
        let quoted: Vec<String> = self.allowed.iter().map(|v| format!("{v:?}")).collect();
        if quoted.len() == 1 {
            write!(f, ", expected {}", quoted[0])?;
        } else {
            write!(f, ", expected one of {}", quoted.join(", "))?;
        }
        write!(f, " ({}:{})", self.path.display(), self.line)
    }
}

/// Why a contract file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or JSON.
    #[error("{path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A field or section no environment has.
    #[error("{path}:{line}: unknown field {field:?}; known fields: {known}", known = FIELDS.join(", "))]
    UnknownField {
        /// The file.
        path: PathBuf,
        /// The 1-based line.
        line: usize,
        /// What the file named.
        field: String,
    },
    /// A value that is neither a string nor a list of strings.
    #[error("{path}:{line}: {field} must be a string or a list of strings")]
    BadValue {
        /// The file.
        path: PathBuf,
        /// The 1-based line.
        line: usize,
        /// The field.
        field: String,
    },
}

impl Contract {
    /// Reads a contract: JSON when the file name ends in `.json`, TOML otherwise.
    pub fn load(path: &Path) -> Result<Contract, ContractError> {
        let text = std::fs::read_to_string(path).map_err(|source| ContractError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"))
        {
            Contract::parse_json(&text, path)
        } else {
            Contract::parse_toml(&text, path)
        }
    }

    /// Parses TOML text read from `path`.
    pub fn parse_toml(text: &str, path: &Path) -> Result<Contract, ContractError> {
        let doc = toml::de::DeTable::parse(text).map_err(|e| ContractError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string().trim().to_string(),
        })?;
        let line_at = |offset: usize| line_of(text, offset);
        let mut builder = Builder::new(path);
        for (section, value) in doc.get_ref().iter() {
            let Some(table) = value.get_ref().as_table() else {
                return Err(builder.unknown(line_at(section.span().start), section.get_ref()));
            };
            for (key, value) in table.iter() {
                let line = line_at(key.span().start);
                let name = format!("{}.{}", section.get_ref(), key.get_ref());
                let allowed = match value.get_ref() {
                    v if v.as_str().is_some() => v.as_str().map(|s| vec![s.to_string()]),
                    v => v.as_array().and_then(|a| {
                        a.iter()
                            .map(|x| x.get_ref().as_str().map(str::to_string))
                            .collect::<Option<Vec<_>>>()
                    }),
                };
                builder.pin(&name, allowed, line)?;
            }
        }
        Ok(builder.done())
    }

    /// Parses JSON text read from `path` (`{"host": {"kvm_kind": "hardware"}}`); the line of a
    /// field is where its key first appears after its section's.
    pub fn parse_json(text: &str, path: &Path) -> Result<Contract, ContractError> {
        let doc: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(text).map_err(|e| ContractError::Syntax {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let find = |key: &str, from: usize| {
            text[from..]
                .find(&format!("\"{key}\""))
                .map_or(from, |i| from + i)
        };
        let mut builder = Builder::new(path);
        for (section, value) in &doc {
            let at = find(section, 0);
            let Some(table) = value.as_object() else {
                return Err(builder.unknown(line_of(text, at), section));
            };
            for (key, value) in table {
                let line = line_of(text, find(key, at));
                let allowed = match value {
                    serde_json::Value::String(s) => Some(vec![s.clone()]),
                    serde_json::Value::Array(a) => {
                        a.iter().map(|x| x.as_str().map(str::to_string)).collect()
                    }
                    _ => None,
                };
                builder.pin(&format!("{section}.{key}"), allowed, line)?;
            }
        }
        Ok(builder.done())
    }

    /// Each pinned field whose actual value in `env` is not among the allowed ones.
    pub fn check(&self, env: &Environment) -> Vec<Drift> {
        self.pins
            .iter()
            .filter_map(|pin| {
                let actual = env.field(pin.field).flatten();
                let ok = actual.is_some_and(|a| pin.allowed.iter().any(|v| v == a));
                (!ok).then(|| Drift {
                    field: pin.field,
                    actual: actual.map(str::to_string),
                    allowed: pin.allowed.clone(),
                    path: self.path.clone(),
                    line: pin.line,
                })
            })
            .collect()
    }
}

/// Collects pins, checking each field name and value.
struct Builder {
    path: PathBuf,
    pins: Vec<Pin>,
}

impl Builder {
    fn new(path: &Path) -> Builder {
        Builder {
            path: path.to_path_buf(),
            pins: Vec::new(),
        }
    }

    fn unknown(&self, line: usize, field: &str) -> ContractError {
        ContractError::UnknownField {
            path: self.path.clone(),
            line,
            field: field.to_string(),
        }
    }

    fn pin(
        &mut self,
        name: &str,
        allowed: Option<Vec<String>>,
        line: usize,
    ) -> Result<(), ContractError> {
        let Some(field) = FIELDS.iter().copied().find(|f| *f == name) else {
            return Err(self.unknown(line, name));
        };
        let allowed = allowed
            .filter(|a| !a.is_empty())
            .ok_or_else(|| ContractError::BadValue {
                path: self.path.clone(),
                line,
                field: field.to_string(),
            })?;
        self.pins.push(Pin {
            field,
            allowed,
            line,
        });
        Ok(())
    }

    fn done(mut self) -> Contract {
        // The parsers' maps are sorted by key; drift is reported in file order.
        self.pins.sort_by_key(|p| p.line);
        Contract {
            path: self.path,
            pins: self.pins,
        }
    }
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Environment {
        Environment {
            host: Host {
                kernel: "6.8.0-45-generic".into(),
                os: "Ubuntu 24.04.1 LTS".into(),
                cpu_model: "AMD EPYC 7B13".into(),
                kvm_kind: "pvm".into(),
                qemu_version: None,
            },
            kiln: Kiln {
                version: "0.1.0".into(),
                git_rev: Some("0123456789ab".into()),
            },
            operator: Operator::from_vars(|name| match name {
                "KILN_ENV_NAME" => Some("ci-kvm".into()),
                "KILN_ENV_SYSTEM_CLASS" => Some("ci-large".into()),
                "KILN_ENV_VERSION" => Some(String::new()),
                _ => None,
            }),
        }
    }

    fn toml(text: &str) -> Result<Contract, ContractError> {
        Contract::parse_toml(text, Path::new("gate.toml"))
    }

    fn drifts(text: &str) -> Vec<String> {
        toml(text)
            .expect("valid contract")
            .check(&env())
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn a_matching_contract_has_no_drift() {
        let text = "[host]\nkvm_kind = \"pvm\"\nos = \"Ubuntu 24.04.1 LTS\"\n\n\
                    [operator]\nsystem_class = \"ci-large\"\nname = \"ci-kvm\"\n\n\
                    [kiln]\ngit_rev = \"0123456789ab\"\n";
        assert_eq!(drifts(text), Vec::<String>::new());
        assert!(drifts("").is_empty(), "an empty contract pins nothing");
    }

    #[test]
    fn each_drifted_field_is_named_with_its_line() {
        let text = "[host]\nkvm_kind = \"hardware\"\ncpu_model = \"AMD EPYC 7B13\"\n\
                    [operator]\nsystem_class = \"ci-small\"\n";
        assert_eq!(
            drifts(text),
            [
                "host.kvm_kind is \"pvm\", expected \"hardware\" (gate.toml:2)",
                "operator.system_class is \"ci-large\", expected \"ci-small\" (gate.toml:5)",
            ]
        );
    }

    #[test]
    fn every_field_can_drift() {
        let mut e = env();
        e.host.qemu_version = Some("10.0.2".into());
        e.operator.version = Some("v1".into());
        e.operator.runner_ref = Some("r1".into());
        for field in FIELDS {
            let (section, name) = field.split_once('.').expect("dotted");
            let text = format!("[{section}]\n{name} = \"nothing-has-this\"\n");
            let drift = toml(&text).expect("valid").check(&e);
            assert_eq!(drift.len(), 1, "{field}");
            assert_eq!(drift[0].field, field);
            let same = format!(
                "[{section}]\n{name} = {:?}\n",
                e.field(field).flatten().expect("set")
            );
            assert!(toml(&same).expect("valid").check(&e).is_empty(), "{field}");
        }
    }

    #[test]
    fn a_list_allows_any_of_its_values() {
        assert!(drifts("[host]\nkvm_kind = [\"hardware\", \"pvm\"]\n").is_empty());
        assert_eq!(
            drifts("[host]\nkvm_kind = [\"hardware\", \"nested\"]\n"),
            ["host.kvm_kind is \"pvm\", expected one of \"hardware\", \"nested\" (gate.toml:2)"]
        );
    }

    #[test]
    fn an_unset_value_drifts_from_any_pin() {
        assert_eq!(
            drifts("[operator]\nversion = \"2026.12\"\n\n[host]\nqemu_version = \"10.0.2\"\n"),
            [
                "operator.version is not set, expected \"2026.12\" (gate.toml:2)",
                "host.qemu_version is not set, expected \"10.0.2\" (gate.toml:5)",
            ]
        );
    }

    #[test]
    fn unknown_fields_are_errors_naming_file_line_and_field() {
        let err = toml("[host]\nkvm_kind = \"pvm\"\nkvm_knid = \"pvm\"\n").expect_err("unknown");
        let text = err.to_string();
        assert!(
            text.starts_with("gate.toml:3: unknown field \"host.kvm_knid\""),
            "{text}"
        );
        let err = toml("[hots]\nkvm_kind = \"pvm\"\n").expect_err("unknown section");
        assert!(err
            .to_string()
            .starts_with("gate.toml:2: unknown field \"hots.kvm_kind\""));
        let err = toml("top = \"x\"\n").expect_err("not a section");
        assert!(err
            .to_string()
            .starts_with("gate.toml:1: unknown field \"top\""));
    }

    #[test]
    fn values_must_be_strings() {
        let err = toml("[host]\n\nkvm_kind = 1\n").expect_err("integer");
        assert_eq!(
            err.to_string(),
            "gate.toml:3: host.kvm_kind must be a string or a list of strings"
        );
        assert!(toml("[host]\nkvm_kind = []\n").is_err());
        assert!(matches!(toml("[host\n"), Err(ContractError::Syntax { .. })));
    }

    #[test]
    fn json_contracts_work_the_same() {
        let text = "{\n  \"host\": {\n    \"kvm_kind\": \"hardware\"\n  },\n  \
                    \"operator\": {\"system_class\": [\"ci-large\"]}\n}\n";
        let c = Contract::parse_json(text, Path::new("gate.json")).expect("valid");
        let drift: Vec<String> = c.check(&env()).iter().map(ToString::to_string).collect();
        assert_eq!(
            drift,
            ["host.kvm_kind is \"pvm\", expected \"hardware\" (gate.json:3)"]
        );
        let err = Contract::parse_json("{\"kiln\": {\"rev\": \"x\"}}", Path::new("g.json"))
            .expect_err("unknown");
        assert!(err
            .to_string()
            .starts_with("g.json:1: unknown field \"kiln.rev\""));
    }

    #[test]
    fn the_printed_identity_is_a_contract_it_matches() {
        let e = env();
        let text = e.to_toml();
        assert!(
            text.contains("[host]\nkernel = \"6.8.0-45-generic\"\n"),
            "{text}"
        );
        assert!(text.contains("# qemu_version: not set\n"), "{text}");
        let c = toml(&text).expect("valid");
        assert_eq!(c.pins.len(), 8);
        assert!(c.check(&e).is_empty());
    }

    #[test]
    fn host_files_are_parsed() {
        let os = "NAME=\"Ubuntu\"\nPRETTY_NAME=\"Ubuntu 24.04.1 LTS\"\nID=ubuntu\n";
        assert_eq!(os_pretty_name(os), "Ubuntu 24.04.1 LTS");
        assert_eq!(os_pretty_name(""), "unknown");
        let cpu =
            "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13 64-Core\n";
        assert_eq!(cpu_model(cpu), "AMD EPYC 7B13 64-Core");
        assert_eq!(cpu_model("processor : 0\n"), "unknown");
    }
}
