//! The comparator: a fixed list of named tolerance rules, each with the reason it exists and the
//! profiles it applies to. Anything no rule explains is DIVERGENT; nothing is silently ignored.

use serde_json::Value;

use kiln_img::{Output, Profile};

/// The verdict for one operation on one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Identical,
    Tolerated {
        rule: &'static str,
        reason: &'static str,
    },
    /// kiln's disk layer cannot do this operation on this image (e.g. encryption).
    Unsupported(String),
    Inconclusive(String),
    Divergent,
}

impl Verdict {
    /// The short label used in reports.
    pub fn label(&self) -> String {
        match self {
            Verdict::Identical => "identical".into(),
            Verdict::Tolerated { rule, reason } => format!("tolerated ({rule}, {reason})"),
            Verdict::Unsupported(f) => format!("unsupported ({f})"),
            Verdict::Inconclusive(r) => format!("inconclusive ({r})"),
            Verdict::Divergent => "DIVERGENT".into(),
        }
    }
}

/// What an operation is, for rules that only make sense for some.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    InfoHuman,
    InfoJson,
    Check,
    CheckJson,
    MapHuman,
    MapJson,
    Compare,
    /// A `create`/`convert` command itself (its stdout, stderr and exit code).
    Produce,
    /// `qemu-img info --output=json` of an image kiln made, against one qemu-img made.
    ProducedInfo,
    /// `qemu-img check --output=json` of an image kiln made, against one qemu-img made.
    ProducedCheck,
    /// `{"length", "actual-size"}` of the two products.
    ProducedSize,
}

/// A tolerance rule: name, reason, profiles, and the test that decides if it explains a pair.
pub struct Rule {
    pub name: &'static str,
    pub reason: &'static str,
    pub profiles: &'static [Profile],
    pub applies: fn(OpKind, &Output, &Output) -> bool,
}

/// Every rule, in the order they are tried.
pub const RULES: &[Rule] = &[
    Rule {
        name: "json-key-order",
        reason: "same JSON values; key order is QEMU's hash-table order, not a contract",
        profiles: &Profile::ALL,
        applies: json_key_order,
    },
    Rule {
        name: "disk-size",
        reason: "host allocation (st_blocks) may change between the two runs; within 64 KiB or 5%",
        profiles: &Profile::ALL,
        applies: disk_size,
    },
    Rule {
        name: "extent-size-hint",
        reason: "qemu-img 8.0+ reports the host file system's extent size hint (XFS) for the \
                 protocol node; kiln does not query it",
        profiles: &[Profile::V10_0],
        applies: extent_size_hint,
    },
    Rule {
        name: "fresh-metadata-layout",
        reason: "imago gives a new image's L1 table a whole cluster where QEMU writes only the \
                 entries used: the file is up to two clusters longer, the same guest data",
        profiles: &Profile::ALL,
        applies: fresh_metadata_layout,
    },
    Rule {
        name: "error-wording",
        reason: "both fail with the same exit code; message wording is not the contract",
        profiles: &Profile::ALL,
        applies: error_wording,
    },
    Rule {
        name: "check-detail-lines",
        reason: "same counts, summary and exit code; per-cluster stderr lines worded differently",
        profiles: &Profile::ALL,
        applies: check_detail_lines,
    },
];

/// Compares kiln's and qemu-img's output for one operation under `profile`.
pub fn judge(op: OpKind, kiln: &Output, qemu: &Output, profile: Profile) -> Verdict {
    if kiln == qemu {
        return Verdict::Identical;
    }
    if let Some(feature) = unsupported_feature(&kiln.stderr) {
        if kiln.code != 0 {
            return Verdict::Unsupported(feature);
        }
    }
    for rule in RULES {
        if rule.profiles.contains(&profile) && (rule.applies)(op, kiln, qemu) {
            return Verdict::Tolerated {
                rule: rule.name,
                reason: rule.reason,
            };
        }
    }
    Verdict::Divergent
}

/// "unsupported (extended L2)" in kiln's error → "extended L2".
pub fn unsupported_feature(stderr: &str) -> Option<String> {
    let start = stderr.find("unsupported (")? + "unsupported (".len();
    let end = stderr[start..].find(')')? + start;
    Some(stderr[start..end].to_string())
}

fn parse_json(s: &str) -> Option<Value> {
    serde_json::from_str(s).ok()
}

