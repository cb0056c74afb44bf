//! virtio-blk request handling driven through a split queue in fake guest memory.

use std::io;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::split::VirtqUsedElem;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::virtio::VIRTIO_MMIO_INT_VRING;
use kiln_disk::DISK_ID_LEN;

const MEM_SIZE: usize = 0x100_0000;
const DISK_SECTORS: u64 = 512;
const HDR: u64 = 0x10_000;
const STATUS: u64 = 0x11_000;
const DATA: u64 = 0x20_000;
const INDIRECT: u64 = 0x12_000;
/// Ring layout of the test driver. (virtio-queue's `MockSplitQueue` is not used: it lays a
/// 256-entry avail ring over the used ring and zeroes both rings whenever it is constructed.)
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
const ID: [u8; DISK_ID_LEN] = *b"kiln-test-disk\0\0\0\0\0\0";

/// What the in-memory disk saw, shared with the test after the disk is boxed.
#[derive(Default)]
struct DiskState {
    data: Vec<u8>,
    read_only: bool,
    fail: bool,
    flushes: u32,
    discards: Vec<(u64, u64)>,
    zeroes: Vec<(u64, u64, bool)>,
}

struct MemDisk(Arc<Mutex<DiskState>>);

impl MemDisk {
    fn check(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let s = self.0.lock().unwrap();
        if s.fail {
            return Err(io::Error::other("injected failure"));
        }
        let start = offset as usize;
        assert!(
            start + len <= s.data.len(),
            "device passed an out-of-range request"
        );
        Ok(start..start + len)
    }
}

impl DiskBackend for MemDisk {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().data.len() as u64
    }
    fn read_only(&self) -> bool {
        self.0.lock().unwrap().read_only
    }
    fn id(&self) -> [u8; DISK_ID_LEN] {
        ID
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let r = self.check(offset, buf.len())?;
        buf.copy_from_slice(&self.0.lock().unwrap().data[r]);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let r = self.check(offset, buf.len())?;
        self.0.lock().unwrap().data[r].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.check(0, 0)?;
        self.0.lock().unwrap().flushes += 1;
        Ok(())
    }
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let r = self.check(offset, len as usize)?;
        let mut s = self.0.lock().unwrap();
        s.data[r].fill(0);
        s.discards.push((offset, len));
        Ok(())
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let r = self.check(offset, len as usize)?;
        let mut s = self.0.lock().unwrap();
        s.data[r].fill(0);
        s.zeroes.push((offset, len, unmap));
        Ok(())
    }
}

/// A descriptor as the test driver writes it: address, length, device-writable.
type D = (u64, u32, bool);

fn r(addr: u64, len: u32) -> D {
    (addr, len, false)
}

fn w(addr: u64, len: u32) -> D {
    (addr, len, true)
}

struct Env {
    mem: GuestMem,
    block: Block,
    interrupt: Interrupt,
    disk: Arc<Mutex<DiskState>>,
    next_desc: u16,
}

impl Env {
    fn new() -> Self {
        Self::with_disk(false)
    }

    fn with_disk(read_only: bool) -> Self {
        Self::with_sectors(read_only, DISK_SECTORS)
    }

    fn with_sectors(read_only: bool, sectors: u64) -> Self {
        let data = (0..sectors * SECTOR_SIZE)
            .map(|i| (i % 251) as u8)
            .collect();
        let disk = Arc::new(Mutex::new(DiskState {
            data,
            read_only,
            ..Default::default()
        }));
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut block = Block::new(Box::new(MemDisk(disk.clone())));
        let queue = test_queue();
        let interrupt = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let features = block.features();
        block
            .activate(mem.clone(), vec![queue], interrupt.clone(), features)
            .unwrap();
        Self {
            mem,
            block,
            interrupt,
            disk,
            next_desc: 0,
        }
    }

    fn store(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        let at = DESC_TABLE + 16 * u64::from(index);
        self.mem.write_obj(desc, GuestAddress(at)).unwrap();
    }

