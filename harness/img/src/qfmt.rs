//! Printing exactly like qemu-img: its pretty JSON (QObject layout and QDict key order) and its
//! human-readable sizes (`size_to_str`, "%0.3g").
//!
//! qemu-img emits JSON objects in the iteration order of QEMU's QDict hash table, not in schema
//! order; reproducing that order makes kiln's output byte-identical instead of "equal after
//! sorting", which keeps the differential report quiet.

use serde_json::Value;

const QDICT_BUCKETS: u32 = 512;

/// QEMU's `tdb_hash` reduced to a QDict bucket index.
pub fn qdict_bucket(name: &str) -> u32 {
    let bytes = name.as_bytes();
    let mut value = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &c) in bytes.iter().enumerate() {
        value = value.wrapping_add(u32::from(c) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % QDICT_BUCKETS
}

/// QAPI schema order of the members qemu-img emits; within one bucket QDict lists the member
/// inserted last first, so the later a key is here the earlier it prints among equals.
const QAPI_ORDER: &[&str] = &[
    "filename",
    "format",
    "dirty-flag",
    "actual-size",
    "virtual-size",
    "cluster-size",
    "encrypted",
    "compressed",
    "backing-filename",
    "full-backing-filename",
    "backing-filename-format",
    "snapshots",
    "format-specific",
    "backing-image",
    "children",
];

fn insertion_rank(key: &str) -> usize {
    QAPI_ORDER
        .iter()
        .position(|k| *k == key)
        .unwrap_or(QAPI_ORDER.len())
}

/// The keys of an object in the order qemu-img prints them.
pub fn qdict_order<'a>(keys: impl Iterator<Item = &'a String>) -> Vec<&'a String> {
    let mut v: Vec<&String> = keys.collect();
    v.sort_by(|a, b| {
        qdict_bucket(a)
            .cmp(&qdict_bucket(b))
            .then_with(|| insertion_rank(b).cmp(&insertion_rank(a)))
            .then_with(|| a.cmp(b))
    });
    v
}

/// `value` as `qobject_to_json_pretty` writes it (4-space indent, QDict key order).
pub fn to_qemu_json(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value, 0);
    out
}

fn indent(out: &mut String, level: usize) {
    out.push('\n');
    for _ in 0..level {
        out.push_str("    ");
    }
}

fn write_value(out: &mut String, value: &Value, level: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, level + 1);
                write_value(out, item, level + 1);
            }
            indent(out, level);
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, key) in qdict_order(map.keys()).into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, level + 1);
                write_string(out, key);
                out.push_str(": ");
                if let Some(v) = map.get(key) {
                    write_value(out, v, level + 1);
                }
            }
            indent(out, level);
            out.push('}');
        }
    }
}

/// QEMU's JSON string quoting: control and non-ASCII characters as `\uXXXX` (upper-case hex).
fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || (c as u32) >= 0x7f => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{:04X}", u));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// C's `printf("%0.3g", v)` for the non-negative finite values sizes produce.
pub fn fmt_g3(v: f64) -> String {
    if v == 0.0 {
        return "0".to_string();
    }
    // The exponent after rounding to 3 significant digits decides fixed vs. exponent form.
    let e_form = format!("{v:.2e}");
    let exp: i32 = e_form
        .split('e')
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0);
    if !(-4..3).contains(&exp) {
        let (mant, _) = e_form.split_once('e').unwrap_or((&e_form, ""));
        let mant = strip_zeros(mant);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mant}e{sign}{:02}", exp.abs());
    }
    let prec = (2 - exp).max(0) as usize;
    strip_zeros(&format!("{v:.prec$}")).to_string()
}

fn strip_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// QEMU's `size_to_str`: "2 MiB", "28.5 KiB", "0.977 KiB".
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // frexp(val / (1000/1024)) exponent, minus one, in steps of 10 bits.
    let scaled = val as f64 / (1000.0 / 1024.0);
    let exp = if scaled == 0.0 {
        0
    } else {
        scaled.log2().floor() as i32 + 1
    };
    let i = ((exp - 1) / 10).clamp(0, 6) as usize;
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", fmt_g3(val as f64 / div), SUFFIXES[i])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sizes_match_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(4096), "4 KiB");
        assert_eq!(size_to_str(29184), "28.5 KiB");
        assert_eq!(size_to_str(331776), "324 KiB");
        assert_eq!(size_to_str(2097152), "2 MiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(1_572_864), "1.5 MiB");
        assert_eq!(size_to_str(200704), "196 KiB");
    }

    #[test]
    fn keys_follow_qdict_order() {
        let keys: Vec<String> = [
            "dirty-flag",
            "filename",
            "virtual-size",
            "format",
            "children",
            "backing-filename-format",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let order: Vec<&str> = qdict_order(keys.iter())
            .iter()
            .map(|s| s.as_str())
            .collect();
        assert_eq!(
            order,
            [
                "children",
                "backing-filename-format",
                "virtual-size",
                "filename",
                "format",
                "dirty-flag"
            ]
        );
    }

    #[test]
    fn pretty_json_layout_matches_qemu() {
        let v = json!({"children": [], "format-specific": {"type": "file", "data": {}}});
        assert_eq!(
            to_qemu_json(&v),
            "{\n    \"children\": [\n    ],\n    \"format-specific\": {\n        \"type\": \"file\",\n        \"data\": {\n        }\n    }\n}"
        );
        assert_eq!(to_qemu_json(&json!("a\"é\n")), "\"a\\\"\\u00E9\\n\"");
    }
}
