//! The virtio-blk device (virtio 1.2 §5.2): one request queue, requests IN, OUT, FLUSH,
//! GET_ID, DISCARD and WRITE_ZEROES served from a [`DiskBackend`].
//!
//! Everything in a descriptor chain is guest-controlled. A request the device can answer gets a
//! status byte (OK, IOERR or UNSUPP) and a used entry whose length counts the bytes written to
//! the guest, status included; a chain without a usable status descriptor gets a used entry of
//! length 0; a ring the device cannot use at all marks the device broken.
//!
//! Work per notification is bounded by a [`Budget`]: at most [`crate::virtio::CHAINS_PER_TURN`]
//! requests and [`crate::virtio::BYTES_PER_TURN`] bytes. A larger transfer (a request may move
//! up to [`MAX_DATA_LEN`], a DISCARD or WRITE_ZEROES up to 1 GiB) is split: the device keeps it
//! in flight and continues on the next turn, which the event loop schedules because
//! [`VirtioDevice::queue_backlog`] says so.

use std::ops::Deref;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::virtio::{
    device_type, pending_chains, ActivateError, Budget, GuestMem, Interrupt, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC,
};
use kiln_disk::{DiskBackend, DISK_ID_LEN};

/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes per virtio-blk sector (fixed by the spec, independent of `blk_size`).
pub const SECTOR_SIZE: u64 = 512;
/// Most data segments in one request; with the header and status it fits a direct chain.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest data segment the driver may use.
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest data transfer per request; longer requests get IOERR.
pub const MAX_DATA_LEN: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Most sectors per DISCARD segment (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Most sectors per WRITE_ZEROES segment (1 GiB).
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 21;

/// Length of the request header (`type`, `reserved`, `sector`).
const HEADER_LEN: u32 = 16;
/// Length of one DISCARD / WRITE_ZEROES segment.
const SEGMENT_LEN: u64 = 16;
/// Config space up to and including `write_zeroes_may_unmap` and its padding.
const CONFIG_LEN: usize = 60;
/// Bounce buffer between guest memory and the backend; larger descriptors go in pieces.
const BOUNCE_LEN: usize = 256 * 1024;
/// Descriptors kept per chain: header, SEG_MAX data segments, status.
const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;

const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// The driver's queues once it set DRIVER_OK.
struct Active {
    mem: GuestMem,
    queue: Queue,
    interrupt: Interrupt,
}

/// A virtio-blk device over one disk backend.
pub struct Block {
    disk: Box<dyn DiskBackend>,
    features: u64,
    config: [u8; CONFIG_LEN],
    queue_sizes: [u16; 1],
    active: Option<Active>,
    broken: bool,
    bounce: Vec<u8>,
    /// A request split across turns, continued before any new chain is popped.
    in_flight: Option<Transfer>,
    /// The last turn stopped at its budget with work left.
    backlog: bool,
}

/// What a split request does with the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Discard,
    WriteZeroes { unmap: bool },
}

/// A request whose disk work may take several turns.
struct Transfer {
    head: u16,
    op: Op,
    /// Data descriptors (IN / OUT only).
    data: Vec<Descriptor>,
    status: Descriptor,
    /// Disk byte offset of the request.
    offset: u64,
    total: u64,
    done: u64,
    /// Bytes written into guest buffers so far (IN).
    written: u32,
}

/// How far one request got this turn.
enum Progress {
    /// Answered: the used length.
    Done(u32),
    /// Budget spent; continue on a later turn.
    Pending(Transfer),
}

impl Block {
    /// A virtio-blk device serving `disk` (read-only devices offer VIRTIO_BLK_F_RO).
    pub fn new(disk: Box<dyn DiskBackend>) -> Self {
        let read_only = disk.read_only();
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH;
        if read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        let config = build_config(disk.size() / SECTOR_SIZE, disk.discard_granularity());
        Self {
            disk,
            features,
            config,
            queue_sizes: [QUEUE_SIZE],
            active: None,
            broken: false,
            bounce: Vec::new(),
            in_flight: None,
            backlog: false,
        }
    }

    fn mark_broken(&mut self, why: &str) {
        tracing::warn!("virtio-blk: {why}; the device needs a reset");
        self.broken = true;
    }
}

