/*
 * PVH-to-64-bit shim, only for checking the 64-bit-entry guests against a reference VMM.
 *
 * QEMU boots PVH ELFs but not plain 64-bit ELFs, so a 64-bit-entry guest assembled with
 * `--defsym PVH_SHIM=1` gets a PVH note whose entry translates `struct hvm_start_info` into a
 * Linux `struct boot_params` (zero page) and then enters the guest at `_start` the way kiln does:
 * long mode, identity-mapped, interrupts off, %rsi = boot_params. The kiln tests never use it.
 */
    .include "pvh32.S"

    .text
pvh_main64:
    lea shim_zero_page(%rip), %rbx
    xor %eax, %eax
    xor %ecx, %ecx
1:  mov %rax, (%rbx,%rcx,8)
    inc %ecx
    cmp $512, %ecx
    jb 1b

    movl $0x53726448, 0x202(%rbx)       /* hdr.header = "HdrS" */
    mov 24(%rdi), %rax                  /* cmdline_paddr */
    movl %eax, 0x228(%rbx)              /* hdr.cmd_line_ptr */
    shr $32, %rax
    movl %eax, 0x0c8(%rbx)              /* ext_cmd_line_ptr */
    mov 32(%rdi), %rax                  /* rsdp_paddr */
    mov %rax, 0x070(%rbx)               /* acpi_rsdp_addr */

    movl 48(%rdi), %ecx                 /* memmap_entries */
    cmp $128, %ecx                      /* E820_MAX_ENTRIES_ZEROPAGE */
    jbe 2f
    mov $128, %ecx
2:  movb %cl, 0x1e8(%rbx)               /* e820_entries */
    mov 40(%rdi), %rsi                  /* memmap_paddr */
    lea 0x2d0(%rbx), %r8                /* e820_table */
3:  test %ecx, %ecx
    jz 4f
    mov (%rsi), %rax
    mov %rax, (%r8)
    mov 8(%rsi), %rax
    mov %rax, 8(%r8)
    movl 16(%rsi), %eax
    movl %eax, 16(%r8)
    add $24, %rsi
    add $20, %r8
    dec %ecx
    jmp 3b

4:  movl 12(%rdi), %eax                 /* nr_modules */
    test %eax, %eax
    jz 5f
    mov 16(%rdi), %rsi                  /* modlist_paddr */
    mov (%rsi), %rax
    movl %eax, 0x218(%rbx)              /* hdr.ramdisk_image */
    shr $32, %rax
    movl %eax, 0x0c0(%rbx)              /* ext_ramdisk_image */
    mov 8(%rsi), %rax
    movl %eax, 0x21c(%rbx)              /* hdr.ramdisk_size */
    shr $32, %rax
    movl %eax, 0x0c4(%rbx)              /* ext_ramdisk_size */

5:  mov %rbx, %rsi
    jmp _start

    .bss
    .balign 4096
shim_zero_page:
    .skip 4096
    .text
