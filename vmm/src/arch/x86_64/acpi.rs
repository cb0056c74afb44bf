//! ACPI tables (RSDP, XSDT, FADT, MADT, DSDT) built with the acpi_tables crate.
//!
//! The platform is ACPI hardware-reduced (like Cloud Hypervisor and Firecracker): no PM timer, no
//! SCI, no GPE blocks; power-off goes through the FADT sleep control register and reset through
//! the FADT reset register. The DSDT describes each virtio-mmio window as an `LNRO0005` device,
//! which Linux's virtio_mmio driver binds through its ACPI match table.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout;

/// OEM id written into every table header.
pub const OEM_ID: [u8; 6] = *b"KILN  ";
/// The sleep type the guest writes to power off; the ACPI PM device decodes the same value.
pub use kiln_devices::legacy::S5_SLEEP_TYPE;
/// Most vCPUs the MADT can describe: xAPIC ids are one byte and 0xff is the broadcast id.
pub const MAX_CPUS: u8 = 254;
/// Most virtio-mmio slots: one IOAPIC pin each in `VIRTIO_IRQ_BASE..=VIRTIO_IRQ_MAX`.
pub const MAX_VIRTIO_SLOTS: usize = (layout::VIRTIO_IRQ_MAX - layout::VIRTIO_IRQ_BASE + 1) as usize;

const OEM_REVISION: u32 = 1;
/// `_HID` Linux's virtio_mmio driver matches in its ACPI table.
const VIRTIO_MMIO_HID: &str = "LNRO0005";
/// Tables after the RSDP start on 8-byte boundaries so 64-bit fields are naturally aligned.
const TABLE_ALIGN: u64 = 8;

// MADT layout (ACPI 6.5, 5.2.12): 36-byte header, local APIC address, flags, then subtables.
const MADT_REVISION: u8 = 5;
const MADT_HEADER_LEN: u32 = 44;
const MADT_LAPIC_ADDR_OFFSET: usize = 36;
const MADT_FLAGS_OFFSET: usize = 40;
/// MADT flag: the platform also has dual 8259 PICs (KVM's in-kernel irqchip provides them).
const MADT_PCAT_COMPAT: u32 = 1;
/// The IOAPIC id matches the reset value of KVM's in-kernel IOAPIC ID register.
const IOAPIC_ID: u8 = 0;

// FADT IA-PC boot architecture flags (ACPI 6.5, 5.2.9.3).
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_BOOT_ARCH_MSI_NOT_PRESENT: u16 = 1 << 3;
const IAPC_BOOT_ARCH_PCIE_ASPM_CONTROLS: u16 = 1 << 4;

/// One virtio-mmio device window and the GSI its interrupt is wired to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioSlot {
    /// Guest physical base of the MMIO window.
    pub base: u64,
    /// Size of the MMIO window in bytes.
    pub size: u64,
    /// IOAPIC GSI the device raises (edge-triggered, active-high).
    pub gsi: u32,
}

