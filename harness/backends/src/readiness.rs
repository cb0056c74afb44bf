//! Which `KILN_READY` records on the console readiness accepts, and why it rejects the others.
//! Waiting ([`crate::wait_ready_on_console`]) and the evidence a run keeps (the runner's
//! readiness.json, from [`scan`]) use the same [`check`], so the evidence says exactly why a
//! wait went on past a record.
//!
//! A record is rejected when it does not parse (`KILN_READY` and then fields that are not the
//! documented form), or when it comes from an earlier boot: it says the guest had been up longer
//! than this VM has existed (a console replayed into this one, a record left in a reused log).
//! The guest counts its uptime with `CLOCK_BOOTTIME` from its kernel's start, which is after the
//! VM's creation, so for a record this boot printed `t` is at most the line's age; [`slack`]
//! leaves room for the guest clock's calibration.

use std::time::Duration;

use kiln_agent_proto::readiness::READY_PREFIX;
use kiln_agent_proto::ReadyRecord;

use crate::console::{Console, ConsoleLine};

/// Why a record on the console was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// `KILN_READY` followed by fields that are not a record.
    Unparsable,
    /// The record's uptime is longer than the VM's age when the line arrived.
    EarlierBoot {
        /// The uptime it claims (`t=`).
        uptime: Duration,
        /// How long the VM had existed when the line arrived.
        vm_age: Duration,
    },
}

impl Rejection {
    /// The kebab-case name used in readiness.json.
    pub fn as_str(&self) -> &'static str {
        match self {
            Rejection::Unparsable => "unparsable",
            Rejection::EarlierBoot { .. } => "earlier-boot",
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::Unparsable => write!(
                f,
                "not a record: expected `{READY_PREFIX} v=N boot=ID transport=LIST t=MS`"
            ),
            Rejection::EarlierBoot { uptime, vm_age } => write!(
                f,
                "from an earlier boot: the guest says it has been up {} ms, but this VM had \
                 existed only {} ms",
                uptime.as_millis(),
                vm_age.as_millis()
            ),
        }
    }
}

/// What [`check`] makes of one console line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// No `KILN_READY` word in it.
    NotARecord,
    /// A record of this boot.
    Accepted(ReadyRecord),
    /// A record readiness does not take.
    Rejected(Rejection),
}

/// How much longer than the VM's age a record's uptime may be before it is taken for an earlier
/// boot's: 2 s plus 10 % (a guest's clock calibrated slightly fast).
pub fn slack(vm_age: Duration) -> Duration {
    Duration::from_secs(2) + vm_age / 10
}

/// Whether `line` holds a record readiness accepts.
pub fn check(line: &ConsoleLine) -> Check {
    let Some(start) = line.text.find(READY_PREFIX) else {
        return Check::NotARecord;
    };
    // `KILN_READYX` is not the record's word. What comes before it is not looked at: firmware
    // leaves escape sequences on the line the record starts (`\x1b[2JKILN_READY …`).
    let rest = &line.text[start + READY_PREFIX.len()..];
    if rest.chars().next().is_some_and(|c| !c.is_whitespace()) {
        return Check::NotARecord;
    }
    let Some(record) = ReadyRecord::parse(&line.text) else {
        return Check::Rejected(Rejection::Unparsable);
    };
    let uptime = Duration::from_millis(record.t_ms);
    if uptime > line.at + slack(line.at) {
        return Check::Rejected(Rejection::EarlierBoot {
            uptime,
            vm_age: line.at,
        });
    }
    Check::Accepted(record)
}

/// A record readiness did not take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedRecord {
    /// The console line.
    pub line: ConsoleLine,
    /// Why.
    pub reason: Rejection,
}

/// The records on a console, as readiness saw them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    /// Records rejected before the accepted one (all of them, when none was accepted).
    pub rejected: Vec<RejectedRecord>,
    /// The first record accepted, with its line.
    pub accepted: Option<(ConsoleLine, ReadyRecord)>,
}

/// Classifies the records on `console` up to the first one accepted, as the wait did. Lines the
/// console already dropped to stay within its limits are not seen.
pub fn scan(console: &Console) -> Scan {
    let mut out = Scan::default();
    for line in console.lines_where(&|l| l.text.contains(READY_PREFIX)) {
        match check(&line) {
            Check::NotARecord => {}
            Check::Rejected(reason) => out.rejected.push(RejectedRecord { line, reason }),
            Check::Accepted(record) => {
                out.accepted = Some((line, record));
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(at_ms: u64, text: &str) -> ConsoleLine {
        ConsoleLine {
            at: Duration::from_millis(at_ms),
            text: text.into(),
        }
    }

    #[test]
    fn a_record_of_this_boot_is_accepted() {
        let l = line(
            900,
            "[ 0.8] KILN_READY v=1 boot=b1 transport=vsock:1024 t=812",
        );
        let Check::Accepted(record) = check(&l) else {
            panic!("{:?}", check(&l));
        };
        assert_eq!(record.boot, "b1");
        // As QEMU's console carries it after SeaBIOS cleared the screen.
        let l = line(
            6_000,
            "\x1bc\x1b[?7l\x1b[2JKILN_READY v=1 boot=4f81 transport=serial:org.kiln.agent.0 t=4169",
        );
        assert!(matches!(check(&l), Check::Accepted(_)), "{:?}", check(&l));
        // A clock a little fast is not an earlier boot.
        assert!(matches!(
            check(&line(100, "KILN_READY v=1 boot=b1 transport=none t=2000")),
            Check::Accepted(_)
        ));
    }

    #[test]
    fn broken_and_stale_records_are_rejected_with_their_reason() {
        assert_eq!(
            check(&line(10, "KILN_READY v=1 boot=b1 transport=tcp:1 t=5")),
            Check::Rejected(Rejection::Unparsable)
        );
        assert_eq!(
            check(&line(10, "KILN_READY")),
            Check::Rejected(Rejection::Unparsable)
        );
        assert_eq!(
            check(&line(
                3_000,
                "KILN_READY v=1 boot=old transport=none t=600000"
            )),
            Check::Rejected(Rejection::EarlierBoot {
                uptime: Duration::from_secs(600),
                vm_age: Duration::from_secs(3),
            })
        );
        let why = Rejection::EarlierBoot {
            uptime: Duration::from_secs(600),
            vm_age: Duration::from_secs(3),
        }
        .to_string();
        assert!(
            why.contains("up 600000 ms") && why.contains("only 3000 ms"),
            "{why}"
        );
    }

    #[test]
    fn other_words_are_not_records() {
        for text in [
            "Linux version 6.1",
            "KILN_READYX v=1 boot=a transport=none t=1",
        ] {
            assert_eq!(check(&line(1, text)), Check::NotARecord, "{text}");
        }
    }

    #[test]
    fn a_scan_stops_at_the_first_accepted_record() {
        let console = Console::new(None);
        console.push(
            b"KILN_READY v=1 boot=old transport=none t=999999\n\
              KILN_READY garbage\n\
              KILN_READY v=1 boot=new transport=none t=0\n\
              KILN_READY v=1 boot=later transport=none t=0\n",
        );
        let scan = scan(&console);
        let reasons: Vec<&str> = scan.rejected.iter().map(|r| r.reason.as_str()).collect();
        assert_eq!(reasons, ["earlier-boot", "unparsable"]);
        assert_eq!(scan.accepted.map(|(_, r)| r.boot), Some("new".into()));
    }
}
