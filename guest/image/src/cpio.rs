//! A deterministic initramfs writer: the cpio "newc" format the kernel unpacks, written by hand
//! (the format is a 110-byte ASCII header per entry; the cpio crates on crates.io either read
//! only or do not control inode numbers and timestamps, which reproducibility needs).
//!
//! Determinism: entries are sorted by path, inode numbers are assigned 1, 2, … in that order,
//! mtime is 0, uid/gid are 0, and the gzip header carries no name and mtime 0.

use std::collections::BTreeMap;
use std::io::{self, Write};

use flate2::write::GzEncoder;
use flate2::{Compression, GzBuilder};

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;
const S_IFBLK: u32 = 0o060000;

/// The newc magic.
const MAGIC: &[u8; 6] = b"070701";

/// The name of the end-of-archive entry.
const TRAILER: &str = "TRAILER!!!";

/// Why an initramfs could not be built or written.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// A path is empty, has `..` components, or a NUL byte.
    #[error("initramfs path {path:?} is invalid: {reason}")]
    BadPath {
        /// The path as given.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two entries were added at one path.
    #[error("initramfs path {path:?} added twice")]
    Duplicate {
        /// The normalised path.
        path: String,
    },
    /// A path is used both as a directory and as a non-directory.
    #[error("initramfs path {path:?} is a parent of {child:?} but is not a directory")]
    NotADirectory {
        /// The non-directory entry.
        path: String,
        /// An entry below it.
        child: String,
    },
    /// A file is larger than newc's 32-bit size field.
    #[error("initramfs file {path:?} is {len} bytes; cpio newc holds at most 4 GiB - 1")]
    TooLarge {
        /// The path.
        path: String,
        /// Its size.
        len: usize,
    },
    /// Writing the archive failed.
    #[error("writing the initramfs failed: {0}")]
    Io(#[from] io::Error),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    CharDevice { major: u32, minor: u32 },
    BlockDevice { major: u32, minor: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    mode: u32,
    kind: Kind,
}

/// An initramfs under construction. Paths are relative to the guest's root (a leading `/` is
/// accepted and dropped); missing parent directories are added with mode 0755.
#[derive(Debug, Default)]
pub struct Initramfs {
    entries: BTreeMap<String, Entry>,
    /// Errors from adders, reported by `write` so adders can be chained.
    errors: Vec<InitramfsError>,
}

impl Initramfs {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a directory with permission bits `mode`.
    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.add(path, mode, Kind::Dir)
    }

    /// Add a regular file with permission bits `mode`.
    pub fn file(&mut self, path: &str, mode: u32, data: impl Into<Vec<u8>>) -> &mut Self {
        self.add(path, mode, Kind::File(data.into()))
    }

    /// Add a symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.add(path, 0o777, Kind::Symlink(target.to_owned()))
    }

    /// Add a character device node (e.g. `dev/console`, 5:1, which the kernel opens for init).
    pub fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> &mut Self {
        self.add(path, mode, Kind::CharDevice { major, minor })
    }

    /// Add a block device node.
    pub fn block_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> &mut Self {
        self.add(path, mode, Kind::BlockDevice { major, minor })
    }

    fn add(&mut self, path: &str, mode: u32, kind: Kind) -> &mut Self {
        match normalize(path) {
            Ok(name) => {
                let entry = Entry {
                    mode: mode & 0o7777,
                    kind,
                };
                if self.entries.insert(name.clone(), entry).is_some() {
                    self.errors.push(InitramfsError::Duplicate { path: name });
                }
            }
            Err(e) => self.errors.push(e),
        }
        self
    }

    /// The entries with implicit parent directories added, checked for consistency.
    fn complete(&self) -> Result<BTreeMap<String, Entry>, InitramfsError> {
        if let Some(e) = self.errors.first() {
            return Err(clone_error(e));
        }
        let mut all = self.entries.clone();
        for path in self.entries.keys() {
            let mut parent = path.as_str();
            while let Some((dir, _)) = parent.rsplit_once('/') {
                match all.get(dir) {
                    Some(Entry {
                        kind: Kind::Dir, ..
                    }) => {}
                    Some(_) => {
                        return Err(InitramfsError::NotADirectory {
                            path: dir.to_owned(),
                            child: path.clone(),
                        })
                    }
                    None => {
                        all.insert(
                            dir.to_owned(),
                            Entry {
                                mode: 0o755,
                                kind: Kind::Dir,
                            },
                        );
                    }
                }
                parent = dir;
            }
        }
        Ok(all)
    }

    /// Write the uncompressed newc archive.
    pub fn write<W: Write>(&self, mut out: W) -> Result<(), InitramfsError> {
        let entries = self.complete()?;
        let mut offset = 0usize;
        // BTreeMap order is byte order, so a directory always precedes what it contains.
        for (ino, (name, entry)) in (1u32..).zip(&entries) {
            let (type_bits, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match &entry.kind {
                Kind::Dir => (S_IFDIR, 2, &[], (0, 0)),
                Kind::File(data) => (S_IFREG, 1, data, (0, 0)),
                Kind::Symlink(target) => (S_IFLNK, 1, target.as_bytes(), (0, 0)),
                Kind::CharDevice { major, minor } => (S_IFCHR, 1, &[], (*major, *minor)),
                Kind::BlockDevice { major, minor } => (S_IFBLK, 1, &[], (*major, *minor)),
            };
            let size = u32::try_from(data.len()).map_err(|_| InitramfsError::TooLarge {
                path: name.clone(),
                len: data.len(),
            })?;
            let header = Header {
                ino,
                mode: type_bits | entry.mode,
                nlink,
                size,
                rdev,
            };
            offset += write_entry(&mut out, &header, name, data, offset)?;
        }
        let trailer = Header {
            ino: 0,
            mode: 0,
            nlink: 1,
            size: 0,
            rdev: (0, 0),
        };
        write_entry(&mut out, &trailer, TRAILER, &[], offset)?;
        out.flush()?;
        Ok(())
    }

    /// Write the archive gzip-compressed (best compression, header without name or mtime).
    pub fn write_gzip<W: Write>(&self, out: W) -> Result<(), InitramfsError> {
        let mut encoder: GzEncoder<W> = GzBuilder::new().mtime(0).write(out, Compression::best());
        self.write(&mut encoder)?;
        encoder.finish()?.flush()?;
        Ok(())
    }

    /// The uncompressed archive as bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, InitramfsError> {
        let mut out = Vec::new();
        self.write(&mut out)?;
        Ok(out)
    }
}

