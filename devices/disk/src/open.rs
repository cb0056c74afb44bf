//! Turning a [`DiskSpec`] into a [`DiskBackend`]: format detection, the mode's rules, and errors
//! that leave nothing behind.

use std::io;
use std::path::PathBuf;

use crate::backend::DiskBackend;
use crate::error::{one_line, DiskError};
use crate::format::{detect_format, ImageFormat};
use crate::qcow2::{OverlayLocation, Qcow2Disk, Qcow2Error};
use crate::raw::RawDisk;
use crate::spec::{DiskMode, DiskSpec};

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
                    .map_err(|e| match e.kind() {
                        io::ErrorKind::Unsupported if !read_only => DiskError::NotWritable {
                            path: path.clone(),
                            reason: one_line(&e),
                        },
                        _ => open_err(e),
                    }),
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
    use std::fs;

    use super::*;
    use crate::test_util::assert_message;

    fn open_err(spec: &DiskSpec) -> DiskError {
        match open_disk(spec) {
            Ok(_) => panic!("{spec:?} opened"),
            Err(e) => e,
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
        let mut h = crate::qcow2::QCOW2_MAGIC.to_vec();
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
            (qcow2_header(3, 40), "truncated: header needs 72 bytes"),
            (qcow2_header(1, 104), "version = 1: expected 2 or 3"),
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
        assert_message(&err, existing.to_str().unwrap(), "already exists");
        let option_form = err.with_option("--disk").to_string();
        assert!(option_form.contains(",overlay="), "{option_form}");
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
}