/// Why the ACPI tables could not be built or written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// A VM needs at least one vCPU.
    #[error("num_cpus is 0: a VM needs at least one vCPU")]
    NoCpus,
    /// More vCPUs than xAPIC ids.
    #[error("num_cpus is {num_cpus}: the MADT describes at most {max} vCPUs (one-byte xAPIC ids)")]
    TooManyCpus {
        /// Requested vCPU count.
        num_cpus: u8,
        /// Largest supported count.
        max: u8,
    },
    /// More virtio-mmio slots than GSIs reserved for them.
    #[error("{count} virtio-mmio slots requested, at most {max} fit in GSIs {first}..={last}")]
    TooManyVirtioSlots {
        /// Requested slot count.
        count: usize,
        /// Largest supported count.
        max: usize,
        /// First GSI reserved for virtio-mmio.
        first: u32,
        /// Last GSI reserved for virtio-mmio.
        last: u32,
    },
    /// A slot's GSI is outside the IOAPIC pins reserved for virtio-mmio.
    #[error("virtio-mmio slot {index}: gsi {gsi} is outside {first}..={last}")]
    GsiOutOfRange {
        /// Slot index.
        index: usize,
        /// Offending GSI.
        gsi: u32,
        /// First GSI reserved for virtio-mmio.
        first: u32,
        /// Last GSI reserved for virtio-mmio.
        last: u32,
    },
    /// Two slots claim the same GSI (the interrupts are exclusive).
    #[error("virtio-mmio slots {first_index} and {second_index} both use gsi {gsi}; each slot needs its own")]
    DuplicateGsi {
        /// GSI used twice.
        gsi: u32,
        /// First slot using it.
        first_index: usize,
        /// Second slot using it.
        second_index: usize,
    },
    /// A slot's window is empty or does not fit a Memory32Fixed descriptor.
    #[error("virtio-mmio slot {index}: window {base:#x}+{size:#x} must be non-empty and end at or below 4 GiB")]
    BadMmioWindow {
        /// Slot index.
        index: usize,
        /// Window base.
        base: u64,
        /// Window size.
        size: u64,
    },
    /// The tables do not fit in the ACPI area.
    #[error(
        "ACPI table {table} would end at {end:#x}, past the end of the ACPI area at {limit:#x}"
    )]
    TablesTooLarge {
        /// Table that overflowed.
        table: &'static str,
        /// Where it would end.
        end: u64,
        /// End of the ACPI area.
        limit: u64,
    },
    /// Writing a table into guest memory failed.
    #[error("writing ACPI table {table} at {addr:#x} into guest memory: {source}")]
    GuestMemory {
        /// Table being written.
        table: &'static str,
        /// Guest address it was written to.
        addr: u64,
        /// The guest memory error.
        source: vm_memory::GuestMemoryError,
    },
}

/// One table, ready to be copied into guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTable {
    /// Signature, "RSDP" for the root pointer (whose real signature is "RSD PTR ").
    pub name: &'static str,
    /// Guest physical address the table is built for.
    pub addr: GuestAddress,
    /// The table bytes, checksums included.
    pub bytes: Vec<u8>,
}

/// Writes RSDP at layout::RSDP_START and XSDT/FADT/MADT/DSDT after it, all inside layout::ACPI_START..MPTABLE_START. Returns the RSDP address.
pub fn create_acpi_tables<M: GuestMemory>(
    mem: &M,
    num_cpus: u8,
    virtio: &[VirtioMmioSlot],
) -> Result<GuestAddress, AcpiError> {
    let tables = build_tables(num_cpus, virtio)?;
    for table in &tables {
        mem.write_slice(&table.bytes, table.addr)
            .map_err(|source| AcpiError::GuestMemory {
                table: table.name,
                addr: table.addr.0,
                source,
            })?;
    }
    tracing::debug!(num_cpus, virtio_slots = virtio.len(), "ACPI tables written");
    Ok(GuestAddress(layout::RSDP_START))
}

/// Builds all tables for the layout's ACPI area, RSDP first, without touching guest memory.
pub fn build_tables(num_cpus: u8, virtio: &[VirtioMmioSlot]) -> Result<Vec<AcpiTable>, AcpiError> {
    build_tables_in(layout::RSDP_START, layout::MPTABLE_START, num_cpus, virtio)
}

/// Hands out consecutive, aligned addresses inside `[next, limit)`.
struct Placer {
    next: u64,
    limit: u64,
}

impl Placer {
    fn place(&mut self, table: &'static str, len: usize) -> Result<u64, AcpiError> {
        let too_large = |end| AcpiError::TablesTooLarge {
            table,
            end,
            limit: self.limit,
        };
        let addr = self
            .next
            .checked_next_multiple_of(TABLE_ALIGN)
            .ok_or(too_large(u64::MAX))?;
        let end = addr.checked_add(len as u64).ok_or(too_large(u64::MAX))?;
        if end > self.limit {
            return Err(too_large(end));
        }
        self.next = end;
        Ok(addr)
    }
}

