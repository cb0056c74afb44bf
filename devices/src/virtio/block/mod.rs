//! virtio-blk: the device model. The disks behind it (formats, backends, disk specs) are
//! kiln-disk's; the types the device and the VMM's configuration take are re-exported here.

mod device;

use std::fmt;

pub use device::{
    Block, MAX_DATA_LEN, MAX_DISCARD_SECTORS, MAX_WRITE_ZEROES_SECTORS, QUEUE_SIZE, SECTOR_SIZE,
    SEG_MAX, SIZE_MAX,
};
pub use kiln_disk::{
    detect_format, DiskBackend, DiskMode, DiskSpec, ImageFormat, OverlayLocation, Qcow2Disk,
    RawDisk,
};

/// A disk the VMM could not attach, reported against `--disk` like the VMM's other device
/// configuration errors (`--share`, `--vsock`): kiln-disk's error in its option form
/// ([`kiln_disk::DiskError::with_option`]); kiln-disk's own wording names no option.
#[derive(Debug, thiserror::Error)]
pub struct DiskError(pub kiln_disk::DiskError);

impl fmt::Display for DiskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.with_option("--disk"))
    }
}

impl From<kiln_disk::DiskError> for DiskError {
    fn from(e: kiln_disk::DiskError) -> Self {
        DiskError(e)
    }
}

/// Opens the disk a [`DiskSpec`] describes ([`kiln_disk::open_disk`]), its error reported
/// against `--disk`.
pub fn open_disk(spec: &DiskSpec) -> Result<Box<dyn DiskBackend>, DiskError> {
    Ok(kiln_disk::open_disk(spec)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The VMM reports a disk against `--disk` (tests/vmm_device_config.rs checks it through
    /// `Vm::start`), while kiln-disk's own message names no option.
    #[test]
    fn open_errors_name_the_option() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.qcow2");
        let err = match open_disk(&DiskSpec::new(&missing)) {
            Ok(_) => panic!("a missing image opened"),
            Err(e) => e,
        };
        let msg = err.to_string();
        let want = format!("--disk {}: cannot open the image: ", missing.display());
        assert!(msg.starts_with(&want), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        assert!(!err.0.to_string().contains("--disk"), "{}", err.0);
    }
}
