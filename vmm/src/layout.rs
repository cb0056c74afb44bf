//! Guest physical memory and I/O port layout of a kiln x86_64 VM.
//!
//! Everything a guest can rely on lives here, in one place, so the boot code, the ACPI tables,
//! the devices and the documentation cannot disagree.

/// Global descriptor table used for 64-bit and PVH entry.
pub const GDT_START: u64 = 0x500;
/// Interrupt descriptor table placeholder (an empty IDT: the guest installs its own).
pub const IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH `hvm_modlist_entry` array (one entry: the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH `hvm_memmap_table_entry` array.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Linux `boot_params` ("zero page") for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer handed to the guest.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page map for 64-bit entry.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Four page directories with 2 MiB pages: identity map of the first 4 GiB.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line kiln hands over (Linux x86 `COMMAND_LINE_SIZE`, including the NUL).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: low RAM ends here in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables area, inside the legacy BIOS scan range so the RSDP is found by scanning too.
pub const ACPI_START: u64 = 0xe0000;
/// RSDP location (in the 0xE0000-0xFFFFF scan area, 16-byte aligned).
pub const RSDP_START: u64 = ACPI_START;
/// The MP table (for guests without ACPI), in the upper half of the area, which Linux scans for
/// its floating pointer; the ACPI tables stay below it.
pub const MPTABLE_START: u64 = 0xf_0000;
/// End (exclusive) of the ACPI area (ACPI tables, then the MP table); reserved in the e820 map.
pub const ACPI_END: u64 = 0x10_0000;
/// Where high RAM, and the kernel, start.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO gap: RAM above this address is moved above 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End (exclusive) of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First GSI given to virtio-mmio devices (GSIs stay below 24: the IOAPIC's pins).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last usable GSI for virtio-mmio devices.
pub const VIRTIO_IRQ_MAX: u32 = 23;
/// In-kernel IOAPIC.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC.
pub const APIC_START: u64 = 0xfee0_0000;

/// COM1 16550 UART.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 interrupt line.
pub const COM1_IRQ: u32 = 4;
/// CMOS RTC (index 0x70, data 0x71).
pub const CMOS_PORT: u16 = 0x70;
/// i8042 controller (data 0x60, command/status 0x64).
pub const I8042_PORT: u16 = 0x60;
/// ACPI sleep control register (hardware-reduced FADT): SLP_TYP=5 | SLP_EN powers off.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// ACPI sleep status register.
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// ACPI reset register: writing [`ACPI_RESET_VALUE`] resets the VM.
pub const ACPI_RESET_PORT: u16 = 0x602;
/// Value the FADT tells the guest to write to [`ACPI_RESET_PORT`].
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// kiln exit port: a byte written here ends the VM with that byte as its exit status.
pub const EXIT_PORT: u16 = 0x501;
/// kiln marker port: a 1-, 2- or 4-byte phase number written here is timestamped.
pub const MARKER_PORT: u16 = 0x502;