fn build_tables_in(
    start: u64,
    limit: u64,
    num_cpus: u8,
    virtio: &[VirtioMmioSlot],
) -> Result<Vec<AcpiTable>, AcpiError> {
    check_inputs(num_cpus, virtio)?;
    let mut placer = Placer { next: start, limit };
    // The RSDP goes first, at `start`, where the guest's legacy scan looks for it.
    let rsdp_addr = placer.place("RSDP", Rsdp::len())?;

    let dsdt = dsdt(virtio);
    let dsdt_addr = placer.place("DSDT", dsdt.len())?;
    let fadt = fadt(dsdt_addr);
    let fadt_addr = placer.place("FACP", fadt.len())?;
    let madt = madt(num_cpus);
    let madt_addr = placer.place("APIC", madt.len())?;
    let xsdt = xsdt(&[fadt_addr, madt_addr]);
    let xsdt_addr = placer.place("XSDT", xsdt.len())?;
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    let table = |name, addr, bytes| AcpiTable {
        name,
        addr: GuestAddress(addr),
        bytes,
    };
    Ok(vec![
        table("RSDP", rsdp_addr, rsdp),
        table("DSDT", dsdt_addr, dsdt),
        table("FACP", fadt_addr, fadt),
        table("APIC", madt_addr, madt),
        table("XSDT", xsdt_addr, xsdt),
    ])
}

fn check_inputs(num_cpus: u8, virtio: &[VirtioMmioSlot]) -> Result<(), AcpiError> {
    if num_cpus == 0 {
        return Err(AcpiError::NoCpus);
    }
    if num_cpus > MAX_CPUS {
        return Err(AcpiError::TooManyCpus {
            num_cpus,
            max: MAX_CPUS,
        });
    }
    let (first, last) = (layout::VIRTIO_IRQ_BASE, layout::VIRTIO_IRQ_MAX);
    if virtio.len() > MAX_VIRTIO_SLOTS {
        return Err(AcpiError::TooManyVirtioSlots {
            count: virtio.len(),
            max: MAX_VIRTIO_SLOTS,
            first,
            last,
        });
    }
    for (index, slot) in virtio.iter().enumerate() {
        if !(first..=last).contains(&slot.gsi) {
            return Err(AcpiError::GsiOutOfRange {
                index,
                gsi: slot.gsi,
                first,
                last,
            });
        }
        if let Some(first_index) = virtio[..index].iter().position(|s| s.gsi == slot.gsi) {
            return Err(AcpiError::DuplicateGsi {
                gsi: slot.gsi,
                first_index,
                second_index: index,
            });
        }
        let fits_32bit = slot
            .base
            .checked_add(slot.size)
            .is_some_and(|end| end <= 1 << 32);
        if slot.size == 0 || !fits_32bit {
            return Err(AcpiError::BadMmioWindow {
                index,
                base: slot.base,
                size: slot.size,
            });
        }
    }
    Ok(())
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

fn oem_table_id(signature: &[u8; 4]) -> [u8; 8] {
    let mut id = *b"KILN    ";
    id[4..].copy_from_slice(signature);
    id
}

fn dsdt(virtio: &[VirtioMmioSlot]) -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, oem_table_id(b"DSDT"), OEM_REVISION);

    // SLP_TYPa only: with a hardware-reduced FADT the guest writes it to the sleep control
    // register; the second element (SLP_TYPb) is unused there.
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLEEP_TYPE, &aml::ZERO]),
    );
    dsdt.append_slice(&to_bytes(&s5));

    let devices: Vec<Vec<u8>> = [com1_device(), rtc_device()]
        .into_iter()
        .chain(
            virtio
                .iter()
                .enumerate()
                .map(|(index, slot)| virtio_device(index, slot)),
        )
        .collect();
    let device_amls: Vec<RawAml> = devices.into_iter().map(RawAml).collect();
    let children: Vec<&dyn Aml> = device_amls.iter().map(|d| d as &dyn Aml).collect();
    dsdt.append_slice(&to_bytes(&aml::Scope::new("\\_SB_".into(), children)));
    dsdt.as_slice().to_vec()
}

/// `Device (COM1)`: `_HID PNP0501` (a 16550-compatible UART) with its I/O ports and IRQ 4.
///
/// A hardware-reduced ACPI guest has no legacy PIC (Linux installs `null_legacy_pic`), so it
/// maps no ISA IRQs to IOAPIC pins by itself: a UART known only by its legacy port gets no
/// usable interrupt, and everything written through the tty layer (all of user space) waits
/// forever for a THR-empty interrupt, while the kernel console, which polls, still works.
/// Announcing the UART with its interrupt in `_CRS` makes the guest's PNP driver
/// (8250_pnp) register GSI 4 with the IOAPIC, as Firecracker and Cloud Hypervisor do.
fn com1_device() -> Vec<u8> {
    let port = layout::COM1_PORT;
    let io = aml::IO::new(port, port, 1, 8);
    let irq = aml::Interrupt::new(true, true, false, false, layout::COM1_IRQ);
    let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let ddn = aml::Name::new("_DDN".into(), &"COM1");
    let crs = aml::Name::new("_CRS".into(), &crs);
    to_bytes(&aml::Device::new(
        "COM1".into(),
        vec![&hid, &uid, &ddn, &crs],
    ))
}