    fn avail_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(AVAIL_RING + 2)).unwrap()
    }

    fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(AVAIL_RING + 2))
            .unwrap();
    }

    /// Makes `head` available to the device.
    fn publish(&self, head: u16) {
        let idx = self.avail_idx();
        let slot = AVAIL_RING + 4 + 2 * u64::from(idx % QUEUE_SIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.set_avail_idx(idx.wrapping_add(1));
    }

    fn used(&self, slot: u16) -> VirtqUsedElem {
        let at = USED_RING + 4 + 8 * u64::from(slot % QUEUE_SIZE);
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// Writes `descs` as a chain into free table slots and publishes it; returns the head.
    fn add_chain(&mut self, descs: &[D]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let index = head + i as u16;
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.store(index, addr, len, flags, index + 1);
        }
        self.next_desc += descs.len() as u16;
        self.publish(head);
        head
    }

    fn header(&self, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    fn segment(&self, addr: u64, sector: u64, sectors: u32, flags: u32) {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        self.mem.write_slice(&s, GuestAddress(addr)).unwrap();
    }

    /// Sends one request `kind`/`sector` with `data` between header and a 1-byte status;
    /// returns (status byte, used length).
    fn request(&mut self, kind: u32, sector: u64, data: &[D]) -> (u8, u32) {
        self.header(kind, sector);
        let mut descs = vec![r(HDR, 16)];
        descs.extend_from_slice(data);
        descs.push(w(STATUS, 1));
        self.send(&descs)
    }

    /// Sends a raw chain; returns (status byte, used length) of its used entry.
    fn send(&mut self, descs: &[D]) -> (u8, u32) {
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let head = self.add_chain(descs);
        self.block.process_queue(0);
        let elem = self.last_used();
        assert_eq!(elem.0, u32::from(head), "used entry for the wrong head");
        (self.status(), elem.1)
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap()
    }

    fn last_used(&self) -> (u32, u32) {
        let idx = self.used_idx();
        assert!(idx > 0, "no used entry");
        let e = self.used(idx - 1);
        (e.id(), e.len())
    }

    /// Whether the interrupt fired since the last call (and consumes it).
    fn interrupted(&self) -> bool {
        let fired = self.interrupt.eventfd().read().is_ok();
        if fired {
            assert_ne!(self.interrupt.status() & VIRTIO_MMIO_INT_VRING, 0);
            self.interrupt.ack(VIRTIO_MMIO_INT_VRING);
        }
        fired
    }

    fn disk_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        self.disk.lock().unwrap().data[offset as usize..offset as usize + len].to_vec()
    }

    fn guest_bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

/// A ready queue at the test driver's ring addresses.
fn test_queue() -> Queue {
    let mut q = Queue::new(QUEUE_SIZE).unwrap();
    q.set_size(QUEUE_SIZE);
    q.try_set_desc_table_address(GuestAddress(DESC_TABLE))
        .unwrap();
    q.try_set_avail_ring_address(GuestAddress(AVAIL_RING))
        .unwrap();
    q.try_set_used_ring_address(GuestAddress(USED_RING))
        .unwrap();
    q.set_ready(true);
    q
}

fn config_u32(b: &Block, offset: u64) -> u32 {
    let mut v = [0u8; 4];
    b.read_config(offset, &mut v);
    u32::from_le_bytes(v)
}

#[test]
fn config_space_and_features() {
    let env = Env::new();
    let b = &env.block;
    assert_eq!(b.device_type(), 2);
    assert_eq!(b.queue_max_sizes(), &[256]);
    let mut cap = [0u8; 8];
    b.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
    assert_eq!(config_u32(b, 8), SIZE_MAX);
    assert_eq!(config_u32(b, 12), SEG_MAX);
    assert_eq!(config_u32(b, 20), 512);
    assert_eq!(config_u32(b, 36), MAX_DISCARD_SECTORS);
    assert_eq!(config_u32(b, 40), 1);
    assert_eq!(config_u32(b, 44), 8, "4 KiB discard granularity in sectors");
    assert_eq!(config_u32(b, 48), MAX_WRITE_ZEROES_SECTORS);
    assert_eq!(config_u32(b, 52), 1);
    let mut unmap = [0u8; 1];
    b.read_config(56, &mut unmap);
    assert_eq!(unmap, [1]);
    let mut past = [0xaau8; 8];
    b.read_config(58, &mut past);
    assert_eq!(past, [0; 8], "bytes past the config read as zero");
    b.read_config(u64::MAX, &mut past);
    assert_eq!(past, [0; 8]);

    let f = b.features();
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    for bit in [
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature bit {bit}");
    }
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);

    let ro = Env::with_disk(true);
    let f = ro.block.features();
    assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(
        f & (1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES),
        0
    );
}

