//! kiln's disk layer for `kiln img`: the backing chain opened read-only through imago (or, where a
//! layer has extended L2 entries or zstd compression, which imago cannot read, through kiln-disk's
//! own qcow2 reader), plus the block-status view qemu-img's `map` and `compare -s` are built on.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{FormatAccess, ShallowMapping};
use kiln_disk::qcow2::{Mapping, Qcow2Reader};

use super::chain::{Format, Layer};
use super::error::ImgError;
use super::layout::{ClusterType, Qcow2File, REFT_OFFSET_MASK};

/// The largest range one block-status query covers (qemu-img map asks in 1 GiB steps).
const MAX_QUERY: u64 = 1 << 30;

/// A backing chain opened for reading: imago's view (or kiln-disk's reader) plus kiln's own
/// per-layer metadata access.
pub struct Disk {
    pub layers: Vec<Layer>,
    reader: Reader,
    /// Per layer: the qcow2 metadata reader (for preallocated zero clusters) and its L1 table.
    meta: Vec<Option<(Qcow2File, Vec<u64>)>>,
    /// Per layer: a plain read-only handle for SEEK_DATA/SEEK_HOLE.
    files: Vec<File>,
    /// Per layer: whether its block status asks the host file about holes (QEMU's
    /// `BDRV_BLOCK_RECURSE`): always for raw, for qcow2 only when metadata preallocation is
    /// detected. Otherwise an allocated qcow2 cluster is plain data whatever the file holds.
    recurse: Vec<bool>,
}

/// Who reads guest data and block status.
enum Reader {
    /// imago, through the top image (it follows the chain itself).
    Imago(FormatAccess<ImagoFile>),
    /// kiln-disk's qcow2 reader, one per qcow2 layer (`None` for raw layers, read from `files`):
    /// a chain with a layer imago cannot read.
    Kiln(Vec<Option<Qcow2Reader>>),
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
    /// Opens every layer read-only: through kiln-disk's reader where any layer needs it, else
    /// through imago.
    pub fn open(layers: Vec<Layer>) -> Result<Self, ImgError> {
        for l in &layers {
            if let Some(feature) = l.header().and_then(|h| h.unsupported_feature()) {
                return Err(ImgError::Unsupported {
                    path: l.path().to_path_buf(),
                    feature: feature.into(),
                });
            }
        }
        // imago refuses an image with the corrupt bit set; QEMU (and so kiln img, which only
        // reads) opens it read-only, so kiln's own reader reads it.
        let kiln_reads = layers.iter().any(|l| {
            l.header()
                .is_some_and(|h| h.needs_kiln_reader() || h.corrupt())
        });
        let reader = if kiln_reads {
            let mut readers = Vec::new();
            for l in &layers {
                readers.push(match l.format {
                    Format::Qcow2(_) => {
                        Some(Qcow2Reader::open(l.path()).map_err(io_err(l, "open qcow2"))?)
                    }
                    Format::Raw => None,
                });
            }
            Reader::Kiln(readers)
        } else {
            Reader::Imago(open_imago(&layers)?)
        };
        let mut meta = Vec::new();
        let mut files = Vec::new();
        let mut recurse = Vec::new();
        for l in &layers {
            let file = File::open(l.path()).map_err(io_err(l, "open"))?;
            meta.push(match l.format {
                Format::Qcow2(_) => {
                    let q = Qcow2File::open(l.path())?;
                    let l1 = q.l1_table()?;
                    recurse.push(metadata_preallocated(&q, &file));
                    Some((q, l1))
                }
                Format::Raw => {
                    recurse.push(true);
                    None
                }
            });
            files.push(file);
        }
        Ok(Disk {
            layers,
            reader,
            meta,
            files,
            recurse,
        })
    }

    /// The virtual size of the top image. A raw file's length is rounded up to whole sectors,
    /// as QEMU's block layer does; the partial sector past the end reads as zeroes.
    pub fn size(&self) -> u64 {
        self.inner_size().max(self.layers[0].virtual_size())
    }

    /// The size the reader reports (imago: a raw file's exact length).
    fn inner_size(&self) -> u64 {
        match &self.reader {
            Reader::Imago(top) => top.size(),
            Reader::Kiln(_) => self.layers[0].virtual_size(),
        }
    }

