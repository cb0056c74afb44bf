/*
 * PVH entry shared by the PVH guests: the Xen PHYS32_ENTRY ELF note, and a 32-bit entry that
 * switches to long mode on its own page tables and calls `pvh_main64` with %rdi = the physical
 * address of `struct hvm_start_info` (handed over in %ebx).
 *
 * PVH entry state (xen/include/public/arch-x86/hvm/start_info.h): 32-bit protected mode, flat
 * segments, paging off, interrupts off, %ebx = hvm_start_info. Nothing else (no stack, no GDT)
 * may be relied on. Going to long mode lets the PVH guest and the 64-bit-entry guests share
 * lib64.S, so checking the PVH guest under QEMU checks those routines too.
 */

    /* The note: namesz 4 ("Xen\0"), descsz 4, type 18 (XEN_ELFNOTE_PHYS32_ENTRY), 4-byte
     * aligned fields as in Linux's include/linux/elfnote.h. */
    .section .note.Xen, "a", @note
    .balign 4
    .long 2f - 1f
    .long 4f - 3f
    .long 18
1:  .asciz "Xen"
2:  .balign 4
3:  .long pvh_start32
4:  .balign 4

    .section .text.entry, "ax"
    .code32
    .globl pvh_start32
pvh_start32:
    cli
    cld
    mov %ebx, %edi
    lgdtl pvh_gdt_desc
    mov $pvh_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax              /* CR4.PAE */
    mov %eax, %cr4
    mov $0xc0000080, %ecx       /* IA32_EFER */
    rdmsr
    or $0x100, %eax             /* EFER.LME */
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax        /* CR0.PG | CR0.PE */
    mov %eax, %cr0
    ljmp $0x08, $pvh_start64

    .code64
pvh_start64:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    mov %edi, %edi              /* upper halves are undefined after the mode switch */
    lea guest_stack_top(%rip), %rsp
    call pvh_main64
1:  jmp 1b

    .section .rodata
    .balign 8
pvh_gdt:
    .quad 0                     /* null */
    .quad 0x00af9a000000ffff    /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff    /* 0x10: flat data */
pvh_gdt_end:
pvh_gdt_desc:
    .word pvh_gdt_end - pvh_gdt - 1
    .quad pvh_gdt

    /* Identity map of the first 4 GiB with 2 MiB pages (covers RAM, the initrd at the top of
     * memory, the ACPI area and the LAPIC/IOAPIC), built by the assembler: no setup loop to
     * emulate. */
    .section .data.pagetables, "aw"
    .balign 4096
pvh_pml4:
    .quad pvh_pdpt + 0x3
    .fill 511, 8, 0
pvh_pdpt:
    .quad pvh_pd + 0x0003
    .quad pvh_pd + 0x1003
    .quad pvh_pd + 0x2003
    .quad pvh_pd + 0x3003
    .fill 508, 8, 0
pvh_pd:
    .set pvh_page, 0
    .rept 2048
    .quad (pvh_page << 21) | 0x83   /* present, writable, 2 MiB */
    .set pvh_page, pvh_page + 1
    .endr

    .text
