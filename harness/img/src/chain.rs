//! Probing an image's format and following its backing chain (with loop detection) the way
//! qemu-img names things: relative backing names resolve against the overlay's directory with
//! QEMU's `path_combine`, and that combined name is what qemu-img prints for the backing layer.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kiln_disk::qcow2::{self, Qcow2Header};

use super::error::ImgError;

/// An image's format, with the parsed header for qcow2.
#[derive(Debug, Clone)]
pub enum Format {
    Raw,
    Qcow2(Box<Qcow2Header>),
}

impl Format {
    /// The format name qemu-img prints.
    pub fn name(&self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2(_) => "qcow2",
        }
    }
}

/// One image of a chain.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The name qemu-img prints (command-line name for the top, combined name for backings).
    pub name: String,
    pub format: Format,
    /// Length of the file in bytes.
    pub file_len: u64,
    /// Bytes allocated on the host (st_blocks * 512), qemu-img's "disk size".
    pub actual_size: Option<u64>,
}

impl Layer {
    pub fn path(&self) -> &Path {
        Path::new(&self.name)
    }
    pub fn header(&self) -> Option<&Qcow2Header> {
        match &self.format {
            Format::Qcow2(h) => Some(h),
            Format::Raw => None,
        }
    }
    /// Virtual disk size: the header's for qcow2, the file length for raw.
    pub fn virtual_size(&self) -> u64 {
        match &self.format {
            Format::Qcow2(h) => h.size,
            Format::Raw => self.sector_len(),
        }
    }
    /// The file length as QEMU's block layer reports it: rounded up to whole 512-byte sectors.
    pub fn sector_len(&self) -> u64 {
        self.file_len.div_ceil(512) * 512
    }
    /// The backing file name exactly as stored in the header.
    pub fn backing_file(&self) -> Option<&str> {
        self.header().and_then(|h| h.backing_file.as_deref())
    }
    /// The backing name combined with this image's directory (QEMU's full-backing-filename).
    pub fn full_backing_name(&self) -> Option<String> {
        self.backing_file().map(|b| path_combine(&self.name, b))
    }
}

/// QEMU's `path_combine`: a relative `filename` is taken relative to `base`'s directory.
pub fn path_combine(base: &str, filename: &str) -> String {
    if filename.starts_with('/') {
        return filename.to_string();
    }
    let after_protocol = base.find(':').map_or(0, |i| i + 1);
    let after_slash = base.rfind('/').map_or(0, |i| i + 1);
    let keep = after_protocol.max(after_slash);
    format!("{}{}", &base[..keep], filename)
}

/// Opens `name` read-only and determines its format (`forced` overrides probing).
pub fn open_layer(name: &str, forced: Option<&str>) -> Result<Layer, ImgError> {
    let path = Path::new(name);
    let mut file = File::open(path).map_err(|e| ImgError::io(path, "open", e))?;
    let meta = file.metadata().map_err(|e| ImgError::io(path, "stat", e))?;
    if meta.is_dir() {
        return Err(ImgError::io(
            path,
            "open",
            std::io::Error::from_raw_os_error(libc::EISDIR),
        ));
    }
    let mut magic = [0u8; 4];
    let got = file
        .read(&mut magic)
        .map_err(|e| ImgError::io(path, "read", e))?;
    let probed_qcow2 = qcow2::is_qcow2(&magic[..got]);
    let format = match forced {
        Some("raw") => Format::Raw,
        Some("qcow2") => Format::Qcow2(Box::new(qcow2::read_header(path)?)),
        Some(other) => {
            return Err(ImgError::Unsupported {
                path: path.to_path_buf(),
                feature: format!("image format '{other}'"),
            })
        }
        None if probed_qcow2 => Format::Qcow2(Box::new(qcow2::read_header(path)?)),
        None => Format::Raw,
    };
    Ok(Layer {
        name: name.to_string(),
        format,
        file_len: meta.len(),
        actual_size: Some(meta.blocks() * 512),
    })
}

