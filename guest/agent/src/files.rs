//! File put/get: which paths are allowed, size limits, digest checks, atomic writes.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use kiln_agent_proto::{sha256_hex, GetRequest, Message, PutRequest, MAX_FILE_LEN};

/// Why a put or get was refused.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The path is relative or has `.`/`..` components.
    #[error("{op} {path:?}: path must be absolute without . or .. components")]
    BadPath {
        /// "put" or "get".
        op: &'static str,
        /// The requested path.
        path: String,
    },
    /// The path (after resolving symlinks) lies outside every allowed root.
    #[error("{op} {path:?}: outside the allowed roots {roots}")]
    OutsideRoots {
        /// "put" or "get".
        op: &'static str,
        /// The requested path.
        path: String,
        /// The allowed roots, comma-separated.
        roots: String,
    },
    /// The data does not hash to the digest sent with it.
    #[error("put {path:?}: sha256 mismatch: request says {expected}, data hashes to {actual}")]
    Sha256Mismatch {
        /// The requested path.
        path: String,
        /// The digest in the request.
        expected: String,
        /// The digest of the data.
        actual: String,
    },
    /// The file is over the limit.
    #[error("{op} {path:?}: {len} bytes exceed the {max}-byte limit")]
    TooLarge {
        /// "put" or "get".
        op: &'static str,
        /// The requested path.
        path: String,
        /// The file size.
        len: u64,
        /// The limit that applies.
        max: u64,
    },
    /// `get` of something that is not a regular file.
    #[error("get {path:?}: not a regular file")]
    NotAFile {
        /// The requested path.
        path: String,
    },
    /// The file system said no.
    #[error("{op} {path:?}: {action}: {source}")]
    Io {
        /// "put" or "get".
        op: &'static str,
        /// The requested path.
        path: String,
        /// What the agent was doing.
        action: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Where put/get may touch files, and how large they may be.
#[derive(Debug, Clone)]
pub struct FilePolicy {
    roots: Vec<PathBuf>,
    max_len: u64,
}

impl Default for FilePolicy {
    fn default() -> Self {
        FilePolicy {
            roots: vec![PathBuf::from("/")],
            max_len: MAX_FILE_LEN,
        }
    }
}

impl FilePolicy {
    /// Allow files under `roots` (resolved now; roots that do not exist are dropped) up to the
    /// protocol's file limit.
    pub fn new(roots: &[PathBuf]) -> Self {
        FilePolicy {
            roots: roots
                .iter()
                .filter_map(|r| fs::canonicalize(r).ok())
                .collect(),
            max_len: MAX_FILE_LEN,
        }
    }

    fn roots_text(&self) -> String {
        let names: Vec<_> = self.roots.iter().map(|r| r.display().to_string()).collect();
        if names.is_empty() {
            "(none)".into()
        } else {
            names.join(",")
        }
    }

    fn check_syntax<'a>(op: &'static str, path: &'a str) -> Result<&'a Path, FileError> {
        let p = Path::new(path);
        let clean = p.is_absolute()
            && p.components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
            && !path.ends_with('/');
        if clean {
            Ok(p)
        } else {
            Err(FileError::BadPath {
                op,
                path: path.to_owned(),
            })
        }
    }

    fn check_inside(&self, op: &'static str, path: &str, resolved: &Path) -> Result<(), FileError> {
        if self.roots.iter().any(|root| resolved.starts_with(root)) {
            Ok(())
        } else {
            Err(FileError::OutsideRoots {
                op,
                path: path.to_owned(),
                roots: self.roots_text(),
            })
        }
    }

    /// Write a file atomically (temporary file + rename) after checking path, size and digest.
    pub fn put(&self, request: &PutRequest) -> Result<(), FileError> {
        let path = request.path.as_str();
        let target = Self::check_syntax("put", path)?;
        let len = request.data.len() as u64;
        if len > self.max_len {
            return Err(FileError::TooLarge {
                op: "put",
                path: path.to_owned(),
                len,
                max: self.max_len,
            });
        }
        let actual = sha256_hex(&request.data);
        if !actual.eq_ignore_ascii_case(&request.sha256) {
            return Err(FileError::Sha256Mismatch {
                path: path.to_owned(),
                expected: request.sha256.clone(),
                actual,
            });
        }
        let (parent, name) = match (target.parent(), target.file_name()) {
            (Some(parent), Some(name)) => (parent, name),
            _ => {
                return Err(FileError::BadPath {
                    op: "put",
                    path: path.to_owned(),
                })
            }
        };
        // Check the deepest existing ancestor, symlinks resolved, before creating anything.
        let existing = parent
            .ancestors()
            .find(|a| a.exists())
            .unwrap_or(Path::new("/"));
        let resolved = canonicalize("put", path, existing)?;
        self.check_inside("put", path, &resolved)?;
        let io = |action: &'static str| {
            move |source| FileError::Io {
                op: "put",
                path: path.to_owned(),
                action,
                source,
            }
        };
        fs::create_dir_all(parent).map_err(io("creating parent directories"))?;
        let parent = canonicalize("put", path, parent)?;
        self.check_inside("put", path, &parent)?;

        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let temp = parent.join(format!(
            ".{}.kiln-put.{}.{}",
            name.to_string_lossy(),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> Result<(), FileError> {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temp)
                .map_err(io("creating the temporary file"))?;
            file.write_all(&request.data).map_err(io("writing"))?;
            file.sync_all().map_err(io("syncing"))?;
            fs::set_permissions(&temp, fs::Permissions::from_mode(request.mode & 0o7777))
                .map_err(io("setting the mode"))?;
            fs::rename(&temp, parent.join(name)).map_err(io("renaming into place"))
        };
        write().inspect_err(|_| {
            let _ = fs::remove_file(&temp);
        })
    }

    /// Read a file after checking path and size; answers with `FileData`.
    pub fn get(&self, request: &GetRequest) -> Result<Message, FileError> {
        let path = request.path.as_str();
        let target = Self::check_syntax("get", path)?;
        let resolved = canonicalize("get", path, target)?;
        self.check_inside("get", path, &resolved)?;
        let io = |action: &'static str| {
            move |source| FileError::Io {
                op: "get",
                path: path.to_owned(),
                action,
                source,
            }
        };
        let meta = fs::metadata(&resolved).map_err(io("reading metadata"))?;
        if !meta.is_file() {
            return Err(FileError::NotAFile {
                path: path.to_owned(),
            });
        }
        let max = request.max_size.min(self.max_len);
        if meta.len() > max {
            return Err(FileError::TooLarge {
                op: "get",
                path: path.to_owned(),
                len: meta.len(),
                max,
            });
        }
        let data = fs::read(&resolved).map_err(io("reading"))?;
        // The file may have grown between stat and read.
        if data.len() as u64 > max {
            return Err(FileError::TooLarge {
                op: "get",
                path: path.to_owned(),
                len: data.len() as u64,
                max,
            });
        }
        Ok(Message::FileData {
            sha256: sha256_hex(&data),
            mode: meta.permissions().mode() & 0o7777,
            data,
        })
    }
}

fn canonicalize(op: &'static str, path: &str, p: &Path) -> Result<PathBuf, FileError> {
    fs::canonicalize(p).map_err(|source| FileError::Io {
        op,
        path: path.to_owned(),
        action: "resolving the path",
        source,
    })
}
