/*
 * A minimal polling virtio-mmio (version 2) driver shared by the virtio test guests: finding
 * the devices on the command line, the status/feature handshake, split virtqueues in fixed guest
 * RAM, and waiting for used-ring entries. Integer instructions only, no interrupts: the driver
 * polls the used ring with a bounded loop (virtio 1.2 §2.7 split virtqueues, §4.2 virtio-mmio).
 *
 * Global registers, preserved by every routine here and in the device drivers:
 *   %r13  index of the device being driven (0..MAX_DEVICES-1): picks its queue and buffer areas
 *   %r14  the command line (NUL-terminated, may be NULL)
 *   %r15  the device's MMIO base
 * Other routines follow lib64.S: arguments as documented, other registers preserved, flags
 * clobbered. Every failure prints "virtio error: <what>" and writes 1 to the exit port.
 *
 * Memory: device d's queue q lives at VQ_AREA + d * 0x10000 + q * 0x4000 (descriptor table at
 * +0, driver ring at +0x1000, device ring at +0x2000, the driver's own bookkeeping at +0x3000),
 * its request buffers at BUF_AREA + d * 0x10000. Both areas are above the guest image (1 MiB)
 * and inside the smallest guest RAM the tests use (64 MiB).
 */

    .equ VIRTIO_MAGIC, 0x74726976       /* "virt" */

    /* Register offsets (virtio 1.2 §4.2.2). */
    .equ VM_MAGIC, 0x000
    .equ VM_VERSION, 0x004
    .equ VM_DEVICE_ID, 0x008
    .equ VM_DEVICE_FEATURES, 0x010
    .equ VM_DEVICE_FEATURES_SEL, 0x014
    .equ VM_DRIVER_FEATURES, 0x020
    .equ VM_DRIVER_FEATURES_SEL, 0x024
    .equ VM_QUEUE_SEL, 0x030
    .equ VM_QUEUE_NUM_MAX, 0x034
    .equ VM_QUEUE_NUM, 0x038
    .equ VM_QUEUE_READY, 0x044
    .equ VM_QUEUE_NOTIFY, 0x050
    .equ VM_INTERRUPT_STATUS, 0x060
    .equ VM_INTERRUPT_ACK, 0x064
    .equ VM_STATUS, 0x070
    .equ VM_QUEUE_DESC, 0x080           /* low word; high word at +4 */
    .equ VM_QUEUE_DRIVER, 0x090
    .equ VM_QUEUE_DEVICE, 0x0a0
    .equ VM_CONFIG, 0x100

    /* Device status bits (§2.1). */
    .equ ST_ACKNOWLEDGE, 0x01
    .equ ST_DRIVER, 0x02
    .equ ST_DRIVER_OK, 0x04
    .equ ST_FEATURES_OK, 0x08

    /* Descriptor flags (§2.7.5). */
    .equ VRING_DESC_F_NEXT, 1
    .equ VRING_DESC_F_WRITE, 2

    .equ MAX_DEVICES, 8
    .equ VQ_AREA, 0x200000
    .equ VQ_DEVICE_STRIDE, 0x10000
    .equ VQ_STRIDE, 0x4000
    .equ VQ_MAX_QUEUES, 4
    .equ VQ_DRIVER_RING, 0x1000
    .equ VQ_DEVICE_RING, 0x2000
    .equ VQ_META, 0x3000
    .equ VQ_META_AVAIL, VQ_META + 0     /* u16: the driver ring index the driver wrote last */
    .equ VQ_META_USED, VQ_META + 2      /* u16: the device ring index consumed so far */
    .equ VQ_META_SIZE, VQ_META + 4      /* u16: QueueNum */
    .equ VQ_META_INDEX, VQ_META + 6     /* u16: the queue's index */
    .ifndef VQ_WANT                     /* an including guest may ask for more (at most 256) */
    .equ VQ_WANT, 16                    /* queue size asked for (less if QueueNumMax is less) */
    .endif
    .equ VQ_CLEAR, 0x200                /* bytes of each ring page zeroed at setup (16 entries fit) */
    .equ BUF_AREA, 0x400000
    .equ BUF_DEVICE_STRIDE, 0x10000
    /* Used-ring polls before giving up: ~2 us each under kvm_pvm, so about 10 s. */
    .equ POLL_LIMIT, 5000000

