//! `kiln bench soak` in a short form: 100 sequential, 16 parallel and 100 sequential tiny-guest
//! VMs in one `kiln` process leave no fd or thread behind, and the command says so (exit 0, zero
//! deltas in its JSON). A VM that leaks one fd or thread makes it exit 1.

#[macro_use]
mod common;

use std::process::Command;

#[test]
fn soak_leaves_no_fds_or_threads() {
    or_skip!(common::kvm_usable());
    for tool in ["as", "ld"] {
        or_skip!(common::tool_available(tool));
    }
    let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "bench",
            "soak",
            "--sequential",
            "100",
            "--parallel",
            "16",
            "--json",
        ])
        .output()
        .expect("run kiln");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let describe = format!(
        "status {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    assert_eq!(output.status.code(), Some(0), "{describe}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect(&describe);
    assert_eq!(report["deltas"]["fds"], 0, "{describe}");
    assert_eq!(report["deltas"]["threads"], 0, "{describe}");
    assert_eq!(report["verdict"], "pass", "{describe}");
    assert_eq!(report["total_vms"], 216, "{describe}");
    assert_eq!(
        report["samples"].as_array().map(Vec::len),
        Some(5),
        "{describe}"
    );
}
