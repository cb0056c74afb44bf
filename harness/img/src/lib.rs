//! `kiln img`: info, check, map, compare, create and convert answering like `qemu-img`, on kiln's
//! own disk layer (imago for data, mappings and new images; kiln-disk's own qcow2 reader for
//! extended-L2 and zstd images, which imago cannot read; kiln-disk's qcow2 header parser and
//! this crate's metadata walk for the rest). Existing images are only ever opened read-only; new ones appear complete or not
//! at all.

pub mod chain;
pub mod check;
pub mod compare;
pub mod convert;
pub mod create;
pub mod disk;
pub mod error;
pub mod info;
pub mod layout;
pub mod map;
pub mod opts;
pub mod qfmt;
pub mod status;

use std::fmt;

pub use convert::{convert, ConvertArgs};
pub use create::{create, CreateArgs};
pub use error::ImgError;

/// A qemu-img output profile: the shapes one family of versions prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Profile {
    /// qemu-img 7.2 (Debian bookworm): no protocol child node, no `compressed` in map.
    V7_2,
    /// qemu-img 10.0 (bookworm-backports): `Child node '/file'` / `children`, map `compressed`.
    #[default]
    V10_0,
}

impl Profile {
    /// Every profile kiln knows, oldest first.
    pub const ALL: [Profile; 2] = [Profile::V7_2, Profile::V10_0];

    /// The newest profile (the fallback for unknown versions).
    pub fn newest() -> Profile {
        Profile::V10_0
    }

    /// 8.0+ prints the protocol node ("Child node '/file'", JSON `children`).
    pub fn has_child_nodes(self) -> bool {
        self >= Profile::V10_0
    }

    /// 8.2+ prints `"compressed"` in map JSON and reports it in block status.
    pub fn map_has_compressed(self) -> bool {
        self >= Profile::V10_0
    }

    /// The profile of a qemu-img major.minor version, or `None` when kiln has none for it
    /// (output shapes change between minor releases, so 7.1 or 10.1 are not assumed to match).
    pub fn for_version(major: u32, minor: u32) -> Option<Profile> {
        match (major, minor) {
            (7, 2) => Some(Profile::V7_2),
            (10, 0) => Some(Profile::V10_0),
            _ => None,
        }
    }

    /// What `qemu-img create -f qcow2 t.qcow2 128M` prints: the same in both profiles (7.2:
    /// QEMU's tests/qemu-iotests/082.out at v7.2.0; 10.0: the installed 10.0.2). The option order
    /// has been stable since 5.2 added `extended_l2`.
    pub fn create_qcow2_line(self) -> &'static str {
        match self {
            Profile::V7_2 | Profile::V10_0 => {
                "Formatting 't.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off \
                 compression_type=zlib size=134217728 lazy_refcounts=off refcount_bits=16"
            }
        }
    }

    /// Parses "7.2" / "10.0".
    pub fn parse(s: &str) -> Option<Profile> {
        match s {
            "7.2" => Some(Profile::V7_2),
            "10.0" => Some(Profile::V10_0),
            _ => None,
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Profile::V7_2 => "7.2",
            Profile::V10_0 => "10.0",
        })
    }
}

/// What a `kiln img` command printed and its exit status (qemu-img's codes).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
    pub code: i32,
}

impl Output {
    fn ok(stdout: String) -> Self {
        Output {
            stdout,
            stderr: String::new(),
            code: status::OK,
        }
    }
    /// `kiln: error: ` before each line of `e` (qemu-img prefixes each of its lines too).
    fn err(e: &ImgError, code: i32) -> Self {
        Output {
            stdout: String::new(),
            stderr: e
                .to_string()
                .lines()
                .map(|l| format!("kiln: error: {l}\n"))
                .collect(),
            code,
        }
    }
}

/// `info`: `json` for `--output=json`, `chain` for `--backing-chain`.
pub fn info(file: &str, json: bool, chain: bool, profile: Profile) -> Output {
    let layers = if chain {
        chain::resolve_chain(file)
    } else {
        chain::open_layer(file, None).map(|l| vec![l])
    };
    match layers {
        Ok(layers) if json => Output::ok(info::render_json(&layers, chain, profile)),
        Ok(layers) => Output::ok(info::render_human(&layers, chain, profile)),
        Err(e) => Output::err(&e, status::FAILED),
    }
}

