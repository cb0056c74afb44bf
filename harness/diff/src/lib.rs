//! `kiln diff img`: kiln's `img` answers against qemu-img's, per version profile; `kiln diff
//! run` ([`runs`]): each scenario on kiln's VMM and on QEMU, compared fact by fact.

pub mod generate;
pub mod log;
pub mod ops;
pub mod produce;
pub mod profile;
pub mod rules;
pub mod scenarios;
pub mod show;

use std::path::{Path, PathBuf};

/// A temporary directory could not be created.
#[derive(Debug, thiserror::Error)]
#[error("temporary directory: {0}")]
pub struct TempDirError(#[source] pub std::io::Error);

/// A directory removed on drop (the generated corpus when `--keep` is not given).
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh directory under the system temp dir.
    pub fn new(prefix: &str) -> std::io::Result<Self> {
        let base = std::env::temp_dir();
        for n in 0..1000u32 {
            let p = base.join(format!("{prefix}-{}-{n}", std::process::id()));
            match std::fs::create_dir(&p) {
                Ok(()) => return Ok(TempDir(p)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other("no free temporary directory name"))
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
