//! Disk backends for virtio-blk: a raw file, and qcow2 images through `imago` — in particular a
//! copy-on-write overlay kiln creates per run over a raw or qcow2 base that it never writes.
//!
//! What a user asks for is a [`DiskSpec`] (the value of `--disk PATH[,ro][,overlay=PATH]
//! [,in-place]`); [`open_disk`] turns it into a [`DiskBackend`].

use std::fs::{self, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{
    DenyImplicitOpenGate, FormatAccess, FormatCreateBuilder, FormatDriverBuilder,
    PermissiveImplicitOpenGate, StorageOpenOptions,
};

pub use super::spec::ImageFormat;

/// Bytes of zeroes written per call when a file system cannot zero a range natively.
const ZERO_CHUNK: usize = 64 * 1024;

/// Cluster size of the overlays kiln creates (qcow2's and QEMU's default).
const OVERLAY_CLUSTER_SIZE: u64 = 64 * 1024;

/// Length of a virtio-blk device ID (`VIRTIO_BLK_ID_BYTES`).
pub const DISK_ID_LEN: usize = 20;

/// Storage behind a virtio-blk device. Offsets and lengths are in bytes; callers (the device)
/// check ranges against [`DiskBackend::size`] before calling.
pub trait DiskBackend: Send {
    /// Virtual disk size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are refused (the device then offers VIRTIO_BLK_F_RO).
    fn read_only(&self) -> bool;
    /// The 20-byte serial the guest reads with GET_ID (NUL-padded).
    fn id(&self) -> [u8; DISK_ID_LEN];
    /// Granularity in bytes at which discards actually free space (a hint for the guest).
    fn discard_granularity(&self) -> u64 {
        4096
    }
    /// Fills `buf` from `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes completed writes durable as far as this backend promises durability.
    fn flush(&mut self) -> io::Result<()>;
    /// Drops the range; it reads back as zeroes afterwards (stricter than virtio requires, so
    /// runs stay reproducible and a base image never shows through a discarded overlay range).
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes the range read as zeroes; `unmap` allows deallocating it.
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
}

fn read_only_error() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "the disk is read-only")
}

/// The serial the guest sees: the image's file name, truncated to 20 bytes, so a guest can find
/// its disk under /dev/disk/by-id/virtio-<name>.
pub fn id_from_path(path: &Path) -> [u8; DISK_ID_LEN] {
    let mut id = [0u8; DISK_ID_LEN];
    let name = path
        .file_name()
        .map(|n| n.as_encoded_bytes())
        .unwrap_or(b"kiln-disk");
    let n = name.len().min(DISK_ID_LEN);
    id[..n].copy_from_slice(&name[..n]);
    id
}

/// A raw image file used directly: read-only, or written in place.
pub struct RawDisk {
    file: fs::File,
    size: u64,
    read_only: bool,
    id: [u8; DISK_ID_LEN],
}

impl RawDisk {
    /// Opens `path` (O_RDONLY when `read_only`).
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        // Seeking to the end also sizes block devices, whose metadata length is 0.
        let size = (&file).seek(SeekFrom::End(0))?;
        Ok(Self {
            file,
            size,
            read_only,
            id: id_from_path(path),
        })
    }

    /// `fallocate(2)` on the file; `Ok(false)` when the file system does not support `mode`.
    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<bool> {
        let off = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let len = libc::off_t::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: fallocate only reads its integer arguments; the fd is owned by `self.file`
        // and stays open for the duration of the call.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
        if rc == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(false),
            _ => Err(err),
        }
    }

    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; ZERO_CHUNK];
        let end = offset.checked_add(len).ok_or(io::ErrorKind::InvalidInput)?;
        while offset < end {
            let n = usize::try_from(end - offset).map_or(ZERO_CHUNK, |r| r.min(ZERO_CHUNK));
            self.file.write_all_at(&zeroes[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}

impl DiskBackend for RawDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn id(&self) -> [u8; DISK_ID_LEN] {
        self.id
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        if self.fallocate(mode, offset, len)? {
            return Ok(());
        }
        self.write_zero_bytes(offset, len)
    }
}

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
    image: FormatAccess<ImagoFile>,
    read_only: bool,
    /// Whether `flush` also syncs to stable storage (pointless for a throwaway overlay).
    sync_on_flush: bool,
    id: [u8; DISK_ID_LEN],
    cluster_size: u64,
    path: PathBuf,
    _temp_dir: Option<tempfile::TempDir>,
}

