/*
 * virtio-fs driver of the virtio test guest (included by virtio_guest.S; virtio 1.2 §5.11, FUSE
 * ABI from linux/fuse.h): prints the tag ("fs tag=<tag>"), FUSE_INIT ("fs init major=7"),
 * LOOKUP + OPEN + READ + RELEASE of hello.txt in the root ("fs read=<content>"), CREATE of
 * from-guest.txt + WRITE "written by the guest" + RELEASE ("fs created").
 *
 * Each request is a chain of two descriptors on request queue 1 (queue 0 is hiprio): the
 * request (fuse_in_header + arguments), device-readable, then a device-writable reply buffer.
 * Any FUSE error is a failure that names the opcode and the errno.
 */
    .equ FS_QUEUES, 2
    .equ FS_REQUEST_QUEUE, 1
    .equ FS_TAG_LEN, 36
    .equ FS_IN, 0x0000                  /* request buffer: offset in dev_buf */
    .equ FS_OUT, 0x2000                 /* reply buffer */
    .equ FS_OUT_LEN, 0x1000
    .equ FS_IN_HDR, 40                  /* sizeof(struct fuse_in_header) */
    .equ FS_OUT_HDR, 16                 /* sizeof(struct fuse_out_header) */
    .equ FS_ENTRY_OUT, 128              /* sizeof(struct fuse_entry_out) */
    .equ FS_ROOT, 1                     /* FUSE_ROOT_ID */
    .equ FS_READ_MAX, 256
    .equ FUSE_LOOKUP, 1
    .equ FUSE_OPEN, 14
    .equ FUSE_READ, 15
    .equ FUSE_WRITE, 16
    .equ FUSE_RELEASE, 18
    .equ FUSE_INIT, 26
    .equ FUSE_CREATE, 35
    .equ FUSE_MAJOR, 7
    .equ FUSE_MINOR, 31                 /* no FUSE_INIT_EXT: fuse_init_in is 16 bytes */
    .equ O_CREAT_EXCL_WRONLY, 0xc1      /* O_WRONLY | O_CREAT | O_EXCL */
    .equ S_IFREG_0644, 0x81a4

drv_fs:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r9
    mov $FS_QUEUES, %ecx
    xor %edx, %edx
    call dev_setup

    /* The tag: up to 36 bytes, NUL-padded when shorter (read one byte at a time). */
    lea fs_tag(%rip), %rdi
    xor %ecx, %ecx
1:  movzbl VM_CONFIG(%r15,%rcx), %eax
    movb %al, (%rdi,%rcx)
    inc %ecx
    cmp $FS_TAG_LEN, %ecx
    jb 1b
    movb $0, (%rdi,%rcx)
    PRINT "fs tag="
    lea fs_tag(%rip), %rsi
    call puts
    call put_nl

    movq $1, fs_unique(%rip)
    call dev_buf
    lea FS_IN+FS_IN_HDR(%rax), %rbx     /* %rbx: where the arguments go */
    lea FS_OUT+FS_OUT_HDR(%rax), %r9    /* %r9: the reply after its header */

    /* INIT */
    movl $FUSE_MAJOR, 0(%rbx)
    movl $FUSE_MINOR, 4(%rbx)
    movl $0, 8(%rbx)                    /* max_readahead */
    movl $0, 12(%rbx)                   /* flags */
    mov $FUSE_INIT, %eax
    xor %edx, %edx
    mov $16, %ecx
    call fuse_call
    movl 0(%r9), %eax
    cmp $FUSE_MAJOR, %eax
    je 2f
    FAIL_VALUE "fs: FUSE_INIT answered major "
2:  PRINT "fs init major=7\n"

    /* LOOKUP hello.txt in the root */
    lea fs_hello(%rip), %rsi
    mov $(fs_hello_end - fs_hello), %ecx
    mov %rbx, %rdi
    call mem_copy
    mov $FUSE_LOOKUP, %eax
    mov $FS_ROOT, %edx
    call fuse_call
    mov 0(%r9), %r8                     /* fuse_entry_out.nodeid */

    /* OPEN it read-only */
    movl $0, 0(%rbx)                    /* flags: O_RDONLY */
    movl $0, 4(%rbx)                    /* open_flags */
    mov $FUSE_OPEN, %eax
    mov %r8, %rdx
    mov $8, %ecx
    call fuse_call
    mov 0(%r9), %rax                    /* fuse_open_out.fh */
    mov %rax, fs_fh(%rip)

    /* READ up to FS_READ_MAX bytes from offset 0 */
    mov %rbx, %rdi
    mov $40, %ecx
    call mem_zero
    mov fs_fh(%rip), %rax
    mov %rax, 0(%rbx)                   /* fh */
    movl $FS_READ_MAX, 16(%rbx)         /* size */
    mov $FUSE_READ, %eax
    mov %r8, %rdx
    mov $40, %ecx
    call fuse_call                      /* %ecx = reply bytes after the header */
    PRINT "fs read="
    mov %r9, %rsi
    call put_text
    call put_nl
    call fuse_release

    /* CREATE from-guest.txt in the root */
    movl $O_CREAT_EXCL_WRONLY, 0(%rbx)  /* flags */
    movl $S_IFREG_0644, 4(%rbx)         /* mode */
    movl $0x12, 8(%rbx)                 /* umask 022 */
    movl $0, 12(%rbx)                   /* open_flags */
    lea fs_new(%rip), %rsi
    mov $(fs_new_end - fs_new), %ecx
    lea 16(%rbx), %rdi
    call mem_copy
    add $16, %ecx
    mov $FUSE_CREATE, %eax
    mov $FS_ROOT, %edx
    call fuse_call
    mov 0(%r9), %r8                     /* fuse_entry_out.nodeid */
    mov FS_ENTRY_OUT(%r9), %rax         /* then fuse_open_out.fh */
    mov %rax, fs_fh(%rip)

    /* WRITE the text at offset 0 */
    mov %rbx, %rdi
    mov $40, %ecx
    call mem_zero
    mov fs_fh(%rip), %rax
    mov %rax, 0(%rbx)                   /* fh */
    movl $(fs_text_end - fs_text), 16(%rbx) /* size */
    lea fs_text(%rip), %rsi
    mov $(fs_text_end - fs_text), %ecx
    lea 40(%rbx), %rdi
    call mem_copy
    add $40, %ecx
    mov $FUSE_WRITE, %eax
    mov %r8, %rdx
    call fuse_call
    movl 0(%r9), %eax                   /* fuse_write_out.size */
    cmp $(fs_text_end - fs_text), %eax
    je 3f
    FAIL_VALUE "fs: FUSE_WRITE wrote "