fn json_key_order(_: OpKind, k: &Output, q: &Output) -> bool {
    k.code == q.code
        && k.stderr == q.stderr
        && k.stdout != q.stdout
        && matches!((parse_json(&k.stdout), parse_json(&q.stdout)), (Some(a), Some(b)) if a == b)
}

/// Replaces every `actual-size` / "disk size:" value by a marker, returning the values seen.
fn strip_sizes(op: OpKind, out: &Output) -> Option<(String, Vec<u64>)> {
    let mut sizes = Vec::new();
    match op {
        OpKind::InfoJson => {
            let mut v = parse_json(&out.stdout)?;
            collect_actual(&mut v, &mut sizes);
            Some((v.to_string(), sizes))
        }
        OpKind::InfoHuman => {
            let mut text = String::new();
            for line in out.stdout.lines() {
                if let Some((pre, val)) = line.split_once("disk size: ") {
                    sizes.push(parse_human_size(val)?);
                    text.push_str(pre);
                    text.push_str("disk size: <size>\n");
                } else {
                    text.push_str(line);
                    text.push('\n');
                }
            }
            Some((text, sizes))
        }
        _ => None,
    }
}

fn collect_actual(v: &mut Value, sizes: &mut Vec<u64>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if k == "actual-size" {
                    if let Some(n) = x.as_u64() {
                        sizes.push(n);
                        *x = Value::String("<size>".into());
                    }
                } else {
                    collect_actual(x, sizes);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| collect_actual(x, sizes)),
        _ => {}
    }
}

/// "324 KiB" → bytes (approximate: qemu-img prints three significant digits).
fn parse_human_size(s: &str) -> Option<u64> {
    let (num, unit) = s.trim().split_once(' ')?;
    let n: f64 = num.parse().ok()?;
    let mult = match unit {
        "B" => 1u64,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return None,
    };
    Some((n * mult as f64) as u64)
}

fn disk_size(op: OpKind, k: &Output, q: &Output) -> bool {
    if k.code != q.code || k.stderr != q.stderr {
        return false;
    }
    let (Some((kt, ks)), Some((qt, qs))) = (strip_sizes(op, k), strip_sizes(op, q)) else {
        return false;
    };
    kt == qt
        && ks.len() == qs.len()
        && ks.iter().zip(&qs).all(|(&a, &b)| {
            let diff = a.abs_diff(b);
            diff <= 64 << 10 || diff * 20 <= a.max(b)
        })
}

/// Removes `extent-size-hint` from every `format-specific.data` of type "file".
fn strip_hint(v: &mut Value) {
    match v {
        Value::Object(m) => {
            if m.get("type").and_then(Value::as_str) == Some("file") {
                if let Some(Value::Object(d)) = m.get_mut("data") {
                    d.remove("extent-size-hint");
                }
            }
            m.values_mut().for_each(strip_hint);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_hint),
        _ => {}
    }
}

fn extent_size_hint(op: OpKind, k: &Output, q: &Output) -> bool {
    if op != OpKind::InfoJson || k.code != q.code || !q.stdout.contains("extent-size-hint") {
        return false;
    }
    match (parse_json(&k.stdout), parse_json(&q.stdout)) {
        (Some(mut a), Some(mut b)) => {
            strip_hint(&mut a);
            strip_hint(&mut b);
            a == b
        }
        _ => false,
    }
}

/// Largest slack a freshly written image may have over qemu-img's (two 2 MiB clusters).
const MAX_LAYOUT_SLACK: u64 = 4 << 20;

fn within_disk_size(a: u64, b: u64) -> bool {
    let diff = a.abs_diff(b);
    diff <= 64 << 10 || diff * 20 <= a.max(b)
}

/// Removes `key` from every object (recursively), returning the numbers removed in order.
fn take_numbers(v: &mut Value, key: &str, out: &mut Vec<u64>) {
    match v {
        Value::Object(m) => {
            if let Some(n) = m.get(key).and_then(Value::as_u64) {
                out.push(n);
                m.remove(key);
            }
            m.values_mut().for_each(|x| take_numbers(x, key, out));
        }
        Value::Array(a) => a.iter_mut().for_each(|x| take_numbers(x, key, out)),
        _ => {}
    }
}

