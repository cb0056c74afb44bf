//! Why a disk could not be attached, in the library's words (no command-line option names);
//! [`DiskError::with_option`] gives the form a command line reports against its option.

use std::fmt;
use std::path::PathBuf;

/// Why a disk could not be attached. Each message is one line naming the spec or the image:
/// `disk spec "SPEC": PROBLEM`, `disk image PATH: PROBLEM`, or
/// `disk image PATH, overlay OVERLAY: PROBLEM`.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The spec string itself is malformed.
    BadSpec {
        /// The value as given.
        spec: String,
        /// What is wrong and what would be right.
        reason: String,
    },
    /// The image cannot be opened (missing, unreadable, a directory).
    Open {
        /// The image.
        path: PathBuf,
        /// The OS error.
        reason: String,
    },
    /// The image has no bytes at all.
    Empty {
        /// The image.
        path: PathBuf,
    },
    /// The image is in a format kiln does not read.
    UnknownFormat {
        /// The image.
        path: PathBuf,
        /// The format its header names.
        format: &'static str,
    },
    /// The image says it is qcow2 but cannot be opened as such.
    BadQcow2 {
        /// The image.
        path: PathBuf,
        /// What imago or the header check found.
        reason: String,
    },
    /// The image can be read but not written in place (a qcow2 image only kiln's own reader
    /// reads: extended L2, zstd).
    NotWritable {
        /// The image.
        path: PathBuf,
        /// Why, naming the feature.
        reason: String,
    },
    /// A kept overlay's path names a file that exists already.
    OverlayExists {
        /// The base image.
        path: PathBuf,
        /// The overlay path.
        overlay: PathBuf,
    },
    /// The overlay file cannot be created.
    OverlayNotWritable {
        /// The base image.
        path: PathBuf,
        /// The overlay path (a temp dir path for ephemeral overlays).
        overlay: PathBuf,
        /// The OS or imago error.
        reason: String,
    },
    /// The ephemeral overlay's temp dir cannot be created.
    TempOverlay {
        /// The base image.
        path: PathBuf,
        /// The OS error.
        reason: String,
    },
}

impl DiskError {
    /// The value this error is about, as a spec would write it: the quoted spec, the image path,
    /// or `PATH,overlay=OVERLAY`.
    fn value(&self) -> String {
        match self {
            DiskError::BadSpec { spec, .. } => format!("{spec:?}"),
            DiskError::OverlayExists { path, overlay }
            | DiskError::OverlayNotWritable { path, overlay, .. } => {
                format!("{},overlay={}", path.display(), overlay.display())
            }
            DiskError::Open { path, .. }
            | DiskError::Empty { path }
            | DiskError::UnknownFormat { path, .. }
            | DiskError::BadQcow2 { path, .. }
            | DiskError::NotWritable { path, .. }
            | DiskError::TempOverlay { path, .. } => path.display().to_string(),
        }
    }

    /// What is wrong, without the value.
    fn problem(&self) -> String {
        match self {
            DiskError::BadSpec { reason, .. } => reason.clone(),
            DiskError::Open { reason, .. } => format!("cannot open the image: {reason}"),
            DiskError::Empty { .. } => {
                "the image is empty (0 bytes); create it with a size first".to_string()
            }
            DiskError::UnknownFormat { format, .. } => {
                format!("{format} images are not supported (use raw or qcow2)")
            }
            DiskError::BadQcow2 { reason, .. } => format!("not a valid qcow2 image: {reason}"),
            DiskError::NotWritable { reason, .. } => format!(
                "cannot be written in place: {reason} (attach it read-only or under an overlay)"
            ),
            DiskError::OverlayExists { .. } => {
                "the overlay already exists (remove it or name a new file)".to_string()
            }
            DiskError::OverlayNotWritable { reason, .. } => {
                format!("cannot create the overlay: {reason}")
            }
            DiskError::TempOverlay { reason, .. } => {
                format!("cannot create a temporary overlay (check TMPDIR): {reason}")
            }
        }
    }

    /// This error as a command line reports it against the option that took the spec:
    /// `OPTION VALUE: PROBLEM`, e.g. `--disk a.img,overlay=o.qcow2: the overlay already exists
    /// (…)`. One line, like the error itself.
    pub fn with_option<'a>(&'a self, option: &'a str) -> impl fmt::Display + 'a {
        WithOption {
            option,
            error: self,
        }
    }
}

