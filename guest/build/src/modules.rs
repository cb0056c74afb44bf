//! Picking the kernel modules kiln's guest needs out of a kernel's module tree, with their
//! dependency closure, in load order.
//!
//! Dependencies come from `modules.dep` when the tree has one (a host's /lib/modules does);
//! Debian's kernel packages ship none (their postinst runs depmod), so then each module's own
//! `.modinfo` `depends=` list is read instead, which is what depmod itself does.
//! `.ko.xz` and `.ko.gz` are decompressed here (lzma-rs, flate2); `.ko.zst` is packed as is and
//! the agent asks the kernel to decompress it (`MODULE_INIT_COMPRESSED_FILE`, needs
//! CONFIG_MODULE_DECOMPRESS, as Ubuntu's kernels have).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::{elf, GuestError};

/// The modules kiln's guest loads, by module name: virtio transports for QEMU (PCI) and kiln's
/// VMM (MMIO), the agent's serial port, block, rng, 9p (QEMU shares), virtio-fs (kiln shares),
/// vsock (kiln's agent transport) and ext4 (scenario disks; crc32c is looked up at mount time
/// through the crypto API, so it is listed explicitly).
pub const GUEST_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_mmio",
    "virtio_console",
    "virtio_blk",
    "virtio_rng",
    "9pnet_virtio",
    "9p",
    "virtiofs",
    "vmw_vsock_virtio_transport",
    "crc32c_generic",
    "ext4",
];

/// One module to pack: where it is in the tree and its bytes, ready to load.
#[derive(Debug, Clone)]
pub struct PackedModule {
    /// Module name (`-` normalised to `_`).
    pub name: String,
    /// Path relative to the module tree, compression suffix removed unless it is `.zst`.
    pub relative: String,
    /// The bytes to put in the initramfs.
    pub data: Vec<u8>,
}

/// A kernel's module tree (`lib/modules/<release>`).
pub struct ModuleTree {
    root: PathBuf,
    /// Module name → path relative to `root`.
    index: BTreeMap<String, String>,
    /// Module name → dependency names, when `modules.dep` exists.
    deps: Option<BTreeMap<String, Vec<String>>>,
    builtin: HashSet<String>,
}

/// The module name of a `.ko[.xz|.gz|.zst]` path.
pub fn module_name(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = [".ko", ".ko.xz", ".ko.gz", ".ko.zst"]
        .iter()
        .find_map(|suffix| file.strip_suffix(suffix))?;
    Some(stem.replace('-', "_"))
}

fn io_error(path: &Path, source: std::io::Error) -> GuestError {
    GuestError::Io {
        path: path.to_owned(),
        source,
    }
}