/// `Device (RTC)`: `_HID PNP0B00` (the PC's CMOS RTC) with its two I/O ports and no
/// interrupt.
///
/// Without it Linux registers a platform `rtc_cmos` device with ISA IRQ 8, which a
/// hardware-reduced guest cannot map (and which a fourth virtio device's GSI may hold): its
/// probe failed with -EINVAL and the guest had no `/dev/rtc0`. Found through PNP with no IRQ in
/// `_CRS`, `rtc_cmos` binds without one (no alarm interrupts: kiln's RTC raises none).
fn rtc_device() -> Vec<u8> {
    let port = layout::CMOS_PORT;
    let io = aml::IO::new(port, port, 1, 2);
    let crs = aml::ResourceTemplate::new(vec![&io]);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0B00"));
    let crs = aml::Name::new("_CRS".into(), &crs);
    to_bytes(&aml::Device::new("RTC_".into(), vec![&hid, &crs]))
}

/// Already-encoded AML, so devices built one by one can go into a single `Scope`.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// `Device (VRnn)` with `_HID "LNRO0005"`, `_UID`, and `_CRS` = MMIO window + exclusive edge GSI.
fn virtio_device(index: usize, slot: &VirtioMmioSlot) -> Vec<u8> {
    // check_inputs keeps the window below 4 GiB and the index below MAX_VIRTIO_SLOTS, so these
    // conversions and the two-hex-digit name cannot fail; the fallbacks only keep this panic-free.
    let base = u32::try_from(slot.base).unwrap_or(u32::MAX);
    let size = u32::try_from(slot.size).unwrap_or(0);
    let uid = u32::try_from(index).unwrap_or(u32::MAX);
    let name = format!("VR{:02X}", index & 0xff);

    let mmio = aml::Memory32Fixed::new(true, base, size);
    let irq = aml::Interrupt::new(true, true, false, false, slot.gsi);
    let crs = aml::ResourceTemplate::new(vec![&mmio, &irq]);
    let hid = aml::Name::new("_HID".into(), &VIRTIO_MMIO_HID);
    let uid = aml::Name::new("_UID".into(), &uid);
    let crs = aml::Name::new("_CRS".into(), &crs);
    to_bytes(&aml::Device::new(
        name.as_str().into(),
        vec![&hid, &uid, &crs],
    ))
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let sleep_control = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        layout::ACPI_SLEEP_CONTROL_PORT.into(),
    );
    let sleep_status = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        layout::ACPI_SLEEP_STATUS_PORT.into(),
    );
    let reset = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        layout::ACPI_RESET_PORT.into(),
    );
    let mut fadt = FADTBuilder::new(OEM_ID, oem_table_id(b"FACP"), OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    fadt.sleep_control_reg = sleep_control;
    fadt.sleep_status_reg = sleep_status;
    fadt.reset_reg = reset;
    fadt.reset_value = layout::ACPI_RESET_VALUE;
    // No VGA, no MSI (there is no PCI bus), and hands off ASPM. The 8042 bit stays clear: kiln's
    // i8042 only implements the reset command, so the guest's keyboard driver should not probe
    // it (`reboot=k` writes the controller directly and still works).
    fadt.iapc_boot_arch = (IAPC_BOOT_ARCH_VGA_NOT_PRESENT
        | IAPC_BOOT_ARCH_MSI_NOT_PRESENT
        | IAPC_BOOT_ARCH_PCIE_ASPM_CONTROLS)
        .into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"KILNVMM ").into();
    to_bytes(&fadt.finalize())
}

