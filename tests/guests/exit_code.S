/*
 * exit_code: 64-bit entry; prints "exit guest", records phases 1, 2, 3 on the marker port and
 * writes a status byte to the exit port: the low byte of the number after `kiln.exit=` on the
 * command line (a whole word), 0x2a when absent or not a number.
 */
    .include "boot64.S"

    .equ DEFAULT_STATUS, 0x2a

main64:
    PRINT "exit guest\n"
    MARKER 1
    call bp_cmdline
    mov %rax, %rsi
    lea exit_key(%rip), %rdi
    call cmdline_number
    test %ecx, %ecx
    jnz 1f
    mov $DEFAULT_STATUS, %eax
1:  mov %eax, %r12d
    MARKER 2
    MARKER 3
    mov %r12d, %eax
    EXIT

    .section .rodata
exit_key:
    .asciz "kiln.exit="
    .text
