//! `kiln img info`: qemu-img's ImageInfo (7.2) / BlockGraphInfo (8.0+) in JSON and text.

use std::fmt::Write as _;

use serde_json::{json, Map, Value};

use super::chain::{Format, Layer};
use super::qfmt::{size_to_str, to_qemu_json};
use super::Profile;

/// The `format-specific` data of a qcow2 layer (the same dict feeds text and JSON).
fn qcow2_specific(layer: &Layer) -> Option<Map<String, Value>> {
    let h = layer.header()?;
    let mut d = Map::new();
    d.insert("compat".into(), json!(h.compat()));
    d.insert("compression-type".into(), json!(h.compression.name()));
    d.insert("refcount-bits".into(), json!(h.refcount_bits()));
    if h.version >= 3 {
        d.insert("lazy-refcounts".into(), json!(h.lazy_refcounts()));
        d.insert("corrupt".into(), json!(h.corrupt()));
        d.insert("extended-l2".into(), json!(h.extended_l2()));
        if let Some(df) = &h.data_file {
            d.insert("data-file".into(), json!(df));
            d.insert("data-file-raw".into(), json!(h.data_file_raw()));
        }
    }
    Some(d)
}

/// The per-image object qemu-img prints (without `children`).
fn image_json(layer: &Layer) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("filename".into(), json!(layer.name));
    m.insert("format".into(), json!(layer.format.name()));
    m.insert("virtual-size".into(), json!(layer.virtual_size()));
    if let Some(a) = layer.actual_size {
        m.insert("actual-size".into(), json!(a));
    }
    let dirty = layer.header().is_some_and(|h| h.dirty());
    m.insert("dirty-flag".into(), json!(dirty));
    if let Some(h) = layer.header() {
        m.insert("cluster-size".into(), json!(h.cluster_size()));
        if h.encrypted() {
            m.insert("encrypted".into(), json!(true));
        }
        if let Some(b) = &h.backing_file {
            m.insert("backing-filename".into(), json!(b));
            if let Some(full) = layer.full_backing_name() {
                m.insert("full-backing-filename".into(), json!(full));
            }
            if let Some(f) = &h.backing_format {
                m.insert("backing-filename-format".into(), json!(f));
            }
        }
    }
    if let Some(spec) = qcow2_specific(layer) {
        m.insert(
            "format-specific".into(),
            json!({"type": "qcow2", "data": Value::Object(spec)}),
        );
    }
    m
}

/// The protocol (`file`) child node 8.0+ reports under `children`.
fn file_child_json(layer: &Layer) -> Value {
    let mut m = Map::new();
    m.insert("children".into(), json!([]));
    m.insert("virtual-size".into(), json!(layer.sector_len()));
    m.insert("filename".into(), json!(layer.name));
    m.insert("format".into(), json!("file"));
    if let Some(a) = layer.actual_size {
        m.insert("actual-size".into(), json!(a));
    }
    m.insert(
        "format-specific".into(),
        json!({"type": "file", "data": {}}),
    );
    m.insert("dirty-flag".into(), json!(false));
    json!({"name": "file", "info": Value::Object(m)})
}

/// One layer's info as a JSON value for `profile`.
pub fn layer_json(layer: &Layer, profile: Profile) -> Value {
    let mut m = image_json(layer);
    if profile.has_child_nodes() {
        m.insert("children".into(), json!([file_child_json(layer)]));
    }
    Value::Object(m)
}

/// `qemu-img info --output=json` for the layers (an array with `--backing-chain`).
pub fn render_json(layers: &[Layer], chain: bool, profile: Profile) -> String {
    let v = if chain {
        Value::Array(layers.iter().map(|l| layer_json(l, profile)).collect())
    } else {
        layers
            .first()
            .map_or(Value::Null, |l| layer_json(l, profile))
    };
    let mut s = to_qemu_json(&v);
    s.push('\n');
    s
}

/// Writes a format-specific dict as qemu-img's `dump_qdict`: keys with '-' → ' '.
fn dump_dict(out: &mut String, d: &Map<String, Value>, level: usize) {
    let keys: Vec<&String> = super::qfmt::qdict_order(d.keys());
    for k in keys {
        let name = k.replace('-', " ");
        let pad = "    ".repeat(level);
        match d.get(k) {
            Some(Value::Object(inner)) => {
                let _ = writeln!(out, "{pad}{name}:");
                dump_dict(out, inner, level + 1);
            }
            Some(Value::String(s)) => {
                let _ = writeln!(out, "{pad}{name}: {s}");
            }
            Some(v) => {
                let _ = writeln!(out, "{pad}{name}: {v}");
            }
            None => {}
        }
    }
}

fn human_layer(out: &mut String, layer: &Layer, profile: Profile) {
    let disk = layer
        .actual_size
        .map_or_else(|| "unavailable".to_string(), size_to_str);
    let vs = layer.virtual_size();
    let _ = write!(
        out,
        "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\ndisk size: {}\n",
        layer.name,
        layer.format.name(),
        size_to_str(vs),
        vs,
        disk
    );
    if let Some(h) = layer.header() {
        if h.encrypted() {
            out.push_str("encrypted: yes\n");
        }
        let _ = writeln!(out, "cluster_size: {}", h.cluster_size());
        if h.dirty() {
            out.push_str("cleanly shut down: no\n");
        }
        if let Some(b) = &h.backing_file {
            let _ = write!(out, "backing file: {b}");
            if let Some(full) = layer.full_backing_name().filter(|f| f != b) {
                let _ = write!(out, " (actual path: {full})");
            }
            out.push('\n');
            if let Some(f) = &h.backing_format {
                let _ = writeln!(out, "backing file format: {f}");
            }
        }
    }
    if let Some(spec) = qcow2_specific(layer) {
        out.push_str("Format specific information:\n");
        dump_dict(out, &spec, 1);
    }
    if profile.has_child_nodes() {
        let _ = write!(
            out,
            "Child node '/file':\n    filename: {}\n    protocol type: file\n    file length: {} \
             ({} bytes)\n    disk size: {}\n",
            layer.name,
            size_to_str(layer.sector_len()),
            layer.sector_len(),
            disk
        );
    }
}