#[test]
fn read_spanning_two_data_descriptors() {
    let mut env = Env::new();
    let (status, len) = env.request(VIRTIO_BLK_T_IN, 2, &[w(DATA, 512), w(DATA + 0x4000, 1024)]);
    assert_eq!((status, len), (S_OK, 1536 + 1));
    assert_eq!(env.guest_bytes(DATA, 512), env.disk_bytes(1024, 512));
    assert_eq!(
        env.guest_bytes(DATA + 0x4000, 1024),
        env.disk_bytes(1536, 1024)
    );
    assert!(env.interrupted());
}

#[test]
fn read_larger_than_the_bounce_buffer() {
    let mut env = Env::new();
    let (status, len) = env.request(VIRTIO_BLK_T_IN, 0, &[w(DATA, 32 * 1024)]);
    assert_eq!((status, len), (S_OK, 32 * 1024 + 1));
    assert_eq!(
        env.guest_bytes(DATA, 32 * 1024),
        env.disk_bytes(0, 32 * 1024)
    );
}

#[test]
fn write_reaches_the_disk() {
    let mut env = Env::new();
    env.mem
        .write_slice(&[0x5a; 1024], GuestAddress(DATA))
        .unwrap();
    let (status, len) = env.request(VIRTIO_BLK_T_OUT, 5, &[r(DATA, 1024)]);
    assert_eq!((status, len), (S_OK, 1));
    assert_eq!(env.disk_bytes(5 * 512, 1024), vec![0x5a; 1024]);
    assert_ne!(env.disk_bytes(7 * 512, 1), vec![0x5a]);
    assert!(env.interrupted());
}

#[test]
fn flush_and_flush_with_data() {
    let mut env = Env::new();
    assert_eq!(env.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (S_OK, 1));
    assert_eq!(env.disk.lock().unwrap().flushes, 1);
    assert_eq!(
        env.request(VIRTIO_BLK_T_FLUSH, 0, &[r(DATA, 512)]),
        (S_IOERR, 1)
    );
    assert_eq!(env.disk.lock().unwrap().flushes, 1);
}

#[test]
fn get_id_full_and_short_buffer() {
    let mut env = Env::new();
    assert_eq!(
        env.request(VIRTIO_BLK_T_GET_ID, 0, &[w(DATA, 20)]),
        (S_OK, 21)
    );
    assert_eq!(env.guest_bytes(DATA, 20), ID.to_vec());
    env.mem
        .write_slice(&[0xee; 20], GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        env.request(VIRTIO_BLK_T_GET_ID, 0, &[w(DATA, 8)]),
        (S_OK, 9)
    );
    assert_eq!(env.guest_bytes(DATA, 9), [&ID[..8], &[0xee]].concat());
    assert_eq!(
        env.request(VIRTIO_BLK_T_GET_ID, 0, &[r(DATA, 20)]),
        (S_IOERR, 1)
    );
}

#[test]
fn discard_zeroes_the_range() {
    let mut env = Env::new();
    env.segment(DATA, 4, 8, 0);
    assert_eq!(
        env.request(VIRTIO_BLK_T_DISCARD, 0, &[r(DATA, 16)]),
        (S_OK, 1)
    );
    assert_eq!(env.disk.lock().unwrap().discards, vec![(2048, 4096)]);
    assert_eq!(env.disk_bytes(2048, 4096), vec![0; 4096]);
}

