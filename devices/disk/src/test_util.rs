//! Helpers the backend and format tests share: qemu-img as an independent reference (tests
//! skip, saying why, where it is not installed), patterned images, and one exercise routine.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::{DiskBackend, DiskError};

pub const MIB: u64 = 1024 * 1024;
pub const BASE_SIZE: u64 = 4 * MIB;

/// Runs qemu-img; `None` when it is not installed (the caller then skips, saying why).
pub fn qemu_img(args: &[&str]) -> Option<(bool, String)> {
    let out = Command::new("qemu-img").args(args).output().ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success(), text))
}

pub fn have_qemu_img() -> bool {
    let found = qemu_img(&["--version"]).is_some_and(|(ok, _)| ok);
    let on_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    assert!(
        found || !on_ci,
        "CI is set and qemu-img is not found; .ci/install-deps installs qemu-utils"
    );
    if !found {
        println!("skipped: qemu-img not found (apt-get install qemu-utils)");
    }
    found
}

pub fn sha256(path: &Path) -> Vec<u8> {
    Sha256::digest(fs::read(path).unwrap()).to_vec()
}

/// Non-zero everywhere, so zeroed ranges stand out; varies per sector.
pub fn pattern(len: u64) -> Vec<u8> {
    (0..len).map(|i| ((i / 512 + i) % 255 + 1) as u8).collect()
}

/// The same writes, zeroes and discards applied to `disk` and to `model`, with offsets
/// that straddle and split 64 KiB clusters; then every byte read back is checked.
pub fn exercise(disk: &mut dyn DiskBackend, model: &mut [u8]) {
    let mut write = |disk: &mut dyn DiskBackend, offset: u64, len: usize, byte: u8| {
        let buf = vec![byte; len];
        disk.write_at(&buf, offset).unwrap();
        model[offset as usize..offset as usize + len].copy_from_slice(&buf);
    };
    write(disk, 0, 4096, 0x11);
    write(disk, 64 * 1024 - 256, 512, 0x22);
    write(disk, MIB + 1234, 100 * 1024, 0x33);
    write(disk, BASE_SIZE - 512, 512, 0x44);
    let zero = |disk: &mut dyn DiskBackend, model: &mut [u8], off: u64, len: u64, how| {
        match how {
            0 => disk.write_zeroes(off, len, false).unwrap(),
            1 => disk.write_zeroes(off, len, true).unwrap(),
            _ => disk.discard(off, len).unwrap(),
        }
        model[off as usize..(off + len) as usize].fill(0);
    };
    zero(disk, model, 2 * MIB, 64 * 1024, 0);
    zero(disk, model, 3 * MIB - 4096, 8192, 1);
    zero(disk, model, 3 * MIB + 64 * 1024, 128 * 1024, 2);
    zero(disk, model, 512, 1024, 2);
    disk.flush().unwrap();

    let mut back = vec![0u8; model.len()];
    disk.read_at(&mut back, 0).unwrap();
    assert!(back == model, "read-back differs from the model");
}

/// qemu-img check is clean and the image reads exactly like `expected`.
pub fn assert_qemu_agrees(image: &Path, expected: &[u8], dir: &Path) {
    let image = image.to_str().unwrap();
    let (ok, out) = qemu_img(&["check", "-f", "qcow2", image]).unwrap();
    assert!(
        ok && out.contains("No errors were found"),
        "qemu-img check: {out}"
    );
    let want = dir.join("expected.raw");
    fs::write(&want, expected).unwrap();
    let want = want.to_str().unwrap();
    let (ok, out) = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", image, want]).unwrap();
    assert!(
        ok && out.contains("Images are identical"),
        "qemu-img compare: {out}"
    );
}

pub fn raw_base(dir: &Path) -> (PathBuf, Vec<u8>) {
    let base = dir.join("base.raw");
    let data = pattern(BASE_SIZE);
    fs::write(&base, &data).unwrap();
    (base, data)
}

