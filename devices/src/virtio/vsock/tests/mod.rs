//! Tests: the device driven through virtqueues in fake guest memory, with real Unix sockets on
//! the host side. `Harness` plays the guest driver and the VMM's event loop.

mod flow;
mod hostile;
mod state;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::packet::{op, Header, HEADER_SIZE, TYPE_STREAM};
use super::{Vsock, GUEST_CID, HOST_CID, QUEUE_SIZE};
use crate::virtio::{GuestMem, Interrupt, VirtioDevice};

const MEM_SIZE: usize = 48 << 20;
/// Each descriptor index owns one buffer slot: room for a header and 64 KiB of data.
const SLOT: u64 = 0x1_1000;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x130_0000;
/// Event queue buffers.
const EV_BUFS: u64 = 0x200_0000;
/// Data room of the rx buffers the test driver posts (what Linux posts).
const RX_DATA: u32 = 4096;
/// The guest's advertised receive buffer unless a test says otherwise.
const GUEST_BUF: u32 = 1 << 20;

fn test_mem() -> GuestMem {
    GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory")
}

/// The driver's view of one split queue, laid out as virtio 1.2 §2.7 says. (virtio-queue's
/// `MockSplitQueue` places the used ring `2 * size` bytes too early, inside the avail ring, which
/// breaks once more than half the ring is in use, so the layout is done here.)
struct GuestQueue<'a> {
    mem: &'a GuestMem,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    buf_base: u64,
    free: Vec<u16>,
    chains: HashMap<u16, Vec<u16>>,
    avail_idx: u16,
    used_seen: u16,
}

impl<'a> GuestQueue<'a> {
    fn new(mem: &'a GuestMem, at: u64, buf_base: u64) -> Self {
        let size = u64::from(QUEUE_SIZE);
        let avail = at + 16 * size;
        let used = (avail + 6 + 2 * size + 3) & !3;
        Self {
            mem,
            desc: GuestAddress(at),
            avail: GuestAddress(avail),
            used: GuestAddress(used),
            buf_base,
            free: (0..QUEUE_SIZE).rev().collect(),
            chains: HashMap::new(),
            avail_idx: 0,
            used_seen: 0,
        }
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(QUEUE_SIZE).expect("queue");
        q.set_size(QUEUE_SIZE);
        q.set_desc_table_address(Some(self.desc.0 as u32), Some((self.desc.0 >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail.0 as u32), Some((self.avail.0 >> 32) as u32));
        q.set_used_ring_address(Some(self.used.0 as u32), Some((self.used.0 >> 32) as u32));
        q.set_ready(true);
        q
    }

    fn buf(&self, desc: u16) -> GuestAddress {
        GuestAddress(self.buf_base + u64::from(desc) * SLOT)
    }

    /// Posts a chain of (len, device-writable) descriptors, each on its own buffer slot.
    fn add_chain(&mut self, descs: &[(u32, bool)]) -> Vec<u16> {
        let idx: Vec<u16> = (0..descs.len()).map(|_| self.take_desc()).collect();
        let raw: Vec<SplitDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(k, (len, write))| {
                let mut flags = if *write { VRING_DESC_F_WRITE as u16 } else { 0 };
                let next = idx.get(k + 1).copied().unwrap_or(0);
                if k + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                SplitDescriptor::new(self.buf(idx[k]).0, *len, flags, next)
            })
            .collect();
        self.add_raw(&idx, &raw);
        idx
    }