#[test]
fn discard_flags_limits_and_segments() {
    let mut env = Env::new();
    env.segment(DATA, 0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    assert_eq!(
        env.request(VIRTIO_BLK_T_DISCARD, 0, &[r(DATA, 16)]),
        (S_UNSUPP, 1)
    );
    env.segment(DATA, 0, 1, 0x4);
    assert_eq!(
        env.request(VIRTIO_BLK_T_DISCARD, 0, &[r(DATA, 16)]),
        (S_UNSUPP, 1)
    );
    env.segment(DATA, 0, MAX_DISCARD_SECTORS + 1, 0);
    assert_eq!(
        env.request(VIRTIO_BLK_T_DISCARD, 0, &[r(DATA, 16)]),
        (S_IOERR, 1)
    );
    env.segment(DATA, DISK_SECTORS - 1, 2, 0);
    assert_eq!(
        env.request(VIRTIO_BLK_T_DISCARD, 0, &[r(DATA, 16)]),
        (S_IOERR, 1)
    );
    env.segment(DATA, u64::MAX / 256, 1, 0);
    assert_eq!(
        env.request(VIRTIO_BLK_T_DISCARD, 0, &[r(DATA, 16)]),
        (S_IOERR, 1)
    );
    // Two segments where max_discard_seg is 1, and a truncated segment.
    env.segment(DATA + 16, 1, 1, 0);
    assert_eq!(
        env.request(VIRTIO_BLK_T_DISCARD, 0, &[r(DATA, 32)]),
        (S_IOERR, 1)
    );
    assert_eq!(
        env.request(VIRTIO_BLK_T_DISCARD, 0, &[r(DATA, 8)]),
        (S_IOERR, 1)
    );
    // A device-writable segment buffer is the wrong direction.
    env.segment(DATA, 0, 1, 0);
    assert_eq!(
        env.request(VIRTIO_BLK_T_DISCARD, 0, &[w(DATA, 16)]),
        (S_IOERR, 1)
    );
    assert!(env.disk.lock().unwrap().discards.is_empty());
    // A segment split across two descriptors is fine.
    assert_eq!(
        env.request(VIRTIO_BLK_T_DISCARD, 0, &[r(DATA, 10), r(DATA + 10, 6)]),
        (S_OK, 1)
    );
    assert_eq!(env.disk.lock().unwrap().discards, vec![(0, 512)]);
}

#[test]
fn write_zeroes_with_and_without_unmap() {
    let mut env = Env::new();
    env.segment(DATA, 1, 2, 0);
    assert_eq!(
        env.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[r(DATA, 16)]),
        (S_OK, 1)
    );
    env.segment(DATA, 10, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    assert_eq!(
        env.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[r(DATA, 16)]),
        (S_OK, 1)
    );
    assert_eq!(
        env.disk.lock().unwrap().zeroes,
        vec![(512, 1024, false), (5120, 512, true)]
    );
    assert_eq!(env.disk_bytes(512, 1024), vec![0; 1024]);
    assert_eq!(env.disk_bytes(5120, 512), vec![0; 512]);
    env.segment(DATA, 0, 1, 0x2);
    assert_eq!(
        env.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[r(DATA, 16)]),
        (S_UNSUPP, 1)
    );
    env.segment(DATA, 0, MAX_WRITE_ZEROES_SECTORS + 1, 0);
    assert_eq!(
        env.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[r(DATA, 16)]),
        (S_IOERR, 1)
    );
}

#[test]
fn unknown_request_types_are_unsupported() {
    let mut env = Env::new();
    for kind in [2u32, 14, 16, 99, u32::MAX] {
        assert_eq!(
            env.request(kind, 0, &[w(DATA, 512)]),
            (S_UNSUPP, 1),
            "type {kind}"
        );
    }
}

#[test]
fn bad_header_descriptor() {
    let mut env = Env::new();
    env.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        env.send(&[w(HDR, 16), w(DATA, 512), w(STATUS, 1)]),
        (S_IOERR, 1)
    );
    assert_eq!(
        env.send(&[r(HDR, 8), w(DATA, 512), w(STATUS, 1)]),
        (S_IOERR, 1)
    );
    assert_eq!(
        env.send(&[r(MEM_SIZE as u64 - 8, 16), w(STATUS, 1)]),
        (S_IOERR, 1)
    );
    // A chain of only a status descriptor has no header at all.
    assert_eq!(env.send(&[w(STATUS, 1)]), (S_IOERR, 1));
}