fn madt(num_cpus: u8) -> Vec<u8> {
    // Built on the generic Sdt rather than acpi_tables' MADT type so the header fields and
    // subtables are written explicitly in the order the spec lists them.
    let mut madt = Sdt::new(
        *b"APIC",
        MADT_HEADER_LEN,
        MADT_REVISION,
        OEM_ID,
        oem_table_id(b"APIC"),
        OEM_REVISION,
    );
    // The local APIC address field is 32 bits wide; APIC_START (0xfee0_0000) fits.
    madt.write_u32(MADT_LAPIC_ADDR_OFFSET, layout::APIC_START as u32);
    madt.write_u32(MADT_FLAGS_OFFSET, MADT_PCAT_COMPAT);
    for id in 0..num_cpus {
        madt.append_slice(&to_bytes(&ProcessorLocalApic::new(
            id,
            id,
            EnabledStatus::Enabled,
        )));
    }
    madt.append_slice(&to_bytes(&IoApic::new(
        IOAPIC_ID,
        layout::IOAPIC_START as u32,
        0,
    )));
    // Deliberately no interrupt source override for ISA IRQ0 -> GSI 2. QEMU advertises one
    // because it also reroutes KVM's GSI 0 to IOAPIC pin 2; kiln keeps KVM's default routing,
    // where the in-kernel PIT raises GSI 0 on pin 0, so identity mapping (no override) is the
    // truth. Firecracker and Cloud Hypervisor do the same, and a hardware-reduced Linux guest
    // does not set up the PIT timer interrupt at all.
    madt.as_slice().to_vec()
}

