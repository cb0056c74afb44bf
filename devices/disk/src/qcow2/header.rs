//! kiln's one qcow2 header parser (QEMU docs/interop/qcow2.txt).
//!
//! imago opens images for I/O but does not expose the header fields `qemu-img info` prints
//! (compat, feature bits, refcount width, compression type, corrupt bit, …) and refuses extended-L2
//! and zstd images outright (kiln reads those with its own reader, `reader.rs`); format detection
//! must tell qcow2 from raw before imago is involved, so the header is parsed here.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Why a qcow2 header could not be read or parsed. `Display` is one line: the file, then
/// [`HeaderErrorKind`]'s description.
#[derive(Debug, thiserror::Error)]
#[error("{}: {kind}", .path.display())]
pub struct HeaderError {
    /// The image.
    pub path: PathBuf,
    /// What is wrong, without the file name.
    pub kind: HeaderErrorKind,
}

/// What is wrong with a qcow2 header; each message names the field and value.
#[derive(Debug, thiserror::Error)]
pub enum HeaderErrorKind {
    /// The file could not be opened or read.
    #[error("{what}: {source}")]
    Io {
        /// What was being done ("open", "read header", …).
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The file ends before a structure the header must contain.
    #[error("truncated: {field} needs {needed} bytes at offset {offset}, file has {len}")]
    Truncated {
        /// The structure.
        field: &'static str,
        /// Where it starts.
        offset: u64,
        /// How many bytes it needs.
        needed: u64,
        /// The file's length.
        len: u64,
    },
    /// A header field holds a value qcow2 does not allow.
    #[error("qcow2 header field {field} = {value}: {expected}")]
    Field {
        /// The field's name in QEMU's qcow2 specification.
        field: &'static str,
        /// Its value as found.
        value: String,
        /// What would be valid.
        expected: String,
    },
}

impl HeaderError {
    fn new(path: &Path, kind: HeaderErrorKind) -> Self {
        HeaderError {
            path: path.to_path_buf(),
            kind,
        }
    }

    fn io(path: &Path, what: &'static str, source: io::Error) -> Self {
        Self::new(path, HeaderErrorKind::Io { what, source })
    }

    fn truncated(path: &Path, field: &'static str, offset: u64, needed: u64, len: u64) -> Self {
        Self::new(
            path,
            HeaderErrorKind::Truncated {
                field,
                offset,
                needed,
                len,
            },
        )
    }

    fn field(
        path: &Path,
        field: &'static str,
        value: impl std::fmt::Display,
        expected: impl Into<String>,
    ) -> Self {
        Self::new(
            path,
            HeaderErrorKind::Field {
                field,
                value: value.to_string(),
                expected: expected.into(),
            },
        )
    }
}

/// The four magic bytes every qcow2 file starts with.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// The most L1 entries QEMU opens (`QCOW_MAX_L1_SIZE`: 32 MiB of 8-byte entries).
pub const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;

/// The largest refcount table QEMU opens (`QCOW_MAX_REFTABLE_SIZE`: 8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;

/// The most internal snapshots QEMU opens (`QCOW_MAX_SNAPSHOTS`).
pub const MAX_SNAPSHOTS: u64 = 65536;

/// Bytes of one snapshot table entry's fixed part, extra-data length included (QEMU's
/// `QCowSnapshotHeader`), the unit QEMU sizes the snapshot table in at open.
const SNAPSHOT_HEADER_BYTES: u64 = 40;

/// Incompatible feature bits (header offset 72).
pub mod incompat {
    pub const DIRTY: u64 = 1 << 0;
    pub const CORRUPT: u64 = 1 << 1;
    pub const DATA_FILE: u64 = 1 << 2;
    pub const COMPRESSION: u64 = 1 << 3;
    pub const EXTL2: u64 = 1 << 4;
    /// Every bit this parser knows.
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTL2;
}

/// Length of the fixed part every qcow2 header has (all of a version 2 header).
pub const V2_HEADER_LEN: usize = 72;

/// Header offset of the compatible feature bits (big-endian u64, version 3).
pub const COMPAT_FEATURES_OFFSET: u64 = 80;
/// Compatible feature bit: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1;
/// Autoclear feature bit: the external data file is a valid raw image on its own.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_DATA_FILE: u32 = 0x4441_5441;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_CRYPTO: u32 = 0x0537_be77;

/// The compression algorithm for compressed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zlib,
    Zstd,
}

