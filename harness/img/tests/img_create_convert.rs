//! `kiln img create` / `convert` against the installed qemu-img: the products pass
//! `qemu-img check`, `qemu-img info` reports the same fields as for qemu-img's own product,
//! `qemu-img compare` says identical, and no source image changes (sha256 before and after).

use std::path::Path;
use std::process::Command;

use kiln_img::{convert, create, ConvertArgs, CreateArgs};
use serde_json::Value;
use sha2::{Digest, Sha256};

mod common;
use common::qemu_img_present;

fn qemu(args: &[&str]) -> (i32, String) {
    let o = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.code().unwrap_or(-1), text)
}

fn qemu_io(image: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    for x in cmds {
        c.args(["-c", x]);
    }
    let o = c.arg(image).output().expect("run qemu-io");
    assert!(o.status.success(), "qemu-io {cmds:?}: {o:?}");
}

fn sha(p: &Path) -> Vec<u8> {
    Sha256::digest(std::fs::read(p).expect("read")).to_vec()
}

/// `qemu-img info --output=json` with the fields that name the file or measure its host
/// layout removed: what remains must be equal for kiln's and qemu-img's products.
fn info_fields(path: &str) -> Value {
    let (code, text) = qemu(&["info", "--output=json", path]);
    assert_eq!(code, 0, "{text}");
    let mut v: Value = serde_json::from_str(&text).expect("json");
    fn scrub(v: &mut Value) {
        if let Value::Object(m) = v {
            for k in ["filename", "actual-size", "dirty-flag"] {
                m.remove(k);
            }
            if m.get("name").and_then(Value::as_str) == Some("file") {
                if let Some(Value::Object(info)) = m.get_mut("info") {
                    info.remove("virtual-size");
                }
            }
            m.values_mut().for_each(scrub);
        } else if let Value::Array(a) = v {
            a.iter_mut().for_each(scrub);
        }
    }
    scrub(&mut v);
    // kiln's and qemu-img's products live in sibling directories k/ and q/.
    let text = v
        .to_string()
        .replace("/k/", "/<dir>/")
        .replace("/q/", "/<dir>/");
    serde_json::from_str(&text).expect("json")
}

fn check_clean(path: &str) {
    let (code, text) = qemu(&["check", path]);
    assert!(
        code == 0 && text.contains("No errors were found"),
        "qemu-img check {path}: {text}"
    );
}

/// Creates the same image with kiln (in `k/`) and qemu-img (in `q/`) and compares them.
fn create_both(dir: &Path, argv: &[&str], name: &str) {
    for sub in ["k", "q"] {
        std::fs::create_dir_all(dir.join(sub)).expect("mkdir");
    }
    let kp = dir.join("k").join(name).display().to_string();
    let qp = dir.join("q").join(name).display().to_string();
    let mut a = CreateArgs {
        fmt: "raw".into(),
        file: kp.clone(),
        ..CreateArgs::default()
    };
    let mut it = argv.iter();
    while let Some(x) = it.next() {
        let mut val = || it.next().expect("value").to_string();
        match *x {
            "-f" => a.fmt = val(),
            "-b" => a.backing = Some(val()),
            "-F" => a.backing_fmt = Some(val()),
            "-o" => a.options.push(val()),
            s => a.size = Some(s.to_string()),
        }
    }
    let k = create(&a);
    assert_eq!(k.code, 0, "kiln img create {argv:?}: {k:?}");
    let mut qargs = vec!["create"];
    qargs.extend_from_slice(argv);
    // qemu-img takes FILE before SIZE: move the size (the last argument, if any) after FILE.
    let size = a.size.as_deref();
    if size.is_some() {
        qargs.pop();
    }
    qargs.push(&qp);
    if let Some(s) = size {
        qargs.push(s);
    }
    let (code, text) = qemu(&qargs);
    assert_eq!(code, 0, "qemu-img {qargs:?}: {text}");
    assert_eq!(
        k.stdout.replace(&kp, "FILE"),
        text.replace(&qp, "FILE"),
        "Formatting line for {argv:?}"
    );
    if a.fmt == "qcow2" {
        check_clean(&kp);
    }
    assert_eq!(info_fields(&kp), info_fields(&qp), "info for {argv:?}");
    let (code, text) = qemu(&["compare", &kp, &qp]);
    assert_eq!(code, 0, "compare {argv:?}: {text}");
}

#[test]
fn create_matches_qemu_img() {
    if !qemu_img_present() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    create_both(d, &["-f", "raw", "1000"], "r.raw");
    create_both(d, &["-f", "raw", "1.5M"], "r2.raw");
    create_both(d, &["-f", "qcow2", "10M"], "a.qcow2");
    for cs in ["512", "4k", "64k", "2M"] {
        create_both(
            d,
            &["-f", "qcow2", "-o", &format!("cluster_size={cs}"), "1G"],
            &format!("c{cs}.qcow2"),
        );
    }
    create_both(
        d,
        &["-f", "qcow2", "-o", "compat=1.1,lazy_refcounts=on", "5M"],
        "lazy.qcow2",
    );
    create_both(
        d,
        &["-f", "qcow2", "-o", "compat=v3,refcount_bits=1", "5M"],
        "rc1.qcow2",
    );
    create_both(
        d,
        &["-f", "qcow2", "-o", "refcount_bits=64", "2T"],
        "big.qcow2",
    );
    // Backing files: relative names resolve against the new image's directory; the size
    // comes from the backing image when omitted.
    let base = d.join("base.raw");
    std::fs::write(&base, vec![0x5a; 3 << 20]).expect("base");
    let abs = base.display().to_string();
    let before = sha(&base);
    create_both(
        d,
        &["-f", "qcow2", "-b", &abs, "-F", "raw"],
        "over-raw.qcow2",
    );
    create_both(
        d,
        &["-f", "qcow2", "-b", &abs, "-F", "raw", "8M"],
        "over-raw-8m.qcow2",
    );
    std::fs::copy(&base, d.join("k/base.raw")).expect("copy");
    std::fs::copy(&base, d.join("q/base.raw")).expect("copy");
    create_both(
        d,
        &["-f", "qcow2", "-b", "base.raw", "-F", "raw"],
        "rel.qcow2",
    );
    create_both(
        d,
        &[
            "-f",
            "qcow2",
            "-b",
            "rel.qcow2",
            "-F",
            "qcow2",
            "-o",
            "cluster_size=4k",
        ],
        "rel2.qcow2",
    );
    assert_eq!(sha(&base), before, "the backing file changed");
}