/// The config space (virtio 1.2 §5.2.4), little-endian, capacity first.
fn build_config(capacity: u64, discard_granularity: u64) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
    let alignment = u32::try_from((discard_granularity / SECTOR_SIZE).max(1)).unwrap_or(1);
    put(0, &capacity.to_le_bytes());
    put(8, &SIZE_MAX.to_le_bytes());
    put(12, &SEG_MAX.to_le_bytes());
    put(20, &(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
    put(34, &1u16.to_le_bytes()); // num_queues
    put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(40, &1u32.to_le_bytes()); // max_discard_seg
    put(44, &alignment.to_le_bytes()); // discard_sector_alignment
    put(48, &MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
    put(52, &1u32.to_le_bytes()); // max_write_zeroes_seg
    put(56, &[1]); // write_zeroes_may_unmap
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = self.config.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        queues: Vec<Queue>,
        interrupt: Interrupt,
        _acked_features: u64,
    ) -> Result<(), ActivateError> {
        let [queue]: [Queue; 1] = queues.try_into().map_err(|q: Vec<Queue>| {
            ActivateError::BadQueue(format!("virtio-blk has 1 queue, got {}", q.len()))
        })?;
        if !queue.is_valid(&mem) {
            return Err(ActivateError::BadQueue(
                "virtio-blk request queue does not fit in guest memory".to_string(),
            ));
        }
        self.bounce.resize(BOUNCE_LEN, 0);
        self.in_flight = None;
        self.backlog = false;
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        self.broken = false;
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        self.backlog = false;
        if index != 0 || self.broken {
            return;
        }
        let Some(Active {
            mem,
            queue,
            interrupt,
        }) = self.active.as_mut()
        else {
            return;
        };
        let mut budget = Budget::per_turn();
        let mut used = false;
        let mut failure = None;
        let mut next = self.in_flight.take().map(|t| (t.head, Step::Continue(t)));
        loop {
            let (head, step) = match next.take() {
                Some(n) => n,
                None => {
                    if budget.exhausted() {
                        // A ring the next turn cannot use is reported there.
                        self.backlog = !matches!(pending_chains(queue, mem), Ok(0));
                        break;
                    }
                    // Only what is available now (rechecked every chain); a driver that adds
                    // more notifies again.
                    match pending_chains(queue, mem) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) => {
                            failure = Some(e.to_string());
                            break;
                        }
                    }
                    let Some(chain) = queue.pop_descriptor_chain(&*mem) else {
                        break;
                    };
                    budget.charge_chain();
                    let head = chain.head_index();
                    (head, start_chain(self.disk.as_mut(), mem, head, chain))
                }
            };
            let len = match step {
                Step::Answer(len) => len,
                Step::Continue(t) => {
                    match advance(self.disk.as_mut(), &mut self.bounce, mem, t, &mut budget) {
                        Progress::Done(len) => len,
                        Progress::Pending(t) => {
                            self.in_flight = Some(t);
                            self.backlog = true;
                            break;
                        }
                    }
                }
            };
            if queue.add_used(&*mem, head, len).is_err() {
                failure = Some("cannot add a used entry (bad head index or used ring)".into());
                break;
            }
            used = true;
        }
        if used && queue.needs_notification(&*mem).unwrap_or(true) {
            interrupt.signal_used_queue();
        }
        if let Some(why) = failure {
            self.in_flight = None;
            self.backlog = false;
            self.mark_broken(&why);
        }
    }

    fn queue_backlog(&self, index: usize) -> bool {
        index == 0 && self.backlog && !self.broken
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        self.broken = false;
        self.in_flight = None;
        self.backlog = false;
        true
    }

    fn is_broken(&self) -> bool {
        self.broken
    }

    fn queue_positions(&self) -> Vec<(u16, u16)> {
        self.active
            .iter()
            .map(|a| (a.queue.next_avail(), a.queue.next_used()))
            .collect()
    }

    fn snapshot_blocker(&self) -> Option<String> {
        self.in_flight
            .is_some()
            .then(|| "virtio-blk has a request in flight".to_string())
    }
}

/// The descriptors of one chain, split into header, data and status.
struct Parsed {
    /// Every descriptor when the chain is short enough, else the first `MAX_DESCRIPTORS`.
    descs: Vec<Descriptor>,
    /// The chain had more than `MAX_DESCRIPTORS` descriptors.
    too_long: bool,
    /// The last descriptor (the status) or `None` if the chain is empty or never terminated.
    last: Option<Descriptor>,
}

