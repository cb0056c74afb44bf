//! kiln-devices: device models independent of KVM (serial, i8042, debug ports, virtio).
//!
//! Devices see guest memory (vm-memory) and small traits for interrupts and VM exits, never
//! `kvm-ioctls`, so every device is unit-testable without /dev/kvm.

pub mod bus;
pub mod console;
pub mod exit;
pub mod legacy;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
pub use exit::{ExitRequester, GuestExit};
