//! `kiln img compare [-s] A B`: qemu-img compare's verdicts and messages (0 identical,
//! 1 different, 2 error), reading guest data through imago.

use super::disk::{Disk, Extent};
use super::error::ImgError;
use super::status;
use super::Profile;

/// qemu-img's I/O chunk for compare.
const CHUNK: u64 = 2 << 20;
const SECTOR: u64 = 512;

/// The result: the text qemu-img prints and its exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompareOutcome {
    pub text: String,
    pub code: i32,
}

fn differ(text: String) -> CompareOutcome {
    CompareOutcome {
        text,
        code: status::DIFFERENT,
    }
}

/// Index of the first 512-byte sector of `a` (relative) that differs from `b` (or from zero).
fn first_diff_sector(a: &[u8], b: Option<&[u8]>) -> Option<u64> {
    let mut i = 0usize;
    while i < a.len() {
        let end = (i + SECTOR as usize).min(a.len());
        let same = match b {
            Some(b) => a[i..end] == b[i..end],
            None => a[i..end].iter().all(|&x| x == 0),
        };
        if !same {
            return Some(i as u64);
        }
        i = end;
    }
    None
}

/// Compares `a` and `b` like `qemu-img compare` (`strict` = `-s`).
pub fn compare(
    a: &Disk,
    b: &Disk,
    strict: bool,
    profile: Profile,
) -> Result<CompareOutcome, ImgError> {
    let (s1, s2) = (a.size(), b.size());
    if strict && s1 != s2 {
        return Ok(differ("Strict mode: Image size mismatch!\n".into()));
    }
    if strict {
        if let Some(off) = first_status_mismatch(a, b, profile)? {
            return Ok(differ(format!(
                "Strict mode: Offset {off} block status mismatch!\n"
            )));
        }
    }
    let common = s1.min(s2);
    let mut off = 0;
    let mut buf1 = vec![0u8; CHUNK as usize];
    let mut buf2 = vec![0u8; CHUNK as usize];
    while off < common {
        // What reads as zeros on both sides is not read (qemu-img skips it by block status too):
        // a sparse terabyte compares in metadata time, not in terabytes of reads.
        let zeros = zero_run(a, off, common).and_then(|z| {
            Ok(if z == 0 {
                0
            } else {
                z.min(zero_run(b, off, common)?)
            })
        })?;
        if zeros > 0 {
            off += zeros;
            continue;
        }
        let n = (common - off).min(CHUNK) as usize;
        a.read(&mut buf1[..n], off)?;
        b.read(&mut buf2[..n], off)?;
        if let Some(d) = first_diff_sector(&buf1[..n], Some(&buf2[..n])) {
            return Ok(differ(format!("Content mismatch at offset {}!\n", off + d)));
        }
        off += n as u64;
    }
    let mut text = String::new();
    if s1 != s2 {
        text.push_str("Warning: Image size mismatch!\n");
        let over = if s1 > s2 { a } else { b };
        let total = s1.max(s2);
        while off < total {
            let zeros = zero_run(over, off, total)?;
            if zeros > 0 {
                off += zeros;
                continue;
            }
            let n = (total - off).min(CHUNK) as usize;
            over.read(&mut buf1[..n], off)?;
            if let Some(d) = first_diff_sector(&buf1[..n], None) {
                text.push_str(&format!("Content mismatch at offset {}!\n", off + d));
                return Ok(differ(text));
            }
            off += n as u64;
        }
    }
    text.push_str("Images are identical.\n");
    Ok(CompareOutcome {
        text,
        code: status::OK,
    })
}

/// How many bytes from `off` (up to `end`) read as zeros by block status; 0 if data is there.
fn zero_run(disk: &Disk, off: u64, end: u64) -> Result<u64, ImgError> {
    let e = disk.status_at(off, end - off)?;
    let run = e.length.min(end - off);
    Ok(if e.zero && e.start == off { run } else { 0 })
}

/// The block-status flags `compare -s` compares (ALLOCATED, DATA, ZERO, OFFSET_VALID, EOF, and
/// COMPRESSED where the profile's QEMU has it).
fn flags(e: &Extent, size: u64, profile: Profile) -> (bool, bool, bool, bool, bool, bool) {
    (
        e.present,
        e.data,
        e.zero,
        e.offset.is_some(),
        e.start + e.length >= size,
        e.compressed && profile.map_has_compressed(),
    )
}

fn first_status_mismatch(a: &Disk, b: &Disk, profile: Profile) -> Result<Option<u64>, ImgError> {
    let size = a.size();
    let mut off = 0;
    while off < size {
        let e1 = a.status_at(off, size - off)?;
        let e2 = b.status_at(off, size - off)?;
        let e1 = Extent {
            length: e1.length.min(size - off),
            ..e1
        };
        let e2 = Extent {
            length: e2.length.min(size - off),
            ..e2
        };
        if flags(&e1, size, profile) != flags(&e2, size, profile) {
            return Ok(Some(off));
        }
        off += e1.length.min(e2.length).max(1);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_terabytes_compare_by_block_status_not_by_reading() {
        // Found by the qcow2_image fuzz target: compare read every zero byte, so two empty
        // 4 TiB images took hours (without the skip this test does not finish).
        let dir = tempfile::tempdir().expect("tempdir");
        let make = |name: &str, size: &str| {
            let file = dir.path().join(name).to_str().expect("utf-8").to_owned();
            let args = crate::CreateArgs {
                fmt: "qcow2".into(),
                file: file.clone(),
                size: Some(size.into()),
                quiet: true,
                ..crate::CreateArgs::default()
            };
            assert_eq!(crate::create(&args).code, 0);
            file
        };
        let (a, b) = (make("a.qcow2", "4T"), make("b.qcow2", "5T"));
        let out = crate::compare(&a, &b, false, Profile::newest());
        assert_eq!(
            (out.code, out.stdout.as_str()),
            (0, "Warning: Image size mismatch!\nImages are identical.\n")
        );
    }

    #[test]
    fn sector_granular_mismatch() {
        let a = vec![0u8; 2048];
        let mut b = a.clone();
        b[1000] = 1;
        assert_eq!(first_diff_sector(&a, Some(&b)), Some(512));
        assert_eq!(first_diff_sector(&a, Some(&a)), None);
        assert_eq!(first_diff_sector(&b, None), Some(512));
        assert_eq!(first_diff_sector(&a[..700], None), None);
    }
}
