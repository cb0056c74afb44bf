//! Image formats: which one a file holds, told from its first bytes. qcow2 is recognised by the
//! qcow2 header parser's own magic and fixed-header checks; formats kiln does not read are
//! recognised only to refuse them by name instead of treating them as raw.

use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{one_line, DiskError};
use crate::qcow2;

/// Image formats kiln reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// Plain bytes.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
}

impl ImageFormat {
    /// The name qcow2 headers and `qemu-img -f` use.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// Formats kiln recognises by magic only to refuse them with a clear message.
const FOREIGN_MAGICS: &[(usize, &[u8], &str)] = &[
    (0, b"QED\0", "QED"),
    (0, b"KDMV", "VMDK"),
    (0, b"# Disk DescriptorFile", "VMDK"),
    (0, b"vhdxfile", "VHDX"),
    (0, b"conectix", "VHD"),
    (0, b"LUKS\xba\xbe", "LUKS"),
    (0x40, b"\x7f\x10\xda\xbe", "VDI"),
];

/// Detects the image format from its header; anything not recognised is raw.
pub fn detect_format(path: &Path) -> Result<ImageFormat, DiskError> {
    let open_err = |e: io::Error| DiskError::Open {
        path: path.to_path_buf(),
        reason: one_line(&e),
    };
    let meta = fs::metadata(path).map_err(open_err)?;
    if meta.is_dir() {
        return Err(open_err(io::Error::from(io::ErrorKind::IsADirectory)));
    }
    let file = fs::File::open(path).map_err(open_err)?;
    let mut head = [0u8; 512];
    let n = read_prefix(&file, &mut head).map_err(open_err)?;
    let head = &head[..n];
    if n == 0 {
        return Err(DiskError::Empty {
            path: path.to_path_buf(),
        });
    }
    if qcow2::is_qcow2(head) {
        // The parser's first checks (fixed header, version); the rest of the header is imago's
        // to judge when it opens the image. `n` is the whole file whenever it is short.
        qcow2::parse_version(path, head, n as u64).map_err(|e| DiskError::BadQcow2 {
            path: path.to_path_buf(),
            reason: e.kind.to_string(),
        })?;
        return Ok(ImageFormat::Qcow2);
    }
    for (offset, magic, format) in FOREIGN_MAGICS {
        if head.get(*offset..).is_some_and(|h| h.starts_with(magic)) {
            return Err(DiskError::UnknownFormat {
                path: path.to_path_buf(),
                format,
            });
        }
    }
    Ok(ImageFormat::Raw)
}

/// Reads up to `buf.len()` bytes from the start of `file` (short files give fewer).
fn read_prefix(file: &fs::File, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], done as u64) {
            Ok(0) => break,
            Ok(k) => done += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{have_qemu_img, qemu_img};

    #[test]
    fn detects_formats() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("tiny.raw");
        fs::write(&raw, b"x").unwrap();
        assert_eq!(detect_format(&raw).unwrap(), ImageFormat::Raw);
        if !have_qemu_img() {
            return;
        }
        let q = dir.path().join("q.qcow2");
        let (ok, out) = qemu_img(&["create", "-f", "qcow2", q.to_str().unwrap(), "1M"]).unwrap();
        assert!(ok, "{out}");
        assert_eq!(detect_format(&q).unwrap(), ImageFormat::Qcow2);
    }
}
