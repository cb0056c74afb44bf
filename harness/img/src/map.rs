//! `kiln img map`: qemu-img map's runs (JSON and the human "Offset Length Mapped to File" table).

use std::fmt::Write as _;

use super::disk::{Disk, Extent};
use super::error::ImgError;
use super::Profile;

/// The image's block-status runs from 0 to its size, merged with qemu-img's rule.
pub fn extents(disk: &Disk) -> Result<Vec<Extent>, ImgError> {
    let size = disk.size();
    let mut out: Vec<Extent> = Vec::new();
    let mut offset = 0;
    while offset < size {
        let e = disk.status_at(offset, size - offset)?;
        offset += e.length;
        match out.last_mut() {
            Some(last) if last.mergeable(&e) => last.length += e.length,
            _ => out.push(e),
        }
    }
    Ok(out)
}

/// `qemu-img map --output=json` (the `compressed` key exists from 8.2 on).
pub fn render_json(runs: &[Extent], profile: Profile) -> String {
    let mut s = String::from("[");
    for (i, e) in runs.iter().enumerate() {
        if i > 0 {
            s.push_str(",\n");
        }
        let _ = write!(
            s,
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \
             \"data\": {}",
            e.start, e.length, e.depth, e.present, e.zero, e.data
        );
        if profile.map_has_compressed() {
            let _ = write!(s, ", \"compressed\": {}", e.compressed);
        }
        if let Some(o) = e.offset {
            let _ = write!(s, ", \"offset\": {o}");
        }
        s.push('}');
    }
    s.push_str("]\n");
    s
}

fn hex16(v: u64) -> String {
    let h = if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    };
    format!("{h:<16}")
}

/// `qemu-img map` text: only data runs, with qemu-img's extra coalescing of non-data runs.
/// Like qemu-img, the lines before a compressed run are printed, then the error.
pub fn render_human(disk: &Disk, runs: &[Extent]) -> (String, Option<ImgError>) {
    let mut s = String::new();
    let err = render_human_into(&mut s, disk, runs).err();
    (s, err)
}

fn render_human_into(s: &mut String, disk: &Disk, runs: &[Extent]) -> Result<(), ImgError> {
    s.push_str(&format!(
        "{:<16}{:<16}{:<16}{}\n",
        "Offset", "Length", "Mapped to", "File"
    ));
    let mut cur: Option<Extent> = None;
    for e in runs {
        let mut next = e.clone();
        if let Some(c) = &mut cur {
            if c.mergeable(&next) {
                c.length += next.length;
                continue;
            }
            emit(s, disk, c)?;
            if !next.data || next.zero {
                next.data = false;
                next.zero = true;
            }
        }
        cur = Some(next);
    }
    if let Some(c) = &cur {
        emit(s, disk, c)?;
    }
    Ok(())
}

fn emit(s: &mut String, disk: &Disk, e: &Extent) -> Result<(), ImgError> {
    if e.data && e.offset.is_none() {
        return Err(ImgError::Usage(
            "File contains external, encrypted or compressed clusters.".into(),
        ));
    }
    if e.data && !e.zero {
        let file = disk.layers.get(e.depth).map_or("", |l| l.name.as_str());
        let _ = writeln!(
            s,
            "{}{}{}{}",
            hex16(e.start),
            hex16(e.length),
            hex16(e.offset.unwrap_or(0)),
            file
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(start: u64, length: u64, zero: bool, data: bool, offset: Option<u64>) -> Extent {
        Extent {
            start,
            length,
            depth: 0,
            present: true,
            zero,
            data,
            compressed: false,
            offset,
        }
    }

    #[test]
    fn json_golden_per_profile() {
        let runs = vec![
            ext(0, 65536, false, true, Some(327680)),
            Extent {
                present: false,
                depth: 1,
                ..ext(65536, 983040, true, false, None)
            },
        ];
        // qemu-img 10.0.2 output for the same image.
        assert_eq!(
            render_json(&runs, Profile::V10_0),
            "[{ \"start\": 0, \"length\": 65536, \"depth\": 0, \"present\": true, \"zero\": false, \
             \"data\": true, \"compressed\": false, \"offset\": 327680},\n{ \"start\": 65536, \
             \"length\": 983040, \"depth\": 1, \"present\": false, \"zero\": true, \"data\": false, \
             \"compressed\": false}]\n"
        );
        // 7.2 (qemu-img.c at v7.2.0): no "compressed" key, which came with 8.2.
        assert_eq!(
            render_json(&runs, Profile::V7_2),
            "[{ \"start\": 0, \"length\": 65536, \"depth\": 0, \"present\": true, \"zero\": false, \
             \"data\": true, \"offset\": 327680},\n{ \"start\": 65536, \"length\": 983040, \
             \"depth\": 1, \"present\": false, \"zero\": true, \"data\": false}]\n"
        );
    }

    #[test]
    fn merge_needs_contiguous_offsets() {
        let a = ext(0, 4096, false, true, Some(8192));
        assert!(a.mergeable(&ext(4096, 4096, false, true, Some(12288))));
        assert!(!a.mergeable(&ext(4096, 4096, false, true, Some(65536))));
        assert!(!a.mergeable(&ext(4096, 4096, true, true, Some(12288))));
    }

    #[test]
    fn hex_columns() {
        assert_eq!(hex16(0), "0               ");
        assert_eq!(hex16(0x10000), "0x10000         ");
    }
}
