//! `--from-deb`: a kernel from a Debian/Ubuntu package, fetched with `apt-get download` (works
//! unprivileged once the package lists exist) or given as a `.deb` file, unpacked with
//! `dpkg-deb -x`. A metapackage (`linux-image-amd64`) is followed to the `linux-image-*`
//! package it depends on.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::cache::Source;
use super::modules::{ModuleTree, GUEST_MODULES};
use super::{run_tool, GuestError, KernelParts, Progress};

/// The default package: Debian's generic kernel (the cloud kernel has no 9p modules).
pub const DEFAULT_PACKAGE: &str = "linux-image-amd64";

/// Fetch (or take) the package, unpack it and pick out kernel and the guest's modules.
pub fn kernel_from_deb(
    requested: Option<&str>,
    progress: &Progress,
) -> Result<KernelParts, GuestError> {
    kernel_with_modules(requested, GUEST_MODULES, progress)
}

/// [`kernel_from_deb`] with another module list (`wanted` and their dependencies).
pub fn kernel_with_modules(
    requested: Option<&str>,
    wanted: &[&str],
    progress: &Progress,
) -> Result<KernelParts, GuestError> {
    let requested = requested.unwrap_or(DEFAULT_PACKAGE);
    let work = tempfile::Builder::new()
        .prefix("kiln-deb-")
        .tempdir()
        .map_err(|source| GuestError::Io {
            path: std::env::temp_dir(),
            source,
        })?;
    let mut deb = if requested.ends_with(".deb") || Path::new(requested).is_file() {
        let path = PathBuf::from(requested);
        if !path.is_file() {
            return Err(GuestError::Invalid(format!(
                "--from-deb {requested}: no such file"
            )));
        }
        path
    } else {
        download(requested, work.path(), progress)?
    };
    // A metapackage holds no kernel: follow its linux-image-* dependency (one level is what
    // Debian and Ubuntu use).
    for _ in 0..2 {
        if has_vmlinuz(&deb)? {
            break;
        }
        let depends = control_field(&deb, "Depends")?;
        let Some(next) = kernel_dependency(&depends) else {
            return Err(GuestError::Invalid(format!(
                "{}: holds no boot/vmlinuz-* and depends on no linux-image-* package",
                deb.display()
            )));
        };
        progress(&format!("{requested} is a metapackage for {next}"));
        deb = download(&next, work.path(), progress)?;
    }
    let package = control_field(&deb, "Package")?;
    let version = control_field(&deb, "Version")?;
    let root = work.path().join("root");
    progress(&format!("unpacking {package} {version} (dpkg-deb -x)"));
    run_tool(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
        "dpkg-deb",
        "apt-get install dpkg",
    )?;
    let (kernel_path, release) = find_vmlinuz(&root.join("boot"))?;
    let kernel = fs::read(&kernel_path).map_err(|source| GuestError::Io {
        path: kernel_path.clone(),
        source,
    })?;
    let modules_dir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| root.join(d).join(&release))
        .find(|d| d.is_dir())
        .ok_or_else(|| {
            GuestError::Invalid(format!("{package} {version}: has no lib/modules/{release}"))
        })?;
    let modules = ModuleTree::open(&modules_dir)?
        .resolve(wanted)
        .map_err(|e| GuestError::Invalid(format!("{package} {version}: {e}")))?;
    Ok(KernelParts {
        image: kernel,
        release: Some(release),
        modules,
        source: Source::Deb {
            requested: requested.to_owned(),
            package,
            version,
        },
    })
}

fn download(package: &str, dir: &Path, progress: &Progress) -> Result<PathBuf, GuestError> {
    progress(&format!("downloading {package} (apt-get download)"));
    let before: Vec<_> = debs_in(dir);
    let output = Command::new("apt-get")
        .arg("download")
        .arg(package)
        .current_dir(dir)
        .output()
        .map_err(|e| {
            GuestError::Invalid(format!(
                "cannot run apt-get to download {package}: {e}; pass --from-deb FILE.deb, \
                 --from-host or --from-source"
            ))
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let reason = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message");
        return Err(GuestError::Invalid(format!(
            "apt-get download {package} failed: {reason} (run `apt-get update`, or pass \
             --from-deb FILE.deb)"
        )));
    }
    debs_in(dir)
        .into_iter()
        .find(|p| !before.contains(p))
        .ok_or_else(|| GuestError::Invalid(format!("apt-get download {package} wrote no .deb")))
}

fn debs_in(dir: &Path) -> Vec<PathBuf> {
    let mut debs: Vec<_> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    debs.sort();
    debs
}

fn control_field(deb: &Path, field: &str) -> Result<String, GuestError> {
    let output = run_tool(
        Command::new("dpkg-deb").arg("-f").arg(deb).arg(field),
        "dpkg-deb",
        "apt-get install dpkg",
    )?;
    Ok(output.trim().to_owned())
}

fn has_vmlinuz(deb: &Path) -> Result<bool, GuestError> {
    let listing = run_tool(
        Command::new("dpkg-deb").arg("-c").arg(deb),
        "dpkg-deb",
        "apt-get install dpkg",
    )?;
    Ok(listing.lines().any(|l| l.contains("/boot/vmlinuz-")))
}

/// The first `linux-image-*` package in a `Depends:` field.
fn kernel_dependency(depends: &str) -> Option<String> {
    depends
        .split([',', '|'])
        .map(|d| d.split_whitespace().next().unwrap_or(""))
        .find(|name| name.starts_with("linux-image-"))
        .map(str::to_owned)
}

/// The single `vmlinuz-<release>` in `boot`.
pub fn find_vmlinuz(boot: &Path) -> Result<(PathBuf, String), GuestError> {
    let mut found: Vec<_> = fs::read_dir(boot)
        .map_err(|source| GuestError::Io {
            path: boot.to_owned(),
            source,
        })?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            let release = name.strip_prefix("vmlinuz-")?.to_owned();
            Some((e.path(), release))
        })
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(GuestError::Invalid(format!(
            "{}: no vmlinuz-* in the package",
            boot.display()
        ))),
        _ => Err(GuestError::Invalid(format!(
            "{}: several vmlinuz-* files; kiln expects one kernel per package",
            boot.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metapackage_dependency_is_found() {
        assert_eq!(
            kernel_dependency("linux-image-6.1.0-56-amd64 (= 6.1.192-2)").as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        assert_eq!(
            kernel_dependency("linux-base, linux-image-6.8.0-31-generic | linux-image-x")
                .as_deref(),
            Some("linux-image-6.8.0-31-generic")
        );
        assert_eq!(kernel_dependency("kmod, initramfs-tools"), None);
    }

    #[test]
    fn the_kernel_in_boot_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let err = find_vmlinuz(dir.path()).unwrap_err().to_string();
        assert!(err.ends_with("no vmlinuz-* in the package"), "{err}");
        fs::write(dir.path().join("vmlinuz-6.1.0-56-amd64"), b"k").unwrap();
        fs::write(dir.path().join("config-6.1.0-56-amd64"), b"c").unwrap();
        assert_eq!(find_vmlinuz(dir.path()).unwrap().1, "6.1.0-56-amd64");
    }

    #[test]
    fn a_missing_deb_file_is_named() {
        let err = kernel_from_deb(Some("/nonexistent/k.deb"), &|_| {})
            .unwrap_err()
            .to_string();
        assert_eq!(err, "--from-deb /nonexistent/k.deb: no such file");
    }
}
