//! The host side of the vsock device: the Unix listener speaking Firecracker's `CONNECT <port>`
//! protocol, the table of connections keyed by (host port, guest port), and the order in which
//! they get to send to the guest.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vm_memory::VolatileSlice;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{Connection, RxOutcome, Verdict};
use super::packet::{op, Header, TYPE_STREAM};
use super::{VsockError, EPHEMERAL_PORT_BASE, HOST_CID, MAX_CONNECTIONS};

/// Resets waiting for rx buffers beyond which the device stops taking tx packets (each tx
/// packet adds at most one), so a guest that sends but never receives cannot grow the queue.
pub const MAX_CONTROL_BACKLOG: usize = 256;
/// Host connections that have not finished their `CONNECT` line; the oldest is dropped beyond.
const MAX_HANDSHAKES: usize = 64;
/// Longest valid `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// How long the guest has to answer a host `CONNECT` before the host stream is closed (as in
/// Firecracker).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections accepted per listener event, so one busy host cannot starve the queues.
const ACCEPTS_PER_EVENT: usize = 32;

/// (host port, guest port).
type ConnKey = (u32, u32);

struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    seq: u64,
}

/// Host sockets and connections of one vsock device.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    /// accept(2) failed (e.g. out of fds): stop watching the listener, which would otherwise
    /// stay readable and spin the event loop, until a host stream closes.
    accept_paused: bool,
    handshakes: HashMap<RawFd, Handshake>,
    handshake_seq: u64,
    conns: HashMap<ConnKey, Connection>,
    fd_keys: HashMap<RawFd, ConnKey>,
    /// Connections owing the guest a packet, each at most once (see `Connection::queued`).
    rx_ready: VecDeque<ConnKey>,
    /// Resets for packets that belong to no live connection.
    control: VecDeque<Header>,
    next_ephemeral: u32,
    /// Fires when the oldest unanswered host `CONNECT` times out.
    timer: TimerFd,
    timer_armed: bool,
    /// [`CONNECT_TIMEOUT`], shortened by tests.
    pub connect_timeout: Duration,
}

