/*
 * smp: 64-bit entry; starts the other vCPUs with INIT + SIPI (broadcast to all but self) into a
 * real-mode trampoline at 0x10000, where each one increments a counter and halts. The BSP waits
 * (bounded) until the counter says `kiln.cpus=<n>` CPUs run (all it can see within the bound
 * when the command line does not say), prints "cpus=<n>" and writes 0 to the exit port.
 */
    .include "boot64.S"

    .equ TRAMPOLINE, 0x10000        /* page-aligned, below 1 MiB: SIPI vector 0x10 */
    .equ AP_COUNTER, TRAMPOLINE + 0xff0
    .equ LAPIC, 0xfee00000
    .equ LAPIC_SVR, 0xf0
    .equ LAPIC_ICR_LOW, 0x300
    .equ LAPIC_ICR_HIGH, 0x310
    .equ ICR_ALL_BUT_SELF_INIT, 0x000c4500
    .equ ICR_ALL_BUT_SELF_SIPI, 0x000c4600 | (TRAMPOLINE >> 12)
    .equ WAIT_LOOPS, 1000000        /* ~2 s of emulated instructions at most */

main64:
    call bp_cmdline
    mov %rax, %rsi
    lea cpus_key(%rip), %rdi
    call cmdline_number
    test %ecx, %ecx
    jnz 1f
    mov $0xffff, %eax               /* unknown: wait the whole bound */
1:  mov %eax, %r12d                 /* CPUs expected */

    /* Copy the trampoline and zero the counter. */
    lea ap_trampoline(%rip), %rsi
    mov $TRAMPOLINE, %edi
    mov $(ap_trampoline_end - ap_trampoline), %ecx
2:  movb (%rsi), %al
    movb %al, (%rdi)
    inc %rsi
    inc %rdi
    dec %ecx
    jnz 2b
    movl $0, AP_COUNTER

    /* Software-enable the local APIC, then INIT and SIPI (twice, as the MP spec says) to all
     * other CPUs. */
    mov $LAPIC, %ebx
    movl LAPIC_SVR(%rbx), %eax
    or $0x1ff, %eax
    movl %eax, LAPIC_SVR(%rbx)
    movl $0, LAPIC_ICR_HIGH(%rbx)
    movl $ICR_ALL_BUT_SELF_INIT, LAPIC_ICR_LOW(%rbx)
    call short_delay
    movl $ICR_ALL_BUT_SELF_SIPI, LAPIC_ICR_LOW(%rbx)
    call short_delay
    movl $ICR_ALL_BUT_SELF_SIPI, LAPIC_ICR_LOW(%rbx)

    mov $WAIT_LOOPS, %ecx
3:  movl AP_COUNTER, %eax
    inc %eax                        /* + the BSP */
    cmp %r12d, %eax
    jae 4f
    pause
    dec %ecx
    jnz 3b
4:  movl AP_COUNTER, %r13d
    inc %r13d
    PRINT "cpus="
    mov %r13, %rax
    call put_dec
    call put_nl
    xor %eax, %eax
    EXIT

/* short_delay: a few hundred emulated instructions between IPIs. */
short_delay:
    push %rcx
    mov $200, %ecx
1:  pause
    dec %ecx
    jnz 1b
    pop %rcx
    ret

    /* Runs at 0x1000:0000 in real mode; position independent (CS-relative counter). */
    .code16
ap_trampoline:
    cli
    lock incl %cs:(AP_COUNTER - TRAMPOLINE)
1:  hlt
    jmp 1b
ap_trampoline_end:
    .code64

    .section .rodata
cpus_key:
    .asciz "kiln.cpus="
    .text
