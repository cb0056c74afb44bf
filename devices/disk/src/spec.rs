//! Disk specs, `PATH[,ro][,overlay=PATH][,in-place]`: an image and how to attach it, as a user
//! writes it (`kiln boot --disk` takes one per disk).

use std::path::PathBuf;
use std::str::FromStr;

use crate::error::DiskError;

/// How a disk image is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskMode {
    /// Default: writes go to a fresh qcow2 overlay in a temp dir, deleted afterwards; the image
    /// is opened read-only and never written.
    EphemeralOverlay,
    /// `overlay=PATH`: like the default, but the overlay is created at PATH (which must not
    /// exist) and kept, for inspection with `qemu-img`/`kiln img`.
    KeptOverlay(PathBuf),
    /// `ro`: the image itself as a read-only device (VIRTIO_BLK_F_RO).
    ReadOnly,
    /// `in-place`: the guest writes the image itself (raw or qcow2). Opt-in, since it is the
    /// one mode that modifies the user's file.
    InPlace,
}

/// One disk spec: the image and how to attach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The image (the base of an overlay); raw or qcow2, detected from its header.
    pub path: PathBuf,
    /// How it is attached.
    pub mode: DiskMode,
}

impl DiskSpec {
    /// A disk with an ephemeral copy-on-write overlay over `path` (the default).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            mode: DiskMode::EphemeralOverlay,
        }
    }
}

const OPTIONS_HELP: &str = "expected PATH[,ro][,overlay=PATH][,in-place]";

impl FromStr for DiskSpec {
    type Err = DiskError;

    /// Parses `PATH[,ro][,overlay=PATH][,in-place]`; a literal comma in a path is written `,,`.
    fn from_str(s: &str) -> Result<Self, DiskError> {
        let bad = |reason: String| DiskError::BadSpec {
            spec: s.to_string(),
            reason,
        };
        let mut parts = split_escaped(s).into_iter();
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(bad(format!("empty image path ({OPTIONS_HELP})")));
        }
        let mut mode: Option<(String, DiskMode)> = None;
        for opt in parts {
            let next = match opt.as_str() {
                "ro" => DiskMode::ReadOnly,
                "in-place" => DiskMode::InPlace,
                o if o.starts_with("overlay=") => {
                    let p = &o["overlay=".len()..];
                    if p.is_empty() {
                        return Err(bad("overlay= needs a path".to_string()));
                    }
                    DiskMode::KeptOverlay(PathBuf::from(p))
                }
                o => return Err(bad(format!("unknown option {o:?} ({OPTIONS_HELP})"))),
            };
            if let Some((prev, _)) = &mode {
                return Err(bad(format!(
                    "{prev:?} and {opt:?} conflict: choose one of ro, overlay=PATH, in-place"
                )));
            }
            mode = Some((opt, next));
        }
        Ok(DiskSpec {
            path: PathBuf::from(path),
            mode: mode.map_or(DiskMode::EphemeralOverlay, |(_, m)| m),
        })
    }
}

/// Splits at single commas; `,,` stands for a literal comma.
fn split_escaped(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != ',' {
            current.push(c);
        } else if chars.peek() == Some(&',') {
            chars.next();
            current.push(',');
        } else {
            parts.push(std::mem::take(&mut current));
        }
    }
    parts.push(current);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::assert_message;

    fn parse(s: &str) -> Result<DiskSpec, DiskError> {
        s.parse()
    }

    fn mode(s: &str) -> DiskMode {
        parse(s).unwrap().mode
    }

    #[test]
    fn parse_modes() {
        assert_eq!(parse("a.img").unwrap(), DiskSpec::new("a.img"));
        assert_eq!(mode("a.img,ro"), DiskMode::ReadOnly);
        assert_eq!(mode("a.img,in-place"), DiskMode::InPlace);
        assert_eq!(
            mode("a.img,overlay=/tmp/o.qcow2"),
            DiskMode::KeptOverlay("/tmp/o.qcow2".into())
        );
        let spec = parse("dir,,x/a.img,overlay=o,,1.qcow2").unwrap();
        assert_eq!(spec.path, PathBuf::from("dir,x/a.img"));
        assert_eq!(spec.mode, DiskMode::KeptOverlay("o,1.qcow2".into()));
    }

    #[test]
    fn parse_errors() {
        for (s, needle) in [
            ("", "empty image path"),
            (",ro", "empty image path"),
            ("a.img,rw", "unknown option \"rw\""),
            ("a.img,", "unknown option \"\""),
            ("a.img,overlay=", "overlay= needs a path"),
            ("a.img,ro,in-place", "conflict"),
            ("a.img,ro,overlay=o", "conflict"),
            ("a.img,overlay=o,overlay=p", "conflict"),
        ] {
            assert_message(&parse(s).unwrap_err(), &format!("{s:?}"), needle);
        }
    }
}
