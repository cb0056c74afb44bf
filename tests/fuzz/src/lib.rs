//! What the fuzz targets share: a hostile driver that writes arbitrary descriptor tables, rings and
//! buffers into fake guest memory and notifies a device, and the oracles checked after each input.
//!
//! The targets only check what must hold for any input: the device returns (no panic, no hang:
//! libFuzzer's `-timeout`), allocates within bounds (`-rss_limit_mb`, `-malloc_limit_mb`), and
//! touches nothing outside what it was given (the share canary, an unchanged base image).

use std::fs;
use std::path::{Path, PathBuf};

use arbitrary::Arbitrary;
use kiln_devices::virtio::testing::{guest_memory, interrupt, raw_desc, TestQueue};
use kiln_devices::virtio::{GuestMem, VirtioDevice};
use vm_memory::{Bytes, GuestAddress};

/// Guest memory of every chain target: small, so that most fuzzed addresses fall outside it.
pub const MEM_SIZE: u64 = 1 << 20;
/// Entries per queue: small, so that fuzzed heads and `next` indexes hit both sides of it.
pub const QUEUE_SIZE: u16 = 16;
/// Where the fuzzed buffer bytes go (headers, FUSE requests, indirect tables).
pub const DATA_BASE: u64 = 0x1_0000;
/// The most fuzzed buffer bytes written there.
pub const DATA_MAX: usize = 0x1_0000;

/// The queues' rings: one 4 KiB page each, from 0x1000 up.
fn ring_base(queue: usize) -> u64 {
    0x1000 * (queue as u64 + 1)
}

/// One descriptor as a hostile driver writes it.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct RawDesc {
    /// Below 2^31: an address inside (or just past) guest memory; above: far outside it.
    pub addr: u32,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl RawDesc {
    fn guest_addr(self) -> u64 {
        if self.addr & 0x8000_0000 == 0 {
            u64::from(self.addr) % (MEM_SIZE + 0x1000)
        } else {
            u64::from(self.addr) << 16
        }
    }
}

/// What the driver does, in order.
#[derive(Arbitrary, Debug, Clone)]
pub enum Step {
    /// Put head `head` in queue `queue`'s available ring and bump its index.
    Publish { queue: u8, head: u16 },
    /// Overwrite queue `queue`'s available index (rings that claim more than they hold).
    SetAvailIdx { queue: u8, idx: u16 },
    /// Notify queue `queue`, as a write to QueueNotify does.
    Notify { queue: u8 },
}

/// A whole hostile driver session: buffer bytes, one descriptor table (written to every queue),
/// and the steps.
#[derive(Arbitrary, Debug, Clone)]
pub struct ChainInput {
    pub data: Vec<u8>,
    pub descs: Vec<RawDesc>,
    pub steps: Vec<Step>,
}

/// Runs `input` against `device` (not yet activated) with `queues` queues, then stops it.
pub fn drive_chains(device: &mut dyn VirtioDevice, queues: usize, input: &ChainInput) {
    let mem = guest_memory(MEM_SIZE as usize);
    let data = &input.data[..input.data.len().min(DATA_MAX)];
    mem.write_slice(data, GuestAddress(DATA_BASE))
        .expect("data area inside guest memory");
    let rings: Vec<TestQueue> = (0..queues)
        .map(|q| {
            let tq = TestQueue::new(&mem, ring_base(q), QUEUE_SIZE);
            for (i, d) in input.descs.iter().take(usize::from(QUEUE_SIZE)).enumerate() {
                tq.set_desc(i as u16, raw_desc(d.guest_addr(), d.len, d.flags, d.next));
            }
            tq
        })
        .collect();
    let queue_objs = rings.iter().map(TestQueue::queue).collect();
    let features = device.features();
    if device
        .activate(mem.clone(), queue_objs, interrupt(), features)
        .is_err()
    {
        return;
    }
    for step in input.steps.iter().take(256) {
        match *step {
            Step::Publish { queue, head } => rings[usize::from(queue) % queues].publish(head),
            Step::SetAvailIdx { queue, idx } => {
                set_avail_idx(&mem, &rings[usize::from(queue) % queues], idx)
            }
            Step::Notify { queue } => notify(device, usize::from(queue) % queues),
        }
    }
    for q in 0..queues {
        notify(device, q);
    }
    device.stop();
}

