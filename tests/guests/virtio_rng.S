/*
 * virtio-rng driver of the virtio test guest (included by virtio_guest.S; virtio 1.2 §5.4): one
 * 64-byte device-writable buffer on the request queue, then
 * "rng ok len=<bytes written> nonzero=<how many of them are not zero>".
 */
    .equ RNG_LEN, 64

drv_rng:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    mov $1, %ecx
    xor %edx, %edx
    call dev_setup
    call dev_buf
    mov %rax, %rsi
    mov %rsi, %rdi
    mov $RNG_LEN, %ecx
    call mem_zero
    xor %eax, %eax
    call vq_addr
    mov %rax, %rdi
    xor %eax, %eax
    mov $VRING_DESC_F_WRITE, %edx
    call vq_desc
    xor %eax, %eax
    call vq_call
    cmp $RNG_LEN, %edx
    jbe 1f
    mov %rdx, %rax
    FAIL_VALUE "rng: used length beyond the buffer: "
1:  PRINT "rng ok len="
    mov %rdx, %rax
    call put_dec
    call dev_buf
    mov %rax, %rsi
    xor %eax, %eax                      /* nonzero bytes */
    test %edx, %edx
    jz 3f
2:  cmpb $0, (%rsi)
    je 4f
    inc %eax
4:  inc %rsi
    dec %edx
    jnz 2b
3:  PRINT " nonzero="
    call put_dec
    call put_nl
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    ret
