/*
 * Shared 64-bit routines of kiln's test guests (GNU as, AT&T syntax).
 *
 * Output goes to COM1 one `out` per byte: kiln's and QEMU's 16550 models accept a write to the
 * transmit register at any time, so the guest never polls the line status register.
 *
 * Calling convention of the routines below: argument in %rax or %rsi as documented, every other
 * register preserved, flags clobbered. Each routine is bounded (no loop depends on guest-invisible
 * state), so a wrong pointer prints garbage instead of hanging the guest.
 */

    .equ COM1, 0x3f8
    .equ EXIT_PORT, 0x501
    .equ MARKER_PORT, 0x502
    .equ I8042_COMMAND, 0x64
    .equ CMDLINE_MAX, 2048

/* PRINT "text": print a string literal (kept in .rodata). Clobbers %rsi. */
.macro PRINT s:vararg
    .pushsection .rodata.str, "a"
.Lprint_str\@: .asciz \s
    .popsection
    lea .Lprint_str\@(%rip), %rsi
    call puts
.endm

/* EXIT: write %al to the exit port (ports above 0xff need %dx), then spin in case the exit port
 * does not end the VM. */
.macro EXIT
    mov $EXIT_PORT, %dx
    outb %al, %dx
.Lexit_spin\@:
    jmp .Lexit_spin\@
.endm

/* MARKER n: record phase n on the marker port (a 4-byte write). Clobbers %eax and %edx. */
.macro MARKER n
    mov $MARKER_PORT, %dx
    movl $\n, %eax
    outl %eax, %dx
.endm

    .text

/* putc: print the byte in %al. */
putc:
    push %rdx
    mov $COM1, %dx
    outb %al, %dx
    pop %rdx
    ret

/* put_nl: print "\n". */
put_nl:
    push %rax
    mov $'\n', %al
    call putc
    pop %rax
    ret

/* puts: print the NUL-terminated string at %rsi (at most CMDLINE_MAX bytes; nothing for a NULL
 * pointer). Leaves %rsi after the last byte printed. */
puts:
    push %rax
    push %rcx
    test %rsi, %rsi
    jz 2f
    mov $CMDLINE_MAX, %ecx
1:  movzbl (%rsi), %eax
    test %al, %al
    jz 2f
    call putc
    inc %rsi
    dec %ecx
    jnz 1b
2:  pop %rcx
    pop %rax
    ret

/* put_hex: print %rax as "0x" + lowercase hex digits without leading zeros ("0x0" for zero). */
put_hex:
    push %rax
    push %rbx
    push %rcx
    mov %rax, %rbx
    mov $'0', %al
    call putc
    mov $'x', %al
    call putc
    mov $60, %ecx
1:  /* skip leading zero nibbles, but always print the last one */
    test %ecx, %ecx
    jz 2f
    mov %rbx, %rax
    shr %cl, %rax
    and $0xf, %eax
    jnz 2f
    sub $4, %ecx
    jmp 1b
2:  mov %rbx, %rax
    shr %cl, %rax
    and $0xf, %eax
    cmp $10, %eax
    jb 3f
    add $('a' - 10 - '0'), %eax
3:  add $'0', %eax
    call putc
    sub $4, %ecx
    jge 2b
    pop %rcx
    pop %rbx
    pop %rax
    ret

/* put_dec: print %rax as an unsigned decimal number. */
put_dec:
    push %rax
    push %rcx
    push %rdx
    push %r8
    mov $10, %r8
    xor %ecx, %ecx
1:  xor %edx, %edx
    div %r8
    push %rdx
    inc %ecx
    test %rax, %rax
    jnz 1b
2:  pop %rax
    add $'0', %eax
    call putc
    dec %ecx
    jnz 2b
    pop %r8
    pop %rdx
    pop %rcx
    pop %rax
    ret

/* put_ascii: print the %rcx (at most 8) bytes at %rsi, bytes outside 0x20..0x7e as '.'. */
put_ascii:
    push %rcx
    cmp $8, %rcx
    jbe 1f
    mov $8, %ecx
1:  call put_text
    pop %rcx
    ret

/* put_text: print the %rcx (at most 256) bytes at %rsi, bytes outside 0x20..0x7e as '.'. */
put_text:
    push %rax
    push %rcx
    push %rsi
    cmp $256, %rcx
    jbe 1f
    mov $256, %ecx
1:  test %rcx, %rcx
    jz 4f
2:  movzbl (%rsi), %eax
    cmp $0x20, %al
    jb 3f
    cmp $0x7e, %al
    jbe 5f
3:  mov $'.', %al
5:  call putc
    inc %rsi
    dec %rcx
    jnz 2b
4:  pop %rsi
    pop %rcx
    pop %rax
    ret

/* put_range: print "addr=0x.. size=0x.. type=<dec>" for %rax = addr, %rcx = size, %rdx = type.
 * Clobbers %rsi. */
put_range:
    push %rax
    PRINT "addr="
    call put_hex
    PRINT " size="
    mov %rcx, %rax
    call put_hex
    PRINT " type="
    mov %rdx, %rax
    call put_dec
    call put_nl
    pop %rax
    ret

/* bp_cmdline: %rax = the command line pointer of the boot_params at %rbx
 * (hdr.cmd_line_ptr at 0x228 | ext_cmd_line_ptr at 0x0c8 << 32). */
bp_cmdline:
    push %rdx
    movl 0x228(%rbx), %eax
    movl 0x0c8(%rbx), %edx
    shl $32, %rdx
    or %rdx, %rax
    pop %rdx
    ret

/* cmdline_number: find the word `<key><decimal>` (key NUL-terminated at %rdi, e.g.
 * "kiln.exit=") on the command line at %rsi (may be NULL). Returns %rax = the number (at most
 * five digits are read) and %rcx = how many digits were read: 0 when the key is absent or not
 * followed by a digit. The key must start the command line or follow a space. */
cmdline_number:
    push %rdx
    push %rsi
    push %r8
    push %r9
    xor %eax, %eax
    xor %ecx, %ecx
    test %rsi, %rsi
    jz 9f
    mov %rsi, %r8               /* start of the command line */
    mov $CMDLINE_MAX, %r9d      /* positions left to try */
1:  cmpb $0, (%rsi)
    je 9f
    cmp %r8, %rsi
    je 2f
    cmpb $' ', -1(%rsi)
    jne 5f
2:  xor %ecx, %ecx
3:  movzbl (%rdi,%rcx), %edx
    test %dl, %dl
    jz 6f                       /* the whole key matched */
    cmpb %dl, (%rsi,%rcx)
    jne 5f
    inc %ecx
    jmp 3b
5:  inc %rsi
    dec %r9d
    jnz 1b
    xor %ecx, %ecx
    jmp 9f
6:  add %rcx, %rsi              /* digits follow the key */
    xor %ecx, %ecx
7:  movzbl (%rsi), %edx
    sub $'0', %edx
    cmp $9, %edx
    ja 9f
    imul $10, %rax, %rax
    add %rdx, %rax
    inc %rsi
    inc %ecx
    cmp $5, %ecx
    jb 7b
9:  pop %r9
    pop %r8
    pop %rsi
    pop %rdx
    ret

    .bss
    .balign 16
guest_stack:
    .skip 8192
guest_stack_top:

    .text
