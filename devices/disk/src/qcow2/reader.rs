//! kiln's own read-only qcow2 layer, for what imago cannot read: extended L2 entries (each
//! cluster split into 32 subclusters that are allocated, zero or unallocated on their own) and
//! zstd-compressed clusters. It reads standard images too, so any qcow2 layer of a chain that
//! needs it can go through the same code, but kiln routes only images whose header needs it here
//! ([`Qcow2Header::needs_kiln_reader`]); everything kiln writes goes through imago.
//!
//! Lookups follow QEMU's `qcow2_get_host_offset` and `qcow2_get_subcluster_type`, including the
//! entries QEMU refuses with an I/O error (unaligned offsets, contradictory bitmaps). Bytes past
//! the end of the file read as zeroes, as QEMU's file driver returns them.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use super::compressed::decompress;
use super::header::{read_header, Qcow2Header};

/// L2 entry bit: compressed cluster.
const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Standard L2 entry bit: the cluster reads as zeroes (version 3).
const OFLAG_ZERO: u64 = 1;
/// Host offset bits of L1 and (uncompressed) L2 entries.
const ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Subclusters per cluster with extended L2 entries.
const SUBCLUSTERS: u64 = 32;
/// The allocation half of a subcluster bitmap (the zero half is the upper 32 bits).
const BITMAP_ALLOC: u64 = 0xffff_ffff;
/// QEMU's QCOW_MAX_L1_SIZE: 32 MiB of L1 entries.
const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;

/// What a range of one qcow2 layer maps to (QEMU's subcluster types, folded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Stored in this file at byte offset `host`.
    Data { host: u64 },
    /// Reads as zeroes. `host` is set where the range keeps its allocation (ZERO_ALLOC).
    Zero { host: Option<u64> },
    /// Not allocated in this layer: the backing file's data, or zeroes without one. `host` is
    /// set for unallocated subclusters of an allocated cluster (UNALLOCATED_ALLOC).
    Unallocated { host: Option<u64> },
    /// Part of a compressed cluster stored at byte `host`, `len` bytes long (as QEMU computes it
    /// from the L2 entry; the last sector may run past the end of the file).
    Compressed { host: u64, len: u64 },
}

/// One qcow2 file opened read-only, its header parsed and its active L1 table in memory.
#[derive(Debug)]
pub struct Qcow2Reader {
    path: PathBuf,
    header: Qcow2Header,
    file: File,
    file_len: u64,
    l1: Vec<u64>,
    /// The last compressed cluster decompressed (host offset, data): guests and `kiln img`
    /// read a compressed cluster in pieces, and each piece needs the whole cluster.
    cluster: Mutex<Option<(u64, Vec<u8>)>>,
}