impl Compression {
    /// The name qemu-img prints.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }
}

/// Every qcow2 header field `kiln img` reports or needs for its own metadata walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: Compression,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
    pub has_bitmaps_extension: bool,
}

impl Qcow2Header {
    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }
    /// Width of one refcount entry in bits.
    pub fn refcount_bits(&self) -> u32 {
        1u32 << self.refcount_order
    }
    /// "0.10" for version 2, "1.1" for version 3, as qemu-img names them.
    pub fn compat(&self) -> &'static str {
        if self.version == 2 {
            "0.10"
        } else {
            "1.1"
        }
    }
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTL2 != 0
    }
    pub fn corrupt(&self) -> bool {
        self.incompatible_features & incompat::CORRUPT != 0
    }
    pub fn dirty(&self) -> bool {
        self.incompatible_features & incompat::DIRTY != 0
    }
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & COMPAT_LAZY_REFCOUNTS != 0
    }
    pub fn data_file_raw(&self) -> bool {
        self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0
    }
    pub fn encrypted(&self) -> bool {
        self.crypt_method != 0
    }
    /// Bytes per L2 entry (16 with extended L2: entry + subcluster bitmap).
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }
    /// Whether imago cannot read this image but kiln's own read-only reader can: extended L2
    /// entries (subclusters) or zstd-compressed clusters.
    pub fn needs_kiln_reader(&self) -> bool {
        self.extended_l2() || self.compression == Compression::Zstd
    }
    /// The reason kiln cannot do I/O on this image at all, if any.
    pub fn unsupported_feature(&self) -> Option<&'static str> {
        if self.encrypted() {
            Some("encryption")
        } else if self.data_file.is_some() || self.incompatible_features & incompat::DATA_FILE != 0
        {
            Some("external data file")
        } else {
            None
        }
    }
}

/// True when `bytes` start with the qcow2 magic.
pub fn is_qcow2(bytes: &[u8]) -> bool {
    bytes.len() >= 4 && bytes[..4] == QCOW2_MAGIC
}

fn be32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

/// Reads and parses the header of the qcow2 file at `path` (opened read-only).
pub fn read_header(path: &Path) -> Result<Qcow2Header, HeaderError> {
    let file = File::open(path).map_err(|e| HeaderError::io(path, "open", e))?;
    let len = file
        .metadata()
        .map_err(|e| HeaderError::io(path, "stat", e))?
        .len();
    // The header and its extensions live in the first cluster (at most 2 MiB).
    let want = len.min(2 << 20) as usize;
    let mut buf = vec![0u8; want];
    file.read_exact_at(&mut buf, 0)
        .map_err(|e| HeaderError::io(path, "read header", e))?;
    parse_header(path, &buf, len)
}

/// The checks that tell a qcow2 image apart before anything else of it is read: the magic, a
/// complete fixed (version 2) header, and version 2 or 3. Returns the version; [`parse_header`]
/// starts with these checks.
pub fn parse_version(path: &Path, buf: &[u8], file_len: u64) -> Result<u32, HeaderError> {
    let truncated = |field: &'static str, offset: u64, needed: u64| {
        HeaderError::truncated(path, field, offset, needed, file_len)
    };
    if buf.len() < 4 {
        return Err(truncated("magic", 0, 4));
    }
    if !is_qcow2(buf) {
        return Err(HeaderError::field(
            path,
            "magic",
            format!("{:02x?}", &buf[..4]),
            "expected 51 46 49 fb (\"QFI\\xfb\")",
        ));
    }
    if buf.len() < V2_HEADER_LEN {
        return Err(truncated("header", 0, V2_HEADER_LEN as u64));
    }
    let version = be32(buf, 4);
    if version != 2 && version != 3 {
        return Err(HeaderError::field(
            path,
            "version",
            version,
            "expected 2 or 3",
        ));
    }
    Ok(version)
}

