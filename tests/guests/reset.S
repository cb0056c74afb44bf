/* reset: 64-bit entry; prints "reset guest", pulses the CPU reset line through the i8042
 * (command 0xfe on port 0x64), then spins: the VM must end by the reset, not by a timeout. */
    .include "boot64.S"

main64:
    PRINT "reset guest\n"
    mov $0xfe, %al
    outb %al, $I8042_COMMAND
1:  jmp 1b
