//! virtio-blk benchmarks: 4 KiB scattered reads and writes on a qcow2 overlay through
//! `DiskBackend` (compare with `benches/qemu-img-bench.sh`, which runs `qemu-img bench` with the
//! same access pattern on an equivalent image), and the cost of one request through the queue.

use std::fs;
use std::io;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kiln_devices::virtio::block::{open_disk, Block, DiskBackend, DiskMode, DiskSpec};
use kiln_devices::virtio::{GuestMem, Interrupt, VirtioDevice};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const IMAGE_SIZE: u64 = 64 << 20;
const BLOCK: usize = 4096;
/// qemu-img bench walks the image with a fixed step, wrapping at the end; a step of 7919
/// blocks (prime, so every block is visited once per round) scatters the accesses.
const STEP: u64 = 7919 * BLOCK as u64;

/// A fresh 64 MiB raw base and a fully allocated qcow2 overlay over it (every cluster written
/// once, as `qemu-io -c 'write 0 64M'` does for the qemu-img side).
fn overlay(dir: &Path) -> Box<dyn DiskBackend> {
    let base = dir.join("base.raw");
    fs::write(&base, vec![0xa5u8; IMAGE_SIZE as usize]).expect("write base");
    let spec = DiskSpec {
        path: base,
        mode: DiskMode::KeptOverlay(dir.join("overlay.qcow2")),
    };
    let mut disk = open_disk(&spec).expect("create overlay");
    let chunk = vec![0x5au8; 1 << 20];
    for off in (0..IMAGE_SIZE).step_by(chunk.len()) {
        disk.write_at(&chunk, off).expect("fill overlay");
    }
    disk.flush().expect("flush overlay");
    disk
}

fn next(offset: u64) -> u64 {
    (offset + STEP) % IMAGE_SIZE
}

fn disk_io(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut disk = overlay(dir.path());
    let mut g = c.benchmark_group("qcow2_overlay_4k");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    let mut buf = vec![0u8; BLOCK];
    let mut off = 0;
    g.bench_function("scattered_read", |b| {
        b.iter(|| {
            disk.read_at(&mut buf, off).expect("read");
            off = next(off);
        })
    });
    let mut off = 0;
    g.bench_function("scattered_write", |b| {
        b.iter(|| {
            disk.write_at(&buf, off).expect("write");
            off = next(off);
        })
    });
    g.finish();
}

/// Bytes in memory, to time the device alone.
struct MemDisk(Vec<u8>);

impl DiskBackend for MemDisk {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_only(&self) -> bool {
        false
    }
    fn id(&self) -> [u8; 20] {
        [0; 20]
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let o = offset as usize;
        buf.copy_from_slice(&self.0[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let o = offset as usize;
        self.0[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&mut self, _: u64, _: u64) -> io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&mut self, _: u64, _: u64, _: bool) -> io::Result<()> {
        Ok(())
    }
}

const Q: u16 = 256;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDR: u64 = 0x10000;
const DATA: u64 = 0x20000;
const STATUS: u64 = 0x30000;

/// A device with an activated queue and a 4 KiB request (IN or OUT) in descriptors 0..3.
fn device(disk: Box<dyn DiskBackend>, kind: u32) -> (Block, GuestMem) {
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("guest memory");
    let mut q = Queue::new(Q).expect("queue");
    q.set_size(Q);
    q.try_set_desc_table_address(GuestAddress(0)).expect("desc");
    q.try_set_avail_ring_address(GuestAddress(AVAIL))
        .expect("avail");
    q.try_set_used_ring_address(GuestAddress(USED))
        .expect("used");
    q.set_ready(true);
    let write = 2u16; // VRING_DESC_F_WRITE
    let data_flags = if kind == 0 { write } else { 0 };
    let descs = [
        Descriptor::new(HDR, 16, 1, 1),
        Descriptor::new(DATA, BLOCK as u32, 1 | data_flags, 2),
        Descriptor::new(STATUS, 1, write, 0),
    ];
    for (i, d) in descs.iter().enumerate() {
        mem.write_obj(RawDescriptor::from(*d), GuestAddress(16 * i as u64))
            .expect("descriptor");
    }
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&kind.to_le_bytes());
    hdr[8..16].copy_from_slice(&8u64.to_le_bytes());
    mem.write_slice(&hdr, GuestAddress(HDR)).expect("header");
    let mut block = Block::new(disk);
    let interrupt = Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
    let features = block.features();
    block
        .activate(mem.clone(), vec![q], interrupt, features)
        .expect("activate");
    (block, mem)
}

/// Offers the request in descriptor 0 once more (the driver's side, timed with the device: a
/// batch of offers before processing would overrun the ring).
fn offer(mem: &GuestMem) {
    let idx: u16 = mem.read_obj(GuestAddress(AVAIL + 2)).expect("avail idx");
    let slot = AVAIL + 4 + 2 * u64::from(idx % Q);
    mem.write_obj(0u16, GuestAddress(slot)).expect("avail slot");
    mem.write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2))
        .expect("avail idx");
}