/// The protocol (file) node lengths under `children`, removed from `v`.
fn take_file_lengths(v: &mut Value, out: &mut Vec<u64>) {
    if let Some(Value::Array(children)) = v.get_mut("children") {
        for c in children {
            if let Some(Value::Object(info)) = c.get_mut("info") {
                if let Some(n) = info.remove("virtual-size").and_then(|n| n.as_u64()) {
                    out.push(n);
                }
            }
        }
    }
}

/// Only for images the two tools just made: everything equal but the protocol node's length
/// (within two of the image's clusters; raw: none), `actual-size` (within the disk-size
/// tolerance) and the check's `image-end-offset` / the file `length` (within two of the
/// largest clusters).
fn fresh_metadata_layout(op: OpKind, k: &Output, q: &Output) -> bool {
    if !matches!(
        op,
        OpKind::ProducedInfo | OpKind::ProducedCheck | OpKind::ProducedSize
    ) || k.code != q.code
        || k.stderr != q.stderr
    {
        return false;
    }
    let (Some(mut a), Some(mut b)) = (parse_json(&k.stdout), parse_json(&q.stdout)) else {
        return false;
    };
    let cluster = a.get("cluster-size").and_then(Value::as_u64);
    let (mut la, mut lb) = (Vec::new(), Vec::new());
    let slack = match op {
        OpKind::ProducedInfo => {
            // Raw products have no clusters and no metadata: their lengths must be equal.
            take_file_lengths(&mut a, &mut la);
            take_file_lengths(&mut b, &mut lb);
            2 * cluster.unwrap_or(0)
        }
        OpKind::ProducedCheck => {
            take_numbers(&mut a, "image-end-offset", &mut la);
            take_numbers(&mut b, "image-end-offset", &mut lb);
            MAX_LAYOUT_SLACK
        }
        _ => {
            take_numbers(&mut a, "length", &mut la);
            take_numbers(&mut b, "length", &mut lb);
            MAX_LAYOUT_SLACK
        }
    };
    let (mut sa, mut sb) = (Vec::new(), Vec::new());
    take_numbers(&mut a, "actual-size", &mut sa);
    take_numbers(&mut b, "actual-size", &mut sb);
    a == b
        && la.len() == lb.len()
        && la.iter().zip(&lb).all(|(x, y)| x.abs_diff(*y) <= slack)
        && sa.len() == sb.len()
        && sa.iter().zip(&sb).all(|(x, y)| within_disk_size(*x, *y))
}

/// Both failed the same way: same exit code, same stdout, as many error lines (one, or 7.2's
/// two-line size error). A check's findings (exit 2/3 with a summary on stdout) are not
/// errors and never match here.
fn error_wording(op: OpKind, k: &Output, q: &Output) -> bool {
    let is_check_verdict = matches!(op, OpKind::Check | OpKind::CheckJson) && !k.stdout.is_empty();
    !is_check_verdict
        && k.code != 0
        && k.code == q.code
        && k.stdout == q.stdout
        && k.stderr != q.stderr
        && (1..=2).contains(&k.stderr.lines().count())
        && k.stderr.lines().count() == q.stderr.lines().count()
}