    /// Reads guest data at `offset` into `buf` (clamped by the caller to [`Disk::size`]).
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), ImgError> {
        let inner = self.inner_size();
        let n = inner.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[n..].fill(0);
        if n == 0 {
            return Ok(());
        }
        let top = self.layers[0].path();
        match &self.reader {
            Reader::Imago(access) => access.read(&mut buf[..n], offset),
            Reader::Kiln(_) => self.kiln_read(0, &mut buf[..n], offset),
        }
        .map_err(|e| ImgError::io(top, "read", e))
    }

    /// Reads layer `depth` (and, where it has no data, the layers below) at `offset`.
    fn kiln_read(&self, depth: usize, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let Reader::Kiln(readers) = &self.reader else {
            return Err(std::io::Error::other("not read by kiln's reader"));
        };
        let (Some(layer), Some(file)) = (self.layers.get(depth), self.files.get(depth)) else {
            buf.fill(0);
            return Ok(());
        };
        match readers.get(depth).and_then(Option::as_ref) {
            Some(q) => q.read(buf, offset, &mut |chunk, at| {
                self.kiln_read(depth + 1, chunk, at)
            }),
            None => {
                let avail = layer.file_len.saturating_sub(offset).min(buf.len() as u64) as usize;
                buf[avail..].fill(0);
                if avail > 0 {
                    file.read_exact_at(&mut buf[..avail], offset)?;
                }
                Ok(())
            }
        }
    }

    /// The block status at `offset`, at most `max` bytes long.
    pub fn status_at(&self, offset: u64, max: u64) -> Result<Extent, ImgError> {
        if offset >= self.inner_size() {
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
        let mut layer = match &self.reader {
            Reader::Imago(top) => top,
            Reader::Kiln(readers) => return self.kiln_status(readers, offset, max),
        };
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

    /// [`Disk::status_at`] through kiln-disk's reader, with QEMU's rules: a range not allocated
    /// in a layer asks the layer below, unless there is none or the range lies past its end;
    /// then it reads as zeroes, keeping the host offset of an unallocated subcluster.
    fn kiln_status(
        &self,
        readers: &[Option<Qcow2Reader>],
        offset: u64,
        max: u64,
    ) -> Result<Extent, ImgError> {
        let top_path = self.layers[0].path();
        let mut depth = 0usize;
        let mut len = max.min(MAX_QUERY);
        loop {
            let base = Extent {
                start: offset,
                length: len,
                depth,
                present: true,
                zero: false,
                data: false,
                compressed: false,
                offset: None,
            };
            let Some(q) = readers.get(depth).and_then(Option::as_ref) else {
                // A raw layer: its bytes at the same offset, as the file tells them.
                return self.host_status(base, offset);
            };
            let (mapping, n) = q
                .mapping(offset, len)
                .map_err(|e| ImgError::io(top_path, "block status", e))?;
            let base = Extent { length: n, ..base };
            let host = match mapping {
                Mapping::Data { host } => return self.host_status(base, host),
                Mapping::Zero { host } => {
                    return Ok(Extent {
                        zero: true,
                        offset: host,
                        ..base
                    })
                }
                Mapping::Compressed { .. } => {
                    return Ok(Extent {
                        data: true,
                        compressed: true,
                        ..base
                    })
                }
                Mapping::Unallocated { host } => host,
            };
            let below = self.layers.get(depth + 1).map(Layer::virtual_size);
            match below {
                Some(size) if offset < size => {
                    len = n.min(size - offset);
                    depth += 1;
                }
                _ => {
                    return Ok(Extent {
                        present: false,
                        zero: true,
                        offset: host,
                        ..base
                    })
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

    /// Data at `host` in the layer's file. Where QEMU recurses (a raw layer, a qcow2 layer with
    /// metadata preallocation) the file system decides whether it reads as zeroes (a hole),
    /// asked with SEEK_DATA/SEEK_HOLE as QEMU's file driver does; elsewhere it is plain data.
    fn host_status(&self, base: Extent, host: u64) -> Result<Extent, ImgError> {
        if !self.recurse[base.depth] {
            // qcow2 without metadata preallocation: QEMU does not look below the cluster's
            // metadata, so holes in the file (e.g. from zero-filled COW) stay plain data.
            return Ok(Extent {
                data: true,
                offset: Some(host),
                ..base
            });
        }
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

/// The chain through imago, bottom up, wiring each backing explicitly (so imago never follows
/// names on its own and a loop cannot recurse).
fn open_imago(layers: &[Layer]) -> Result<FormatAccess<ImagoFile>, ImgError> {
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
    below.ok_or_else(|| ImgError::Usage("empty backing chain".into()))
}

/// QEMU's `qcow2_detect_metadata_preallocation`: the image counts as metadata-preallocated when
/// at least `max(n * 10 / 9, n + 2)` of its clusters have a reference, where `n` is the number of
/// clusters the file really occupies on disk. Any error reads as "not preallocated", as in QEMU.
fn metadata_preallocated(q: &Qcow2File, file: &File) -> bool {
    let Ok(meta) = file.metadata() else {
        return false;
    };
    let cs = q.header.cluster_size();
    let real_clusters = meta.blocks() * 512 / cs;
    let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
    let end_cluster = meta.len().div_ceil(cs);
    let Ok(table) = q.refcount_table() else {
        return false;
    };
    let per_block = q.refcounts_per_block();
    let mut block: Option<(u64, Vec<u64>)> = None;
    let mut count = 0;
    let mut i = 0;
    while i < end_cluster && count < threshold {
        let idx = i / per_block;
        let Some(&entry) = table.get(idx as usize) else {
            break; // past the refcount table: every later cluster has refcount 0
        };
        let off = entry & REFT_OFFSET_MASK;
        if off == 0 {
            i = (idx + 1) * per_block;
            continue;
        }
        if !off.is_multiple_of(cs) {
            return false; // QEMU flags the image corrupt and the detection fails
        }
        if block.as_ref().is_none_or(|(b, _)| *b != idx) {
            match q.refcount_block(off) {
                Ok(r) => block = Some((idx, r)),
                Err(_) => return false,
            }
        }
        let refs = &block.as_ref().expect("loaded above").1;
        if refs.get((i % per_block) as usize).is_some_and(|&r| r != 0) {
            count += 1;
        }
        i += 1;
    }
    count >= threshold
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::chain::resolve_chain;
    use crate::layout::OFLAG_COPIED;
    use crate::map::extents;
    use std::path::Path;

    const CS: u64 = 65536;

    /// A 128 KiB qcow2 v3 image of 64 KiB clusters: header, refcount table, refcount block, L1,
    /// L2, then one data cluster (guest cluster 0) of which only the first 4 KiB were written;
    /// the rest is a hole in the file. `dense`: the five metadata clusters are written in full,
    /// so the file occupies about as many clusters as have references (no metadata
    /// preallocation in QEMU's eyes); otherwise only their used bytes are, as after
    /// `preallocation=metadata`.
    fn one_cluster_image(dir: &Path, dense: bool) -> String {
        let p = dir.join(if dense { "dense.qcow2" } else { "sparse.qcow2" });
        let f = File::create(&p).expect("create");
        let mut h = vec![0u8; 112];
        h[..4].copy_from_slice(&kiln_disk::qcow2::QCOW2_MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&(2 * CS).to_be_bytes());
        h[36..40].copy_from_slice(&1u32.to_be_bytes());
        h[40..48].copy_from_slice(&(3 * CS).to_be_bytes());
        h[48..56].copy_from_slice(&CS.to_be_bytes());
        h[56..60].copy_from_slice(&1u32.to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        let mut clusters = vec![vec![0u8; CS as usize]; 5];
        clusters[0][..h.len()].copy_from_slice(&h);
        clusters[1][..8].copy_from_slice(&(2 * CS).to_be_bytes());
        for i in 0..6 {
            clusters[2][2 * i..2 * i + 2].copy_from_slice(&1u16.to_be_bytes());
        }
        clusters[3][..8].copy_from_slice(&((4 * CS) | OFLAG_COPIED).to_be_bytes());
        clusters[4][..8].copy_from_slice(&((5 * CS) | OFLAG_COPIED).to_be_bytes());
        f.set_len(6 * CS).expect("set_len");
        for (i, c) in clusters.iter().enumerate() {
            let used = if dense { c.len() } else { 4096 };
            f.write_all_at(&c[..used], i as u64 * CS).expect("write");
        }
        f.write_all_at(&[0xaa; 4096], 5 * CS).expect("write data");
        f.sync_all().expect("sync");
        p.display().to_string()
    }

    fn runs(name: &str) -> Vec<(u64, u64, bool, bool, Option<u64>)> {
        let disk = Disk::open(resolve_chain(name).expect("chain")).expect("open");
        extents(&disk)
            .expect("map")
            .iter()
            .map(|e| (e.start, e.length, e.zero, e.data, e.offset))
            .collect()
    }

    /// qemu-img reports an allocated qcow2 cluster as one data run from its L2 entry alone;
    /// holes in the file below it (here: after the first 4 KiB) are not looked at.
    #[test]
    fn allocated_cluster_is_data_whatever_the_file_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let name = one_cluster_image(dir.path(), true);
        assert_eq!(
            runs(&name),
            vec![
                (0, CS, false, true, Some(5 * CS)),
                (CS, CS, true, false, None),
            ]
        );
    }

    /// With metadata preallocation detected (far more referenced clusters than the file
    /// occupies), QEMU asks the file: the hole after the written 4 KiB reads as zero data.
    #[test]
    fn metadata_preallocated_image_reports_file_holes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let name = one_cluster_image(dir.path(), false);
        let meta = std::fs::metadata(&name).expect("stat");
        if meta.blocks() * 512 >= 6 * CS {
            return; // the file system keeps no holes: nothing to tell apart
        }
        assert_eq!(
            runs(&name),
            vec![
                (0, 4096, false, true, Some(5 * CS)),
                (4096, CS - 4096, true, true, Some(5 * CS + 4096)),
                (CS, CS, true, false, None),
            ]
        );
    }
}
