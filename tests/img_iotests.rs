//! QEMU's own test images as a peer corpus for `kiln img`: the sample images of
//! tests/qemu-iotests/sample_images and the qcow2 corruptions that iotests 060 and 080 make on
//! purpose (`poke_file`), replayed here on images qemu-img creates. For every image, `kiln img`
//! `info`, `check`, `map --output json` and `compare` (the image against itself) run next to
//! the same `qemu-img` commands and must give the same exit code, print the same stdout where
//! both succeed, never crash or hang, and leave the image's bytes unchanged.
//!
//! Tolerance: when a command fails, only the exit code is compared (error wording differs; kiln
//! names file, field and value its own way). kiln reads every file that is not qcow2 as raw, so
//! the sample images of other formats (vmdk, vhd, vhdx, parallels, ...) are compared against
//! `qemu-img -f raw`.
//!
//! The corpus comes from Debian's `qemu` source package through `.ci/qemu-iotests` (or the
//! directory in `KILN_QEMU_IOTESTS`); without it, or without qemu-img, the test skips locally and
//! fails on CI.

#[macro_use]
mod common;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long one command may run before it counts as a hang.
const HANG: Duration = Duration::from_secs(30);

/// Decompressed sample images larger than this are left out (the vhd/vhdx ones are 30-270 MB
/// of zeros; they exercise nothing in a raw reader that the small ones do not).
const SAMPLE_MAX: u64 = 8 << 20;

// Offsets in a fresh 64 MiB qcow2 image (64 KiB clusters) after one write at offset 0, as
// iotest 060 assumes them: refcount table, first refcount block, L1 table, first L2 table.
const RT: u64 = 0x10000;
const RB: u64 = 0x20000;
const L1: u64 = 0x30000;
const L2: u64 = 0x40000;

// Header fields (iotest 080's offsets).
const BACKING_FILE_OFFSET: u64 = 8;
const BACKING_FILE_SIZE: u64 = 16;
const L1_SIZE: u64 = 36;
const L1_TABLE_OFFSET: u64 = 40;
const REFCOUNT_TABLE_OFFSET: u64 = 48;
const REFCOUNT_TABLE_CLUSTERS: u64 = 56;
const NB_SNAPSHOTS: u64 = 60;
const SNAPSHOTS_OFFSET: u64 = 64;
const INCOMPATIBLE_FEATURES: u64 = 72;
const HEADER_SIZE: u64 = 100;
const EXT_MAGIC: u64 = 112;

/// One reproduced corruption: which iotest it comes from, what it is, and the pokes to make on
/// a fresh 64 MiB image (after a 512-byte write at 0 when `written`, and an internal snapshot
/// when `snapshot`).
struct Case {
    iotest: &'static str,
    name: &'static str,
    written: bool,
    snapshot: bool,
    pokes: &'static [(u64, &'static [u8])],
}

const fn case(
    iotest: &'static str,
    name: &'static str,
    written: bool,
    pokes: &'static [(u64, &'static [u8])],
) -> Case {
    Case {
        iotest,
        name,
        written,
        snapshot: false,
        pokes,
    }
}

