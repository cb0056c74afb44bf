//! One stream connection between a guest port and a host Unix stream: its state, the credit
//! accounting of both directions (virtio 1.2 §5.10.6.3) and the bytes in flight.
//!
//! Host → guest bytes are never buffered here: they stay in the host socket until the guest has
//! both credit and an rx buffer, and are then read straight into guest memory. Guest → host bytes
//! go straight to the host socket; what it does not take waits in a buffer no larger than the
//! `buf_alloc` this side advertises, so a guest that respects its credit never overflows it.

use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};
use vmm_sys_util::epoll::EventSet;

use super::packet::{op, Header, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::{CONN_BUF_ALLOC, HOST_CID, MAX_PKT_DATA};

/// What the muxer must do with a connection after an event.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Keep it.
    Keep,
    /// Drop it and send the guest a reset.
    Reset,
    /// Drop it silently (the guest reset it).
    Close,
}

/// The outcome of asking a connection for its next packet to the guest.
#[derive(Debug)]
pub enum RxOutcome {
    /// A packet for the guest; RW payload (`len` bytes) is already in the buffer.
    Packet(Header),
    /// Nothing to send now.
    Nothing,
    /// The host stream failed: reset the connection.
    Reset,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated: the device sent (or will send) OP_REQUEST and waits for OP_RESPONSE.
    AwaitingResponse,
    /// Data may flow.
    Established,
}

/// Packets a connection owes the guest, as bits.
mod pending {
    pub const REQUEST: u8 = 1;
    pub const RESPONSE: u8 = 2;
    pub const RW: u8 = 4;
    pub const CREDIT_UPDATE: u8 = 8;
}

