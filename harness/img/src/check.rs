//! `kiln img check`: a real qcow2 consistency check, walking L1/L2, snapshots and the refcount
//! structures, counting references per host cluster and comparing them with the stored
//! refcounts — the same counts, messages and exit codes as `qemu-img check` (no repair: images
//! are only ever opened read-only).

use std::fmt::Write as _;

use serde_json::{json, Map, Value};

use super::error::ImgError;
use super::layout::{
    ClusterType, Qcow2File, ENTRY_OFFSET_MASK, L1E_RESERVED_MASK, OFLAG_COMPRESSED, OFLAG_COPIED,
    REFT_OFFSET_MASK, REFT_RESERVED_MASK,
};
use super::status;

/// Subcluster bitmap halves of an extended L2 entry.
const BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;

/// The outcome of a check, in qemu-img's terms.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CheckReport {
    pub filename: String,
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
    pub image_end_offset: u64,
    /// Per-problem lines qemu-img writes to stderr.
    pub messages: Vec<String>,
}

impl CheckReport {
    /// qemu-img check's exit status: 0 clean, 1 check failed, 2 corruptions, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            status::CHECK_FAILED
        } else if self.corruptions > 0 {
            status::CHECK_CORRUPT
        } else if self.leaks > 0 {
            status::CHECK_LEAKS
        } else {
            status::OK
        }
    }

    /// The human summary qemu-img prints on stdout.
    pub fn human(&self) -> String {
        let mut s = String::new();
        if self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0 {
            s.push_str("No errors were found on the image.\n");
        } else {
            if self.corruptions > 0 {
                let _ = write!(
                    s,
                    "\n{} errors were found on the image.\nData may be corrupted, or further \
                     writes to the image may corrupt it.\n",
                    self.corruptions
                );
            }
            if self.leaks > 0 {
                let _ = write!(
                    s,
                    "\n{} leaked clusters were found on the image.\nThis means waste of disk \
                     space, but no harm to data.\n",
                    self.leaks
                );
            }
            if self.check_errors > 0 {
                let _ = write!(
                    s,
                    "\n{} internal errors have occurred during the check.\n",
                    self.check_errors
                );
            }
        }
        if self.total_clusters != 0 && self.allocated_clusters != 0 {
            let a = self.allocated_clusters as f64;
            let _ = writeln!(
                s,
                "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
                self.allocated_clusters,
                self.total_clusters,
                a * 100.0 / self.total_clusters as f64,
                self.fragmented_clusters as f64 * 100.0 / a,
                self.compressed_clusters as f64 * 100.0 / a
            );
        }
        if self.image_end_offset != 0 {
            let _ = writeln!(s, "Image end offset: {}", self.image_end_offset);
        }
        s
    }

    /// The JSON object qemu-img prints (`ImageCheck`; zero counters are omitted).
    pub fn json(&self) -> Value {
        let mut m = Map::new();
        m.insert("filename".into(), json!(self.filename));
        m.insert("format".into(), json!("qcow2"));
        m.insert("check-errors".into(), json!(self.check_errors));
        for (k, v) in [
            ("corruptions", self.corruptions),
            ("leaks", self.leaks),
            ("image-end-offset", self.image_end_offset),
            ("total-clusters", self.total_clusters),
            ("allocated-clusters", self.allocated_clusters),
            ("fragmented-clusters", self.fragmented_clusters),
            ("compressed-clusters", self.compressed_clusters),
        ] {
            if v != 0 {
                m.insert(k.into(), json!(v));
            }
        }
        Value::Object(m)
    }
}

/// Reference counts computed from the metadata, grown on demand like QEMU's array.
struct Counter<'a> {
    q: &'a Qcow2File,
    refs: Vec<u64>,
    max: u64,
    report: CheckReport,
}

