//! The content-addressed guest cache: `$XDG_CACHE_HOME/kiln/guests/<sha256 prefix>/` holding
//! `kernel`, `initrd.img` and `manifest.json`, plus `aliases/<name>` files naming an entry
//! (`default` is the one `kiln run` uses). Entries are written into a temporary directory beside
//! the final one and renamed into place, so a failed build never leaves a half-written entry.

use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::GuestError;

/// File names inside an entry.
pub const KERNEL_FILE: &str = "kernel";
/// The initramfs file name inside an entry.
pub const INITRD_FILE: &str = "initrd.img";
/// The manifest file name inside an entry.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Hex digits of the content hash used as the entry name.
const NAME_LEN: usize = 16;

/// Where a guest's kernel came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Source {
    /// A Debian/Ubuntu kernel package.
    Deb {
        /// What was asked for (package name or .deb path).
        requested: String,
        /// The package that held the kernel.
        package: String,
        /// Its version.
        version: String,
    },
    /// The running host's kernel.
    Host {
        /// `uname -r`.
        release: String,
    },
    /// Built from kernel source with guest/kernel/kiln.config.
    KernelSource {
        /// The source directory or tarball.
        path: String,
        /// sha256 of the config fragment used.
        config_sha256: String,
    },
}

/// One file of an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Lower-case hex sha256.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// `manifest.json`: what the entry is and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version of this file.
    pub format: u32,
    /// The entry name (content hash prefix).
    pub name: String,
    /// Provenance of the kernel.
    pub source: Source,
    /// Kernel release (`6.1.0-56-amd64`), when known.
    pub kernel_release: Option<String>,
    /// sha256 of the kiln-agent packed as /init.
    pub agent_sha256: String,
    /// sha256 of the busybox in /bin, when there is one.
    #[serde(default)]
    pub busybox_sha256: Option<String>,
    /// Modules packed, in load order.
    pub modules: Vec<String>,
    /// The kernel image.
    pub kernel: FileRecord,
    /// The initramfs.
    pub initrd: FileRecord,
    /// The kiln version that built it.
    pub built_by: String,
}

/// A cached guest, ready to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// The entry directory.
    pub dir: PathBuf,
    /// The kernel (bzImage or ELF).
    pub kernel: PathBuf,
    /// The gzip'd cpio initramfs.
    pub initrd: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

/// The cache directory: `$XDG_CACHE_HOME/kiln/guests`, else `$HOME/.cache/kiln/guests`.
pub fn cache_root() -> Result<PathBuf, GuestError> {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("kiln/guests"));
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".cache/kiln/guests")),
        None => Err(GuestError::Invalid(
            "neither XDG_CACHE_HOME nor HOME is set: kiln has nowhere to cache guests".into(),
        )),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> GuestError + '_ {
    move |source| GuestError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Lower-case hex sha256.
pub fn sha256_hex(data: &[u8]) -> String {
    kiln_agent_proto::sha256_hex(data)
}

/// The guest cache at one root.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

/// An exclusive lock on the cache, held while building (two `kiln` processes starting at once
/// build the default guest once).
pub struct CacheLock {
    _file: fs::File,
}

impl Cache {
    /// The cache at `root` (created on first store).
    pub fn new(root: impl Into<PathBuf>) -> Cache {
        Cache { root: root.into() }
    }

