//! The virtio-blk device (virtio 1.2 §5.2): one request queue, requests IN, OUT, FLUSH,
//! GET_ID, DISCARD and WRITE_ZEROES served from a [`DiskBackend`].
//!
//! Everything in a descriptor chain is guest-controlled. A request the device can answer gets a
//! status byte (OK, IOERR or UNSUPP) and a used entry whose length counts the bytes written to
//! the guest, status included; a chain without a usable status descriptor gets a used entry of
//! length 0; a ring the device cannot use at all marks the device broken.

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
    device_type, pending_chains, ActivateError, GuestMem, Interrupt, VirtioDevice,
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
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        self.broken = false;
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
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
        // Only what is available now: bounded work per notification, and a driver that adds
        // more notifies again.
        let pending = match pending_chains(queue, mem) {
            Ok(pending) => pending,
            Err(e) => return self.mark_broken(&e.to_string()),
        };
        let mut used = false;
        let mut failure = None;
        for _ in 0..pending {
            let Some(chain) = queue.pop_descriptor_chain(&*mem) else {
                break;
            };
            let head = chain.head_index();
            let len = process_chain(self.disk.as_mut(), &mut self.bounce, mem, chain);
            if queue.add_used(&*mem, head, len).is_err() {
                failure = Some("cannot add a used entry (bad head index or used ring)");
                break;
            }
            used = true;
        }
        if used && queue.needs_notification(&*mem).unwrap_or(true) {
            interrupt.signal_used_queue();
        }
        if let Some(why) = failure {
            self.mark_broken(why);
        }
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        self.broken = false;
        true
    }

    fn is_broken(&self) -> bool {
        self.broken
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

/// Serves one request; returns the used length (bytes written to the guest incl. status).
fn process_chain(
    disk: &mut dyn DiskBackend,
    bounce: &mut Vec<u8>,
    mem: &GuestMem,
    chain: DescriptorChain<&GuestMem>,
) -> u32 {
    let parsed = collect(chain);
    let Some(status) = parsed.last.filter(|d| d.is_write_only() && d.len() >= 1) else {
        tracing::debug!("virtio-blk: chain without a writable status descriptor");
        return 0;
    };
    let (status_byte, written) = if status.len() != 1 || parsed.too_long || parsed.descs.len() < 2 {
        (S_IOERR, 0)
    } else {
        let data = &parsed.descs[1..parsed.descs.len() - 1];
        serve(disk, bounce, mem, &parsed.descs[0], data)
    };
    if mem.write_obj(status_byte, status.addr()).is_err() {
        return 0;
    }
    written.saturating_add(1)
}

/// A request type and the checks all types share; returns (status, data bytes written).
fn serve(
    disk: &mut dyn DiskBackend,
    bounce: &mut Vec<u8>,
    mem: &GuestMem,
    header: &Descriptor,
    data: &[Descriptor],
) -> (u8, u32) {
    if header.is_write_only() || header.len() < HEADER_LEN {
        return (S_IOERR, 0);
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    if mem.read_slice(&mut raw, header.addr()).is_err() {
        return (S_IOERR, 0);
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
        return (S_UNSUPP, 0);
    }
    if writes_disk && disk.read_only() {
        return (S_IOERR, 0);
    }
    // IN and GET_ID fill device-writable buffers; everything else only reads from the driver.
    let want_writable = matches!(kind, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID);
    if data.iter().any(|d| d.is_write_only() != want_writable) {
        return (S_IOERR, 0);
    }
    let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
    if total > MAX_DATA_LEN {
        return (S_IOERR, 0);
    }
    match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let Some(offset) = disk_range(disk, sector, total) else {
                return (S_IOERR, 0);
            };
            if kind == VIRTIO_BLK_T_IN {
                read_into_guest(disk, bounce, mem, data, offset)
            } else {
                (write_from_guest(disk, bounce, mem, data, offset), 0)
            }
        }
        VIRTIO_BLK_T_FLUSH if data.is_empty() => (status_of(disk.flush()), 0),
        VIRTIO_BLK_T_FLUSH => (S_IOERR, 0),
        VIRTIO_BLK_T_GET_ID => get_id(disk.id(), mem, data),
        _ => (discard_or_zero(disk, mem, data, total, kind), 0),
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
/// most `BOUNCE_LEN` bytes of `data`, in order; stops at the first error.
fn for_each_chunk(
    data: &[Descriptor],
    mut f: impl FnMut(GuestAddress, usize, u64) -> Result<(), ()>,
) -> Result<(), ()> {
    let mut done = 0u64;
    for d in data {
        let len = u64::from(d.len());
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(BOUNCE_LEN as u64);
            let addr = d.addr().checked_add(off).ok_or(())?;
            f(addr, n as usize, done)?;
            off += n;
            done += n;
        }
    }
    Ok(())
}

fn read_into_guest(
    disk: &mut dyn DiskBackend,
    bounce: &mut Vec<u8>,
    mem: &GuestMem,
    data: &[Descriptor],
    offset: u64,
) -> (u8, u32) {
    bounce.resize(BOUNCE_LEN, 0);
    let mut written = 0u32;
    let r = for_each_chunk(data, |addr, n, at| {
        let buf = &mut bounce[..n];
        disk.read_at(buf, offset + at)
            .map_err(|e| tracing::warn!("virtio-blk: read failed: {e}"))?;
        mem.write_slice(buf, addr).map_err(|_| ())?;
        // `n` fits: the total was bounded by MAX_DATA_LEN (< 4 GiB) above.
        written = written.saturating_add(n as u32);
        Ok(())
    });
    (if r.is_ok() { S_OK } else { S_IOERR }, written)
}

fn write_from_guest(
    disk: &mut dyn DiskBackend,
    bounce: &mut Vec<u8>,
    mem: &GuestMem,
    data: &[Descriptor],
    offset: u64,
) -> u8 {
    bounce.resize(BOUNCE_LEN, 0);
    let r = for_each_chunk(data, |addr, n, at| {
        let buf = &mut bounce[..n];
        mem.read_slice(buf, addr).map_err(|_| ())?;
        disk.write_at(buf, offset + at)
            .map_err(|e| tracing::warn!("virtio-blk: write failed: {e}"))
    });
    if r.is_ok() {
        S_OK
    } else {
        S_IOERR
    }
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

fn discard_or_zero(
    disk: &mut dyn DiskBackend,
    mem: &GuestMem,
    data: &[Descriptor],
    total: u64,
    kind: u32,
) -> u8 {
    // One segment per request: max_discard_seg and max_write_zeroes_seg are 1.
    if total != SEGMENT_LEN {
        return S_IOERR;
    }
    let mut seg = [0u8; SEGMENT_LEN as usize];
    if gather(mem, data, &mut seg).is_err() {
        return S_IOERR;
    }
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&seg[0..8]);
    let sector = u64::from_le_bytes(sector);
    let sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
    let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
    let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
    // §5.2.6.2: unknown flags, and UNMAP on a discard, are UNSUPP.
    if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (kind == VIRTIO_BLK_T_DISCARD && unmap) {
        return S_UNSUPP;
    }
    let max = if kind == VIRTIO_BLK_T_DISCARD {
        MAX_DISCARD_SECTORS
    } else {
        MAX_WRITE_ZEROES_SECTORS
    };
    if sectors > max {
        return S_IOERR;
    }
    let len = u64::from(sectors) * SECTOR_SIZE;
    let Some(offset) = disk_range(disk, sector, len) else {
        return S_IOERR;
    };
    if len == 0 {
        return S_OK;
    }
    if kind == VIRTIO_BLK_T_DISCARD {
        status_of(disk.discard(offset, len))
    } else {
        status_of(disk.write_zeroes(offset, len, unmap))
    }
}

#[cfg(test)]
mod tests;
