/*
 * The `kiln bench boot` guest: the smallest guest that shows a VMM got it running, so the
 * benchmark measures the VMM's start-up and not the guest. Booted through the PVH entry
 * (32-bit protected mode, flat segments, paging off); prints one line on COM1 and writes 0 to
 * the exit port 0x501 (kiln's exit port, QEMU's isa-debug-exit). No stack, paging or long mode.
 *
 * Assembled with `as --64` and linked as ELF64 because linux-loader only loads ELF64 files;
 * the code itself is 32-bit (.code32), as the PVH entry requires.
 */

    /* XEN_ELFNOTE_PHYS32_ENTRY (type 18): namesz 4 ("Xen\0"), descsz 4, the entry address. */
    .section .note.Xen, "a", @note
    .balign 4
    .long 2f - 1f
    .long 4f - 3f
    .long 18
1:  .asciz "Xen"
2:  .balign 4
3:  .long _start
4:  .balign 4

    .section .text.entry, "ax"
    .code32
    .globl _start
_start:
    cli
    mov $message, %esi
    mov $0x3f8, %dx             /* COM1 transmit register */
1:  movb (%esi), %al
    test %al, %al
    jz 2f
    outb %al, %dx
    inc %esi
    jmp 1b
2:  mov $0x501, %dx             /* exit port: status 0 */
    xor %eax, %eax
    outb %al, %dx
3:  hlt
    jmp 3b

    .section .rodata
message:
    .asciz "kiln bench guest\n"
