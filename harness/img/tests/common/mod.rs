//! What the `kiln img` integration tests share: whether qemu-img is here to compare against.
// Each test crate uses part of this module.
#![allow(dead_code)]

use std::process::Command;

/// Whether qemu-img runs here; when it does not, prints why the test skips, and fails instead
/// on CI, where .ci/install-deps installs it.
pub fn qemu_img_present() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok || !on_ci(),
        "CI is set and qemu-img is not installed; .ci/install-deps installs qemu-utils"
    );
    if !ok {
        println!("skipped: qemu-img is not installed (apt-get install qemu-utils)");
    }
    ok
}

/// Whether this is a CI run (`CI` set, and not to "false" or "0").
pub fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}
