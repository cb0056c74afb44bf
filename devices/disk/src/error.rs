//! Why a disk could not be attached.

use std::fmt;
use std::path::PathBuf;

/// Why a `--disk` could not be attached. Each message is one line naming the option and value.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The `--disk` value itself is malformed.
    #[error("--disk {spec:?}: {reason}")]
    BadSpec {
        /// The value as given.
        spec: String,
        /// What is wrong and what would be right.
        reason: String,
    },
    /// The image cannot be opened (missing, unreadable, a directory).
    #[error("--disk {}: cannot open the image: {reason}", path.display())]
    Open {
        /// The image.
        path: PathBuf,
        /// The OS error.
        reason: String,
    },
    /// The image has no bytes at all.
    #[error("--disk {}: the image is empty (0 bytes); create it with a size first", path.display())]
    Empty {
        /// The image.
        path: PathBuf,
    },
    /// The image is in a format kiln does not read.
    #[error("--disk {}: {format} images are not supported (use raw or qcow2)", path.display())]
    UnknownFormat {
        /// The image.
        path: PathBuf,
        /// The format its header names.
        format: &'static str,
    },
    /// The image says it is qcow2 but cannot be opened as such.
    #[error("--disk {}: not a valid qcow2 image: {reason}", path.display())]
    BadQcow2 {
        /// The image.
        path: PathBuf,
        /// What imago or the header check found.
        reason: String,
    },
    /// `overlay=PATH` names a file that exists already.
    #[error("--disk {},overlay={}: the overlay already exists (remove it or name a new file)", path.display(), overlay.display())]
    OverlayExists {
        /// The base image.
        path: PathBuf,
        /// The overlay path.
        overlay: PathBuf,
    },
    /// The overlay file cannot be created.
    #[error("--disk {},overlay={}: cannot create the overlay: {reason}", path.display(), overlay.display())]
    OverlayNotWritable {
        /// The base image.
        path: PathBuf,
        /// The overlay path (a temp dir path for ephemeral overlays).
        overlay: PathBuf,
        /// The OS or imago error.
        reason: String,
    },
    /// The ephemeral overlay's temp dir cannot be created.
    #[error("--disk {}: cannot create a temporary overlay (check TMPDIR): {reason}", path.display())]
    TempOverlay {
        /// The base image.
        path: PathBuf,
        /// The OS error.
        reason: String,
    },
}

/// An error's text on one line (imago chains context with newlines in a few places).
pub(crate) fn one_line(e: &dyn fmt::Display) -> String {
    e.to_string().replace('\n', "; ")
}
