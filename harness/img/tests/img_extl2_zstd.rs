//! `kiln img` on images imago cannot read — extended L2 entries (subclusters) and zstd
//! compression — against the installed qemu-img: `map` (JSON and text) and `check` print the
//! same, `compare` gives the same verdicts, and `convert` produces the same bytes.

use std::path::Path;
use std::process::Command;

use kiln_img::{check, compare, convert, map, ConvertArgs, Profile};

mod common;
use common::{on_ci, qemu_img_present};

/// The output profile matching the installed qemu-img, if kiln has one.
fn profile() -> Option<Profile> {
    let (_, text, _) = qemu(&["--version"]);
    let version = text.split_whitespace().nth(2).unwrap_or("?");
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    let p = match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => Profile::for_version(major, minor),
        _ => None,
    };
    assert!(
        p.is_some() || !on_ci(),
        "CI: no kiln output profile for qemu-img {version}"
    );
    if p.is_none() {
        println!("skipped: no kiln output profile for qemu-img {version}");
    }
    p
}

/// qemu-img's exit code, stdout and stderr.
fn qemu(args: &[&str]) -> (i32, String, String) {
    let o = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn qemu_ok(args: &[&str]) {
    let (code, out, err) = qemu(args);
    assert_eq!(code, 0, "qemu-img {args:?}: {out}{err}");
}

fn qemu_io(image: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let o = c.arg(image).output().expect("run qemu-io");
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && !text.contains("error") && !text.contains("failed"),
        "qemu-io {cmds:?}: {text}"
    );
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// The corpus: an extended-L2 image over a raw file written in subcluster pieces; extended L2
/// with zstd and compressed writes; a zstd image converted with `-c`; and a plain qcow2 image
/// over the extended-L2 one (a chain where only a lower layer needs kiln's reader).
fn corpus(dir: &Path) -> Vec<String> {
    let pattern: Vec<u8> = (0..4u32 << 20).map(|i| (i / 512 + i) as u8 | 1).collect();
    let raw = dir.join("base.raw");
    std::fs::write(&raw, &pattern).expect("write base");

    let extl2 = s(&dir.join("extl2.qcow2"));
    qemu_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=65536",
        "-b",
        "base.raw",
        "-F",
        "raw",
        &extl2,
    ]);
    qemu_io(
        &extl2,
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

    let mixed = s(&dir.join("extl2-zstd.qcow2"));
    qemu_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=32768,compression_type=zstd",
        &mixed,
        "3M",
    ]);
    qemu_io(
        &mixed,
        &[
            "write -P 0x55 0 1024",
            "write -c -P 0x66 65536 32768",
            "write -c -P 0x67 98304 32768",
            "write -z 40000 3000",
            "write -P 0x77 1000000 50000",
            "discard 1015808 16384",
        ],
    );

    let zstd = s(&dir.join("zstd.qcow2"));
    qemu_ok(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd,cluster_size=4096",
        &s(&raw),
        &zstd,
    ]);

    let top = s(&dir.join("top.qcow2"));
    qemu_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "extl2.qcow2",
        "-F",
        "qcow2",
        &top,
        "5M",
    ]);
    qemu_io(&top, &["write -P 0x99 61440 8192", "write -z 3145728 1024"]);
    vec![extl2, mixed, zstd, top]
}

#[test]
fn map_check_compare_convert_match_qemu_img() {
    if !qemu_img_present() {
        return;
    }
    let Some(profile) = profile() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    for image in corpus(dir.path()) {
        for json in [true, false] {
            let mut args = vec!["map"];
            if json {
                args.push("--output=json");
            }
            args.push(&image);
            let (code, out, _) = qemu(&args);
            let k = map(&image, json, profile);
            assert_eq!(
                (k.code, k.stdout.as_str()),
                (code, out.as_str()),
                "map {image}"
            );
        }

        let (code, out, err) = qemu(&["check", &image]);
        let k = check(&image, false);
        assert_eq!(
            (k.code, k.stdout.as_str(), k.stderr.as_str()),
            (code, out.as_str(), err.as_str()),
            "check {image}"
        );

        let qemu_raw = format!("{image}.qemu.raw");
        qemu_ok(&["convert", "-O", "raw", &image, &qemu_raw]);
        let kiln_raw = format!("{image}.kiln.raw");
        let kiln_qcow2 = format!("{image}.kiln.qcow2");
        for (fmt, dst) in [("raw", &kiln_raw), ("qcow2", &kiln_qcow2)] {
            let k = convert(&ConvertArgs {
                src_fmt: None,
                out_fmt: fmt.into(),
                src: image.clone(),
                dst: dst.clone(),
            });
            assert_eq!(k.code, 0, "convert -O {fmt} {image}: {}", k.stderr);
        }
        assert!(
            std::fs::read(&kiln_raw).expect("kiln raw") == std::fs::read(&qemu_raw).expect("raw"),
            "convert {image}: bytes differ from qemu-img's"
        );
        qemu_ok(&["check", &kiln_qcow2]);
        let (code, out, _) = qemu(&["compare", &kiln_qcow2, &qemu_raw]);
        assert_eq!((code, out.as_str()), (0, "Images are identical.\n"));

        for strict in [false, true] {
            for other in [&qemu_raw, &image] {
                let mut args = vec!["compare"];
                if strict {
                    args.push("-s");
                }
                args.extend([image.as_str(), other.as_str()]);
                let (code, out, _) = qemu(&args);
                let k = compare(&image, other, strict, profile);
                assert_eq!(
                    (k.code, k.stdout.as_str()),
                    (code, out.as_str()),
                    "compare {args:?}"
                );
            }
        }
    }
}
