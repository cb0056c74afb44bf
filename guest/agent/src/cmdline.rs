//! The agent's options on the kernel command line (`/proc/cmdline`):
//! `kiln.share=<tag>:<mountpoint>[:ro|:rw]`, `kiln.marker=<text>` (repeatable) and
//! `kiln.files=<dir>[,<dir>...]` (roots put/get may touch; `/` when absent).

use std::path::PathBuf;

/// A file-system share to mount at boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// The virtiofs / 9p mount tag.
    pub tag: String,
    /// Where to mount it (absolute).
    pub mountpoint: PathBuf,
    /// Mount read-only.
    pub read_only: bool,
}

/// Everything the agent takes from the kernel command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootOptions {
    /// Shares to mount, in command-line order.
    pub shares: Vec<Share>,
    /// User markers to print after the readiness record.
    pub markers: Vec<String>,
    /// Roots for put/get; empty means `/`.
    pub file_roots: Vec<PathBuf>,
}

/// Parse the command line; malformed kiln options are skipped with a warning each.
pub fn parse(cmdline: &str) -> (BootOptions, Vec<String>) {
    let mut options = BootOptions::default();
    let mut warnings = Vec::new();
    for word in split_words(cmdline) {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        match key {
            "kiln.share" => match parse_share(value) {
                Some(share) => options.shares.push(share),
                None => warnings.push(format!(
                    "ignoring kiln.share={value:?}: expected <tag>:<absolute mountpoint>[:ro|:rw]"
                )),
            },
            "kiln.marker" => options.markers.push(value.to_owned()),
            "kiln.files" => options.file_roots.extend(
                value
                    .split(',')
                    .filter(|d| !d.is_empty())
                    .map(PathBuf::from),
            ),
            _ => {}
        }
    }
    (options, warnings)
}

fn parse_share(value: &str) -> Option<Share> {
    let mut parts = value.split(':');
    let tag = parts.next().filter(|t| !t.is_empty())?;
    let mountpoint = parts.next().filter(|m| m.starts_with('/'))?;
    let read_only = match parts.next() {
        None | Some("rw") => false,
        Some("ro") => true,
        Some(_) => return None,
    };
    if parts.next().is_some() {
        return None;
    }
    Some(Share {
        tag: tag.to_owned(),
        mountpoint: PathBuf::from(mountpoint),
        read_only,
    })
}

/// Split like the kernel does: on whitespace, except inside double quotes, which are removed
/// (`kiln.marker="two words"` and `"kiln.marker=two words"` both give `kiln.marker=two words`).
pub fn split_words(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    let mut quoted = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut current));
                    in_word = false;
                }
            }
            c => {
                current.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(current);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_on_whitespace_and_respect_quotes() {
        assert_eq!(
            split_words("console=ttyS0  kiln.marker=\"a b\" \"x=y z\"\n"),
            vec!["console=ttyS0", "kiln.marker=a b", "x=y z"]
        );
        assert!(split_words("   ").is_empty());
    }

    #[test]
    fn kiln_options_are_collected_in_order() {
        let (options, warnings) = parse(
            "ro kiln.share=fixtures:/fixtures kiln.marker=one kiln.share=src:/src:ro \
             kiln.marker=\"two words\" kiln.files=/tmp,/fixtures quiet",
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            options.shares,
            vec![
                Share {
                    tag: "fixtures".into(),
                    mountpoint: "/fixtures".into(),
                    read_only: false
                },
                Share {
                    tag: "src".into(),
                    mountpoint: "/src".into(),
                    read_only: true
                },
            ]
        );
        assert_eq!(options.markers, vec!["one", "two words"]);
        assert_eq!(
            options.file_roots,
            vec![PathBuf::from("/tmp"), PathBuf::from("/fixtures")]
        );
    }

    #[test]
    fn malformed_shares_are_skipped_with_a_warning() {
        let (options, warnings) = parse(
            "kiln.share=nomount kiln.share=:/x kiln.share=t:rel kiln.share=t:/m:rx kiln.share=t:/m:ro:x",
        );
        assert!(options.shares.is_empty());
        assert_eq!(warnings.len(), 5, "{warnings:?}");
        assert!(
            warnings[0].contains("kiln.share=\"nomount\""),
            "{}",
            warnings[0]
        );
    }
}
