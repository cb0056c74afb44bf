//! `kiln doctor`: what this host can run, for people and (with --json) for tools.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_vmm::kvm::{KvmAccess, KvmProbe};
use serde::Serialize;

/// The QEMU system emulator the QEMU backend runs.
pub const QEMU_SYSTEM: &str = "qemu-system-x86_64";
/// The QEMU image tool used for overlays and image checks.
pub const QEMU_IMG: &str = "qemu-img";

/// Everything `kiln doctor` found out about this host.
#[derive(Debug, Clone, Serialize)]
pub struct DoctorReport {
    /// Version of this kiln build.
    pub kiln_version: String,
    /// The KVM probe.
    pub kvm: KvmProbe,
    /// The QEMU system emulator.
    pub qemu_system: ToolInfo,
    /// The QEMU image tool.
    pub qemu_img: ToolInfo,
    /// "kiln" (own VMM) or "qemu".
    pub recommended_backend: String,
    /// Why that backend, in one sentence.
    pub reason: String,
}

/// An external tool: where it is and which version it reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ToolInfo {
    /// Executable name looked up in PATH.
    pub name: String,
    /// Where it was found.
    pub path: Option<String>,
    /// Version parsed from the first line of `--version`, e.g. "10.0.2".
    pub version: Option<String>,
    /// Why it is not usable, or why its version is unknown.
    pub error: Option<String>,
}

/// Probes KVM and the QEMU tools of this host.
pub fn report() -> DoctorReport {
    let kvm = kiln_vmm::kvm::probe();
    let qemu_system = tool_info(QEMU_SYSTEM, "qemu-system-x86");
    let qemu_img = tool_info(QEMU_IMG, "qemu-utils");
    let (recommended_backend, reason) = recommend(&kvm, &qemu_system);
    DoctorReport {
        kiln_version: env!("CARGO_PKG_VERSION").to_string(),
        kvm,
        qemu_system,
        qemu_img,
        recommended_backend,
        reason,
    }
}

/// Chooses the backend: kiln's own VMM where KVM boots Linux, QEMU otherwise.
fn recommend(kvm: &KvmProbe, qemu_system: &ToolInfo) -> (String, String) {
    if kvm.linux_capable() {
        return (
            "kiln".to_string(),
            format!(
                "{} KVM boots Linux guests through kiln's own VMM",
                kind_name(kvm)
            ),
        );
    }
    let why_not_kiln = if kvm.kind.linux_capable() {
        format!(
            "KVM lacks required capabilities ({})",
            kvm.missing_required().join(", ")
        )
    } else {
        format!("{} KVM cannot boot Linux guests", kind_name(kvm))
    };
    let qemu = if qemu_system.path.is_some() {
        "the QEMU backend (TCG) can".to_string()
    } else {
        format!("the QEMU backend needs {QEMU_SYSTEM}: apt-get install qemu-system-x86")
    };
    ("qemu".to_string(), format!("{why_not_kiln}; {qemu}"))
}