impl Counter<'_> {
    fn inc(&mut self, offset: u64, size: u64) {
        if size == 0 {
            return;
        }
        // The last cluster may be partly past the end of the file; a whole cluster or more is
        // a corruption that QEMU (6.2+) reports instead of counting.
        let end = offset.saturating_add(size);
        if end >= self.q.file_len && end - self.q.file_len >= self.q.header.cluster_size() {
            self.report.messages.push(format!(
                "ERROR: counting reference for region exceeding the end of the file by one \
                 cluster or more: offset 0x{offset:x} size 0x{size:x}"
            ));
            self.report.corruptions += 1;
            return;
        }
        let bits = self.q.header.cluster_bits;
        let first = offset >> bits;
        let last = (offset.saturating_add(size - 1)) >> bits;
        for k in first..=last {
            // Offsets far past the end of the file would need a huge array; QEMU fails the
            // allocation there too and counts a check error.
            if k >= (1 << 28) {
                self.report.check_errors += 1;
                self.report.messages.push(format!(
                    "ERROR: cluster {k} is too far past the end of the image"
                ));
                return;
            }
            let k = k as usize;
            if k >= self.refs.len() {
                self.refs.resize(k + 1, 0);
            }
            if self.refs[k] == self.max {
                self.report.messages.push(format!(
                    "ERROR: overflow cluster offset=0x{:x}",
                    (k as u64) << bits
                ));
                self.report.corruptions += 1;
                continue;
            }
            self.refs[k] += 1;
        }
    }

    fn l1(&mut self, l1_offset: u64, l1_size: u64, active: bool) -> Result<(), ImgError> {
        if l1_size == 0 {
            return Ok(());
        }
        self.inc(l1_offset, l1_size * 8);
        let l1 = self.q.l1_table_at(l1_offset, l1_size)?;
        for entry in l1 {
            let l2_offset = entry & ENTRY_OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            if entry & L1E_RESERVED_MASK != 0 {
                self.report.messages.push(format!(
                    "ERROR found L1 entry with reserved bits set: {entry:x}"
                ));
                self.report.corruptions += 1;
            }
            self.inc(l2_offset, self.q.header.cluster_size());
            if l2_offset & (self.q.header.cluster_size() - 1) != 0 {
                self.report.messages.push(format!(
                    "ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
                self.report.corruptions += 1;
            }
            self.l2(l2_offset, active)?;
        }
        Ok(())
    }

    fn l2(&mut self, l2_offset: u64, active: bool) -> Result<(), ImgError> {
        let words = self.q.l2_table(l2_offset)?;
        let ext = self.q.header.extended_l2();
        let step = if ext { 2 } else { 1 };
        let cs = self.q.header.cluster_size();
        let mut next_contiguous = 0u64;
        for i in (0..words.len()).step_by(step) {
            let entry = words[i];
            let bitmap = if ext {
                words.get(i + 1).copied().unwrap_or(0)
            } else {
                0
            };
            match self.q.cluster_type(entry) {
                ClusterType::Compressed { offset, len } => {
                    if entry & OFLAG_COPIED != 0 {
                        self.report.messages.push(format!(
                            "ERROR: coffset=0x{offset:x}: copied flag must never be set for \
                             compressed clusters"
                        ));
                        self.report.corruptions += 1;
                    }
                    if ext && bitmap != 0 {
                        self.report.messages.push(format!(
                            "ERROR compressed cluster {} with non-zero subcluster allocation \
                             bitmap, entry=0x{entry:x}",
                            i / step
                        ));
                        self.report.corruptions += 1;
                    }
                    if active {
                        self.report.allocated_clusters += 1;
                        self.report.compressed_clusters += 1;
                        self.report.fragmented_clusters += 1;
                    }
                    self.inc(offset, len);
                }
                ClusterType::Normal(host) | ClusterType::ZeroAlloc(host) => {
                    if ext && (bitmap & (bitmap >> 32) & BITMAP_ALL_ALLOC) != 0 {
                        self.report.messages.push(format!(
                            "ERROR invalid subcluster allocation bitmap in cluster entry \
                             0x{entry:x}, bitmap 0x{bitmap:x}"
                        ));
                        self.report.corruptions += 1;
                    }
                    if host & (cs - 1) != 0 {
                        self.report.messages.push(format!(
                            "ERROR offset={host:x}: Cluster is not properly aligned; L2 entry \
                             corrupted."
                        ));
                        self.report.corruptions += 1;
                    }
                    if active {
                        self.report.allocated_clusters += 1;
                        if next_contiguous != 0 && host != next_contiguous {
                            self.report.fragmented_clusters += 1;
                        }
                        next_contiguous = host + cs;
                    }
                    self.inc(host, cs);
                }
                ClusterType::ZeroPlain | ClusterType::Unallocated => {
                    if ext && bitmap & BITMAP_ALL_ALLOC != 0 {
                        self.report.messages.push(format!(
                            "ERROR unallocated cluster with allocated subclusters, \
                             entry=0x{entry:x}"
                        ));
                        self.report.corruptions += 1;
                    }
                }
            }
        }
        Ok(())
    }

    /// Counts the refcount blocks themselves and checks each is referenced exactly once.
    fn refblocks(&mut self, table: &[u64], nb_clusters: u64) {
        let cs = self.q.header.cluster_size();
        for (i, &e) in table.iter().enumerate() {
            let offset = e & REFT_OFFSET_MASK;
            if e & REFT_RESERVED_MASK != 0 {
                self.report.messages.push(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                self.report.corruptions += 1;
                continue;
            }
            if offset & (cs - 1) != 0 {
                self.report.messages.push(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry \
                     corrupted"
                ));
                self.report.corruptions += 1;
                continue;
            }
            if offset >> self.q.header.cluster_bits >= nb_clusters {
                self.report
                    .messages
                    .push(format!("ERROR refcount block {i} is outside image"));
                self.report.corruptions += 1;
                continue;
            }
            if offset != 0 {
                self.inc(offset, cs);
                let k = (offset >> self.q.header.cluster_bits) as usize;
                let r = self.refs.get(k).copied().unwrap_or(0);
                if r != 1 {
                    self.report
                        .messages
                        .push(format!("ERROR refcount block {i} refcount={r}"));
                    self.report.corruptions += 1;
                }
            }
        }
    }
}

/// Checks the qcow2 image `q` and returns qemu-img's verdict.
pub fn check_qcow2(q: &Qcow2File, display_name: &str) -> Result<CheckReport, ImgError> {
    let h = &q.header;
    if h.has_bitmaps_extension {
        return Err(ImgError::Unsupported {
            path: q.path.clone(),
            feature: "persistent bitmaps".into(),
        });
    }
    if h.encrypted() {
        return Err(ImgError::Unsupported {
            path: q.path.clone(),
            feature: "encryption".into(),
        });
    }
    if h.data_file.is_some() {
        return Err(ImgError::Unsupported {
            path: q.path.clone(),
            feature: "external data file".into(),
        });
    }
    let cs = h.cluster_size();
    let nb_clusters = q.file_len.div_ceil(cs);
    let max = if h.refcount_bits() == 64 {
        u64::MAX
    } else {
        (1u64 << h.refcount_bits()) - 1
    };
    let mut c = Counter {
        q,
        refs: vec![0; nb_clusters as usize],
        max,
        report: CheckReport {
            filename: display_name.to_string(),
            total_clusters: h.size.div_ceil(cs),
            ..CheckReport::default()
        },
    };
    c.inc(0, cs);
    c.l1(h.l1_table_offset, u64::from(h.l1_size), true)?;
    let (snapshots, snap_table_len) = q.snapshots()?;
    for (l1_off, l1_size, id) in snapshots {
        if l1_off & (cs - 1) != 0 {
            c.report.messages.push(format!(
                "ERROR snapshot {id} l1_offset={l1_off:#x}: L1 table is not cluster aligned; \
                 snapshot table entry corrupted"
            ));
            c.report.corruptions += 1;
            continue;
        }
        c.l1(l1_off, l1_size, false)?;
    }
    c.inc(h.snapshots_offset, snap_table_len);
    let table = q.refcount_table()?;
    c.inc(h.refcount_table_offset, table.len() as u64 * 8);
    c.refblocks(&table, nb_clusters);
    let stored = stored_refcounts(q, &table, nb_clusters)?;
    compare_refcounts(&mut c, &stored);
    check_copied_flags(&mut c, &table, &stored)?;
    Ok(c.report)
}

/// The stored refcount of every cluster below `nb_clusters`, each refcount block read once;
/// `None` where the refcount block's offset is not cluster-aligned, which QEMU cannot read
/// either ("Can't get refcount for cluster": a check error, not a corruption; iotest 060).
fn stored_refcounts(
    q: &Qcow2File,
    table: &[u64],
    nb_clusters: u64,
) -> Result<Vec<Option<u64>>, ImgError> {
    let per_block = q.refcounts_per_block();
    let mut out = Vec::with_capacity(nb_clusters as usize);
    let mut bi = 0u64;
    while (out.len() as u64) < nb_clusters {
        let e = table.get(bi as usize).copied().unwrap_or(0);
        let off = e & REFT_OFFSET_MASK;
        let used = off != 0 && e & REFT_RESERVED_MASK == 0;
        let want = (nb_clusters - out.len() as u64).min(per_block) as usize;
        // QEMU tests alignment before anything else, so an unaligned offset past the end of
        // the file is unreadable too.
        if used && off & (q.header.cluster_size() - 1) != 0 {
            out.extend(std::iter::repeat_n(None, want));
        } else if used && off < q.file_len {
            let block = q.refcount_block(off)?;
            out.extend(
                block
                    .into_iter()
                    .map(Some)
                    .chain(std::iter::repeat(Some(0)))
                    .take(want),
            );
        } else {
            out.extend(std::iter::repeat_n(Some(0), want));
        }
        bi += 1;
    }
    Ok(out)
}

fn compare_refcounts(c: &mut Counter<'_>, stored: &[Option<u64>]) {
    let mut highest = None;
    for (k, &on_disk) in stored.iter().enumerate() {
        let Some(on_disk) = on_disk else {
            c.report.messages.push(format!(
                "Can't get refcount for cluster {k}: Input/output error"
            ));
            c.report.check_errors += 1;
            continue;
        };
        let computed = c.refs.get(k).copied().unwrap_or(0);
        if on_disk > 0 || computed > 0 {
            highest = Some(k as u64);
        }
        if on_disk != computed {
            let kind = if on_disk < computed {
                c.report.corruptions += 1;
                "ERROR"
            } else {
                c.report.leaks += 1;
                "Leaked"
            };
            c.report.messages.push(format!(
                "{kind} cluster {k} refcount={on_disk} reference={computed}"
            ));
        }
    }
    c.report.image_end_offset = highest.map_or(0, |h| (h + 1) * c.q.header.cluster_size());
}

/// The stored refcount of the cluster at host `offset` (past the file end: looked up directly);
/// `None` where it cannot be read (see [`stored_refcounts`]).
fn refcount_of(
    q: &Qcow2File,
    table: &[u64],
    stored: &[Option<u64>],
    offset: u64,
) -> Result<Option<u64>, ImgError> {
    let k = offset >> q.header.cluster_bits;
    if let Some(&r) = stored.get(k as usize) {
        return Ok(r);
    }
    let per_block = q.refcounts_per_block();
    let Some(&e) = table.get((k / per_block) as usize) else {
        return Ok(Some(0));
    };
    let off = e & REFT_OFFSET_MASK;
    if off == 0 || e & REFT_RESERVED_MASK != 0 {
        return Ok(Some(0));
    }
    if off & (q.header.cluster_size() - 1) != 0 {
        return Ok(None);
    }
    if off >= q.file_len {
        return Ok(Some(0));
    }
    let block = q.refcount_block(off)?;
    Ok(Some(
        block.get((k % per_block) as usize).copied().unwrap_or(0),
    ))
}

/// QCOW_OFLAG_COPIED must be set exactly when the refcount is one (active tables only).
/// A refcount that cannot be read is skipped without a message, as QEMU's check_oflag_copied does.
fn check_copied_flags(
    c: &mut Counter<'_>,
    table: &[u64],
    stored: &[Option<u64>],
) -> Result<(), ImgError> {
    let q = c.q;
    let l1 = q.l1_table()?;
    for (i, &l1e) in l1.iter().enumerate() {
        let l2_off = l1e & ENTRY_OFFSET_MASK;
        if l2_off == 0 {
            continue;
        }
        let r = refcount_of(q, table, stored, l2_off)?;
        if let Some(r) = r.filter(|&r| (r == 1) != (l1e & OFLAG_COPIED != 0)) {
            c.report.messages.push(format!(
                "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={r}"
            ));
            c.report.corruptions += 1;
        }
        if l2_off & (q.header.cluster_size() - 1) != 0 {
            continue;
        }
        let words = q.l2_table(l2_off)?;
        let step = if q.header.extended_l2() { 2 } else { 1 };
        for &e in words.iter().step_by(step) {
            if e & OFLAG_COMPRESSED != 0 {
                continue;
            }
            let host = match q.cluster_type(e) {
                ClusterType::Normal(h) | ClusterType::ZeroAlloc(h) => h,
                _ => continue,
            };
            let r = refcount_of(q, table, stored, host)?;
            if let Some(r) = r.filter(|&r| (r == 1) != (e & OFLAG_COPIED != 0)) {
                c.report.messages.push(format!(
                    "ERROR OFLAG_COPIED data cluster: l2_entry={e:x} refcount={r}"
                ));
                c.report.corruptions += 1;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_qemu() {
        let mut r = CheckReport::default();
        assert_eq!(r.exit_code(), 0);
        r.leaks = 1;
        assert_eq!(r.exit_code(), 3);
        r.corruptions = 1;
        assert_eq!(r.exit_code(), 2);
        r.check_errors = 1;
        assert_eq!(r.exit_code(), 1);
    }

    #[test]
    fn human_summary_matches_qemu_layout() {
        let r = CheckReport {
            filename: "b.qcow2".into(),
            total_clusters: 256,
            allocated_clusters: 3,
            fragmented_clusters: 1,
            compressed_clusters: 1,
            image_end_offset: 32768,
            ..CheckReport::default()
        };
        assert_eq!(
            r.human(),
            "No errors were found on the image.\n3/256 = 1.17% allocated, 33.33% fragmented, \
             33.33% compressed clusters\nImage end offset: 32768\n"
        );
        let j = super::super::qfmt::to_qemu_json(&r.json());
        assert_eq!(
            j,
            "{\n    \"image-end-offset\": 32768,\n    \"compressed-clusters\": 1,\n    \
             \"total-clusters\": 256,\n    \"check-errors\": 0,\n    \"allocated-clusters\": 3,\n    \
             \"filename\": \"b.qcow2\",\n    \"format\": \"qcow2\",\n    \"fragmented-clusters\": 1\n}"
        );
    }

    #[test]
    fn leak_summary_text() {
        let r = CheckReport {
            leaks: 2,
            ..CheckReport::default()
        };
        assert_eq!(
            r.human(),
            "\n2 leaked clusters were found on the image.\nThis means waste of disk space, but no \
             harm to data.\n"
        );
    }
}
