//! Finding the static `kiln-agent` binary that becomes the initramfs's `/init`.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{elf, GuestError, Progress};

/// The target the agent is built for: naming it explicitly keeps `+crt-static` away from
/// build scripts and proc-macros, which cannot be static.
const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";

/// The workspace root this harness was compiled from (the agent can be built there).
fn source_tree() -> Option<PathBuf> {
    // This crate lives at guest/build in the workspace.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?.parent()?;
    root.join("guest/agent/Cargo.toml")
        .is_file()
        .then(|| root.to_owned())
}

/// The agent's bytes: `$KILN_AGENT`, else `kiln-agent` next to the running executable, else
/// built from the source tree kiln was compiled from. Checked to be a static ELF.
pub fn agent_binary(progress: &Progress) -> Result<(PathBuf, Vec<u8>), GuestError> {
    let path = locate(progress)?;
    let data = std::fs::read(&path).map_err(|source| GuestError::Io {
        path: path.clone(),
        source,
    })?;
    check_static(&path, &data)?;
    Ok((path, data))
}

fn locate(progress: &Progress) -> Result<PathBuf, GuestError> {
    if let Some(path) = std::env::var_os("KILN_AGENT") {
        return Ok(PathBuf::from(path));
    }
    if let Some(beside) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("kiln-agent")))
        .filter(|path| path.is_file())
    {
        // Next to `kiln` in target/*/ is the dynamically linked development build; only a
        // static one (an installed release) is usable.
        if std::fs::read(&beside)
            .ok()
            .is_some_and(|data| elf::has_interpreter(&data) == Ok(false))
        {
            return Ok(beside);
        }
    }
    let Some(root) = source_tree() else {
        return Err(GuestError::Invalid(
            "no static kiln-agent found next to kiln: build one with `RUSTFLAGS='-C \
             target-feature=+crt-static' cargo build --release -p kiln-agent --target \
             x86_64-unknown-linux-gnu` and put it beside kiln, or set KILN_AGENT=PATH"
                .into(),
        ));
    };
    build_from_source(&root, progress)
}

/// `cargo build --release -p kiln-agent`, static, in its own target directory so the different
/// RUSTFLAGS do not invalidate the workspace's normal build.
fn build_from_source(root: &Path, progress: &Progress) -> Result<PathBuf, GuestError> {
    let target_dir = root.join("target/agent-static");
    progress(&format!(
        "building the static kiln-agent (cargo build --release -p kiln-agent, {})",
        target_dir.display()
    ));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .current_dir(root)
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "kiln-agent",
            "--target",
        ])
        .arg(AGENT_TARGET)
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "0")
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
        .status()
        .map_err(|e| {
            GuestError::Invalid(format!(
                "cannot run {}: {e} (needed to build kiln-agent)",
                Path::new(&cargo).display()
            ))
        })?;
    if !status.success() {
        return Err(GuestError::Invalid(format!(
            "`cargo build --release -p kiln-agent` in {} failed ({status})",
            root.display()
        )));
    }
    Ok(target_dir.join(AGENT_TARGET).join("release/kiln-agent"))
}

/// The initramfs has no dynamic loader: the agent must be a static ELF.
pub fn check_static(path: &Path, data: &[u8]) -> Result<(), GuestError> {
    match elf::has_interpreter(data) {
        Ok(false) => Ok(()),
        Ok(true) => Err(GuestError::Invalid(format!(
            "{}: kiln-agent is dynamically linked (has PT_INTERP); build it with \
             RUSTFLAGS='-C target-feature=+crt-static'",
            path.display()
        ))),
        Err(e) => Err(GuestError::Invalid(format!("{}: {e}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_executable_is_refused() {
        // The test binary itself is dynamically linked.
        let exe = std::env::current_exe().unwrap();
        let data = std::fs::read(&exe).unwrap();
        let err = check_static(&exe, &data).unwrap_err().to_string();
        assert!(err.contains("dynamically linked (has PT_INTERP)"), "{err}");
        let err = check_static(Path::new("x.sh"), b"#!/bin/sh")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "x.sh: not an ELF file (no \\x7fELF magic)");
    }

    #[test]
    fn the_source_tree_is_found() {
        assert!(source_tree().is_some());
    }
}
