//! kiln's disk layer for `kiln img`: the backing chain opened read-only through imago, plus the
//! block-status view qemu-img's `map` and `compare -s` are built on.

use std::fs::File;
use std::os::fd::AsRawFd;

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{FormatAccess, ShallowMapping};

use super::chain::{Format, Layer};
use super::error::ImgError;
use super::layout::{ClusterType, Qcow2File};

/// The largest range one block-status query covers (qemu-img map asks in 1 GiB steps).
const MAX_QUERY: u64 = 1 << 30;

/// A backing chain opened for reading: imago's view plus kiln's own per-layer metadata access.
pub struct Disk {
    pub layers: Vec<Layer>,
    top: FormatAccess<ImagoFile>,
    /// Per layer: the qcow2 metadata reader (for preallocated zero clusters) and its L1 table.
    meta: Vec<Option<(Qcow2File, Vec<u64>)>>,
    /// Per layer: a plain read-only handle for SEEK_DATA/SEEK_HOLE.
    files: Vec<File>,
}

/// One block-status run, with the fields `qemu-img map --output=json` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    pub depth: usize,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    pub offset: Option<u64>,
}

impl Extent {
    /// qemu-img's `entry_mergeable` rule (same flags, same depth, contiguous host offsets).
    pub fn mergeable(&self, next: &Extent) -> bool {
        self.length != 0
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.depth == next.depth
            && self.present == next.present
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }
}

fn io_err<'a>(layer: &'a Layer, what: &'static str) -> impl Fn(std::io::Error) -> ImgError + 'a {
    move |e| ImgError::io(layer.path(), what, e)
}

impl Disk {
    /// Opens every layer read-only, bottom up, wiring each backing explicitly (so imago never
    /// follows names on its own and a loop cannot recurse).
    pub fn open(layers: Vec<Layer>) -> Result<Self, ImgError> {
        for l in &layers {
            if let Some(feature) = l.header().and_then(|h| h.unsupported_feature()) {
                return Err(ImgError::Unsupported {
                    path: l.path().to_path_buf(),
                    feature: feature.into(),
                });
            }
        }
        let mut below: Option<FormatAccess<ImagoFile>> = None;
        for l in layers.iter().rev() {
            let access = match &l.format {
                Format::Raw => {
                    FormatAccess::new(Raw::open_path(l.path(), false).map_err(io_err(l, "open"))?)
                }
                Format::Qcow2(_) => {
                    let mut q: Qcow2<ImagoFile> =
                        Qcow2::open_path(l.path(), false).map_err(io_err(l, "open qcow2"))?;
                    q.set_backing(below.take());
                    q.open_implicit_dependencies()
                        .map_err(io_err(l, "open data file"))?;
                    FormatAccess::new(q)
                }
            };
            below = Some(access);
        }
        let top = below.ok_or_else(|| ImgError::Usage("empty backing chain".into()))?;
        let mut meta = Vec::new();
        let mut files = Vec::new();
        for l in &layers {
            meta.push(match l.format {
                Format::Qcow2(_) => {
                    let q = Qcow2File::open(l.path())?;
                    let l1 = q.l1_table()?;
                    Some((q, l1))
                }
                Format::Raw => None,
            });
            files.push(File::open(l.path()).map_err(io_err(l, "open"))?);
        }
        Ok(Disk {
            layers,
            top,
            meta,
            files,
        })
    }

    /// The virtual size of the top image. A raw file's length is rounded up to whole sectors,
    /// as QEMU's block layer does; the partial sector past the end reads as zeroes.
    pub fn size(&self) -> u64 {
        self.top.size().max(self.layers[0].virtual_size())
    }

