/* sse: 64-bit entry; prints "sse guest" and executes one SSE instruction. Under PVM the
 * instruction emulator has no SSE, so KVM reports an internal error (emulation failure) and
 * kiln must end the VM with the registers in the report; on hardware KVM (CR4.OSFXSR clear)
 * the #UD with no IDT ends in a triple fault instead. */
    .include "boot64.S"

main64:
    PRINT "sse guest\n"
    xorps %xmm0, %xmm0
    EXIT
