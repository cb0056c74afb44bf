//! The one error type of `kiln img`: every message is one line naming the file, field and value.

use std::path::{Path, PathBuf};

use kiln_disk::qcow2::{HeaderError, HeaderErrorKind};

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

/// kiln-disk's header errors, as the same `kiln img` errors (messages and exit codes) the header
/// parser gave when it lived in this crate.
impl From<HeaderError> for ImgError {
    fn from(e: HeaderError) -> Self {
        let path = e.path;
        match e.kind {
            HeaderErrorKind::Io { what, source } => ImgError::Io { path, what, source },
            HeaderErrorKind::Truncated {
                field,
                offset,
                needed,
                len,
            } => ImgError::Truncated {
                path,
                field,
                offset,
                needed,
                len,
            },
            HeaderErrorKind::Field {
                field,
                value,
                expected,
            } => ImgError::Field {
                path,
                field,
                value,
                expected,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each kind of header error keeps its `kiln img` variant and its exact message.
    #[test]
    fn header_errors_keep_their_img_form() {
        let dir = tempfile::tempdir().expect("tempdir");
        let short = dir.path().join("short.qcow2");
        std::fs::write(&short, kiln_disk::qcow2::QCOW2_MAGIC).expect("write");
        let mut v9 = kiln_disk::qcow2::QCOW2_MAGIC.to_vec();
        v9.extend_from_slice(&9u32.to_be_bytes());
        v9.resize(512, 0);
        let bad_version = dir.path().join("v9.qcow2");
        std::fs::write(&bad_version, v9).expect("write");
        let missing = dir.path().join("missing.qcow2");
        for (path, variant) in [
            (short, "Truncated"),
            (bad_version, "Field"),
            (missing, "Io"),
        ] {
            let header = kiln_disk::qcow2::read_header(&path).unwrap_err();
            let text = header.to_string();
            let img = ImgError::from(header);
            assert_eq!(img.to_string(), text);
            assert!(format!("{img:?}").starts_with(variant), "{img:?}");
            assert!(text.starts_with(&path.display().to_string()), "{text}");
        }
    }
}
