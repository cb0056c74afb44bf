//! Test helpers for virtio devices: fake guest memory, a driver-side split queue, and a minimal
//! virtio-mmio driver.
//!
//! The pattern for a device test:
//!
//! ```ignore
//! let mem = guest_memory(0x10_0000);
//! let mut tq = TestQueue::new(&mem, 0x1000, 16);
//! let head = tq.add_chain(&[Desc::readable(0x8000, 16), Desc::writable(0x9000, 512)]);
//! device.activate(mem.clone(), vec![tq.queue()], interrupt(), VIRTIO_F_VERSION_1)?;
//! device.process_queue(0);
//! assert_eq!(tq.used(0), (u32::from(head), 512));
//! ```
//!
//! or, through the transport, [`MmioDriver`] sets the same queue up register by register.

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::{Descriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::mmio::{regs, status, MmioTransport};
use super::{GuestMem, Interrupt};
use crate::bus::BusDevice;

/// Guest memory of `size` bytes at guest address 0.
pub fn guest_memory(size: usize) -> GuestMem {
    GuestMem::from_ranges(&[(GuestAddress(0), size)]).expect("test guest memory")
}

/// An interrupt on a fresh non-blocking eventfd.
pub fn interrupt() -> Interrupt {
    Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"))
}

/// How many times `interrupt` was signalled since the last call.
pub fn signal_count(interrupt: &Interrupt) -> u64 {
    interrupt.eventfd().read().unwrap_or(0)
}

/// One descriptor of a chain, as the driver would write it.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// Device-writable (VRING_DESC_F_WRITE).
    pub writable: bool,
}

impl Desc {
    /// A buffer the device reads.
    pub fn readable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            writable: false,
        }
    }

    /// A buffer the device writes.
    pub fn writable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            writable: true,
        }
    }
}

/// A raw split-ring descriptor with explicit flags and `next` (for hostile chains).
pub fn raw_desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// The driver side of one split virtqueue in guest memory: descriptor table at `base`, then the
/// available ring, then the used ring (4-byte aligned), none overlapping.
///
/// `virtio_queue::mock::MockSplitQueue` is not used for this: in 0.17 its used ring starts
/// `size` bytes after the available ring instead of after its end, so the rings overlap once
/// more than a few entries are in flight, and building one zeroes the ring headers.
pub struct TestQueue {
    mem: GuestMem,
    size: u16,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    next_desc: u16,
}

impl TestQueue {
    /// A queue of `size` entries whose rings start at guest address `base` (16-byte aligned).
    pub fn new(mem: &GuestMem, base: u64, size: u16) -> Self {
        let desc_table = base;
        let avail_ring = desc_table + 16 * u64::from(size);
        // flags, idx, ring[size], used_event
        let avail_end = avail_ring + 4 + 2 * u64::from(size) + 2;
        let used_ring = (avail_end + 3) & !3;
        let q = Self {
            mem: mem.clone(),
            size,
            desc_table,
            avail_ring,
            used_ring,
            next_desc: 0,
        };
        // flags, idx, ring[size], avail_event
        let used_end = used_ring + 4 + 8 * u64::from(size) + 2;
        let zeros = vec![0u8; (used_end - base) as usize];
        q.mem
            .write_slice(&zeros, GuestAddress(base))
            .expect("test queue inside guest memory");
        q
    }

    fn write<T: vm_memory::ByteValued>(&self, addr: u64, value: T) {
        self.mem
            .write_obj(value, GuestAddress(addr))
            .expect("test queue inside guest memory");
    }

    fn read<T: vm_memory::ByteValued>(&self, addr: u64) -> T {
        self.mem
            .read_obj(GuestAddress(addr))
            .expect("test queue inside guest memory")
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest address of the descriptor table.
    pub fn desc_table(&self) -> u64 {
        self.desc_table
    }

    /// Guest address of the available (driver) ring.
    pub fn avail_ring(&self) -> u64 {
        self.avail_ring
    }

    /// Guest address of the used (device) ring.
    pub fn used_ring(&self) -> u64 {
        self.used_ring
    }

    /// A ready `Queue` over these rings, as a transport would pass it to `activate`.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("power-of-two test queue size");
        q.try_set_desc_table_address(GuestAddress(self.desc_table))
            .expect("aligned descriptor table");
        q.try_set_avail_ring_address(GuestAddress(self.avail_ring))
            .expect("aligned avail ring");
        q.try_set_used_ring_address(GuestAddress(self.used_ring))
            .expect("aligned used ring");
        q.set_ready(true);
        q
    }

