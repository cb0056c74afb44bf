/*
 * pvh_info: booted through the PVH entry; prints what `struct hvm_start_info` says (magic,
 * command line, memory map, modules, RSDP), then writes 0 to the exit port.
 *
 * hvm_start_info: magic u32 @0, version u32 @4, flags u32 @8, nr_modules u32 @12,
 * modlist_paddr u64 @16, cmdline_paddr u64 @24, rsdp_paddr u64 @32, memmap_paddr u64 @40,
 * memmap_entries u32 @48. hvm_memmap_table_entry: addr u64, size u64, type u32, reserved u32.
 * hvm_modlist_entry: paddr u64, size u64, cmdline_paddr u64, reserved u64.
 */
    .include "lib64.S"
    .include "pvh32.S"

    .globl _start
    .set _start, pvh_start32

    .text
pvh_main64:
    mov %rdi, %rbx

    PRINT "PVH magic="
    movl (%rbx), %eax
    call put_hex
    call put_nl

    PRINT "cmdline="
    mov 24(%rbx), %rsi
    call puts
    call put_nl

    PRINT "memmap entries="
    movl 48(%rbx), %eax
    call put_dec
    call put_nl
    movl 48(%rbx), %r12d
    cmp $128, %r12d             /* print at most 128 entries */
    jbe 1f
    mov $128, %r12d
1:  mov 40(%rbx), %r13
2:  test %r12d, %r12d
    jz 3f
    PRINT "memmap "
    mov (%r13), %rax
    mov 8(%r13), %rcx
    movl 16(%r13), %edx
    call put_range
    add $24, %r13
    dec %r12d
    jmp 2b

3:  PRINT "modules="
    movl 12(%rbx), %eax
    call put_dec
    call put_nl
    movl 12(%rbx), %eax
    test %eax, %eax
    jz 4f
    mov 16(%rbx), %r13
    PRINT "module addr="
    mov (%r13), %rax
    call put_hex
    PRINT " size="
    mov 8(%r13), %rax
    call put_hex
    PRINT " first="
    mov 8(%r13), %rcx
    mov (%r13), %rsi
    call put_ascii
    call put_nl

4:  PRINT "rsdp="
    mov 32(%rbx), %rax
    call put_hex
    call put_nl

    PRINT "PVH done\n"
    xor %eax, %eax
    EXIT
