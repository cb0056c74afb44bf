//! CPUID filtering: start from what KVM supports, hide what kiln does not emulate, and give
//! each vCPU a consistent topology (APIC id, logical count, leaf 0xB levels).

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 1 ECX bits hidden from the guest: MONITOR/MWAIT, VMX, SMX, EST, TM2, SDBG, PDCM, DCA
/// (no nested virtualisation, power or debug features are emulated).
const LEAF1_ECX_HIDE: u32 =
    (1 << 3) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 11) | (1 << 15) | (1 << 18);
/// Leaf 1 ECX bit 31: "running under a hypervisor" — Linux uses it to pick paravirt paths.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bits hidden: ACPI thermal (22), TM (29), PBE (31).
const LEAF1_EDX_HIDE: u32 = (1 << 22) | (1 << 29) | (1 << 31);
/// Leaf 1 EDX bit 28: HTT, "the logical processor count in EBX is valid".
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 0xB level types.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Filters `entries` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `cpu_id` of `cpu_count`.
pub fn filter_cpuid(entries: &mut [kvm_cpuid_entry2], cpu_id: u8, cpu_count: u8) {
    let count = u32::from(cpu_count.max(1));
    // Bits needed to number the logical CPUs of one package.
    let core_bits = 32 - (count - 1).leading_zeros();
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                e.ecx &= !LEAF1_ECX_HIDE;
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                e.edx &= !LEAF1_EDX_HIDE;
                // EBX: [31:24] initial APIC id, [23:16] logical processors, [15:8] CLFLUSH size.
                e.ebx = (u32::from(cpu_id) << 24) | (count << 16) | (e.ebx & 0xffff);
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                // EAX[31:26] = cores per package - 1; keep the cache description.
                e.eax = (e.eax & 0x03ff_ffff) | ((count - 1) << 26);
            }
            // Thermal/power management and performance monitoring are not emulated.
            0x6 | 0xa => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb => {
                // One thread per core, `count` cores per package.
                let (eax, ebx, ecx_type) = match e.index {
                    0 => (0, 1, LEVEL_TYPE_SMT),
                    1 => (core_bits, count, LEVEL_TYPE_CORE),
                    _ => (0, 0, 0),
                };
                e.eax = eax;
                e.ebx = ebx;
                e.ecx = (ecx_type << 8) | (e.index & 0xff);
                e.edx = u32::from(cpu_id);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    #[test]
    fn hides_unemulated_features_and_sets_topology() {
        let mut entries = vec![
            entry(0x1, 0, [0x806f8, 0xff00_0800, 0xffff_ffff, 0xffff_ffff]),
            entry(0x4, 0, [0xffff_ffff, 1, 2, 3]),
            entry(0x6, 0, [7, 7, 7, 7]),
            entry(0xa, 0, [9, 9, 9, 9]),
            entry(0xb, 0, [0, 0, 0, 0]),
            entry(0xb, 1, [0, 0, 0, 0]),
            entry(0x8000_0002, 0, [0x6c69_6b20, 1, 2, 3]),
        ];
        filter_cpuid(&mut entries, 2, 4);
        let l1 = entries[0];
        assert_eq!(l1.ecx & LEAF1_ECX_HIDE, 0, "VMX/MWAIT/… must be hidden");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(l1.edx & LEAF1_EDX_HIDE, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(l1.ebx >> 24, 2, "APIC id");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical count");
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH line size kept");
        assert_eq!(entries[1].eax >> 26, 3);
        assert_eq!(entries[1].eax & 0x03ff_ffff, 0x03ff_ffff);
        assert_eq!([entries[2].eax, entries[3].edx], [0, 0]);
        assert_eq!(
            (entries[4].ebx, entries[4].ecx, entries[4].edx),
            (1, 0x100, 2)
        );
        assert_eq!(
            (entries[5].eax, entries[5].ebx, entries[5].ecx),
            (2, 4, 0x201)
        );
        assert_eq!(entries[6].eax, 0x6c69_6b20, "brand string untouched");
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let mut entries = vec![entry(0x1, 0, [0, 0, 0, LEAF1_EDX_HTT])];
        filter_cpuid(&mut entries, 0, 1);
        assert_eq!(entries[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!((entries[0].ebx >> 16) & 0xff, 1);
    }
}
