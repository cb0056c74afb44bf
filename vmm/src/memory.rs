//! Guest RAM: one mmap'ed region below the 32-bit MMIO gap, a second above 4 GiB for large
//! guests, and the e820 map that describes it to the guest.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::layout::{ACPI_END, ACPI_START, EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};

/// Guest memory as kiln uses it (no dirty-page bitmap).
pub type GuestMemory = GuestMemoryMmap<()>;

/// Smallest guest kiln starts: the boot structures below 1 MiB plus a little high memory.
pub const MIN_MEMORY_MIB: u64 = 2;

/// e820 usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 reserved (here: the ACPI tables area).
pub const E820_RESERVED: u32 = 2;

/// Guest memory errors.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Too little or too much memory requested.
    #[error("guest memory of {mib} MiB is out of range: kiln needs at least {MIN_MEMORY_MIB} MiB")]
    Size {
        /// The requested size.
        mib: u64,
    },
    /// The host refused the allocation.
    #[error("cannot allocate {mib} MiB of guest memory: {source}")]
    Alloc {
        /// The requested size.
        mib: u64,
        /// What vm-memory reported.
        source: vm_memory::mmap::FromRangesError,
    },
}

/// One e820 (and PVH memmap) entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The guest-physical RAM ranges for `mem_bytes` of memory: split around the MMIO gap.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_bytes)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), mem_bytes - MMIO_GAP_START),
        ]
    }
}

/// End (exclusive) of RAM below 4 GiB: where the initrd goes, at the top.
pub fn low_memory_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_GAP_START)
}

/// Allocates guest RAM of `mib` MiB.
pub fn create_guest_memory(mib: u64) -> Result<GuestMemory, MemoryError> {
    let bytes = mib
        .checked_mul(1 << 20)
        .filter(|_| mib >= MIN_MEMORY_MIB)
        .ok_or(MemoryError::Size { mib })?;
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(bytes)
        .into_iter()
        .map(|(a, len)| usize::try_from(len).map(|l| (a, l)))
        .collect::<Result<_, _>>()
        .map_err(|_| MemoryError::Size { mib })?;
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Alloc { mib, source })
}

/// The e820 map handed to the guest: low RAM, the ACPI area (reserved), high RAM, RAM above 4 GiB.
pub fn e820_map(mem_bytes: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: ACPI_START,
            size: ACPI_END - ACPI_START,
            kind: E820_RESERVED,
        },
    ];
    let low_end = low_memory_end(mem_bytes);
    if low_end > HIMEM_START {
        map.push(E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820_RAM,
        });
    }
    if mem_bytes > MMIO_GAP_START {
        map.push(E820Entry {
            addr: MMIO_GAP_END,
            size: mem_bytes - MMIO_GAP_START,
            kind: E820_RAM,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemory as _;

    #[test]
    fn small_guest_is_one_region_and_three_e820_entries() {
        let mem = create_guest_memory(64).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.last_addr(), GuestAddress((64 << 20) - 1));
        assert_eq!(
            e820_map(64 << 20),
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: 1
                },
                E820Entry {
                    addr: 0xe0000,
                    size: 0x20000,
                    kind: 2
                },
                E820Entry {
                    addr: 0x10_0000,
                    size: (64 << 20) - 0x10_0000,
                    kind: 1
                },
            ]
        );
    }

    #[test]
    fn large_guest_is_split_around_the_mmio_gap() {
        let bytes = 4u64 << 30;
        assert_eq!(
            ram_ranges(bytes),
            vec![
                (GuestAddress(0), 0xc000_0000),
                (GuestAddress(0x1_0000_0000), 0x4000_0000)
            ]
        );
        let map = e820_map(bytes);
        assert_eq!(map.len(), 4);
        assert_eq!(map[2].addr + map[2].size, MMIO_GAP_START);
        assert_eq!(
            map[3],
            E820Entry {
                addr: 0x1_0000_0000,
                size: 0x4000_0000,
                kind: 1
            }
        );
        let total: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(total, bytes - (HIMEM_START - EBDA_START));
        assert_eq!(low_memory_end(bytes), MMIO_GAP_START);
    }

    #[test]
    fn rejects_tiny_and_absurd_sizes() {
        assert!(matches!(
            create_guest_memory(1),
            Err(MemoryError::Size { mib: 1 })
        ));
        assert!(matches!(
            create_guest_memory(u64::MAX),
            Err(MemoryError::Size { .. })
        ));
    }
}
