//! Which qemu-img `kiln diff img` compares with, its version, and the output profile its answers
//! follow: the profile of its major.minor version, or the one asked for if that is the same.

use std::path::Path;
use std::process::Command;

use kiln_img::Profile;

/// The qemu-img found: its version and, when kiln has one, the profile of that version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    /// "10.0.2".
    pub version: String,
    /// The whole first line of `--version` ("qemu-img version 10.0.2 (Debian …)").
    pub version_line: String,
    /// The profile of this major.minor, `None` when kiln has none.
    pub profile: Option<Profile>,
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

/// Why the version of a qemu-img is not known.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    /// The first line of `--version` is not `qemu-img version X.Y…`.
    #[error("{qemu_img} --version: cannot parse {line:?}; expected \"qemu-img version X.Y.Z\"")]
    Unparsable {
        /// The program.
        qemu_img: String,
        /// The first line it printed.
        line: String,
    },
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

/// The version and profile in `--version` output of `qemu_img`.
pub fn profile_for(qemu_img: &str, text: &str) -> Result<Detected, DetectError> {
    let line = text.lines().next().unwrap_or("").trim_end().to_string();
    let (major, minor, version) = parse_version(text).ok_or_else(|| DetectError::Unparsable {
        qemu_img: qemu_img.to_string(),
        line: line.clone(),
    })?;
    Ok(Detected {
        version,
        version_line: line,
        profile: Profile::for_version(major, minor),
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
    profile_for(qemu_img, &String::from_utf8_lossy(&out.stdout))
}

/// Where `program` is: itself when it names a path, else the first match on `PATH` (for
/// messages: "/usr/bin/qemu-img" says more than "qemu-img").
pub fn locate(program: &str) -> String {
    if program.contains('/') {
        return program.to_string();
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(program))
                .find(|p| is_executable(p))
        })
        .map_or_else(|| program.to_string(), |p| p.display().to_string())
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Why `kiln diff img` will not compare with a qemu-img.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    /// The profile asked for is not the one of the qemu-img's version.
    #[error(
        "profile {requested} does not match {qemu_img} (qemu-img version {version}){}",
        match .own { Some(p) => format!(", whose profile is {p}"), None => String::new() }
    )]
    Mismatch {
        /// The profile asked for.
        requested: Profile,
        /// The qemu-img, located.
        qemu_img: String,
        /// Its version.
        version: String,
        /// The profile of its version, if kiln has one.
        own: Option<Profile>,
    },
    /// kiln has no profile for the qemu-img's version.
    #[error(
        "{qemu_img} is qemu-img version {version}; kiln has output profiles for {} only",
        Profile::ALL.map(|p| p.to_string()).join(" and ")
    )]
    NoProfile {
        /// The qemu-img, located.
        qemu_img: String,
        /// Its version.
        version: String,
    },
}

/// The profile to compare `detected` (the qemu-img `qemu_img`) with: its version's, which
/// `requested` must equal when given. Comparing a 10.0 with the 7.2 profile would report every
/// version difference as DIVERGENT, which says nothing about kiln.
pub fn select(
    qemu_img: &str,
    detected: &Detected,
    requested: Option<Profile>,
) -> Result<Profile, SelectError> {
    match (requested, detected.profile) {
        (Some(r), Some(own)) if r == own => Ok(own),
        (None, Some(own)) => Ok(own),
        (Some(requested), own) => Err(SelectError::Mismatch {
            requested,
            qemu_img: locate(qemu_img),
            version: detected.version.clone(),
            own,
        }),
        (None, None) => Err(SelectError::NoProfile {
            qemu_img: locate(qemu_img),
            version: detected.version.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V10: &str = "qemu-img version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\n";
    const V72: &str = "qemu-img version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n";

    #[test]
    fn known_versions_map_to_profiles() {
        let d = profile_for("q", V10).expect("parses");
        assert_eq!(
            (d.profile, d.version.as_str(), d.version_line.as_str()),
            (
                Some(Profile::V10_0),
                "10.0.2",
                "qemu-img version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"
            )
        );
        let d = profile_for("q", V72).expect("parses");
        assert_eq!(d.profile, Some(Profile::V7_2));
    }

    #[test]
    fn versions_without_a_profile_have_none() {
        for v in ["9.1.0", "7.1.0", "10.1.0", "8.2.2"] {
            let d = profile_for("q", &format!("qemu-img version {v}\n")).expect("parses");
            assert_eq!(d.profile, None, "{v}");
        }
        let e = profile_for("/x/q", "something else").expect_err("unparsable");
        assert!(e.to_string().contains("/x/q --version"), "{e}");
    }

    #[test]
    fn select_refuses_a_profile_of_another_version() {
        let d10 = profile_for("q", V10).expect("parses");
        assert_eq!(select("/q", &d10, None), Ok(Profile::V10_0));
        assert_eq!(select("/q", &d10, Some(Profile::V10_0)), Ok(Profile::V10_0));
        let e = select("/q", &d10, Some(Profile::V7_2)).expect_err("mismatch");
        assert_eq!(
            e.to_string(),
            "profile 7.2 does not match /q (qemu-img version 10.0.2), whose profile is 10.0"
        );
        let d91 = profile_for("q", "qemu-img version 9.1.0\n").expect("parses");
        let e = select("/q", &d91, None).expect_err("no profile");
        assert_eq!(
            e.to_string(),
            "/q is qemu-img version 9.1.0; kiln has output profiles for 7.2 and 10.0 only"
        );
        assert!(matches!(
            select("/q", &d91, Some(Profile::V10_0)),
            Err(SelectError::Mismatch { own: None, .. })
        ));
    }

    #[test]
    fn locate_finds_programs_on_path() {
        assert_eq!(locate("/a/b"), "/a/b");
        assert!(locate("sh").ends_with("/sh"), "{}", locate("sh"));
        assert_eq!(locate("no-such-program-kiln"), "no-such-program-kiln");
    }
}
