//! qcow2: images as disks through `imago` (a user's image, or the copy-on-write overlays kiln
//! creates).

mod disk;

pub use disk::{OverlayLocation, Qcow2Disk, Qcow2Error};