fn check_detail_lines(op: OpKind, k: &Output, q: &Output) -> bool {
    let kind = |l: &str| l.split_whitespace().next().unwrap_or("").to_string();
    matches!(op, OpKind::Check | OpKind::CheckJson)
        && k.code == q.code
        && k.stdout == q.stdout
        && k.stderr.lines().count() == q.stderr.lines().count()
        && k.stderr.lines().map(kind).eq(q.stderr.lines().map(kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(stdout: &str, stderr: &str, code: i32) -> Output {
        Output {
            stdout: stdout.into(),
            stderr: stderr.into(),
            code,
        }
    }

    fn rule(v: &Verdict) -> Option<&'static str> {
        match v {
            Verdict::Tolerated { rule, .. } => Some(rule),
            _ => None,
        }
    }

    const P: Profile = Profile::V10_0;

    #[test]
    fn identical_is_identical() {
        let a = out("x\n", "", 0);
        assert_eq!(
            judge(OpKind::InfoHuman, &a, &a.clone(), P),
            Verdict::Identical
        );
    }

    #[test]
    fn json_key_order_applies_and_does_not_hide_values() {
        let k = out("{\"a\": 1, \"b\": 2}", "", 0);
        let q = out("{\"b\": 2, \"a\": 1}", "", 0);
        assert_eq!(
            rule(&judge(OpKind::InfoJson, &k, &q, P)),
            Some("json-key-order")
        );
        let flipped = out("{\"b\": 3, \"a\": 1}", "", 0);
        assert_eq!(judge(OpKind::InfoJson, &k, &flipped, P), Verdict::Divergent);
    }

    #[test]
    fn disk_size_applies_within_tolerance_only() {
        let k = out("{\"actual-size\": 331776, \"virtual-size\": 1}", "", 0);
        let q = out("{\"actual-size\": 335872, \"virtual-size\": 1}", "", 0);
        assert_eq!(rule(&judge(OpKind::InfoJson, &k, &q, P)), Some("disk-size"));
        let far = out("{\"actual-size\": 9331776, \"virtual-size\": 1}", "", 0);
        assert_eq!(judge(OpKind::InfoJson, &k, &far, P), Verdict::Divergent);
        let other = out("{\"actual-size\": 335872, \"virtual-size\": 2}", "", 0);
        assert_eq!(judge(OpKind::InfoJson, &k, &other, P), Verdict::Divergent);
        let kh = out("image: a\ndisk size: 324 KiB\n", "", 0);
        let qh = out("image: a\ndisk size: 328 KiB\n", "", 0);
        assert_eq!(
            rule(&judge(OpKind::InfoHuman, &kh, &qh, P)),
            Some("disk-size")
        );
        let qh2 = out("image: b\ndisk size: 328 KiB\n", "", 0);
        assert_eq!(judge(OpKind::InfoHuman, &kh, &qh2, P), Verdict::Divergent);
    }

    #[test]
    fn extent_size_hint_only_in_10_0_and_only_that_key() {
        let k = out(
            "{\"format-specific\": {\"type\": \"file\", \"data\": {}}}",
            "",
            0,
        );
        let q = out(
            "{\"format-specific\": {\"type\": \"file\", \"data\": {\"extent-size-hint\": 1048576}}}",
            "",
            0,
        );
        assert_eq!(
            rule(&judge(OpKind::InfoJson, &k, &q, P)),
            Some("extent-size-hint")
        );
        assert_eq!(
            judge(OpKind::InfoJson, &k, &q, Profile::V7_2),
            Verdict::Divergent
        );
        let q2 = out(
            "{\"format-specific\": {\"type\": \"file\", \"data\": {\"extent-size-hint\": 1, \"x\": 2}}}",
            "",
            0,
        );
        assert_eq!(judge(OpKind::InfoJson, &k, &q2, P), Verdict::Divergent);
    }

    #[test]
    fn error_wording_needs_same_exit_code() {
        let k = out("", "kiln: error: a: open: No such file or directory\n", 1);
        let q = out(
            "",
            "qemu-img: Could not open 'a': No such file or directory\n",
            1,
        );
        assert_eq!(
            rule(&judge(OpKind::MapJson, &k, &q, P)),
            Some("error-wording")
        );
        let q2 = out("", "qemu-img: Could not open 'a'\n", 2);
        assert_eq!(judge(OpKind::MapJson, &k, &q2, P), Verdict::Divergent);
        let ok = out("[]\n", "", 0);
        assert_eq!(judge(OpKind::MapJson, &k, &ok, P), Verdict::Divergent);
        // 7.2's size error takes two lines: tolerated against two, not against one.
        let q72 = out(
            "",
            "qemu-img: Invalid image size specified. You may use…\nqemu-img: kilobytes…\n",
            1,
        );
        let k2 = out(
            "",
            "kiln: error: Invalid image size specified. You may use…\nkiln: error: kilobytes, …\n",
            1,
        );
        assert_eq!(
            rule(&judge(OpKind::Produce, &k2, &q72, Profile::V7_2)),
            Some("error-wording")
        );
        let k1 = out("", "kiln: error: Invalid image size specified: '12Q'.\n", 1);
        assert_eq!(
            judge(OpKind::Produce, &k1, &q72, Profile::V7_2),
            Verdict::Divergent
        );
    }

    #[test]
    fn check_detail_lines_need_same_summary() {
        let k = out(
            "\n1 leaked clusters\n",
            "Leaked cluster 5 refcount=1 reference=0\n",
            3,
        );
        let q = out(
            "\n1 leaked clusters\n",
            "Leaked cluster 5 refcount=1 reference=0 \n",
            3,
        );
        assert_eq!(
            rule(&judge(OpKind::Check, &k, &q, P)),
            Some("check-detail-lines")
        );
        let q2 = out(
            "\n2 leaked clusters\n",
            "Leaked cluster 5 refcount=1 reference=0 \n",
            3,
        );
        assert_eq!(judge(OpKind::Check, &k, &q2, P), Verdict::Divergent);
        let q3 = out(
            "\n1 leaked clusters\n",
            "ERROR cluster 5 refcount=1 reference=2\n",
            3,
        );
        assert_eq!(judge(OpKind::Check, &k, &q3, P), Verdict::Divergent);
        assert_ne!(
            rule(&judge(OpKind::MapJson, &k, &q, P)),
            Some("check-detail-lines")
        );
    }

    #[test]
    fn fresh_metadata_layout_only_for_products_and_only_lengths() {
        let info = |len: u64, vsize: u64, actual: u64| {
            out(
                &format!(
                    "{{\"virtual-size\": {vsize}, \"cluster-size\": 65536, \"actual-size\": \
                     {actual}, \"children\": [{{\"name\": \"file\", \"info\": \
                     {{\"virtual-size\": {len}, \"actual-size\": {actual}}}}}]}}"
                ),
                "",
                0,
            )
        };
        let k = info(262144, 1 << 20, 204800);
        let q = info(197120, 1 << 20, 200704);
        assert_eq!(
            rule(&judge(OpKind::ProducedInfo, &k, &q, P)),
            Some("fresh-metadata-layout")
        );
        // Not for an existing image's info, not for a wrong virtual size, not beyond 2 clusters.
        assert_eq!(judge(OpKind::InfoJson, &k, &q, P), Verdict::Divergent);
        let wrong = info(197120, 2 << 20, 200704);
        assert_eq!(
            judge(OpKind::ProducedInfo, &k, &wrong, P),
            Verdict::Divergent
        );
        let far = info(197120 + 3 * 65536 + 65024, 1 << 20, 200704);
        assert_eq!(judge(OpKind::ProducedInfo, &k, &far, P), Verdict::Divergent);

        let check = |end: u64, leaks: u64| {
            out(
                &format!(
                    "{{\"image-end-offset\": {end}, \"leaks\": {leaks}, \"check-errors\": 0}}"
                ),
                "",
                0,
            )
        };
        assert_eq!(
            rule(&judge(
                OpKind::ProducedCheck,
                &check(262144, 0),
                &check(196616, 0),
                P
            )),
            Some("fresh-metadata-layout")
        );
        assert_eq!(
            judge(
                OpKind::ProducedCheck,
                &check(262144, 1),
                &check(196616, 0),
                P
            ),
            Verdict::Divergent
        );
        assert_eq!(
            judge(
                OpKind::ProducedCheck,
                &check(9 << 20, 0),
                &check(196616, 0),
                P
            ),
            Verdict::Divergent
        );
        let size = |len: u64, actual: u64| {
            out(
                &format!("{{\"length\": {len}, \"actual-size\": {actual}}}"),
                "",
                0,
            )
        };
        assert_eq!(
            rule(&judge(
                OpKind::ProducedSize,
                &size(262144, 204800),
                &size(196616, 200704),
                P
            )),
            Some("fresh-metadata-layout")
        );
        // A product with far more allocated (e.g. zeroes written out) is caught.
        assert_eq!(
            judge(
                OpKind::ProducedSize,
                &size(67108864, 67108864),
                &size(67108864, 3153920),
                P
            ),
            Verdict::Divergent
        );
    }

    #[test]
    fn flipped_data_byte_is_caught() {
        let k = out("Content mismatch at offset 512!\n", "", 1);
        let q = out("Images are identical.\n", "", 0);
        assert_eq!(judge(OpKind::Compare, &k, &q, P), Verdict::Divergent);
    }

    #[test]
    fn unsupported_is_its_own_class() {
        let k = out("", "kiln: error: x.qcow2: unsupported (extended L2)\n", 1);
        let q = out("[]\n", "", 0);
        assert_eq!(
            judge(OpKind::MapJson, &k, &q, P),
            Verdict::Unsupported("extended L2".into())
        );
    }
}
