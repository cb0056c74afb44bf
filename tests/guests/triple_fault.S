/* triple_fault: 64-bit entry; prints "triple fault guest", loads an empty IDT (limit 0) and
 * reads a non-canonical address: the #GP cannot be delivered, nor the #DF, so the vCPU shuts
 * down (KVM_EXIT_SHUTDOWN). */
    .include "boot64.S"

main64:
    PRINT "triple fault guest\n"
    lidt empty_idt(%rip)
    movabs $0x8000000000000000, %rax
    mov (%rax), %rax
1:  jmp 1b

    .section .rodata
    .balign 8
empty_idt:
    .word 0
    .quad 0
    .text
