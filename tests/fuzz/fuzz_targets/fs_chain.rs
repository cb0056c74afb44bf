//! virtio-fs: arbitrary descriptor tables and rings on both queues (hiprio, requests), with
//! whatever bytes the chains point at read as FUSE requests. The share must confine them.
#![no_main]

use kiln_devices::virtio::fs::VirtioFs;
use kiln_fuzz::{drive_chains, ChainInput, Share};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: ChainInput| {
    let share = Share::new();
    let mut fs = VirtioFs::new("fuzz", &share.dir(), false).expect("virtio-fs device");
    drive_chains(&mut fs, 2, &input);
    drop(fs);
    share.check_confined();
});
