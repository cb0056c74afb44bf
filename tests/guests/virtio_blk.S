/*
 * virtio-blk driver of the virtio test guest (included by virtio_guest.S; virtio 1.2 §5.2):
 * prints the capacity ("blk capacity=<sectors>"), reads sector 0, writes sectors 1 and 2 with
 * "kiln-blk" repeated, FLUSHes, asks for the device id, and prints
 * "blk read=<first 8 bytes of sector 0> wrote=2 id=<id>".
 *
 * Each request is a chain: the 16-byte request header (device-readable), the data buffer if
 * any, and the one-byte status (device-writable). A status other than OK is a failure.
 */
    .equ BLK_T_IN, 0
    .equ BLK_T_OUT, 1
    .equ BLK_T_FLUSH, 4
    .equ BLK_T_GET_ID, 8
    .equ VIRTIO_BLK_F_RO, 1 << 5
    .equ VIRTIO_BLK_F_FLUSH, 1 << 9
    .equ BLK_SECTOR, 512
    .equ BLK_HDR, 0x0000                /* offsets in dev_buf */
    .equ BLK_STATUS, 0x0100
    .equ BLK_READ_BUF, 0x1000
    .equ BLK_WRITE_BUF, 0x2000
    .equ BLK_ID_BUF, 0x3000
    .equ BLK_ID_LEN, 20                 /* VIRTIO_BLK_ID_BYTES */
    .equ BLK_WRITE_SECTOR, 1
    .equ BLK_WRITE_SECTORS, 2

drv_blk:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    mov $1, %ecx
    mov $(VIRTIO_BLK_F_RO | VIRTIO_BLK_F_FLUSH), %edx
    call dev_setup
    test $VIRTIO_BLK_F_RO, %eax
    jz 1f
    FAIL "blk: the device is read-only (VIRTIO_BLK_F_RO)"
1:  test $VIRTIO_BLK_F_FLUSH, %eax
    jnz 2f
    FAIL "blk: the device does not offer VIRTIO_BLK_F_FLUSH"
2:  movl VM_CONFIG(%r15), %eax          /* capacity: le64 in 512-byte sectors */
    movl VM_CONFIG+4(%r15), %edx
    shl $32, %rdx
    or %rdx, %rax
    PRINT "blk capacity="
    call put_dec
    call put_nl

    /* Read sector 0. */
    mov $BLK_T_IN, %eax
    xor %edx, %edx
    mov $BLK_READ_BUF, %esi
    mov $BLK_SECTOR, %ecx
    mov $VRING_DESC_F_WRITE, %r8d
    call blk_request

    /* Write sectors 1..2 with "kiln-blk" repeated. */
    call dev_buf
    lea BLK_WRITE_BUF(%rax), %rdi
    mov blk_pattern(%rip), %rax
    mov $(BLK_WRITE_SECTORS * BLK_SECTOR / 8), %ecx
3:  mov %rax, (%rdi)
    add $8, %rdi
    dec %ecx
    jnz 3b
    mov $BLK_T_OUT, %eax
    mov $BLK_WRITE_SECTOR, %edx
    mov $BLK_WRITE_BUF, %esi
    mov $(BLK_WRITE_SECTORS * BLK_SECTOR), %ecx
    xor %r8d, %r8d
    call blk_request

    mov $BLK_T_FLUSH, %eax
    xor %edx, %edx
    xor %ecx, %ecx
    call blk_request

    call dev_buf
    lea BLK_ID_BUF(%rax), %rdi
    mov $(BLK_ID_LEN + 4), %ecx         /* keeps a NUL after a 20-byte id */
    call mem_zero
    mov $BLK_T_GET_ID, %eax
    xor %edx, %edx
    mov $BLK_ID_BUF, %esi
    mov $BLK_ID_LEN, %ecx
    mov $VRING_DESC_F_WRITE, %r8d
    call blk_request

    PRINT "blk read="
    call dev_buf
    lea BLK_READ_BUF(%rax), %rsi
    mov $8, %ecx
    call put_ascii
    PRINT " wrote=2 id="
    call dev_buf
    lea BLK_ID_BUF(%rax), %rsi
    call puts
    call put_nl
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    ret

/* blk_request: request type %eax for sector %rdx with %ecx data bytes at dev_buf + %rsi
 * (descriptor flags %r8d: VRING_DESC_F_WRITE when the device writes them; no data descriptor
 * when %ecx is 0); waits for it and checks the status byte. */
blk_request:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r9
    mov %eax, %r9d                      /* type, for messages */
    mov %rsi, %rbx
    call dev_buf
    add %rax, %rbx                      /* %rbx: data */
    movl %r9d, BLK_HDR(%rax)
    movl $0, BLK_HDR+4(%rax)            /* reserved */
    mov %rdx, BLK_HDR+8(%rax)           /* sector */
    movb $0xff, BLK_STATUS(%rax)
    lea BLK_HDR(%rax), %rsi
    mov %ecx, %edx                      /* keep the data length */
    mov $0, %eax
    call vq_addr
    mov %rax, %rdi
    push %rdx
    mov $16, %ecx
    xor %eax, %eax
    mov $(VRING_DESC_F_NEXT | (1 << 16)), %edx
    call vq_desc                        /* 0: header */
    pop %rcx                            /* data length */
    mov $1, %eax
    test %ecx, %ecx
    jz 1f
    mov %rbx, %rsi
    mov %r8d, %edx
    or $(VRING_DESC_F_NEXT | (2 << 16)), %edx
    call vq_desc                        /* 1: data */
    mov $2, %eax
1:  push %rax
    call dev_buf
    lea BLK_STATUS(%rax), %rsi
    pop %rax
    mov $1, %ecx
    mov $VRING_DESC_F_WRITE, %edx
    call vq_desc                        /* last: status */
    xor %eax, %eax
    call vq_call
    call dev_buf
    movzbl BLK_STATUS(%rax), %eax
    test %eax, %eax
    jz 2f
    PRINT "virtio error: blk: request type "
    push %rax
    mov %r9, %rax
    call put_dec
    pop %rax
    PRINT " ended with status "
    call put_dec
    jmp vio_fail
2:  pop %r9
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    ret

    .section .rodata
    .balign 8
blk_pattern:
    .ascii "kiln-blk"

    .text
