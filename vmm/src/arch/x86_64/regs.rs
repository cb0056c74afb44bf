//! Initial vCPU state for each entry protocol: GDT, segments, control registers, identity page
//! tables for 64-bit entry, general registers, FPU, boot MSRs and the LAPIC LINT pins.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use crate::boot::EntryPoint;
use crate::layout::{
    BOOT_STACK_POINTER, GDT_START, IDT_START, PDE_START, PDPTE_START, PML4_START, PVH_INFO_START,
    ZERO_PAGE_START,
};
use crate::memory::GuestMemory;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// GDT indexes: the Linux boot protocol wants __BOOT_CS = 0x10 and __BOOT_DS = 0x18.
const GDT_CODE: usize = 2;
const GDT_DATA: usize = 3;
const GDT_TSS: usize = 4;

/// Errors writing the boot-time tables.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the {0} to guest memory")]
pub struct RegsError(&'static str);

/// Encodes a GDT descriptor from flags, base and limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The KVM segment a GDT descriptor at `index` describes.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let raw_limit = (((entry >> 32) & 0xf_0000) | (entry & 0xffff)) as u32;
    let granular = (entry >> 55) & 1 == 1;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        // KVM wants the limit in bytes: with G set the descriptor counts 4 KiB pages. Long mode
        // ignores limits, 32-bit PVH entry does not.
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(((entry >> 47) & 1) == 0),
    }
}

/// The GDT for an entry protocol: flat 64-bit code for Linux64, flat 32-bit code for PVH.
pub fn gdt(entry: &EntryPoint) -> [u64; 5] {
    match entry {
        EntryPoint::Linux64(_) => [
            0,
            0,
            gdt_entry(0xa09b, 0, 0xfffff),
            gdt_entry(0xc093, 0, 0xfffff),
            gdt_entry(0x808b, 0, 0xfffff),
        ],
        // The PVH ABI: flat 4 GiB 32-bit code and data, and a minimal 32-bit TSS.
        EntryPoint::Pvh(_) => [
            0,
            0,
            gdt_entry(0xc09b, 0, 0xffff_ffff),
            gdt_entry(0xc093, 0, 0xffff_ffff),
            gdt_entry(0x008b, 0, 0x67),
        ],
    }
}