impl Qcow2Reader {
    /// Opens the qcow2 image at `path` read-only and reads its L1 table.
    pub fn open(path: &Path) -> io::Result<Self> {
        let header = read_header(path).map_err(|e| {
            let kind = match &e.kind {
                super::HeaderErrorKind::Io { source, .. } => source.kind(),
                _ => io::ErrorKind::InvalidData,
            };
            io::Error::new(kind, e.to_string())
        })?;
        if let Some(feature) = header.unsupported_feature() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{}: {feature} is not supported", path.display()),
            ));
        }
        let file = File::open(path)?;
        let file_len = file.metadata()?.len();
        let mut reader = Qcow2Reader {
            path: path.to_path_buf(),
            header,
            file,
            file_len,
            l1: Vec::new(),
            cluster: Mutex::new(None),
        };
        reader.l1 = reader.read_l1()?;
        Ok(reader)
    }

    /// The image's parsed header.
    pub fn header(&self) -> &Qcow2Header {
        &self.header
    }

    /// The file this layer reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.header.size
    }

    /// An I/O error naming this image, for metadata QEMU would refuse too.
    fn corrupt(&self, what: String) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {what}", self.path.display()),
        )
    }

    /// QEMU's open-time checks of the active L1 table, then the table itself.
    fn read_l1(&self) -> io::Result<Vec<u64>> {
        let h = &self.header;
        let size = u64::from(h.l1_size);
        if size > MAX_L1_ENTRIES {
            return Err(self.corrupt(format!(
                "qcow2 header field l1_size = {size}: larger than {MAX_L1_ENTRIES} entries"
            )));
        }
        let cs = h.cluster_size();
        let per_l1_entry = cs / h.l2_entry_size() * cs;
        let needed = h.size.div_ceil(per_l1_entry);
        if size < needed {
            return Err(self.corrupt(format!(
                "qcow2 header field l1_size = {size}: the virtual size needs {needed} entries"
            )));
        }
        if size > 0 && !h.l1_table_offset.is_multiple_of(cs) {
            return Err(self.corrupt(format!(
                "qcow2 header field l1_table_offset = {:#x}: not aligned to the cluster size \
                 ({cs})",
                h.l1_table_offset
            )));
        }
        let mut bytes = vec![0u8; (size * 8) as usize];
        self.read_file(&mut bytes, h.l1_table_offset)?;
        Ok(bytes
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default()))
            .collect())
    }

    /// Reads `buf.len()` bytes of the file at `offset`; past its end they read as zeroes.
    fn read_file(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let avail = self.file_len.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[avail..].fill(0);
        if avail > 0 {
            self.file.read_exact_at(&mut buf[..avail], offset)?;
        }
        Ok(())
    }

    /// The L2 entry (and, with extended L2, its subcluster bitmap) for guest `offset`, or
    /// `None` when no L2 table covers it.
    fn l2_entry(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        let h = &self.header;
        let cs = h.cluster_size();
        let entry_size = h.l2_entry_size();
        let cluster = offset / cs;
        let per_l2 = cs / entry_size;
        let l1_index = cluster / per_l2;
        let Some(&l1e) = usize::try_from(l1_index).ok().and_then(|i| self.l1.get(i)) else {
            return Ok(None);
        };
        let l2_offset = l1e & ENTRY_OFFSET_MASK;
        if l2_offset == 0 {
            return Ok(None);
        }
        if !l2_offset.is_multiple_of(cs) {
            return Err(self.corrupt(format!(
                "L2 table offset {l2_offset:#x} unaligned (L1 index {l1_index:#x})"
            )));
        }
        let mut raw = [0u8; 16];
        let raw = &mut raw[..entry_size as usize];
        self.read_file(raw, l2_offset + (cluster % per_l2) * entry_size)?;
        let word = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&raw[i * 8..i * 8 + 8]);
            u64::from_be_bytes(a)
        };
        let bitmap = if entry_size == 16 { word(1) } else { 0 };
        Ok(Some((word(0), bitmap)))
    }

    /// What guest `offset` maps to, and for how many bytes from there (at least 1, at most
    /// `max`, never past the end of its cluster). `offset` must lie below [`Self::size`].
    pub fn mapping(&self, offset: u64, max: u64) -> io::Result<(Mapping, u64)> {
        let h = &self.header;
        let cs = h.cluster_size();
        let in_cluster = offset % cs;
        let to_cluster_end = (cs - in_cluster).min(max).max(1);
        let Some((entry, bitmap)) = self.l2_entry(offset)? else {
            return Ok((Mapping::Unallocated { host: None }, to_cluster_end));
        };
        if entry & OFLAG_COMPRESSED != 0 {
            let (host, len) = self.compressed_extent(entry);
            return Ok((Mapping::Compressed { host, len }, to_cluster_end));
        }
        let cluster_host = entry & ENTRY_OFFSET_MASK;
        if cluster_host != 0 && !cluster_host.is_multiple_of(cs) {
            return Err(self.corrupt(format!(
                "cluster allocation offset {cluster_host:#x} unaligned (guest offset {offset})"
            )));
        }
        let host = (cluster_host != 0).then_some(cluster_host + in_cluster);
        if !h.extended_l2() {
            let mapping = if entry & OFLAG_ZERO != 0 {
                if h.version < 3 {
                    return Err(self.corrupt(format!(
                        "zero cluster entry in a version 2 image (guest offset {offset})"
                    )));
                }
                Mapping::Zero { host }
            } else if let Some(host) = host {
                Mapping::Data { host }
            } else {
                Mapping::Unallocated { host: None }
            };
            return Ok((mapping, to_cluster_end));
        }
        let contradictory = if host.is_some() {
            (bitmap >> 32) & bitmap != 0
        } else {
            bitmap & BITMAP_ALLOC != 0
        };
        if contradictory {
            return Err(self.corrupt(format!(
                "invalid subcluster bitmap {bitmap:#018x} for L2 entry {entry:#x} (guest \
                 offset {offset})"
            )));
        }
        let sc_size = cs / SUBCLUSTERS;
        let first = in_cluster / sc_size;
        let kind = |sc: u64| (bitmap >> sc & 1, bitmap >> (32 + sc) & 1);
        let mut end = first + 1;
        while end < SUBCLUSTERS && kind(end) == kind(first) {
            end += 1;
        }
        let len = (end * sc_size - in_cluster).min(max).max(1);
        let mapping = match kind(first) {
            (_, 1) => Mapping::Zero { host },
            (1, _) => match host {
                Some(host) => Mapping::Data { host },
                None => Mapping::Unallocated { host: None },
            },
            _ => Mapping::Unallocated { host },
        };
        Ok((mapping, len))
    }

    /// Host byte offset and length of a compressed cluster (QEMU's
    /// `qcow2_parse_compressed_l2_entry`).
    fn compressed_extent(&self, entry: u64) -> (u64, u64) {
        let bits = self.header.cluster_bits;
        let shift = 62 - (bits - 8);
        let host = entry & ((1u64 << shift) - 1);
        let sectors = ((entry >> shift) & ((1u64 << (bits - 8)) - 1)) + 1;
        (host, (sectors * 512).saturating_sub(host & 511))
    }

    /// Copies the bytes of the compressed cluster at `host` (`len` bytes stored) from
    /// `in_cluster` on into `buf`. An error names the cluster; nothing here panics or grows past
    /// one cluster, whatever the file holds.
    pub fn read_compressed(
        &self,
        buf: &mut [u8],
        host: u64,
        len: u64,
        in_cluster: u64,
    ) -> io::Result<()> {
        let cs = self.header.cluster_size();
        let start = in_cluster as usize;
        let end = in_cluster
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= cs)
            .ok_or_else(|| io::Error::other("read past the end of a compressed cluster"))?
            as usize;
        let mut cached = self.cluster.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, data)) = cached.as_ref() {
            if *at == host {
                buf.copy_from_slice(&data[start..end]);
                return Ok(());
            }
        }
        // The stored length is at most two clusters (2^(cluster_bits - 8) sectors).
        let mut stored = vec![0u8; len as usize];
        self.read_file(&mut stored, host)?;
        let mut data = vec![0u8; cs as usize];
        decompress(self.header.compression, &stored, &mut data).map_err(|e| {
            self.corrupt(format!(
                "compressed cluster at host offset {host:#x} ({len} bytes): {e}"
            ))
        })?;
        buf.copy_from_slice(&data[start..end]);
        *cached = Some((host, data));
        Ok(())
    }

    /// Reads this layer's bytes at `offset` into `buf`; ranges not allocated here are asked of
    /// `backing` (which reads the backing chain, or zeroes without one). Bytes past the virtual
    /// size read as zeroes.
    pub fn read(
        &self,
        buf: &mut [u8],
        offset: u64,
        backing: &mut dyn FnMut(&mut [u8], u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let inside = self.size().saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[inside..].fill(0);
        let mut done = 0usize;
        while done < inside {
            let at = offset + done as u64;
            let (mapping, n) = self.mapping(at, (inside - done) as u64)?;
            let chunk = &mut buf[done..done + n as usize];
            match mapping {
                Mapping::Data { host } => self.read_file(chunk, host)?,
                Mapping::Zero { .. } => chunk.fill(0),
                Mapping::Unallocated { .. } => backing(chunk, at)?,
                Mapping::Compressed { host, len } => {
                    self.read_compressed(chunk, host, len, at % self.header.cluster_size())?
                }
            }
            done += n as usize;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::fs::{self, OpenOptions};

    use super::*;
    use crate::qcow2::ReadChain;
    use crate::test_util::{extl2_over_raw, have_qemu_img, qemu_raw_bytes, zstd_image, MIB};

    fn read_all(chain: &ReadChain, piece: usize) -> Vec<u8> {
        let mut out = vec![0u8; chain.size() as usize];
        for (i, chunk) in out.chunks_mut(piece).enumerate() {
            chain.read_at(chunk, (i * piece) as u64).expect("read");
        }
        out
    }

    #[test]
    fn extended_l2_image_reads_like_qemu_img() {
        if !have_qemu_img() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let top = extl2_over_raw(dir.path());
        let want = qemu_raw_bytes(&top, dir.path());
        let chain = ReadChain::open(&top).unwrap();
        assert_eq!(chain.size(), want.len() as u64);
        assert!(read_all(&chain, 1 << 20) == want, "whole-MiB reads differ");
        assert!(read_all(&chain, 3000) == want, "3000-byte reads differ");

        let q = Qcow2Reader::open(&top).unwrap();
        let host = |m: Mapping| match m {
            Mapping::Data { host } => host,
            other => panic!("{other:?}"),
        };
        let (m, n) = q.mapping(0, 1 << 20).unwrap();
        let data_host = host(m);
        assert_eq!(n, 4096);
        assert_eq!(
            q.mapping(4096, 1 << 20).unwrap(),
            (
                Mapping::Unallocated {
                    host: Some(data_host + 4096)
                },
                4096
            )
        );
        assert_eq!(
            q.mapping(8192, 1 << 20).unwrap(),
            (
                Mapping::Zero {
                    host: Some(data_host + 8192)
                },
                4096
            )
        );
        // Discarded over a backing file: zeroes, not the backing file's bytes.
        assert_eq!(
            q.mapping(196608, 1 << 20).unwrap(),
            (Mapping::Zero { host: None }, 65536)
        );
        assert_eq!(
            q.mapping(327680, 1 << 20).unwrap(),
            (Mapping::Unallocated { host: None }, 65536)
        );
    }

    #[test]
    fn zstd_images_read_like_qemu_img() {
        if !have_qemu_img() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for (cluster, extended_l2) in [
            (512, false),
            (65536, false),
            (2 << 20, false),
            (16384, true),
            (1 << 20, true),
        ] {
            let (image, data) = zstd_image(dir.path(), cluster, extended_l2);
            let chain = ReadChain::open(&image).unwrap();
            assert!(
                read_all(&chain, MIB as usize) == data,
                "{cluster} {extended_l2}"
            );
            assert!(read_all(&chain, 5000) == data, "{cluster} {extended_l2}");
            let q = Qcow2Reader::open(&image).unwrap();
            assert!(
                matches!(q.mapping(0, 4096).unwrap().0, Mapping::Compressed { .. }),
                "{cluster} {extended_l2}: first cluster not compressed"
            );
        }
    }

    /// The compressed cluster at guest offset 0 of a fresh zstd image: (image, host, len).
    fn first_compressed(dir: &Path) -> (PathBuf, u64, u64) {
        let (image, _) = zstd_image(dir, 65536, false);
        let q = Qcow2Reader::open(&image).unwrap();
        match q.mapping(0, 65536).unwrap().0 {
            Mapping::Compressed { host, len } => (image, host, len),
            other => panic!("{other:?}"),
        }
    }

    fn read_error(image: &Path) -> String {
        let chain = ReadChain::open(image).unwrap();
        let mut buf = vec![0u8; 65536];
        let err = chain.read_at(&mut buf, 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let msg = err.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        assert!(msg.contains(image.to_str().unwrap()), "{msg}");
        msg
    }

    #[test]
    fn garbage_zstd_cluster_is_an_io_error() {
        if !have_qemu_img() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (image, host, len) = first_compressed(dir.path());
        let f = OpenOptions::new().write(true).open(&image).unwrap();
        // Keep the frame magic, ruin what follows.
        f.write_all_at(&vec![0x5a; len as usize - 4], host + 4)
            .unwrap();
        let msg = read_error(&image);
        assert!(msg.contains("compressed cluster at host offset"), "{msg}");
        assert!(msg.contains("zstd"), "{msg}");
    }

    #[test]
    fn truncated_zstd_cluster_is_an_io_error() {
        if !have_qemu_img() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (image, host, len) = first_compressed(dir.path());
        let f = OpenOptions::new().write(true).open(&image).unwrap();
        // The frame's second half zeroed, as a file cut short there reads.
        f.write_all_at(&vec![0; (len / 2) as usize], host + len / 2)
            .unwrap();
        let msg = read_error(&image);
        assert!(msg.contains("zstd"), "{msg}");
    }

    #[test]
    fn zstd_frame_longer_than_a_cluster_is_an_io_error() {
        if !have_qemu_img() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (image, host, len) = first_compressed(dir.path());
        // Zeroes compress well: four clusters' worth fits in the slot of one.
        let frame = zstd::bulk::compress(&vec![0u8; 4 * 65536], 3).unwrap();
        assert!(frame.len() as u64 <= len);
        let f = OpenOptions::new().write(true).open(&image).unwrap();
        f.write_all_at(&frame, host).unwrap();
        let msg = read_error(&image);
        assert!(msg.contains("past the cluster size"), "{msg}");
    }

    #[test]
    fn random_l2_entries_never_panic() {
        if !have_qemu_img() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (image, _) = zstd_image(dir.path(), 16384, true);
        let h = read_header(&image).unwrap();
        let bytes = fs::read(&image).unwrap();
        let l1 = h.l1_table_offset as usize;
        let l2 = u64::from_be_bytes(bytes[l1..l1 + 8].try_into().unwrap()) & ENTRY_OFFSET_MASK;
        let mut seed = 0x0123_4567_89ab_cdefu64;
        let f = OpenOptions::new().write(true).open(&image).unwrap();
        for round in 0..20 {
            let words: Vec<u8> = (0..16384 / 8)
                .flat_map(|i| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    // Some entries keep plausible shapes: compressed, allocated, zero bitmaps.
                    let w = match (i + round) % 4 {
                        0 => seed | OFLAG_COMPRESSED,
                        1 => seed & (ENTRY_OFFSET_MASK | 1),
                        _ => seed,
                    };
                    w.to_be_bytes()
                })
                .collect();
            f.write_all_at(&words, l2).unwrap();
            let chain = ReadChain::open(&image).unwrap();
            let mut buf = vec![0u8; 16384];
            for off in (0..chain.size()).step_by(16384).take(64) {
                let _ = chain.read_at(&mut buf, off);
            }
        }
    }
}
