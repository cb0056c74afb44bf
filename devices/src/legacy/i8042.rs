//! i8042 keyboard controller: only the CPU reset command matters (`reboot=k`).

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use crate::bus::BusDevice;
use crate::exit::{ExitRequester, GuestExit};

struct ResetTrigger(Arc<dyn ExitRequester>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request_exit(GuestExit::Reset);
        Ok(())
    }
}

/// The i8042 at ports 0x60-0x64: a reset command (0xfe to port 0x64) ends the VM with a reset.
pub struct I8042 {
    dev: I8042Device<ResetTrigger>,
}

impl I8042 {
    /// An i8042 that reports resets to `exit`.
    pub fn new(exit: Arc<dyn ExitRequester>) -> Self {
        Self {
            dev: I8042Device::new(ResetTrigger(exit)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Ok(off), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = self.dev.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), Some(&value)) = (u8::try_from(offset), data.first()) {
            let _ = self.dev.write(off, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::RecordingExit;

    #[test]
    fn reset_command_requests_a_reset() {
        let rec = RecordingExit::default();
        let mut dev = I8042::new(Arc::new(rec.clone()));
        dev.write(0, &[0xfe]); // data port: ignored
        dev.write(4, &[0xaa]); // another command: ignored
        assert!(rec.requests().is_empty());
        dev.write(4, &[0xfe]);
        assert_eq!(rec.requests(), vec![GuestExit::Reset]);
    }
}