/// A vsock stream connection backed by a host Unix stream.
pub struct Connection {
    stream: UnixStream,
    guest_cid: u64,
    /// The port on the host side (CID 2).
    local_port: u32,
    /// The port on the guest side.
    peer_port: u32,
    state: State,
    created: Instant,
    pending: u8,
    /// Set while the muxer has this connection in its rx queue.
    pub queued: bool,
    /// Guest bytes the host socket has not taken yet.
    to_host: VecDeque<u8>,
    /// Guest bytes written to the host socket (our `fwd_cnt`).
    fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` the guest last heard from us.
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Host bytes sent to the guest.
    sent_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// A credit request is outstanding (sent once until the guest's credit changes).
    credit_requested: bool,
    /// The host stream hit EOF and the guest was told SHUTDOWN(SEND).
    host_eof: bool,
    host_write_shut: bool,
    peer_shut_rcv: bool,
    peer_shut_send: bool,
}

impl Connection {
    /// A host-initiated connection: OP_REQUEST is owed to the guest.
    pub fn new_local(stream: UnixStream, guest_cid: u64, local_port: u32, peer_port: u32) -> Self {
        let mut c = Self::new(
            stream,
            guest_cid,
            local_port,
            peer_port,
            State::AwaitingResponse,
        );
        c.pending = pending::REQUEST;
        c
    }

    /// A guest-initiated connection (its OP_REQUEST is `req`): OP_RESPONSE is owed to the guest.
    pub fn new_peer(stream: UnixStream, guest_cid: u64, req: &Header) -> Self {
        let mut c = Self::new(
            stream,
            guest_cid,
            req.dst_port,
            req.src_port,
            State::Established,
        );
        c.pending = pending::RESPONSE;
        c.peer_buf_alloc = req.buf_alloc;
        c.peer_fwd_cnt = Wrapping(req.fwd_cnt);
        c
    }

    fn new(stream: UnixStream, guest_cid: u64, local: u32, peer: u32, state: State) -> Self {
        Self {
            stream,
            guest_cid,
            local_port: local,
            peer_port: peer,
            state,
            created: Instant::now(),
            pending: 0,
            queued: false,
            to_host: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            sent_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            credit_requested: false,
            host_eof: false,
            host_write_shut: false,
            peer_shut_rcv: false,
            peer_shut_send: false,
        }
    }

    /// The host stream's fd.
    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// For a host-initiated connection the guest has not answered yet: when it was opened.
    pub fn awaiting_response_since(&self) -> Option<Instant> {
        (self.state == State::AwaitingResponse).then_some(self.created)
    }

    /// Whether the connection owes the guest a packet.
    pub fn has_pending_rx(&self) -> bool {
        self.pending != 0
    }

    /// Both sides are done: the guest will neither send nor (after host EOF or its own
    /// SHUTDOWN(RCV)) receive, and every guest byte reached the host. Time for the final reset.
    pub fn is_done(&self) -> bool {
        self.state == State::Established
            && self.peer_shut_send
            && (self.peer_shut_rcv || self.host_eof)
            && self.to_host.is_empty()
    }

    /// How many more bytes the guest can take (its `buf_alloc` minus what is in flight).
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.sent_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn can_read_host(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && !self.peer_shut_rcv
            && self.peer_credit() > 0
    }

    /// The events to watch on the host stream; empty when nothing can be done with them (so a
    /// stalled connection never busy-loops the event loop).
    pub fn interest(&self) -> EventSet {
        let mut ev = EventSet::empty();
        if self.can_read_host() && self.pending & pending::RW == 0 {
            ev |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            ev |= EventSet::OUT;
        }
        ev
    }

    /// The host stream is ready.
    pub fn on_host_event(&mut self, events: EventSet) -> Verdict {
        if events.contains(EventSet::OUT) && !self.to_host.is_empty() {
            if let Err(e) = self.flush_to_host() {
                tracing::debug!(
                    port = self.local_port,
                    "vsock host stream write failed: {e}"
                );
                return Verdict::Reset;
            }
        }
        let readable = EventSet::IN | EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP;
        if events.intersects(readable) && self.can_read_host() {
            self.pending |= pending::RW;
        }
        Verdict::Keep
    }

    /// A packet from the guest for this connection (cids and type already checked).
    pub fn on_guest_packet(
        &mut self,
        hdr: &Header,
        data: Option<&VolatileSlice<'_, ()>>,
    ) -> Verdict {
        if hdr.op == op::RST {
            return Verdict::Close;
        }
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
        match (self.state, hdr.op) {
            (State::AwaitingResponse, op::RESPONSE) => self.establish(),
            (State::Established, op::RW) => self.forward_to_host(data),
            (State::Established, op::CREDIT_UPDATE) => Verdict::Keep,
            (State::Established, op::CREDIT_REQUEST) => {
                self.pending |= pending::CREDIT_UPDATE;
                Verdict::Keep
            }
            (State::Established, op::SHUTDOWN) => self.peer_shutdown(hdr.flags),
            (state, op) => {
                tracing::debug!(
                    ?state,
                    op,
                    port = self.local_port,
                    "vsock: unexpected packet"
                );
                Verdict::Reset
            }
        }
    }

    /// The guest accepted a host-initiated connection: tell the host process its port.
    fn establish(&mut self) -> Verdict {
        self.state = State::Established;
        let line = format!("OK {}\n", self.local_port);
        // A fresh socket's send buffer always has room for one short line, so a short write
        // means the host process is gone.
        match (&self.stream).write(line.as_bytes()) {
            Ok(n) if n == line.len() => Verdict::Keep,
            Ok(_) => Verdict::Reset,
            Err(e) => {
                tracing::debug!(port = self.local_port, "vsock: cannot answer CONNECT: {e}");
                Verdict::Reset
            }
        }
    }

    fn peer_shutdown(&mut self, flags: u32) -> Verdict {
        self.peer_shut_rcv |= flags & SHUTDOWN_RCV != 0;
        self.peer_shut_send |= flags & SHUTDOWN_SEND != 0;
        if self.peer_shut_rcv {
            // Host bytes the guest will not read are dropped with the connection.
            self.pending &= !pending::RW;
        }
        self.shut_host_write_if_drained();
        Verdict::Keep
    }

    fn shut_host_write_if_drained(&mut self) {
        if self.peer_shut_send && self.to_host.is_empty() && !self.host_write_shut {
            self.host_write_shut = true;
            // The host may already be gone; the next read or write reports that.
            if let Err(e) = self.stream.shutdown(Shutdown::Write) {
                tracing::debug!(port = self.local_port, "vsock: host shutdown: {e}");
            }
        }
    }

    /// Guest payload for the host. Written directly while the host keeps up; the rest is
    /// buffered, and a guest that sends past its credit (overflowing the buffer) is reset.
    fn forward_to_host(&mut self, data: Option<&VolatileSlice<'_, ()>>) -> Verdict {
        if self.peer_shut_send {
            return Verdict::Reset;
        }
        let Some(data) = data else {
            return Verdict::Keep;
        };
        let mut written = 0;
        if self.to_host.is_empty() {
            // SIGPIPE is ignored by Rust binaries, so a vanished host reports EPIPE here.
            match (&self.stream).write_volatile(data) {
                Ok(n) => written = n,
                Err(VolatileMemoryError::IOError(e)) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => {
                    tracing::debug!(port = self.local_port, "vsock host stream write: {e}");
                    return Verdict::Reset;
                }
            }
        }
        self.fwd_cnt += written as u32;
        let rest = data.len() - written;
        if rest > 0 {
            if self.to_host.len() + rest > CONN_BUF_ALLOC as usize {
                tracing::debug!(port = self.local_port, "vsock: guest exceeded its credit");
                return Verdict::Reset;
            }
            let mut tmp = vec![0u8; rest];
            let Ok(tail) = data.subslice(written, rest) else {
                return Verdict::Reset;
            };
            tail.copy_to(&mut tmp[..]);
            self.to_host.extend(tmp);
        }
        self.check_credit_update();
        Verdict::Keep
    }

    fn flush_to_host(&mut self) -> std::io::Result<()> {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match (&self.stream).write(front) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt += n as u32;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.shut_host_write_if_drained();
        self.check_credit_update();
        Ok(())
    }

    /// Owes the guest a credit update once the free space it knows of falls below half the
    /// buffer while more has been forwarded: one update per half buffer, and a guest that
    /// honours its credit never stalls for lack of one.
    fn check_credit_update(&mut self) {
        let received = self.fwd_cnt + Wrapping(self.to_host.len() as u32);
        let seen_used = (received - self.last_fwd_cnt_sent).0;
        let seen_free = CONN_BUF_ALLOC.saturating_sub(seen_used);
        if self.fwd_cnt != self.last_fwd_cnt_sent && seen_free < CONN_BUF_ALLOC / 2 {
            self.pending |= pending::CREDIT_UPDATE;
        }
    }

    fn header(&mut self, op: u16) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending &= !pending::CREDIT_UPDATE;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// The header of a reset for this connection.
    pub fn rst_header(&mut self) -> Header {
        self.header(op::RST)
    }

    /// The next packet for the guest; RW payload goes into `buf`.
    pub fn next_rx(&mut self, buf: &VolatileSlice<'_, ()>) -> RxOutcome {
        if self.pending & pending::REQUEST != 0 {
            self.pending &= !pending::REQUEST;
            return RxOutcome::Packet(self.header(op::REQUEST));
        }
        if self.pending & pending::RESPONSE != 0 {
            self.pending &= !pending::RESPONSE;
            return RxOutcome::Packet(self.header(op::RESPONSE));
        }
        if self.pending & pending::RW != 0 {
            match self.read_host(buf) {
                RxOutcome::Nothing => {}
                other => return other,
            }
        }
        if self.pending & pending::CREDIT_UPDATE != 0 {
            return RxOutcome::Packet(self.header(op::CREDIT_UPDATE));
        }
        RxOutcome::Nothing
    }

    /// Reads host bytes into `buf`. RW stays pending only after a full read; otherwise
    /// level-triggered epoll says when more arrives.
    fn read_host(&mut self, buf: &VolatileSlice<'_, ()>) -> RxOutcome {
        self.pending &= !pending::RW;
        if !self.can_read_host() {
            if self.state == State::Established
                && !self.host_eof
                && !self.peer_shut_rcv
                && !self.credit_requested
            {
                self.credit_requested = true;
                return RxOutcome::Packet(self.header(op::CREDIT_REQUEST));
            }
            return RxOutcome::Nothing;
        }
        let cap = (self.peer_credit().min(MAX_PKT_DATA) as usize).min(buf.len());
        let Ok(mut dst) = buf.subslice(0, cap) else {
            return RxOutcome::Nothing;
        };
        if cap == 0 {
            return RxOutcome::Nothing;
        }
        match (&self.stream).read_volatile(&mut dst) {
            Ok(0) => {
                self.host_eof = true;
                let mut h = self.header(op::SHUTDOWN);
                h.flags = SHUTDOWN_SEND;
                RxOutcome::Packet(h)
            }
            Ok(n) => {
                if n == cap {
                    self.pending |= pending::RW;
                }
                self.sent_cnt += n as u32;
                let mut h = self.header(op::RW);
                h.len = n as u32;
                RxOutcome::Packet(h)
            }
            Err(VolatileMemoryError::IOError(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) =>
            {
                RxOutcome::Nothing
            }
            Err(e) => {
                tracing::debug!(port = self.local_port, "vsock host stream read: {e}");
                RxOutcome::Reset
            }
        }
    }
}
