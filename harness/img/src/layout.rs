//! Reading qcow2 metadata tables (L1, L2, refcount table and blocks, snapshot table) straight from
//! the file, read-only. imago keeps these private; `check` needs to walk all of them itself.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use kiln_disk::qcow2::{read_header, Qcow2Header};

use super::error::ImgError;

/// L1/L2 entry bit: refcount is exactly one (the cluster may be written in place).
pub const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entry bit: compressed cluster.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 entry bit: reads as zeroes (version 3).
pub const OFLAG_ZERO: u64 = 1;
/// Host offset bits of L1 and standard L2 entries.
pub const ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry.
pub const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Host offset bits of a refcount table entry.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Reserved bits of a refcount table entry.
pub const REFT_RESERVED_MASK: u64 = 0x1ff;

/// An L2 entry's meaning (standard L2, no subclusters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterType {
    Unallocated,
    ZeroPlain,
    ZeroAlloc(u64),
    Normal(u64),
    /// Compressed data: host byte offset and length in bytes (as QEMU computes it).
    Compressed {
        offset: u64,
        len: u64,
    },
}

/// A snapshot's L1 table: offset, number of entries, snapshot id.
pub type SnapshotL1 = (u64, u64, String);

/// Read-only access to one qcow2 file's metadata.
pub struct Qcow2File {
    pub path: PathBuf,
    pub header: Qcow2Header,
    pub file: File,
    pub file_len: u64,
}

impl Qcow2File {
    /// Opens `path` read-only and parses its header.
    pub fn open(path: &Path) -> Result<Self, ImgError> {
        let header = read_header(path)?;
        let file = File::open(path).map_err(|e| ImgError::io(path, "open", e))?;
        let file_len = file
            .metadata()
            .map_err(|e| ImgError::io(path, "stat", e))?
            .len();
        Ok(Qcow2File {
            path: path.to_path_buf(),
            header,
            file,
            file_len,
        })
    }

    /// Reads `len` bytes at `offset`; the part past the end of the file reads as zeroes, as in
    /// QEMU's file driver.
    pub fn read_at(&self, offset: u64, len: u64, what: &'static str) -> Result<Vec<u8>, ImgError> {
        let len_usize = usize::try_from(len)
            .ok()
            .filter(|&l| l <= 1 << 30)
            .ok_or_else(|| {
                ImgError::corrupt(
                    &self.path,
                    format!("{what}: size {len} at {offset} too large"),
                )
            })?;
        let mut buf = vec![0u8; len_usize];
        if offset < self.file_len {
            let avail = (self.file_len - offset).min(len) as usize;
            self.file
                .read_exact_at(&mut buf[..avail], offset)
                .map_err(|e| ImgError::io(&self.path, what, e))?;
        }
        Ok(buf)
    }

