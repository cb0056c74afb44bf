//! Legacy PC devices: COM1 serial, i8042 (reset only), the CMOS RTC, ACPI power management
//! ports, and kiln's debug ports (exit and marker).

mod acpi_pm;
mod cmos;
mod debug_ports;
mod i8042;
mod serial;

pub use acpi_pm::{AcpiPmPorts, S5_SLEEP_TYPE};
pub use cmos::Cmos;
pub use debug_ports::{DebugPorts, Phase, PhaseLog};
pub use i8042::I8042;
pub use serial::{EventFdTrigger, SerialPort, SerialSnapshot};