    /// Writes `desc` at table `index` without making anything available.
    pub fn set_desc(&self, index: u16, desc: RawDescriptor) {
        assert!(index < self.size, "descriptor index outside the table");
        self.write(self.desc_table + 16 * u64::from(index), desc);
    }

    /// Puts `head` on the available ring and bumps its index.
    pub fn publish(&self, head: u16) {
        let idx: u16 = self.read(self.avail_ring + 2);
        self.write(self.avail_ring + 4 + 2 * u64::from(idx % self.size), head);
        self.write(self.avail_ring + 2, idx.wrapping_add(1));
    }

    fn alloc(&mut self, count: usize) -> u16 {
        let first = self.next_desc;
        let count = u16::try_from(count).expect("chain length");
        assert!(
            usize::from(first) + usize::from(count) <= usize::from(self.size),
            "test queue out of descriptors"
        );
        self.next_desc += count;
        first
    }

    /// Writes `descs` as one chain in fresh table slots, publishes it and returns its head.
    pub fn add_chain(&mut self, descs: &[Desc]) -> u16 {
        let head = self.alloc(descs.len());
        for (i, d) in (head..).zip(descs) {
            let last = usize::from(i - head) + 1 == descs.len();
            let mut flags = if last { 0 } else { VRING_DESC_F_NEXT as u16 };
            if d.writable {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            self.set_desc(
                i,
                raw_desc(d.addr, d.len, flags, if last { 0 } else { i + 1 }),
            );
        }
        self.publish(head);
        head
    }

    /// Writes `descs` as an indirect table at guest address `table`, publishes a one-descriptor
    /// chain pointing at it and returns its head.
    pub fn add_indirect_chain(&mut self, table: u64, descs: &[Desc]) -> u16 {
        for (i, d) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let mut flags = if last { 0 } else { VRING_DESC_F_NEXT as u16 };
            if d.writable {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            let next = if last { 0 } else { i as u16 + 1 };
            self.write(table + 16 * i as u64, raw_desc(d.addr, d.len, flags, next));
        }
        let head = self.alloc(1);
        let len = 16 * descs.len() as u32;
        self.set_desc(head, raw_desc(table, len, VRING_DESC_F_INDIRECT as u16, 0));
        self.publish(head);
        head
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        self.read(self.used_ring + 2)
    }

    /// Used ring entry `i`: (descriptor head, bytes written).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let elem: VirtqUsedElem = self.read(self.used_ring + 4 + 8 * u64::from(i % self.size));
        (elem.id(), elem.len())
    }

    /// Sets `used_event` (EVENT_IDX): the driver wants an interrupt once used idx passes it.
    pub fn set_used_event(&self, value: u16) {
        self.write(self.avail_ring + 4 + 2 * u64::from(self.size), value);
    }

    /// Reads `avail_event` (EVENT_IDX): where the device wants the next notification.
    pub fn avail_event(&self) -> u16 {
        self.read(self.used_ring + 4 + 8 * u64::from(self.size))
    }
}

/// A virtio-mmio driver that touches a transport through registers only, like a guest would.
pub struct MmioDriver<'a> {
    /// The transport under test.
    pub transport: &'a mut MmioTransport,
}

impl<'a> MmioDriver<'a> {
    /// A driver for `transport`.
    pub fn new(transport: &'a mut MmioTransport) -> Self {
        Self { transport }
    }

