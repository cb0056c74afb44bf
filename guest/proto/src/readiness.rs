//! The readiness record the agent prints on the serial console once it can serve:
//! `KILN_READY v=1 boot=<id> transport=<list|none> t=<ms>`.

use std::fmt;

/// The record's leading word.
pub const READY_PREFIX: &str = "KILN_READY";

/// The leading word of a user marker line (`KILN_MARKER <text>`).
pub const MARKER_PREFIX: &str = "KILN_MARKER";

/// A transport the agent serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// AF_VSOCK, listening on this port.
    Vsock(u32),
    /// The virtio-serial port with this name.
    Serial(String),
    /// A Unix socket at this path (`kiln-agent --listen-unix`, for running the agent on a host).
    Unix(String),
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::Vsock(port) => write!(f, "vsock:{port}"),
            Transport::Serial(name) => write!(f, "serial:{name}"),
            Transport::Unix(path) => write!(f, "unix:{path}"),
        }
    }
}

/// A parsed (or to-be-printed) readiness record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyRecord {
    /// Record format version (1).
    pub version: u32,
    /// The guest's boot id.
    pub boot: String,
    /// Transports served; empty means `transport=none`.
    pub transports: Vec<Transport>,
    /// Milliseconds since the guest kernel started.
    pub t_ms: u64,
}

impl fmt::Display for ReadyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{READY_PREFIX} v={} boot={} transport=",
            self.version, self.boot
        )?;
        if self.transports.is_empty() {
            f.write_str("none")?;
        }
        for (i, transport) in self.transports.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{transport}")?;
        }
        write!(f, " t={}", self.t_ms)
    }
}

impl ReadyRecord {
    /// Find and parse a readiness record in one console line (kernel noise before it is skipped);
    /// `None` when the line holds no well-formed record.
    pub fn parse(line: &str) -> Option<ReadyRecord> {
        let start = line.find(READY_PREFIX)?;
        let mut words = line[start..].split_whitespace();
        if words.next()? != READY_PREFIX {
            return None;
        }
        let mut field = |name: &str| {
            words
                .next()
                .and_then(|w| w.strip_prefix(name))
                .and_then(|w| w.strip_prefix('='))
                .map(str::to_owned)
        };
        let version = field("v")?.parse().ok()?;
        let boot = field("boot")?;
        let transport = field("transport")?;
        let t_ms = field("t")?.parse().ok()?;
        let transports = if transport == "none" {
            Vec::new()
        } else {
            transport
                .split(',')
                .map(parse_transport)
                .collect::<Option<Vec<_>>>()?
        };
        Some(ReadyRecord {
            version,
            boot,
            transports,
            t_ms,
        })
    }
}

fn parse_transport(text: &str) -> Option<Transport> {
    match text.split_once(':')? {
        ("vsock", port) => port.parse().ok().map(Transport::Vsock),
        ("serial", name) if !name.is_empty() => Some(Transport::Serial(name.to_owned())),
        ("unix", path) if !path.is_empty() => Some(Transport::Unix(path.to_owned())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_prints_in_the_documented_form() {
        let record = ReadyRecord {
            version: 1,
            boot: "abc".into(),
            transports: vec![Transport::Vsock(1024)],
            t_ms: 812,
        };
        assert_eq!(
            record.to_string(),
            "KILN_READY v=1 boot=abc transport=vsock:1024 t=812"
        );
    }

    #[test]
    fn record_round_trips_with_none_and_several_transports() {
        for transports in [
            vec![],
            vec![
                Transport::Vsock(1024),
                Transport::Serial("org.kiln.agent.0".into()),
            ],
        ] {
            let record = ReadyRecord {
                version: 1,
                boot: "0f-1".into(),
                transports,
                t_ms: 5,
            };
            let line = format!("[    1.234] noise {record}\r");
            assert_eq!(ReadyRecord::parse(&line), Some(record));
        }
    }

    #[test]
    fn malformed_records_are_not_parsed() {
        for line in [
            "KILN_READY",
            "KILN_READY v=x boot=a transport=none t=1",
            "KILN_READY v=1 boot=a transport=tcp:1 t=1",
            "KILN_READY v=1 boot=a transport=none",
            "KILN_READYX v=1 boot=a transport=none t=1",
        ] {
            assert_eq!(ReadyRecord::parse(line), None, "{line}");
        }
    }
}