/// A qcow2 base converted by qemu-img from a pattern with a hole (unallocated clusters).
pub fn qcow2_base(dir: &Path) -> (PathBuf, Vec<u8>) {
    let mut data = pattern(BASE_SIZE);
    data[(MIB as usize)..(2 * MIB as usize)].fill(0);
    let src = dir.join("src.raw");
    fs::write(&src, &data).unwrap();
    let base = dir.join("base.qcow2");
    let (ok, out) = qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        src.to_str().unwrap(),
        base.to_str().unwrap(),
    ])
    .unwrap();
    assert!(ok, "qemu-img convert: {out}");
    (base, data)
}

/// One line in both forms, the library's (`disk spec …`, `disk image …`) and the one a command
/// line reports against `--disk`, each naming `value` and saying `needle`.
pub fn assert_message(err: &DiskError, value: &str, needle: &str) {
    let forms = [
        (err.to_string(), "disk "),
        (err.with_option("--disk").to_string(), "--disk "),
    ];
    for (msg, start) in forms {
        assert!(!msg.contains('\n'), "not one line: {msg}");
        assert!(msg.starts_with(start), "{msg}");
        assert!(msg.contains(value), "{msg} does not name {value}");
        assert!(msg.contains(needle), "{msg} does not say {needle}");
    }
}

/// Runs qemu-io on a qcow2 image with `cmds` (each one `-c`); panics when a command fails.
pub fn qemu_io(image: &Path, cmds: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    let out = cmd.arg(image).output().expect("qemu-io runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("error") && !text.contains("failed"),
        "qemu-io {cmds:?}: {text}"
    );
}

/// The guest bytes of `image` as qemu-img reads them (converted to raw).
pub fn qemu_raw_bytes(image: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join("qemu-view.raw");
    let _ = fs::remove_file(&raw);
    let (ok, out) = qemu_img(&[
        "convert",
        "-O",
        "raw",
        image.to_str().unwrap(),
        raw.to_str().unwrap(),
    ])
    .unwrap();
    assert!(ok, "qemu-img convert: {out}");
    fs::read(&raw).unwrap()
}

/// An extended-L2 image (64 KiB clusters, 2 KiB subclusters) over a patterned raw backing
/// file, written by qemu-io in pieces smaller than a cluster: data, zero and unallocated
/// subclusters side by side, some falling through to the backing file.
pub fn extl2_over_raw(dir: &Path) -> PathBuf {
    let (base, _) = raw_base(dir);
    let top = dir.join("extl2.qcow2");
    let (ok, out) = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=65536",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "raw",
        top.to_str().unwrap(),
    ])
    .unwrap();
    assert!(ok, "qemu-img create: {out}");
    qemu_io(
        &top,
        &[
            "write -P 0x11 0 4096",
            "write -z 8192 4096",
            "write -P 0x22 100000 7000",
            "discard 196608 65536",
            "write -P 0x33 1048576 131072",
            "write -z 2097152 65536",
            "write -P 0x44 3145728 2048",
        ],
    );
    top
}

/// A zstd-compressed qcow2 image (`cluster` bytes per cluster, extended L2 when asked)
/// converted by qemu-img from a patterned raw file with a hole, and that file's bytes.
pub fn zstd_image(dir: &Path, cluster: u64, extended_l2: bool) -> (PathBuf, Vec<u8>) {
    let mut data = pattern(BASE_SIZE);
    data[(MIB as usize)..(2 * MIB as usize)].fill(0);
    let src = dir.join("zstd-src.raw");
    fs::write(&src, &data).unwrap();
    let image = dir.join(format!("zstd-{cluster}-{extended_l2}.qcow2"));
    let opts = format!(
        "compression_type=zstd,cluster_size={cluster}{}",
        if extended_l2 { ",extended_l2=on" } else { "" }
    );
    let (ok, out) = qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        &opts,
        src.to_str().unwrap(),
        image.to_str().unwrap(),
    ])
    .unwrap();
    assert!(ok, "qemu-img convert: {out}");
    (image, data)
}