    /// Reads guest data at `offset` into `buf` (clamped by the caller to [`Disk::size`]).
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), ImgError> {
        let inner = self.top.size();
        let n = inner.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[n..].fill(0);
        if n == 0 {
            return Ok(());
        }
        self.top
            .read(&mut buf[..n], offset)
            .map_err(|e| ImgError::io(self.layers[0].path(), "read", e))
    }

    /// The block status at `offset`, at most `max` bytes long.
    pub fn status_at(&self, offset: u64, max: u64) -> Result<Extent, ImgError> {
        if offset >= self.top.size() {
            // Only a raw file's partial last sector lies here: a trailing hole in QEMU's view.
            return Ok(Extent {
                start: offset,
                length: max,
                depth: 0,
                present: true,
                zero: true,
                data: false,
                compressed: false,
                offset: Some(offset),
            });
        }
        let mut layer = &self.top;
        let mut depth = 0usize;
        let mut loff = offset;
        let mut len = max.min(MAX_QUERY);
        let top_path = self.layers[0].path();
        loop {
            let (mapping, n) = layer
                .get_shallow_mapping(loff, len)
                .map_err(|e| ImgError::io(top_path, "block status", e))?;
            let base = Extent {
                start: offset,
                length: n.min(len),
                depth,
                present: true,
                zero: false,
                data: false,
                compressed: false,
                offset: None,
            };
            match mapping {
                ShallowMapping::Raw { offset: host, .. } => {
                    return self.host_status(base, host);
                }
                ShallowMapping::Indirect {
                    layer: next,
                    offset: o,
                    ..
                } => {
                    layer = next;
                    loff = o;
                    len = n.min(len);
                    depth += 1;
                }
                ShallowMapping::Zero { explicit: true, .. } => {
                    return self.zero_cluster(base, loff);
                }
                ShallowMapping::Zero { .. } => {
                    return Ok(Extent {
                        present: false,
                        zero: true,
                        ..base
                    });
                }
                ShallowMapping::Special { .. } => {
                    return Ok(Extent {
                        data: true,
                        compressed: true,
                        length: self.cluster_bound(depth, loff, base.length),
                        ..base
                    });
                }
                ShallowMapping::Eof { .. } => {
                    // Past the end of a backing file: the overlay above reports zeroes itself.
                    let Some(d) = depth.checked_sub(1) else {
                        return Err(ImgError::corrupt(
                            top_path,
                            format!("block status at {offset}: end of image"),
                        ));
                    };
                    return Ok(Extent {
                        depth: d,
                        present: false,
                        zero: true,
                        length: len,
                        ..base
                    });
                }
                _ => {
                    return Err(ImgError::corrupt(
                        top_path,
                        format!("block status at {offset}: unknown mapping kind"),
                    ))
                }
            }
        }
    }

    /// Limits `len` to the end of the qcow2 cluster containing `loff` at `depth`.
    fn cluster_bound(&self, depth: usize, loff: u64, len: u64) -> u64 {
        match self.meta.get(depth).and_then(|m| m.as_ref()) {
            Some((q, _)) => {
                let cs = q.header.cluster_size();
                len.min(cs - loff % cs)
            }
            None => len,
        }
    }

    /// A qcow2 zero cluster: preallocated ones (ZERO_ALLOC) keep their host offset, which imago
    /// does not expose, so it comes from kiln's own L2 lookup.
    fn zero_cluster(&self, base: Extent, loff: u64) -> Result<Extent, ImgError> {
        let length = self.cluster_bound(base.depth, loff, base.length);
        let mut offset = None;
        if let Some(Some((q, l1))) = self.meta.get(base.depth) {
            if let Some(entry) = q.l2_entry_for(l1, loff)? {
                if let ClusterType::ZeroAlloc(host) = q.cluster_type(entry) {
                    offset = Some(host + loff % q.header.cluster_size());
                }
            }
        }
        Ok(Extent {
            zero: true,
            length,
            offset,
            ..base
        })
    }

    /// Data at `host` in the layer's file: the file system decides whether it reads as zeroes
    /// (a hole) exactly as QEMU's file driver asks it with SEEK_DATA/SEEK_HOLE.
    fn host_status(&self, base: Extent, host: u64) -> Result<Extent, ImgError> {
        let raw_layer = matches!(self.layers[base.depth].format, Format::Raw);
        let file = &self.files[base.depth];
        let (hole, len) = match seek_extent(file, host) {
            SeekExtent::Data(end) => (false, base.length.min(end - host)),
            SeekExtent::Hole(end) => (true, base.length.min(end - host)),
            SeekExtent::PastEof => (true, base.length),
            SeekExtent::Unknown => (false, base.length),
        };
        Ok(Extent {
            length: len.max(1),
            zero: hole,
            // A raw layer reports only what the file says; a qcow2 data cluster stays data.
            data: !(raw_layer && hole),
            offset: Some(host),
            ..base
        })
    }
}

enum SeekExtent {
    Data(u64),
    Hole(u64),
    PastEof,
    Unknown,
}

fn seek_extent(file: &File, at: u64) -> SeekExtent {
    let fd = file.as_raw_fd();
    let Ok(start) = libc::off_t::try_from(at) else {
        return SeekExtent::Unknown;
    };
    // SAFETY: lseek on an fd we own; it only moves the (unused) file position.
    let data = unsafe { libc::lseek(fd, start, libc::SEEK_DATA) };
    if data < 0 {
        return if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
            SeekExtent::PastEof
        } else {
            SeekExtent::Unknown
        };
    }
    if data > start {
        return SeekExtent::Hole(data as u64);
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
    if hole > start {
        SeekExtent::Data(hole as u64)
    } else {
        SeekExtent::Unknown
    }
}
