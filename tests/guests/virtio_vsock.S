/*
 * virtio-vsock driver of the virtio test guest (included by virtio_guest.S; virtio 1.2 §5.10):
 * prints "vsock cid=<guest_cid>", connects a stream to host CID 2 port `kiln.vsock_port=<n>`,
 * sends "ping from guest", prints what the host answers ("vsock got=<text>"), then shuts the
 * stream down both ways and waits for the host's reset ("vsock closed").
 *
 * Packets are one descriptor each, header then payload (what Linux 6.2+ does). The receive queue
 * holds VSOCK_RX_BUFS buffers; each is copied out and posted again as soon as it is used.
 */
    .equ VSOCK_RX_QUEUE, 0
    .equ VSOCK_TX_QUEUE, 1
    .equ VSOCK_QUEUES, 3                /* rx, tx, event */
    .equ VSOCK_HDR_LEN, 44
    .equ VSOCK_HOST_CID, 2
    .equ VSOCK_TYPE_STREAM, 1
    .equ VSOCK_OP_REQUEST, 1
    .equ VSOCK_OP_RESPONSE, 2
    .equ VSOCK_OP_RST, 3
    .equ VSOCK_OP_SHUTDOWN, 4
    .equ VSOCK_OP_RW, 5
    .equ VSOCK_SHUTDOWN_BOTH, 3         /* RCV | SEND */
    .equ VSOCK_LOCAL_PORT, 1234
    .equ VSOCK_BUF_ALLOC, 65536
    .equ VSOCK_RX_BUFS, 4
    .equ VSOCK_RX_BUF_LEN, 0x1000       /* rx buffer i at dev_buf + i * 0x1000 */
    .equ VSOCK_TX_BUF, 0x8000           /* offset of the tx packet in dev_buf */
    .equ VSOCK_PKT_MAX, 256             /* payload bytes kept of a received packet */
    .equ VSOCK_SKIP_MAX, 16             /* other packets tolerated while waiting for one op */
    /* Header fields (§5.10.6, little-endian). */
    .equ VH_SRC_CID, 0
    .equ VH_DST_CID, 8
    .equ VH_SRC_PORT, 16
    .equ VH_DST_PORT, 20
    .equ VH_LEN, 24
    .equ VH_TYPE, 28
    .equ VH_OP, 30
    .equ VH_FLAGS, 32
    .equ VH_BUF_ALLOC, 36
    .equ VH_FWD_CNT, 40

drv_vsock:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    mov %r14, %rsi
    lea vsock_port_key(%rip), %rdi
    call cmdline_number
    test %ecx, %ecx
    jnz 1f
    FAIL "vsock: no kiln.vsock_port=<n> on the command line"
1:  movl %eax, vsock_port(%rip)
    movl $0, vsock_fwd_cnt(%rip)
    mov $VSOCK_QUEUES, %ecx
    xor %edx, %edx
    call dev_setup

    movl VM_CONFIG(%r15), %eax          /* guest_cid: le64, read as two 32-bit halves */
    movl VM_CONFIG+4(%r15), %edx
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, vsock_cid(%rip)
    PRINT "vsock cid="
    call put_dec
    call put_nl

    /* Fill the receive queue. */
    mov $VSOCK_RX_QUEUE, %eax
    call vq_addr
    mov %rax, %rdi
    call dev_buf
    mov %rax, %rsi
    mov $VSOCK_RX_BUF_LEN, %ecx
    mov $VRING_DESC_F_WRITE, %edx
    xor %eax, %eax
2:  call vq_desc
    call vq_push
    add $VSOCK_RX_BUF_LEN, %rsi
    inc %eax
    cmp $VSOCK_RX_BUFS, %eax
    jb 2b
    call vq_notify

    mov $VSOCK_OP_REQUEST, %eax
    xor %ecx, %ecx
    xor %edx, %edx
    call vsock_send
    mov $VSOCK_OP_RESPONSE, %eax
    call vsock_expect
    PRINT "vsock connected port="
    movl vsock_port(%rip), %eax
    call put_dec
    call put_nl

    mov $VSOCK_OP_RW, %eax
    lea vsock_ping(%rip), %rsi
    mov $(vsock_ping_end - vsock_ping), %ecx
    xor %edx, %edx
    call vsock_send
    mov $VSOCK_OP_RW, %eax
    call vsock_expect
    lea vsock_pkt(%rip), %rsi
    movl VH_LEN(%rsi), %ecx
    addl %ecx, vsock_fwd_cnt(%rip)      /* the payload is consumed: give the credit back */
    add $VSOCK_HDR_LEN, %rsi
    cmp $VSOCK_PKT_MAX, %ecx
    jbe 3f
    mov $VSOCK_PKT_MAX, %ecx
