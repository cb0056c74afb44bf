//! A backing chain read through kiln's own qcow2 reader ([`Qcow2Reader`]), for images imago
//! cannot open (extended L2, zstd), and the same chain offered to imago as read-only storage so
//! a copy-on-write overlay (or a read-only disk) can sit on it like on any other base.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::storage::drivers::CommonStorageHelper;
use imago::Storage;

use super::header::{is_qcow2, read_header};
use super::reader::Qcow2Reader;

/// Deepest backing chain kiln follows (QEMU has no fixed limit; this stops runaway chains).
pub const MAX_CHAIN_DEPTH: usize = 64;

/// One image of a chain.
#[derive(Debug)]
enum Layer {
    /// A raw file: its bytes, then zeroes up to the next whole sector (QEMU's view).
    Raw {
        file: File,
        len: u64,
    },
    Qcow2(Box<Qcow2Reader>),
}

impl Layer {
    fn size(&self) -> u64 {
        match self {
            Layer::Raw { len, .. } => len.div_ceil(512) * 512,
            Layer::Qcow2(q) => q.size(),
        }
    }
}

/// An image and its backing files, top first, read-only.
#[derive(Debug)]
pub struct ReadChain {
    path: PathBuf,
    layers: Vec<Layer>,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// `name` as stored in an image's header, resolved against that image's directory (QEMU's
/// `path_combine`).
pub(crate) fn backing_path(image: &Path, name: &str) -> PathBuf {
    let name = Path::new(name);
    match image.parent() {
        Some(dir) if name.is_relative() => dir.join(name),
        _ => name.to_path_buf(),
    }
}

fn starts_with_qcow2_magic(path: &Path) -> io::Result<bool> {
    let mut magic = [0u8; 4];
    let mut file = File::open(path)?;
    let mut got = 0;
    while got < magic.len() {
        match file.read(&mut magic[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(is_qcow2(&magic[..got]))
}

/// Whether the qcow2 image at `path` or any image below it needs kiln's own reader (imago
/// cannot open it). Unreadable headers answer `false`: imago's open then reports them.
pub fn chain_needs_reader(path: &Path) -> bool {
    let mut path = path.to_path_buf();
    for _ in 0..MAX_CHAIN_DEPTH {
        let Ok(h) = read_header(&path) else {
            return false;
        };
        if h.needs_kiln_reader() {
            return true;
        }
        let Some(name) = &h.backing_file else {
            return false;
        };
        let next = backing_path(&path, name);
        if h.backing_format.as_deref() == Some("raw")
            || !starts_with_qcow2_magic(&next).unwrap_or(false)
        {
            return false;
        }
        path = next;
    }
    false
}

impl ReadChain {
    /// Opens the qcow2 image at `path` and every backing file below it, read-only.
    pub fn open(path: &Path) -> io::Result<Self> {
        let mut layers = vec![Layer::Qcow2(Box::new(Qcow2Reader::open(path)?))];
        let mut seen = vec![fs::canonicalize(path)?];
        let mut below = path.to_path_buf();
        while let Some(Layer::Qcow2(q)) = layers.last() {
            let Some(name) = q.header().backing_file.clone() else {
                break;
            };
            let format = q.header().backing_format.clone();
            let next = backing_path(&below, &name);
            let canonical = fs::canonicalize(&next).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "backing file {} of {}: {e}",
                        next.display(),
                        below.display()
                    ),
                )
            })?;
            if seen.contains(&canonical) {
                return Err(invalid(format!(
                    "{}: backing file loop through {}",
                    path.display(),
                    next.display()
                )));
            }
            if layers.len() >= MAX_CHAIN_DEPTH {
                return Err(invalid(format!(
                    "{}: backing chain deeper than {MAX_CHAIN_DEPTH} images",
                    path.display()
                )));
            }
            let qcow2 = match format.as_deref() {
                Some("qcow2") => true,
                Some("raw") => false,
                None => starts_with_qcow2_magic(&next)?,
                Some(other) => {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        format!(
                            "{}: backing format {other:?} is not supported (raw or qcow2)",
                            below.display()
                        ),
                    ))
                }
            };
            layers.push(if qcow2 {
                Layer::Qcow2(Box::new(Qcow2Reader::open(&next)?))
            } else {
                let file = File::open(&next)?;
                let len = file.metadata()?.len();
                Layer::Raw { file, len }
            });
            seen.push(canonical);
            below = next;
        }
        Ok(ReadChain {
            path: path.to_path_buf(),
            layers,
        })
    }

    /// The top image.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The top image's virtual size.
    pub fn size(&self) -> u64 {
        self.layers.first().map_or(0, Layer::size)
    }

    /// Reads guest data at `offset`; past the virtual size it reads as zeroes.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_layer(0, buf, offset)
    }

    fn read_layer(&self, depth: usize, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let Some(layer) = self.layers.get(depth) else {
            buf.fill(0);
            return Ok(());
        };
        match layer {
            Layer::Raw { file, len } => {
                let avail = len.saturating_sub(offset).min(buf.len() as u64) as usize;
                buf[avail..].fill(0);
                if avail > 0 {
                    file.read_exact_at(&mut buf[..avail], offset)?;
                }
                Ok(())
            }
            Layer::Qcow2(q) => q.read(buf, offset, &mut |chunk, at| {
                self.read_layer(depth + 1, chunk, at)
            }),
        }
    }
}

/// A [`ReadChain`] as imago storage: the chain's guest bytes, read-only, so that imago's raw
/// driver can serve them as a disk or as the backing of an overlay.
#[derive(Debug)]
pub struct ChainStorage {
    chain: ReadChain,
    helper: CommonStorageHelper,
}

impl ChainStorage {
    /// Wraps `chain`.
    pub fn new(chain: ReadChain) -> Self {
        ChainStorage {
            chain,
            helper: CommonStorageHelper::default(),
        }
    }
}

impl fmt::Display for ChainStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.chain.path().display())
    }
}

fn read_only(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("{}: kiln reads this qcow2 image only", path.display()),
    )
}

impl Storage for ChainStorage {
    fn size(&self) -> io::Result<u64> {
        Ok(self.chain.size())
    }

    fn get_filename(&self) -> Option<PathBuf> {
        Some(self.chain.path().to_path_buf())
    }

    unsafe fn pure_readv(&self, mut bufv: IoVectorMut<'_>, offset: u64) -> io::Result<()> {
        let len = usize::try_from(bufv.len()).map_err(io::Error::other)?;
        let mut data = vec![0u8; len];
        self.chain.read_at(&mut data, offset)?;
        bufv.copy_from_slice(&data);
        Ok(())
    }

    unsafe fn pure_writev(&self, _bufv: IoVector<'_>, _offset: u64) -> io::Result<()> {
        Err(read_only(self.chain.path()))
    }

    unsafe fn pure_write_zeroes(&self, _offset: u64, _length: u64) -> io::Result<()> {
        Err(read_only(self.chain.path()))
    }

    unsafe fn pure_write_allocated_zeroes(&self, _offset: u64, _length: u64) -> io::Result<()> {
        Err(read_only(self.chain.path()))
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    unsafe fn invalidate_cache(&self) -> io::Result<()> {
        Ok(())
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        &self.helper
    }
}