/* FAIL "text": print "virtio error: text" and write 1 to the exit port. */
.macro FAIL s:vararg
    PRINT "virtio error: "
    PRINT \s
    jmp vio_fail
.endm

/* FAIL_VALUE "text": like FAIL, with %rax printed in hex after the text. */
.macro FAIL_VALUE s:vararg
    PRINT "virtio error: "
    PRINT \s
    call put_hex
    jmp vio_fail
.endm

    .text

vio_fail:
    call put_nl
    mov $1, %eax
    EXIT

/* mem_zero: zero %rcx bytes (a multiple of 8) at %rdi. */
mem_zero:
    push %rcx
    push %rdi
    shr $3, %rcx
    jz 2f
1:  movq $0, (%rdi)
    add $8, %rdi
    dec %rcx
    jnz 1b
2:  pop %rdi
    pop %rcx
    ret

/* mem_copy: copy %rcx bytes from %rsi to %rdi. */
mem_copy:
    push %rax
    push %rcx
    push %rsi
    push %rdi
    test %rcx, %rcx
    jz 2f
1:  movb (%rsi), %al
    movb %al, (%rdi)
    inc %rsi
    inc %rdi
    dec %rcx
    jnz 1b
2:  pop %rdi
    pop %rsi
    pop %rcx
    pop %rax
    ret

/* str_len: %rax = length of the NUL-terminated string at %rsi (at most 4096). */
str_len:
    xor %eax, %eax
1:  cmpb $0, (%rsi,%rax)
    je 2f
    inc %eax
    cmp $4096, %eax
    jb 1b
2:  ret

/* ---- the command line ---- */

/* vio_scan: fill vio_table with the `virtio_mmio.device=<size>@<base>:<irq>` words of the
 * command line at %rsi (may be NULL), Linux's format (sizes and addresses as memparse reads
 * them: decimal or 0x-hex, optional K/M/G). %rax = number of devices found. */
vio_scan:
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    xor %r10d, %r10d            /* devices found */
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
2:  lea vio_key(%rip), %rdi
    call match_prefix
    test %rax, %rax
    jz 5f
    cmp $MAX_DEVICES, %r10d
    jb 3f
    FAIL "more than 8 virtio_mmio.device= entries"
3:  mov %rax, %rsi
    call parse_size
    mov %rax, %rbx              /* size */
    cmpb $'@', (%rsi)
    jne 4f
    inc %rsi
    call parse_size
    mov %rax, %rdx              /* base */
    cmpb $':', (%rsi)
    jne 4f
    inc %rsi
    call parse_size             /* irq */
    imul $24, %r10, %rcx
    lea vio_table(%rip), %rdi
    mov %rdx, (%rdi,%rcx)
    mov %rbx, 8(%rdi,%rcx)
    mov %rax, 16(%rdi,%rcx)
    inc %r10d
    jmp 1b
4:  FAIL "a virtio_mmio.device= entry is not <size>@<base>:<irq>"
5:  inc %rsi
    dec %r9d
    jnz 1b
9:  mov %r10, %rax
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    ret

/* match_prefix: %rax = %rsi + strlen(key) when the string at %rsi starts with the
 * NUL-terminated key at %rdi, else 0. */
match_prefix:
    push %rcx
    push %rdx
    xor %ecx, %ecx
1:  movzbl (%rdi,%rcx), %edx
    test %dl, %dl
    jz 2f
    cmpb %dl, (%rsi,%rcx)
    jne 3f
    inc %ecx
    jmp 1b
2:  lea (%rsi,%rcx), %rax
    jmp 4f
3:  xor %eax, %eax
4:  pop %rdx
    pop %rcx
    ret

