/*
 * boot64_info: 64-bit entry; prints what `struct boot_params` says (header magic, command line,
 * e820 map, initrd, RSDP), then writes 0 to the exit port.
 *
 * boot_params offsets (Linux arch/x86/include/uapi/asm/bootparam.h): acpi_rsdp_addr u64 @0x070,
 * ext_ramdisk_image u32 @0x0c0, ext_ramdisk_size u32 @0x0c4, ext_cmd_line_ptr u32 @0x0c8,
 * e820_entries u8 @0x1e8, hdr.header u32 @0x202, hdr.ramdisk_image u32 @0x218,
 * hdr.ramdisk_size u32 @0x21c, hdr.cmd_line_ptr u32 @0x228, e820_table @0x2d0
 * (20-byte entries: addr u64, size u64, type u32).
 */
    .include "boot64.S"

main64:
    PRINT "BOOT64 hdr="
    movl 0x202(%rbx), %eax
    call put_hex
    call put_nl

    PRINT "cmdline="
    call bp_cmdline
    mov %rax, %rsi
    call puts
    call put_nl

    PRINT "e820 entries="
    movzbl 0x1e8(%rbx), %r12d
    mov %r12, %rax
    call put_dec
    call put_nl
    cmp $128, %r12d             /* the zero page holds at most 128 entries */
    jbe 1f
    mov $128, %r12d
1:  lea 0x2d0(%rbx), %r13
2:  test %r12d, %r12d
    jz 3f
    PRINT "e820 "
    mov (%r13), %rax
    mov 8(%r13), %rcx
    movl 16(%r13), %edx
    call put_range
    add $20, %r13
    dec %r12d
    jmp 2b

3:  movl 0x21c(%rbx), %ecx      /* ramdisk size */
    movl 0x0c4(%rbx), %eax
    shl $32, %rax
    or %rax, %rcx
    test %rcx, %rcx
    jnz 4f
    PRINT "initrd none\n"
    jmp 5f
4:  movl 0x218(%rbx), %r14d     /* ramdisk address */
    movl 0x0c0(%rbx), %eax
    shl $32, %rax
    or %rax, %r14
    PRINT "initrd addr="
    mov %r14, %rax
    call put_hex
    PRINT " size="
    mov %rcx, %rax
    call put_hex
    PRINT " first="
    mov %r14, %rsi
    call put_ascii
    call put_nl

5:  PRINT "rsdp="
    mov 0x070(%rbx), %rax
    call put_hex
    call put_nl

    PRINT "BOOT64 done\n"
    xor %eax, %eax
    EXIT
