//! kiln's guest images: a kernel plus an initramfs with the static `kiln-agent` as `/init` and
//! the kernel modules the agent loads, built from a Debian/Ubuntu kernel package, the host's
//! kernel or kernel source, and cached content-addressed (see [`cache`]).
//!
//! ```no_run
//! let guest = kiln_guest_build::default_guest()?;
//! println!("{} {}", guest.kernel.display(), guest.initrd.display());
//! # Ok::<(), kiln_guest_build::GuestError>(())
//! ```

pub mod agent;
pub mod cache;
pub mod deb;
pub mod elf;
pub mod host;
pub mod kernel_source;
pub mod modules;
pub mod registry;
pub mod userland;

use std::path::PathBuf;
use std::process::Command;

pub use cache::{Cache, GuestImage, Manifest, Source};
use kiln_guest::Initramfs;
use modules::PackedModule;

/// The alias of the guest `kiln run` uses.
pub const DEFAULT_ALIAS: &str = "default";

/// Version of what goes into a guest (`manifest.format`): bumped when the initramfs layout or
/// the agent's behaviour changes, so [`default_guest`] rebuilds a default cached by an older kiln.
/// 3: the agent's shutdown no longer waits up to a minute for a host that keeps its vsock
/// connection open. 4 and 5: the agent's `resume` (snapshots) and `pty_exec` (`kiln shell`).
pub const RECIPE_VERSION: u32 = 5;

/// Why a guest could not be built or found. Every message is one line naming what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A bad input or a failed step, described.
    #[error("{0}")]
    Invalid(String),
    /// The initramfs could not be written.
    #[error("cannot build the initramfs: {0}")]
    Initramfs(#[from] kiln_guest::InitramfsError),
    /// A registry push or pull failed.
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
}

/// Progress reporting: one line per step (downloading, unpacking, packing).
pub type Progress = dyn Fn(&str);

/// Progress on stderr, as the CLI and [`default_guest`] show it.
pub fn stderr_progress(line: &str) {
    eprintln!("kiln: guest: {line}");
}

/// Where the kernel comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelFrom {
    /// A kernel package name or `.deb` file (`None`: [`deb::DEFAULT_PACKAGE`]).
    Deb(Option<String>),
    /// The running host's kernel.
    Host,
    /// Kernel source: a directory or a tarball.
    Source(PathBuf),
}

impl Default for KernelFrom {
    fn default() -> Self {
        KernelFrom::Deb(None)
    }
}

/// A kernel and the modules to pack with it.
#[derive(Debug)]
pub struct KernelParts {
    /// The kernel image bytes.
    pub image: Vec<u8>,
    /// Its release string, when known.
    pub release: Option<String>,
    /// Modules in load order.
    pub modules: Vec<PackedModule>,
    /// Provenance.
    pub source: Source,
}