fn collect<M>(chain: DescriptorChain<M>) -> Parsed
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    let mut descs = Vec::new();
    let mut too_long = false;
    let mut last = None;
    // The iterator stops after `queue size` descriptors (indirect tables: their length), on a
    // descriptor it cannot read and after 4 GiB in total, so a looping chain ends here too.
    for desc in chain {
        if descs.len() < MAX_DESCRIPTORS {
            descs.push(desc);
        } else {
            too_long = true;
        }
        last = Some(desc);
    }
    // A last descriptor that still points onwards means the walk was cut short: a loop, an
    // index past the table or an unreadable descriptor.
    let last = last.filter(|d| !d.has_next());
    Parsed {
        descs,
        too_long,
        last,
    }
}

/// A popped chain: answered at once, or a disk transfer to run under the budget.
enum Step {
    Answer(u32),
    Continue(Transfer),
}

/// Parses one request and answers it unless it moves data to or from the disk (IN, OUT,
/// DISCARD, WRITE_ZEROES): those become a [`Transfer`].
fn start_chain(
    disk: &mut dyn DiskBackend,
    mem: &GuestMem,
    head: u16,
    chain: DescriptorChain<&GuestMem>,
) -> Step {
    let parsed = collect(chain);
    let Some(status) = parsed.last.filter(|d| d.is_write_only() && d.len() >= 1) else {
        tracing::debug!("virtio-blk: chain without a writable status descriptor");
        return Step::Answer(0);
    };
    let answer = if status.len() != 1 || parsed.too_long || parsed.descs.len() < 2 {
        Served::Now(S_IOERR, 0)
    } else {
        let data = &parsed.descs[1..parsed.descs.len() - 1];
        serve(disk, mem, &parsed.descs[0], data)
    };
    match answer {
        Served::Now(status_byte, written) => {
            Step::Answer(finish(mem, status, status_byte, written))
        }
        Served::Later { op, offset, total } => {
            let data = match op {
                Op::Read | Op::Write => parsed.descs[1..parsed.descs.len() - 1].to_vec(),
                Op::Discard | Op::WriteZeroes { .. } => Vec::new(),
            };
            Step::Continue(Transfer {
                head,
                op,
                data,
                status,
                offset,
                total,
                done: 0,
                written: 0,
            })
        }
    }
}

/// Writes the status byte; returns the used length (bytes written to the guest incl. status).
fn finish(mem: &GuestMem, status: Descriptor, status_byte: u8, written: u32) -> u32 {
    if mem.write_obj(status_byte, status.addr()).is_err() {
        return 0;
    }
    written.saturating_add(1)
}

/// Moves as much of `t` as the budget allows.
fn advance(
    disk: &mut dyn DiskBackend,
    bounce: &mut Vec<u8>,
    mem: &GuestMem,
    mut t: Transfer,
    budget: &mut Budget,
) -> Progress {
    let piece = (t.total - t.done).min(budget.bytes_left());
    let r = match t.op {
        Op::Read => read_into_guest(disk, bounce, mem, &t.data, t.offset, t.done, piece)
            .map(|n| t.written = t.written.saturating_add(n)),
        Op::Write => write_from_guest(disk, bounce, mem, &t.data, t.offset, t.done, piece),
        Op::Discard | Op::WriteZeroes { .. } => {
            // Pieces end on BYTES_PER_TURN-aligned disk offsets, so every cut is aligned to
            // any discard granularity the backend has.
            let at = t.offset + t.done;
            let aligned_end =
                (at / crate::virtio::BYTES_PER_TURN + 1) * crate::virtio::BYTES_PER_TURN;
            let end = (at + piece).min(aligned_end).min(t.offset + t.total);
            let piece = end - at;
            let r = match t.op {
                Op::Discard => disk.discard(at, piece),
                Op::WriteZeroes { unmap } => disk.write_zeroes(at, piece, unmap),
                _ => unreachable!(),
            };
            return step_done(
                mem,
                t,
                budget,
                piece,
                r.map_err(|e| {
                    tracing::warn!("virtio-blk: disk I/O failed: {e}");
                }),
            );
        }
    };
    step_done(mem, t, budget, piece, r)
}

/// Books `piece` bytes of `t` as done (or the whole request as failed).
fn step_done(
    mem: &GuestMem,
    mut t: Transfer,
    budget: &mut Budget,
    piece: u64,
    r: Result<(), ()>,
) -> Progress {
    budget.charge_bytes(piece);
    if r.is_err() {
        return Progress::Done(finish(mem, t.status, S_IOERR, t.written));
    }
    t.done += piece;
    if t.done >= t.total {
        Progress::Done(finish(mem, t.status, S_OK, t.written))
    } else {
        Progress::Pending(t)
    }
}