/// Why a qcow2 backend could not be set up; [`open_disk`] turns this into a [`DiskError`].
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
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let storage = ImagoFile::from_open_file(
            file,
            StorageOpenOptions::new().filename(path).write(!read_only),
        )?;
        // The image's own backing chain is opened read-only by imago (it forces write(false)
        // for backing files).
        let qcow2 = Qcow2::<ImagoFile>::builder(storage)
            .write(!read_only)
            .open(PermissiveImplicitOpenGate::default())?;
        Ok(Self {
            image: FormatAccess::new(qcow2),
            read_only,
            sync_on_flush: !read_only,
            id: id_from_path(path),
            cluster_size: qcow2_cluster_size(path),
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

/// The cluster size recorded in a qcow2 header (`cluster_bits`, big-endian u32 at byte 20);
/// only a discard hint, so an unreadable or implausible value falls back to the default.
fn qcow2_cluster_size(path: &Path) -> u64 {
    let mut bits = [0u8; 4];
    let read = fs::File::open(path).and_then(|f| f.read_exact_at(&mut bits, 20));
    match read.map(|()| u32::from_be_bytes(bits)) {
        Ok(b @ 9..=21) => 1u64 << b,
        _ => OVERLAY_CLUSTER_SIZE,
    }
}

/// Opens the base image read-only as an imago format layer.
fn open_base(base: &Path, format: ImageFormat) -> io::Result<FormatAccess<ImagoFile>> {
    let file = OpenOptions::new().read(true).open(base)?;
    let storage =
        ImagoFile::from_open_file(file, StorageOpenOptions::new().filename(base).write(false))?;
    Ok(match format {
        ImageFormat::Raw => FormatAccess::new(
            Raw::builder(storage)
                .write(false)
                .open(DenyImplicitOpenGate::default())?,
        ),
        ImageFormat::Qcow2 => FormatAccess::new(
            Qcow2::<ImagoFile>::builder(storage)
                .write(false)
                .open(PermissiveImplicitOpenGate::default())?,
        ),
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
    backing: FormatAccess<ImagoFile>,
) -> io::Result<Qcow2<ImagoFile>> {
    let base_name = base.to_str().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("base path {} is not UTF-8", base.display()),
        )
    })?;
    let storage =
        ImagoFile::from_open_file(file, StorageOpenOptions::new().filename(path).write(true))?;
    Qcow2::<ImagoFile>::create_builder(storage)
        .cluster_size(OVERLAY_CLUSTER_SIZE as usize)
        .size(size)
        .backing(base_name.to_string(), format.name().to_string())
        .create_open(DenyImplicitOpenGate::default(), |image| {
            Ok(Qcow2::<ImagoFile>::builder(image).backing(Some(backing)))
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
pub(crate) mod tests {
    use std::process::Command;

    use sha2::{Digest, Sha256};

    use super::*;
    use crate::virtio::block::spec::{open_disk, DiskMode, DiskSpec};

    const MIB: u64 = 1024 * 1024;
    const BASE_SIZE: u64 = 4 * MIB;

    /// Runs qemu-img; `None` when it is not installed (the caller then skips, saying why).
    pub(crate) fn qemu_img(args: &[&str]) -> Option<(bool, String)> {
        let out = Command::new("qemu-img").args(args).output().ok()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Some((out.status.success(), text))
    }

    pub(crate) fn have_qemu_img() -> bool {
        let found = qemu_img(&["--version"]).is_some_and(|(ok, _)| ok);
        if !found {
            println!("skipped: qemu-img not found");
        }
        found
    }

    fn sha256(path: &Path) -> Vec<u8> {
        Sha256::digest(fs::read(path).unwrap()).to_vec()
    }

    /// Non-zero everywhere, so zeroed ranges stand out; varies per sector.
    fn pattern(len: u64) -> Vec<u8> {
        (0..len).map(|i| ((i / 512 + i) % 255 + 1) as u8).collect()
    }

    /// The same writes, zeroes and discards applied to `disk` and to `model`, with offsets
    /// that straddle and split 64 KiB clusters; then every byte read back is checked.
    fn exercise(disk: &mut dyn DiskBackend, model: &mut [u8]) {
        let mut write = |disk: &mut dyn DiskBackend, offset: u64, len: usize, byte: u8| {
            let buf = vec![byte; len];
            disk.write_at(&buf, offset).unwrap();
            model[offset as usize..offset as usize + len].copy_from_slice(&buf);
        };
        write(disk, 0, 4096, 0x11);
        write(disk, 64 * 1024 - 256, 512, 0x22);
        write(disk, MIB + 1234, 100 * 1024, 0x33);
        write(disk, BASE_SIZE - 512, 512, 0x44);
        let zero = |disk: &mut dyn DiskBackend, model: &mut [u8], off: u64, len: u64, how| {
            match how {
                0 => disk.write_zeroes(off, len, false).unwrap(),
                1 => disk.write_zeroes(off, len, true).unwrap(),
                _ => disk.discard(off, len).unwrap(),
            }
            model[off as usize..(off + len) as usize].fill(0);
        };
        zero(disk, model, 2 * MIB, 64 * 1024, 0);
        zero(disk, model, 3 * MIB - 4096, 8192, 1);
        zero(disk, model, 3 * MIB + 64 * 1024, 128 * 1024, 2);
        zero(disk, model, 512, 1024, 2);
        disk.flush().unwrap();

        let mut back = vec![0u8; model.len()];
        disk.read_at(&mut back, 0).unwrap();
        assert!(back == model, "read-back differs from the model");
    }

    /// qemu-img check is clean and the image reads exactly like `expected`.
    fn assert_qemu_agrees(image: &Path, expected: &[u8], dir: &Path) {
        let image = image.to_str().unwrap();
        let (ok, out) = qemu_img(&["check", "-f", "qcow2", image]).unwrap();
        assert!(
            ok && out.contains("No errors were found"),
            "qemu-img check: {out}"
        );
        let want = dir.join("expected.raw");
        fs::write(&want, expected).unwrap();
        let want = want.to_str().unwrap();
        let (ok, out) = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", image, want]).unwrap();
        assert!(
            ok && out.contains("Images are identical"),
            "qemu-img compare: {out}"
        );
    }

    fn raw_base(dir: &Path) -> (PathBuf, Vec<u8>) {
        let base = dir.join("base.raw");
        let data = pattern(BASE_SIZE);
        fs::write(&base, &data).unwrap();
        (base, data)
    }

    /// A qcow2 base converted by qemu-img from a pattern with a hole (unallocated clusters).
    fn qcow2_base(dir: &Path) -> (PathBuf, Vec<u8>) {
        let mut data = pattern(BASE_SIZE);
        data[(MIB as usize)..(2 * MIB as usize)].fill(0);
        let src = dir.join("src.raw");
        fs::write(&src, &data).unwrap();
        let base = dir.join("base.qcow2");
        let (ok, out) = qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            src.to_str().unwrap(),
            base.to_str().unwrap(),
        ])
        .unwrap();
        assert!(ok, "qemu-img convert: {out}");
        (base, data)
    }

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
    fn raw_read_write_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut model) = raw_base(dir.path());
        let spec = DiskSpec {
            path: path.clone(),
            mode: DiskMode::InPlace,
        };
        let mut disk = open_disk(&spec).unwrap();
        assert_eq!(disk.size(), BASE_SIZE);
        assert!(!disk.read_only());
        exercise(disk.as_mut(), &mut model);
        drop(disk);
        assert!(fs::read(&path).unwrap() == model, "file contents differ");
    }

    #[test]
    fn raw_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let (path, data) = raw_base(dir.path());
        let mut disk = RawDisk::open(&path, true).unwrap();
        assert!(disk.read_only());
        assert_eq!(disk.size(), BASE_SIZE);
        let mut buf = vec![0u8; 1000];
        disk.read_at(&mut buf, 777).unwrap();
        assert_eq!(buf, data[777..1777]);
        let err = disk.write_at(&[0; 512], 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(disk.write_zeroes(0, 4096, false).is_err());
        assert!(disk.discard(0, 4096).is_err());
        disk.flush().unwrap();
        // Reading past the end is an error, not a short read.
        assert!(disk.read_at(&mut buf, BASE_SIZE - 10).is_err());
        assert!(fs::read(&path).unwrap() == data);
        assert_eq!(&disk.id(), b"base.raw\0\0\0\0\0\0\0\0\0\0\0\0");
    }

    #[test]
    fn id_is_truncated_file_name() {
        let id = id_from_path(Path::new("/images/a-very-long-image-name-indeed.qcow2"));
        assert_eq!(&id, b"a-very-long-image-na");
    }
}
