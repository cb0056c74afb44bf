//! The Intel MultiProcessor Specification (1.4) table, for guests without ACPI.
//!
//! A Linux kernel built without ACPI, or booted with `acpi=off` (the kernels `--virtio-cmdline`
//! is for), finds the IOAPIC and the other CPUs only through an MP table. Without one it runs
//! the legacy PIC in virtual-wire mode on one CPU, and the virtio-mmio interrupts (GSIs 5..=23,
//! IOAPIC pins) and COM1's never arrive: seen in the nested proving ground, where such a guest
//! hung at its first disk read while QEMU's microvm (whose firmware writes an MP table) booted
//! the same kernel (docs/nested.md). Firecracker writes one for the same reason.
//!
//! With ACPI the guest ignores this table and uses the MADT, which describes the same machine.
//! Layout: the floating pointer and the configuration table right after it, at
//! [`layout::MPTABLE_START`] in the BIOS area the guest scans (0xF0000..0x100000).

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout;

/// `_MP_`: the floating pointer structure's signature.
const FLOATING_SIGNATURE: &[u8; 4] = b"_MP_";
/// `PCMP`: the configuration table's signature.
const CONFIG_SIGNATURE: &[u8; 4] = b"PCMP";
/// MP specification revision 1.4.
const SPEC_REV: u8 = 4;
const FLOATING_LEN: usize = 16;
const CONFIG_HEADER_LEN: usize = 44;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

/// Local APIC version of an integrated (xAPIC) local APIC, as KVM's reports.
const LAPIC_VERSION: u8 = 0x14;
/// IOAPIC version of KVM's in-kernel IOAPIC.
const IOAPIC_VERSION: u8 = 0x11;
/// CPU flags: enabled; bootstrap processor.
const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTSTRAP: u8 = 1 << 1;
/// Family 6 signature and FPU + APIC feature flags: what the table says, not what CPUID says
/// (Linux takes the CPU's real features from CPUID).
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
/// IOAPIC pins: KVM's in-kernel IOAPIC has 24.
const IOAPIC_PINS: u8 = 24;

/// Why the MP table could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// A VM needs at least one vCPU.
    #[error("num_cpus is 0: the MP table needs at least one processor")]
    NoCpus,
    /// The table does not fit in its area.
    #[error(
        "the MP table for {num_cpus} vCPUs needs {size} bytes, more than the {room} at {start:#x}"
    )]
    TooLarge {
        /// vCPUs asked for.
        num_cpus: u8,
        /// Bytes the table needs.
        size: usize,
        /// Bytes available.
        room: u64,
        /// Where it would start.
        start: u64,
    },
    /// Writing guest memory failed.
    #[error("writing the MP table at {addr:#x}: {source}")]
    GuestMemory {
        /// Guest address.
        addr: u64,
        /// The error.
        source: vm_memory::GuestMemoryError,
    },
}

/// The IOAPIC's id in the MP table: after every local APIC id (MP ids share one namespace;
/// at most 254 vCPUs, as in the MADT, so it is never the broadcast id 0xff).
pub fn ioapic_id(num_cpus: u8) -> u8 {
    num_cpus
}

/// Bytes that make `bytes` sum to zero (mod 256) when stored in its checksum field.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// The floating pointer and configuration table for `num_cpus` vCPUs, to be placed at `start`.
pub fn build(num_cpus: u8, start: u64) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 {
        return Err(MptableError::NoCpus);
    }
    let ioapic = ioapic_id(num_cpus);
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(layout::IOAPIC_START as u32).to_le_bytes());
    count += 1;
    // Every IOAPIC pin as the ISA IRQ of the same number: edge-triggered, active-high
    // ("conforming" for ISA), as the DSDT describes COM1 (IRQ 4) and the virtio-mmio devices.
    for pin in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, 0, pin, ioapic, pin]);
        count += 1;
    }
    // LINT0 of every local APIC is the PIC's ExtINT; LINT1 is NMI.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let config_addr = start + FLOATING_LEN as u64;
    let config_len = CONFIG_HEADER_LEN + entries.len();
    let mut config = Vec::with_capacity(config_len);
    config.extend_from_slice(CONFIG_SIGNATURE);
    config.extend_from_slice(&(config_len as u16).to_le_bytes());
    config.extend_from_slice(&[SPEC_REV, 0]); // checksum filled in below
    config.extend_from_slice(b"KILN    ");
    config.extend_from_slice(b"KILN VM     ");
    config.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    config.extend_from_slice(&0u16.to_le_bytes());
    config.extend_from_slice(&count.to_le_bytes());
    config.extend_from_slice(&(layout::APIC_START as u32).to_le_bytes());
    config.extend_from_slice(&[0, 0, 0, 0]); // no extended table; reserved
    debug_assert_eq!(config.len(), CONFIG_HEADER_LEN);
    config.extend_from_slice(&entries);
    config[7] = checksum(&config);

    let mut table = Vec::with_capacity(FLOATING_LEN + config.len());
    table.extend_from_slice(FLOATING_SIGNATURE);
    table.extend_from_slice(&(config_addr as u32).to_le_bytes());
    // Length in 16-byte units, revision, checksum, feature bytes 1..5 (0: a configuration
    // table is present; no IMCR, virtual-wire mode).
    table.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    table[10] = checksum(&table);
    table.extend_from_slice(&config);
    Ok(table)
}