    /// The default cache (see [`cache_root`]).
    pub fn default_location() -> Result<Cache, GuestError> {
        cache_root().map(Cache::new)
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Take the build lock (blocks while another process builds).
    pub fn lock(&self) -> Result<CacheLock, GuestError> {
        fs::create_dir_all(&self.root).map_err(io(&self.root))?;
        let path = self.root.join(".lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        // SAFETY: flock on a descriptor we own; no pointers.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io(&path)(std::io::Error::last_os_error()));
        }
        Ok(CacheLock { _file: file })
    }

    /// Store kernel + initramfs as a new entry (or find the identical one already there) and
    /// return it. `manifest.name`, `.kernel` and `.initrd` are filled in here.
    pub fn store(
        &self,
        kernel: &[u8],
        initrd: &[u8],
        mut manifest: Manifest,
    ) -> Result<GuestImage, GuestError> {
        manifest.kernel = FileRecord {
            sha256: sha256_hex(kernel),
            size: kernel.len() as u64,
        };
        manifest.initrd = FileRecord {
            sha256: sha256_hex(initrd),
            size: initrd.len() as u64,
        };
        let key = format!("{}\n{}\n", manifest.kernel.sha256, manifest.initrd.sha256);
        manifest.name = sha256_hex(key.as_bytes())[..NAME_LEN].to_owned();
        let dir = self.root.join(&manifest.name);
        if let Ok(image) = self.open_dir(&dir) {
            // Same bytes from the same recipe: nothing to do. Same bytes written by an older
            // recipe: rewritten below, or the default guest would be rebuilt forever.
            if image.manifest.kernel == manifest.kernel
                && image.manifest.initrd == manifest.initrd
                && image.manifest.format == manifest.format
            {
                return Ok(image);
            }
        }
        fs::create_dir_all(&self.root).map_err(io(&self.root))?;
        let temp = tempfile::Builder::new()
            .prefix(".building-")
            .tempdir_in(&self.root)
            .map_err(io(&self.root))?;
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| GuestError::Invalid(format!("cannot encode the manifest: {e}")))?;
        for (name, data) in [
            (KERNEL_FILE, kernel),
            (INITRD_FILE, initrd),
            (MANIFEST_FILE, json.as_slice()),
        ] {
            let path = temp.path().join(name);
            let mut file = fs::File::create(&path).map_err(io(&path))?;
            file.write_all(data)
                .and_then(|()| file.sync_all())
                .map_err(io(&path))?;
        }
        if dir.exists() {
            // A stale or damaged entry with this name: replace it.
            fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
        let staged = temp.keep();
        fs::rename(&staged, &dir).map_err(|e| {
            let _ = fs::remove_dir_all(&staged);
            io(&dir)(e)
        })?;
        self.open_dir(&dir)
    }

    /// Point alias `name` (e.g. `default`) at an entry, atomically.
    pub fn set_alias(&self, alias: &str, entry: &str) -> Result<(), GuestError> {
        let dir = self.root.join("aliases");
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let mut temp = tempfile::NamedTempFile::new_in(&dir).map_err(io(&dir))?;
        temp.write_all(format!("{entry}\n").as_bytes())
            .map_err(io(temp.path()))?;
        let path = dir.join(alias);
        temp.persist(&path).map_err(|e| io(&path)(e.error))?;
        Ok(())
    }

    /// The entry an alias names, if the alias exists.
    pub fn alias(&self, alias: &str) -> Option<String> {
        let text = fs::read_to_string(self.root.join("aliases").join(alias)).ok()?;
        Some(text.trim().to_owned()).filter(|t| !t.is_empty())
    }

    /// All aliases, sorted: (alias, entry).
    pub fn aliases(&self) -> Vec<(String, String)> {
        let Ok(entries) = fs::read_dir(self.root.join("aliases")) else {
            return Vec::new();
        };
        let mut out: Vec<_> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let alias = e.file_name().to_str()?.to_owned();
                Some((alias.clone(), self.alias(&alias)?)).filter(|_| !alias.starts_with('.'))
            })
            .collect();
        out.sort();
        out
    }

    /// Find an entry by alias, full name or unique name prefix.
    pub fn find(&self, name: &str) -> Result<GuestImage, GuestError> {
        if let Some(entry) = self.alias(name) {
            return self.open_dir(&self.root.join(entry));
        }
        let matches: Vec<_> = self
            .list()
            .into_iter()
            .filter(|image| image.manifest.name.starts_with(name))
            .collect();
        match matches.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(GuestError::Invalid(format!(
                "no cached guest named {name:?} in {} (see `kiln guest list`)",
                self.root.display()
            ))),
            _ => Err(GuestError::Invalid(format!(
                "guest name {name:?} is ambiguous in {}: give more of the hash",
                self.root.display()
            ))),
        }
    }

    /// Every complete entry, sorted by name.
    pub fn list(&self) -> Vec<GuestImage> {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut out: Vec<_> = entries
            .filter_map(Result::ok)
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| self.open_dir(&e.path()).ok())
            .collect();
        out.sort_by(|a, b| a.manifest.name.cmp(&b.manifest.name));
        out
    }

    /// Open one entry directory, checking that its files are there with the recorded sizes.
    pub fn open_dir(&self, dir: &Path) -> Result<GuestImage, GuestError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = fs::read(&manifest_path).map_err(io(&manifest_path))?;
        let manifest: Manifest = serde_json::from_slice(&text)
            .map_err(|e| GuestError::Invalid(format!("{}: {e}", manifest_path.display())))?;
        let image = GuestImage {
            dir: dir.to_owned(),
            kernel: dir.join(KERNEL_FILE),
            initrd: dir.join(INITRD_FILE),
            manifest,
        };
        for (path, record) in [
            (&image.kernel, &image.manifest.kernel),
            (&image.initrd, &image.manifest.initrd),
        ] {
            let size = fs::metadata(path).map_err(io(path))?.len();
            if size != record.size {
                return Err(GuestError::Invalid(format!(
                    "{}: {size} bytes, manifest says {}: the cache entry is damaged, rebuild it",
                    path.display(),
                    record.size
                )));
            }
        }
        Ok(image)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn manifest() -> Manifest {
        Manifest {
            format: 1,
            name: String::new(),
            source: Source::Host {
                release: "6.1.0-test".into(),
            },
            kernel_release: Some("6.1.0-test".into()),
            agent_sha256: "00".into(),
            busybox_sha256: None,
            modules: vec!["virtio".into()],
            kernel: FileRecord {
                sha256: String::new(),
                size: 0,
            },
            initrd: FileRecord {
                sha256: String::new(),
                size: 0,
            },
            built_by: "kiln test".into(),
        }
    }

    #[test]
    fn entries_are_content_addressed_and_found_by_alias_or_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let image = cache.store(b"kernel", b"initrd", manifest()).unwrap();
        assert_eq!(image.manifest.name.len(), NAME_LEN);
        assert_eq!(fs::read(&image.kernel).unwrap(), b"kernel");
        assert_eq!(image.manifest.initrd.sha256, sha256_hex(b"initrd"));
        // Same content → same entry; different content → another.
        let again = cache.store(b"kernel", b"initrd", manifest()).unwrap();
        assert_eq!(again.dir, image.dir);
        let other = cache.store(b"kernel", b"initrd2", manifest()).unwrap();
        assert_ne!(other.dir, image.dir);
        assert_eq!(cache.list().len(), 2);

        cache.set_alias("default", &image.manifest.name).unwrap();
        assert_eq!(cache.find("default").unwrap().dir, image.dir);
        assert_eq!(
            cache.find(&image.manifest.name[..10]).unwrap().dir,
            image.dir
        );
        assert_eq!(
            cache.aliases(),
            [("default".to_owned(), image.manifest.name.clone())]
        );
        let err = cache.find("zzz").unwrap_err().to_string();
        assert!(err.starts_with("no cached guest named \"zzz\""), "{err}");
        // No temporary directories are left behind.
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(".building"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn the_same_bytes_stored_by_a_newer_recipe_take_its_recipe_version() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let old = cache.store(b"kernel", b"initrd", manifest()).unwrap();
        assert_eq!(old.manifest.format, 1);
        let newer = Manifest {
            format: 2,
            ..manifest()
        };
        let image = cache.store(b"kernel", b"initrd", newer).unwrap();
        assert_eq!(image.dir, old.dir);
        assert_eq!(image.manifest.format, 2);
        assert_eq!(cache.open_dir(&old.dir).unwrap().manifest.format, 2);
    }

    #[test]
    fn a_damaged_entry_is_reported_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let image = cache.store(b"kernel", b"initrd", manifest()).unwrap();
        fs::write(&image.initrd, b"short").unwrap();
        let err = cache.open_dir(&image.dir).unwrap_err().to_string();
        assert!(err.contains("the cache entry is damaged"), "{err}");
        let fixed = cache.store(b"kernel", b"initrd", manifest()).unwrap();
        assert_eq!(fs::read(&fixed.initrd).unwrap(), b"initrd");
    }
}
