//! The interface every disk backend offers the block device: byte-addressed reads, writes,
//! flushes, discards and zeroing, plus the facts the device advertises (size, read-only, serial).

use std::io;
use std::path::Path;

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

pub(crate) fn read_only_error() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "the disk is read-only")
}

/// The serial the guest sees: the image's file name, truncated to 20 bytes, so a guest can find
/// its disk under `/dev/disk/by-id/virtio-<name>`.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_is_truncated_file_name() {
        let id = id_from_path(Path::new("/images/a-very-long-image-name-indeed.qcow2"));
        assert_eq!(&id, b"a-very-long-image-na");
    }
}