struct Header {
    ino: u32,
    mode: u32,
    nlink: u32,
    size: u32,
    rdev: (u32, u32),
}

/// Write one entry at archive offset `offset`; returns the bytes written (header, name, padding,
/// data, padding: newc aligns both the name's end and the data's end to 4 bytes).
fn write_entry<W: Write>(
    out: &mut W,
    header: &Header,
    name: &str,
    data: &[u8],
    offset: usize,
) -> io::Result<usize> {
    let name_size = name.len() + 1;
    let fields = [
        header.ino,
        header.mode,
        0, // uid
        0, // gid
        header.nlink,
        0, // mtime
        header.size,
        0, // devmajor
        0, // devminor
        header.rdev.0,
        header.rdev.1,
        u32::try_from(name_size)
            .map_err(|_| io::Error::other(format!("name {name:?} too long")))?,
        0, // check
    ];
    let mut head = Vec::with_capacity(110 + name_size + 3);
    head.extend_from_slice(MAGIC);
    for field in fields {
        head.extend_from_slice(format!("{field:08x}").as_bytes());
    }
    head.extend_from_slice(name.as_bytes());
    head.push(0);
    head.resize(head.len() + pad4(offset + head.len()), 0);
    out.write_all(&head)?;
    out.write_all(data)?;
    let end = offset + head.len() + data.len();
    let tail = pad4(end);
    out.write_all(&[0u8; 3][..tail])?;
    Ok(head.len() + data.len() + tail)
}

fn pad4(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// Drop leading `/` and `.` components, refuse empty paths, `..` components and NUL bytes.
fn normalize(path: &str) -> Result<String, InitramfsError> {
    let bad = |reason| InitramfsError::BadPath {
        path: path.to_owned(),
        reason,
    };
    if path.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.is_empty() {
        return Err(bad("names no file (the root exists already)"));
    }
    if parts.contains(&"..") {
        return Err(bad("has .. components"));
    }
    Ok(parts.join("/"))
}

/// `InitramfsError` holds an `io::Error` and is not `Clone`; adder errors never are I/O errors.
fn clone_error(e: &InitramfsError) -> InitramfsError {
    match e {
        InitramfsError::BadPath { path, reason } => InitramfsError::BadPath {
            path: path.clone(),
            reason,
        },
        InitramfsError::Duplicate { path } => InitramfsError::Duplicate { path: path.clone() },
        other => InitramfsError::Io(io::Error::other(other.to_string())),
    }
}

#[cfg(test)]
#[path = "cpio_tests.rs"]
mod tests;
