//! virtio-blk: the device model and the disk backends behind it.

mod device;
pub mod disk;
mod spec;

pub use device::{
    Block, MAX_DATA_LEN, MAX_DISCARD_SECTORS, MAX_WRITE_ZEROES_SECTORS, QUEUE_SIZE, SECTOR_SIZE,
    SEG_MAX, SIZE_MAX,
};
pub use disk::{DiskBackend, OverlayLocation, Qcow2Disk, RawDisk};
pub use spec::{detect_format, open_disk, DiskError, DiskMode, DiskSpec, ImageFormat};
