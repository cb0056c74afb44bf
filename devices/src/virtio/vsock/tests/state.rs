//! Host-socket events never make the device write guest memory outside the driver's
//! DRIVER_OK window: not before it, not after the driver set FAILED, not after a reset.
//! Driven through the virtio-mmio transport the way the VMM's event loop drives it.

use std::io::Write;

use super::*;
use crate::virtio::mmio::{regs, status, MmioTransport};
use crate::virtio::testing::MmioDriver;
use crate::virtio::vsock::{RX_QUEUE as RX, TX_QUEUE as TX};
use crate::virtio::VIRTIO_F_VERSION_1;

/// The VMM's loop: host events go to the transport's device until the fds stay quiet.
fn pump(t: &mut MmioTransport) {
    for _ in 0..200 {
        let ep = Epoll::new().expect("epoll");
        for (fd, ev) in t.device().host_fds() {
            ep.ctl(ControlOperation::Add, fd, EpollEvent::new(ev, fd as u64))
                .expect("epoll add");
        }
        let mut evs = [EpollEvent::default(); 64];
        let n = ep.wait(20, &mut evs).expect("epoll wait");
        if n == 0 {
            return;
        }
        for e in &evs[..n] {
            // What kiln-vmm's event loop does today.
            t.device_mut()
                .process_host_event(e.fd() as RawFd, e.event_set());
            t.process_host_event(e.fd() as RawFd, e.event_set());
        }
    }
    panic!("the device keeps the event loop busy");
}

struct Guest<'a> {
    mem: &'a GuestMem,
    rx: GuestQueue<'a>,
    tx: GuestQueue<'a>,
    ev: GuestQueue<'a>,
    irq: Interrupt,
    uds: PathBuf,
    _dir: tempfile::TempDir,
}

impl<'a> Guest<'a> {
    fn new(mem: &'a GuestMem) -> (Self, MmioTransport) {
        let dir = tempfile::tempdir().expect("temp dir");
        let uds = dir.path().join("v.sock");
        let dev = Vsock::new(&uds, GUEST_CID).expect("vsock device");
        let irq = Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
        let t = MmioTransport::new(Box::new(dev), mem.clone(), irq.clone());
        let g = Self {
            mem,
            rx: GuestQueue::new(mem, 0, RX_BUFS),
            tx: GuestQueue::new(mem, 0x8000, TX_BUFS),
            ev: GuestQueue::new(mem, 0x1_0000, TX_BUFS),
            irq,
            uds,
            _dir: dir,
        };
        (g, t)
    }

    fn driver_ok(&mut self, t: &mut MmioTransport) {
        let mut d = MmioDriver::new(t);
        d.negotiate(VIRTIO_F_VERSION_1);
        for (i, q) in [&self.rx, &self.tx, &self.ev].into_iter().enumerate() {
            d.setup_queue_at(
                i as u32,
                u32::from(QUEUE_SIZE),
                q.desc.0,
                q.avail.0,
                q.used.0,
            );
        }
        let s = d.driver_ok();
        assert_eq!(s & status::DRIVER_OK, status::DRIVER_OK, "status {s:#x}");
    }

    fn give_rx(&mut self, t: &mut MmioTransport, n: usize) {
        for _ in 0..n {
            self.rx
                .add_chain(&[(HEADER_SIZE as u32, true), (RX_DATA, true)]);
        }
        t.notify(RX);
    }

    fn used_idx(&self, q: &GuestQueue) -> u16 {
        self.mem
            .read_obj(q.used.unchecked_add(2))
            .expect("used idx")
    }

    /// A host stream to guest `port` that the guest accepted.
    fn established(&mut self, t: &mut MmioTransport, port: u32) -> UnixStream {
        let mut s = UnixStream::connect(&self.uds).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        writeln!(s, "CONNECT {port}").expect("CONNECT");
        pump(t);
        let used = self.rx.used();
        assert_eq!(used.len(), 1, "one REQUEST");
        let mut raw = [0u8; HEADER_SIZE];
        self.mem
            .read_slice(&mut raw, self.rx.buf(used[0].0[0]))
            .expect("header");
        let req = Header::from_bytes(&raw);
        assert_eq!(req.op, op::REQUEST);
        let idx = self.tx.add_chain(&[(HEADER_SIZE as u32, false)]);
        let resp = Header {
            len: 0,
            ..g2h(port, req.src_port, op::RESPONSE)
        };
        self.mem
            .write_slice(&resp.to_bytes(), self.tx.buf(idx[0]))
            .expect("response");
        t.notify(TX);
        self.tx.used();
        assert_eq!(read_line(&mut s), format!("OK {}\n", req.src_port));
        s
    }

