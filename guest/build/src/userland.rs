//! A shell and the usual commands for the guest: a static busybox with one link per applet, so
//! scenarios can run `sh -c …`. Taken from the host when it has a static one (Debian's
//! `busybox-static`), else fetched with `apt-get download busybox-static`.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{elf, run_tool, GuestError, Progress};

/// Where busybox sits in the guest.
pub const BUSYBOX_PATH: &str = "bin/busybox";

/// A static busybox and its applet names.
#[derive(Debug, Clone)]
pub struct Busybox {
    /// Its bytes.
    pub data: Vec<u8>,
    /// Applets (`sh`, `ls`, …), sorted.
    pub applets: Vec<String>,
    /// Where it came from (a path or a package).
    pub origin: String,
}

fn static_elf(path: &Path) -> Option<Vec<u8>> {
    let data = std::fs::read(path).ok()?;
    (elf::has_interpreter(&data) == Ok(false)).then_some(data)
}

/// `busybox --list`, run on the host (the same x86_64 static binary the guest gets).
fn applets(path: &Path) -> Result<Vec<String>, GuestError> {
    let listing = run_tool(
        Command::new(path).arg("--list"),
        &path.display().to_string(),
        "apt-get install busybox-static",
    )?;
    let mut names: Vec<String> = listing
        .lines()
        .map(str::trim)
        .filter(|name| {
            !name.is_empty() && !name.contains('/') && *name != "busybox" && *name != "init"
        })
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Find or fetch a static busybox; `$KILN_BUSYBOX` overrides.
pub fn busybox(progress: &Progress) -> Result<Busybox, GuestError> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("KILN_BUSYBOX")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    candidates.extend(["/bin/busybox", "/usr/bin/busybox"].map(PathBuf::from));
    for path in candidates {
        if let Some(data) = static_elf(&path) {
            return Ok(Busybox {
                applets: applets(&path)?,
                data,
                origin: path.display().to_string(),
            });
        }
    }
    progress("no static busybox on the host: downloading busybox-static (apt-get download)");
    let work = tempfile::tempdir().map_err(|source| GuestError::Io {
        path: std::env::temp_dir(),
        source,
    })?;
    let output = Command::new("apt-get")
        .args(["download", "busybox-static"])
        .current_dir(work.path())
        .output()
        .map_err(|e| GuestError::Invalid(format!("cannot run apt-get to download busybox-static: {e}; install busybox-static or set KILN_BUSYBOX=PATH")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message");
        return Err(GuestError::Invalid(format!(
            "apt-get download busybox-static failed: {last} (run `apt-get update`, or set KILN_BUSYBOX=PATH to a static busybox)"
        )));
    }
    let deb = std::fs::read_dir(work.path())
        .map_err(|source| GuestError::Io {
            path: work.path().to_owned(),
            source,
        })?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| {
            GuestError::Invalid("apt-get download busybox-static wrote no .deb".into())
        })?;
    let root = work.path().join("root");
    run_tool(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
        "dpkg-deb",
        "apt-get install dpkg",
    )?;
    let path = ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|p| root.join(p))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            GuestError::Invalid(format!("{}: no bin/busybox in the package", deb.display()))
        })?;
    let data = static_elf(&path).ok_or_else(|| {
        GuestError::Invalid(format!(
            "{}: busybox-static's busybox is not a static ELF",
            deb.display()
        ))
    })?;
    Ok(Busybox {
        applets: applets(&path)?,
        data,
        origin: "busybox-static (apt)".into(),
    })
}