    fn read_u64s(&self, offset: u64, count: u64, what: &'static str) -> Result<Vec<u64>, ImgError> {
        let bytes = self.read_at(offset, count.saturating_mul(8), what)?;
        Ok(bytes
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                u64::from_be_bytes(a)
            })
            .collect())
    }

    /// The active L1 table.
    pub fn l1_table(&self) -> Result<Vec<u64>, ImgError> {
        self.l1_table_at(self.header.l1_table_offset, u64::from(self.header.l1_size))
    }

    /// An L1 table of `size` entries at `offset` (active or a snapshot's).
    pub fn l1_table_at(&self, offset: u64, size: u64) -> Result<Vec<u64>, ImgError> {
        // QEMU's limit (QCOW_MAX_L1_SIZE, 32 MiB); bigger tables are refused, not read.
        if size > (32 << 20) / 8 {
            return Err(ImgError::field(
                &self.path,
                "l1_size",
                size,
                "L1 table larger than 32 MiB",
            ));
        }
        self.read_u64s(offset, size, "read L1 table")
    }

    /// The raw 64-bit words of the L2 table at `offset` (two per entry with extended L2).
    pub fn l2_table(&self, offset: u64) -> Result<Vec<u64>, ImgError> {
        self.read_u64s(offset, self.header.cluster_size() / 8, "read L2 table")
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.header.cluster_size() / self.header.l2_entry_size()
    }

    /// Decodes one standard L2 entry.
    pub fn cluster_type(&self, entry: u64) -> ClusterType {
        if entry & OFLAG_COMPRESSED != 0 {
            let bits = self.header.cluster_bits;
            let shift = 62 - (bits - 8);
            let offset = entry & ((1u64 << shift) - 1);
            let sectors = ((entry >> shift) & ((1u64 << (bits - 8)) - 1)) + 1;
            let len = (sectors * 512).saturating_sub(offset & 511);
            return ClusterType::Compressed { offset, len };
        }
        let host = entry & ENTRY_OFFSET_MASK;
        if entry & OFLAG_ZERO != 0 && !self.header.extended_l2() {
            if host != 0 {
                ClusterType::ZeroAlloc(host)
            } else {
                ClusterType::ZeroPlain
            }
        } else if host == 0 {
            ClusterType::Unallocated
        } else {
            ClusterType::Normal(host)
        }
    }

    /// The L2 entry for guest offset `guest`, or `None` when no L2 table covers it.
    pub fn l2_entry_for(&self, l1: &[u64], guest: u64) -> Result<Option<u64>, ImgError> {
        let cs = self.header.cluster_size();
        let per_l2 = self.l2_entries();
        let cluster = guest / cs;
        let Some(&l1e) = l1.get((cluster / per_l2) as usize) else {
            return Ok(None);
        };
        let l2_off = l1e & ENTRY_OFFSET_MASK;
        if l2_off == 0 {
            return Ok(None);
        }
        let idx = (cluster % per_l2) * (self.header.l2_entry_size() / 8);
        let words = self.read_u64s(l2_off + idx * 8, 1, "read L2 entry")?;
        Ok(words.first().copied())
    }

    /// The refcount table (entries cover whole clusters, like QEMU's in-memory copy).
    pub fn refcount_table(&self) -> Result<Vec<u64>, ImgError> {
        let cs = self.header.cluster_size();
        let entries = u64::from(self.header.refcount_table_clusters) * cs / 8;
        if entries > (1 << 24) {
            return Err(ImgError::field(
                &self.path,
                "refcount_table_clusters",
                self.header.refcount_table_clusters,
                "refcount table larger than 128 MiB",
            ));
        }
        self.read_u64s(
            self.header.refcount_table_offset,
            entries,
            "read refcount table",
        )
    }

    /// Decodes one refcount block into per-cluster refcounts.
    pub fn refcount_block(&self, offset: u64) -> Result<Vec<u64>, ImgError> {
        let bytes = self.read_at(offset, self.header.cluster_size(), "read refcount block")?;
        let bits = self.header.refcount_bits();
        Ok(decode_refcounts(&bytes, bits))
    }

    /// Refcount entries per refcount block.
    pub fn refcounts_per_block(&self) -> u64 {
        self.header.cluster_size() * 8 / u64::from(self.header.refcount_bits())
    }

    /// The snapshot table: (L1 offset, L1 size, id) per snapshot, and the table's byte length.
    pub fn snapshots(&self) -> Result<(Vec<SnapshotL1>, u64), ImgError> {
        let mut out = Vec::new();
        let mut off = self.header.snapshots_offset;
        for _ in 0..self.header.nb_snapshots.min(65536) {
            let fixed = self.read_at(off, 40, "read snapshot table")?;
            let be =
                |a: usize, n: usize| fixed[a..a + n].iter().fold(0u64, |v, b| v << 8 | *b as u64);
            let l1_off = be(0, 8);
            let l1_size = be(8, 4);
            let id_len = be(12, 2);
            let name_len = be(14, 2);
            let extra = be(36, 4);
            let id = self.read_at(off.saturating_add(40 + extra), id_len, "read snapshot id")?;
            out.push((l1_off, l1_size, String::from_utf8_lossy(&id).into_owned()));
            let entry = 40 + extra + id_len + name_len;
            off = off.saturating_add(entry.div_ceil(8) * 8);
        }
        Ok((out, off.saturating_sub(self.header.snapshots_offset)))
    }
}

/// Splits a refcount block into entries of `bits` width (big-endian, MSB-first bit order for
/// sub-byte widths, as the spec defines).
pub fn decode_refcounts(bytes: &[u8], bits: u32) -> Vec<u64> {
    match bits {
        1 | 2 | 4 => {
            let per_byte = 8 / bits;
            let mask = (1u8 << bits) - 1;
            let mut v = Vec::with_capacity(bytes.len() * per_byte as usize);
            for &b in bytes {
                for i in 0..per_byte {
                    // Entry i of a byte lives in the low bits first (QEMU: `>> (i * bits)`).
                    v.push(u64::from((b >> (i * bits)) & mask));
                }
            }
            v
        }
        _ => {
            let n = (bits / 8) as usize;
            bytes
                .chunks_exact(n)
                .map(|c| c.iter().fold(0u64, |v, b| v << 8 | u64::from(*b)))
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_widths_decode() {
        assert_eq!(decode_refcounts(&[0x00, 0x01, 0x00, 0x02], 16), vec![1, 2]);
        assert_eq!(
            decode_refcounts(&[0b0000_0101], 1),
            vec![1, 0, 1, 0, 0, 0, 0, 0]
        );
        assert_eq!(decode_refcounts(&[0x21], 4), vec![1, 2]);
        assert_eq!(decode_refcounts(&[7; 8], 64), vec![0x0707_0707_0707_0707]);
    }
}
