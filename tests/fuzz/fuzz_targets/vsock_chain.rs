//! virtio-vsock: arbitrary descriptor tables and rings on rx, tx and event queues.
#![no_main]

use kiln_devices::virtio::vsock::Vsock;
use kiln_fuzz::{drive_chains, scratch, ChainInput};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: ChainInput| {
    let dir = scratch();
    let mut vsock = Vsock::new(dir.path().join("v.sock"), 3).expect("vsock device");
    drive_chains(&mut vsock, 3, &input);
});