impl fmt::Display for DiskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let problem = self.problem();
        match self {
            DiskError::BadSpec { spec, .. } => write!(f, "disk spec {spec:?}: {problem}"),
            DiskError::OverlayExists { path, overlay }
            | DiskError::OverlayNotWritable { path, overlay, .. } => write!(
                f,
                "disk image {}, overlay {}: {problem}",
                path.display(),
                overlay.display()
            ),
            DiskError::Open { path, .. }
            | DiskError::Empty { path }
            | DiskError::UnknownFormat { path, .. }
            | DiskError::BadQcow2 { path, .. }
            | DiskError::NotWritable { path, .. }
            | DiskError::TempOverlay { path, .. } => {
                write!(f, "disk image {}: {problem}", path.display())
            }
        }
    }
}

/// [`DiskError::with_option`]'s form.
struct WithOption<'a> {
    option: &'a str,
    error: &'a DiskError,
}

impl fmt::Display for WithOption<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (option, e) = (self.option, self.error);
        write!(f, "{option} {}: {}", e.value(), e.problem())
    }
}

/// An error's text on one line (imago chains context with newlines in a few places).
pub(crate) fn one_line(e: &dyn fmt::Display) -> String {
    e.to_string().replace('\n', "; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every variant in both forms; the option form is what `kiln boot --disk` has always printed.
    #[test]
    fn library_and_option_forms() {
        let path = || PathBuf::from("/img/a.raw");
        let overlay = || PathBuf::from("/tmp/o.qcow2");
        let reason = || "No such file or directory (os error 2)".to_string();
        for (err, library, option) in [
            (
                DiskError::BadSpec {
                    spec: "a.raw,rw".into(),
                    reason: "unknown option \"rw\"".into(),
                },
                "disk spec \"a.raw,rw\": unknown option \"rw\"",
                "--disk \"a.raw,rw\": unknown option \"rw\"",
            ),
            (
                DiskError::Open {
                    path: path(),
                    reason: reason(),
                },
                "disk image /img/a.raw: cannot open the image: No such file or directory (os error 2)",
                "--disk /img/a.raw: cannot open the image: No such file or directory (os error 2)",
            ),
            (
                DiskError::Empty { path: path() },
                "disk image /img/a.raw: the image is empty (0 bytes); create it with a size first",
                "--disk /img/a.raw: the image is empty (0 bytes); create it with a size first",
            ),
            (
                DiskError::UnknownFormat {
                    path: path(),
                    format: "VMDK",
                },
                "disk image /img/a.raw: VMDK images are not supported (use raw or qcow2)",
                "--disk /img/a.raw: VMDK images are not supported (use raw or qcow2)",
            ),
            (
                DiskError::BadQcow2 {
                    path: path(),
                    reason: "bad".into(),
                },
                "disk image /img/a.raw: not a valid qcow2 image: bad",
                "--disk /img/a.raw: not a valid qcow2 image: bad",
            ),
            (
                DiskError::OverlayExists {
                    path: path(),
                    overlay: overlay(),
                },
                "disk image /img/a.raw, overlay /tmp/o.qcow2: the overlay already exists (remove \
                 it or name a new file)",
                "--disk /img/a.raw,overlay=/tmp/o.qcow2: the overlay already exists (remove it or \
                 name a new file)",
            ),
            (
                DiskError::OverlayNotWritable {
                    path: path(),
                    overlay: overlay(),
                    reason: reason(),
                },
                "disk image /img/a.raw, overlay /tmp/o.qcow2: cannot create the overlay: No such \
                 file or directory (os error 2)",
                "--disk /img/a.raw,overlay=/tmp/o.qcow2: cannot create the overlay: No such file \
                 or directory (os error 2)",
            ),
            (
                DiskError::TempOverlay {
                    path: path(),
                    reason: reason(),
                },
                "disk image /img/a.raw: cannot create a temporary overlay (check TMPDIR): No such \
                 file or directory (os error 2)",
                "--disk /img/a.raw: cannot create a temporary overlay (check TMPDIR): No such file \
                 or directory (os error 2)",
            ),
        ] {
            assert_eq!(err.to_string(), library);
            assert_eq!(err.with_option("--disk").to_string(), option);
        }
    }
}
