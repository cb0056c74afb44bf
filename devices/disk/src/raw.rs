//! A raw image file used directly: read-only, or written in place. Zeroing and discards punch
//! holes with `fallocate(2)` where the file system can.

use std::fs::{self, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::backend::{id_from_path, read_only_error, DiskBackend, DISK_ID_LEN};

/// Bytes of zeroes written per call when a file system cannot zero a range natively.
const ZERO_CHUNK: usize = 64 * 1024;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{exercise, raw_base, BASE_SIZE};
    use crate::{open_disk, DiskMode, DiskSpec};

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
}