/* parse_size: read a number at %rsi (decimal, or hex after "0x", then an optional K/M/G
 * multiplier) into %rax and advance %rsi past it. No digit at all is a failure. */
parse_size:
    push %rcx
    push %rdx
    xor %eax, %eax
    xor %ecx, %ecx              /* digits read */
    cmpb $'0', (%rsi)
    jne 3f
    movzbl 1(%rsi), %edx
    or $0x20, %edx
    cmp $'x', %edx
    jne 3f
    add $2, %rsi
1:  movzbl (%rsi), %edx         /* hex digits */
    sub $'0', %edx
    cmp $9, %edx
    jbe 2f
    movzbl (%rsi), %edx
    or $0x20, %edx
    sub $'a', %edx
    cmp $5, %edx
    ja 5f
    add $10, %edx
2:  shl $4, %rax
    add %rdx, %rax
    inc %rsi
    inc %ecx
    cmp $16, %ecx
    jb 1b
    jmp 5f
3:  movzbl (%rsi), %edx         /* decimal digits */
    sub $'0', %edx
    cmp $9, %edx
    ja 5f
    imul $10, %rax, %rax
    add %rdx, %rax
    inc %rsi
    inc %ecx
    cmp $19, %ecx
    jb 3b
5:  test %ecx, %ecx
    jnz 6f
    FAIL "a virtio_mmio.device= entry has no number where one is expected"
6:  movzbl (%rsi), %edx
    or $0x20, %edx
    mov $10, %ecx
    cmp $'k', %edx
    je 7f
    mov $20, %ecx
    cmp $'m', %edx
    je 7f
    mov $30, %ecx
    cmp $'g', %edx
    jne 8f
7:  shl %cl, %rax
    inc %rsi
8:  pop %rdx
    pop %rcx
    ret

/* ---- one device ---- */

/* vio_probe: check the magic value and the version of the device at %r15, print
 * "virtio <index>: base=.. size=.. irq=.. id=<device id>" from vio_table[%r13], and return the
 * device id in %rax. */
vio_probe:
    push %rcx
    push %rdx
    movl VM_MAGIC(%r15), %eax
    cmp $VIRTIO_MAGIC, %eax
    je 1f
    FAIL_VALUE "bad MagicValue "
1:  movl VM_VERSION(%r15), %eax
    cmp $2, %eax
    je 2f
    FAIL_VALUE "not a virtio-mmio version 2 device: Version="
2:  imul $24, %r13, %rcx
    lea vio_table(%rip), %rdx
    add %rdx, %rcx
    PRINT "virtio "
    mov %r13, %rax
    call put_dec
    PRINT ": base="
    mov (%rcx), %rax
    call put_hex
    PRINT " size="
    mov 8(%rcx), %rax
    call put_hex
    PRINT " irq="
    mov 16(%rcx), %rax
    call put_dec
    PRINT " id="
    movl VM_DEVICE_ID(%r15), %eax
    call put_dec
    call put_nl
    pop %rdx
    pop %rcx
    ret

/* dev_setup: the initialisation sequence of §3.1.1 for the device at %r15 with %ecx queues
 * (at most VQ_MAX_QUEUES): reset, ACKNOWLEDGE, DRIVER, accept VIRTIO_F_VERSION_1 plus the
 * device-specific feature bits in %edx (page 0) that the device offers, FEATURES_OK and check
 * that the device kept it, set up the queues, DRIVER_OK and check the status. %rax = the page-0
 * features accepted. */
dev_setup:
    push %rcx
    push %rdx
    push %rsi
    push %r8
    cmp $VQ_MAX_QUEUES, %ecx
    jbe 1f
    FAIL "too many queues asked for"
1:  movl $0, VM_STATUS(%r15)
    movl VM_STATUS(%r15), %eax
    test %eax, %eax
    jz 2f
    FAIL_VALUE "the device did not reset: Status="
