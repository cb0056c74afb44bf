//! Builders for the two boot structures: Linux `boot_params` (zero page) and PVH
//! `hvm_start_info`. Pure functions, so tests check every field without a VM.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{ByteValued, GuestAddress};

use super::{write_guest, BootError};
use crate::layout::{
    CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};
use crate::memory::{E820Entry, GuestMemory};

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// Most e820 entries `boot_params` holds.
const E820_MAX: usize = 128;

/// Builds the zero page for the 64-bit Linux boot protocol.
///
/// `header` is the bzImage's setup header (kept, as the protocol asks); for an ELF kiln writes
/// the minimum a kernel checks: magic, boot flag, loader type and alignment.
pub fn boot_params(
    header: Option<&setup_header>,
    cmdline_len: usize,
    initrd: Option<(GuestAddress, u64)>,
    e820: &[E820Entry],
    rsdp: Option<GuestAddress>,
) -> boot_params {
    let mut p = boot_params::default();
    match header {
        Some(h) => p.hdr = *h,
        None => {
            p.hdr.header = KERNEL_HDR_MAGIC;
            p.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            p.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
        }
    }
    p.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    p.hdr.cmd_line_ptr = CMDLINE_START as u32;
    p.ext_cmd_line_ptr = (CMDLINE_START >> 32) as u32;
    p.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        p.hdr.ramdisk_image = addr.0 as u32;
        p.ext_ramdisk_image = (addr.0 >> 32) as u32;
        p.hdr.ramdisk_size = size as u32;
        p.ext_ramdisk_size = (size >> 32) as u32;
    }
    for (slot, e) in p.e820_table.iter_mut().zip(e820.iter().take(E820_MAX)) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
        };
    }
    p.e820_entries = e820.len().min(E820_MAX) as u8;
    if let Some(rsdp) = rsdp {
        p.acpi_rsdp_addr = rsdp.0;
    }
    p
}

/// Builds `hvm_start_info` and its memmap and module tables for PVH entry.
pub fn start_info(
    initrd: Option<(GuestAddress, u64)>,
    e820: &[E820Entry],
    rsdp: Option<GuestAddress>,
) -> (
    hvm_start_info,
    Vec<hvm_memmap_table_entry>,
    Vec<hvm_modlist_entry>,
) {
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let modules: Vec<hvm_modlist_entry> = initrd
        .map(|(addr, size)| hvm_modlist_entry {
            paddr: addr.0,
            size,
            cmdline_paddr: 0,
            reserved: 0,
        })
        .into_iter()
        .collect();
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        flags: 0,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() {
            0
        } else {
            PVH_MODLIST_START
        },
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp.map_or(0, |a| a.0),
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    (info, memmap, modules)
}

/// Writes `boot_params` at [`ZERO_PAGE_START`].
pub fn write_boot_params(mem: &GuestMemory, params: &boot_params) -> Result<(), BootError> {
    write_guest(mem, "boot_params", ZERO_PAGE_START, params.as_slice())
}

/// Writes `hvm_start_info` and its tables at their fixed addresses.
pub fn write_start_info(
    mem: &GuestMemory,
    info: &hvm_start_info,
    memmap: &[hvm_memmap_table_entry],
    modules: &[hvm_modlist_entry],
) -> Result<(), BootError> {
    write_guest(mem, "hvm_start_info", PVH_INFO_START, info.as_slice())?;
    let mut addr = PVH_MEMMAP_START;
    for e in memmap {
        write_guest(mem, "PVH memmap", addr, e.as_slice())?;
        addr += std::mem::size_of::<hvm_memmap_table_entry>() as u64;
    }
    let mut addr = PVH_MODLIST_START;
    for m in modules {
        write_guest(mem, "PVH module list", addr, m.as_slice())?;
        addr += std::mem::size_of::<hvm_modlist_entry>() as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{PVH_MEMMAP_START, RSDP_START};
    use crate::memory::{create_guest_memory, e820_map};
    use vm_memory::Bytes;

    #[test]
    fn boot_params_for_an_elf_carry_cmdline_initrd_e820_and_rsdp() {
        let e820 = e820_map(64 << 20);
        let p = boot_params(
            None,
            40,
            Some((GuestAddress(0x3ff_f000), 0x1234)),
            &e820,
            Some(GuestAddress(RSDP_START)),
        );
        let hdr = p.hdr;
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ hdr.cmdline_size }, 40);
        assert_eq!({ hdr.ramdisk_image }, 0x3ff_f000);
        assert_eq!({ hdr.ramdisk_size }, 0x1234);
        assert_eq!(p.e820_entries, 3);
        let e = p.e820_table[2];
        assert_eq!(
            ({ e.addr }, { e.size }, { e.type_ }),
            (0x10_0000, (64 << 20) - 0x10_0000, 1)
        );
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
    }

    #[test]
    fn boot_params_keep_the_bzimage_header() {
        let h = setup_header {
            header: 0x5372_6448,
            version: 0x20f,
            loadflags: 1,
            setup_sects: 27,
            ..Default::default()
        };
        let p = boot_params(Some(&h), 10, None, &[], None);
        assert_eq!({ p.hdr.setup_sects }, 27);
        assert_eq!({ p.hdr.version }, 0x20f);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.ramdisk_size }, 0);
    }

    #[test]
    fn start_info_and_tables_land_where_announced() {
        let mem = create_guest_memory(32).unwrap();
        let e820 = e820_map(32 << 20);
        let (info, memmap, modules) = start_info(
            Some((GuestAddress(0x1f0_0000), 99)),
            &e820,
            Some(GuestAddress(RSDP_START)),
        );
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.memmap_entries, 3);
        assert_eq!(info.rsdp_paddr, 0xe0000);
        write_start_info(&mem, &info, &memmap, &modules).unwrap();
        let back: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(back.cmdline_paddr, CMDLINE_START);
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(back.modlist_paddr)).unwrap();
        assert_eq!((m.paddr, m.size), (0x1f0_0000, 99));
        let last: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(PVH_MEMMAP_START + 2 * 24))
            .unwrap();
        assert_eq!(
            (last.addr, last.size, last.type_),
            (0x10_0000, (32 << 20) - 0x10_0000, 1)
        );
        // No initrd: no module list.
        let (info, _, modules) = start_info(None, &e820, None);
        assert_eq!(
            (info.nr_modules, info.modlist_paddr, modules.len()),
            (0, 0, 0)
        );
    }
}