#[test]
fn convert_matches_qemu_img_and_leaves_sources_alone() {
    if !qemu_img_present() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let p = |n: &str| dir.path().join(n).display().to_string();
    // A chain: raw base <- qcow2 (data, zero clusters, compressed) <- qcow2 top (4 KiB clusters).
    std::fs::write(p("base.raw"), {
        let mut v = vec![0u8; 8 << 20];
        v[..1 << 20].fill(0x11);
        v[5 << 20..(5 << 20) + 4096].fill(0x22);
        v
    })
    .expect("base");
    let (c, t) = qemu(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        &p("mid.qcow2"),
    ]);
    assert_eq!(c, 0, "{t}");
    qemu_io(
        &p("mid.qcow2"),
        &[
            "write -P 0x33 2M 192k",
            "write -z 512k 64k",
            "write -c -P 0x44 6M 64k",
        ],
    );
    let (c, t) = qemu(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        &p("top.qcow2"),
    ]);
    assert_eq!(c, 0, "{t}");
    qemu_io(
        &p("top.qcow2"),
        &["write -P 0x55 1000k 10k", "write -z 5M 4k"],
    );
    let sources = ["base.raw", "mid.qcow2", "top.qcow2"].map(|n| (n, sha(Path::new(&p(n)))));

    let cases = [
        ("top.qcow2", "raw"),
        ("top.qcow2", "qcow2"),
        ("mid.qcow2", "raw"),
        ("base.raw", "qcow2"),
        ("base.raw", "raw"),
    ];
    for (src, fmt) in cases {
        let k = p(&format!("k-{src}.{fmt}"));
        let q = p(&format!("q-{src}.{fmt}"));
        let out = convert(&ConvertArgs {
            src_fmt: None,
            out_fmt: fmt.into(),
            src: p(src),
            dst: k.clone(),
        });
        assert_eq!(
            (out.code, out.stdout.as_str(), out.stderr.as_str()),
            (0, "", "")
        );
        let (c, t) = qemu(&["convert", "-O", fmt, &p(src), &q]);
        assert_eq!(c, 0, "{t}");
        let (c, t) = qemu(&["compare", &p(src), &k]);
        assert_eq!(c, 0, "{src} -> {fmt}: {t}");
        let (c, t) = qemu(&["compare", &k, &q]);
        assert_eq!(c, 0, "{src} -> {fmt}: {t}");
        let (km, qm) = (
            std::fs::metadata(&k).expect("k"),
            std::fs::metadata(&q).expect("q"),
        );
        use std::os::unix::fs::MetadataExt;
        let (ka, qa) = (km.blocks() * 512, qm.blocks() * 512);
        assert!(
            ka.abs_diff(qa) <= 64 << 10,
            "{src} -> {fmt}: allocated {ka} vs {qa}"
        );
        if fmt == "raw" {
            assert_eq!(km.len(), qm.len());
            let (c, t) = qemu(&["compare", "-s", &k, &q]);
            assert_eq!(c, 0, "strict {src} -> {fmt}: {t}");
        } else {
            check_clean(&k);
            assert_eq!(info_fields(&k), info_fields(&q), "{src} -> {fmt}");
        }
    }
    for (n, h) in &sources {
        assert_eq!(&sha(Path::new(&p(n))), h, "{n} changed");
    }
}

#[test]
fn convert_errors_exit_1_and_write_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = |n: &str| dir.path().join(n).display().to_string();
    std::fs::write(p("a.raw"), vec![1u8; 4096]).expect("write");
    let run = |src: &str, dst: &str, fmt: &str, src_fmt: Option<&str>| {
        convert(&ConvertArgs {
            src_fmt: src_fmt.map(Into::into),
            out_fmt: fmt.into(),
            src: src.into(),
            dst: dst.into(),
        })
    };
    for (out, want) in [
        (
            run(&p("gone"), &p("x"), "raw", None),
            "gone: open: No such file",
        ),
        (
            run(&p("a.raw"), &p("x"), "vmdkx", None),
            "Unknown file format 'vmdkx'",
        ),
        (run(&p("a.raw"), &p("x"), "raw", Some("qcow2")), "a.raw"),
        (
            run(&p("a.raw"), &p("a.raw"), "qcow2", None),
            "refusing to overwrite it",
        ),
        (
            run(&p("a.raw"), &p("no/dir/x"), "raw", None),
            "error while converting raw: Could not create",
        ),
    ] {
        assert_eq!(out.code, 1, "{out:?}");
        assert!(out.stderr.contains(want), "{want}: {}", out.stderr);
        assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    }
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["a.raw"]);
    assert_eq!(std::fs::read(p("a.raw")).expect("read"), vec![1u8; 4096]);
}