#[test]
fn bad_status_descriptor() {
    let mut env = Env::new();
    env.header(VIRTIO_BLK_T_IN, 0);
    // Not device-writable: nowhere to put a status, so a zero-length used entry.
    assert_eq!(
        env.send(&[r(HDR, 16), w(DATA, 512), r(STATUS, 1)]),
        (0xff, 0)
    );
    assert_eq!(
        env.send(&[r(HDR, 16), w(DATA, 512), w(STATUS, 0)]),
        (0xff, 0)
    );
    // Writable but not 1 byte: IOERR in its first byte, and no data transferred.
    env.mem.write_slice(&[0; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(
        env.send(&[r(HDR, 16), w(DATA, 512), w(STATUS, 2)]),
        (S_IOERR, 1)
    );
    assert_eq!(env.guest_bytes(DATA, 512), vec![0; 512]);
    // Outside guest memory.
    let head = env.add_chain(&[r(HDR, 16), w(MEM_SIZE as u64 + 0x1000, 1)]);
    env.block.process_queue(0);
    assert_eq!(env.last_used(), (u32::from(head), 0));
    assert!(!env.block.is_broken());
}

#[test]
fn data_in_the_wrong_direction() {
    let mut env = Env::new();
    assert_eq!(
        env.request(VIRTIO_BLK_T_IN, 0, &[r(DATA, 512)]),
        (S_IOERR, 1)
    );
    assert_eq!(
        env.request(VIRTIO_BLK_T_IN, 0, &[w(DATA, 512), r(DATA, 512)]),
        (S_IOERR, 1)
    );
    let before = env.disk_bytes(0, 512);
    assert_eq!(
        env.request(VIRTIO_BLK_T_OUT, 0, &[w(DATA, 512)]),
        (S_IOERR, 1)
    );
    assert_eq!(env.disk_bytes(0, 512), before);
}

#[test]
fn sector_ranges_are_checked() {
    let mut env = Env::new();
    let last = DISK_SECTORS - 1;
    assert_eq!(
        env.request(VIRTIO_BLK_T_IN, last, &[w(DATA, 512)]),
        (S_OK, 513)
    );
    assert_eq!(
        env.request(VIRTIO_BLK_T_IN, last, &[w(DATA, 1024)]),
        (S_IOERR, 1)
    );
    assert_eq!(
        env.request(VIRTIO_BLK_T_IN, DISK_SECTORS, &[w(DATA, 512)]),
        (S_IOERR, 1)
    );
    assert_eq!(
        env.request(VIRTIO_BLK_T_OUT, u64::MAX, &[r(DATA, 512)]),
        (S_IOERR, 1)
    );
    assert_eq!(
        env.request(VIRTIO_BLK_T_IN, u64::MAX / 512, &[w(DATA, 512)]),
        (S_IOERR, 1)
    );
    // Not a whole number of sectors.
    assert_eq!(
        env.request(VIRTIO_BLK_T_IN, 0, &[w(DATA, 100)]),
        (S_IOERR, 1)
    );
}

#[test]
fn read_only_disk_refuses_writes() {
    let mut env = Env::with_disk(true);
    let before = env.disk_bytes(0, 4096);
    env.mem
        .write_slice(&[0x77; 512], GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        env.request(VIRTIO_BLK_T_OUT, 0, &[r(DATA, 512)]),
        (S_IOERR, 1)
    );
    env.segment(DATA, 0, 8, 0);
    assert_eq!(
        env.request(VIRTIO_BLK_T_DISCARD, 0, &[r(DATA, 16)]),
        (S_IOERR, 1)
    );
    assert_eq!(
        env.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[r(DATA, 16)]),
        (S_IOERR, 1)
    );
    assert_eq!(env.disk_bytes(0, 4096), before);
    assert_eq!(
        env.request(VIRTIO_BLK_T_IN, 0, &[w(DATA, 512)]),
        (S_OK, 513)
    );
    assert_eq!(env.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (S_OK, 1));
}

#[test]
fn total_length_is_bounded() {
    let mut env = Env::new();
    // 2 x 100 MiB: over SEG_MAX * SIZE_MAX; refused before any address is touched.
    let big = 100 << 20;
    assert_eq!(
        env.request(VIRTIO_BLK_T_IN, 0, &[w(DATA, big), w(DATA, big)]),
        (S_IOERR, 1)
    );
}

#[test]
fn too_many_segments() {
    // Only an indirect table can hold more than SEG_MAX data segments: a direct chain is capped
    // by the 256-entry queue.
    let mut env = Env::new();
    env.header(VIRTIO_BLK_T_IN, 0);
    let count = SEG_MAX as u16 + 3;
    let next = VRING_DESC_F_NEXT as u16;
    let wr = VRING_DESC_F_WRITE as u16;
    for i in 0..count {
        let d = match i {
            0 => SplitDescriptor::new(HDR, 16, next, 1),
            i if i + 1 == count => SplitDescriptor::new(STATUS, 1, wr, 0),
            i => SplitDescriptor::new(DATA + 512 * u64::from(i), 512, next | wr, i + 1),
        };
        let at = GuestAddress(INDIRECT + 16 * u64::from(i));
        env.mem.write_obj(RawDescriptor::from(d), at).unwrap();
    }
    env.store(
        0,
        INDIRECT,
        16 * u32::from(count),
        VRING_DESC_F_INDIRECT as u16,
        0,
    );
    env.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    env.publish(0);
    env.block.process_queue(0);
    assert_eq!(env.last_used(), (0, 1));
    assert_eq!(env.status(), S_IOERR);
}

#[test]
fn seg_max_segments_fill_the_queue() {
    let mut env = Env::new();
    let data: Vec<D> = (0..u64::from(SEG_MAX))
        .map(|i| w(DATA + i * 512, 512))
        .collect();
    let len = SEG_MAX * 512;
    assert_eq!(env.request(VIRTIO_BLK_T_IN, 0, &data), (S_OK, len + 1));
    assert_eq!(
        env.guest_bytes(DATA, len as usize),
        env.disk_bytes(0, len as usize)
    );
}

#[test]
fn data_outside_guest_memory() {
    let mut env = Env::new();
    let out = MEM_SIZE as u64 - 512;
    let (status, len) = env.request(VIRTIO_BLK_T_IN, 0, &[w(out, 1024)]);
    assert_eq!((status, len), (S_IOERR, 1));
    let (status, _) = env.request(VIRTIO_BLK_T_IN, 0, &[w(u64::MAX - 100, 512)]);
    assert_eq!(status, S_IOERR);
    let before = env.disk_bytes(0, 512);
    assert_eq!(
        env.request(VIRTIO_BLK_T_OUT, 0, &[r(out, 1024)]),
        (S_IOERR, 1)
    );
    assert_eq!(env.disk_bytes(0, 512), before);
}

#[test]
fn disk_failure_is_ioerr() {
    let mut env = Env::new();
    env.disk.lock().unwrap().fail = true;
    assert_eq!(
        env.request(VIRTIO_BLK_T_IN, 0, &[w(DATA, 512)]),
        (S_IOERR, 1)
    );
    assert_eq!(
        env.request(VIRTIO_BLK_T_OUT, 0, &[r(DATA, 512)]),
        (S_IOERR, 1)
    );
    assert_eq!(env.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (S_IOERR, 1));
    env.segment(DATA, 0, 1, 0);
    assert_eq!(
        env.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[r(DATA, 16)]),
        (S_IOERR, 1)
    );
}