fn queue_request(c: &mut Criterion) {
    let mut g = c.benchmark_group("virtio_blk_request_4k");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    for (name, kind) in [("in_memdisk", 0u32), ("out_memdisk", 1)] {
        let (mut block, mem) = device(Box::new(MemDisk(vec![0; 1 << 20])), kind);
        g.bench_function(name, |b| {
            b.iter(|| {
                offer(&mem);
                block.process_queue(0)
            })
        });
        assert!(!block.is_broken());
        let status: u8 = mem.read_obj(GuestAddress(STATUS)).expect("status");
        assert_eq!(status, 0, "the request failed");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut block, mem) = device(overlay(dir.path()), 0);
    g.bench_function("in_qcow2_overlay", |b| {
        b.iter(|| {
            offer(&mem);
            block.process_queue(0)
        })
    });
    assert!(!block.is_broken());
    let status: u8 = mem.read_obj(GuestAddress(STATUS)).expect("status");
    assert_eq!(status, 0, "the request failed");
    g.finish();
}

/// Ops per run in the side-by-side comparison (the same count is given to qemu-img bench).
const COMPARE_OPS: u32 = 20_000;
const COMPARE_ROUNDS: usize = 3;

/// Seconds for `COMPARE_OPS` scattered 4 KiB requests through kiln's backend.
fn kiln_run(disk: &mut dyn DiskBackend, write: bool) -> f64 {
    let mut buf = vec![0x5au8; BLOCK];
    let mut off = 0;
    let start = Instant::now();
    for _ in 0..COMPARE_OPS {
        if write {
            disk.write_at(&buf, off).expect("write");
        } else {
            disk.read_at(&mut buf, off).expect("read");
        }
        off = next(off);
    }
    start.elapsed().as_secs_f64()
}

/// Seconds qemu-img bench reports for the same requests on the same file; `None` without it.
fn qemu_img_run(image: &Path, write: bool) -> Option<f64> {
    let step = STEP.to_string();
    let count = COMPARE_OPS.to_string();
    let mut args = vec![
        "bench",
        "-f",
        "qcow2",
        "-t",
        "writeback",
        "-d",
        "1",
        "-c",
        &count,
    ];
    args.extend(["-s", "4096", "-S", &step]);
    if write {
        args.push("-w");
    }
    let image = image.to_str()?;
    args.push(image);
    let out = Command::new("qemu-img").args(&args).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Run completed in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|s| s.parse().ok())
}

/// kiln's backend and qemu-img bench on the same overlay file in the same run, alternating,
/// best of `COMPARE_ROUNDS` each (the machines are shared; the best run is the least disturbed).
fn compare_with_qemu_img(_: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(overlay(dir.path()));
    let image = dir.path().join("overlay.qcow2");
    println!("\nside by side, {COMPARE_OPS} scattered 4 KiB requests, best of {COMPARE_ROUNDS}:");
    for write in [false, true] {
        let (mut kiln, mut qemu) = (f64::MAX, f64::MAX);
        for _ in 0..COMPARE_ROUNDS {
            let spec = DiskSpec {
                path: image.clone(),
                mode: DiskMode::InPlace,
            };
            let mut disk = open_disk(&spec).expect("reopen overlay");
            kiln = kiln.min(kiln_run(disk.as_mut(), write));
            drop(disk);
            match qemu_img_run(&image, write) {
                Some(t) => qemu = qemu.min(t),
                None => {
                    println!("skipped: qemu-img not found");
                    return;
                }
            }
        }
        let ops = |t: f64| f64::from(COMPARE_OPS) / t;
        println!(
            "  {:5}  kiln {:>9.0} ops/s  qemu-img bench {:>9.0} ops/s  ratio {:.2}x",
            if write { "write" } else { "read" },
            ops(kiln),
            ops(qemu),
            qemu / kiln
        );
    }
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = disk_io, queue_request, compare_with_qemu_img
}
criterion_main!(benches);
