//! Address-range buses (port I/O and MMIO) that route vCPU exits to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable over a bus. `offset` is relative to the base the device was inserted at.
pub trait BusDevice: Send {
    /// Handles a read of `data.len()` bytes; unwritten bytes read as zero.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a write.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Bus configuration errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already registered.
    #[error("bus range {base:#x}+{len:#x} overlaps the device at {other_base:#x}+{other_len:#x}")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
        /// Base of the range already registered.
        other_base: u64,
        /// Length of the range already registered.
        other_len: u64,
    },
    /// Zero-length or wrapping range.
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    InvalidRange {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

/// Shared handle to a bus device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// A set of non-overlapping address ranges, each owned by one device.
#[derive(Default, Clone)]
pub struct Bus {
    // Keyed by base address; the value holds the length and the device.
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` for `[base, base + len)`. Overlapping ranges are rejected.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        // The closest range starting at or before `end - 1` is the only candidate for overlap.
        if let Some((&other_base, &(other_len, _))) = self.ranges.range(..end).next_back() {
            if other_base + other_len > base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other_base,
                    other_len,
                });
            }
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    /// Finds the device owning `addr` and the offset of `addr` inside its range.
    fn resolve(&self, addr: u64) -> Option<(&SharedDevice, u64)> {
        let (&base, (len, device)) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < *len).then_some((device, offset))
    }

    /// Dispatches a read; returns false when no device owns `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((device, offset)) => {
                // A poisoned lock means a device panicked earlier; keep serving with its state.
                let mut dev = device.lock().unwrap_or_else(|e| e.into_inner());
                dev.read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device owns `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((device, offset)) => {
                let mut dev = device.lock().unwrap_or_else(|e| e.into_inner());
                dev.write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    fn dev() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::default()))
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let mut bus = Bus::new();
        let a = dev();
        let b = dev();
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x400, 0x10).unwrap();
        assert!(bus.write(0x3fa, &[7]));
        assert!(bus.write(0x40f, &[1, 2]));
        let mut buf = [0u8; 1];
        assert!(bus.read(0x3ff, &mut buf));
        assert_eq!(buf, [7]);
        assert!(!bus.read(0x400 + 0x10, &mut buf));
        assert!(!bus.write(0x3f7, &[0]));
        assert_eq!(a.lock().unwrap().writes, vec![(2, vec![7])]);
        assert_eq!(b.lock().unwrap().writes, vec![(0xf, vec![1, 2])]);
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let mut bus = Bus::new();
        bus.insert(dev(), 0x100, 0x10).unwrap();
        for (base, len) in [(0x100, 1), (0xf8, 0x10), (0x10f, 4), (0x0, 0x1000)] {
            assert!(
                matches!(bus.insert(dev(), base, len), Err(BusError::Overlap { .. })),
                "{base:#x}+{len:#x} should overlap"
            );
        }
        // Adjacent ranges are fine on both sides.
        bus.insert(dev(), 0xf0, 0x10).unwrap();
        bus.insert(dev(), 0x110, 0x10).unwrap();
        assert_eq!(
            bus.insert(dev(), 0x200, 0),
            Err(BusError::InvalidRange {
                base: 0x200,
                len: 0
            })
        );
        assert!(matches!(
            bus.insert(dev(), u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
    }
}