    /// Posts descriptors exactly as given (for hostile chains) at indices `idx`.
    fn add_raw(&mut self, idx: &[u16], descs: &[SplitDescriptor]) {
        for (i, d) in idx.iter().zip(descs) {
            let at = self.desc.unchecked_add(16 * u64::from(*i));
            self.mem
                .write_obj(RawDescriptor::from(*d), at)
                .expect("store desc");
        }
        self.chains.insert(idx[0], idx.to_vec());
        let slot = u64::from(self.avail_idx % QUEUE_SIZE);
        self.mem
            .write_obj(idx[0], self.avail.unchecked_add(4 + 2 * slot))
            .expect("avail slot");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    /// Writes the avail ring's idx field.
    fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, self.avail.unchecked_add(2))
            .expect("avail idx");
    }

    /// Takes a descriptor index out of the free list (for hand-built chains).
    fn take_desc(&mut self) -> u16 {
        self.free.pop().expect("free descriptor")
    }

    /// New used entries as (chain descriptor indices, written length).
    fn used(&mut self) -> Vec<(Vec<u16>, u32)> {
        let mut out = Vec::new();
        let idx: u16 = self
            .mem
            .read_obj(self.used.unchecked_add(2))
            .expect("used idx");
        while self.used_seen != idx {
            let elem = self
                .used
                .unchecked_add(4 + 8 * u64::from(self.used_seen % QUEUE_SIZE));
            let head: u32 = self.mem.read_obj(elem).expect("used id");
            let len: u32 = self.mem.read_obj(elem.unchecked_add(4)).expect("used len");
            let chain = self
                .chains
                .remove(&(head as u16))
                .expect("used id is a posted chain");
            self.free.extend(chain.iter().copied());
            out.push((chain, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// A guest → host header.
fn g2h(src_port: u32, dst_port: u32, op: u16) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: GUEST_BUF,
        ..Header::default()
    }
}

/// A received packet.
#[derive(Debug)]
struct Pkt {
    hdr: Header,
    data: Vec<u8>,
}

struct Harness<'a> {
    mem: &'a GuestMem,
    dev: Vsock,
    rx: GuestQueue<'a>,
    tx: GuestQueue<'a>,
    ev: GuestQueue<'a>,
    irq: Interrupt,
    uds: PathBuf,
    /// Tx chains the device has returned.
    tx_used: usize,
    /// Rx buffers the device returned empty (rejected).
    rx_rejected: usize,
    _dir: tempfile::TempDir,
}

impl<'a> Harness<'a> {
    /// An activated device with 64 rx buffers posted.
    fn new(mem: &'a GuestMem) -> Self {
        let mut h = Self::inactive(mem);
        h.activate();
        h.give_rx(64);
        h
    }

    fn inactive(mem: &'a GuestMem) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let uds = dir.path().join("v.sock");
        let dev = Vsock::new(&uds, GUEST_CID).expect("vsock device");
        let irq = Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
        Self {
            mem,
            dev,
            rx: GuestQueue::new(mem, 0, RX_BUFS),
            tx: GuestQueue::new(mem, 0x8000, TX_BUFS),
            ev: GuestQueue::new(mem, 0x2_0000, EV_BUFS),
            irq,
            uds,
            tx_used: 0,
            rx_rejected: 0,
            _dir: dir,
        }
    }

    fn activate(&mut self) {
        let queues = vec![self.rx.queue(), self.tx.queue(), self.ev.queue()];
        self.dev
            .activate(
                self.mem.clone(),
                queues,
                self.irq.clone(),
                crate::virtio::VIRTIO_F_VERSION_1,
            )
            .expect("activate");
    }

    fn give_rx(&mut self, n: usize) {
        for _ in 0..n {
            self.rx
                .add_chain(&[(HEADER_SIZE as u32, true), (RX_DATA, true)]);
        }
        self.dev.process_queue(super::RX_QUEUE);
    }

    /// The guest sends one packet (header and payload in separate descriptors).
    fn send(&mut self, hdr: Header, data: &[u8]) {
        let hdr = Header {
            len: data.len() as u32,
            ..hdr
        };
        self.send_raw_len(hdr, data);
    }

    /// Sends `hdr` as is (its `len` may lie) with `data` in the second descriptor.
    fn send_raw_len(&mut self, hdr: Header, data: &[u8]) {
        let mut descs = vec![(HEADER_SIZE as u32, false)];
        if !data.is_empty() {
            descs.push((data.len() as u32, false));
        }
        let idx = self.tx.add_chain(&descs);
        self.mem
            .write_slice(&hdr.to_bytes(), self.tx.buf(idx[0]))
            .expect("write header");
        if let Some(d) = idx.get(1) {
            self.mem
                .write_slice(data, self.tx.buf(*d))
                .expect("write data");
        }
        self.dev.process_queue(super::TX_QUEUE);
        self.reclaim_tx();
    }

    fn reclaim_tx(&mut self) {
        self.tx_used += self.tx.used().len();
    }

    /// Packets the device put in the rx queue since the last call; reposts as many buffers.
    fn recv(&mut self) -> Vec<Pkt> {
        let used = self.rx.used();
        let mut out = Vec::new();
        for (chain, len) in &used {
            if *len == 0 {
                self.rx_rejected += 1;
                continue;
            }
            let mut raw = [0u8; HEADER_SIZE];
            self.mem
                .read_slice(&mut raw, self.rx.buf(chain[0]))
                .expect("read header");
            let hdr = Header::from_bytes(&raw);
            assert_eq!(
                *len as usize,
                HEADER_SIZE + hdr.len as usize,
                "used length vs header"
            );
            let mut data = vec![0u8; hdr.len as usize];
            self.mem
                .read_slice(&mut data, self.rx.buf(chain[1]))
                .expect("read data");
            out.push(Pkt { hdr, data });
        }
        self.give_rx(out.len());
        out
    }

    /// Runs the VMM's event loop until the device's fds stay quiet for 20 ms; returns the
    /// number of rounds. Panics if the device keeps it busy (a spinning fd).
    fn pump(&mut self) -> usize {
        for round in 0..500 {
            let ep = Epoll::new().expect("epoll");
            for (fd, ev) in self.dev.host_fds() {
                ep.ctl(ControlOperation::Add, fd, EpollEvent::new(ev, fd as u64))
                    .expect("epoll add");
            }
            let mut evs = [EpollEvent::default(); 64];
            let n = ep.wait(20, &mut evs).expect("epoll wait");
            if n == 0 {
                return round;
            }
            for e in &evs[..n] {
                self.dev.process_host_event(e.fd() as RawFd, e.event_set());
            }
        }
        panic!("the vsock device keeps the event loop busy");
    }

    /// A host process connects through the Unix socket and asks for guest `port`.
    fn host_connect(&mut self, port: u32) -> UnixStream {
        let mut s = UnixStream::connect(&self.uds).expect("connect to the vsock socket");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        writeln!(s, "CONNECT {port}").expect("send CONNECT");
        self.pump();
        s
    }

    /// Completes a host-initiated connection to guest `port`; returns the host stream and the
    /// host port (the guest's peer port).
    fn established_from_host(&mut self, port: u32) -> (UnixStream, u32) {
        let mut s = self.host_connect(port);
        let pkts = self.recv();
        assert_eq!(pkts.len(), 1, "{pkts:?}");
        let req = pkts[0].hdr;
        assert_eq!(req.op, op::REQUEST);
        self.send(g2h(port, req.src_port, op::RESPONSE), &[]);
        let line = read_line(&mut s);
        assert_eq!(line, format!("OK {}\n", req.src_port));
        (s, req.src_port)
    }
}

/// Reads one `\n`-terminated line, byte by byte.
fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        match s.read(&mut b) {
            Ok(1) => line.push(b[0]),
            other => panic!("reading a line: {other:?} after {line:?}"),
        }
    }
    String::from_utf8(line).expect("utf-8 line")
}

/// Reads exactly `n` bytes.
fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).expect("read from the host stream");
    v
}

/// The host stream is at EOF (or reset).
fn assert_eof(s: &mut UnixStream) {
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected EOF, got {other:?}"),
    }
}
