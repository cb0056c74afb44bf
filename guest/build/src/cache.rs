//! The content-addressed guest cache: `$XDG_CACHE_HOME/kiln/guests/<sha256 prefix>/` holding
//! `kernel`, `initrd.img` and `manifest.json`, plus `aliases/<name>` files naming an entry
//! (`default` is the one `kiln run` uses). Entries are written into a temporary directory beside
//! the final one and renamed into place, so a failed build never leaves a half-written entry.
//! Guests pulled from an OCI registry also leave `oci/sha256-<hex>`: the registry manifest
//! itself, named by its digest (see [`crate::registry`]).
//!
//! Every entry is checked when it is opened: its name is the hash of the two file hashes its
//! manifest records, and the files must have those sha256 hashes (hashed once per process and
//! file version), so a damaged or tampered file is refused, never booted. Entries are readable
//! by everyone (directories 0755, files 0644) and using a complete entry writes nothing, so one
//! cache can be shared with other users or CI jobs from a read-only mount.

use std::collections::HashSet;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

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
/// The directory of registry manifests of pulled guests.
pub const OCI_DIR: &str = "oci";
/// Mode of entry directories: everyone may read a cache shared between users.
const DIR_MODE: u32 = 0o755;
/// Mode of entry files and aliases.
const FILE_MODE: u32 = 0o644;

/// Files already hashed by this process, by (device, inode, size, mtime seconds and nanoseconds,
/// expected sha256): opening an entry twice hashes it once, and a file changed since is hashed
/// again.
static VERIFIED: Mutex<Option<HashSet<FileVersion>>> = Mutex::new(None);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FileVersion {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    sha256: String,
}

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

/// The entry name of a guest whose kernel and initramfs have these sha256 hashes.
pub fn entry_name(kernel_sha256: &str, initrd_sha256: &str) -> String {
    let key = format!("{kernel_sha256}\n{initrd_sha256}\n");
    sha256_hex(key.as_bytes())[..NAME_LEN].to_owned()
}

/// Lower-case hex sha256 of a file, read in pieces.
fn sha256_file(path: &Path) -> Result<String, GuestError> {
    let mut file = fs::File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Checks that `path` has the size and sha256 `record` gives; each file version is hashed once
/// per process.
fn verify_file(path: &Path, record: &FileRecord) -> Result<(), GuestError> {
    let meta = fs::metadata(path).map_err(io(path))?;
    if meta.len() != record.size {
        return Err(GuestError::Invalid(format!(
            "{}: {} bytes, manifest says {}: the cache entry is damaged, rebuild or pull it again",
            path.display(),
            meta.len(),
            record.size
        )));
    }
    let version = FileVersion {
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.len(),
        mtime: (meta.mtime(), meta.mtime_nsec()),
        sha256: record.sha256.clone(),
    };
    let seen = |v: &FileVersion| {
        let verified = VERIFIED.lock().unwrap_or_else(|p| p.into_inner());
        verified.as_ref().is_some_and(|set| set.contains(v))
    };
    if seen(&version) {
        return Ok(());
    }
    let actual = sha256_file(path)?;
    if actual != record.sha256 {
        return Err(GuestError::Invalid(format!(
            "{}: sha256 {actual}, manifest says {}: the cache entry is damaged or was tampered \
             with; refusing it (rebuild or pull it again)",
            path.display(),
            record.sha256
        )));
    }
    VERIFIED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashSet::new)
        .insert(version);
    Ok(())
}

/// Writes `data` to `path` (a new file) with [`FILE_MODE`], synced.
fn write_new(path: &Path, data: &[u8]) -> Result<(), GuestError> {
    let mut file = fs::File::create(path).map_err(io(path))?;
    file.write_all(data)
        .and_then(|()| file.set_permissions(fs::Permissions::from_mode(FILE_MODE)))
        .and_then(|()| file.sync_all())
        .map_err(io(path))
}