const CASES: &[Case] = &[
    case(
        "080",
        "header_size 0xffffffff",
        false,
        &[(HEADER_SIZE, &[0xff; 4])],
    ),
    case(
        "080",
        "header_size 0x7fffffff",
        false,
        &[(HEADER_SIZE, &[0x7f, 0xff, 0xff, 0xff])],
    ),
    case(
        "080",
        "header extension size 0x7fffffff",
        false,
        &[
            (EXT_MAGIC, &[0x12, 0x34, 0x56, 0x78]),
            (EXT_MAGIC + 4, &[0x7f, 0xff, 0xff, 0xff]),
        ],
    ),
    case(
        "080",
        "refcount_table_clusters 0xffffffff",
        false,
        &[(REFCOUNT_TABLE_CLUSTERS, &[0xff; 4])],
    ),
    case(
        "080",
        "refcount_table_clusters 0x00020001",
        false,
        &[(REFCOUNT_TABLE_CLUSTERS, &[0, 2, 0, 1])],
    ),
    case(
        "080",
        "refcount_table_offset unaligned",
        false,
        &[(
            REFCOUNT_TABLE_OFFSET,
            &[0x12, 0x34, 0x56, 0x78, 0x90, 0xab, 0xcd, 0xef],
        )],
    ),
    case(
        "080",
        "refcount table past the end of the file",
        false,
        &[
            (
                REFCOUNT_TABLE_OFFSET,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0],
            ),
            (REFCOUNT_TABLE_CLUSTERS, &[0, 0, 0, 0x7f]),
        ],
    ),
    case(
        "080",
        "nb_snapshots 0xffffffff",
        false,
        &[(NB_SNAPSHOTS, &[0xff; 4])],
    ),
    case(
        "080",
        "snapshot table past the end of the file",
        false,
        &[
            (
                SNAPSHOTS_OFFSET,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0],
            ),
            (NB_SNAPSHOTS, &[0, 0, 0xff, 0xff]),
        ],
    ),
    case(
        "080",
        "snapshots_offset unaligned, nb_snapshots 0",
        false,
        &[(
            SNAPSHOTS_OFFSET,
            &[0x12, 0x34, 0x56, 0x78, 0x90, 0xab, 0xcd, 0xef],
        )],
    ),
    case("080", "l1_size 0xffffffff", false, &[(L1_SIZE, &[0xff; 4])]),
    case(
        "080",
        "l1_size 0x7fffffff",
        false,
        &[(L1_SIZE, &[0x7f, 0xff, 0xff, 0xff])],
    ),
    case(
        "080",
        "L1 table past the end of the file",
        false,
        &[
            (L1_TABLE_OFFSET, &[0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0]),
            (L1_SIZE, &[0, 0, 0xff, 0xff]),
        ],
    ),
    case(
        "080",
        "l1_table_offset unaligned",
        false,
        &[
            (
                L1_TABLE_OFFSET,
                &[0x12, 0x34, 0x56, 0x78, 0x90, 0xab, 0xcd, 0xef],
            ),
            (L1_SIZE, &[0, 0, 0, 1]),
        ],
    ),
    case(
        "080",
        "l1_size 0 (too small for the disk)",
        false,
        &[(L1_SIZE, &[0; 4])],
    ),
    Case {
        iotest: "080",
        name: "l1_size 0 with an internal snapshot",
        written: false,
        snapshot: true,
        pokes: &[(L1_SIZE, &[0; 4])],
    },
    case(
        "080",
        "backing_file_size 0xffffffff",
        false,
        &[
            (BACKING_FILE_OFFSET, &[0, 0, 0, 0, 0, 0, 0x10, 0]),
            (BACKING_FILE_SIZE, &[0xff; 4]),
        ],
    ),
    case(
        "080",
        "L2 entry with a huge host offset",
        true,
        &[(L2, &[0xbf, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0])],
    ),
    case(
        "080",
        "L2 entry past the end of the file",
        true,
        &[(L2, &[0x80, 0, 0, 0xff, 0xff, 0xff, 0, 0])],
    ),
    case(
        "060",
        "L1 entry pointing at the L1 table",
        true,
        &[(L1, &[0x80, 0, 0, 0, 0, 0x03, 0, 0])],
    ),
    case(
        "060",
        "data cluster inside the refcount block",
        true,
        &[(L2, &[0x80, 0, 0, 0, 0, 0x02, 0, 0]), (RB + 8, &[0, 1])],
    ),
    case(
        "060",
        "L1 entry unaligned",
        true,
        &[(L1, &[0x80, 0, 0, 0, 0, 0x04, 0x2a, 0])],
    ),
    case(
        "060",
        "L2 entry unaligned",
        true,
        &[(L2, &[0x80, 0, 0, 0, 0, 0x05, 0x2a, 0])],
    ),
    case(
        "060",
        "preallocated zero cluster unaligned",
        true,
        &[(L2, &[0x80, 0, 0, 0, 0, 0x05, 0x2a, 0x01])],
    ),
    case(
        "060",
        "refcount table entry unaligned",
        false,
        &[(RT, &[0, 0, 0, 0, 0, 0x02, 0x2a, 0])],
    ),
    case("060", "refcount table entry zero", true, &[(RT, &[0; 8])]),
    case("060", "refcount block entries zero", true, &[(RB, &[0; 8])]),
    case(
        "060",
        "refcount_table_clusters 0",
        false,
        &[(REFCOUNT_TABLE_CLUSTERS, &[0; 4])],
    ),
    case(
        "060",
        "refcount_table_offset 0",
        false,
        &[(REFCOUNT_TABLE_OFFSET, &[0; 8])],
    ),
    case(
        "060",
        "refcount table entry huge and unaligned",
        true,
        &[(RT, &[0, 0, 0, 0, 0xff, 0xff, 0x2a, 0])],
    ),
    case(
        "060",
        "refcount block past the end of the file",
        true,
        &[(RT + 8, &[0, 0xff, 0xff, 0xff, 0, 0, 0, 0])],
    ),
    case(
        "060",
        "incompatible feature: corrupt bit set",
        true,
        &[(INCOMPATIBLE_FEATURES + 7, &[0x02])],
    ),
    case(
        "060",
        "refcount of a data cluster 2",
        true,
        &[(RB + 10, &[0, 2])],
    ),
    case(
        "060",
        "refcount of a free cluster 1 (leak)",
        true,
        &[(RB + 12, &[0, 1])],
    ),
];

