//! What a user asks for with `--disk PATH[,ro][,overlay=PATH][,in-place]`, and turning that into
//! a disk backend: format detection, the mode's rules, and one-line errors naming the option.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::disk::{DiskBackend, OverlayLocation, Qcow2Disk, Qcow2Error, RawDisk};

/// How a disk image is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskMode {
    /// Default: writes go to a fresh qcow2 overlay in a temp dir, deleted afterwards; the image
    /// is opened read-only and never written.
    EphemeralOverlay,
    /// `overlay=PATH`: like the default, but the overlay is created at PATH (which must not
    /// exist) and kept, for inspection with `qemu-img`/`kiln img`.
    KeptOverlay(PathBuf),
    /// `ro`: the image itself as a read-only device (VIRTIO_BLK_F_RO).
    ReadOnly,
    /// `in-place`: the guest writes the image itself (raw or qcow2). Opt-in, since it is the
    /// one mode that modifies the user's file.
    InPlace,
}

/// One `--disk` value: the image and how to attach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The image (the base of an overlay); raw or qcow2, detected from its header.
    pub path: PathBuf,
    /// How it is attached.
    pub mode: DiskMode,
}

impl DiskSpec {
    /// A disk with an ephemeral copy-on-write overlay over `path` (the default).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            mode: DiskMode::EphemeralOverlay,
        }
    }
}

/// Image formats kiln reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// Plain bytes.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
}

impl ImageFormat {
    /// The name qcow2 headers and `qemu-img -f` use.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

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
fn one_line(e: &dyn fmt::Display) -> String {
    e.to_string().replace('\n', "; ")
}

const OPTIONS_HELP: &str = "expected PATH[,ro][,overlay=PATH][,in-place]";

impl FromStr for DiskSpec {
    type Err = DiskError;

    /// Parses `PATH[,ro][,overlay=PATH][,in-place]`; a literal comma in a path is written `,,`.
    fn from_str(s: &str) -> Result<Self, DiskError> {
        let bad = |reason: String| DiskError::BadSpec {
            spec: s.to_string(),
            reason,
        };
        let mut parts = split_escaped(s).into_iter();
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(bad(format!("empty image path ({OPTIONS_HELP})")));
        }
        let mut mode: Option<(String, DiskMode)> = None;
        for opt in parts {
            let next = match opt.as_str() {
                "ro" => DiskMode::ReadOnly,
                "in-place" => DiskMode::InPlace,
                o if o.starts_with("overlay=") => {
                    let p = &o["overlay=".len()..];
                    if p.is_empty() {
                        return Err(bad("overlay= needs a path".to_string()));
                    }
                    DiskMode::KeptOverlay(PathBuf::from(p))
                }
                o => return Err(bad(format!("unknown option {o:?} ({OPTIONS_HELP})"))),
            };
            if let Some((prev, _)) = &mode {
                return Err(bad(format!(
                    "{prev:?} and {opt:?} conflict: choose one of ro, overlay=PATH, in-place"
                )));
            }
            mode = Some((opt, next));
        }
        Ok(DiskSpec {
            path: PathBuf::from(path),
            mode: mode.map_or(DiskMode::EphemeralOverlay, |(_, m)| m),
        })
    }
}

/// Splits at single commas; `,,` stands for a literal comma.
fn split_escaped(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != ',' {
            current.push(c);
        } else if chars.peek() == Some(&',') {
            chars.next();
            current.push(',');
        } else {
            parts.push(std::mem::take(&mut current));
        }
    }
    parts.push(current);
    parts
}

/// Formats kiln recognises by magic only to refuse them with a clear message.
const FOREIGN_MAGICS: &[(usize, &[u8], &str)] = &[
    (0, b"QED\0", "QED"),
    (0, b"KDMV", "VMDK"),
    (0, b"# Disk DescriptorFile", "VMDK"),
    (0, b"vhdxfile", "VHDX"),
    (0, b"conectix", "VHD"),
    (0, b"LUKS\xba\xbe", "LUKS"),
    (0x40, b"\x7f\x10\xda\xbe", "VDI"),
];

const QCOW2_MAGIC: &[u8] = b"QFI\xfb";
/// A qcow2 v2 header's fixed part; v3 needs more, which imago checks.
const QCOW2_MIN_HEADER: usize = 72;

/// Detects the image format from its header; anything not recognised is raw.
pub fn detect_format(path: &Path) -> Result<ImageFormat, DiskError> {
    let open_err = |e: io::Error| DiskError::Open {
        path: path.to_path_buf(),
        reason: one_line(&e),
    };
    let meta = fs::metadata(path).map_err(open_err)?;
    if meta.is_dir() {
        return Err(open_err(io::Error::from(io::ErrorKind::IsADirectory)));
    }
    let file = fs::File::open(path).map_err(open_err)?;
    let mut head = [0u8; 512];
    let n = read_prefix(&file, &mut head).map_err(open_err)?;
    let head = &head[..n];
    if n == 0 {
        return Err(DiskError::Empty {
            path: path.to_path_buf(),
        });
    }
    if head.starts_with(QCOW2_MAGIC) {
        let bad = |reason: String| DiskError::BadQcow2 {
            path: path.to_path_buf(),
            reason,
        };
        if n < QCOW2_MIN_HEADER {
            return Err(bad(format!(
                "header truncated ({n} bytes, at least {QCOW2_MIN_HEADER} needed)"
            )));
        }
        let version = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        if version != 2 && version != 3 {
            return Err(bad(format!("version {version} (expected 2 or 3)")));
        }
        return Ok(ImageFormat::Qcow2);
    }
    for (offset, magic, format) in FOREIGN_MAGICS {
        if head.get(*offset..).is_some_and(|h| h.starts_with(magic)) {
            return Err(DiskError::UnknownFormat {
                path: path.to_path_buf(),
                format,
            });
        }
    }
    Ok(ImageFormat::Raw)
}