3:  push %rsi
    PRINT "vsock got="
    pop %rsi
    call put_text
    call put_nl

    mov $VSOCK_OP_SHUTDOWN, %eax
    xor %ecx, %ecx
    mov $VSOCK_SHUTDOWN_BOTH, %edx
    call vsock_send
    mov $VSOCK_OP_RST, %eax
    call vsock_expect
    PRINT "vsock closed\n"
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    ret

/* vsock_send: send a packet of op %eax with flags %edx and the %ecx payload bytes at %rsi on
 * the connection, and wait until the device used it. */
vsock_send:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbx
    mov %eax, %ebx                      /* op */
    call dev_buf
    lea VSOCK_TX_BUF(%rax), %rdi
    mov vsock_cid(%rip), %rax
    mov %rax, VH_SRC_CID(%rdi)
    movq $VSOCK_HOST_CID, VH_DST_CID(%rdi)
    movl $VSOCK_LOCAL_PORT, VH_SRC_PORT(%rdi)
    movl vsock_port(%rip), %eax
    movl %eax, VH_DST_PORT(%rdi)
    movl %ecx, VH_LEN(%rdi)
    movw $VSOCK_TYPE_STREAM, VH_TYPE(%rdi)
    movw %bx, VH_OP(%rdi)
    movl %edx, VH_FLAGS(%rdi)
    movl $VSOCK_BUF_ALLOC, VH_BUF_ALLOC(%rdi)
    movl vsock_fwd_cnt(%rip), %eax
    movl %eax, VH_FWD_CNT(%rdi)
    add $VSOCK_HDR_LEN, %rdi
    call mem_copy
    sub $VSOCK_HDR_LEN, %rdi
    mov %rdi, %rsi
    add $VSOCK_HDR_LEN, %ecx
    mov $VSOCK_TX_QUEUE, %eax
    call vq_addr
    mov %rax, %rdi
    xor %eax, %eax
    xor %edx, %edx
    call vq_desc
    mov $VSOCK_TX_QUEUE, %eax
    call vq_call
    pop %rbx
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    ret

/* vsock_expect: receive packets until one of op %eax arrives for this connection, skipping at
 * most VSOCK_SKIP_MAX others (credit updates); a reset while waiting for something else is a
 * failure. The packet (header and up to VSOCK_PKT_MAX payload bytes) is left in vsock_pkt. */
vsock_expect:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    mov %eax, %ebx                      /* op wanted */
    mov $VSOCK_SKIP_MAX, %r8d
1:  mov $VSOCK_RX_QUEUE, %eax
    call vq_addr
    mov %rax, %rdi
    call vq_wait                        /* %eax = buffer id, %edx = length */
    cmp $VSOCK_RX_BUFS, %eax
    jb 2f
    FAIL_VALUE "vsock: the device used an rx buffer the driver did not post: id="
2:  cmp $VSOCK_HDR_LEN, %edx
    jae 3f
    mov %rdx, %rax
    FAIL_VALUE "vsock: rx packet shorter than a header: "
3:  push %rax
    shl $12, %eax                       /* * VSOCK_RX_BUF_LEN */
    mov %rax, %rsi
    call dev_buf
    add %rax, %rsi
    mov $(VSOCK_HDR_LEN + VSOCK_PKT_MAX), %ecx
    cmp %ecx, %edx
    jae 4f
    mov %edx, %ecx
4:  push %rdi
    lea vsock_pkt(%rip), %rdi
    call mem_copy
    pop %rdi
    pop %rax
    call vq_push                        /* the buffer goes back to the device at once */
    call vq_notify

    lea vsock_pkt(%rip), %rsi
    cmpq $VSOCK_HOST_CID, VH_SRC_CID(%rsi)
    jne 8f
    mov VH_DST_CID(%rsi), %rax
    cmp vsock_cid(%rip), %rax
    jne 8f
    movl VH_SRC_PORT(%rsi), %eax
    cmp vsock_port(%rip), %eax
    jne 8f
    cmpl $VSOCK_LOCAL_PORT, VH_DST_PORT(%rsi)
    jne 8f
    movzwl VH_OP(%rsi), %eax
    cmp %ebx, %eax
    je 9f
    cmp $VSOCK_OP_RST, %eax
    jne 5f
    mov %rbx, %rax
    FAIL_VALUE "vsock: the host reset the connection while the guest waited for op "
5:  dec %r8d
    jnz 1b
    mov %rbx, %rax
    FAIL_VALUE "vsock: too many other packets while waiting for op "
8:  FAIL "vsock: a packet for another connection (cids or ports differ)"
9:  pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    ret

    .section .rodata
vsock_port_key:
    .asciz "kiln.vsock_port="
vsock_ping:
    .ascii "ping from guest"
vsock_ping_end:

    .bss
    .balign 8
vsock_cid:
    .skip 8
vsock_port:
    .skip 4
vsock_fwd_cnt:
    .skip 4
vsock_pkt:
    .skip VSOCK_HDR_LEN + VSOCK_PKT_MAX

    .text