/// Parses a qcow2 header from the first bytes of a file of `file_len` bytes.
pub fn parse_header(path: &Path, buf: &[u8], file_len: u64) -> Result<Qcow2Header, HeaderError> {
    let truncated = |field: &'static str, offset: u64, needed: u64| {
        HeaderError::truncated(path, field, offset, needed, file_len)
    };
    let version = parse_version(path, buf, file_len)?;
    let cluster_bits = be32(buf, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(HeaderError::field(
            path,
            "cluster_bits",
            cluster_bits,
            "expected 9..=21 (512 B to 2 MiB)",
        ));
    }
    let mut h = Qcow2Header {
        version,
        cluster_bits,
        size: be64(buf, 24),
        crypt_method: be32(buf, 32),
        l1_size: be32(buf, 36),
        l1_table_offset: be64(buf, 40),
        refcount_table_offset: be64(buf, 48),
        refcount_table_clusters: be32(buf, 56),
        nb_snapshots: be32(buf, 60),
        snapshots_offset: be64(buf, 64),
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: 4,
        header_length: 72,
        compression: Compression::Zlib,
        backing_file: None,
        backing_format: None,
        data_file: None,
        has_bitmaps_extension: false,
    };
    if version == 3 {
        if buf.len() < 104 {
            return Err(truncated("version 3 header", 0, 104));
        }
        h.incompatible_features = be64(buf, 72);
        h.compatible_features = be64(buf, 80);
        h.autoclear_features = be64(buf, 88);
        h.refcount_order = be32(buf, 96);
        h.header_length = be32(buf, 100);
        if h.header_length < 104 || !h.header_length.is_multiple_of(8) {
            return Err(HeaderError::field(
                path,
                "header_length",
                h.header_length,
                "expected a multiple of 8, at least 104",
            ));
        }
        if u64::from(h.header_length) > h.cluster_size() {
            return Err(HeaderError::field(
                path,
                "header_length",
                h.header_length,
                format!("must fit in the first cluster ({} bytes)", h.cluster_size()),
            ));
        }
        if h.refcount_order > 6 {
            return Err(HeaderError::field(
                path,
                "refcount_order",
                h.refcount_order,
                "expected 0..=6 (1 to 64 bits)",
            ));
        }
        let unknown = h.incompatible_features & !incompat::KNOWN;
        if unknown != 0 {
            return Err(HeaderError::field(
                path,
                "incompatible_features",
                format!("{:#x}", h.incompatible_features),
                format!("unknown bits {unknown:#x}"),
            ));
        }
        if h.incompatible_features & incompat::COMPRESSION != 0 {
            if h.header_length < 112 || buf.len() < 105 {
                return Err(HeaderError::field(
                    path,
                    "header_length",
                    h.header_length,
                    "compression type bit set but header has no compression_type field",
                ));
            }
            h.compression = match buf[104] {
                0 => Compression::Zlib,
                1 => Compression::Zstd,
                other => {
                    return Err(HeaderError::field(
                        path,
                        "compression_type",
                        other,
                        "expected 0 (zlib) or 1 (zstd)",
                    ))
                }
            };
        }
    }
    if h.crypt_method > 2 {
        return Err(HeaderError::field(
            path,
            "crypt_method",
            h.crypt_method,
            "expected 0 (none), 1 (aes) or 2 (luks)",
        ));
    }
    if h.size.checked_add(h.cluster_size()).is_none() || h.size > (1u64 << 62) {
        return Err(HeaderError::field(path, "size", h.size, "too large"));
    }
    // QEMU refuses both at open ("Active L1 table too large", "L1 table is too small"): a
    // virtual size the L1 table cannot map would otherwise be read as terabytes of zeros.
    if u64::from(h.l1_size) > MAX_L1_ENTRIES {
        return Err(HeaderError::field(
            path,
            "l1_size",
            h.l1_size,
            format!("at most {MAX_L1_ENTRIES} entries (32 MiB)"),
        ));
    }
    let l2_bits = h.cluster_bits - if h.extended_l2() { 4 } else { 3 };
    let needed = h.size.div_ceil(1u64 << (h.cluster_bits + l2_bits));
    if u64::from(h.l1_size) < needed {
        return Err(HeaderError::field(
            path,
            "l1_size",
            h.l1_size,
            format!(
                "at least {needed} entries to map the virtual size of {} bytes (L1 table is too small)",
                h.size
            ),
        ));
    }
    check_tables(path, &h)?;
    parse_extensions(path, buf, file_len, &mut h)?;
    parse_backing_name(path, buf, file_len, &mut h)?;
    Ok(h)
}