/// Reads up to `buf.len()` bytes from the start of `file` (short files give fewer).
fn read_prefix(file: &fs::File, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], done as u64) {
            Ok(0) => break,
            Ok(k) => done += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Opens the disk a [`DiskSpec`] describes. On error nothing is left behind (no overlay file).
pub fn open_disk(spec: &DiskSpec) -> Result<Box<dyn DiskBackend>, DiskError> {
    let path = &spec.path;
    let format = detect_format(path)?;
    let open_err = |e: io::Error| match format {
        ImageFormat::Raw => DiskError::Open {
            path: path.clone(),
            reason: one_line(&e),
        },
        ImageFormat::Qcow2 => DiskError::BadQcow2 {
            path: path.clone(),
            reason: one_line(&e),
        },
    };
    let location = match &spec.mode {
        DiskMode::ReadOnly | DiskMode::InPlace => {
            let read_only = spec.mode == DiskMode::ReadOnly;
            return match format {
                ImageFormat::Raw => RawDisk::open(path, read_only)
                    .map(|d| Box::new(d) as Box<dyn DiskBackend>)
                    .map_err(open_err),
                ImageFormat::Qcow2 => Qcow2Disk::open(path, read_only)
                    .map(|d| Box::new(d) as Box<dyn DiskBackend>)
                    .map_err(open_err),
            };
        }
        DiskMode::EphemeralOverlay => OverlayLocation::Ephemeral,
        DiskMode::KeptOverlay(p) => OverlayLocation::Kept(p.clone()),
    };
    let overlay_path = match &location {
        OverlayLocation::Kept(p) => p.clone(),
        OverlayLocation::Ephemeral => PathBuf::from("<temporary>"),
    };
    Qcow2Disk::create_overlay(path, format, &location)
        .map(|d| Box::new(d) as Box<dyn DiskBackend>)
        .map_err(|e| match e {
            Qcow2Error::Base(e) => open_err(e),
            Qcow2Error::OverlayExists => DiskError::OverlayExists {
                path: path.clone(),
                overlay: overlay_path,
            },
            Qcow2Error::OverlayCreate(e) if location == OverlayLocation::Ephemeral => {
                DiskError::TempOverlay {
                    path: path.clone(),
                    reason: one_line(&e),
                }
            }
            Qcow2Error::OverlayCreate(e) | Qcow2Error::OverlayFormat(e) => {
                DiskError::OverlayNotWritable {
                    path: path.clone(),
                    overlay: overlay_path,
                    reason: one_line(&e),
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::disk::tests::{have_qemu_img, qemu_img};

    fn parse(s: &str) -> Result<DiskSpec, DiskError> {
        s.parse()
    }

    fn mode(s: &str) -> DiskMode {
        parse(s).unwrap().mode
    }

    /// One line, starting with the option and naming `value`.
    fn assert_message(err: &DiskError, value: &str, needle: &str) {
        let msg = err.to_string();
        assert!(!msg.contains('\n'), "not one line: {msg}");
        assert!(msg.starts_with("--disk "), "{msg}");
        assert!(msg.contains(value), "{msg} does not name {value}");
        assert!(msg.contains(needle), "{msg} does not say {needle}");
    }

    fn open_err(spec: &DiskSpec) -> DiskError {
        match open_disk(spec) {
            Ok(_) => panic!("{spec:?} opened"),
            Err(e) => e,
        }
    }

    #[test]
    fn parse_modes() {
        assert_eq!(parse("a.img").unwrap(), DiskSpec::new("a.img"));
        assert_eq!(mode("a.img,ro"), DiskMode::ReadOnly);
        assert_eq!(mode("a.img,in-place"), DiskMode::InPlace);
        assert_eq!(
            mode("a.img,overlay=/tmp/o.qcow2"),
            DiskMode::KeptOverlay("/tmp/o.qcow2".into())
        );
        let spec = parse("dir,,x/a.img,overlay=o,,1.qcow2").unwrap();
        assert_eq!(spec.path, PathBuf::from("dir,x/a.img"));
        assert_eq!(spec.mode, DiskMode::KeptOverlay("o,1.qcow2".into()));
    }

    #[test]
    fn parse_errors() {
        for (s, needle) in [
            ("", "empty image path"),
            (",ro", "empty image path"),
            ("a.img,rw", "unknown option \"rw\""),
            ("a.img,", "unknown option \"\""),
            ("a.img,overlay=", "overlay= needs a path"),
            ("a.img,ro,in-place", "conflict"),
            ("a.img,ro,overlay=o", "conflict"),
            ("a.img,overlay=o,overlay=p", "conflict"),
        ] {
            assert_message(&parse(s).unwrap_err(), &format!("{s:?}"), needle);
        }
    }

    #[test]
    fn missing_directory_and_empty_images() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.img");
        let err = open_err(&DiskSpec::new(&missing));
        assert!(matches!(err, DiskError::Open { .. }));
        assert_message(&err, missing.to_str().unwrap(), "No such file");

        let err = open_err(&DiskSpec::new(dir.path()));
        assert_message(&err, dir.path().to_str().unwrap(), "directory");

        let empty = dir.path().join("empty.img");
        fs::write(&empty, b"").unwrap();
        let err = open_err(&DiskSpec::new(&empty));
        assert!(matches!(err, DiskError::Empty { .. }));
        assert_message(&err, "empty.img", "empty");
    }

    #[test]
    fn foreign_formats_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for (name, head, format) in [
            ("a.vmdk", b"KDMV\x01\0\0\0".to_vec(), "VMDK"),
            ("a.qed", b"QED\0".to_vec(), "QED"),
            ("a.vhdx", b"vhdxfile".to_vec(), "VHDX"),
            (
                "a.vdi",
                [vec![0u8; 0x40], b"\x7f\x10\xda\xbe".to_vec()].concat(),
                "VDI",
            ),
        ] {
            let path = dir.path().join(name);
            fs::write(&path, [head, vec![0u8; 1024]].concat()).unwrap();
            let err = open_err(&DiskSpec::new(&path));
            assert!(matches!(err, DiskError::UnknownFormat { .. }), "{err}");
            assert_message(&err, name, format);
        }
    }

    /// A qcow2 header: magic, `version`, then `fill` for the rest of 104 bytes.
    fn qcow2_header(version: u32, len: usize) -> Vec<u8> {
        let mut h = b"QFI\xfb".to_vec();
        h.extend_from_slice(&version.to_be_bytes());
        h.resize(len, 0);
        h
    }

    #[test]
    fn corrupt_qcow2_headers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.qcow2");
        let overlay = dir.path().join("overlay.qcow2");
        let mut corrupt = qcow2_header(3, 104);
        corrupt[20..24].copy_from_slice(&99u32.to_be_bytes()); // cluster_bits
        corrupt[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes()); // size
        for (bytes, needle) in [
            (qcow2_header(3, 40), "header truncated"),
            (qcow2_header(1, 104), "version 1"),
            (corrupt, "qcow2"),
        ] {
            fs::write(&path, &bytes).unwrap();
            for spec in [
                DiskSpec::new(&path),
                DiskSpec {
                    path: path.clone(),
                    mode: DiskMode::ReadOnly,
                },
                DiskSpec {
                    path: path.clone(),
                    mode: DiskMode::KeptOverlay(overlay.clone()),
                },
            ] {
                let err = open_err(&spec);
                assert!(matches!(err, DiskError::BadQcow2 { .. }), "{err}");
                assert_message(&err, "bad.qcow2", needle);
                assert!(!overlay.exists(), "an overlay was left behind");
            }
        }
    }

    #[test]
    fn overlay_path_problems() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        fs::write(&base, vec![7u8; 65536]).unwrap();
        let existing = dir.path().join("exists.qcow2");
        fs::write(&existing, b"keep me").unwrap();

        let kept = |overlay: PathBuf| DiskSpec {
            path: base.clone(),
            mode: DiskMode::KeptOverlay(overlay),
        };
        let err = open_err(&kept(existing.clone()));
        assert!(matches!(err, DiskError::OverlayExists { .. }));
        assert_message(&err, "overlay=", "already exists");
        assert_eq!(fs::read(&existing).unwrap(), b"keep me");

        // Naming the base itself as the overlay must not touch it.
        let err = open_err(&kept(base.clone()));
        assert!(matches!(err, DiskError::OverlayExists { .. }));
        assert_eq!(fs::read(&base).unwrap(), vec![7u8; 65536]);

        let nowhere = dir.path().join("no-such-dir").join("o.qcow2");
        let err = open_err(&kept(nowhere.clone()));
        assert!(matches!(err, DiskError::OverlayNotWritable { .. }));
        assert_message(&err, nowhere.to_str().unwrap(), "cannot create the overlay");
    }

    #[test]
    fn detects_formats() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("tiny.raw");
        fs::write(&raw, b"x").unwrap();
        assert_eq!(detect_format(&raw).unwrap(), ImageFormat::Raw);
        if !have_qemu_img() {
            return;
        }
        let q = dir.path().join("q.qcow2");
        let (ok, out) = qemu_img(&["create", "-f", "qcow2", q.to_str().unwrap(), "1M"]).unwrap();
        assert!(ok, "{out}");
        assert_eq!(detect_format(&q).unwrap(), ImageFormat::Qcow2);
    }
}
