//! qcow2 images as disks, through `imago`: a user's image opened read-only or written in place,
//! and the copy-on-write overlay kiln creates per run over a raw or qcow2 base it never writes.
//! Images imago cannot read (extended L2, zstd) are read by kiln's own reader, which imago's raw
//! driver then serves like any other read-only image; such images are never written.

use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{
    DenyImplicitOpenGate, DynStorage, FormatAccess, FormatCreateBuilder, FormatDriverBuilder,
    PermissiveImplicitOpenGate, StorageOpenOptions,
};

use super::chain::{backing_path, chain_needs_reader, ChainStorage, ReadChain};
use super::header::read_header;
use crate::backend::{id_from_path, read_only_error, DiskBackend, DISK_ID_LEN};
use crate::format::ImageFormat;

/// Cluster size of the overlays kiln creates (qcow2's and QEMU's default).
const OVERLAY_CLUSTER_SIZE: u64 = 64 * 1024;

/// Storage of any kind (an imago file, or a chain kiln's reader serves), so that an overlay in a
/// file can sit on a base only kiln's reader reads.
type AnyStorage = Box<dyn DynStorage>;
/// An image opened through imago, over [`AnyStorage`].
type Access = FormatAccess<AnyStorage>;

/// Where a copy-on-write overlay lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverlayLocation {
    /// In a fresh temporary directory, deleted with the disk.
    Ephemeral,
    /// At this path, which must not exist yet; kept after the run.
    Kept(PathBuf),
}

/// A qcow2 image through imago: a user's image (read-only or in place), or a copy-on-write
/// overlay kiln created over a read-only base.
pub struct Qcow2Disk {
    // Dropped before `_temp_dir`: imago flushes the image in its `Drop`.
    image: Access,
    read_only: bool,
    /// Whether `flush` also syncs to stable storage (pointless for a throwaway overlay).
    sync_on_flush: bool,
    id: [u8; DISK_ID_LEN],
    cluster_size: u64,
    path: PathBuf,
    _temp_dir: Option<tempfile::TempDir>,
}

/// Why a qcow2 backend could not be set up; [`open_disk`](crate::open_disk) turns this into a
/// [`DiskError`](crate::DiskError).
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// The base image could not be opened (missing, unreadable, corrupt header).
    #[error("{0}")]
    Base(io::Error),
    /// The overlay file exists already.
    #[error("already exists")]
    OverlayExists,
    /// The overlay file could not be created.
    #[error("{0}")]
    OverlayCreate(io::Error),
    /// The overlay was created but imago could not format or open it.
    #[error("{0}")]
    OverlayFormat(io::Error),
}