/// Writes `data` to `dir/name` atomically (temporary file + rename), readable by everyone.
pub(crate) fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> Result<(), GuestError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let mut temp = tempfile::NamedTempFile::new_in(dir).map_err(io(dir))?;
    temp.write_all(data)
        .and_then(|()| {
            temp.as_file()
                .set_permissions(fs::Permissions::from_mode(FILE_MODE))
        })
        .and_then(|()| temp.as_file().sync_all())
        .map_err(io(temp.path()))?;
    let path = dir.join(name);
    temp.persist(&path).map_err(|e| io(&path)(e.error))?;
    Ok(())
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
        self.create_root()?;
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
        manifest.name = entry_name(&manifest.kernel.sha256, &manifest.initrd.sha256);
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
        self.create_root()?;
        let temp = tempfile::Builder::new()
            .prefix(".building-")
            .tempdir_in(&self.root)
            .map_err(io(&self.root))?;
        fs::set_permissions(temp.path(), fs::Permissions::from_mode(DIR_MODE))
            .map_err(io(temp.path()))?;
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| GuestError::Invalid(format!("cannot encode the manifest: {e}")))?;
        for (name, data) in [
            (KERNEL_FILE, kernel),
            (INITRD_FILE, initrd),
            (MANIFEST_FILE, json.as_slice()),
        ] {
            write_new(&temp.path().join(name), data)?;
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

    /// Creates the cache directory (and its parents) readable by everyone.
    fn create_root(&self) -> Result<(), GuestError> {
        if self.root.is_dir() {
            return Ok(());
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(&self.root)
            .map_err(io(&self.root))
    }

    /// Point alias `name` (e.g. `default`) at an entry, atomically.
    pub fn set_alias(&self, alias: &str, entry: &str) -> Result<(), GuestError> {
        if alias.is_empty() || alias.starts_with('.') || alias.contains('/') {
            return Err(GuestError::Invalid(format!(
                "guest alias {alias:?}: a name without '/' that does not start with '.'"
            )));
        }
        self.create_root()?;
        write_atomic(
            &self.root.join("aliases"),
            alias,
            format!("{entry}\n").as_bytes(),
        )
    }

    /// The guest pulled as registry manifest `sha256:<hex>`, if this cache holds it. The stored
    /// registry manifest must hash to that digest and name the entry's kernel and initramfs.
    pub fn pulled(&self, digest_hex: &str) -> Option<Result<GuestImage, GuestError>> {
        let path = self.root.join(OCI_DIR).join(format!("sha256-{digest_hex}"));
        let bytes = fs::read(&path).ok()?;
        Some(crate::registry::open_pulled(
            self, &path, digest_hex, &bytes,
        ))
    }

    /// Records that registry manifest `sha256:<hex>` (its bytes) is a guest in this cache.
    pub(crate) fn record_pulled(
        &self,
        digest_hex: &str,
        manifest: &[u8],
    ) -> Result<(), GuestError> {
        self.create_root()?;
        write_atomic(
            &self.root.join(OCI_DIR),
            &format!("sha256-{digest_hex}"),
            manifest,
        )
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
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.len() == NAME_LEN && name.bytes().all(|b| b.is_ascii_hexdigit())
            })
            .filter_map(|e| self.open_dir(&e.path()).ok())
            .collect();
        out.sort_by(|a, b| a.manifest.name.cmp(&b.manifest.name));
        out
    }

    /// Open one entry directory, checking that its name matches its manifest and that its files
    /// have the sizes and sha256 hashes the manifest records.
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
        let expected = entry_name(&image.manifest.kernel.sha256, &image.manifest.initrd.sha256);
        let dir_name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
        if image.manifest.name != expected || dir_name.as_deref() != Some(expected.as_str()) {
            return Err(GuestError::Invalid(format!(
                "{}: name {:?} in directory {:?}, but its kernel and initrd hashes make {expected:?}: \
                 the cache entry is damaged or was tampered with; refusing it",
                manifest_path.display(),
                image.manifest.name,
                dir_name.unwrap_or_default()
            )));
        }
        for (path, record) in [
            (&image.kernel, &image.manifest.kernel),
            (&image.initrd, &image.manifest.initrd),
        ] {
            verify_file(path, record)?;
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

    #[test]
    fn a_tampered_file_of_the_same_size_is_refused_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let image = cache.store(b"kernel", b"initrd", manifest()).unwrap();
        cache.set_alias("default", &image.manifest.name).unwrap();
        // Opened (and hashed) once in this process; the change must still be seen.
        cache.find("default").unwrap();
        fs::write(&image.kernel, b"kernex").unwrap();
        let err = cache.find("default").unwrap_err().to_string();
        assert!(err.contains("tampered with; refusing it"), "{err}");
        assert!(err.contains(&sha256_hex(b"kernex")), "{err}");
        assert!(cache.list().is_empty());
    }

    #[test]
    fn a_manifest_edited_to_match_other_files_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let image = cache.store(b"kernel", b"initrd", manifest()).unwrap();
        // Swap in other bytes and a manifest recording them, in the old entry's directory.
        fs::write(&image.kernel, b"evil").unwrap();
        let mut forged = image.manifest.clone();
        forged.kernel = FileRecord {
            sha256: sha256_hex(b"evil"),
            size: 4,
        };
        fs::write(
            image.dir.join(MANIFEST_FILE),
            serde_json::to_vec(&forged).unwrap(),
        )
        .unwrap();
        let err = cache.open_dir(&image.dir).unwrap_err().to_string();
        assert!(err.contains("hashes make"), "{err}");
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn entries_and_aliases_are_readable_by_everyone() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().join("guests"));
        let image = cache.store(b"kernel", b"initrd", manifest()).unwrap();
        cache.set_alias("default", &image.manifest.name).unwrap();
        assert_eq!(mode(cache.root()), 0o755);
        assert_eq!(mode(&image.dir), 0o755);
        assert_eq!(mode(&cache.root().join("aliases")), 0o755);
        for file in [&image.kernel, &image.initrd, &image.dir.join(MANIFEST_FILE)] {
            assert_eq!(mode(file), 0o644, "{}", file.display());
        }
        assert_eq!(mode(&cache.root().join("aliases/default")), 0o644);
    }

    /// Every path under `root` with its size and modification time.
    fn snapshot(root: &Path) -> Vec<(PathBuf, u64, i64, i64)> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_owned()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let meta = fs::symlink_metadata(&path).unwrap();
                if meta.is_dir() {
                    stack.push(path.clone());
                }
                out.push((path, meta.len(), meta.mtime(), meta.mtime_nsec()));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn a_read_only_cache_is_used_without_writing_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().join("guests"));
        let image = cache
            .store(
                b"kernel",
                b"initrd",
                Manifest {
                    format: crate::RECIPE_VERSION,
                    ..manifest()
                },
            )
            .unwrap();
        cache
            .set_alias(crate::DEFAULT_ALIAS, &image.manifest.name)
            .unwrap();
        // What a shared mount looks like: nothing writable. Root ignores the modes, so the test
        // also checks that nothing was written (no new file, no changed mtime).
        let mut paths = snapshot(cache.root());
        paths.push((cache.root().to_owned(), 0, 0, 0));
        for (path, ..) in &paths {
            let mut perms = fs::metadata(path).unwrap().permissions();
            perms.set_mode(perms.mode() & !0o222);
            fs::set_permissions(path, perms).unwrap();
        }
        let before = snapshot(cache.root());
        let found = crate::default_guest_in(&cache, &|line| panic!("progress: {line}")).unwrap();
        assert_eq!(found.dir, image.dir);
        assert_eq!(
            cache.find(&image.manifest.name[..8]).unwrap().dir,
            image.dir
        );
        assert_eq!(cache.list().len(), 1);
        assert_eq!(snapshot(cache.root()), before);
        assert!(!cache.root().join(".lock").exists());
        for (path, ..) in paths {
            let mut perms = fs::metadata(&path).unwrap().permissions();
            perms.set_mode(perms.mode() | 0o200);
            fs::set_permissions(&path, perms).unwrap();
        }
    }
}