fn xsdt(entries: &[u64]) -> Vec<u8> {
    let mut xsdt = XSDT::new(OEM_ID, oem_table_id(b"XSDT"), OEM_REVISION);
    for &entry in entries {
        xsdt.add_entry(entry);
    }
    to_bytes(&xsdt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;

    fn slots(n: usize) -> Vec<VirtioMmioSlot> {
        (0..n)
            .map(|i| VirtioMmioSlot {
                base: layout::VIRTIO_MMIO_START + i as u64 * layout::VIRTIO_MMIO_SIZE,
                size: layout::VIRTIO_MMIO_SIZE,
                gsi: layout::VIRTIO_IRQ_BASE + i as u32,
            })
            .collect()
    }

    fn find<'a>(tables: &'a [AcpiTable], name: &str) -> &'a AcpiTable {
        tables
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no {name} table"))
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }

    fn u32_at(bytes: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], offset: usize) -> u64 {
        u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
    }

    fn count(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count()
    }

    /// (type, bytes) of each MADT subtable.
    fn madt_subtables(madt: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut offset = MADT_HEADER_LEN as usize;
        while offset < madt.len() {
            let len = madt[offset + 1] as usize;
            assert!(len >= 2, "zero-length MADT subtable at {offset}");
            out.push((madt[offset], madt[offset..offset + len].to_vec()));
            offset += len;
        }
        assert_eq!(offset, madt.len());
        out
    }

    #[test]
    fn every_table_checksums_to_zero_and_declares_its_length() {
        let tables = build_tables(4, &slots(3)).unwrap();
        assert_eq!(tables.len(), 5);
        for t in &tables {
            if t.name == "RSDP" {
                assert_eq!(sum(&t.bytes[..20]), 0, "RSDP v1 checksum");
                assert_eq!(sum(&t.bytes), 0, "RSDP extended checksum");
                continue;
            }
            assert_eq!(sum(&t.bytes), 0, "{} checksum", t.name);
            assert_eq!(&t.bytes[..4], t.name.as_bytes());
            assert_eq!(
                u32_at(&t.bytes, 4) as usize,
                t.bytes.len(),
                "{} length",
                t.name
            );
            assert_eq!(&t.bytes[10..16], b"KILN  ", "{} OEM id", t.name);
        }
    }

    #[test]
    fn rsdp_is_revision_2_at_rsdp_start_and_points_at_the_xsdt() {
        let tables = build_tables(1, &[]).unwrap();
        let rsdp = find(&tables, "RSDP");
        assert_eq!(rsdp.addr, GuestAddress(layout::RSDP_START));
        assert_eq!(rsdp.addr.0 % 16, 0);
        assert_eq!(&rsdp.bytes[..8], b"RSD PTR ");
        assert_eq!(rsdp.bytes[15], 2, "revision");
        assert_eq!(u32_at(&rsdp.bytes, 20), 36, "length");
        assert_eq!(u64_at(&rsdp.bytes, 24), find(&tables, "XSDT").addr.0);
    }

    #[test]
    fn xsdt_lists_fadt_and_madt_and_fadt_points_at_dsdt() {
        let tables = build_tables(2, &slots(1)).unwrap();
        let xsdt = &find(&tables, "XSDT").bytes;
        assert_eq!(xsdt.len(), 36 + 16);
        assert_eq!(u64_at(xsdt, 36), find(&tables, "FACP").addr.0);
        assert_eq!(u64_at(xsdt, 44), find(&tables, "APIC").addr.0);
        let fadt = &find(&tables, "FACP").bytes;
        assert_eq!(u64_at(fadt, 140), find(&tables, "DSDT").addr.0, "X_DSDT");
        assert_eq!(u32_at(fadt, 40), 0, "32-bit DSDT unused");
    }

    #[test]
    fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
        let tables = build_tables(1, &[]).unwrap();
        let fadt = &find(&tables, "FACP").bytes;
        assert_eq!(fadt.len(), 276);
        assert_eq!(fadt[8], 6, "major revision");
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & Flags::HwReducedAcpi as u32, 0);
        assert_ne!(flags & Flags::ResetRegSup as u32, 0);
        // GAS: space id, bit width, bit offset, access size, address.
        let io_byte = |port: u16| {
            let mut g = vec![1u8, 8, 0, 1];
            g.extend_from_slice(&u64::from(port).to_le_bytes());
            g
        };
        assert_eq!(fadt[116..128], io_byte(layout::ACPI_RESET_PORT)[..]);
        assert_eq!(fadt[128], layout::ACPI_RESET_VALUE);
        assert_eq!(fadt[244..256], io_byte(layout::ACPI_SLEEP_CONTROL_PORT)[..]);
        assert_eq!(fadt[256..268], io_byte(layout::ACPI_SLEEP_STATUS_PORT)[..]);
        let boot_arch = u16::from_le_bytes([fadt[109], fadt[110]]);
        assert_ne!(boot_arch & IAPC_BOOT_ARCH_VGA_NOT_PRESENT, 0);
    }

    #[test]
    fn madt_has_one_enabled_lapic_per_cpu_and_one_ioapic() {
        for n in [1u8, 2, 8, MAX_CPUS] {
            let tables = build_tables(n, &[]).unwrap();
            let madt = &find(&tables, "APIC").bytes;
            assert_eq!(u32_at(madt, 36), layout::APIC_START as u32);
            let subs = madt_subtables(madt);
            let lapics: Vec<_> = subs.iter().filter(|(t, _)| *t == 0).collect();
            assert_eq!(lapics.len(), n as usize);
            for (i, (_, b)) in lapics.iter().enumerate() {
                assert_eq!((b[2], b[3]), (i as u8, i as u8), "uid, apic id");
                assert_eq!(u32_at(b, 4), 1, "enabled");
            }
            let ioapics: Vec<_> = subs.iter().filter(|(t, _)| *t == 1).collect();
            assert_eq!(ioapics.len(), 1);
            assert_eq!(u32_at(&ioapics[0].1, 4), layout::IOAPIC_START as u32);
            assert_eq!(u32_at(&ioapics[0].1, 8), 0, "GSI base");
            assert!(
                subs.iter().all(|(t, _)| *t != 2),
                "no interrupt source override"
            );
        }
    }

    #[test]
    fn dsdt_has_s5_and_one_lnro0005_device_per_slot() {
        for n in [0, 1, 5, MAX_VIRTIO_SLOTS] {
            let tables = build_tables(1, &slots(n)).unwrap();
            let dsdt = &find(&tables, "DSDT").bytes;
            assert_eq!(count(dsdt, b"LNRO0005"), n);
            assert_eq!(count(dsdt, b"_S5_"), 1);
            for i in 0..n {
                assert_eq!(count(dsdt, format!("VR{i:02X}").as_bytes()), 1);
            }
        }
    }

    #[test]
    fn tables_stay_inside_the_acpi_area_without_overlapping() {
        let tables = build_tables(MAX_CPUS, &slots(MAX_VIRTIO_SLOTS)).unwrap();
        let mut ranges: Vec<(u64, u64)> = tables
            .iter()
            .map(|t| (t.addr.0, t.addr.0 + t.bytes.len() as u64))
            .collect();
        ranges.sort();
        assert_eq!(ranges[0].0, layout::RSDP_START);
        for pair in ranges.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "overlap: {pair:?}");
        }
        assert!(ranges
            .iter()
            .all(|r| r.0 >= layout::ACPI_START && r.1 <= layout::MPTABLE_START));
    }

    #[test]
    fn too_small_an_area_is_a_clear_error() {
        let err = build_tables_in(0x1000, 0x1100, 4, &slots(4)).unwrap_err();
        assert!(
            matches!(err, AcpiError::TablesTooLarge { limit: 0x1100, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("past the end of the ACPI area"));
    }

    #[test]
    fn bad_inputs_are_rejected_with_clear_errors() {
        let too_many = build_tables(1, &slots(MAX_VIRTIO_SLOTS + 1)).unwrap_err();
        assert!(matches!(too_many, AcpiError::TooManyVirtioSlots { .. }));
        assert!(too_many.to_string().contains("at most 19"), "{too_many}");

        let mut s = slots(2);
        s[1].gsi = layout::VIRTIO_IRQ_MAX + 1;
        let err = build_tables(1, &s).unwrap_err();
        assert!(
            matches!(
                err,
                AcpiError::GsiOutOfRange {
                    index: 1,
                    gsi: 24,
                    ..
                }
            ),
            "{err}"
        );

        let mut s = slots(2);
        s[1].gsi = s[0].gsi;
        let err = build_tables(1, &s).unwrap_err();
        assert!(matches!(
            err,
            AcpiError::DuplicateGsi {
                first_index: 0,
                second_index: 1,
                ..
            }
        ));

        let mut s = slots(1);
        s[0].base = 0xffff_f800;
        assert!(matches!(
            build_tables(1, &s).unwrap_err(),
            AcpiError::BadMmioWindow { index: 0, .. }
        ));
        assert!(matches!(
            build_tables(0, &[]).unwrap_err(),
            AcpiError::NoCpus
        ));
        assert!(matches!(
            build_tables(255, &[]).unwrap_err(),
            AcpiError::TooManyCpus { .. }
        ));
    }

    #[test]
    fn create_acpi_tables_writes_every_table_into_guest_memory() {
        let mem =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let virtio = slots(2);
        let rsdp = create_acpi_tables(&mem, 2, &virtio).unwrap();
        assert_eq!(rsdp, GuestAddress(layout::RSDP_START));
        for t in build_tables(2, &virtio).unwrap() {
            let mut read = vec![0u8; t.bytes.len()];
            mem.read_slice(&mut read, t.addr).unwrap();
            assert_eq!(read, t.bytes, "{} in guest memory", t.name);
        }
    }

    #[test]
    fn create_acpi_tables_reports_missing_guest_memory() {
        let mem =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let err = create_acpi_tables(&mem, 1, &[]).unwrap_err();
        assert!(
            matches!(err, AcpiError::GuestMemory { table: "RSDP", .. }),
            "{err}"
        );
    }

    /// Disassembles `bytes` with `iasl -d`; `None` (after printing why) when iasl is missing.
    fn iasl_disassemble(dir: &Path, name: &str, bytes: &[u8]) -> Option<String> {
        let dat = dir.join(format!("{name}.dat"));
        std::fs::write(&dat, bytes).unwrap();
        let output = match Command::new("iasl")
            .arg("-d")
            .arg(&dat)
            .current_dir(dir)
            .output()
        {
            Ok(output) => output,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // CI installs acpica-tools (.ci/install-deps), so there a missing iasl fails.
                let on_ci =
                    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
                assert!(
                    !on_ci,
                    "CI is set and iasl is not installed; .ci/install-deps installs acpica-tools"
                );
                eprintln!("skipped: iasl not found (apt-get install acpica-tools)");
                return None;
            }
            Err(e) => panic!("running iasl: {e}"),
        };
        assert!(
            output.status.success(),
            "iasl -d {name} failed: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let dsl = dir.join(format!("{name}.dsl"));
        let text =
            std::fs::read_to_string(&dsl).unwrap_or_else(|e| panic!("{}: {e}", dsl.display()));

        // Compiling the disassembly back must be clean too: that catches AML iasl can print
        // but considers wrong (bad resource descriptors, malformed names, bad subtable lengths).
        let output = Command::new("iasl")
            .arg("-p")
            .arg(dir.join(format!("{name}-recompiled")))
            .arg(&dsl)
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "iasl {name}.dsl failed: {log}");
        assert!(
            log.contains("0 Errors, 0 Warnings"),
            "iasl {name}.dsl: {log}"
        );
        Some(text)
    }

    /// The disassembled `Device (name)` of a DSDT, up to the next device.
    fn device_body<'a>(dsdt: &'a str, name: &str) -> &'a str {
        let body = dsdt
            .split(&format!("Device ({name})"))
            .nth(1)
            .unwrap_or_else(|| panic!("no {name} device:\n{dsdt}"));
        &body[..body.find("Device (").unwrap_or(body.len())]
    }

    #[test]
    fn iasl_disassembles_every_table() {
        let dir = tempfile::tempdir().unwrap();
        let virtio = slots(3);
        let tables = build_tables(3, &virtio).unwrap();
        let mut dsl = std::collections::HashMap::new();
        // iasl cannot load a bare RSDP (it has no length field at offset 4);
        // rsdp_is_revision_2_at_rsdp_start_and_points_at_the_xsdt checks its bytes instead.
        for t in tables.iter().filter(|t| t.name != "RSDP") {
            match iasl_disassemble(dir.path(), t.name, &t.bytes) {
                Some(text) => dsl.insert(t.name, text),
                None => return,
            };
        }

        let dsdt = &dsl["DSDT"];
        assert_eq!(dsdt.matches("\"LNRO0005\"").count(), 3, "{dsdt}");
        assert!(dsdt.contains("_S5_"), "{dsdt}");
        for (i, slot) in virtio.iter().enumerate() {
            assert!(dsdt.contains(&format!("Device (VR{i:02X})")), "{dsdt}");
            assert!(dsdt.contains(&format!("0x{:08X}", slot.base)), "{dsdt}");
            assert!(dsdt.contains(&format!("0x{:08X},", slot.gsi)), "{dsdt}");
        }
        assert!(dsdt.contains("Memory32Fixed (ReadWrite"), "{dsdt}");
        // COM1 with its ports and IRQ 4: without it a hardware-reduced Linux guest maps no
        // interrupt for the UART and user-space console output is lost.
        let com1 = device_body(dsdt, "COM1");
        assert!(com1.contains("EisaId (\"PNP0501\")"), "{com1}");
        assert!(
            com1.contains("IO (Decode16,\n") || com1.contains("IO (Decode16,"),
            "{com1}"
        );
        assert!(com1.contains("0x03F8,"), "{com1}");
        assert!(com1.contains("0x00000004,"), "{com1}");
        assert!(
            dsdt.contains("Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive"),
            "{dsdt}"
        );

        // The CMOS RTC by its ports alone: no interrupt it would never raise.
        let rtc = device_body(dsdt, "RTC");
        assert!(rtc.contains("EisaId (\"PNP0B00\")"), "{rtc}");
        assert!(rtc.contains("0x0070,"), "{rtc}");
        assert!(!rtc.contains("Interrupt"), "{rtc}");

        let madt = &dsl["APIC"];
        assert_eq!(madt.matches("[Processor Local APIC]").count(), 3, "{madt}");
        assert_eq!(madt.matches("[I/O APIC]").count(), 1, "{madt}");
        assert!(madt.contains("FEE00000"), "{madt}");

        let fadt = &dsl["FACP"];
        let flag_set = |label: &str| {
            fadt.lines()
                .any(|l| l.contains(label) && l.trim_end().ends_with(": 1"))
        };
        assert!(flag_set("Hardware Reduced"), "{fadt}");
        assert!(flag_set("Reset Register Supported"), "{fadt}");
        assert!(flag_set("VGA Not Present"), "{fadt}");
        assert!(fadt.contains("0000000000000600"), "{fadt}");

        let xsdt = &dsl["XSDT"];
        assert!(
            xsdt.contains(&format!("{:016X}", find(&tables, "FACP").addr.0)),
            "{xsdt}"
        );

        for text in dsl.values() {
            assert!(!text.to_lowercase().contains("invalid checksum"), "{text}");
        }
    }
}