/// Writes the MP table for `num_cpus` vCPUs at [`layout::MPTABLE_START`].
pub fn setup_mptable<M: GuestMemory>(mem: &M, num_cpus: u8) -> Result<(), MptableError> {
    let start = layout::MPTABLE_START;
    let table = build(num_cpus, start)?;
    let room = layout::ACPI_END - start;
    if table.len() as u64 > room {
        return Err(MptableError::TooLarge {
            num_cpus,
            size: table.len(),
            room,
            start,
        });
    }
    mem.write_slice(&table, GuestAddress(start))
        .map_err(|source| MptableError::GuestMemory {
            addr: start,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROCESSOR_ENTRY_LEN: usize = 20;
    const SHORT_ENTRY_LEN: usize = 8;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    /// Walks the table as Linux's `smp_read_mpc` does and returns (cpus, bootstrap id, ioapics,
    /// io interrupts, local interrupts).
    fn parse(table: &[u8], start: u64) -> (Vec<u8>, u8, Vec<(u8, u32)>, usize, usize) {
        assert_eq!(&table[..4], b"_MP_");
        assert_eq!(sum(&table[..16]), 0, "floating pointer checksum");
        assert_eq!(table[8], 1);
        assert_eq!(table[9], 4);
        let physptr = u32::from_le_bytes(table[4..8].try_into().unwrap()) as u64;
        let config = &table[(physptr - start) as usize..];
        assert_eq!(&config[..4], b"PCMP");
        let len = u16::from_le_bytes([config[4], config[5]]) as usize;
        assert_eq!(sum(&config[..len]), 0, "configuration table checksum");
        assert_eq!(
            u32::from_le_bytes(config[36..40].try_into().unwrap()),
            0xfee0_0000
        );
        let count = u16::from_le_bytes([config[34], config[35]]) as usize;
        let (mut cpus, mut bsp, mut ioapics, mut io, mut local) = (vec![], 0xff, vec![], 0, 0);
        let mut at = CONFIG_HEADER_LEN;
        for _ in 0..count {
            let e = &config[at..];
            at += match e[0] {
                ENTRY_PROCESSOR => {
                    assert_ne!(e[3] & CPU_ENABLED, 0);
                    if e[3] & CPU_BOOTSTRAP != 0 {
                        bsp = e[1];
                    }
                    cpus.push(e[1]);
                    PROCESSOR_ENTRY_LEN
                }
                ENTRY_BUS => {
                    assert_eq!(&e[2..8], b"ISA   ");
                    SHORT_ENTRY_LEN
                }
                ENTRY_IOAPIC => {
                    ioapics.push((e[1], u32::from_le_bytes(e[4..8].try_into().unwrap())));
                    SHORT_ENTRY_LEN
                }
                ENTRY_IO_INTERRUPT => {
                    assert_eq!(e[5], e[7], "ISA IRQ n is IOAPIC pin n");
                    io += 1;
                    SHORT_ENTRY_LEN
                }
                ENTRY_LOCAL_INTERRUPT => {
                    local += 1;
                    SHORT_ENTRY_LEN
                }
                other => panic!("unknown entry type {other}"),
            };
        }
        assert_eq!(at, len, "entries fill the table exactly");
        (cpus, bsp, ioapics, io, local)
    }

    #[test]
    fn the_table_describes_every_vcpu_the_ioapic_and_its_24_pins_with_valid_checksums() {
        for n in [1u8, 2, 8, crate::arch::x86_64::acpi::MAX_CPUS] {
            let start = layout::MPTABLE_START;
            let table = build(n, start).unwrap();
            let (cpus, bsp, ioapics, io, local) = parse(&table, start);
            assert_eq!(cpus, (0..n).collect::<Vec<_>>());
            assert_eq!(bsp, 0);
            assert_eq!(ioapics, [(ioapic_id(n), layout::IOAPIC_START as u32)]);
            assert!(!cpus.contains(&ioapic_id(n)));
            assert_eq!((io, local), (24, 2));
            assert!(
                table.len() as u64 <= layout::ACPI_END - start,
                "{n}: {}",
                table.len()
            );
        }
    }

    #[test]
    fn zero_vcpus_is_refused() {
        assert!(matches!(build(0, 0), Err(MptableError::NoCpus)));
    }
}