/// `qemu-img info` text; with `--backing-chain` the images are separated by a blank line.
pub fn render_human(layers: &[Layer], chain: bool, profile: Profile) -> String {
    let mut out = String::new();
    let n = if chain { layers.len() } else { 1 };
    for (i, layer) in layers.iter().take(n).enumerate() {
        if i > 0 {
            out.push('\n');
        }
        human_layer(&mut out, layer, profile);
    }
    out
}

/// True when the layer's format is raw (no header to describe).
pub fn is_raw(layer: &Layer) -> bool {
    matches!(layer.format, Format::Raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_disk::qcow2::{Compression, Qcow2Header};

    pub(crate) fn sample_layer(backing: bool) -> Layer {
        let h = Qcow2Header {
            version: 3,
            cluster_bits: 16,
            size: 2 << 20,
            crypt_method: 0,
            l1_size: 1,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 112,
            compression: Compression::Zlib,
            backing_file: backing.then(|| "base.qcow2".to_string()),
            backing_format: backing.then(|| "qcow2".to_string()),
            data_file: None,
            has_bitmaps_extension: false,
        };
        Layer {
            name: "top.qcow2".into(),
            format: Format::Qcow2(Box::new(h)),
            file_len: 393216,
            actual_size: Some(331776),
        }
    }

    /// Captured from qemu-img 10.0.2 (`qemu-img info top.qcow2`).
    const GOLDEN_HUMAN_10: &str = "image: top.qcow2
file format: qcow2
virtual size: 2 MiB (2097152 bytes)
disk size: 324 KiB
cluster_size: 65536
backing file: base.qcow2
backing file format: qcow2
Format specific information:
    compat: 1.1
    compression type: zlib
    lazy refcounts: false
    refcount bits: 16
    corrupt: false
    extended l2: false
Child node '/file':
    filename: top.qcow2
    protocol type: file
    file length: 384 KiB (393216 bytes)
    disk size: 324 KiB
";

    #[test]
    fn human_golden_per_profile() {
        let l = sample_layer(true);
        assert_eq!(
            render_human(std::slice::from_ref(&l), false, Profile::V10_0),
            GOLDEN_HUMAN_10
        );
        // 7.2 (block/qapi.c at v7.2.0) has no protocol child section; everything before it is
        // the same layout.
        let cut = GOLDEN_HUMAN_10
            .find("Child node")
            .expect("golden has the child section");
        assert_eq!(
            render_human(&[l], false, Profile::V7_2),
            &GOLDEN_HUMAN_10[..cut]
        );
    }

    /// Captured from qemu-img 10.0.2 (`qemu-img info --output=json top.qcow2`, dirty-flag last).
    const GOLDEN_JSON_10: &str = r#"{
    "children": [
        {
            "name": "file",
            "info": {
                "children": [
                ],
                "virtual-size": 393216,
                "filename": "top.qcow2",
                "format": "file",
                "actual-size": 331776,
                "format-specific": {
                    "type": "file",
                    "data": {
                    }
                },
                "dirty-flag": false
            }
        }
    ],
    "backing-filename-format": "qcow2",
    "virtual-size": 2097152,
    "filename": "top.qcow2",
    "cluster-size": 65536,
    "format": "qcow2",
    "actual-size": 331776,
    "format-specific": {
        "type": "qcow2",
        "data": {
            "compat": "1.1",
            "compression-type": "zlib",
            "lazy-refcounts": false,
            "refcount-bits": 16,
            "corrupt": false,
            "extended-l2": false
        }
    },
    "full-backing-filename": "base.qcow2",
    "backing-filename": "base.qcow2",
    "dirty-flag": false
}
"#;

    /// The 7.2 shape (ImageInfo, no `children`; QDict order is the same hash order).
    const GOLDEN_JSON_7_2: &str = r#"{
    "backing-filename-format": "qcow2",
    "virtual-size": 2097152,
    "filename": "top.qcow2",
    "cluster-size": 65536,
    "format": "qcow2",
    "actual-size": 331776,
    "format-specific": {
        "type": "qcow2",
        "data": {
            "compat": "1.1",
            "compression-type": "zlib",
            "lazy-refcounts": false,
            "refcount-bits": 16,
            "corrupt": false,
            "extended-l2": false
        }
    },
    "full-backing-filename": "base.qcow2",
    "backing-filename": "base.qcow2",
    "dirty-flag": false
}
"#;

    #[test]
    fn json_golden_per_profile() {
        let l = sample_layer(true);
        assert_eq!(
            render_json(std::slice::from_ref(&l), false, Profile::V10_0),
            GOLDEN_JSON_10
        );
        assert_eq!(render_json(&[l], false, Profile::V7_2), GOLDEN_JSON_7_2);
    }

    #[test]
    fn compat_0_10_lists_only_its_fields() {
        let mut l = sample_layer(false);
        if let Format::Qcow2(h) = &mut l.format {
            h.version = 2;
        }
        let text = render_human(&[l], false, Profile::V7_2);
        assert!(text.ends_with(
            "Format specific information:\n    compat: 0.10\n    compression type: zlib\n    \
             refcount bits: 16\n"
        ));
    }
}
