//! The host end of the guest agent, shared by the real backends: one client per transport
//! (QEMU's virtio-serial chardev carries requests in sequence on one stream; kiln's vsock needs a
//! connection per request), every read and write bounded by the caller's deadline, and an abort
//! handle that makes a blocked request return at once when the VM is killed.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_agent_proto::client::{
    connect_unix, connect_vsock_uds, Client, ClientError, Output, StreamTimeouts,
};
use kiln_agent_proto::frame::FrameError;
use kiln_agent_proto::ExecRequest;

use super::{Gone, MachineError};

/// What went wrong talking to the guest agent once it was reached.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent answered the request with an error; its message, as the guest wrote it.
    #[error("{0}")]
    Refused(String),
    /// The conversation broke: a frame the agent should not have sent, a digest mismatch…
    #[error(transparent)]
    Protocol(ClientError),
}

/// A request's deadline, shared between the link and its stream.
type SharedDeadline = Arc<Mutex<Instant>>;

fn now_until(deadline: &SharedDeadline) -> Duration {
    let at = *deadline.lock().unwrap_or_else(|p| p.into_inner());
    at.saturating_duration_since(Instant::now())
}

/// A Unix stream whose every read and write gives up at the current request's deadline, whatever
/// timeout the client asks for (the client bounds each read; the host bounds the whole request).
pub struct DeadlineStream {
    inner: UnixStream,
    deadline: SharedDeadline,
}

impl DeadlineStream {
    fn left(&self) -> io::Result<Duration> {
        let left = now_until(&self.deadline);
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the request's deadline passed",
            ));
        }
        Ok(left)
    }
}

impl Read for DeadlineStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let t = self.left()?;
        self.inner.set_read_timeout(Some(t))?;
        self.inner.read(buf)
    }
}

impl Write for DeadlineStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let t = self.left()?;
        self.inner.set_write_timeout(Some(t))?;
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The client's per-read timeouts are ignored: the request's deadline is the tighter bound
/// (the runner gives a step its own timeout plus a little grace).
impl StreamTimeouts for DeadlineStream {}

/// How the host reaches the agent.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentTransport {
    /// A QEMU `-chardev socket` behind the virtio-serial port: one stream, requests in sequence.
    Serial(PathBuf),
    /// A Firecracker-style vsock Unix socket: `CONNECT <port>` per request.
    Vsock {
        /// The VMM's vsock Unix socket.
        uds: PathBuf,
        /// The agent's vsock port.
        port: u32,
    },
}

/// Stops every current and future request of a link; cloneable into a kill switch.
#[derive(Clone, Default)]
pub struct AgentAbort {
    aborted: Arc<AtomicBool>,
    current: Arc<Mutex<Option<UnixStream>>>,
}

impl AgentAbort {
    /// Shuts the current stream down (a blocked read returns at once) and refuses new requests.
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(stream) = current.as_ref() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::SeqCst)
    }

    fn track(&self, stream: &UnixStream) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = stream.try_clone().ok();
    }

    /// Forgets the tracked stream, closing this handle's copy of it. Without this a finished
    /// vsock request's connection stayed open until the next request: the agent never saw the
    /// hang-up it waits for before powering off, and its per-connection thread lingered.
    fn untrack(&self) {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }
}

/// The host end of one VM's agent.
pub struct AgentLink {
    transport: AgentTransport,
    deadline: SharedDeadline,
    shared: Option<Client<DeadlineStream>>,
    abort: AgentAbort,
    answered: bool,
}

impl AgentLink {
    /// A link that connects lazily, on the first request.
    pub fn new(transport: AgentTransport) -> AgentLink {
        AgentLink {
            transport,
            deadline: Arc::new(Mutex::new(Instant::now())),
            shared: None,
            abort: AgentAbort::default(),
            answered: false,
        }
    }

    /// The handle a kill switch uses to unblock requests.
    pub fn abort_handle(&self) -> AgentAbort {
        self.abort.clone()
    }

    /// Hands the agent over to another client: closes the shared stream, if any (the next
    /// request reconnects), and returns where the agent is.
    pub fn release(&mut self) -> AgentTransport {
        self.shared = None;
        self.abort.untrack();
        self.transport.clone()
    }

