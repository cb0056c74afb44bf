//! virtio-blk: arbitrary descriptor tables, rings and request headers against a raw disk.
#![no_main]

use std::sync::OnceLock;

use kiln_devices::virtio::block::{Block, RawDisk};
use kiln_fuzz::{drive_chains, ChainInput};
use libfuzzer_sys::fuzz_target;

/// One 64 KiB disk for the whole run (its contents change; what is checked does not depend on them).
fn disk_dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("disk.raw"), vec![0x5a; 64 << 10]).expect("disk");
        dir
    })
}

fuzz_target!(|input: ChainInput| {
    let path = disk_dir().path().join("disk.raw");
    let disk = RawDisk::open(&path, false).expect("open the raw disk");
    let mut block = Block::new(Box::new(disk));
    drive_chains(&mut block, 1, &input);
});