/// The KVM kind as it serializes ("hardware", "pvm", ...).
fn kind_name(kvm: &KvmProbe) -> String {
    serde_json::to_value(kvm.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{:?}", kvm.kind).to_lowercase())
}

/// Finds `name` in PATH and asks it for its version; `package` is the Debian package to suggest.
fn tool_info(name: &str, package: &str) -> ToolInfo {
    let mut info = ToolInfo {
        name: name.to_string(),
        path: None,
        version: None,
        error: None,
    };
    let Some(path) = find_in_path(name) else {
        info.error = Some(format!("not found in PATH (apt-get install {package})"));
        return info;
    };
    info.path = Some(path.display().to_string());
    match Command::new(&path).arg("--version").output() {
        Ok(out) if out.status.success() => {
            let stdout = String::from_utf8_lossy(&out.stdout);
            let first = stdout.lines().next().unwrap_or("").trim();
            info.version = parse_version(first);
            if info.version.is_none() {
                info.error = Some(format!("unrecognized `--version` output: {first:?}"));
            }
        }
        Ok(out) => {
            info.error = Some(format!(
                "`{} --version` exited with {}: {}",
                path.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
        Err(e) => info.error = Some(format!("running `{} --version`: {e}", path.display())),
    }
    info
}

/// The first executable file called `name` in the directories of PATH.
fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The version number after the word "version" in a `--version` first line, e.g. "7.2.15".
pub fn parse_version(first_line: &str) -> Option<String> {
    let mut words = first_line.split_whitespace();
    words.find(|w| w.eq_ignore_ascii_case("version"))?;
    let word = words.next()?;
    let version: String = word
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let version = version.trim_end_matches('.');
    let well_formed = !version.is_empty() && version.split('.').all(|part| !part.is_empty());
    well_formed.then(|| version.to_string())
}

/// Width of the key column in the text report: the longest key, the QEMU binary name.
const KEY_WIDTH: usize = QEMU_SYSTEM.len();

/// A short, aligned, human summary: one fact per line.
pub fn render_text(r: &DoctorReport) -> String {
    let mut out = String::new();
    let mut line = |key: &str, value: &str| {
        out.push_str(&format!("{key:<KEY_WIDTH$} {value}\n"));
    };
    line("kiln", &r.kiln_version);

    let access = match &r.kvm.access {
        KvmAccess::Ok => "ok".to_string(),
        other => other.advice(),
    };
    line("kvm device", &format!("{} ({access})", r.kvm.device));
    if let Some(api) = r.kvm.api_version {
        line("kvm api", &api.to_string());
    }
    if let Some(max) = r.kvm.max_vcpus {
        line("kvm max vcpus", &max.to_string());
    }
    if r.kvm.access == KvmAccess::Ok {
        let missing: Vec<&str> = r
            .kvm
            .capabilities
            .iter()
            .filter(|c| !c.present)
            .map(|c| c.name.as_str())
            .collect();
        let caps = if missing.is_empty() {
            format!("all {} present", r.kvm.capabilities.len())
        } else {
            format!("missing {}", missing.join(", "))
        };
        line("kvm caps", &caps);
    }
    line("kvm kind", &kind_name(&r.kvm));
    line("", &r.kvm.consequence);
    line(QEMU_SYSTEM, &tool_text(&r.qemu_system));
    line(QEMU_IMG, &tool_text(&r.qemu_img));
    line(
        "backend",
        &format!("{} ({})", r.recommended_backend, r.reason),
    );
    out
}

fn tool_text(tool: &ToolInfo) -> String {
    let mut text = match (&tool.path, &tool.version) {
        (Some(path), Some(version)) => format!("{version} at {path}"),
        (Some(path), None) => format!("version unknown at {path}"),
        (None, _) => "missing".to_string(),
    };
    if let Some(error) = &tool.error {
        text = format!("{text}: {error}");
    }
    text
}

/// The report as pretty-printed JSON.
pub fn render_json(r: &DoctorReport) -> String {
    // The report holds only strings, numbers, booleans and options: serializing cannot fail,
    // but an error is still reported as JSON rather than a panic.
    serde_json::to_string_pretty(r)
        .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_vmm::kvm::{CapabilityCheck, KvmKind};

    fn kvm(kind: KvmKind, irqchip: bool) -> KvmProbe {
        KvmProbe {
            device: "/dev/kvm".into(),
            access: KvmAccess::Ok,
            api_version: Some(12),
            capabilities: vec![CapabilityCheck {
                name: "KVM_CAP_IRQCHIP".into(),
                present: irqchip,
                required: true,
            }],
            max_vcpus: Some(16),
            kind,
            consequence: kind.consequence().into(),
        }
    }

    fn tool(name: &str, version: Option<&str>) -> ToolInfo {
        ToolInfo {
            name: name.into(),
            path: version.map(|_| format!("/usr/bin/{name}")),
            version: version.map(str::to_string),
            error: None,
        }
    }

    fn sample(kind: KvmKind) -> DoctorReport {
        let kvm = kvm(kind, true);
        let qemu_system = tool(QEMU_SYSTEM, Some("7.2.15"));
        let (recommended_backend, reason) = recommend(&kvm, &qemu_system);
        DoctorReport {
            kiln_version: "0.1.0".into(),
            kvm,
            qemu_system,
            qemu_img: tool(QEMU_IMG, None),
            recommended_backend,
            reason,
        }
    }

    #[test]
    fn parses_debian_bookworm_and_backports_first_lines() {
        assert_eq!(
            parse_version("QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u13)"),
            Some("7.2.15".into())
        );
        assert_eq!(
            parse_version("qemu-img version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"),
            Some("10.0.2".into())
        );
    }

    #[test]
    fn rejects_lines_without_a_version_number() {
        assert_eq!(parse_version(""), None);
        assert_eq!(parse_version("QEMU emulator"), None);
        assert_eq!(parse_version("QEMU emulator version"), None);
        assert_eq!(parse_version("qemu-img version (unknown)"), None);
        assert_eq!(parse_version("qemu-img version 1..2"), None);
        assert_eq!(parse_version("tool version 9"), Some("9".into()));
    }

    #[test]
    fn hardware_and_nested_kvm_recommend_kiln() {
        for kind in [KvmKind::Hardware, KvmKind::Nested] {
            let r = sample(kind);
            assert_eq!(r.recommended_backend, "kiln", "{kind:?}");
        }
    }

    #[test]
    fn pvm_recommends_qemu_and_says_why() {
        let r = sample(KvmKind::Pvm);
        assert_eq!(r.recommended_backend, "qemu");
        assert!(
            r.reason.contains("pvm KVM cannot boot Linux"),
            "{}",
            r.reason
        );
        assert!(r.reason.contains("TCG"), "{}", r.reason);
    }

    #[test]
    fn missing_capability_or_missing_qemu_is_explained() {
        let (backend, reason) = recommend(&kvm(KvmKind::Hardware, false), &tool(QEMU_SYSTEM, None));
        assert_eq!(backend, "qemu");
        assert!(reason.contains("KVM_CAP_IRQCHIP"), "{reason}");
        assert!(
            reason.contains("apt-get install qemu-system-x86"),
            "{reason}"
        );
    }

    #[test]
    fn text_has_one_aligned_line_per_fact() {
        let text = render_text(&sample(KvmKind::Pvm));
        let fact = |key: &str, value: &str| format!("{key:<KEY_WIDTH$} {value}\n");
        assert!(text.contains(&fact("kvm kind", "pvm")), "{text}");
        assert!(text.contains("use the QEMU backend"), "{text}");
        let qemu = fact(QEMU_SYSTEM, "7.2.15 at /usr/bin/qemu-system-x86_64");
        assert!(text.contains(&qemu), "{text}");
        assert!(text.contains(&fact(QEMU_IMG, "missing")), "{text}");
        let backend = format!("{:<KEY_WIDTH$} qemu (", "backend");
        assert!(text.contains(&backend), "{text}");
        // Every value starts in the same column.
        for line in text.lines() {
            assert_eq!(line.as_bytes()[KEY_WIDTH], b' ', "{line:?}");
            assert_ne!(line.as_bytes()[KEY_WIDTH + 1], b' ', "{line:?}");
        }
    }

    #[test]
    fn json_round_trips_with_lowercase_kind() {
        let json = render_json(&sample(KvmKind::Pvm));
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["kvm"]["kind"], "pvm");
        assert_eq!(value["kvm"]["access"], "ok");
        assert_eq!(value["qemu_system"]["version"], "7.2.15");
        assert_eq!(value["recommended_backend"], "qemu");
        assert!(json.contains('\n'), "pretty-printed");
    }

    #[test]
    fn a_tool_not_in_path_says_how_to_install_it() {
        let info = tool_info("kiln-no-such-tool-xyz", "some-package");
        assert_eq!(info.path, None);
        assert_eq!(info.version, None);
        assert_eq!(
            info.error.as_deref(),
            Some("not found in PATH (apt-get install some-package)")
        );
    }

    /// The real report on this host: whatever is installed, it answers and renders.
    #[test]
    fn report_runs_on_this_host() {
        let r = report();
        assert!(["kiln", "qemu"].contains(&r.recommended_backend.as_str()));
        assert_eq!(r.recommended_backend == "kiln", r.kvm.linux_capable());
        for tool in [&r.qemu_system, &r.qemu_img] {
            assert!(tool.path.is_some() || tool.error.is_some(), "{tool:?}");
        }
        assert!(render_text(&r).contains("backend"));
        assert!(render_json(&r).contains("\"kvm\""));
    }
}