/// Run a host tool and return its stdout; one-line errors naming the tool and how to get it.
pub(crate) fn run_tool(
    command: &mut Command,
    tool: &str,
    hint: &str,
) -> Result<String, GuestError> {
    let output = command
        .output()
        .map_err(|e| GuestError::Invalid(format!("cannot run {tool}: {e} ({hint})")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message");
        return Err(GuestError::Invalid(format!(
            "{tool} failed ({}): {last}",
            output.status
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The initramfs: the agent as `/init`, `/dev/console` (so the kernel opens fds 0-2 for init),
/// busybox in `/bin` (with a link per applet),
/// the modules under `/lib/modules/<release>/` and `/etc/kiln/modules` listing them in load
/// order. Deterministic: the same inputs give the same bytes.
pub fn pack_initramfs(
    agent: &[u8],
    busybox: Option<&userland::Busybox>,
    release: Option<&str>,
    modules: &[PackedModule],
) -> Result<Vec<u8>, GuestError> {
    let mut initramfs = Initramfs::new();
    initramfs
        .file("init", 0o755, agent.to_vec())
        .char_device("dev/console", 0o600, 5, 1)
        .dir("proc", 0o555)
        .dir("sys", 0o555)
        .dir("tmp", 0o1777)
        .dir("run", 0o755)
        .dir("root", 0o700)
        .dir("etc/kiln", 0o755);
    if let Some(busybox) = busybox {
        initramfs.file(userland::BUSYBOX_PATH, 0o755, busybox.data.clone());
        for applet in &busybox.applets {
            initramfs.symlink(&format!("bin/{applet}"), "busybox");
        }
    }
    let base = format!("lib/modules/{}", release.unwrap_or("kiln"));
    let mut list = String::from("# Loaded by kiln-agent in this order (dependencies first).\n");
    for module in modules {
        let path = format!("{base}/{}", module.relative);
        list.push_str(&format!("/{path}\n"));
        initramfs.file(&path, 0o644, module.data.clone());
    }
    initramfs.file("etc/kiln/modules", 0o644, list);
    let mut out = Vec::new();
    initramfs.write_gzip(&mut out)?;
    Ok(out)
}

/// Build a guest from `from` into `cache` (re-using an identical entry) and return it.
pub fn build(
    cache: &Cache,
    from: &KernelFrom,
    progress: &Progress,
) -> Result<GuestImage, GuestError> {
    let (agent_path, agent_bytes) = agent::agent_binary(progress)?;
    let busybox = userland::busybox(progress)?;
    let parts = match from {
        KernelFrom::Deb(package) => deb::kernel_from_deb(package.as_deref(), progress)?,
        KernelFrom::Host => host::kernel_from_host(progress)?,
        KernelFrom::Source(path) => {
            kernel_source::kernel_from_source(path, cache.root(), progress)?
        }
    };
    progress(&format!(
        "packing the initramfs: {} + busybox ({}) + {} modules",
        agent_path.display(),
        busybox.origin,
        parts.modules.len()
    ));
    let initrd = pack_initramfs(
        &agent_bytes,
        Some(&busybox),
        parts.release.as_deref(),
        &parts.modules,
    )?;
    let manifest = Manifest {
        format: RECIPE_VERSION,
        name: String::new(),
        source: parts.source,
        kernel_release: parts.release,
        agent_sha256: cache::sha256_hex(&agent_bytes),
        busybox_sha256: Some(cache::sha256_hex(&busybox.data)),
        modules: parts.modules.iter().map(|m| m.name.clone()).collect(),
        kernel: cache::FileRecord {
            sha256: String::new(),
            size: 0,
        },
        initrd: cache::FileRecord {
            sha256: String::new(),
            size: 0,
        },
        built_by: format!("kiln {}", env!("CARGO_PKG_VERSION")),
    };
    let image = cache.store(&parts.image, &initrd, manifest)?;
    progress(&format!(
        "cached {} (kernel {} bytes, initrd {} bytes)",
        image.dir.display(),
        image.manifest.kernel.size,
        image.manifest.initrd.size
    ));
    Ok(image)
}

/// The default guest from the user's cache, built from [`KernelFrom::default`] (with progress
/// on stderr) the first time. Silent when cached.
pub fn default_guest() -> Result<GuestImage, GuestError> {
    default_guest_in(&Cache::default_location()?, &stderr_progress)
}

/// [`default_guest`] with an explicit cache and progress sink.
pub fn default_guest_in(cache: &Cache, progress: &Progress) -> Result<GuestImage, GuestError> {
    let current = || {
        cache
            .find(DEFAULT_ALIAS)
            .ok()
            .filter(|image| image.manifest.format == RECIPE_VERSION)
    };
    if let Some(image) = current() {
        return Ok(image);
    }
    let _lock = cache.lock()?;
    // Another process may have built it while this one waited for the lock.
    if let Some(image) = current() {
        return Ok(image);
    }
    match cache.find(DEFAULT_ALIAS) {
        Ok(stale) => progress(&format!(
            "the default guest in {} was built by an older kiln (recipe {}, now {RECIPE_VERSION}): \
             rebuilding it",
            cache.root().display(),
            stale.manifest.format
        )),
        Err(_) => progress(&format!(
            "no default guest in {} yet: building one (once)",
            cache.root().display()
        )),
    }
    let image = build(cache, &KernelFrom::default(), progress)?;
    cache.set_alias(DEFAULT_ALIAS, &image.manifest.name)?;
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(name: &str) -> PackedModule {
        PackedModule {
            name: name.into(),
            relative: format!("kernel/{name}.ko"),
            data: name.as_bytes().to_vec(),
        }
    }

    #[test]
    fn initramfs_is_deterministic_and_lists_modules_in_order() {
        let modules = [module("virtio"), module("virtio_pci")];
        let busybox = userland::Busybox {
            data: b"bb".to_vec(),
            applets: vec!["sh".into(), "ls".into()],
            origin: "test".into(),
        };
        let a = pack_initramfs(
            b"\x7fELF agent",
            Some(&busybox),
            Some("6.1.0-test"),
            &modules,
        )
        .unwrap();
        let b = pack_initramfs(
            b"\x7fELF agent",
            Some(&busybox),
            Some("6.1.0-test"),
            &modules,
        )
        .unwrap();
        assert_eq!(a, b);
        let mut cpio = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(a.as_slice()), &mut cpio)
            .unwrap();
        let text = String::from_utf8_lossy(&cpio);
        assert!(text.contains(
            "/lib/modules/6.1.0-test/kernel/virtio.ko\n/lib/modules/6.1.0-test/kernel/virtio_pci.ko\n"
        ));
        assert!(text.contains("dev/console") && text.contains("init"));
        assert!(text.contains("bin/sh") && text.contains("bin/busybox"));
    }
}
