//! virtio-fs (virtio 1.2 §5.11): an in-process FUSE server over the virtqueues, sharing one host
//! directory with the guest.
//!
//! The FUSE protocol, the virtio-fs descriptor readers/writers and the hardened passthrough file
//! system come from `fuse-backend-rs`. kiln adds the device ([`VirtioFs`]), the error answer for
//! requests the server could not parse, and a wrapper file system (`confine.rs`) that makes
//! read-only shares refuse every mutation and keeps `..` from leaving the shared directory.
//!
//! Confinement rests on these properties, each covered by a test in `tests.rs`:
//! - every host path operation is an `openat`-style call on a directory fd the server holds,
//!   with a single name component: names containing `/` are refused with EINVAL, `..` on the
//!   shared root resolves to the root itself;
//! - lookups open with `O_PATH | O_NOFOLLOW`, so a symlink is an inode of its own and is never
//!   traversed by the host (the guest reads its target with READLINK and resolves it itself);
//!   a symlink inode cannot be opened, read or used as a directory;
//! - inode and handle numbers are keys into the server's tables, so a forged one is EBADF or
//!   ENOENT, never a host object.

mod confine;
mod device;
#[cfg(test)]
mod tests;

pub use device::VirtioFs;

use std::path::PathBuf;

/// Longest mount tag the config space can carry (virtio 1.2 §5.11.4).
pub const TAG_MAX_LEN: usize = 36;

/// Why a share cannot be served; each names the share by its tag and directory.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag is empty.
    #[error("share \"\": the tag is empty; a tag has 1 to {TAG_MAX_LEN} bytes")]
    EmptyTag,
    /// The tag does not fit the config space.
    #[error("share {tag}: the tag is {len} bytes long; at most {TAG_MAX_LEN} bytes fit in the virtio-fs config space")]
    TagTooLong {
        /// The tag given.
        tag: String,
        /// Its length in bytes.
        len: usize,
    },
    /// The tag contains a NUL byte, which would cut it short in the guest.
    #[error("share {tag:?}: the tag contains a NUL byte")]
    TagHasNul {
        /// The tag given.
        tag: String,
    },
    /// The shared directory does not exist or cannot be inspected.
    #[error("share {tag} ({}): cannot use the directory: {source}", dir.display())]
    DirUnusable {
        /// The tag given.
        tag: String,
        /// The directory given.
        dir: PathBuf,
        /// What the host said.
        source: std::io::Error,
    },
    /// The shared path is not a directory.
    #[error("share {tag} ({}): not a directory", dir.display())]
    NotADir {
        /// The tag given.
        tag: String,
        /// The path given.
        dir: PathBuf,
    },
    /// The shared path is not valid UTF-8 (the passthrough backend takes its root as a string).
    #[error("share {tag} ({}): the directory path is not valid UTF-8", dir.display())]
    NonUtf8Dir {
        /// The tag given.
        tag: String,
        /// The path given.
        dir: PathBuf,
    },
    /// The passthrough file system could not be set up.
    #[error("share {tag} ({}): cannot start the file server: {source}", dir.display())]
    Backend {
        /// The tag given.
        tag: String,
        /// The directory given.
        dir: PathBuf,
        /// What the backend said.
        source: std::io::Error,
    },
}
