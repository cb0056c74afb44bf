//! qemu-img's create options: sizes with suffixes (QEMU 10.0's `qemu_strtosz`), `-o key=value,…`
//! lists, and the "Formatting '…'" line `qemu-img create` prints.

use std::fmt;

use super::Profile;

/// The largest image size qemu-img accepts (`INT64_MAX`).
pub const MAX_SIZE: u64 = i64::MAX as u64;

/// Why a size string was refused; `Display` is qemu-img's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeError {
    /// Not a size at all ("1e3", "1kB", "0x1k", "1.5").
    Invalid(String),
    /// Negative or above [`MAX_SIZE`].
    Range,
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SizeError::Invalid(s) => write!(f, "Invalid image size specified: '{s}'."),
            SizeError::Range => write!(
                f,
                "Invalid image size specified. Must be between 0 and {MAX_SIZE}."
            ),
        }
    }
}

impl SizeError {
    /// qemu-img's message in `profile`. 7.2 answers every size it cannot parse with the same
    /// two lines (qemu-img.c's `cvtnum` of its day), where 10.0 names the value.
    pub fn message(&self, profile: Profile) -> String {
        match (self, profile) {
            (SizeError::Invalid(_), Profile::V7_2) => "Invalid image size specified. You may use \
                 k, M, G, T, P or E suffixes for\nkilobytes, megabytes, gigabytes, terabytes, \
                 petabytes and exabytes."
                .to_string(),
            _ => self.to_string(),
        }
    }
}

fn suffix_mul(c: u8) -> Option<u64> {
    Some(match c.to_ascii_uppercase() {
        b'B' => 1,
        b'K' => 1 << 10,
        b'M' => 1 << 20,
        b'G' => 1 << 30,
        b'T' => 1 << 40,
        b'P' => 1 << 50,
        b'E' => 1 << 60,
        _ => return None,
    })
}

/// Parses a byte count without the image-size range check: decimal with an optional fraction
/// and one suffix of B K M G T P E (any case), or bare hex (`0x…`, no suffix, no fraction);
/// leading whitespace and `+` allowed, nothing after the suffix. Fractions round to the nearest
/// byte and need a suffix above B, as in QEMU 10.0; Debian's 7.2.22 gives the same bytes for
/// "1.7k" (1741), though not for fractions past double precision ("1.9999999999999999999k":
/// 1024 there, 2048 in 10.0 and here).
pub fn parse_bytes(s: &str) -> Result<u64, SizeError> {
    let invalid = || SizeError::Invalid(s.to_string());
    let t = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    if let Some(digits) = t.strip_prefix('-') {
        // strtoull accepts "-0" and qemu_strtosz turns the sign into a range error.
        return if digits.starts_with(|c: char| c.is_ascii_digit() || c == '.') {
            Err(SizeError::Range)
        } else {
            Err(invalid())
        };
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid());
        }
        return u64::from_str_radix(hex, 16).map_err(|_| SizeError::Range);
    }
    let int_len = t.bytes().take_while(u8::is_ascii_digit).count();
    let (int, rest) = t.split_at(int_len);
    let (frac, rest) = match rest.strip_prefix('.') {
        Some(r) => {
            let n = r.bytes().take_while(u8::is_ascii_digit).count();
            r.split_at(n)
        }
        None => ("", rest),
    };
    if int.is_empty() && frac.is_empty() {
        return Err(invalid());
    }
    let mul = match rest.as_bytes() {
        [] => 1,
        [c] => suffix_mul(*c).ok_or_else(invalid)?,
        _ => return Err(invalid()),
    };
    let val: u64 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| SizeError::Range)?
    };
    let frac_nonzero = frac.bytes().any(|b| b != b'0');
    if frac_nonzero && mul == 1 {
        return Err(invalid());
    }
    // The fraction to 18 digits is exact enough for any suffix (E is 2^60 < 10^19).
    let digits = &frac[..frac.len().min(18)];
    let scale = 10u128.pow(digits.len() as u32);
    let num: u128 = if digits.is_empty() {
        0
    } else {
        digits.parse().map_err(|_| invalid())?
    };
    let frac_bytes = (num * u128::from(mul) * 2 + scale) / (2 * scale);
    let total = u128::from(val) * u128::from(mul) + frac_bytes;
    u64::try_from(total).map_err(|_| SizeError::Range)
}

