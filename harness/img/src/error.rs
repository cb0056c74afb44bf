//! The one error type of `kiln img`: every message is one line naming the file, field and value.

use std::path::{Path, PathBuf};

/// What went wrong while reading an image; `Display` is a single line.
#[derive(Debug, thiserror::Error)]
pub enum ImgError {
    /// The file could not be opened or read.
    #[error("{}: {what}: {source}", .path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    /// The file ends before a structure it must contain.
    #[error("{}: truncated: {field} needs {needed} bytes at offset {offset}, file has {len}", .path.display())]
    Truncated {
        path: PathBuf,
        field: &'static str,
        offset: u64,
        needed: u64,
        len: u64,
    },
    /// A header field holds a value qcow2 does not allow.
    #[error("{}: qcow2 header field {field} = {value}: {expected}", .path.display())]
    Field {
        path: PathBuf,
        field: &'static str,
        value: String,
        expected: String,
    },
    /// Backing files refer back to an image already in the chain.
    #[error("backing file loop: {0}")]
    BackingLoop(String),
    /// The image uses a feature kiln's disk layer cannot do I/O on.
    #[error("{}: unsupported ({feature})", .path.display())]
    Unsupported { path: PathBuf, feature: String },
    /// Metadata points somewhere it must not (e.g. past the end of the file).
    #[error("{}: {msg}", .path.display())]
    Corrupt { path: PathBuf, msg: String },
    /// `kiln img create` refused or failed to make `file`.
    #[error("{file}: {source}")]
    Create {
        file: String,
        source: crate::create::CreateError,
    },
    /// `kiln img convert` failed to write `dst` as `fmt`.
    #[error("{dst}: error while converting {}: {source}", .fmt.name())]
    Convert {
        dst: String,
        fmt: crate::opts::ImgFormat,
        source: Box<crate::convert::ConvertError>,
    },
    /// A usage problem (bad argument combination) not tied to one file.
    #[error("{0}")]
    Usage(String),
}

impl ImgError {
    /// An I/O error on `path` while doing `what`.
    pub fn io(path: &Path, what: &'static str, source: std::io::Error) -> Self {
        ImgError::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    }

    /// A header field with a bad value.
    pub fn field(
        path: &Path,
        field: &'static str,
        value: impl std::fmt::Display,
        expected: impl Into<String>,
    ) -> Self {
        ImgError::Field {
            path: path.to_path_buf(),
            field,
            value: value.to_string(),
            expected: expected.into(),
        }
    }

    /// Metadata that points somewhere invalid.
    pub fn corrupt(path: &Path, msg: impl Into<String>) -> Self {
        ImgError::Corrupt {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }

    /// True for the "unsupported (feature)" class, which the diff reports as such.
    pub fn is_unsupported(&self) -> bool {
        matches!(self, ImgError::Unsupported { .. })
    }
}
