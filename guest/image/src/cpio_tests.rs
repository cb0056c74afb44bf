use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use super::*;

fn sample() -> Initramfs {
    let mut image = Initramfs::new();
    image
        .file("/init", 0o755, b"#!/bin/sh\necho hi\n".to_vec())
        .dir("etc", 0o755)
        .file("etc/kiln/modules", 0o644, b"/lib/modules/a.ko\n".to_vec())
        .symlink("bin/sh", "busybox")
        .file("bin/busybox", 0o4755, vec![0x7f, b'E', b'L', b'F', 0, 1, 2])
        .file("empty", 0o600, Vec::new())
        .char_device("dev/console", 0o600, 5, 1)
        .dir("tmp", 0o1777);
    image
}

/// The external `cpio`/`gzip` tool, or `None` with the reason printed (the test then checks
/// only what it can without it).
fn tool(name: &str) -> Option<&str> {
    let found = Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        eprintln!("skipping the {name} check: {name} is not installed (apt-get install {name})");
    }
    found.then_some(name)
}

fn run_with_input(mut command: Command, input: &[u8]) -> Vec<u8> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tool starts");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("feed input");
    let output = child.wait_with_output().expect("tool runs");
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

#[test]
fn same_inputs_give_the_same_bytes_in_any_insertion_order() {
    let a = sample().to_bytes().expect("writes");
    let mut reversed = Initramfs::new();
    reversed
        .dir("tmp", 0o1777)
        .char_device("dev/console", 0o600, 5, 1)
        .file("empty", 0o600, Vec::new())
        .file("bin/busybox", 0o4755, vec![0x7f, b'E', b'L', b'F', 0, 1, 2])
        .symlink("bin/sh", "busybox")
        .file("etc/kiln/modules", 0o644, b"/lib/modules/a.ko\n".to_vec())
        .dir("etc", 0o755)
        .file("init", 0o755, b"#!/bin/sh\necho hi\n".to_vec());
    assert_eq!(a, reversed.to_bytes().expect("writes"));
    assert_eq!(a, sample().to_bytes().expect("writes again"));

    let mut gz_a = Vec::new();
    let mut gz_b = Vec::new();
    sample().write_gzip(&mut gz_a).expect("gzip");
    reversed.write_gzip(&mut gz_b).expect("gzip");
    assert_eq!(gz_a, gz_b);
    // Gzip header: magic, deflate, no flags (no name), mtime 0.
    assert_eq!(&gz_a[..8], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0]);
}

#[test]
fn layout_is_newc_with_ordered_inodes_and_a_trailer() {
    let bytes = sample().to_bytes().expect("writes");
    assert_eq!(bytes.len() % 4, 0);
    assert_eq!(&bytes[..6], b"070701");
    // First entry: "bin", the implicit directory, inode 1, mode 040755, mtime 0.
    let header = std::str::from_utf8(&bytes[6..110]).expect("ascii header");
    let field = |i: usize| u32::from_str_radix(&header[i * 8..i * 8 + 8], 16).expect("hex");
    assert_eq!(
        (field(0), field(1), field(2), field(3), field(5)),
        (1, 0o40755, 0, 0, 0)
    );
    assert_eq!(&bytes[110..114], b"bin\0");
    let trailer = bytes
        .windows(11)
        .rposition(|w| w == b"TRAILER!!!\0")
        .expect("trailer present");
    assert!(bytes.len() - trailer <= 11 + 3);
}

#[test]
fn cpio_extracts_files_modes_dirs_and_symlinks() {
    let Some(cpio) = tool("cpio") else { return };
    let bytes = sample().to_bytes().expect("writes");
    let listing = run_with_input(
        {
            let mut c = Command::new(cpio);
            c.arg("-it");
            c
        },
        &bytes,
    );
    assert_eq!(
        String::from_utf8_lossy(&listing),
        "bin\nbin/busybox\nbin/sh\ndev\ndev/console\nempty\netc\netc/kiln\netc/kiln/modules\ninit\ntmp\n"
    );
    let verbose = run_with_input(
        {
            let mut c = Command::new(cpio);
            c.arg("-itv");
            c
        },
        &bytes,
    );
    let verbose = String::from_utf8_lossy(&verbose);
    let console = verbose
        .lines()
        .find(|l| l.ends_with("dev/console"))
        .expect("console listed");
    assert!(console.starts_with("crw-------"), "{console}");
    assert!(
        console.contains("5,") && console.contains(" 1 "),
        "{console}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    // Device nodes need privileges to create; extract everything else.
    let mut extract = Command::new(cpio);
    extract.args([
        "-idm",
        "--no-absolute-filenames",
        "--quiet",
        "--nonmatching",
        "dev/console",
    ]);
    extract.current_dir(dir.path());
    run_with_input(extract, &bytes);
    let root = dir.path();
    let mode = |p: &str| {
        fs::symlink_metadata(root.join(p))
            .expect(p)
            .permissions()
            .mode()
    };
    assert_eq!(
        fs::read(root.join("init")).expect("init"),
        b"#!/bin/sh\necho hi\n"
    );
    assert_eq!(mode("init") & 0o7777, 0o755);
    assert_eq!(mode("bin/busybox") & 0o7777, 0o4755);
    assert_eq!(mode("empty") & 0o7777, 0o600);
    assert_eq!(fs::read(root.join("empty")).expect("empty").len(), 0);
    assert_eq!(mode("tmp") & 0o7777, 0o1777);
    assert!(root.join("etc/kiln").is_dir());
    assert_eq!(
        fs::read_link(root.join("bin/sh")).expect("symlink"),
        Path::new("busybox")
    );
    assert_eq!(
        fs::metadata(root.join("init"))
            .expect("init")
            .modified()
            .expect("mtime"),
        std::time::UNIX_EPOCH
    );
}

#[test]
fn gzip_variant_decompresses_to_the_plain_archive() {
    let Some(gzip) = tool("gzip") else { return };
    let mut compressed = Vec::new();
    sample().write_gzip(&mut compressed).expect("gzip");
    let mut command = Command::new(gzip);
    command.arg("-dc");
    let plain = run_with_input(command, &compressed);
    assert_eq!(plain, sample().to_bytes().expect("writes"));
}

#[test]
fn invalid_archives_are_refused_with_the_path() {
    let mut duplicate = Initramfs::new();
    duplicate
        .file("a", 0o644, b"1".to_vec())
        .file("/a", 0o644, b"2".to_vec());
    let err = duplicate.to_bytes().expect_err("duplicate");
    assert_eq!(err.to_string(), "initramfs path \"a\" added twice");

    for path in ["", "/", "a/../b", "./.", "a\0b"] {
        let mut image = Initramfs::new();
        image.dir(path, 0o755);
        let err = image.to_bytes().expect_err("bad path");
        assert!(
            matches!(err, InitramfsError::BadPath { .. }),
            "{path:?}: {err}"
        );
    }

    let mut file_as_dir = Initramfs::new();
    file_as_dir
        .file("lib", 0o644, Vec::new())
        .file("lib/x", 0o644, Vec::new());
    let err = file_as_dir
        .to_bytes()
        .expect_err("file used as a directory");
    assert_eq!(
        err.to_string(),
        "initramfs path \"lib\" is a parent of \"lib/x\" but is not a directory"
    );
}

#[test]
fn leading_dot_slash_is_normalised() {
    let mut a = Initramfs::new();
    a.file("./x/y", 0o644, b"z".to_vec());
    let mut b = Initramfs::new();
    b.file("/x//y", 0o644, b"z".to_vec());
    assert_eq!(a.to_bytes().expect("a"), b.to_bytes().expect("b"));
}