/// How [`serve`] answers a request.
enum Served {
    /// Status and data bytes written, now.
    Now(u8, u32),
    /// A disk transfer of `total` bytes at `offset`, run under the budget.
    Later { op: Op, offset: u64, total: u64 },
}

/// A request type and the checks all types share.
fn serve(
    disk: &mut dyn DiskBackend,
    mem: &GuestMem,
    header: &Descriptor,
    data: &[Descriptor],
) -> Served {
    use Served::Now;
    if header.is_write_only() || header.len() < HEADER_LEN {
        return Now(S_IOERR, 0);
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    if mem.read_slice(&mut raw, header.addr()).is_err() {
        return Now(S_IOERR, 0);
    }
    let kind = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&raw[8..16]);
    let sector = u64::from_le_bytes(sector);

    let writes_disk = matches!(
        kind,
        VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES
    );
    let known = writes_disk
        || matches!(
            kind,
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_FLUSH | VIRTIO_BLK_T_GET_ID
        );
    if !known {
        return Now(S_UNSUPP, 0);
    }
    if writes_disk && disk.read_only() {
        return Now(S_IOERR, 0);
    }
    // IN and GET_ID fill device-writable buffers; everything else only reads from the driver.
    let want_writable = matches!(kind, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID);
    if data.iter().any(|d| d.is_write_only() != want_writable) {
        return Now(S_IOERR, 0);
    }
    let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
    if total > MAX_DATA_LEN {
        return Now(S_IOERR, 0);
    }
    match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let Some(offset) = disk_range(disk, sector, total) else {
                return Now(S_IOERR, 0);
            };
            let op = if kind == VIRTIO_BLK_T_IN {
                Op::Read
            } else {
                Op::Write
            };
            Served::Later { op, offset, total }
        }
        VIRTIO_BLK_T_FLUSH if data.is_empty() => {
            // Not split: one flush per request, and each request costs a chain.
            Now(status_of(disk.flush()), 0)
        }
        VIRTIO_BLK_T_FLUSH => Now(S_IOERR, 0),
        VIRTIO_BLK_T_GET_ID => {
            let (status, written) = get_id(disk.id(), mem, data);
            Now(status, written)
        }
        _ => discard_or_zero(disk, mem, data, total, kind),
    }
}

fn status_of(r: std::io::Result<()>) -> u8 {
    match r {
        Ok(()) => S_OK,
        Err(e) => {
            tracing::warn!("virtio-blk: disk I/O failed: {e}");
            S_IOERR
        }
    }
}

/// The byte offset of `sector` if `len` bytes from it are sector-sized and on the disk.
fn disk_range(disk: &dyn DiskBackend, sector: u64, len: u64) -> Option<u64> {
    if len & (SECTOR_SIZE - 1) != 0 {
        return None;
    }
    let capacity = disk.size() / SECTOR_SIZE * SECTOR_SIZE;
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    let end = offset.checked_add(len)?;
    (end <= capacity).then_some(offset)
}

/// Calls `f(guest address, chunk length, byte offset in the request)` for every piece of at
/// most `BOUNCE_LEN` bytes of the `len` bytes of `data` that start `from` bytes into it, in
/// order; stops at the first error.
fn for_each_chunk(
    data: &[Descriptor],
    from: u64,
    len: u64,
    mut f: impl FnMut(GuestAddress, usize, u64) -> Result<(), ()>,
) -> Result<(), ()> {
    let end = from.saturating_add(len);
    let mut base = 0u64; // request offset of `d`'s first byte
    for d in data {
        let d_len = u64::from(d.len());
        let (lo, hi) = (from.max(base), end.min(base + d_len));
        let mut at = lo;
        while at < hi {
            let n = (hi - at).min(BOUNCE_LEN as u64);
            let addr = d.addr().checked_add(at - base).ok_or(())?;
            f(addr, n as usize, at)?;
            at += n;
        }
        base += d_len;
        if base >= end {
            break;
        }
    }
    Ok(())
}

