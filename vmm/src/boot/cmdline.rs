//! The kernel command line: kiln's defaults, then device entries, then the user's parts.

use linux_loader::cmdline::Cmdline;

use crate::layout::CMDLINE_MAX_SIZE;

/// What kiln always puts first: serial console, reset through the i8042 on reboot, and reboot
/// (not hang) on panic so a crashed guest ends the VM at once.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// Command line errors.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    /// Longer than the kernel accepts.
    #[error("the kernel command line would be {len} bytes, the limit is {limit} bytes")]
    TooLong {
        /// Length the full line would have (without the NUL).
        len: usize,
        /// Longest line accepted (without the NUL).
        limit: usize,
    },
    /// A character the boot protocol cannot carry.
    #[error("the kernel command line: {part:?} has a character that is not printable ASCII")]
    BadCharacter {
        /// The offending part.
        part: String,
    },
}

/// Assembles `DEFAULT_CMDLINE + kiln_parts + user` and checks it against `limit` bytes
/// (including the terminating NUL; at most [`CMDLINE_MAX_SIZE`]).
pub fn build_cmdline(
    kiln_parts: &[String],
    user: Option<&str>,
    limit: usize,
) -> Result<Cmdline, CmdlineError> {
    let limit = limit.min(CMDLINE_MAX_SIZE);
    let mut parts: Vec<&str> = vec![DEFAULT_CMDLINE];
    parts.extend(kiln_parts.iter().map(String::as_str));
    if let Some(u) = user.map(str::trim).filter(|u| !u.is_empty()) {
        parts.push(u);
    }
    if let Some(bad) = parts
        .iter()
        .find(|p| !p.bytes().all(|b| (b' '..=b'~').contains(&b)))
    {
        return Err(CmdlineError::BadCharacter {
            part: bad.to_string(),
        });
    }
    let len = parts.iter().map(|p| p.len()).sum::<usize>() + parts.len() - 1;
    let too_long = CmdlineError::TooLong {
        len,
        limit: limit.saturating_sub(1),
    };
    if len >= limit {
        return Err(too_long);
    }
    let mut cmdline = Cmdline::new(limit).map_err(|_| too_long.clone())?;
    for p in parts {
        cmdline.insert_str(p).map_err(|_| too_long.clone())?;
    }
    Ok(cmdline)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(c: &Cmdline) -> String {
        c.as_cstring().unwrap().into_string().unwrap()
    }

    #[test]
    fn defaults_then_kiln_parts_then_user() {
        let c = build_cmdline(
            &["virtio_mmio.device=4K@0xd0000000:5".into()],
            Some(" quiet "),
            2048,
        )
        .unwrap();
        assert_eq!(
            text(&c),
            "console=ttyS0 reboot=k panic=-1 virtio_mmio.device=4K@0xd0000000:5 quiet"
        );
        assert_eq!(
            text(&build_cmdline(&[], None, 2048).unwrap()),
            DEFAULT_CMDLINE
        );
    }

    #[test]
    fn length_is_checked_against_the_limit() {
        let room = 2047 - DEFAULT_CMDLINE.len() - 1;
        assert!(build_cmdline(&[], Some(&"a".repeat(room)), 2048).is_ok());
        let err = build_cmdline(&[], Some(&"a".repeat(room + 1)), 2048).unwrap_err();
        assert_eq!(
            err,
            CmdlineError::TooLong {
                len: 2048,
                limit: 2047
            }
        );
        assert_eq!(
            err.to_string(),
            "the kernel command line would be 2048 bytes, the limit is 2047 bytes"
        );
        // A kernel announcing a smaller cmdline_size wins.
        assert!(matches!(
            build_cmdline(&[], Some("x"), 16),
            Err(CmdlineError::TooLong { limit: 15, .. })
        ));
    }

    #[test]
    fn rejects_control_characters() {
        assert!(matches!(
            build_cmdline(&[], Some("a\nb"), 2048),
            Err(CmdlineError::BadCharacter { .. })
        ));
    }
}
