//! `--from-host`: the running kernel (`/boot/vmlinuz-$(uname -r)`) and its modules.

use std::fs;
use std::path::Path;

use super::cache::Source;
use super::modules::{ModuleTree, GUEST_MODULES};
use super::{GuestError, KernelParts, Progress};

/// Read the host's kernel and modules.
pub fn kernel_from_host(progress: &Progress) -> Result<KernelParts, GuestError> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_err(|source| GuestError::Io {
            path: "/proc/sys/kernel/osrelease".into(),
            source,
        })?
        .trim()
        .to_owned();
    kernel_from_root(Path::new("/"), &release, progress)
}

/// The kernel `release` under `root` (`/` on a real host; a directory in tests).
pub fn kernel_from_root(
    root: &Path,
    release: &str,
    progress: &Progress,
) -> Result<KernelParts, GuestError> {
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    progress(&format!("reading the host kernel {}", vmlinuz.display()));
    let image = fs::read(&vmlinuz).map_err(|e| {
        GuestError::Invalid(format!(
            "cannot read the host kernel {}: {e} (some distributions make it root-only; use \
             --from-deb or --from-source instead)",
            vmlinuz.display()
        ))
    })?;
    let modules_dir = root.join("lib/modules").join(release);
    let modules = ModuleTree::open(&modules_dir)?.resolve(GUEST_MODULES)?;
    Ok(KernelParts {
        image,
        release: Some(release.to_owned()),
        modules,
        source: Source::Host {
            release: release.to_owned(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_kernel_is_one_clear_line() {
        let dir = tempfile::tempdir().unwrap();
        let err = kernel_from_root(dir.path(), "6.9-test", &|_| {})
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("cannot read the host kernel "), "{err}");
        assert!(err.contains("vmlinuz-6.9-test: No such file"), "{err}");
        assert!(!err.contains('\n'));
    }
}
