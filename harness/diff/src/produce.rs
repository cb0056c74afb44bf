//! The operations that produce images (`create`, `convert`): each runs with kiln and with
//! qemu-img into two fresh directories under the same file name, and the products are then
//! judged with qemu-img itself: `info --output=json`, `check --output=json`, `compare`, sizes.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use super::ops::{run_qemu_img, Finding};
use super::rules::{judge, OpKind, Verdict};
use super::{TempDir, TempDirError};
use kiln_img::{self as img, chain, Output, Profile};

const LIMIT: Duration = Duration::from_secs(120);

/// The stand-alone `create` variants, picked per image by its index (all of them over a corpus
/// of a few dozen images): options qemu-img and kiln both accept, and ones kiln refuses.
pub const CREATE_VARIANTS: &[&[&str]] = &[
    &["-f", "raw", "NEW", "1000"],
    &["-f", "qcow2", "NEW", "1M"],
    &["-f", "qcow2", "-o", "cluster_size=512", "NEW", "3M"],
    &[
        "-f",
        "qcow2",
        "-o",
        "cluster_size=2M,refcount_bits=1",
        "NEW",
        "64M",
    ],
    &[
        "-f",
        "qcow2",
        "-o",
        "compat=1.1,lazy_refcounts=on,refcount_bits=64",
        "NEW",
        "1.5G",
    ],
    &[
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k,refcount_bits=8",
        "NEW",
        "10G",
    ],
    &[
        "-f",
        "qcow2",
        "-o",
        "compat=v3,cluster_size=16k",
        "NEW",
        "0",
    ],
    &["-f", "raw", "NEW", "1.7k"],
    &["-f", "qcow2", "-o", "cluster_size=3000", "NEW", "1M"],
    &["-f", "qcow2", "NEW", "12Q"],
    &["-f", "qcow2", "-o", "compat=0.10", "NEW", "1M"],
    &["-f", "qcow2", "-o", "cluster_size=512", "NEW", "1T"],
];

/// Replaces the run's directory by `<dir>` so kiln's and qemu-img's outputs line up.
fn normalize(mut o: Output, dir: &Path) -> Output {
    let d = dir.display().to_string();
    o.stdout = o.stdout.replace(&d, "<dir>");
    o.stderr = o.stderr.replace(&d, "<dir>");
    o
}

fn finding(
    image: &str,
    op: String,
    command: &[&str],
    verdict: Verdict,
    k: &Output,
    q: &Output,
) -> Finding {
    Finding::judged(image, op, owned(command), verdict, k, q)
}