3:  call fuse_release
    PRINT "fs created\n"
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    ret

/* fuse_release: RELEASE handle fs_fh of node %r8 (arguments at %rbx). */
fuse_release:
    push %rax
    push %rcx
    push %rdx
    push %rdi
    mov %rbx, %rdi
    mov $24, %ecx
    call mem_zero
    mov fs_fh(%rip), %rax
    mov %rax, 0(%rbx)
    mov $FUSE_RELEASE, %eax
    mov %r8, %rdx
    call fuse_call
    pop %rdi
    pop %rdx
    pop %rcx
    pop %rax
    ret

/* fuse_call: send FUSE request %eax for node %rdx with the %ecx argument bytes already at
 * FS_IN + FS_IN_HDR, wait for the reply and check its header (length = used length, same
 * unique, no error). %ecx = the reply's bytes after its header. */
fuse_call:
    push %rax
    push %rbx
    push %rdx
    push %rsi
    push %rdi
    mov %eax, %ebx                      /* opcode */
    call dev_buf
    lea FS_IN(%rax), %rsi
    add $FS_IN_HDR, %ecx
    movl %ecx, 0(%rsi)                  /* len */
    movl %ebx, 4(%rsi)                  /* opcode */
    mov fs_unique(%rip), %rax
    mov %rax, 8(%rsi)                   /* unique */
    mov %rdx, 16(%rsi)                  /* nodeid */
    movl $0, 24(%rsi)                   /* uid */
    movl $0, 28(%rsi)                   /* gid */
    movl $1, 32(%rsi)                   /* pid */
    movl $0, 36(%rsi)                   /* total_extlen, padding */
    mov $FS_REQUEST_QUEUE, %eax
    call vq_addr
    mov %rax, %rdi
    xor %eax, %eax
    mov $(VRING_DESC_F_NEXT | (1 << 16)), %edx
    call vq_desc                        /* 0: the request */
    lea (FS_OUT - FS_IN)(%rsi), %rsi
    mov $FS_OUT_LEN, %ecx
    mov $1, %eax
    mov $VRING_DESC_F_WRITE, %edx
    call vq_desc                        /* 1: the reply */
    mov $FS_REQUEST_QUEUE, %eax
    call vq_call                        /* %edx = used length */
    cmp $FS_OUT_HDR, %edx
    jae 1f
    mov %rdx, %rax
    FAIL_VALUE "fs: reply shorter than fuse_out_header: "
1:  cmpl %edx, 0(%rsi)
    je 2f
    movl 0(%rsi), %eax
    FAIL_VALUE "fs: reply header length differs from the used length: "
2:  mov 8(%rsi), %rax
    cmp fs_unique(%rip), %rax
    je 3f
    FAIL_VALUE "fs: reply for another request: unique="
3:  movl 4(%rsi), %edi                 /* error: 0 or a negative errno */
    test %edi, %edi
    jz 4f
    PRINT "virtio error: fs: FUSE opcode "
    mov %rbx, %rax
    call put_dec
    PRINT " failed: error=-"
    mov %edi, %eax
    neg %eax
    call put_dec
    jmp vio_fail
4:  incq fs_unique(%rip)
    lea -FS_OUT_HDR(%rdx), %ecx
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rbx
    pop %rax
    ret

    .section .rodata
fs_hello:
    .asciz "hello.txt"
fs_hello_end:
fs_new:
    .asciz "from-guest.txt"
fs_new_end:
fs_text:
    .ascii "written by the guest"
fs_text_end:

    .bss
    .balign 8
fs_unique:
    .skip 8
fs_fh:
    .skip 8
fs_tag:
    .skip FS_TAG_LEN + 4

    .text