impl ModuleTree {
    /// Index the tree at `root`.
    pub fn open(root: &Path) -> Result<ModuleTree, GuestError> {
        if !root.is_dir() {
            return Err(GuestError::Invalid(format!(
                "{}: no such module directory (the kernel's modules must be unpacked there)",
                root.display()
            )));
        }
        let builtin = match fs::read_to_string(root.join("modules.builtin")) {
            Ok(text) => text.lines().filter_map(module_name).collect(),
            Err(_) => HashSet::new(),
        };
        let dep_file = root.join("modules.dep");
        let (index, deps) = match fs::read_to_string(&dep_file) {
            Ok(text) => {
                let (index, deps) = parse_modules_dep(&text);
                (index, Some(deps))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (walk(root)?, None),
            Err(e) => return Err(io_error(&dep_file, e)),
        };
        Ok(ModuleTree {
            root: root.to_owned(),
            index,
            deps,
            builtin,
        })
    }

    /// `wanted` and everything they depend on, dependencies first; built-in modules are
    /// skipped, a module neither built in nor in the tree is an error.
    pub fn resolve(&self, wanted: &[&str]) -> Result<Vec<PackedModule>, GuestError> {
        let mut order = Vec::new();
        let mut done = BTreeSet::new();
        for name in wanted {
            let name = name.replace('-', "_");
            self.visit(&name, &mut Vec::new(), &mut done, &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<PackedModule>,
    ) -> Result<(), GuestError> {
        if done.contains(name) {
            return Ok(());
        }
        if stack.iter().any(|n| n == name) {
            return Err(GuestError::Invalid(format!(
                "{}: module dependency cycle: {} -> {name}",
                self.root.display(),
                stack.join(" -> ")
            )));
        }
        let Some(relative) = self.index.get(name) else {
            if self.builtin.contains(name) {
                done.insert(name.to_owned());
                return Ok(());
            }
            return Err(GuestError::Invalid(format!(
                "kernel module {name} is missing from {} (neither a .ko file nor in modules.builtin); \
                 kiln's guest needs it",
                self.root.display()
            )));
        };
        let path = self.root.join(relative);
        let raw = fs::read(&path).map_err(|e| io_error(&path, e))?;
        let (data, relative) = decompress(&path, relative, raw)?;
        let depends = match &self.deps {
            Some(deps) => deps.get(name).cloned().unwrap_or_default(),
            None if relative.ends_with(".zst") => {
                return Err(GuestError::Invalid(format!(
                    "{}: zstd-compressed module in a tree without modules.dep: run depmod first",
                    path.display()
                )))
            }
            None => elf::module_depends(&data)
                .map_err(|e| GuestError::Invalid(format!("{}: {e}", path.display())))?,
        };
        stack.push(name.to_owned());
        for dep in &depends {
            self.visit(&dep.replace('-', "_"), stack, done, order)?;
        }
        stack.pop();
        done.insert(name.to_owned());
        order.push(PackedModule {
            name: name.to_owned(),
            relative,
            data,
        });
        Ok(())
    }
}

/// `modules.dep`: `kernel/a/x.ko: kernel/b/y.ko kernel/c/z.ko` → (name → path, name → deps).
fn parse_modules_dep(text: &str) -> (BTreeMap<String, String>, BTreeMap<String, Vec<String>>) {
    let mut index = BTreeMap::new();
    let mut deps = BTreeMap::new();
    for line in text.lines() {
        let Some((module, rest)) = line.split_once(':') else {
            continue;
        };
        let Some(name) = module_name(module.trim()) else {
            continue;
        };
        let list = rest.split_whitespace().filter_map(module_name).collect();
        index.insert(name.clone(), module.trim().to_owned());
        deps.insert(name, list);
    }
    (index, deps)
}

/// Every module file under `root`, by name (the first in sorted path order wins).
fn walk(root: &Path) -> Result<BTreeMap<String, String>, GuestError> {
    let mut index = BTreeMap::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(relative) = dirs.pop() {
        let dir = root.join(&relative);
        let mut entries: Vec<_> = fs::read_dir(&dir)
            .map_err(|e| io_error(&dir, e))?
            .filter_map(Result::ok)
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let child = relative.join(entry.file_name());
            let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
            let text = child.to_string_lossy().into_owned();
            if is_dir {
                dirs.push(child);
            } else if let Some(name) = module_name(&text) {
                index.entry(name).or_insert(text);
            }
        }
    }
    Ok(index)
}

fn decompress(path: &Path, relative: &str, raw: Vec<u8>) -> Result<(Vec<u8>, String), GuestError> {
    let bad =
        |e: String| GuestError::Invalid(format!("{}: cannot decompress: {e}", path.display()));
    if let Some(plain) = relative.strip_suffix(".xz") {
        let mut out = Vec::new();
        lzma_rs::xz_decompress(&mut raw.as_slice(), &mut out).map_err(|e| bad(e.to_string()))?;
        return Ok((out, plain.to_owned()));
    }
    if let Some(plain) = relative.strip_suffix(".gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| bad(e.to_string()))?;
        return Ok((out, plain.to_owned()));
    }
    Ok((raw, relative.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_are_normalised() {
        assert_eq!(
            module_name("kernel/drivers/char/hw_random/virtio-rng.ko").as_deref(),
            Some("virtio_rng")
        );
        assert_eq!(module_name("kernel/fs/9p/9p.ko.xz").as_deref(), Some("9p"));
        assert_eq!(module_name("kernel/fs/9p/9p.ko.zst").as_deref(), Some("9p"));
        assert_eq!(module_name("modules.order"), None);
    }

    #[test]
    fn modules_dep_gives_dependencies_first() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("modules.dep"),
            "kernel/fs/9p/9p.ko: kernel/fs/netfs/netfs.ko kernel/net/9p/9pnet.ko\n\
             kernel/fs/netfs/netfs.ko:\n\
             kernel/net/9p/9pnet.ko:\n\
             kernel/drivers/char/hw_random/virtio-rng.ko:\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("modules.builtin"),
            "kernel/drivers/virtio/virtio.ko\n",
        )
        .unwrap();
        for path in [
            "kernel/fs/9p/9p.ko",
            "kernel/fs/netfs/netfs.ko",
            "kernel/net/9p/9pnet.ko",
            "kernel/drivers/char/hw_random/virtio-rng.ko",
        ] {
            let file = dir.path().join(path);
            fs::create_dir_all(file.parent().unwrap()).unwrap();
            fs::write(file, path).unwrap();
        }
        let tree = ModuleTree::open(dir.path()).unwrap();
        let names: Vec<_> = tree
            .resolve(&["virtio", "9p", "virtio-rng", "netfs"])
            .unwrap()
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(names, ["netfs", "9pnet", "9p", "virtio_rng"]);
        let err = tree.resolve(&["ext4"]).unwrap_err().to_string();
        assert!(err.contains("kernel module ext4 is missing from"), "{err}");
    }

    #[test]
    fn without_modules_dep_the_tree_is_walked_and_xz_decompressed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kernel/drivers/virtio/virtio.ko.xz");
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut &b"not really elf"[..], &mut xz).unwrap();
        fs::write(&file, xz).unwrap();
        let tree = ModuleTree::open(dir.path()).unwrap();
        // The tree is found; its contents are not ELF, which is reported with the file name.
        let err = tree.resolve(&["virtio"]).unwrap_err().to_string();
        assert!(err.contains("virtio.ko.xz: not an ELF file"), "{err}");
        let (data, relative) = decompress(
            &file,
            "kernel/drivers/virtio/virtio.ko.xz",
            fs::read(&file).unwrap(),
        )
        .unwrap();
        assert_eq!(
            (data.as_slice(), relative.as_str()),
            (&b"not really elf"[..], "kernel/drivers/virtio/virtio.ko")
        );
    }
}