/// The table checks of QEMU's `qcow2_do_open`, in its order: a refcount table exists, and the
/// refcount, snapshot and active L1 tables each fit QEMU's maximum, are cluster-aligned and end
/// below 2^63. QEMU refuses to open an image that fails one (iotests 060 and 080).
fn check_tables(path: &Path, h: &Qcow2Header) -> Result<(), HeaderError> {
    let cluster = h.cluster_size();
    if h.refcount_table_clusters == 0 {
        return Err(HeaderError::field(
            path,
            "refcount_table_clusters",
            0,
            "at least 1 (the image has no refcount table)",
        ));
    }
    let table = |count: &'static str, entries: u64, entry: u64, max: u64| {
        if entries > max / entry {
            return Err(HeaderError::field(
                path,
                count,
                entries,
                format!("at most {} (QEMU's limit)", max / entry),
            ));
        }
        Ok(entries * entry)
    };
    let placed = |field: &'static str, offset: u64, bytes: u64| {
        if !offset.is_multiple_of(cluster)
            || offset
                .checked_add(bytes)
                .is_none_or(|end| end > i64::MAX as u64)
        {
            return Err(HeaderError::field(
                path,
                field,
                format!("{offset:#x}"),
                format!(
                    "a multiple of the cluster size ({cluster}) with the table ending below 2^63"
                ),
            ));
        }
        Ok(())
    };
    let bytes = table(
        "refcount_table_clusters",
        u64::from(h.refcount_table_clusters),
        cluster,
        MAX_REFTABLE_BYTES,
    )?;
    placed("refcount_table_offset", h.refcount_table_offset, bytes)?;
    if u64::from(h.nb_snapshots) > MAX_SNAPSHOTS {
        return Err(HeaderError::field(
            path,
            "nb_snapshots",
            h.nb_snapshots,
            format!("at most {MAX_SNAPSHOTS}"),
        ));
    }
    let bytes = u64::from(h.nb_snapshots) * SNAPSHOT_HEADER_BYTES;
    placed("snapshots_offset", h.snapshots_offset, bytes)?;
    let bytes = table("l1_size", u64::from(h.l1_size), 8, MAX_L1_ENTRIES * 8)?;
    placed("l1_table_offset", h.l1_table_offset, bytes)
}

fn parse_extensions(
    path: &Path,
    buf: &[u8],
    file_len: u64,
    h: &mut Qcow2Header,
) -> Result<(), HeaderError> {
    let end = (h.cluster_size() as usize).min(buf.len());
    let mut off = h.header_length as usize;
    // A v2 header has extensions too, right after the 72 fixed bytes.
    while off + 8 <= end {
        let kind = be32(buf, off);
        let len = be32(buf, off + 4) as usize;
        let data = off + 8;
        if kind == EXT_END {
            return Ok(());
        }
        let Some(data_end) = data.checked_add(len).filter(|&e| e <= end) else {
            return Err(HeaderError::truncated(
                path,
                "header extension",
                data as u64,
                len as u64,
                file_len,
            ));
        };
        let text = || String::from_utf8_lossy(&buf[data..data_end]).into_owned();
        match kind {
            EXT_BACKING_FORMAT => h.backing_format = Some(text()),
            EXT_DATA_FILE => h.data_file = Some(text()),
            EXT_BITMAPS => h.has_bitmaps_extension = true,
            EXT_FEATURE_TABLE | EXT_CRYPTO => {}
            _ => {}
        }
        off = data_end.div_ceil(8) * 8;
    }
    // Running into the end of the cluster without an end marker is what QEMU accepts too,
    // as long as the file is just short (small cluster sizes).
    Ok(())
}

