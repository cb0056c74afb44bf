//! kiln's debug ports: the exit port (a byte ends the VM with that status, like QEMU's
//! isa-debug-exit but without the `(v << 1) | 1` encoding) and the marker port (a phase number
//! written by the guest is timestamped, to measure boot phases without serial cost).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::bus::BusDevice;
use crate::exit::{ExitRequester, GuestExit};

/// A boot phase the guest announced on the marker port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Phase {
    /// The number the guest wrote.
    pub id: u32,
    /// Time since the VM started.
    pub at: Duration,
}

/// Most phases kept; a guest writing the port in a loop cannot grow memory without bound.
const MAX_PHASES: usize = 4096;

/// Shared, cloneable record of phases.
#[derive(Clone, Debug)]
pub struct PhaseLog {
    start: Instant,
    phases: Arc<Mutex<Vec<Phase>>>,
}

impl PhaseLog {
    /// A log whose timestamps count from `start`.
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            phases: Arc::default(),
        }
    }

    /// The phases recorded so far, in order.
    pub fn phases(&self) -> Vec<Phase> {
        self.phases
            .lock()
            .map(|p| p.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    fn record(&self, id: u32) {
        let at = self.start.elapsed();
        let mut p = self.phases.lock().unwrap_or_else(|e| e.into_inner());
        if p.len() < MAX_PHASES {
            p.push(Phase { id, at });
        }
    }
}

/// Two ports: exit (+0) and marker (+1).
pub struct DebugPorts {
    exit: Arc<dyn ExitRequester>,
    phases: PhaseLog,
}

impl DebugPorts {
    /// Debug ports reporting exits to `exit` and phases to `phases`.
    pub fn new(exit: Arc<dyn ExitRequester>, phases: PhaseLog) -> Self {
        Self { exit, phases }
    }
}

impl BusDevice for DebugPorts {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (0, [status, ..]) => self.exit.request_exit(GuestExit::Status(*status)),
            (1, [a]) => self.phases.record(u32::from(*a)),
            (1, [a, b]) => self.phases.record(u32::from(u16::from_le_bytes([*a, *b]))),
            (1, [a, b, c, d]) => self.phases.record(u32::from_le_bytes([*a, *b, *c, *d])),
            _ => tracing::debug!(
                "ignored debug port write of {} bytes at +{offset}",
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::RecordingExit;

    #[test]
    fn exit_port_and_markers() {
        let rec = RecordingExit::default();
        let log = PhaseLog::new(Instant::now());
        let mut ports = DebugPorts::new(Arc::new(rec.clone()), log.clone());
        ports.write(1, &[1]);
        ports.write(1, &[2, 1]);
        ports.write(1, &[3, 0, 0, 1]);
        ports.write(1, &[1, 2, 3]); // odd width: ignored
        let ids: Vec<u32> = log.phases().iter().map(|p| p.id).collect();
        assert_eq!(ids, vec![1, 0x102, 0x0100_0003]);
        assert!(rec.requests().is_empty());
        ports.write(0, &[42]);
        assert_eq!(rec.requests(), vec![GuestExit::Status(42)]);
    }

    #[test]
    fn phases_are_bounded() {
        let log = PhaseLog::new(Instant::now());
        let mut ports = DebugPorts::new(Arc::new(RecordingExit::default()), log.clone());
        for i in 0..(MAX_PHASES + 10) {
            ports.write(1, &(i as u32).to_le_bytes());
        }
        assert_eq!(log.phases().len(), MAX_PHASES);
    }
}
