//! `--generate N --seed S`: a reproducible corpus built with `qemu-img create` and `qemu-io`
//! (write -P, write -z, discard, write -c), plus a few deliberately damaged images and, in the
//! last slots, fixed images every corpus holds (see `FIXED`).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// SplitMix64: tiny, seedable, and the same sequence everywhere (no crate needed for this).
pub struct Prng(u64);

impl Prng {
    pub fn new(seed: u64) -> Self {
        Prng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// One generated image to diff, and what it was meant to exercise.
#[derive(Debug, Clone)]
pub struct CorpusImage {
    pub path: PathBuf,
    pub recipe: String,
    /// The commands that made it (and its backing files), in order, as shell lines.
    pub commands: Vec<String>,
}

/// Why the corpus could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The corpus directory could not be created.
    #[error("{}: {source}", dir.display())]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A tool could not be started.
    #[error("{command}: {source}")]
    Spawn {
        /// The command line, as `Command`'s Debug shows it.
        command: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A tool failed.
    #[error("{command}: {status}: {stderr}")]
    Failed {
        /// The command line, as `Command`'s Debug shows it.
        command: String,
        /// Its status.
        status: std::process::ExitStatus,
        /// What it wrote to stderr, trimmed.
        stderr: String,
    },
    /// qemu-io could not be started.
    #[error("qemu-io: {0}")]
    QemuIo(#[source] std::io::Error),
    /// An image being damaged could not be read or written.
    #[error("{path:?}: {source}")]
    Image {
        /// The image.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The image being damaged could not be resized.
    #[error(transparent)]
    Resize(std::io::Error),
}

/// `cmd` as a shell line (arguments with spaces or quotes in single quotes).
fn shell_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| {
            let a = a.to_string_lossy();
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "'\"$\\".contains(c)) {
                format!("'{}'", a.replace('\'', "'\\''"))
            } else {
                a.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn run(cmd: &mut Command, log: &mut Vec<String>) -> Result<(), GenerateError> {
    log.push(shell_line(cmd));
    let out = cmd.output().map_err(|source| GenerateError::Spawn {
        command: format!("{cmd:?}"),
        source,
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(GenerateError::Failed {
            command: format!("{cmd:?}"),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

struct Qcow2Opts {
    compat: &'static str,
    cluster: u64,
    refcount_bits: u32,
    extended_l2: bool,
    zstd: bool,
    lazy: bool,
}

fn random_opts(rng: &mut Prng) -> Qcow2Opts {
    let compat = *rng.pick(&["0.10", "1.1", "1.1"]);
    let v3 = compat == "1.1";
    let extended_l2 = v3 && rng.below(6) == 0;
    let min_bits = if extended_l2 { 14 } else { 9 };
    let cluster = 1u64 << (min_bits + rng.below(22 - min_bits));
    Qcow2Opts {
        compat,
        cluster,
        refcount_bits: if v3 { 1 << rng.below(7) } else { 16 },
        extended_l2,
        zstd: v3 && rng.below(8) == 0,
        lazy: v3 && rng.below(4) == 0,
    }
}

fn create_qcow2(
    path: &Path,
    size: u64,
    o: &Qcow2Opts,
    backing: Option<(&Path, &str)>,
    log: &mut Vec<String>,
) -> Result<(), GenerateError> {
    let mut opts = format!(
        "compat={},cluster_size={},refcount_bits={}",
        o.compat, o.cluster, o.refcount_bits
    );
    if o.extended_l2 {
        opts.push_str(",extended_l2=on");
    }
    if o.zstd {
        opts.push_str(",compression_type=zstd");
    }
    if o.lazy {
        opts.push_str(",lazy_refcounts=on");
    }
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2", "-o", &opts]);
    if let Some((b, fmt)) = backing {
        let name = b.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        cmd.arg("-b").arg(name).args(["-F", fmt]);
    }
    cmd.arg(path).arg(size.to_string());
    run(&mut cmd, log)
}

/// Random qemu-io commands for an image of `size` bytes with `cluster`-sized clusters.
fn random_writes(rng: &mut Prng, size: u64, cluster: u64, qcow2: bool) -> Vec<String> {
    let mut cmds = Vec::new();
    let n = 1 + rng.below(8);
    for _ in 0..n {
        let unit = 512u64;
        let off = rng.below(size / unit) * unit;
        let max = (size - off).min(256 << 10);
        let len = (1 + rng.below(max / unit)) * unit;
        let kind = rng.below(if qcow2 { 5 } else { 3 });
        cmds.push(match kind {
            0 | 3 => format!("write -P {} {off} {len}", rng.below(256)),
            1 => format!("write -z {off} {len}"),
            2 => format!("discard {off} {len}"),
            _ => {
                let c = rng.below(size / cluster) * cluster;
                let l = cluster.min(size - c);
                format!("write -c -P {} {c} {l}", 1 + rng.below(255))
            }
        });
    }
    cmds
}

fn qemu_io(
    path: &Path,
    fmt: &str,
    cmds: &[String],
    log: &mut Vec<String>,
) -> Result<(), GenerateError> {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", fmt]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(path);
    log.push(shell_line(&cmd));
    // A command qemu-io refuses (e.g. a compressed write on a format or cluster layout that
    // cannot take it) just leaves that write out of the image; its exit status is not an error
    // for the corpus, only failing to run qemu-io at all is.
    cmd.output().map_err(GenerateError::QemuIo)?;
    Ok(())
}

fn image_err(path: &Path) -> impl FnOnce(std::io::Error) -> GenerateError + '_ {
    move |source| GenerateError::Image {
        path: path.to_path_buf(),
        source,
    }
}

fn be_u64_at(path: &Path, off: u64) -> Result<u64, GenerateError> {
    let f = std::fs::File::open(path).map_err(image_err(path))?;
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, off).map_err(image_err(path))?;
    Ok(u64::from_be_bytes(b))
}

fn patch(path: &Path, off: u64, bytes: &[u8], log: &mut Vec<String>) -> Result<(), GenerateError> {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    log.push(format!(
        "(write bytes {hex} at offset {off} of {})",
        path.display()
    ));
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(image_err(path))?;
    f.write_all_at(bytes, off).map_err(image_err(path))
}

/// Damages a fresh qcow2 (64 KiB clusters, 16-bit refcounts) in one of a few classic ways.
fn damage(path: &Path, how: u64, log: &mut Vec<String>) -> Result<&'static str, GenerateError> {
    let l1_off = be_u64_at(path, 40)?;
    let rt_off = be_u64_at(path, 48)?;
    let rb_off = be_u64_at(path, rt_off)? & !0x1ff;
    Ok(match how {
        0 => {
            // Leak: claim a refcount for a cluster nothing references (cluster 9).
            patch(path, rb_off + 9 * 2, &[0, 1], log)?;
            let len = std::fs::metadata(path)
                .map_err(GenerateError::Resize)?
                .len();
            let f = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(GenerateError::Resize)?;
            f.set_len(len.max(10 << 16))
                .map_err(GenerateError::Resize)?;
            log.push(format!(
                "(grow {} to {} bytes)",
                path.display(),
                len.max(10 << 16)
            ));
            "leaked cluster"
        }
        1 => {
            // Refcount of the L1 table's cluster dropped to 0 (data would overlap it).
            patch(path, rb_off + (l1_off >> 16) * 2, &[0, 0], log)?;
            "refcount overlap (L1 cluster refcount 0)"
        }
        2 => {
            // L1 entry pointing past the end of the file.
            patch(path, l1_off, &(0x8000_0000_0100_0000u64).to_be_bytes(), log)?;
            "L1 entry past EOF"
        }
        _ => {
            patch(path, 0, b"XFI\xfb", log)?;
            "bad magic"
        }
    })
}

/// Images every corpus holds, whatever the seed (the last `FIXED.len()` slots).
#[derive(Debug, Clone, Copy)]
enum Fixed {
    /// 1 MiB clusters, some written only in part: QEMU's COW fills the rest of a fresh cluster
    /// with write-zeroes, which leaves holes in the file under allocated clusters. qemu-img
    /// still reports each as whole data (it asks the file only for metadata-preallocated
    /// images), which kiln once did not (issue 14).
    CowHoles,
    /// `preallocation=metadata` with a few writes: here QEMU does ask the file, and its holes
    /// read as zero data.
    MetadataPrealloc,
}

const FIXED: [Fixed; 2] = [Fixed::MetadataPrealloc, Fixed::CowHoles];

fn fixed_image(dir: &Path, i: usize, which: Fixed) -> Result<CorpusImage, GenerateError> {
    let mut log = Vec::new();
    let p = dir.join(format!("img{i:03}.qcow2"));
    let (opts, size, writes, recipe) = match which {
        Fixed::CowHoles => (
            "compat=1.1,cluster_size=1048576",
            4u64 << 20,
            // Whole, a 4 KiB piece, a 200 KiB piece, whole: two clusters with COW holes.
            vec![
                "write -P 0x11 0 1048576",
                "write -P 0x22 1114112 4096",
                "write -P 0x33 2199552 204800",
                "write -P 0x44 3145728 1048576",
            ],
            "fixed: qcow2 cluster=1M, partial writes into fresh clusters (COW holes)",
        ),
        Fixed::MetadataPrealloc => (
            "compat=1.1,cluster_size=65536,preallocation=metadata",
            (1u64 << 20) + (512 << 10),
            vec!["write -P 0x55 100000 70000", "write -z 655360 131072"],
            "fixed: qcow2 preallocation=metadata",
        ),
    };
    run(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", opts])
            .arg(&p)
            .arg(size.to_string()),
        &mut log,
    )?;
    let cmds: Vec<String> = writes.iter().map(|w| w.to_string()).collect();
    qemu_io(&p, "qcow2", &cmds, &mut log)?;
    Ok(CorpusImage {
        path: p,
        recipe: recipe.into(),
        commands: log,
    })
}

/// Builds `n` images from `seed` in `dir`. The same (n, seed) gives the same recipes. The last
/// slots hold the fixed images (`FIXED`) whatever the seed.
pub fn generate(dir: &Path, n: usize, seed: u64) -> Result<Vec<CorpusImage>, GenerateError> {
    std::fs::create_dir_all(dir).map_err(|source| GenerateError::Dir {
        dir: dir.to_path_buf(),
        source,
    })?;
    let mut rng = Prng::new(seed);
    let mut out = Vec::new();
    for i in 0..n {
        // The last slots always hold the fixed images (drawn from no random numbers, so the
        // slots before them are what the same seed always gave).
        if let Some(fixed) = (i + FIXED.len()).checked_sub(n) {
            out.push(fixed_image(dir, i, FIXED[fixed])?);
            continue;
        }
        let size = (1u64 << 20) + rng.below(8) * (512 << 10) + rng.below(4) * 512;
        let kind = rng.below(20);
        let name = |suffix: &str| dir.join(format!("img{i:03}{suffix}"));
        let mut log = Vec::new();
        let image = match kind {
            0..=2 => {
                let p = name(".raw");
                run(
                    Command::new("qemu-img")
                        .args(["create", "-q", "-f", "raw"])
                        .arg(&p)
                        .arg(size.to_string()),
                    &mut log,
                )?;
                qemu_io(
                    &p,
                    "raw",
                    &random_writes(&mut rng, size, 65536, false),
                    &mut log,
                )?;
                CorpusImage {
                    path: p,
                    recipe: "raw".into(),
                    commands: log,
                }
            }
            3..=5 => {
                // A backing chain 1-3 deep over a raw or qcow2 base.
                let depth = 1 + rng.below(3);
                let raw_base = rng.below(2) == 0;
                let mut below = if raw_base {
                    name("-b0.raw")
                } else {
                    name("-b0.qcow2")
                };
                let mut fmt = if raw_base { "raw" } else { "qcow2" };
                if raw_base {
                    run(
                        Command::new("qemu-img")
                            .args(["create", "-q", "-f", "raw"])
                            .arg(&below)
                            .arg(size.to_string()),
                        &mut log,
                    )?;
                    qemu_io(
                        &below,
                        "raw",
                        &random_writes(&mut rng, size, 65536, false),
                        &mut log,
                    )?;
                } else {
                    let o = random_opts(&mut rng);
                    create_qcow2(&below, size, &o, None, &mut log)?;
                    qemu_io(
                        &below,
                        "qcow2",
                        &random_writes(&mut rng, size, o.cluster, true),
                        &mut log,
                    )?;
                }
                for d in 1..=depth {
                    let p = name(&format!("-b{d}.qcow2"));
                    let o = random_opts(&mut rng);
                    let top_size = size + rng.below(3) * (256 << 10);
                    create_qcow2(&p, top_size, &o, Some((&below, fmt)), &mut log)?;
                    qemu_io(
                        &p,
                        "qcow2",
                        &random_writes(&mut rng, top_size, o.cluster, true),
                        &mut log,
                    )?;
                    below = p;
                    fmt = "qcow2";
                }
                CorpusImage {
                    path: below,
                    recipe: format!(
                        "chain depth {depth} over {} base",
                        if raw_base { "raw" } else { "qcow2" }
                    ),
                    commands: log,
                }
            }
            6 => {
                let p = name(".qcow2");
                create_qcow2(
                    &p,
                    size,
                    &Qcow2Opts {
                        compat: "1.1",
                        cluster: 65536,
                        refcount_bits: 16,
                        extended_l2: false,
                        zstd: false,
                        lazy: false,
                    },
                    None,
                    &mut log,
                )?;
                qemu_io(
                    &p,
                    "qcow2",
                    &random_writes(&mut rng, size, 65536, true),
                    &mut log,
                )?;
                let what = damage(&p, rng.below(4), &mut log)?;
                CorpusImage {
                    path: p,
                    recipe: format!("damaged: {what}"),
                    commands: log,
                }
            }
            _ => {
                let p = name(".qcow2");
                let o = random_opts(&mut rng);
                create_qcow2(&p, size, &o, None, &mut log)?;
                qemu_io(
                    &p,
                    "qcow2",
                    &random_writes(&mut rng, size, o.cluster, true),
                    &mut log,
                )?;
                CorpusImage {
                    path: p,
                    recipe: format!(
                        "qcow2 compat={} cluster={} refcount_bits={}{}{}{}",
                        o.compat,
                        o.cluster,
                        o.refcount_bits,
                        if o.extended_l2 { " extended_l2" } else { "" },
                        if o.zstd { " zstd" } else { "" },
                        if o.lazy { " lazy_refcounts" } else { "" }
                    ),
                    commands: log,
                }
            }
        };
        out.push(image);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prng_is_reproducible() {
        let a: Vec<u64> = {
            let mut r = Prng::new(7);
            (0..4).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = Prng::new(7);
            (0..4).map(|_| r.next_u64()).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, {
            let mut r = Prng::new(8);
            (0..4).map(|_| r.next_u64()).collect::<Vec<_>>()
        });
    }
}
