//! How a device asks the VMM to end the VM (reset, power-off, exit port).

use std::sync::{Arc, Mutex};

/// A VM end that the guest asked for through a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest reset the machine (i8042 or ACPI reset register).
    Reset,
    /// The guest powered off (ACPI sleep state S5).
    Shutdown,
    /// The guest wrote this status byte to kiln's exit port.
    Status(u8),
}

/// Receives exit requests from devices. Implemented by the VMM; the first request wins.
pub trait ExitRequester: Send + Sync {
    /// Asks for the VM to end. Must not block the calling vCPU.
    fn request_exit(&self, exit: GuestExit);
}

/// An [`ExitRequester`] that records requests, for tests and simple embedders.
#[derive(Debug, Default, Clone)]
pub struct RecordingExit(pub Arc<Mutex<Vec<GuestExit>>>);

impl RecordingExit {
    /// The requests seen so far.
    pub fn requests(&self) -> Vec<GuestExit> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl ExitRequester for RecordingExit {
    fn request_exit(&self, exit: GuestExit) {
        if let Ok(mut v) = self.0.lock() {
            v.push(exit);
        }
    }
}