/// Disagreements kept on purpose, each with why: (case, command, reason). Printed, not failed.
const TOLERATED: &[(&str, &str, &str)] = &[
    (
        "L2 entry with a huge host offset",
        "map",
        "QEMU ignores an L2 entry's reserved bits when it reads; kiln refuses the entry",
    ),
    (
        "L2 entry with a huge host offset",
        "compare",
        "QEMU ignores an L2 entry's reserved bits when it reads; kiln refuses the entry",
    ),
    (
        "L1 entry unaligned",
        "compare",
        "imago checks L1 entries at open (status 2); QEMU only when it reads (status 3)",
    ),
    (
        "refcount_table_clusters 0",
        "check",
        "qemu-img check opens an image without a refcount table (BDRV_O_CHECK) and counts \
         errors (2); kiln's header parser refuses it, as QEMU's other opens do (1)",
    ),
];

/// The iotests directory: `KILN_QEMU_IOTESTS`, else what `.ci/qemu-iotests` prints.
fn iotests_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("KILN_QEMU_IOTESTS") {
        let dir = PathBuf::from(dir);
        if dir.join("sample_images").is_dir() {
            return Ok(dir);
        }
        return common::ci_requires(format!(
            "KILN_QEMU_IOTESTS={} has no sample_images/ (run .ci/qemu-iotests)",
            dir.display()
        ));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/qemu-iotests");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if out.status.success() && dir.join("sample_images").is_dir() {
        Ok(dir)
    } else {
        common::ci_requires(format!(
            "{} could not fetch QEMU's iotests ({})",
            script.display(),
            out.status
        ))
    }
}

fn qemu_img_present() -> Result<(), String> {
    match Command::new("qemu-img").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => common::ci_requires("qemu-img is not installed (apt-get install qemu-utils)".into()),
    }
}

