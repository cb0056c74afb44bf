/* counter: 64-bit entry; prints "n=1", "n=2", ... one line at a time forever, with a short busy
 * delay between lines. The count lives both in %r12 and in memory, and every line checks that
 * they agree (printing "MISMATCH" and exiting with status 1 if not): a snapshot that loses
 * registers or memory shows up as a mismatch, one that loses or repeats output as a gap or a
 * repeated line. Used by tests/snapshot.rs. */
    .include "boot64.S"

main64:
    xor %r12, %r12
    movq $0, counter(%rip)
1:  inc %r12
    incq counter(%rip)
    cmp counter(%rip), %r12
    jne 3f
    PRINT "n="
    mov %r12, %rax
    call put_dec
    call put_nl
    mov $100, %rcx
2:  dec %rcx
    jnz 2b
    jmp 1b
3:  PRINT "MISMATCH\n"
    mov $1, %al
    EXIT

    .data
    .balign 8
counter:
    .quad 0