#[test]
fn looping_chain_ends_without_a_hang() {
    let mut env = Env::new();
    env.header(VIRTIO_BLK_T_IN, 0);
    let next = VRING_DESC_F_NEXT as u16;
    env.store(0, HDR, 16, next, 1);
    env.store(1, DATA, 512, next | VRING_DESC_F_WRITE as u16, 0);
    env.publish(0);
    env.block.process_queue(0);
    assert_eq!(env.last_used(), (0, 0));
    assert!(!env.block.is_broken());
    assert!(env.interrupted());
}

#[test]
fn next_index_past_the_table() {
    let mut env = Env::new();
    env.header(VIRTIO_BLK_T_IN, 0);
    env.store(0, HDR, 16, VRING_DESC_F_NEXT as u16, QUEUE_SIZE + 7);
    env.publish(0);
    env.block.process_queue(0);
    assert_eq!(env.last_used(), (0, 0));
}

#[test]
fn indirect_chain() {
    let mut env = Env::new();
    env.header(VIRTIO_BLK_T_IN, 3);
    let table = [
        SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1),
        SplitDescriptor::new(
            DATA,
            512,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            2,
        ),
        SplitDescriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
    ];
    for (i, d) in table.iter().enumerate() {
        env.mem
            .write_obj(
                RawDescriptor::from(*d),
                GuestAddress(INDIRECT + 16 * i as u64),
            )
            .unwrap();
    }
    env.store(0, INDIRECT, 48, VRING_DESC_F_INDIRECT as u16, 0);
    env.publish(0);
    env.block.process_queue(0);
    assert_eq!(env.last_used(), (0, 513));
    assert_eq!(env.status(), S_OK);
    assert_eq!(env.guest_bytes(DATA, 512), env.disk_bytes(3 * 512, 512));
}

