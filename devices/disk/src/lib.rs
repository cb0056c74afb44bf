//! kiln-disk: disk images for kiln, whatever reads them — virtio-blk's backends and `kiln img`.
//!
//! - [`qcow2`]: kiln's one qcow2 header parser ([`qcow2::Qcow2Header`], [`qcow2::parse_header`],
//!   [`qcow2::QCOW2_MAGIC`], feature bits), with its own [`qcow2::HeaderError`].
//! - [`ImageFormat`] and [`detect_format`]: raw or qcow2 from the first bytes of a file (through
//!   that parser), and the formats kiln refuses by name (VMDK, VHDX, QED, …).
//! - [`DiskBackend`] and its implementations: [`RawDisk`] and [`Qcow2Disk`] (imago), including
//!   the copy-on-write overlays kiln creates over a base it never writes.
//! - [`qcow2::Qcow2Reader`] and [`qcow2::ReadChain`]: kiln's own read-only qcow2 reader for what
//!   imago cannot read (extended L2 entries, zstd compression), served to imago as read-only
//!   storage ([`qcow2::ChainStorage`]) so such images work as disks and overlay bases.
//! - [`DiskSpec`] (`PATH[,ro][,overlay=PATH][,in-place]`) and [`open_disk`], which turns one into
//!   a backend, with one-line [`DiskError`]s that name no command-line option
//!   ([`DiskError::with_option`] gives a front end's form).

mod backend;
mod error;
mod format;
mod open;
pub mod qcow2;
mod raw;
mod spec;
#[cfg(test)]
mod test_util;

pub use backend::{id_from_path, DiskBackend, DISK_ID_LEN};
pub use error::DiskError;
pub use format::{detect_format, ImageFormat};
pub use open::open_disk;
pub use qcow2::{OverlayLocation, Qcow2Disk, Qcow2Error};
pub use raw::RawDisk;
pub use spec::{DiskMode, DiskSpec};
