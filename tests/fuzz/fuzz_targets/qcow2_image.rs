//! qcow2 metadata (header, extensions, L1/L2 tables, refcount tables, backing chain) as `kiln img
//! info/check/map/compare` and the virtio-blk disk backend read it. The image is the input; it
//! must never be written, and every answer must come back (no panic, no hang, bounded memory).
#![no_main]

use kiln_disk::{open_disk, DiskSpec};
use kiln_fuzz::{scratch, snapshot};
use kiln_img::Profile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|image: &[u8]| {
    let dir = scratch();
    let path = dir.path().join("fuzz.qcow2");
    std::fs::write(&path, image).expect("write the image");
    let file = path.to_str().expect("utf-8 temp path");
    let profile = Profile::newest();
    let _ = kiln_img::info(file, false, true, profile);
    let _ = kiln_img::info(file, true, false, profile);
    let _ = kiln_img::check(file, false);
    let _ = kiln_img::map(file, true, profile);
    let _ = kiln_img::compare(file, file, false, profile);
    // As a virtio-blk base: reads, and writes that must land in the overlay only.
    if let Ok(mut disk) = open_disk(&DiskSpec::new(&path)) {
        let size = disk.size();
        let mut buf = vec![0u8; 4096];
        for offset in [0, size / 2, size.saturating_sub(4096)] {
            if offset.checked_add(4096).is_some_and(|end| end <= size) {
                let _ = disk.read_at(&mut buf, offset);
                let _ = disk.write_at(&[0xa5; 512], offset);
                let _ = disk.read_at(&mut buf, offset);
            }
        }
        let _ = disk.flush();
    }
    assert!(snapshot(&path) == image, "the base image was written");
});