impl Qcow2Disk {
    /// Opens the qcow2 image at `path` itself (no overlay): read-only, or written in place.
    /// An image only kiln's reader reads (extended L2, zstd) is refused for writing
    /// (`ErrorKind::Unsupported`).
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let header = read_header(path).ok();
        let image = match header.as_ref().and_then(|h| reader_feature(h)) {
            Some(feature) if !read_only => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("{feature}: kiln reads such images but does not write them"),
                ))
            }
            Some(_) => reader_access(path)?,
            None => {
                let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
                open_qcow2(path, file, !read_only)?
            }
        };
        Ok(Self {
            image,
            read_only,
            sync_on_flush: !read_only,
            id: id_from_path(path),
            cluster_size: header.map_or(OVERLAY_CLUSTER_SIZE, |h| h.cluster_size()),
            path: path.to_path_buf(),
            _temp_dir: None,
        })
    }

    /// Creates a fresh qcow2 overlay whose backing file is `base` (of format `format`), opened
    /// read-only. The overlay records the base by its absolute path.
    pub fn create_overlay(
        base: &Path,
        format: ImageFormat,
        location: &OverlayLocation,
    ) -> Result<Self, Qcow2Error> {
        let base = fs::canonicalize(base).map_err(Qcow2Error::Base)?;
        let backing = open_base(&base, format).map_err(Qcow2Error::Base)?;
        let size = backing.size();

        let (temp_dir, path) = match location {
            OverlayLocation::Ephemeral => {
                let dir = tempfile::Builder::new()
                    .prefix("kiln-disk-")
                    .tempdir()
                    .map_err(Qcow2Error::OverlayCreate)?;
                let path = dir.path().join("overlay.qcow2");
                (Some(dir), path)
            }
            OverlayLocation::Kept(path) => (None, path.clone()),
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => Qcow2Error::OverlayExists,
                _ => Qcow2Error::OverlayCreate(e),
            })?;

        let formatted = format_overlay(file, &path, &base, format, size, backing);
        let qcow2 = match formatted {
            Ok(q) => q,
            Err(e) => {
                // Nothing left behind: a half-written overlay at a kept path would block the
                // next attempt with "already exists".
                if temp_dir.is_none() {
                    let _ = fs::remove_file(&path);
                }
                return Err(Qcow2Error::OverlayFormat(e));
            }
        };
        let sync_on_flush = temp_dir.is_none();
        Ok(Self {
            image: FormatAccess::new(qcow2),
            read_only: false,
            sync_on_flush,
            id: id_from_path(&base),
            cluster_size: OVERLAY_CLUSTER_SIZE,
            path,
            _temp_dir: temp_dir,
        })
    }

    /// The qcow2 file this disk writes (the overlay, or the image itself).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What in `header` makes the image one only kiln's reader reads, if anything.
fn reader_feature(header: &super::Qcow2Header) -> Option<&'static str> {
    if header.extended_l2() {
        Some("extended L2 entries")
    } else if header.needs_kiln_reader() {
        Some("zstd compression")
    } else {
        None
    }
}

/// The chain at `path` read by kiln's reader, under imago's raw driver: a read-only image.
fn reader_access(path: &Path) -> io::Result<Access> {
    let storage: AnyStorage = Box::new(ChainStorage::new(ReadChain::open(path)?));
    Ok(FormatAccess::new(
        Raw::builder(storage)
            .write(false)
            .open(DenyImplicitOpenGate::default())?,
    ))
}

fn file_storage(file: fs::File, path: &Path, write: bool) -> io::Result<AnyStorage> {
    Ok(Box::new(ImagoFile::from_open_file(
        file,
        StorageOpenOptions::new().filename(path).write(write),
    )?))
}

/// Opens a qcow2 image imago reads. Its backing chain is opened read-only by imago (it forces
/// write(false) for backing files), except where a layer below needs kiln's reader: that part
/// is wired in explicitly.
fn open_qcow2(path: &Path, file: fs::File, write: bool) -> io::Result<Access> {
    let below = match read_header(path).ok().and_then(|h| h.backing_file) {
        Some(name) if chain_needs_reader(&backing_path(path, &name)) => {
            Some(reader_access(&backing_path(path, &name))?)
        }
        _ => None,
    };
    let mut builder = Qcow2::<AnyStorage>::builder(file_storage(file, path, write)?).write(write);
    if below.is_some() {
        builder = builder.backing(below);
    }
    Ok(FormatAccess::new(
        builder.open(PermissiveImplicitOpenGate::default())?,
    ))
}

/// Opens the base image read-only as an imago format layer.
fn open_base(base: &Path, format: ImageFormat) -> io::Result<Access> {
    if format == ImageFormat::Qcow2 && read_header(base).is_ok_and(|h| reader_feature(&h).is_some())
    {
        return reader_access(base);
    }
    let file = OpenOptions::new().read(true).open(base)?;
    Ok(match format {
        ImageFormat::Raw => FormatAccess::new(
            Raw::builder(file_storage(file, base, false)?)
                .write(false)
                .open(DenyImplicitOpenGate::default())?,
        ),
        ImageFormat::Qcow2 => open_qcow2(base, file, false)?,
    })
}