2:  movl $ST_ACKNOWLEDGE, VM_STATUS(%r15)
    movl $(ST_ACKNOWLEDGE | ST_DRIVER), VM_STATUS(%r15)
    movl $1, VM_DEVICE_FEATURES_SEL(%r15)
    movl VM_DEVICE_FEATURES(%r15), %eax
    test $1, %eax                       /* VIRTIO_F_VERSION_1 is bit 32 */
    jnz 3f
    FAIL_VALUE "no VIRTIO_F_VERSION_1: device features[63:32]="
3:  movl $0, VM_DEVICE_FEATURES_SEL(%r15)
    movl VM_DEVICE_FEATURES(%r15), %r8d
    and %edx, %r8d
    movl $0, VM_DRIVER_FEATURES_SEL(%r15)
    movl %r8d, VM_DRIVER_FEATURES(%r15)
    movl $1, VM_DRIVER_FEATURES_SEL(%r15)
    movl $1, VM_DRIVER_FEATURES(%r15)
    movl $(ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK), VM_STATUS(%r15)
    movl VM_STATUS(%r15), %eax
    cmp $(ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK), %eax
    je 4f
    FAIL_VALUE "FEATURES_OK not kept: Status="
4:  xor %esi, %esi
5:  cmp %ecx, %esi
    jae 6f
    mov %esi, %eax
    call vq_setup
    inc %esi
    jmp 5b
6:  movl $(ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK), VM_STATUS(%r15)
    movl VM_STATUS(%r15), %eax
    cmp $(ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK), %eax
    je 7f
    FAIL_VALUE "the device did not take DRIVER_OK: Status="
7:  mov %r8, %rax
    pop %r8
    pop %rsi
    pop %rdx
    pop %rcx
    ret

/* dev_buf: %rax = the buffer area of device %r13. */
dev_buf:
    mov %r13, %rax
    shl $16, %rax
    add $BUF_AREA, %rax
    ret

/* ---- split virtqueues ---- */

/* vq_addr: %rax = the area of queue %eax of device %r13. */
vq_addr:
    push %rdx
    mov %eax, %eax
    shl $14, %rax
    mov %r13, %rdx
    shl $16, %rdx
    add %rdx, %rax
    add $VQ_AREA, %rax
    pop %rdx
    ret

/* vq_setup: select queue %eax, size it min(VQ_WANT, QueueNumMax), clear its rings, write their
 * addresses and set QueueReady. */
vq_setup:
    push %rcx
    push %rdx
    push %rdi
    push %r8
    mov %eax, %r8d                      /* queue index */
    movl %r8d, VM_QUEUE_SEL(%r15)
    movl VM_QUEUE_READY(%r15), %eax
    test %eax, %eax
    jz 1f
    FAIL "a queue is ready before the driver set it up"
1:  movl VM_QUEUE_NUM_MAX(%r15), %edx
    test %edx, %edx
    jnz 2f
    FAIL "QueueNumMax is 0 for a queue the device needs"
2:  mov $VQ_WANT, %eax
    cmp %eax, %edx
    jb 3f
    mov %eax, %edx                      /* size = min(VQ_WANT, max) */
3:  lea -1(%rdx), %eax
    test %edx, %eax
    jz 4f
    mov %rdx, %rax
    FAIL_VALUE "QueueNumMax below 16 and not a power of two: "
4:  mov %r8d, %eax
    call vq_addr
    mov %rax, %rdi
    mov $VQ_CLEAR, %ecx
    call mem_zero
    add $VQ_DRIVER_RING, %rdi
    call mem_zero
    add $(VQ_DEVICE_RING - VQ_DRIVER_RING), %rdi
    call mem_zero
    add $(VQ_META - VQ_DEVICE_RING), %rdi
    call mem_zero
    sub $VQ_META, %rdi
    movw %dx, VQ_META_SIZE(%rdi)
    movw %r8w, VQ_META_INDEX(%rdi)
    movl %edx, VM_QUEUE_NUM(%r15)
    mov %rdi, %rax
    movl %eax, VM_QUEUE_DESC(%r15)
    shr $32, %rax
    movl %eax, VM_QUEUE_DESC+4(%r15)
    lea VQ_DRIVER_RING(%rdi), %rax
    movl %eax, VM_QUEUE_DRIVER(%r15)
    shr $32, %rax
    movl %eax, VM_QUEUE_DRIVER+4(%r15)
    lea VQ_DEVICE_RING(%rdi), %rax
    movl %eax, VM_QUEUE_DEVICE(%r15)
    shr $32, %rax
    movl %eax, VM_QUEUE_DEVICE+4(%r15)
    movl $1, VM_QUEUE_READY(%r15)
    pop %r8
    pop %rdi
    pop %rdx
    pop %rcx
    ret

