//! readiness.json: the evidence behind a run's readiness verdict, kept in every bundle. It
//! tells apart how the wait ended (ready, timed out, the VM exited, a guest panic, cancelled),
//! each `KILN_READY` record the console carried up to the one accepted (accepted, or rejected as
//! unparsable or from an earlier boot, with the reason), the markers matched, and the transports:
//! where the readiness signal came from (the serial console) and which agent transport the host
//! uses for steps, with whether the accepted record offers it.

use std::time::Duration;

use serde::Serialize;

use kiln_backends::readiness;
use kiln_backends::{Machine, ReadyError, ReadyReport};
use kiln_scenario::{Readiness, ReadinessKind};

use crate::artifacts::{ms, printable};

/// The file in the bundle.
pub const READINESS_JSON: &str = "readiness.json";

/// How the wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WaitOutcome {
    /// The guest was ready.
    Ready,
    /// The record or a marker did not appear in time.
    TimedOut,
    /// The VM ended first.
    VmExited,
    /// The guest kernel panicked first.
    GuestPanic,
    /// Ctrl-C.
    Cancelled,
}

/// One `KILN_READY` record seen on the console.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecordEvidence {
    /// "accepted" or "rejected".
    pub status: &'static str,
    /// Milliseconds since the VM's creation when the line arrived.
    pub at_ms: f64,
    /// The line, without control characters.
    pub line: String,
    /// Why it was rejected: "unparsable" or "earlier-boot".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// The rejection in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The accepted record's boot id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot: Option<String>,
    /// The transports the accepted record offers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transports: Option<Vec<String>>,
}

/// A marker readiness matched.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MarkerEvidence {
    /// Milliseconds since the VM's creation.
    pub at_ms: f64,
    /// The matching line.
    pub line: String,
}

/// readiness.json.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReadinessEvidence {
    /// What readiness waited for: "agent", "marker" or "sequence".
    pub kind: &'static str,
    /// How the wait ended.
    pub outcome: WaitOutcome,
    /// The failure, when it was not ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// How long the wait took.
    pub waited_ms: f64,
    /// The readiness timeout.
    pub timeout_ms: f64,
    /// Where the readiness signal is read: the serial console.
    pub signal_transport: &'static str,
    /// The agent transport the host uses for steps (`serial:NAME`, `vsock:PORT`), when the
    /// backend has one.
    pub agent_transport: Option<String>,
    /// Whether the accepted record offers `agent_transport` (absent without both).
    pub agent_transport_offered: Option<bool>,
    /// Each record up to the accepted one, in console order (agent readiness).
    pub records: Vec<RecordEvidence>,
    /// The markers matched, in order (marker and sequence readiness).
    pub markers: Vec<MarkerEvidence>,
}

impl ReadinessEvidence {
    /// The evidence of a wait on `machine` for `spec` that took `waited` and ended with
    /// `result`; `message` is the failure as result.json words it.
    pub fn new(
        spec: &Readiness,
        machine: &dyn Machine,
        result: &Result<ReadyReport, ReadyError>,
        waited: Duration,
        message: Option<&str>,
    ) -> ReadinessEvidence {
        let outcome = match result {
            Ok(_) => WaitOutcome::Ready,
            Err(ReadyError::Timeout(..)) => WaitOutcome::TimedOut,
            Err(ReadyError::Exited(_)) => WaitOutcome::VmExited,
            Err(ReadyError::Panic(_)) => WaitOutcome::GuestPanic,
            Err(ReadyError::Cancelled) => WaitOutcome::Cancelled,
        };
        let kind = match spec.kind {
            ReadinessKind::Agent => "agent",
            ReadinessKind::Marker(_) => "marker",
            ReadinessKind::Sequence(_) => "sequence",
        };
        let agent_transport = machine.agent_transport();
        let mut records = Vec::new();
        let mut offered = None;
        if matches!(spec.kind, ReadinessKind::Agent) {
            let scan = readiness::scan(machine.console());
            records.extend(scan.rejected.iter().map(|r| RecordEvidence {
                status: "rejected",
                at_ms: ms(r.line.at),
                line: printable(&r.line.text),
                reason: Some(r.reason.as_str()),
                detail: Some(r.reason.to_string()),
                boot: None,
                transports: None,
            }));
            if let Some((line, record)) = &scan.accepted {
                offered = agent_transport
                    .as_ref()
                    .map(|t| record.transports.contains(t));
                records.push(RecordEvidence {
                    status: "accepted",
                    at_ms: ms(line.at),
                    line: printable(&line.text),
                    reason: None,
                    detail: None,
                    boot: Some(record.boot.clone()),
                    transports: Some(record.transports.iter().map(ToString::to_string).collect()),
                });
            }
        }
        let markers = result
            .as_ref()
            .map(|report| {
                report
                    .markers
                    .iter()
                    .map(|(line, at)| MarkerEvidence {
                        at_ms: ms(*at),
                        line: printable(line),
                    })
                    .collect()
            })
            .unwrap_or_default();
        ReadinessEvidence {
            kind,
            outcome,
            message: message.map(str::to_string),
            waited_ms: ms(waited),
            timeout_ms: ms(spec.timeout),
            signal_transport: "console",
            agent_transport: agent_transport.map(|t| t.to_string()),
            agent_transport_offered: offered,
            records,
            markers,
        }
    }
}