/// Writes GDT, IDT and (for 64-bit entry) identity page tables, and returns the special registers.
pub fn setup_sregs(
    mem: &GuestMemory,
    entry: &EntryPoint,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, RegsError> {
    let table = gdt(entry);
    for (i, e) in table.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + (i as u64) * 8))
            .map_err(|_| RegsError("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))
        .map_err(|_| RegsError("IDT"))?;
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;

    let code = segment_from_gdt(table[GDT_CODE], GDT_CODE as u8);
    let data = segment_from_gdt(table[GDT_DATA], GDT_DATA as u8);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(table[GDT_TSS], GDT_TSS as u8);

    match entry {
        EntryPoint::Pvh(_) => {
            sregs.cr0 = X86_CR0_PE;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryPoint::Linux64(_) => {
            write_identity_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
    Ok(sregs)
}

/// Identity-maps the first 4 GiB with 2 MiB pages: one PML4 entry, four PDPT entries, four PDs.
fn write_identity_page_tables(mem: &GuestMemory) -> Result<(), RegsError> {
    let w = |v: u64, a: u64, what| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|_| RegsError(what))
    };
    // Present | writable on every level; PS (bit 7) on the 2 MiB leaves.
    w(PDPTE_START | 0x03, PML4_START, "PML4")?;
    for pd in 0..4u64 {
        w(
            (PDE_START + pd * 0x1000) | 0x03,
            PDPTE_START + pd * 8,
            "PDPT",
        )?;
        for i in 0..512u64 {
            let addr = ((pd * 512 + i) << 21) | 0x83;
            w(addr, PDE_START + pd * 0x1000 + i * 8, "page directory")?;
        }
    }
    Ok(())
}

/// General registers at entry for the boot vCPU.
pub fn boot_regs(entry: &EntryPoint) -> kvm_regs {
    match *entry {
        EntryPoint::Pvh(rip) => kvm_regs {
            rflags: 0x2,
            rip: rip.0,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
        EntryPoint::Linux64(rip) => kvm_regs {
            rflags: 0x2,
            rip: rip.0,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
    }
}

/// FPU state at reset: x87 control word and MXCSR defaults.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs Linux expects to find initialised at entry (syscall MSRs cleared, fast strings on,
/// MTRRs enabled with write-back default).
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MTRR_ENABLE_WB_DEFAULT: u64 = (1 << 11) | 6;
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB_DEFAULT),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Sets LINT0 to ExtINT and LINT1 to NMI in a LAPIC register page, as a PC's BIOS does.
pub fn set_lint(regs: &mut [std::os::raw::c_char; 1024]) {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_NMI: u32 = 0x4;
    const APIC_MODE_EXTINT: u32 = 0x7;
    let update = |regs: &mut [std::os::raw::c_char; 1024], off: usize, mode: u32| {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = *x as std::os::raw::c_char;
        }
    };
    update(regs, APIC_LVT0, APIC_MODE_EXTINT);
    update(regs, APIC_LVT1, APIC_MODE_NMI);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 2);
        assert_eq!(
            (code.selector, code.l, code.db, code.g, code.present),
            (0x10, 1, 0, 1, 1)
        );
        assert_eq!(
            (code.base, code.limit, code.type_, code.s),
            (0, 0xffff_ffff, 0xb, 1)
        );
        let tss = segment_from_gdt(gdt_entry(0x008b, 0, 0x67), 4);
        assert_eq!((tss.limit, tss.g, tss.type_), (0x67, 0, 0xb));
        let code32 = segment_from_gdt(gdt_entry(0xc09b, 0, 0xfffff), 2);
        assert_eq!((code32.l, code32.db), (0, 1));
        let data = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 3);
        assert_eq!((data.selector, data.type_, data.unusable), (0x18, 3, 0));
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn long_mode_sregs_and_identity_map() {
        let mem = create_guest_memory(16).unwrap();
        let entry = EntryPoint::Linux64(GuestAddress(0x10_0000));
        let s = setup_sregs(&mem, &entry, kvm_sregs::default()).unwrap();
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((s.cs.selector, s.cs.l, s.ds.selector), (0x10, 1, 0x18));
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        // The last 2 MiB page below 4 GiB maps itself.
        let last: u64 = mem
            .read_obj(GuestAddress(PDE_START + 3 * 0x1000 + 511 * 8))
            .unwrap();
        assert_eq!(last, ((4u64 << 30) - (2 << 20)) | 0x83);
        let regs = boot_regs(&entry);
        assert_eq!(
            (regs.rip, regs.rsi, regs.rsp),
            (0x10_0000, ZERO_PAGE_START, BOOT_STACK_POINTER)
        );
    }

    #[test]
    fn pvh_enters_protected_mode_without_paging() {
        let mem = create_guest_memory(16).unwrap();
        let entry = EntryPoint::Pvh(GuestAddress(0x10_0040));
        let s = setup_sregs(&mem, &entry, kvm_sregs::default()).unwrap();
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE);
        assert_eq!((s.efer, s.cs.db, s.cs.l), (0, 1, 0));
        let regs = boot_regs(&entry);
        assert_eq!((regs.rip, regs.rbx), (0x10_0040, PVH_INFO_START));
    }

    #[test]
    fn lint_pins_are_extint_and_nmi() {
        let mut page = [0 as std::os::raw::c_char; 1024];
        page[0x351] = 0x07u8 as std::os::raw::c_char; // pre-existing mode bits get replaced
        set_lint(&mut page);
        assert_eq!(page[0x351] as u8 & 0x7, 0x7);
        assert_eq!(page[0x361] as u8 & 0x7, 0x4);
    }
}