/// An image size as qemu-img of `profile` reads it: [`parse_size`], except that 7.2 refuses a
/// negative size ("-0" too) and a fraction with no integer part (".5k") as unparsable, where
/// 10.0 calls the first out of range and accepts the second (both checked against Debian's
/// 7.2.22 and 10.0.2).
pub fn parse_size_in(s: &str, profile: Profile) -> Result<u64, SizeError> {
    if profile == Profile::V7_2 {
        let t = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
        let t = t.strip_prefix('+').unwrap_or(t);
        if t.starts_with(['-', '.']) {
            return Err(SizeError::Invalid(s.to_string()));
        }
    }
    parse_size(s)
}

/// An image size: [`parse_bytes`] limited to `0..=INT64_MAX`.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let n = parse_bytes(s)?;
    if n > MAX_SIZE {
        return Err(SizeError::Range);
    }
    Ok(n)
}

/// The image formats `kiln img create/convert` write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImgFormat {
    Raw,
    Qcow2,
}

impl ImgFormat {
    /// "raw" / "qcow2"; anything else is `None`.
    pub fn parse(s: &str) -> Option<ImgFormat> {
        match s {
            "raw" => Some(ImgFormat::Raw),
            "qcow2" => Some(ImgFormat::Qcow2),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            ImgFormat::Raw => "raw",
            ImgFormat::Qcow2 => "qcow2",
        }
    }
}

/// `-o` options as qemu-img holds them: the last value of each key wins; `compat` and
/// `lazy_refcounts` are echoed as written, sizes and numbers normalized.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateOpts {
    pub size: Option<u64>,
    pub backing_file: Option<String>,
    pub backing_fmt: Option<String>,
    pub cluster_size: Option<u64>,
    pub compat: Option<String>,
    pub lazy_refcounts: Option<(String, bool)>,
    pub refcount_bits: Option<u64>,
    pub extended_l2: Option<(String, bool)>,
    pub compression_type: Option<String>,
    pub preallocation: Option<String>,
}

/// A `-o` option qemu-img would refuse, in its words (without the file name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptError {
    /// No such option for this format.
    #[error("Invalid parameter '{0}'")]
    Invalid(String),
    /// A boolean option with another value.
    #[error("Parameter '{0}' expects 'on' or 'off'")]
    NotABool(String),
    /// A size option that is not a size.
    #[error(
        "Parameter '{0}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, \
         P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
    )]
    NotASize(String),
    /// A number option that is not a number.
    #[error("Parameter '{0}' expects a number")]
    NotANumber(String),
}

/// QEMU's boolean option spellings.
fn parse_bool(key: &str, v: &str) -> Result<(String, bool), OptError> {
    match v {
        "on" | "yes" | "true" | "y" => Ok((v.to_string(), true)),
        "off" | "no" | "false" | "n" => Ok((v.to_string(), false)),
        _ => Err(OptError::NotABool(key.into())),
    }
}