/// One notification, then the extra turns the event loop gives a queue whose budget ran out
/// (a bounded number: a device that never stops asking is a hang).
pub fn notify(device: &mut dyn VirtioDevice, queue: usize) {
    device.process_queue(queue);
    let mut turns = 0;
    while device.queue_backlog(queue) {
        turns += 1;
        assert!(
            turns < 1000,
            "queue {queue} still has a backlog after 1000 turns"
        );
        device.process_queue(queue);
    }
}

fn set_avail_idx(mem: &GuestMem, ring: &TestQueue, idx: u16) {
    let _ = mem.write_obj(idx, GuestAddress(ring.avail_ring() + 2));
}

/// A share for virtio-fs with something in it, beside a canary the guest must never reach.
pub struct Share {
    root: tempfile::TempDir,
}

const CANARY: &[u8] = b"outside the share";

impl Share {
    pub fn new() -> Self {
        let root = tempfile::tempdir().expect("temp dir");
        let share = root.path().join("share");
        fs::create_dir_all(share.join("d")).expect("share");
        fs::write(share.join("a"), b"hello from the share").expect("share file");
        fs::write(share.join("d/b"), vec![7u8; 9000]).expect("share file");
        std::os::unix::fs::symlink("../canary", share.join("up")).expect("symlink");
        std::os::unix::fs::symlink("/etc/passwd", share.join("abs")).expect("symlink");
        fs::write(root.path().join("canary"), CANARY).expect("canary");
        Self { root }
    }

    pub fn dir(&self) -> PathBuf {
        self.root.path().join("share")
    }

    /// Panics (a fuzz finding) if anything outside the share changed.
    pub fn check_confined(&self) {
        let canary = fs::read(self.root.path().join("canary"));
        assert_eq!(
            canary.as_deref().ok(),
            Some(CANARY),
            "the guest reached the canary outside the share"
        );
        let mut names: Vec<_> = fs::read_dir(self.root.path())
            .expect("read temp dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["canary", "share"],
            "the guest created something outside the share"
        );
    }
}

impl Default for Share {
    fn default() -> Self {
        Self::new()
    }
}

/// A fresh directory for one input's files.
pub fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// The bytes of `path`, for before/after comparisons.
pub fn snapshot(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_default()
}

/// A driver that writes well-formed chains (one request, one reply buffer) and recycles table
/// slots, for targets that fuzz what is *in* the buffers rather than the rings.
pub struct Driver {
    pub mem: GuestMem,
    pub rings: Vec<TestQueue>,
    next: Vec<u16>,
}

/// Queue size of [`Driver`]'s queues.
pub const DRIVER_QUEUE_SIZE: u16 = 64;

impl Driver {
    /// Memory and `queues` empty queues, activated on `device`; `None` if activation failed.
    pub fn activate(device: &mut dyn VirtioDevice, queues: usize) -> Option<Self> {
        let mem = guest_memory(MEM_SIZE as usize);
        let rings: Vec<TestQueue> = (0..queues)
            .map(|q| TestQueue::new(&mem, ring_base(q), DRIVER_QUEUE_SIZE))
            .collect();
        let features = device.features();
        device
            .activate(
                mem.clone(),
                rings.iter().map(TestQueue::queue).collect(),
                interrupt(),
                features,
            )
            .ok()?;
        Some(Self {
            mem,
            next: vec![0; queues],
            rings,
        })
    }

    /// Publishes a chain on `queue` of buffers `(addr, len, device-writable)`; returns its head.
    pub fn publish(&mut self, queue: usize, bufs: &[(u64, u32, bool)]) -> u16 {
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        let size = DRIVER_QUEUE_SIZE;
        let head = self.next[queue];
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let slot = (head + i as u16) % size;
            let last = i + 1 == bufs.len();
            let flags = if last { 0 } else { NEXT } | if writable { WRITE } else { 0 };
            let next = if last { 0 } else { (slot + 1) % size };
            self.rings[queue].set_desc(slot, raw_desc(addr, len, flags, next));
        }
        self.next[queue] = (head + bufs.len() as u16) % size;
        self.rings[queue].publish(head);
        head
    }

    /// Writes `bytes` at `addr` (clipped to guest memory).
    pub fn write(&self, addr: u64, bytes: &[u8]) {
        let room = MEM_SIZE.saturating_sub(addr) as usize;
        let _ = self
            .mem
            .write_slice(&bytes[..bytes.len().min(room)], GuestAddress(addr));
    }
}
