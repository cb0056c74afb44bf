//! The hardware-reduced ACPI power management registers the FADT points at: sleep control
//! (S5 = power off), sleep status, and the reset register.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::exit::{ExitRequester, GuestExit};

/// Sleep type the DSDT's `\_S5_` package announces; the guest writes it to power off.
pub const S5_SLEEP_TYPE: u8 = 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;
const SLP_EN: u8 = 1 << 5;

/// Three consecutive 1-byte ports: sleep control (+0), sleep status (+1), reset (+2).
pub struct AcpiPmPorts {
    exit: Arc<dyn ExitRequester>,
    reset_value: u8,
}

impl AcpiPmPorts {
    /// Ports that report power-off and reset (writing `reset_value` to +2) to `exit`.
    pub fn new(exit: Arc<dyn ExitRequester>, reset_value: u8) -> Self {
        Self { exit, reset_value }
    }
}

impl BusDevice for AcpiPmPorts {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status reads as "not sleeping"; nothing else is readable.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            0 if value & SLP_EN != 0
                && (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == S5_SLEEP_TYPE =>
            {
                self.exit.request_exit(GuestExit::Shutdown)
            }
            2 if value == self.reset_value => self.exit.request_exit(GuestExit::Reset),
            _ => tracing::debug!("ignored ACPI PM write {value:#x} at +{offset}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::RecordingExit;

    #[test]
    fn s5_powers_off_and_reset_register_resets() {
        let rec = RecordingExit::default();
        let mut pm = AcpiPmPorts::new(Arc::new(rec.clone()), 1);
        pm.write(0, &[S5_SLEEP_TYPE << 2]); // no SLP_EN
        pm.write(0, &[(3 << 2) | SLP_EN]); // S3: not supported, ignored
        pm.write(2, &[2]); // wrong reset value
        assert!(rec.requests().is_empty());
        pm.write(0, &[(S5_SLEEP_TYPE << 2) | SLP_EN]);
        pm.write(2, &[1]);
        assert_eq!(rec.requests(), vec![GuestExit::Shutdown, GuestExit::Reset]);
    }
}
