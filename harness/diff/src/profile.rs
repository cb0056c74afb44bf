//! Which qemu-img is installed, and which output profile its answers follow.

use std::process::Command;

use kiln_img::Profile;

/// The qemu-img found, and the profile its output is compared with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    pub version: String,
    pub profile: Profile,
    /// Set when the version has no profile of its own and the newest is used.
    pub note: Option<String>,
}

/// Parses the first line of `qemu-img --version` ("qemu-img version 10.0.2 (Debian …)").
pub fn parse_version(text: &str) -> Option<(u32, u32, String)> {
    let line = text.lines().next()?;
    let rest = line.strip_prefix("qemu-img version ")?;
    let version = rest.split_whitespace().next()?.to_string();
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor, version))
}

/// Why the installed qemu-img's version is not known.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    /// The first line of `--version` is not `qemu-img version X.Y…`.
    #[error("cannot parse qemu-img --version output: {0:?}")]
    Unparsable(String),
    /// qemu-img could not be run (not installed).
    #[error("{qemu_img}: cannot run: {source}")]
    Spawn {
        /// The program.
        qemu_img: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// `qemu-img --version` failed.
    #[error("{qemu_img} --version failed: {status}")]
    Failed {
        /// The program.
        qemu_img: String,
        /// Its status.
        status: std::process::ExitStatus,
    },
}

/// The profile for `--version` output; unknown versions fall back to the newest, with a note.
pub fn profile_for(text: &str) -> Result<Detected, DetectError> {
    let (major, minor, version) = parse_version(text)
        .ok_or_else(|| DetectError::Unparsable(text.lines().next().unwrap_or("").to_string()))?;
    Ok(match Profile::for_version(major, minor) {
        Some(profile) => Detected {
            version,
            profile,
            note: None,
        },
        None => Detected {
            note: Some(format!(
                "qemu-img {version} has no profile of its own; comparing with the newest \
                 ({})",
                Profile::newest()
            )),
            version,
            profile: Profile::newest(),
        },
    })
}

/// Runs `qemu_img --version` and picks the profile.
pub fn detect(qemu_img: &str) -> Result<Detected, DetectError> {
    let out = Command::new(qemu_img)
        .arg("--version")
        .output()
        .map_err(|source| DetectError::Spawn {
            qemu_img: qemu_img.to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(DetectError::Failed {
            qemu_img: qemu_img.to_string(),
            status: out.status,
        });
    }
    profile_for(&String::from_utf8_lossy(&out.stdout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_versions_map_to_profiles() {
        let d = profile_for("qemu-img version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\n")
            .expect("parses");
        assert_eq!(
            (d.profile, d.version.as_str(), d.note),
            (Profile::V10_0, "10.0.2", None)
        );
        let d = profile_for("qemu-img version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u13)\n")
            .expect("parses");
        assert_eq!(d.profile, Profile::V7_2);
    }

    #[test]
    fn unknown_version_falls_back_with_note() {
        let d = profile_for("qemu-img version 9.1.0\n").expect("parses");
        assert_eq!(d.profile, Profile::V10_0);
        assert!(d.note.expect("note").contains("no profile of its own"));
        assert!(profile_for("something else").is_err());
    }
}