#[test]
fn indirect_table_outside_memory() {
    let mut env = Env::new();
    env.store(0, MEM_SIZE as u64, 48, VRING_DESC_F_INDIRECT as u16, 0);
    env.publish(0);
    env.block.process_queue(0);
    assert_eq!(env.last_used(), (0, 0));
}

#[test]
fn several_requests_one_interrupt() {
    let mut env = Env::new();
    env.header(VIRTIO_BLK_T_IN, 0);
    let a = env.add_chain(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]);
    let b = env.add_chain(&[r(HDR, 16), w(DATA + 512, 512), w(STATUS + 1, 1)]);
    env.block.process_queue(0);
    assert_eq!(env.used_idx(), 2);
    let first = env.used(0);
    let second = env.used(1);
    assert_eq!((first.id(), first.len()), (u32::from(a), 513));
    assert_eq!((second.id(), second.len()), (u32::from(b), 513));
    assert_eq!(env.interrupt.eventfd().read().unwrap(), 1);
}

#[test]
fn head_index_past_the_queue_marks_broken() {
    let mut env = Env::new();
    env.publish(QUEUE_SIZE + 1);
    env.block.process_queue(0);
    assert!(env.block.is_broken());
    assert_eq!(env.used_idx(), 0);
    // A broken device ignores further notifications until reset.
    env.header(VIRTIO_BLK_T_IN, 0);
    env.add_chain(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]);
    env.block.process_queue(0);
    assert_eq!(env.used_idx(), 0);
    assert!(env.block.reset());
    assert!(!env.block.is_broken());
}

#[test]
fn avail_index_far_ahead_marks_broken() {
    let mut env = Env::new();
    env.set_avail_idx(QUEUE_SIZE + 5);
    env.block.process_queue(0);
    assert!(env.block.is_broken());
    assert_eq!(env.used_idx(), 0);
    assert!(!env.interrupted());
}

#[test]
fn inactive_device_and_other_queues_are_ignored() {
    let mut env = Env::new();
    env.block.process_queue(1);
    assert!(env.block.reset());
    env.block.process_queue(0);
    assert!(!env.block.is_broken());
    let mut block = Block::new(Box::new(MemDisk(env.disk.clone())));
    let err = block.activate(env.mem.clone(), Vec::new(), env.interrupt.clone(), 0);
    assert!(matches!(err, Err(ActivateError::BadQueue(_))));
}

#[test]
fn queue_outside_memory_is_refused_at_activation() {
    let env = Env::new();
    let mut block = Block::new(Box::new(MemDisk(env.disk.clone())));
    let far = GuestMem::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    let err = block.activate(far, vec![test_queue()], env.interrupt.clone(), 0);
    assert!(matches!(err, Err(ActivateError::BadQueue(_))));
}

/// Runs turns until the device has no backlog; returns how many it took.
fn turns_until_done(env: &mut Env) -> u32 {
    let mut turns = 0;
    loop {
        env.block.process_queue(0);
        turns += 1;
        if !env.block.queue_backlog(0) {
            return turns;
        }
        assert!(turns < 1000, "the backlog never ends");
    }
}