/// Splits "a=1,b=2" with QEMU's `,,` escape for a literal comma.
fn split_opts(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

impl CreateOpts {
    /// Adds one `-o` argument for `fmt`. Errors are qemu-img's messages (without the file name).
    pub fn add(&mut self, fmt: ImgFormat, arg: &str) -> Result<(), OptError> {
        for item in split_opts(arg) {
            if item.is_empty() {
                continue;
            }
            let (key, value) = item.split_once('=').unwrap_or((item.as_str(), ""));
            let qcow2_only = !matches!(key, "size" | "preallocation");
            if fmt == ImgFormat::Raw && qcow2_only {
                return Err(OptError::Invalid(key.into()));
            }
            let size = |v: &str| parse_bytes(v).map_err(|_| OptError::NotASize(key.into()));
            match key {
                "size" => self.size = Some(size(value)?),
                "cluster_size" => self.cluster_size = Some(size(value)?),
                "backing_file" => self.backing_file = Some(value.to_string()),
                "backing_fmt" => self.backing_fmt = Some(value.to_string()),
                "compat" => self.compat = Some(value.to_string()),
                "lazy_refcounts" => self.lazy_refcounts = Some(parse_bool(key, value)?),
                "extended_l2" => self.extended_l2 = Some(parse_bool(key, value)?),
                "refcount_bits" => {
                    let n = value
                        .parse::<u64>()
                        .map_err(|_| OptError::NotANumber(key.into()))?;
                    self.refcount_bits = Some(n);
                }
                "compression_type" => self.compression_type = Some(value.to_string()),
                "preallocation" => self.preallocation = Some(value.to_string()),
                _ => return Err(OptError::Invalid(key.into())),
            }
        }
        Ok(())
    }

    /// The line `qemu-img create` prints before creating (without the trailing newline); the
    /// order is that of QEMU's merged option list, the same in 7.2 and 10.0.
    pub fn formatting_line(&self, file: &str, fmt: ImgFormat, size: u64) -> String {
        let mut s = format!("Formatting '{file}', fmt={}", fmt.name());
        let mut push = |k: &str, v: &str| s.push_str(&format!(" {k}={v}"));
        match fmt {
            ImgFormat::Raw => {
                push("size", &size.to_string());
                if let Some(p) = &self.preallocation {
                    push("preallocation", p);
                }
            }
            ImgFormat::Qcow2 => {
                push(
                    "cluster_size",
                    &self.cluster_size.unwrap_or(65536).to_string(),
                );
                push(
                    "extended_l2",
                    self.extended_l2.as_ref().map_or("off", |(v, _)| v),
                );
                if let Some(p) = &self.preallocation {
                    push("preallocation", p);
                }
                push(
                    "compression_type",
                    self.compression_type.as_deref().unwrap_or("zlib"),
                );
                push("size", &size.to_string());
                if let Some(c) = &self.compat {
                    push("compat", c);
                }
                if let Some(b) = &self.backing_file {
                    push("backing_file", b);
                }
                if let Some(b) = &self.backing_fmt {
                    push("backing_fmt", b);
                }
                push(
                    "lazy_refcounts",
                    self.lazy_refcounts.as_ref().map_or("off", |(v, _)| v),
                );
                push(
                    "refcount_bits",
                    &self.refcount_bits.unwrap_or(16).to_string(),
                );
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_qemu_img_10() {
        let ok = [
            ("1000", 1000),
            ("1k", 1024),
            ("1K", 1024),
            ("1.5k", 1536),
            ("1b", 1),
            ("1B", 1),
            ("2P", 1 << 51),
            ("0", 0),
            ("0x100", 256),
            ("0x10B", 267),
            ("0X10", 16),
            (" 1M", 1 << 20),
            (" +1k", 1024),
            ("01M", 1 << 20),
            ("010", 10),
            ("1m", 1 << 20),
            ("1g", 1 << 30),
            ("1t", 1 << 40),
            ("1.k", 1024),
            (".5k", 512),
            ("1.0001k", 1024),
            ("1.7k", 1741),
            ("1.0", 1),
            ("1.b", 1),
            ("1.", 1),
            ("9223372036854775807", MAX_SIZE),
        ];
        for (s, want) in ok {
            assert_eq!(parse_size(s), Ok(want), "{s:?}");
        }
        for s in [
            "1e3", "1kB", "1KiB", "1.1", "", "0x1k", "0x1.8k", "1.5", "1M ", "1kk", "0.5b", "1.5B",
            "1.5e1k", "1. k", "0x", "k", "12Q",
        ] {
            assert_eq!(
                parse_size(s),
                Err(SizeError::Invalid(s.to_string())),
                "{s:?}"
            );
        }
        for s in [
            "-0",
            "-1",
            "18446744073709551616",
            "9223372036854775808",
            "8E",
            "9E",
            "8192P",
        ] {
            assert_eq!(parse_size(s), Err(SizeError::Range), "{s:?}");
        }
        assert_eq!(parse_size("8191P"), Ok(8191 << 50));
    }

    #[test]
    fn size_messages_are_qemu_img_s() {
        assert_eq!(
            SizeError::Invalid("12Q".into()).to_string(),
            "Invalid image size specified: '12Q'."
        );
        assert_eq!(
            SizeError::Range.to_string(),
            "Invalid image size specified. Must be between 0 and 9223372036854775807."
        );
    }

    /// What Debian's qemu-img 7.2.22 printed and accepted where 10.0.2 differs.
    #[test]
    fn sizes_and_messages_like_qemu_img_7_2() {
        let v72 = Profile::V7_2;
        for s in ["-0", "-1", " -1", "-0k", ".5k", "+.5k", "12Q", "1.5"] {
            let e = parse_size_in(s, v72).expect_err(s);
            assert_eq!(e, SizeError::Invalid(s.to_string()), "{s:?}");
            assert_eq!(
                e.message(v72),
                "Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n\
                 kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
            );
        }
        assert_eq!(parse_size_in(".5k", Profile::V10_0), Ok(512));
        assert_eq!(parse_size_in("-1", Profile::V10_0), Err(SizeError::Range));
        assert_eq!(parse_size_in("1.7k", v72), Ok(1741));
        assert_eq!(parse_size_in("1.k", v72), Ok(1024));
        assert_eq!(parse_size_in("9E", v72), Err(SizeError::Range));
        assert_eq!(
            SizeError::Range.message(v72),
            SizeError::Range.message(Profile::V10_0)
        );
    }

    #[test]
    fn options_last_wins_and_errors_name_the_key() {
        let mut o = CreateOpts::default();
        o.add(ImgFormat::Qcow2, "cluster_size=8k,cluster_size=4k")
            .expect("valid");
        o.add(
            ImgFormat::Qcow2,
            "refcount_bits=8,compat=1.1,lazy_refcounts=yes",
        )
        .expect("valid");
        assert_eq!(o.cluster_size, Some(4096));
        assert_eq!(
            o.formatting_line("o1", ImgFormat::Qcow2, 1 << 20),
            "Formatting 'o1', fmt=qcow2 cluster_size=4096 extended_l2=off compression_type=zlib \
             size=1048576 compat=1.1 lazy_refcounts=yes refcount_bits=8"
        );
        let mut o = CreateOpts::default();
        let mut add = |fmt, arg| o.add(fmt, arg).map_err(|e| e.to_string());
        assert_eq!(
            add(ImgFormat::Qcow2, "foo=bar"),
            Err("Invalid parameter 'foo'".into())
        );
        assert_eq!(
            add(ImgFormat::Qcow2, "lazy_refcounts=maybe"),
            Err("Parameter 'lazy_refcounts' expects 'on' or 'off'".into())
        );
        assert_eq!(
            add(ImgFormat::Qcow2, "refcount_bits=abc"),
            Err("Parameter 'refcount_bits' expects a number".into())
        );
        assert!(add(ImgFormat::Qcow2, "cluster_size=abc")
            .is_err_and(|e| e.starts_with("Parameter 'cluster_size' expects a non-negative")));
        assert_eq!(
            add(ImgFormat::Raw, "cluster_size=4k"),
            Err("Invalid parameter 'cluster_size'".into())
        );
        o.add(ImgFormat::Qcow2, "backing_file=a,,b")
            .expect("escaped comma");
        assert_eq!(o.backing_file.as_deref(), Some("a,b"));
    }

    #[test]
    fn formatting_line_matches_every_profile() {
        for p in crate::Profile::ALL {
            assert_eq!(
                CreateOpts::default().formatting_line("t.qcow2", ImgFormat::Qcow2, 128 << 20),
                p.create_qcow2_line(),
                "profile {p}"
            );
        }
    }

    #[test]
    fn formatting_lines_match_qemu_img() {
        let mut o = CreateOpts::default();
        assert_eq!(
            o.formatting_line("a.qcow2", ImgFormat::Qcow2, 10485760),
            "Formatting 'a.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off \
             compression_type=zlib size=10485760 lazy_refcounts=off refcount_bits=16"
        );
        assert_eq!(
            o.formatting_line("r.raw", ImgFormat::Raw, 1 << 30),
            "Formatting 'r.raw', fmt=raw size=1073741824"
        );
        o.backing_file = Some("a.qcow2".into());
        o.backing_fmt = Some("qcow2".into());
        o.compat = Some("0.10".into());
        assert_eq!(
            o.formatting_line("o.qcow2", ImgFormat::Qcow2, 10485760),
            "Formatting 'o.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off \
             compression_type=zlib size=10485760 compat=0.10 backing_file=a.qcow2 \
             backing_fmt=qcow2 lazy_refcounts=off refcount_bits=16"
        );
    }
}