/// Reads `len` bytes of the request, `from` bytes into it, from the disk into the guest;
/// returns the bytes written to the guest.
fn read_into_guest(
    disk: &mut dyn DiskBackend,
    bounce: &mut Vec<u8>,
    mem: &GuestMem,
    data: &[Descriptor],
    offset: u64,
    from: u64,
    len: u64,
) -> Result<u32, ()> {
    bounce.resize(BOUNCE_LEN, 0);
    let mut written = 0u32;
    for_each_chunk(data, from, len, |addr, n, at| {
        let buf = &mut bounce[..n];
        disk.read_at(buf, offset + at)
            .map_err(|e| tracing::warn!("virtio-blk: read failed: {e}"))?;
        mem.write_slice(buf, addr).map_err(|_| ())?;
        // `n` fits: the total was bounded by MAX_DATA_LEN (< 4 GiB) above.
        written = written.saturating_add(n as u32);
        Ok(())
    })?;
    Ok(written)
}

/// Writes `len` bytes of the request, `from` bytes into it, from the guest to the disk.
fn write_from_guest(
    disk: &mut dyn DiskBackend,
    bounce: &mut Vec<u8>,
    mem: &GuestMem,
    data: &[Descriptor],
    offset: u64,
    from: u64,
    len: u64,
) -> Result<(), ()> {
    bounce.resize(BOUNCE_LEN, 0);
    for_each_chunk(data, from, len, |addr, n, at| {
        let buf = &mut bounce[..n];
        mem.read_slice(buf, addr).map_err(|_| ())?;
        disk.write_at(buf, offset + at)
            .map_err(|e| tracing::warn!("virtio-blk: write failed: {e}"))
    })
}

/// Writes as much of the 20-byte ID as the buffers hold (the spec's ID is not NUL-terminated
/// when it is exactly 20 bytes long).
fn get_id(id: [u8; DISK_ID_LEN], mem: &GuestMem, data: &[Descriptor]) -> (u8, u32) {
    let mut written = 0usize;
    for d in data {
        if written == DISK_ID_LEN {
            break;
        }
        let n = (d.len() as usize).min(DISK_ID_LEN - written);
        if mem
            .write_slice(&id[written..written + n], d.addr())
            .is_err()
        {
            return (S_IOERR, written as u32);
        }
        written += n;
    }
    (S_OK, written as u32)
}

/// Gathers exactly `out.len()` bytes from the start of the driver's buffers.
fn gather(mem: &GuestMem, data: &[Descriptor], out: &mut [u8]) -> Result<(), ()> {
    let mut filled = 0usize;
    for d in data {
        if filled == out.len() {
            break;
        }
        let n = (d.len() as usize).min(out.len() - filled);
        mem.read_slice(&mut out[filled..filled + n], d.addr())
            .map_err(|_| ())?;
        filled += n;
    }
    if filled == out.len() {
        Ok(())
    } else {
        Err(())
    }
}

/// Checks a DISCARD or WRITE_ZEROES segment; the disk work runs under the budget.
fn discard_or_zero(
    disk: &dyn DiskBackend,
    mem: &GuestMem,
    data: &[Descriptor],
    total: u64,
    kind: u32,
) -> Served {
    use Served::Now;
    // One segment per request: max_discard_seg and max_write_zeroes_seg are 1.
    if total != SEGMENT_LEN {
        return Now(S_IOERR, 0);
    }
    let mut seg = [0u8; SEGMENT_LEN as usize];
    if gather(mem, data, &mut seg).is_err() {
        return Now(S_IOERR, 0);
    }
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&seg[0..8]);
    let sector = u64::from_le_bytes(sector);
    let sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
    let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
    let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
    // §5.2.6.2: unknown flags, and UNMAP on a discard, are UNSUPP.
    if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (kind == VIRTIO_BLK_T_DISCARD && unmap) {
        return Now(S_UNSUPP, 0);
    }
    let max = if kind == VIRTIO_BLK_T_DISCARD {
        MAX_DISCARD_SECTORS
    } else {
        MAX_WRITE_ZEROES_SECTORS
    };
    if sectors > max {
        return Now(S_IOERR, 0);
    }
    let len = u64::from(sectors) * SECTOR_SIZE;
    let Some(offset) = disk_range(disk, sector, len) else {
        return Now(S_IOERR, 0);
    };
    if len == 0 {
        return Now(S_OK, 0);
    }
    let op = if kind == VIRTIO_BLK_T_DISCARD {
        Op::Discard
    } else {
        Op::WriteZeroes { unmap }
    };
    Served::Later {
        op,
        offset,
        total: len,
    }
}

#[cfg(test)]
mod tests;