#[test]
fn a_huge_read_is_split_across_turns() {
    use crate::virtio::BYTES_PER_TURN;
    // 24 MiB in three 8 MiB descriptors over the same guest buffer: three turns' worth.
    let len = 3 * BYTES_PER_TURN;
    let mut env = Env::with_sectors(false, len / SECTOR_SIZE);
    env.header(VIRTIO_BLK_T_IN, 0);
    env.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let piece = BYTES_PER_TURN as u32;
    let head = env.add_chain(&[
        r(HDR, 16),
        w(DATA, piece),
        w(DATA, piece),
        w(DATA, piece),
        w(STATUS, 1),
    ]);
    env.block.process_queue(0);
    assert_eq!(
        env.used_idx(),
        0,
        "the whole request was served in one turn"
    );
    assert!(env.block.queue_backlog(0));
    assert_eq!(env.status(), 0xff);
    assert_eq!(turns_until_done(&mut env), 2);
    assert_eq!(env.used_idx(), 1);
    assert_eq!(env.last_used(), (u32::from(head), len as u32 + 1));
    assert_eq!(env.status(), S_OK);
    // The last third landed in the buffer.
    assert_eq!(
        env.guest_bytes(DATA, 4096),
        env.disk_bytes(2 * BYTES_PER_TURN, 4096)
    );
    assert!(env.interrupted());
}

#[test]
fn a_huge_write_zeroes_is_cut_on_aligned_offsets() {
    use crate::virtio::BYTES_PER_TURN;
    let sectors = 3 * BYTES_PER_TURN / SECTOR_SIZE;
    let mut env = Env::with_sectors(false, sectors);
    // From sector 1 to the end: 24 MiB - 512, cut at the 8 MiB and 16 MiB marks.
    env.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    env.segment(DATA, 1, (sectors - 1) as u32, 0);
    env.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    env.add_chain(&[r(HDR, 16), r(DATA, 16), w(STATUS, 1)]);
    assert_eq!(turns_until_done(&mut env), 3);
    assert_eq!(env.status(), S_OK);
    let m = BYTES_PER_TURN;
    assert_eq!(
        env.disk.lock().unwrap().zeroes,
        vec![(512, m - 512, false), (m, m, false), (2 * m, m, false)]
    );
}

#[test]
fn a_ring_refilled_from_another_thread_is_served_one_budget_per_turn() {
    use crate::virtio::testing::Refiller;
    use crate::virtio::CHAINS_PER_TURN;
    let mut env = Env::new();
    // One 4 KiB read, made available again and again: a hostile driver's flood.
    env.header(VIRTIO_BLK_T_IN, 0);
    let head = env.add_chain(&[r(HDR, 16), w(DATA, 4096), w(STATUS, 1)]);
    for _ in 1..QUEUE_SIZE {
        env.publish(head);
    }
    let refiller = Refiller::start_raw(&env.mem, QUEUE_SIZE, AVAIL_RING, USED_RING, head);
    let mut before = env.used_idx();
    // At least 50 turns, and until the refiller thread has run at all (a loaded machine
    // may not schedule it at once).
    let started = std::time::Instant::now();
    for turn in 0.. {
        if turn >= 50 && refiller.published() > 0 {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "the refiller never ran"
        );
        env.block.process_queue(0);
        let served = u32::from(env.used_idx().wrapping_sub(before));
        assert!(served <= CHAINS_PER_TURN, "one turn served {served} chains");
        // The prefilled ring still holds work after the first turn (later ones may empty a
        // ring the refiller has not caught up with).
        if turn == 0 {
            assert_eq!(served, CHAINS_PER_TURN);
            assert!(
                env.block.queue_backlog(0),
                "work left, but no later turn asked for"
            );
        }
        before = env.used_idx();
    }
    assert!(refiller.stop() > 0);
    turns_until_done(&mut env);
    assert_eq!(env.used_idx(), env.avail_idx());
    assert_eq!(env.status(), S_OK);
    assert!(!env.block.is_broken());
}

#[test]
fn reset_drops_a_request_in_flight() {
    use crate::virtio::BYTES_PER_TURN;
    let mut env = Env::with_sectors(false, 2 * BYTES_PER_TURN / SECTOR_SIZE);
    env.header(VIRTIO_BLK_T_IN, 0);
    let piece = BYTES_PER_TURN as u32;
    env.add_chain(&[r(HDR, 16), w(DATA, piece), w(DATA, piece), w(STATUS, 1)]);
    env.block.process_queue(0);
    assert!(env.block.queue_backlog(0));
    assert!(env.block.reset());
    assert!(!env.block.queue_backlog(0));
    env.block.process_queue(0);
    assert_eq!(env.used_idx(), 0);
}