    /// Whether the agent has answered a request (so it is up and can power the guest off).
    pub fn answered(&self) -> bool {
        self.answered
    }

    fn connect(&self) -> Result<Client<DeadlineStream>, ClientError> {
        let left = now_until(&self.deadline).max(Duration::from_millis(1));
        let (stream, shared) = match &self.transport {
            AgentTransport::Serial(path) => (connect_unix(path)?, true),
            AgentTransport::Vsock { uds, port } => (connect_vsock_uds(uds, *port, left)?, false),
        };
        self.abort.track(&stream);
        let stream = DeadlineStream {
            inner: stream,
            deadline: self.deadline.clone(),
        };
        // The deadline bounds everything; the client's own 30 s I/O limit would only cut it short.
        let client = if shared {
            Client::new_shared(stream)
        } else {
            Client::new(stream)
        };
        Ok(client.io_timeout(None))
    }

    /// Runs one request with `deadline`, on the shared stream or a fresh connection.
    fn request<T>(
        &mut self,
        what: &str,
        deadline: Instant,
        f: impl FnOnce(&mut Client<DeadlineStream>) -> Result<T, ClientError>,
    ) -> Result<T, MachineError> {
        if self.abort.is_aborted() {
            return Err(Gone::Stopped {
                vm: "VM",
                during: None,
            }
            .into());
        }
        *self.deadline.lock().unwrap_or_else(|p| p.into_inner()) = deadline;
        let mut client = match self.shared.take() {
            Some(c) => c,
            None => self.connect().map_err(|e| self.classify(what, e))?,
        };
        let answer = f(&mut client);
        let shared = matches!(self.transport, AgentTransport::Serial(_));
        match &answer {
            // The agent answered (possibly with an error): the shared stream is in sync.
            Ok(_) | Err(ClientError::Agent { .. }) if shared => self.shared = Some(client),
            // One connection per request: hang up now (the agent waits for it after a shutdown).
            _ => {
                drop(client);
                self.abort.untrack();
            }
        }
        if answer.is_ok() {
            self.answered = true;
        }
        answer.map_err(|e| self.classify(what, e))
    }

    fn classify(&self, what: &str, e: ClientError) -> MachineError {
        if self.abort.is_aborted() {
            return Gone::Stopped {
                vm: "VM",
                during: Some(what.to_string()),
            }
            .into();
        }
        match e {
            ClientError::Agent { message, .. } => AgentError::Refused(message).into(),
            ClientError::Frame {
                source: FrameError::Timeout,
                ..
            }
            | ClientError::NoHello { .. }
                if now_until(&self.deadline).is_zero() =>
            {
                MachineError::Timeout {
                    what: what.to_string(),
                    after: None,
                }
            }
            ClientError::Frame {
                source: FrameError::Closed | FrameError::Truncated { .. },
                ..
            } => Gone::AgentClosed {
                during: what.to_string(),
            }
            .into(),
            ClientError::Connect { .. } | ClientError::VsockHandshake { .. } => {
                MachineError::Connect(e)
            }
            other => AgentError::Protocol(other).into(),
        }
    }

    /// Runs a command.
    pub fn exec(
        &mut self,
        request: &ExecRequest,
        deadline: Instant,
    ) -> Result<Output, MachineError> {
        let what = format!("exec {:?}", request.argv);
        self.request(&what, deadline, |c| c.exec(request))
    }

    /// Writes a guest file.
    pub fn put(
        &mut self,
        path: &str,
        mode: u32,
        data: &[u8],
        deadline: Instant,
    ) -> Result<(), MachineError> {
        self.request(&format!("put {path}"), deadline, |c| {
            c.put(path, mode, data)
        })
    }

    /// Reads a guest file.
    pub fn get(
        &mut self,
        path: &str,
        max_size: u64,
        deadline: Instant,
    ) -> Result<Vec<u8>, MachineError> {
        self.request(&format!("get {path}"), deadline, |c| {
            c.get(path, max_size).map(|f| f.data)
        })
    }

