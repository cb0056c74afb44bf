//! On CI (`CI` set) a test whose tool is missing must fail, not pass quietly: .ci/install-deps
//! installs every tool the suite needs except what CI cannot have by design (hardware KVM, the
//! reference daemons Debian does not package), and those skip with their reason printed.

#[macro_use]
mod common;

use std::process::{Command, Output};

const CHILD: &str = "KILN_CI_POLICY_CHILD";

/// Runs this very test again as a child with no tools on PATH, `CI` as given.
fn child(ci: Option<&str>) -> Output {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args([
        "--exact",
        "a_missing_tool_skips_locally_and_fails_on_ci",
        "--nocapture",
    ])
    .env(CHILD, "1")
    .env("PATH", "/nonexistent")
    .env_remove("CI");
    if let Some(v) = ci {
        cmd.env("CI", v);
    }
    cmd.output().expect("run the child test")
}

#[test]
fn a_missing_tool_skips_locally_and_fails_on_ci() {
    if std::env::var_os(CHILD).is_some() {
        // The child: binutils cannot be found, so the guest cannot be built.
        let _guest = or_skip!(common::build_guest("spin"));
        panic!("built a guest without `as` on PATH");
    }
    let text = |o: &Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    for ci in [None, Some(""), Some("false")] {
        let local = child(ci);
        assert!(local.status.success(), "CI={ci:?}: {}", text(&local));
        assert!(
            text(&local).contains("skipped: `as` not found on PATH"),
            "{}",
            text(&local)
        );
    }
    for ci in ["true", "1"] {
        let on_ci = child(Some(ci));
        assert!(!on_ci.status.success(), "CI={ci}: {}", text(&on_ci));
        assert!(
            text(&on_ci).contains("CI is set and `as` not found on PATH"),
            "{}",
            text(&on_ci)
        );
    }
}
