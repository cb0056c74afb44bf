#!/bin/sh
# The qemu-img side of benches/block.rs: the same image (64 MiB raw base, a qcow2 overlay over it
# with every cluster written once) and the same 4 KiB access pattern (a step of 7919 blocks,
# wrapping at the end), one request at a time, through the host page cache.
# Usage: devices/benches/qemu-img-bench.sh [COUNT]   (prints ops/s and MiB/s per mode)
set -eu
count=${1:-20000}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
qemu-img create -q -f raw "$dir/base.raw" 64M
qemu-io -f raw -c 'write -q -P 0xa5 0 64M' "$dir/base.raw"
qemu-img create -q -f qcow2 -b "$dir/base.raw" -F raw "$dir/overlay.qcow2"
qemu-io -f qcow2 -c 'write -q -P 0x5a 0 64M' "$dir/overlay.qcow2"
step=$((7919 * 4096))
for mode in read write; do
    flag=
    [ "$mode" = write ] && flag=-w
    out=$(qemu-img bench -f qcow2 -t writeback -d 1 -c "$count" -s 4096 -S "$step" $flag \
        "$dir/overlay.qcow2")
    secs=$(echo "$out" | sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p')
    awk -v m="$mode" -v c="$count" -v s="$secs" 'BEGIN {
        printf "qemu-img bench 4k scattered %-5s %6d ops in %.3f s: %8.0f ops/s, %6.1f MiB/s\n",
            m, c, s, c / s, c * 4096 / s / 1048576 }'
done
qemu-img --version | head -1