fn inconclusive(image: &str, op: &str, why: impl std::fmt::Display) -> Finding {
    Finding::inconclusive(image, op.to_string(), Vec::new(), why.to_string())
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// Two fresh directories, kiln's and qemu-img's.
fn two_dirs() -> Result<(TempDir, TempDir), TempDirError> {
    let k = TempDir::new("kiln-diff-k").map_err(TempDirError)?;
    let q = TempDir::new("kiln-diff-q").map_err(TempDirError)?;
    Ok((k, q))
}

/// Judges the two products at `kp` / `qp` (after both tools succeeded): `info --output=json`,
/// `check --output=json`, `compare` (must be identical), and for raw outputs `compare -s`.
fn judge_products(
    qemu_img: &str,
    image: &str,
    op: &str,
    (kp, kd): (&str, &Path),
    (qp, qd): (&str, &Path),
    profile: Profile,
    out: &mut Vec<Finding>,
) {
    let run =
        |args: &[&str], dir: &Path| run_qemu_img(qemu_img, args, LIMIT).map(|o| normalize(o, dir));
    for (suffix, kind, args) in [
        ("info", OpKind::ProducedInfo, vec!["info", "--output=json"]),
        (
            "check",
            OpKind::ProducedCheck,
            vec!["check", "--output=json"],
        ),
    ] {
        let name = format!("{op}-{suffix}");
        let (k, q) = match (
            run(&[args.as_slice(), &[kp]].concat(), kd),
            run(&[args.as_slice(), &[qp]].concat(), qd),
        ) {
            (Ok(k), Ok(q)) => (k, q),
            (Err(e), _) | (_, Err(e)) => {
                out.push(inconclusive(image, &name, e));
                continue;
            }
        };
        let command = [args.as_slice(), &["PRODUCT"]].concat();
        let verdict = judge(kind, &k, &q, profile);
        out.push(finding(image, name, &command, verdict, &k, &q));
    }
    let identical = Output {
        stdout: "Images are identical.\n".into(),
        stderr: String::new(),
        code: 0,
    };
    match run_qemu_img(qemu_img, &["compare", kp, qp], LIMIT) {
        Ok(c) => out.push(finding(
            image,
            format!("{op}-compare"),
            &["compare", "KILN-PRODUCT", "QEMU-IMG-PRODUCT"],
            judge(OpKind::Compare, &c, &identical, profile),
            &c,
            &identical,
        )),
        Err(e) => out.push(inconclusive(image, &format!("{op}-compare"), e)),
    }
    let size = |p: &str| {
        std::fs::metadata(p)
            .map(|m| Output {
                stdout: format!(
                    "{{\"length\": {}, \"actual-size\": {}}}\n",
                    m.len(),
                    m.blocks() * 512
                ),
                ..Output::default()
            })
            .map_err(|e| format!("{p}: {e}"))
    };
    match (size(kp), size(qp)) {
        (Ok(k), Ok(q)) => out.push(finding(
            image,
            format!("{op}-size"),
            &["(stat: length and allocated bytes of each PRODUCT)"],
            judge(OpKind::ProducedSize, &k, &q, profile),
            &k,
            &q,
        )),
        (Err(e), _) | (_, Err(e)) => out.push(inconclusive(image, &format!("{op}-size"), e)),
    }
}

/// Runs one create command line (`NEW` standing for the new image) with both tools.
fn create_pair(
    qemu_img: &str,
    image: &str,
    op: &str,
    argv: &[&str],
    profile: Profile,
    out: &mut Vec<Finding>,
) {
    let (kd, qd) = match two_dirs() {
        Ok(d) => d,
        Err(e) => return out.push(inconclusive(image, op, e)),
    };
    let kp = kd.path().join("new.img").display().to_string();
    let qp = qd.path().join("new.img").display().to_string();
    let subst = |p: &str| -> Vec<String> {
        argv.iter()
            .map(|a| {
                if *a == "NEW" {
                    p.to_string()
                } else {
                    a.to_string()
                }
            })
            .collect()
    };
    let kargs = subst(&kp);
    let Some(kiln_args) = parse_create(&kargs, profile) else {
        return out.push(inconclusive(image, op, format!("bad variant {argv:?}")));
    };
    let k = normalize(img::create(&kiln_args), kd.path());
    let qargs: Vec<String> = ["create".to_string()]
        .into_iter()
        .chain(subst(&qp))
        .collect();
    let qargs: Vec<&str> = qargs.iter().map(String::as_str).collect();
    let q = match run_qemu_img(qemu_img, &qargs, LIMIT) {
        Ok(q) => normalize(q, qd.path()),
        Err(e) => return out.push(inconclusive(image, op, e)),
    };
    let verdict = judge(OpKind::Produce, &k, &q, profile);
    let both_made = k.code == 0 && q.code == 0;
    let mut command = vec!["create"];
    command.extend_from_slice(argv);
    out.push(finding(image, op.to_string(), &command, verdict, &k, &q));
    if both_made {
        judge_products(
            qemu_img,
            image,
            op,
            (&kp, kd.path()),
            (&qp, qd.path()),
            profile,
            out,
        );
    }
}

/// Parses a create argv (the subset the variants use) into kiln's arguments.
fn parse_create(argv: &[String], profile: Profile) -> Option<img::CreateArgs> {
    let mut a = img::CreateArgs {
        fmt: "raw".into(),
        profile,
        ..img::CreateArgs::default()
    };
    let mut pos = Vec::new();
    let mut it = argv.iter();
    while let Some(x) = it.next() {
        match x.as_str() {
            "-f" => a.fmt = it.next()?.clone(),
            "-b" => a.backing = Some(it.next()?.clone()),
            "-F" => a.backing_fmt = Some(it.next()?.clone()),
            "-o" => a.options.push(it.next()?.clone()),
            _ => pos.push(x.clone()),
        }
    }
    let mut pos = pos.into_iter();
    a.file = pos.next()?;
    a.size = pos.next();
    Some(a)
}

/// `--ops create` for the `index`-th image: a qcow2 overlay over it (size from the image), and
/// one stand-alone variant.
pub fn create_findings(
    qemu_img: &str,
    image: &str,
    index: usize,
    profile: Profile,
) -> Vec<Finding> {
    let mut out = Vec::new();
    // The backing is named by its absolute path: the overlay lives in another directory.
    let opened = chain::open_layer(image, None).and_then(|l| {
        std::fs::canonicalize(image)
            .map(|p| (l, p.display().to_string()))
            .map_err(|e| img::ImgError::io(Path::new(image), "canonicalize", e))
    });
    match opened {
        Ok((layer, abs)) => {
            let fmt = layer.format.name();
            create_pair(
                qemu_img,
                image,
                "create-overlay",
                &["-f", "qcow2", "-b", &abs, "-F", fmt, "NEW"],
                profile,
                &mut out,
            );
        }
        Err(e) => out.push(inconclusive(image, "create-overlay", e.to_string())),
    }
    let variant = CREATE_VARIANTS[index % CREATE_VARIANTS.len()];
    create_pair(qemu_img, image, "create", variant, profile, &mut out);
    out
}

/// `--ops convert`: the image (its whole chain) to raw and to qcow2 with both tools.
pub fn convert_findings(qemu_img: &str, image: &str, profile: Profile) -> Vec<Finding> {
    let mut out = Vec::new();
    for fmt in ["raw", "qcow2"] {
        let op = format!("convert-{fmt}");
        let (kd, qd) = match two_dirs() {
            Ok(d) => d,
            Err(e) => {
                out.push(inconclusive(image, &op, e));
                continue;
            }
        };
        let kp = kd.path().join("out.img").display().to_string();
        let qp = qd.path().join("out.img").display().to_string();
        let k = normalize(
            img::convert(&img::ConvertArgs {
                src_fmt: None,
                out_fmt: fmt.into(),
                src: image.into(),
                dst: kp.clone(),
            }),
            kd.path(),
        );
        let q = match run_qemu_img(qemu_img, &["convert", "-O", fmt, image, &qp], LIMIT) {
            Ok(q) => normalize(q, qd.path()),
            Err(e) => {
                out.push(inconclusive(image, &op, e));
                continue;
            }
        };
        let verdict = judge(OpKind::Produce, &k, &q, profile);
        let both_made = k.code == 0 && q.code == 0;
        let command = ["convert", "-O", fmt, image, "OUT"];
        out.push(finding(image, op.clone(), &command, verdict, &k, &q));
        if both_made {
            judge_products(
                qemu_img,
                image,
                &op,
                (&kp, kd.path()),
                (&qp, qd.path()),
                profile,
                &mut out,
            );
            if fmt == "raw" {
                // Raw products must match in allocation too (holes where qemu-img has holes).
                let ident = Output {
                    stdout: "Images are identical.\n".into(),
                    ..Output::default()
                };
                match run_qemu_img(qemu_img, &["compare", "-s", &kp, &qp], LIMIT) {
                    Ok(c) => out.push(finding(
                        image,
                        format!("{op}-compare-s"),
                        &["compare", "-s", "KILN-PRODUCT", "QEMU-IMG-PRODUCT"],
                        judge(OpKind::Compare, &c, &ident, profile),
                        &c,
                        &ident,
                    )),
                    Err(e) => out.push(inconclusive(image, &format!("{op}-compare-s"), e)),
                }
            }
        }
    }
    out
}