/// `check`: exit 0 clean, 2 corruptions, 3 leaks, 1 failure, 63 format without checks.
pub fn check(file: &str, json: bool) -> Output {
    let layers = match chain::resolve_chain(file) {
        Ok(l) => l,
        Err(e) => return Output::err(&e, status::CHECK_FAILED),
    };
    if info::is_raw(&layers[0]) {
        return Output {
            stdout: String::new(),
            stderr: "kiln: This image format does not support checks\n".into(),
            code: status::CHECK_UNSUPPORTED,
        };
    }
    let report =
        layout::Qcow2File::open(layers[0].path()).and_then(|q| check::check_qcow2(&q, file));
    match report {
        Ok(r) => Output {
            stdout: if json {
                format!("{}\n", qfmt::to_qemu_json(&r.json()))
            } else {
                r.human()
            },
            stderr: r.messages.iter().map(|m| format!("{m}\n")).collect(),
            code: r.exit_code(),
        },
        Err(e) => Output::err(&e, status::CHECK_FAILED),
    }
}

fn open_disk(file: &str) -> Result<disk::Disk, ImgError> {
    disk::Disk::open(chain::resolve_chain(file)?)
}

/// `map`: JSON or the human table.
pub fn map(file: &str, json: bool, profile: Profile) -> Output {
    let result = open_disk(file).and_then(|d| {
        let runs = map::extents(&d)?;
        Ok(if json {
            (map::render_json(&runs, profile), None)
        } else {
            map::render_human(&d, &runs)
        })
    });
    match result {
        Ok((s, None)) => Output::ok(s),
        Ok((s, Some(e))) => Output {
            stdout: s,
            ..Output::err(&e, status::FAILED)
        },
        Err(e) => Output::err(&e, status::FAILED),
    }
}

/// `compare [-s] A B`: 0 identical, 1 different, 2 error.
pub fn compare(a: &str, b: &str, strict: bool, profile: Profile) -> Output {
    let (da, db) = match open_disk(a).and_then(|da| Ok((da, open_disk(b)?))) {
        Ok(disks) => disks,
        Err(e) => return Output::err(&e, status::COMPARE_ERROR),
    };
    // Like qemu-img, an error after both images opened (a read, a block status) is status 3.
    match compare::compare(&da, &db, strict, profile) {
        Ok(o) => Output {
            stdout: o.text,
            stderr: String::new(),
            code: o.code,
        },
        Err(e) => Output::err(&e, status::COMPARE_READ_ERROR),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random bytes after a valid qcow2 magic (and sometimes a plausible version and cluster
    /// size) must give answers or one-line errors from every command, never a panic.
    #[test]
    fn corrupt_images_never_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..300 {
            let len = 112 + (next() % 4096) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            b[..4].copy_from_slice(&kiln_disk::qcow2::QCOW2_MAGIC);
            if round % 2 == 0 {
                b[4..8].copy_from_slice(&3u32.to_be_bytes());
                b[20..24].copy_from_slice(&(9 + (next() % 4) as u32).to_be_bytes());
                b[96..100].copy_from_slice(&4u32.to_be_bytes());
                b[100..104].copy_from_slice(&104u32.to_be_bytes());
                b[72..80].fill(0);
                b[8..16].fill(0);
                b[24..32].copy_from_slice(&(1u64 << 16).to_be_bytes());
            }
            let p = dir.path().join(format!("f{round}.qcow2"));
            std::fs::write(&p, &b).expect("write");
            let name = p.display().to_string();
            for out in [
                info(&name, true, true, Profile::V10_0),
                check(&name, false),
                map(&name, true, Profile::V10_0),
                compare(&name, &name, true, Profile::V10_0),
            ] {
                assert!(
                    !out.stderr.trim_end().contains('\n') || out.code == 2 || out.code == 3,
                    "multi-line error: {}",
                    out.stderr
                );
            }
        }
    }
}