    /// Host data and a hang-up on `s` leave the rings and the interrupt alone.
    fn assert_host_events_do_not_reach_the_rings(&mut self, t: &mut MmioTransport, s: UnixStream) {
        let (rx, tx) = (self.used_idx(&self.rx), self.used_idx(&self.tx));
        self.irq.ack(u32::MAX);
        let _ = self.irq.eventfd().read();
        let mut s = s;
        let _ = s.write_all(b"data after the driver left");
        pump(t);
        drop(s);
        pump(t);
        // A new host connection too.
        if let Ok(mut s2) = UnixStream::connect(&self.uds) {
            let _ = writeln!(s2, "CONNECT 9");
            pump(t);
        }
        assert_eq!(self.used_idx(&self.rx), rx, "rx ring written");
        assert_eq!(self.used_idx(&self.tx), tx, "tx ring written");
        assert_eq!(self.irq.status(), 0, "interrupt raised");
        assert!(self.irq.eventfd().read().is_err(), "interrupt signalled");
    }
}

#[test]
fn after_the_driver_sets_failed_host_data_and_hangups_do_not_touch_the_rings() {
    let mem = test_mem();
    let (mut g, mut t) = Guest::new(&mem);
    g.driver_ok(&mut t);
    g.give_rx(&mut t, 32);
    let s = g.established(&mut t, 500);
    let st = t.status();
    MmioDriver::new(&mut t).write(regs::STATUS, st | status::FAILED);
    assert_ne!(t.status() & status::FAILED, 0);
    g.assert_host_events_do_not_reach_the_rings(&mut t, s);
}

#[test]
fn after_a_reset_host_data_and_hangups_do_not_touch_the_rings() {
    let mem = test_mem();
    let (mut g, mut t) = Guest::new(&mem);
    g.driver_ok(&mut t);
    g.give_rx(&mut t, 32);
    let s = g.established(&mut t, 500);
    MmioDriver::new(&mut t).write(regs::STATUS, 0);
    g.assert_host_events_do_not_reach_the_rings(&mut t, s);
}

#[test]
fn before_driver_ok_host_connections_do_not_touch_the_rings() {
    let mem = test_mem();
    let (mut g, mut t) = Guest::new(&mem);
    // Rings laid out and buffers posted, but the driver has not set DRIVER_OK.
    MmioDriver::new(&mut t).negotiate(VIRTIO_F_VERSION_1);
    for _ in 0..8 {
        g.rx.add_chain(&[(HEADER_SIZE as u32, true), (RX_DATA, true)]);
    }
    let mut s = UnixStream::connect(&g.uds).expect("connect");
    writeln!(s, "CONNECT 500").expect("CONNECT");
    g.assert_host_events_do_not_reach_the_rings(&mut t, s);
    // DRIVER_OK: the waiting connection request reaches the guest now.
    g.driver_ok(&mut t);
    pump(&mut t);
    assert!(
        !g.rx.used().is_empty(),
        "the early CONNECT reaches the guest"
    );
}

/// After a restore the device sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, and holds back what
/// it would deliver (a host connection request) until the driver handled the event and kicked
/// the event queue: otherwise the late reset would close a connection made just after.
#[test]
fn a_restore_resets_the_transport_before_any_host_connection_reaches_the_guest() {
    let mem = test_mem();
    let mut h = Harness::inactive(&mem);
    h.ev.add_chain(&[(4, true)]);
    h.activate();
    h.give_rx(64);
    h.dev.restored();
    let events = h.ev.used();
    assert_eq!(events.len(), 1, "one event");
    assert_eq!(events[0].1, 4, "a 4-byte virtio_vsock_event");
    let id: u32 = mem.read_obj(h.ev.buf(events[0].0[0])).unwrap();
    assert_eq!(u32::from_le(id), 0, "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET");

    let _host = h.host_connect(1024);
    assert!(
        h.recv().is_empty(),
        "delivered before the driver handled the reset"
    );
    // The driver handled the event: it gives the buffer back and kicks the event queue.
    h.ev.add_chain(&[(4, true)]);
    h.dev.process_queue(super::super::EVENT_QUEUE);
    h.pump();
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(pkts[0].hdr.op, op::REQUEST);
}
