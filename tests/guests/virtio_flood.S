/*
 * virtio_flood: a hostile virtio-blk driver (the first device the command line announces). It
 * sets the device up with virtio_lib.S, prints "flood", then keeps the request queue full of
 * one IN request for FLOOD_LEN bytes in each of its 256 entries (the most a request may ask for is 254 MiB) and notifies
 * after every chain, forever, never looking at a status: only a timeout or a kill ends it.
 * Needs FLOOD_BUF + FLOOD_LEN bytes of guest memory and a disk of at least FLOOD_LEN bytes.
 */
    .equ VQ_WANT, 256                   /* the whole queue: 256 x 240 MiB per notification */
    .include "boot64.S"
    .include "virtio_lib.S"

    .equ FLOOD_BUF, 0x1000000           /* 16 MiB, above the rings and request buffers */
    .equ FLOOD_LEN, 240 << 20
    .equ FLOOD_STATUS, 0x100            /* in dev_buf */

main64:
    call bp_cmdline
    mov %rax, %rsi
    call vio_scan
    test %rax, %rax
    jnz 1f
    FAIL "flood: no virtio device on the command line"
1:  xor %r13d, %r13d
    mov vio_table(%rip), %r15
    call vio_probe
    mov $1, %ecx
    xor %edx, %edx
    call dev_setup
    call dev_buf                        /* header: IN, sector 0 */
    movl $0, (%rax)
    movl $0, 4(%rax)
    movq $0, 8(%rax)
    mov %rax, %rbx
    xor %eax, %eax
    call vq_addr
    mov %rax, %rdi
    mov %rbx, %rsi
    mov $16, %ecx
    mov $(VRING_DESC_F_NEXT | (1 << 16)), %edx
    xor %eax, %eax
    call vq_desc                        /* 0: header */
    mov $FLOOD_BUF, %esi
    mov $FLOOD_LEN, %ecx
    mov $(VRING_DESC_F_WRITE | VRING_DESC_F_NEXT | (2 << 16)), %edx
    mov $1, %eax
    call vq_desc                        /* 1: data */
    lea FLOOD_STATUS(%rbx), %rsi
    mov $1, %ecx
    mov $VRING_DESC_F_WRITE, %edx
    mov $2, %eax
    call vq_desc                        /* 2: status */
    PRINT "flood\n"
2:  movzwl VQ_META_AVAIL(%rdi), %ecx    /* room: avail - used < size */
    movzwl VQ_DEVICE_RING+2(%rdi), %edx
    sub %edx, %ecx
    and $0xffff, %ecx
    movzwl VQ_META_SIZE(%rdi), %edx
    cmp %edx, %ecx
    jae 3f
    xor %eax, %eax
    call vq_push
    call vq_notify
    jmp 2b
3:  pause
    jmp 2b