    /// 32-bit register read.
    pub fn read(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.transport.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    /// 32-bit register write.
    pub fn write(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    /// The 64 feature bits the device offers (both DeviceFeaturesSel pages).
    pub fn device_features(&mut self) -> u64 {
        self.write(regs::DEVICE_FEATURES_SEL, 1);
        let high = u64::from(self.read(regs::DEVICE_FEATURES));
        self.write(regs::DEVICE_FEATURES_SEL, 0);
        (high << 32) | u64::from(self.read(regs::DEVICE_FEATURES))
    }

    /// Reset, ACKNOWLEDGE, DRIVER, accept `features` (both pages), FEATURES_OK; returns the
    /// status read back (FEATURES_OK is missing when the device refused).
    pub fn negotiate(&mut self, features: u64) -> u32 {
        self.write(regs::STATUS, 0);
        self.write(regs::STATUS, status::ACKNOWLEDGE);
        self.write(regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.write(regs::DRIVER_FEATURES_SEL, 0);
        self.write(regs::DRIVER_FEATURES, features as u32);
        self.write(regs::DRIVER_FEATURES_SEL, 1);
        self.write(regs::DRIVER_FEATURES, (features >> 32) as u32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.write(regs::STATUS, s);
        self.read(regs::STATUS)
    }

    /// Programs queue `index` with `tq`'s size and ring addresses and enables it.
    pub fn setup_queue(&mut self, index: u32, tq: &TestQueue) {
        self.setup_queue_at(
            index,
            u32::from(tq.size()),
            tq.desc_table(),
            tq.avail_ring(),
            tq.used_ring(),
        );
    }

    /// Programs queue `index` with explicit values (which may be invalid) and enables it.
    pub fn setup_queue_at(&mut self, index: u32, size: u32, desc: u64, driver: u64, device: u64) {
        self.write(regs::QUEUE_SEL, index);
        self.write(regs::QUEUE_NUM, size);
        for (low, addr) in [
            (regs::QUEUE_DESC_LOW, desc),
            (regs::QUEUE_DRIVER_LOW, driver),
            (regs::QUEUE_DEVICE_LOW, device),
        ] {
            self.write(low, addr as u32);
            self.write(low + 4, (addr >> 32) as u32);
        }
        self.write(regs::QUEUE_READY, 1);
    }

    /// Adds DRIVER_OK; returns the status read back.
    pub fn driver_ok(&mut self) -> u32 {
        let s = self.read(regs::STATUS);
        self.write(regs::STATUS, s | status::DRIVER_OK);
        self.read(regs::STATUS)
    }
}

/// A driver on another thread (think: a second vCPU) that keeps a queue's available ring full
/// with one head, as fast as the device frees room, until stopped. For tests that a device's
/// work per notification stays bounded however fast the ring is refilled.
pub struct Refiller {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    published: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Refiller {
    /// Starts refilling `tq` with `head` (whose descriptors the caller wrote).
    pub fn start(tq: &TestQueue, head: u16) -> Self {
        Self::start_raw(&tq.mem, tq.size, tq.avail_ring, tq.used_ring, head)
    }

    /// Starts refilling the ring of `size` entries whose avail and used rings are at `avail`
    /// and `used`.
    pub fn start_raw(mem: &GuestMem, size: u16, avail: u64, used: u64, head: u16) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mem = mem.clone();
        let flag = stop.clone();
        let shared = count.clone();
        let thread = std::thread::spawn(move || {
            let mut published = 0u64;
            while !flag.load(Ordering::Acquire) {
                let a: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap();
                let u: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
                if a.wrapping_sub(u) >= size {
                    std::hint::spin_loop();
                    continue;
                }
                let slot = GuestAddress(avail + 4 + 2 * u64::from(a % size));
                mem.write_obj(head, slot).unwrap();
                std::sync::atomic::fence(Ordering::Release);
                mem.write_obj(a.wrapping_add(1), GuestAddress(avail + 2))
                    .unwrap();
                published += 1;
                shared.store(published, Ordering::Release);
            }
            published
        });
        Self {
            stop,
            published: count,
            thread: Some(thread),
        }
    }

    /// How many chains it has published so far (0 until its thread got to run, which on a
    /// loaded machine may take a while: tests keep turning until this is non-zero).
    pub fn published(&self) -> u64 {
        self.published.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Stops refilling; returns how many chains it published.
    pub fn stop(mut self) -> u64 {
        self.halt()
    }

    fn halt(&mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.thread
            .take()
            .map(|t| t.join().expect("refiller thread"))
            .unwrap_or(0)
    }
}

impl Drop for Refiller {
    fn drop(&mut self) {
        self.halt();
    }
}