fn parse_backing_name(
    path: &Path,
    buf: &[u8],
    file_len: u64,
    h: &mut Qcow2Header,
) -> Result<(), HeaderError> {
    let offset = be64(buf, 8);
    let size = be32(buf, 16);
    if offset == 0 {
        return Ok(());
    }
    if size > 1023 {
        return Err(HeaderError::field(
            path,
            "backing_file_size",
            size,
            "expected at most 1023 bytes",
        ));
    }
    if offset > h.cluster_size() {
        return Err(HeaderError::field(
            path,
            "backing_file_offset",
            offset,
            format!("must lie in the first cluster ({} bytes)", h.cluster_size()),
        ));
    }
    let end = offset + u64::from(size);
    if end > buf.len() as u64 {
        return Err(HeaderError::field(
            path,
            "backing_file_offset",
            offset,
            format!("name of {size} bytes ends past end of file ({file_len} bytes)"),
        ));
    }
    let name = &buf[offset as usize..end as usize];
    h.backing_file = Some(String::from_utf8_lossy(name).into_owned());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid version-3 header with 64 KiB clusters, 1 MiB virtual size.
    pub(crate) fn v3_header() -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[..4].copy_from_slice(&QCOW2_MAGIC);
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        b[36..40].copy_from_slice(&1u32.to_be_bytes());
        b[48..56].copy_from_slice(&0x10000u64.to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        b
    }

    fn parse(b: &[u8]) -> Result<Qcow2Header, HeaderError> {
        parse_header(Path::new("t.qcow2"), b, b.len() as u64)
    }

    #[test]
    fn an_l1_table_that_cannot_map_the_virtual_size_is_refused() {
        // Found by the qcow2_image fuzz target: 256 GiB behind a one-entry L1 table, which
        // QEMU refuses and kiln read as 256 GiB of zeros.
        let mut b = v3_header();
        b[24..32].copy_from_slice(&(256u64 << 30).to_be_bytes());
        let e = parse(&b).unwrap_err().to_string();
        assert!(e.contains("l1_size = 1: at least 512 entries"), "{e}");
        b[36..40].copy_from_slice(&512u32.to_be_bytes());
        assert!(parse(&b).is_ok());
        b[36..40].copy_from_slice(&(4u32 << 20 | 1).to_be_bytes());
        let e = parse(&b).unwrap_err().to_string();
        assert!(e.contains("l1_size = 4194305: at most 4194304"), "{e}");
    }

    #[test]
    fn valid_v3_header_parses() {
        let h = parse(&v3_header()).expect("valid header");
        assert_eq!(h.version, 3);
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.refcount_bits(), 16);
        assert_eq!(h.compat(), "1.1");
        assert_eq!(h.unsupported_feature(), None);
    }

    #[test]
    fn truncated_header_is_one_line_error() {
        let e = parse(&v3_header()[..50]).unwrap_err().to_string();
        assert_eq!(
            e,
            "t.qcow2: truncated: header needs 72 bytes at offset 0, file has 50"
        );
        assert!(parse(&v3_header()[..90])
            .unwrap_err()
            .to_string()
            .contains("version 3 header"));
    }

    #[test]
    fn bad_magic_names_the_bytes() {
        let mut b = v3_header();
        b[0] = b'X';
        let e = parse(&b).unwrap_err().to_string();
        assert!(
            e.starts_with("t.qcow2: qcow2 header field magic = [58, 46, 49, fb]"),
            "{e}"
        );
        assert!(!e.contains('\n'));
    }

    #[test]
    fn unknown_version_is_rejected() {
        let mut b = v3_header();
        b[4..8].copy_from_slice(&4u32.to_be_bytes());
        assert_eq!(
            parse(&b).unwrap_err().to_string(),
            "t.qcow2: qcow2 header field version = 4: expected 2 or 3"
        );
    }

    #[test]
    fn backing_offset_past_eof_is_rejected() {
        let mut b = v3_header();
        b[8..16].copy_from_slice(&500u64.to_be_bytes());
        b[16..20].copy_from_slice(&40u32.to_be_bytes());
        let e = parse(&b).unwrap_err().to_string();
        assert_eq!(
            e,
            "t.qcow2: qcow2 header field backing_file_offset = 500: name of 40 bytes ends past \
             end of file (512 bytes)"
        );
    }

    #[test]
    fn feature_bits_and_extensions_are_read() {
        let mut b = v3_header();
        let bits = incompat::EXTL2 | incompat::COMPRESSION | incompat::CORRUPT;
        b[72..80].copy_from_slice(&bits.to_be_bytes());
        b[80..88].copy_from_slice(&COMPAT_LAZY_REFCOUNTS.to_be_bytes());
        b[104] = 1;
        // Backing format extension "qcow2" at 112, then the end marker.
        b[112..116].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        b[116..120].copy_from_slice(&5u32.to_be_bytes());
        b[120..125].copy_from_slice(b"qcow2");
        b[8..16].copy_from_slice(&200u64.to_be_bytes());
        b[16..20].copy_from_slice(&4u32.to_be_bytes());
        b[200..204].copy_from_slice(b"base");
        let h = parse(&b).expect("valid");
        assert!(h.extended_l2() && h.corrupt() && h.lazy_refcounts());
        assert_eq!(h.compression, Compression::Zstd);
        assert_eq!(h.backing_file.as_deref(), Some("base"));
        assert_eq!(h.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(h.unsupported_feature(), None);
        assert!(h.needs_kiln_reader());
    }

    #[test]
    fn bad_field_values_are_named() {
        for (off, val, field) in [
            (20usize, 30u32, "cluster_bits"),
            (96, 7, "refcount_order"),
            (100, 100, "header_length"),
        ] {
            let mut b = v3_header();
            b[off..off + 4].copy_from_slice(&val.to_be_bytes());
            let e = parse(&b).unwrap_err().to_string();
            assert!(e.contains(&format!("field {field} = {val}")), "{e}");
        }
        let mut b = v3_header();
        b[72..80].copy_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(parse(&b)
            .unwrap_err()
            .to_string()
            .contains("unknown bits 0x10000000000"));
    }

    #[test]
    fn tables_qemu_refuses_to_open_are_refused() {
        // iotests 060 and 080: (offset, bytes, the field the error names).
        for (off, val, field) in [
            (56usize, vec![0u8; 4], "refcount_table_clusters = 0"),
            (56, vec![0xff; 4], "refcount_table_clusters = 4294967295"),
            (
                48,
                0x1234_5678_90ab_cdefu64.to_be_bytes().to_vec(),
                "refcount_table_offset",
            ),
            (60, vec![0xff; 4], "nb_snapshots = 4294967295"),
            (
                64,
                0xffff_ffff_ffff_0000u64.to_be_bytes().to_vec(),
                "snapshots_offset",
            ),
            (
                40,
                0x1234_5678_90ab_cdefu64.to_be_bytes().to_vec(),
                "l1_table_offset",
            ),
        ] {
            let mut b = v3_header();
            if field == "snapshots_offset" {
                b[60..64].copy_from_slice(&0xffffu32.to_be_bytes());
            }
            b[off..off + val.len()].copy_from_slice(&val);
            let e = parse(&b).unwrap_err().to_string();
            assert!(e.contains(&format!("field {field}")), "{e}");
        }
    }

    #[test]
    fn random_bytes_after_magic_never_panic() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        for round in 0..2000 {
            let len = 4 + (round % 300);
            let mut b = vec![0u8; len];
            for x in b.iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *x = seed as u8;
            }
            b[..4].copy_from_slice(&QCOW2_MAGIC);
            if round % 2 == 0 && len > 8 {
                b[4..8].copy_from_slice(&3u32.to_be_bytes());
            }
            let _ = parse(&b);
        }
    }
}