/// Exit code (or `None` when killed by a signal), stdout and stderr of `cmd`, killed and
/// reported as a hang after [`HANG`].
fn run(mut cmd: Command) -> (Option<i32>, String, String) {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.read_to_end(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > HANG {
            let _ = child.kill();
            let _ = child.wait();
            panic!("hang: {what} ran longer than {HANG:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = |v: Vec<u8>| String::from_utf8_lossy(&v).into_owned();
    (
        status.code(),
        text(out.join().expect("stdout reader")),
        text(err.join().expect("stderr reader")),
    )
}

fn qemu_ok(program: &str, args: &[&str]) {
    let mut c = Command::new(program);
    c.args(args);
    let (code, out, err) = run(c);
    assert_eq!(code, Some(0), "{program} {args:?}: {out}{err}");
}

/// Writes `bytes` at `offset` of `path` (iotests' `poke_file`).
fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open image to poke");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.write_all(bytes).expect("poke");
}

/// The result of one command pair on one image.
struct Outcome {
    agree: bool,
    line: String,
}

/// Runs `kiln img <args> image` and `qemu-img <args> [raw] image` and compares them; panics
/// on a crash, a hang or a changed image.
fn compare_one(kiln: &Path, image: &Path, args: &[&str], force_raw: bool) -> Outcome {
    let img = image.to_str().expect("utf-8 path");
    let compare = args[0] == "compare";
    let mut q = Command::new("qemu-img");
    q.args(args);
    if force_raw {
        q.args(["-f", "raw"]);
        if compare {
            q.args(["-F", "raw"]);
        }
    }
    q.arg(img);
    if compare {
        q.arg(img);
    }
    let (qcode, qout, _) = run(q);

    let before = fs::read(image).expect("read image");
    let mut k = Command::new(kiln);
    k.arg("img").args(args).arg(img);
    if compare {
        k.arg(img);
    }
    let (kcode, kout, kerr) = run(k);
    let after = fs::read(image).expect("read image");
    let label = format!("{} {}", args.join(" "), image.display());
    let broken = if before != after {
        Some("changed the image's bytes".to_string())
    } else if kerr.contains("panicked") {
        Some(format!(
            "panicked: {}",
            kerr.lines().take(3).collect::<Vec<_>>().join(" | ")
        ))
    } else {
        match kcode {
            None => Some(format!("was killed by a signal: {kerr}")),
            Some(c) if !(0..=3).contains(&c) && c != 63 => Some(format!("exit {c}: {kerr}")),
            _ => None,
        }
    };
    if let Some(why) = broken {
        return Outcome {
            agree: false,
            line: format!("kiln img {label} {why}"),
        };
    }
    let kcode = kcode.unwrap_or(-1);
    let same_code = Some(kcode) == qcode;
    let same_text = kcode != 0 || kout == qout;
    let line = format!(
        "{label}: qemu-img {qcode:?}, kiln {kcode}{}",
        if same_code && !same_text {
            " (stdout differs)"
        } else {
            ""
        }
    );
    let detail = if same_code && same_text {
        String::new()
    } else {
        format!(
            "\n  qemu-img: {}\n  kiln: {}{}",
            qout.trim(),
            kout.trim(),
            kerr.trim()
        )
    };
    Outcome {
        agree: same_code && same_text,
        line: line + &detail,
    }
}

const COMMANDS: &[&[&str]] = &[
    &["info"],
    &["check"],
    &["map", "--output", "json"],
    &["compare"],
];

/// Runs every command pair on `image`; returns (agreeing pairs, disagreement lines).
fn compare_all(kiln: &Path, image: &Path, force_raw: bool) -> (usize, Vec<String>) {
    let mut agree = 0;
    let mut bad = Vec::new();
    for args in COMMANDS {
        let o = compare_one(kiln, image, args, force_raw);
        if o.agree {
            agree += 1;
        } else {
            bad.push(o.line);
        }
    }
    (agree, bad)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-iotests-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// The sample images (decompressed, at most [`SAMPLE_MAX`] bytes) and whether qemu-img must be
/// told `-f raw` (kiln reads every file that is not qcow2 as raw).
fn samples(iotests: &Path, dir: &Path) -> Vec<(PathBuf, bool)> {
    let mut out = Vec::new();
    let mut names: Vec<_> = fs::read_dir(iotests.join("sample_images"))
        .expect("list sample_images")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "bz2"))
        .collect();
    names.sort();
    for bz2 in names {
        let image = dir.join(bz2.file_stem().expect("name"));
        let (code, _, err) = run({
            let mut c = Command::new("sh");
            c.args(["-c", "bzip2 -dc \"$1\" | head -c \"$2\" >\"$3\"", "sh"])
                .arg(&bz2)
                .arg((SAMPLE_MAX + 1).to_string())
                .arg(&image);
            c
        });
        assert_eq!(code, Some(0), "bzip2 -dc {}: {err}", bz2.display());
        if fs::metadata(&image).expect("decompressed").len() > SAMPLE_MAX {
            let _ = fs::remove_file(&image);
            continue;
        }
        let (_, info, _) = run({
            let mut c = Command::new("qemu-img");
            c.args(["info", "--output", "json"]).arg(&image);
            c
        });
        let probed_ours =
            info.contains("\"format\": \"qcow2\"") || info.contains("\"format\": \"raw\"");
        out.push((image, !probed_ours));
    }
    out
}

#[test]
fn kiln_img_agrees_with_qemu_img_on_qemu_iotests_images() {
    or_skip!(qemu_img_present());
    let iotests = or_skip!(iotests_dir());
    let kiln = PathBuf::from(env!("CARGO_BIN_EXE_kiln"));
    let dir = scratch("corpus");
    let mut agree = 0;
    let mut total = 0;
    let mut bad = Vec::new();
    let mut tolerated = 0;

    let samples = samples(&iotests, &dir);
    assert!(
        !samples.is_empty(),
        "no sample images in {}",
        iotests.display()
    );
    for (image, force_raw) in &samples {
        let (a, b) = compare_all(&kiln, image, *force_raw);
        println!(
            "sample {}{}: {a}/{} agree",
            image.file_name().unwrap_or_default().to_string_lossy(),
            if *force_raw { " (as raw)" } else { "" },
            COMMANDS.len()
        );
        agree += a;
        total += COMMANDS.len();
        bad.extend(b);
    }

    for (i, c) in CASES.iter().enumerate() {
        let image = dir.join(format!("case{i:02}.qcow2"));
        let img = image.to_str().expect("utf-8 path");
        qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", img, "64M"]);
        if c.written {
            qemu_ok(
                "qemu-io",
                &["-f", "qcow2", "-c", "write -P 0x2a 0 512", img],
            );
        }
        if c.snapshot {
            qemu_ok("qemu-img", &["snapshot", "-c", "foo", img]);
        }
        for (offset, bytes) in c.pokes {
            poke(&image, *offset, bytes);
        }
        let (a, b) = compare_all(&kiln, &image, false);
        println!(
            "iotest {} case{i:02} {}: {a}/{} agree",
            c.iotest,
            c.name,
            COMMANDS.len()
        );
        agree += a;
        total += COMMANDS.len();
        for line in b {
            match TOLERATED
                .iter()
                .find(|(case, cmd, _)| *case == c.name && line.starts_with(cmd))
            {
                Some((_, _, why)) => {
                    tolerated += 1;
                    println!("tolerated: [{}] {line}\n  why: {why}", c.name);
                }
                None => bad.push(format!("[{}] {line}", c.name)),
            }
        }
    }
    println!(
        "{} sample images, {} corruption cases: {agree}/{total} command pairs agree, \
         {tolerated} tolerated",
        samples.len(),
        CASES.len()
    );
    let _ = fs::remove_dir_all(&dir);
    assert!(
        bad.is_empty(),
        "kiln img disagrees with qemu-img:\n{}",
        bad.join("\n")
    );
}