    /// Asks the agent to power the guest off.
    pub fn poweroff(&mut self, deadline: Instant) -> Result<(), MachineError> {
        self.request("shutdown", deadline, |c| c.shutdown(false))
    }

    /// Makes a guest restored from a snapshot a fresh one.
    pub fn resume(
        &mut self,
        request: &kiln_agent_proto::ResumeRequest,
        deadline: Instant,
    ) -> Result<(), MachineError> {
        self.request("resume", deadline, |c| c.resume(request))
    }
}

impl AgentTransport {
    /// A client for one request (or one `pty_exec`) on this transport, from another process than
    /// the harness: `kiln shell` and `kiln exec` reach a paused run's agent with it.
    pub fn connect(&self, timeout: Duration) -> Result<Client<UnixStream>, ClientError> {
        match self {
            AgentTransport::Serial(path) => {
                Ok(Client::new_shared(connect_unix(path)?).io_timeout(Some(timeout)))
            }
            AgentTransport::Vsock { uds, port } => {
                Ok(Client::new(connect_vsock_uds(uds, *port, timeout)?).io_timeout(Some(timeout)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_gives_up_at_its_deadline_and_abort_unblocks_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // A peer that accepts and never answers.
        let keep = std::thread::spawn(move || {
            let conns: Vec<_> = listener.incoming().take(2).collect();
            std::thread::sleep(Duration::from_secs(3));
            drop(conns);
        });
        let mut link = AgentLink::new(AgentTransport::Serial(path));
        let t = Instant::now();
        let err = link
            .exec(
                &ExecRequest::new(["true"]),
                Instant::now() + Duration::from_millis(300),
            )
            .unwrap_err();
        assert!(matches!(err, MachineError::Timeout { .. }), "{err:?}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

        let abort = link.abort_handle();
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            abort.abort();
        });
        let t = Instant::now();
        let err = link
            .get("/x", 10, Instant::now() + Duration::from_secs(60))
            .unwrap_err();
        assert!(matches!(err, MachineError::Gone(_)), "{err:?}");
        assert_eq!(
            err.to_string(),
            "the VM is gone: the VM was stopped during get /x"
        );
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        stopper.join().unwrap();
        keep.join().unwrap();
    }

    /// A fake VMM vsock socket with an agent behind it: answers CONNECT, the hello and one
    /// shutdown, then reports how long the host took to hang up (None: it never did).
    fn fake_vsock_agent(path: &std::path::Path) -> std::thread::JoinHandle<Option<Duration>> {
        use kiln_agent_proto::frame::{read_frame, write_frame};
        use kiln_agent_proto::message::Message;
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            assert_eq!(line, "CONNECT 1024\n");
            let mut w = stream.try_clone().unwrap();
            w.write_all(b"OK 1\n").unwrap();
            match read_frame(&mut reader).unwrap() {
                hello @ Message::Hello { .. } => write_frame(&mut w, &hello).unwrap(),
                other => panic!("expected hello, got {other:?}"),
            }
            assert!(matches!(
                read_frame(&mut reader).unwrap(),
                Message::Shutdown { reboot: false }
            ));
            write_frame(&mut w, &Message::Ok).unwrap();
            let answered = Instant::now();
            stream
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            let mut buf = [0u8; 16];
            match reader.read(&mut buf) {
                Ok(0) => Some(answered.elapsed()),
                _ => None,
            }
        })
    }

    #[test]
    fn after_a_vsock_shutdown_request_the_host_hangs_up_so_the_agent_can_power_off() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let agent = fake_vsock_agent(&uds);
        let mut link = AgentLink::new(AgentTransport::Vsock { uds, port: 1024 });
        link.poweroff(Instant::now() + Duration::from_secs(10))
            .expect("the agent agreed");
        // The link (and its abort handle) stay alive, as in a running machine.
        let hung_up = agent.join().unwrap();
        assert!(
            hung_up.is_some_and(|t| t < Duration::from_secs(1)),
            "the host kept the connection open after the shutdown answer: {hung_up:?}"
        );
        drop(link);
    }
}