/// The image and all its backing files, top first. A backing file that refers back into the
/// chain is an error naming the whole loop.
pub fn resolve_chain(name: &str) -> Result<Vec<Layer>, ImgError> {
    resolve_chain_as(name, None)
}

/// [`resolve_chain`] with the top image's format given (`-f`) instead of probed.
pub fn resolve_chain_as(name: &str, forced: Option<&str>) -> Result<Vec<Layer>, ImgError> {
    let mut layers = vec![open_layer(name, forced)?];
    let mut seen: Vec<PathBuf> = vec![canonical(Path::new(name))?];
    while let Some(next) = layers.last().and_then(Layer::full_backing_name) {
        let Some(last) = layers.last() else { break };
        let fmt = last.header().and_then(|h| h.backing_format.clone());
        let canon = canonical(Path::new(&next)).map_err(|e| match e {
            ImgError::Io { source, .. } => ImgError::Io {
                path: PathBuf::from(&next),
                what: "open backing file",
                source,
            },
            other => other,
        })?;
        if seen.contains(&canon) {
            let mut names: Vec<String> = layers.iter().map(|l| l.name.clone()).collect();
            names.push(next);
            return Err(ImgError::BackingLoop(names.join(" -> ")));
        }
        if layers.len() >= 64 {
            return Err(ImgError::Usage(format!(
                "{name}: backing chain deeper than 64 images"
            )));
        }
        seen.push(canon);
        layers.push(open_layer(&next, fmt.as_deref())?);
    }
    Ok(layers)
}

fn canonical(path: &Path) -> Result<PathBuf, ImgError> {
    std::fs::canonicalize(path).map_err(|e| ImgError::io(path, "open", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal v3 qcow2 header naming `backing` as its backing file.
    fn qcow2_with_backing(backing: &str) -> Vec<u8> {
        let mut b = vec![0u8; 1024];
        b[..4].copy_from_slice(&qcow2::QCOW2_MAGIC);
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[8..16].copy_from_slice(&512u64.to_be_bytes());
        b[16..20].copy_from_slice(&(backing.len() as u32).to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        b[36..40].copy_from_slice(&1u32.to_be_bytes());
        b[48..56].copy_from_slice(&0x10000u64.to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        b[512..512 + backing.len()].copy_from_slice(backing.as_bytes());
        b
    }

    #[test]
    fn backing_loop_is_one_line_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a.qcow2");
        let b = dir.path().join("b.qcow2");
        std::fs::write(&a, qcow2_with_backing("b.qcow2")).expect("write");
        std::fs::write(&b, qcow2_with_backing("a.qcow2")).expect("write");
        let name = a.display().to_string();
        let err = resolve_chain(&name).unwrap_err().to_string();
        let d = dir.path().display();
        assert_eq!(
            err,
            format!("backing file loop: {d}/a.qcow2 -> {d}/b.qcow2 -> {d}/a.qcow2")
        );
        // Without following the chain the image is still described.
        assert!(crate::info(&name, false, false, crate::Profile::V10_0)
            .stdout
            .contains("backing file: b.qcow2"));
    }

    #[test]
    fn missing_backing_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a.qcow2");
        std::fs::write(&a, qcow2_with_backing("gone.qcow2")).expect("write");
        let err = resolve_chain(&a.display().to_string())
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with("gone.qcow2: open backing file: No such file or directory (os error 2)"),
            "{err}"
        );
    }

    #[test]
    fn path_combine_like_qemu() {
        assert_eq!(path_combine("top.qcow2", "base.qcow2"), "base.qcow2");
        assert_eq!(path_combine("/d/top.qcow2", "base.qcow2"), "/d/base.qcow2");
        assert_eq!(path_combine("d/e/top", "../b"), "d/e/../b");
        assert_eq!(path_combine("/d/top", "/abs/b"), "/abs/b");
    }
}
