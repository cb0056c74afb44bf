//! qcow2: kiln's one header parser (what `kiln img` describes and format detection checks), and
//! images as disks through `imago` (a user's image, or the copy-on-write overlays kiln creates).

mod disk;
mod header;

pub use disk::{OverlayLocation, Qcow2Disk, Qcow2Error};
pub use header::{
    incompat, is_qcow2, parse_header, parse_version, read_header, Compression, HeaderError,
    HeaderErrorKind, Qcow2Header, AUTOCLEAR_DATA_FILE_RAW, COMPAT_FEATURES_OFFSET,
    COMPAT_LAZY_REFCOUNTS, QCOW2_MAGIC, V2_HEADER_LEN,
};
