/* spin: 64-bit entry; prints "spin guest" and spins forever (no `hlt`): only a timeout or a
 * kill ends it. */
    .include "boot64.S"

main64:
    PRINT "spin guest\n"
1:  jmp 1b
