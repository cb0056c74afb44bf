/*
 * Common prologue of the 64-bit-entry guests. kiln enters them in long mode (identity-mapped
 * paging, flat 64-bit CS, interrupts off) at the ELF entry `_start` with %rsi = Linux
 * `struct boot_params`. `_start` sets up a stack, keeps boot_params in %rbx and calls the
 * guest's `main64`.
 */
    .include "lib64.S"
    .ifdef PVH_SHIM
    .include "pvh_shim.S"
    .endif

    .section .text.entry, "ax"
    .globl _start
_start:
    cli
    cld
    lea guest_stack_top(%rip), %rsp
    mov %rsi, %rbx
    call main64
1:  jmp 1b

    .text