impl Muxer {
    /// Listens on `uds_path`; fails if the path exists.
    pub fn new(uds_path: PathBuf, guest_cid: u64) -> Result<Self, VsockError> {
        let listener = match UnixListener::bind(&uds_path) {
            Ok(l) => l,
            Err(e) if e.kind() == ErrorKind::AddrInUse => {
                return Err(VsockError::PathInUse(uds_path))
            }
            Err(e) => {
                return Err(VsockError::Listen {
                    path: uds_path,
                    source: e,
                })
            }
        };
        if let Err(e) = listener.set_nonblocking(true) {
            // Do not leave the socket file behind on failure.
            let _ = std::fs::remove_file(&uds_path);
            return Err(VsockError::Listen {
                path: uds_path,
                source: e,
            });
        }
        let timer = match TimerFd::new() {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_file(&uds_path);
                return Err(VsockError::Listen {
                    path: uds_path,
                    source: e.into(),
                });
            }
        };
        Ok(Self {
            guest_cid,
            uds_path,
            listener,
            accept_paused: false,
            handshakes: HashMap::new(),
            handshake_seq: 0,
            conns: HashMap::new(),
            fd_keys: HashMap::new(),
            rx_ready: VecDeque::new(),
            control: VecDeque::new(),
            next_ephemeral: EPHEMERAL_PORT_BASE,
            timer,
            timer_armed: false,
            connect_timeout: CONNECT_TIMEOUT,
        })
    }

    /// Drops every connection (driver reset); the listener stays.
    pub fn reset(&mut self) {
        self.accept_paused = false;
        if let Err(e) = self.timer.clear() {
            tracing::warn!("vsock: cannot disarm the connect timer: {e}");
        }
        self.timer_armed = false;
        self.handshakes.clear();
        self.conns.clear();
        self.fd_keys.clear();
        self.rx_ready.clear();
        self.control.clear();
    }

    /// Number of open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// The fds to watch and for what.
    pub fn host_fds(&self) -> Vec<(RawFd, EventSet)> {
        let mut fds = Vec::with_capacity(1 + self.handshakes.len() + self.conns.len());
        if !self.accept_paused {
            fds.push((self.listener.as_raw_fd(), EventSet::IN));
        }
        if self.timer_armed {
            fds.push((self.timer.as_raw_fd(), EventSet::IN));
        }
        fds.extend(self.handshakes.keys().map(|fd| (*fd, EventSet::IN)));
        for conn in self.conns.values() {
            let ev = conn.interest();
            if !ev.is_empty() {
                fds.push((conn.fd(), ev));
            }
        }
        fds
    }

    /// Whether tx processing must pause until the guest takes queued resets.
    pub fn tx_blocked(&self) -> bool {
        self.control.len() >= MAX_CONTROL_BACKLOG
    }

    /// Whether anything waits to be sent to the guest.
    pub fn has_rx(&self) -> bool {
        !self.control.is_empty() || !self.rx_ready.is_empty()
    }

    /// One of [`Muxer::host_fds`] is ready.
    pub fn on_host_event(&mut self, fd: RawFd, events: EventSet) {
        if fd == self.listener.as_raw_fd() {
            self.accept();
        } else if fd == self.timer.as_raw_fd() {
            self.expire_connects();
        } else if self.handshakes.contains_key(&fd) {
            self.read_handshake(fd);
        } else if let Some(key) = self.fd_keys.get(&fd).copied() {
            if let Some(conn) = self.conns.get_mut(&key) {
                let verdict = conn.on_host_event(events);
                self.settle(key, verdict);
            }
        }
    }

    fn accept(&mut self) {
        for _ in 0..ACCEPTS_PER_EVENT {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    tracing::warn!(path = %self.uds_path.display(), "vsock accept (pausing): {e}");
                    self.accept_paused = true;
                    return;
                }
            };
            if let Err(e) = stream.set_nonblocking(true) {
                tracing::warn!("vsock: cannot make a host stream non-blocking: {e}");
                continue;
            }
            if self.handshakes.len() >= MAX_HANDSHAKES {
                let oldest = self
                    .handshakes
                    .iter()
                    .min_by_key(|(_, h)| h.seq)
                    .map(|(fd, _)| *fd);
                if let Some(fd) = oldest {
                    self.handshakes.remove(&fd);
                }
            }
            self.handshake_seq += 1;
            let hs = Handshake {
                stream,
                line: Vec::new(),
                seq: self.handshake_seq,
            };
            self.handshakes.insert(hs.stream.as_raw_fd(), hs);
        }
    }

    /// Reads the `CONNECT` line one byte at a time, so bytes the host sends after it stay in
    /// the socket for the guest.
    fn read_handshake(&mut self, fd: RawFd) {
        let Some(hs) = self.handshakes.get_mut(&fd) else {
            return;
        };
        loop {
            let mut byte = [0u8; 1];
            match hs.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break,
                Ok(1) if hs.line.len() < MAX_CONNECT_LINE => hs.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // EOF, an error or an overlong line: drop the host stream.
                _ => {
                    self.handshakes.remove(&fd);
                    self.accept_paused = false;
                    return;
                }
            }
        }
        let Some(hs) = self.handshakes.remove(&fd) else {
            return;
        };
        // Whatever happens next, this stream leaves the handshake table.
        self.accept_paused = false;
        let Some(port) = parse_connect(&hs.line) else {
            tracing::debug!("vsock: bad CONNECT line from the host: {:?}", hs.line);
            return;
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            tracing::warn!("vsock: {MAX_CONNECTIONS} connections open; refusing CONNECT {port}");
            return;
        }
        let Some(local) = self.alloc_ephemeral(port) else {
            return;
        };
        let conn = Connection::new_local(hs.stream, self.guest_cid, local, port);
        self.insert(conn, (local, port));
        self.arm_timer();
    }

    /// Arms the timer for the oldest unanswered `CONNECT`, if any and not armed already.
    fn arm_timer(&mut self) {
        if self.timer_armed {
            return;
        }
        let Some(oldest) = self
            .conns
            .values()
            .filter_map(|c| c.awaiting_response_since())
            .min()
        else {
            return;
        };
        let left = (oldest + self.connect_timeout).saturating_duration_since(Instant::now());
        // A zero duration would disarm a timerfd.
        match self.timer.reset(left.max(Duration::from_millis(1)), None) {
            Ok(()) => self.timer_armed = true,
            Err(e) => tracing::warn!("vsock: cannot arm the connect timer: {e}"),
        }
    }

    /// Resets host connections the guest did not answer in time, closing their host streams.
    fn expire_connects(&mut self) {
        // Only read an expired timer: reading an armed one would block the event loop.
        if !self.timer_armed || self.timer.is_armed().unwrap_or(true) {
            return;
        }
        if let Err(e) = self.timer.wait() {
            tracing::warn!("vsock: connect timer: {e}");
        }
        self.timer_armed = false;
        let now = Instant::now();
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.awaiting_response_since()
                    .is_some_and(|t| now >= t + self.connect_timeout)
            })
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            tracing::debug!(port = key.1, "vsock: guest did not answer CONNECT in time");
            self.remove(key, true);
        }
        self.arm_timer();
    }

    fn alloc_ephemeral(&mut self, peer: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_ephemeral;
            self.next_ephemeral = match port.checked_add(1) {
                Some(p) if p != u32::MAX => p,
                _ => EPHEMERAL_PORT_BASE,
            };
            if !self.conns.contains_key(&(port, peer)) {
                return Some(port);
            }
        }
        None
    }

    fn insert(&mut self, conn: Connection, key: ConnKey) {
        self.fd_keys.insert(conn.fd(), key);
        self.conns.insert(key, conn);
        self.enqueue(key);
    }

    fn enqueue(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if conn.has_pending_rx() && !conn.queued {
                conn.queued = true;
                self.rx_ready.push_back(key);
            }
        }
    }

    /// Applies a connection's verdict, and closes it gracefully once both sides are done.
    fn settle(&mut self, key: ConnKey, verdict: Verdict) {
        let done = self.conns.get(&key).is_some_and(|c| c.is_done());
        match verdict {
            Verdict::Reset => self.remove(key, true),
            Verdict::Close => self.remove(key, false),
            Verdict::Keep if done => self.remove(key, true),
            Verdict::Keep => self.enqueue(key),
        }
    }

    fn remove(&mut self, key: ConnKey, send_rst: bool) {
        let Some(mut conn) = self.conns.remove(&key) else {
            return;
        };
        self.fd_keys.remove(&conn.fd());
        self.accept_paused = false;
        if conn.queued {
            self.rx_ready.retain(|k| *k != key);
        }
        if send_rst {
            self.control.push_back(conn.rst_header());
        }
    }

    /// A well-formed packet from the guest's tx queue; `data` is its payload.
    pub fn on_guest_packet(&mut self, hdr: Header, data: Option<&VolatileSlice<'_, ()>>) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            tracing::debug!(
                src = hdr.src_cid,
                dst = hdr.dst_cid,
                "vsock: bad CIDs; dropped"
            );
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            self.reply_rst(&hdr);
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if let Some(conn) = self.conns.get_mut(&key) {
            let verdict = conn.on_guest_packet(&hdr, data);
            self.settle(key, verdict);
        } else if hdr.op == op::REQUEST {
            self.open_from_guest(&hdr);
        } else {
            self.reply_rst(&hdr);
        }
    }

    /// A tx packet the parser rejected (bad length, bad descriptors) whose header could still
    /// be read: reset what it refers to.
    pub fn on_bad_packet(&mut self, hdr: Header) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if self.conns.contains_key(&key) {
            self.remove(key, true);
        } else {
            self.reply_rst(&hdr);
        }
    }

    fn reply_rst(&mut self, hdr: &Header) {
        if hdr.op != op::RST {
            self.control.push_back(hdr.rst_reply());
        }
    }

    /// The guest connects to host port P: connect to `<uds_path>_P`, or reset.
    fn open_from_guest(&mut self, req: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS || req.src_port == u32::MAX {
            self.reply_rst(req);
            return;
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", req.dst_port));
        match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => {
                let conn = Connection::new_peer(stream, self.guest_cid, req);
                self.insert(conn, (req.dst_port, req.src_port));
            }
            Err(e) => {
                tracing::debug!(path = ?path, "vsock: guest connect refused: {e}");
                self.reply_rst(req);
            }
        }
    }

    /// The next packet for the guest, RW payload written into `buf`.
    pub fn next_rx(&mut self, buf: &VolatileSlice<'_, ()>) -> Option<Header> {
        if let Some(h) = self.control.pop_front() {
            return Some(h);
        }
        while let Some(key) = self.rx_ready.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.queued = false;
            match conn.next_rx(buf) {
                RxOutcome::Packet(h) => {
                    self.settle(key, Verdict::Keep);
                    return Some(h);
                }
                RxOutcome::Nothing => self.settle(key, Verdict::Keep),
                RxOutcome::Reset => {
                    self.remove(key, true);
                    return self.control.pop_front();
                }
            }
        }
        None
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // The socket file is ours; leave nothing behind.
        if let Err(e) = std::fs::remove_file(&self.uds_path) {
            tracing::debug!(path = %self.uds_path.display(), "vsock: cannot remove socket: {e}");
        }
    }
}

/// Parses `CONNECT <port>` (without the newline).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let rest = line.strip_prefix(b"CONNECT ")?;
    let digits = rest.strip_suffix(b"\r").unwrap_or(rest);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Connects to a Unix stream socket without blocking: std's connect blocks while the
/// listener's backlog is full, which would stall every device on the event loop.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    let mut addr = libc::sockaddr_un {
        sun_family: libc::AF_UNIX as libc::sa_family_t,
        sun_path: [0; 108],
    };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let flags = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: socket(2) takes no pointers; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_UNIX, flags, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket just created here and owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un that outlives the call, and `len` is within it.
    let rc = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixStream::from(sock))
}
