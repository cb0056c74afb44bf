//! virtio-blk: the device model. The disks behind it (formats, backends, disk specs) are
//! kiln-disk's; the types the device and the VMM's configuration take are re-exported here.

mod device;

pub use device::{
    Block, MAX_DATA_LEN, MAX_DISCARD_SECTORS, MAX_WRITE_ZEROES_SECTORS, QUEUE_SIZE, SECTOR_SIZE,
    SEG_MAX, SIZE_MAX,
};
pub use kiln_disk::{
    detect_format, open_disk, DiskBackend, DiskError, DiskMode, DiskSpec, ImageFormat,
    OverlayLocation, Qcow2Disk, RawDisk,
};
