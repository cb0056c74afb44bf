//! kiln guest image builders. [`cpio`] writes the initramfs (cpio newc, optionally gzip) that
//! boots kiln's agent as PID 1, byte-for-byte the same for the same inputs.

pub mod cpio;

pub use cpio::{Initramfs, InitramfsError};