/* vq_desc: descriptor %eax of the queue at %rdi = { addr %rsi, len %ecx, flags %dx,
 * next = high half of %edx }. */
vq_desc:
    push %rax
    mov %eax, %eax
    shl $4, %rax
    mov %rsi, (%rdi,%rax)
    movl %ecx, 8(%rdi,%rax)
    movl %edx, 12(%rdi,%rax)
    pop %rax
    ret

/* vq_push: make the chain headed by descriptor %eax available on the queue at %rdi (ring entry
 * first, then the index: x86 keeps stores in order). */
vq_push:
    push %rcx
    push %rdx
    movzwl VQ_META_AVAIL(%rdi), %ecx
    movzwl VQ_META_SIZE(%rdi), %edx
    dec %edx
    and %ecx, %edx
    movw %ax, VQ_DRIVER_RING+4(%rdi,%rdx,2)
    inc %ecx
    movw %cx, VQ_META_AVAIL(%rdi)
    movw %cx, VQ_DRIVER_RING+2(%rdi)
    pop %rdx
    pop %rcx
    ret

/* vq_notify: tell the device at %r15 that the queue at %rdi has new buffers. */
vq_notify:
    push %rax
    movzwl VQ_META_INDEX(%rdi), %eax
    movl %eax, VM_QUEUE_NOTIFY(%r15)
    pop %rax
    ret

/* vq_wait: poll the device ring of the queue at %rdi (bounded) for the next used entry and
 * acknowledge the interrupt it raised. %eax = its descriptor id, %edx = its length. */
vq_wait:
    push %rcx
    push %r8
    movzwl VQ_META_USED(%rdi), %r8d
    mov $POLL_LIMIT, %ecx
1:  movzwl VQ_DEVICE_RING+2(%rdi), %eax
    cmp %r8w, %ax
    jne 2f
    dec %ecx
    jnz 1b
    movzwl VQ_META_INDEX(%rdi), %eax
    FAIL_VALUE "no used buffer within the poll limit on queue "
2:  movzwl VQ_META_SIZE(%rdi), %edx
    dec %edx
    and %r8d, %edx
    shl $3, %edx
    movl VQ_DEVICE_RING+4(%rdi,%rdx), %eax
    movl VQ_DEVICE_RING+8(%rdi,%rdx), %edx
    inc %r8d
    movw %r8w, VQ_META_USED(%rdi)
    movl VM_INTERRUPT_STATUS(%r15), %ecx
    movl %ecx, VM_INTERRUPT_ACK(%r15)
    pop %r8
    pop %rcx
    ret

/* vq_call: run the chain headed by descriptor 0 of queue %eax (push, notify, wait) and
 * check that the device returned that chain. %rdi = the queue area, %edx = the used length. */
vq_call:
    push %rax
    call vq_addr
    mov %rax, %rdi
    xor %eax, %eax
    call vq_push
    call vq_notify
    call vq_wait
    test %eax, %eax
    jz 1f
    FAIL_VALUE "the device returned a chain the driver did not post: id="
1:  pop %rax
    ret

    .section .rodata
vio_key:
    .asciz "virtio_mmio.device="

    .bss
    .balign 8
/* Per device: base, size, irq (u64 each). */
vio_table:
    .skip 24 * MAX_DEVICES

    .text
