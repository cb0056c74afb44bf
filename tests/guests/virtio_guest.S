/*
 * virtio_guest: 64-bit entry; a polling virtio-mmio driver (virtio_lib.S) for every device the
 * command line announces (`virtio_mmio.device=<size>@<base>:<irq>`, in order): prints
 * "virtio devices=<n>", then per device "virtio <i>: base=.. size=.. irq=.. id=<type>" and what
 * its driver did (virtio_rng.S, virtio_vsock.S, virtio_fs.S, virtio_blk.S; other types are
 * "virtio <i>: no driver"), then "virtio done" and writes 0 to the exit port. Any failure
 * prints "virtio error: <what>" and writes 1.
 */
    .include "boot64.S"
    .include "virtio_lib.S"
    .include "virtio_rng.S"
    .include "virtio_vsock.S"
    .include "virtio_fs.S"
    .include "virtio_blk.S"

    .equ ID_BLK, 2
    .equ ID_RNG, 4
    .equ ID_VSOCK, 19
    .equ ID_FS, 26

main64:
    call bp_cmdline
    mov %rax, %r14
    mov %rax, %rsi
    call vio_scan
    mov %rax, %r12
    PRINT "virtio devices="
    call put_dec
    call put_nl
    xor %r13d, %r13d
1:  cmp %r12, %r13
    jae 9f
    imul $24, %r13, %rax
    lea vio_table(%rip), %rdx
    mov (%rdx,%rax), %r15
    call vio_probe
    cmp $ID_RNG, %eax
    jne 2f
    call drv_rng
    jmp 8f
2:  cmp $ID_VSOCK, %eax
    jne 3f
    call drv_vsock
    jmp 8f
3:  cmp $ID_FS, %eax
    jne 4f
    call drv_fs
    jmp 8f
4:  cmp $ID_BLK, %eax
    jne 5f
    call drv_blk
    jmp 8f
5:  PRINT "virtio "
    mov %r13, %rax
    call put_dec
    PRINT ": no driver\n"
8:  inc %r13
    jmp 1b
9:  PRINT "virtio done\n"
    xor %eax, %eax
    EXIT
