//! qcow2: kiln's one header parser (what `kiln img` describes and format detection checks),
//! images as disks through `imago` (a user's image, or the copy-on-write overlays kiln creates),
//! and kiln's own read-only reader for the images imago cannot read (extended L2, zstd).

mod chain;
mod compressed;
mod disk;
mod header;
mod reader;

pub use chain::{chain_needs_reader, ChainStorage, ReadChain, MAX_CHAIN_DEPTH};
pub use compressed::{decompress, DecompressError};
pub use disk::{OverlayLocation, Qcow2Disk, Qcow2Error};
pub use header::{
    incompat, is_qcow2, parse_header, parse_version, read_header, Compression, HeaderError,
    HeaderErrorKind, Qcow2Header, AUTOCLEAR_DATA_FILE_RAW, COMPAT_FEATURES_OFFSET,
    COMPAT_LAZY_REFCOUNTS, QCOW2_MAGIC, V2_HEADER_LEN,
};
pub use reader::{Mapping, Qcow2Reader};