/// Writes a qcow2 header with `base` as backing file into `file` and opens it on top of
/// `backing`.
fn format_overlay(
    file: fs::File,
    path: &Path,
    base: &Path,
    format: ImageFormat,
    size: u64,
    backing: Access,
) -> io::Result<Qcow2<AnyStorage>> {
    let base_name = base.to_str().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("base path {} is not UTF-8", base.display()),
        )
    })?;
    Qcow2::<AnyStorage>::create_builder(file_storage(file, path, true)?)
        .cluster_size(OVERLAY_CLUSTER_SIZE as usize)
        .size(size)
        .backing(base_name.to_string(), format.name().to_string())
        .create_open(DenyImplicitOpenGate::default(), |image| {
            Ok(Qcow2::<AnyStorage>::builder(image).backing(Some(backing)))
        })
}

impl DiskBackend for Qcow2Disk {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn id(&self) -> [u8; DISK_ID_LEN] {
        self.id
    }

    fn discard_granularity(&self) -> u64 {
        self.cluster_size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.image.read(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        self.image.write(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.image.flush()?;
        if self.sync_on_flush {
            self.image.sync()?;
        }
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        if unmap {
            // Zero clusters, not "back to the base": the guest asked for zeroes.
            self.image.discard_to_zero(offset, len)
        } else {
            self.image.write_zeroes(offset, len)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{
        assert_qemu_agrees, exercise, extl2_over_raw, have_qemu_img, qcow2_base, qemu_img,
        qemu_raw_bytes, raw_base, sha256, zstd_image, BASE_SIZE,
    };
    use crate::{open_disk, DiskMode, DiskSpec};

    fn overlay_roundtrip(base: &Path, mut model: Vec<u8>, dir: &Path, format: &str) {
        let before = sha256(base);
        let overlay = dir.join("overlay.qcow2");
        let spec = DiskSpec {
            path: base.to_path_buf(),
            mode: DiskMode::KeptOverlay(overlay.clone()),
        };
        let mut disk = open_disk(&spec).unwrap();
        assert_eq!(disk.size(), BASE_SIZE);
        assert!(!disk.read_only());
        assert_eq!(disk.discard_granularity(), 64 * 1024);
        exercise(disk.as_mut(), &mut model);
        // Flushed: already consistent while kiln still holds it open.
        assert_qemu_agrees(&overlay, &model, dir);
        drop(disk);
        assert_qemu_agrees(&overlay, &model, dir);

        let (ok, info) = qemu_img(&["info", "--output=json", overlay.to_str().unwrap()]).unwrap();
        assert!(ok, "{info}");
        let canonical = fs::canonicalize(base).unwrap();
        assert!(info.contains(&format!(
            "\"backing-filename\": \"{}\"",
            canonical.display()
        )));
        assert!(info.contains(&format!("\"backing-filename-format\": \"{format}\"")));
        assert_eq!(sha256(base), before, "the base image changed");
    }

    #[test]
    fn overlay_over_raw_base() {
        if !have_qemu_img() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (base, data) = raw_base(dir.path());
        overlay_roundtrip(&base, data, dir.path(), "raw");
    }

    #[test]
    fn overlay_over_qcow2_base() {
        if !have_qemu_img() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (base, data) = qcow2_base(dir.path());
        overlay_roundtrip(&base, data, dir.path(), "qcow2");
        let (ok, out) = qemu_img(&["check", base.to_str().unwrap()]).unwrap();
        assert!(ok, "base: {out}");
    }

    #[test]
    fn ephemeral_overlay_is_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let (base, mut model) = raw_base(dir.path());
        let before = sha256(&base);
        let mut disk =
            Qcow2Disk::create_overlay(&base, ImageFormat::Raw, &OverlayLocation::Ephemeral)
                .unwrap();
        let overlay = disk.path().to_path_buf();
        assert!(overlay.exists());
        assert_ne!(overlay.parent(), Some(dir.path()));
        exercise(&mut disk, &mut model);
        assert_eq!(&disk.id()[..8], b"base.raw");
        drop(disk);
        assert!(!overlay.exists());
        assert!(!overlay.parent().unwrap().exists(), "temp dir left behind");
        assert_eq!(sha256(&base), before);
    }

    #[test]
    fn read_only_qcow2_image() {
        if !have_qemu_img() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (base, data) = qcow2_base(dir.path());
        let before = sha256(&base);
        let spec = DiskSpec {
            path: base.clone(),
            mode: DiskMode::ReadOnly,
        };
        let mut disk = open_disk(&spec).unwrap();
        assert!(disk.read_only());
        let mut back = vec![0u8; data.len()];
        disk.read_at(&mut back, 0).unwrap();
        assert!(back == data);
        let err = disk.write_at(&[1; 512], 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(disk.write_zeroes(0, 512, true).is_err());
        assert!(disk.discard(0, 512).is_err());
        disk.flush().unwrap();
        drop(disk);
        assert_eq!(sha256(&base), before);
    }

    #[test]
    fn qcow2_in_place() {
        if !have_qemu_img() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (image, mut model) = qcow2_base(dir.path());
        let spec = DiskSpec {
            path: image.clone(),
            mode: DiskMode::InPlace,
        };
        let mut disk = open_disk(&spec).unwrap();
        exercise(disk.as_mut(), &mut model);
        drop(disk);
        assert_qemu_agrees(&image, &model, dir.path());
    }

    #[test]
    fn overlay_over_extended_l2_base() {
        if !have_qemu_img() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let base = extl2_over_raw(dir.path());
        let data = qemu_raw_bytes(&base, dir.path());
        overlay_roundtrip(&base, data, dir.path(), "qcow2");
    }

    #[test]
    fn overlay_over_zstd_base() {
        if !have_qemu_img() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (base, data) = zstd_image(dir.path(), 65536, true);
        overlay_roundtrip(&base, data, dir.path(), "qcow2");
    }

    /// An image imago reads whose backing file only kiln's reader reads: the chain below is
    /// wired in explicitly, and the top is written in place like any qcow2 image.
    #[test]
    fn in_place_over_a_zstd_backing_file() {
        if !have_qemu_img() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (base, mut model) = zstd_image(dir.path(), 65536, false);
        let top = dir.path().join("top.qcow2");
        let (ok, out) = qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "qcow2",
            top.to_str().unwrap(),
        ])
        .unwrap();
        assert!(ok, "{out}");
        let before = sha256(&base);
        let spec = DiskSpec {
            path: top.clone(),
            mode: DiskMode::InPlace,
        };
        let mut disk = open_disk(&spec).unwrap();
        exercise(disk.as_mut(), &mut model);
        drop(disk);
        assert_qemu_agrees(&top, &model, dir.path());
        assert_eq!(sha256(&base), before, "the base image changed");
    }

    #[test]
    fn extended_l2_image_is_read_only() {
        if !have_qemu_img() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = extl2_over_raw(dir.path());
        let want = qemu_raw_bytes(&image, dir.path());
        let before = sha256(&image);
        let spec = DiskSpec {
            path: image.clone(),
            mode: DiskMode::ReadOnly,
        };
        let mut disk = open_disk(&spec).unwrap();
        assert!(disk.read_only());
        assert_eq!(disk.size(), BASE_SIZE);
        let mut back = vec![0u8; want.len()];
        disk.read_at(&mut back, 0).unwrap();
        assert!(back == want);
        assert!(disk.write_at(&[1; 512], 0).is_err());
        drop(disk);

        let in_place = DiskSpec {
            path: image.clone(),
            mode: DiskMode::InPlace,
        };
        let err = match open_disk(&in_place) {
            Ok(_) => panic!("an extended-L2 image opened for writing"),
            Err(e) => e,
        };
        assert_eq!(
            err.to_string(),
            format!(
                "disk image {}: cannot be written in place: extended L2 entries: kiln reads \
                 such images but does not write them (attach it read-only or under an overlay)",
                image.display()
            )
        );
        assert_eq!(sha256(&image), before, "the image changed");
    }
}
