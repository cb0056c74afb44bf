//! The host-side agent client: a typed API over any `Read + Write` stream, and connectors for
//! the two transports (a Firecracker-style vsock Unix socket, a QEMU virtio-serial chardev socket).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::frame::{encode_frame, read_frame, write_frame, FrameError};
use crate::message::{ExecRequest, GetRequest, Message, PtyExecRequest, PutRequest, MAX_FILE_LEN};
use crate::{sha256_hex, MIN_PROTOCOL_VERSION};

/// Extra time the client waits beyond an exec's own timeout (the agent kills, reaps and reports).
pub const EXEC_GRACE: Duration = Duration::from_secs(10);

/// Default limit on the output the client collects from one exec.
pub const DEFAULT_MAX_OUTPUT: usize = 256 * 1024 * 1024;

/// Default timeout for connecting, the hello exchange and non-exec requests.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(30);

/// How many bytes a shared-stream client skips looking for its hello reply before giving up.
const MAX_RESYNC_BYTES: usize = 64 * 1024 * 1024;

/// Why an agent request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be connected.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The vsock multiplexer refused or mangled the `CONNECT` handshake.
    #[error("vsock CONNECT {port} through {path} failed: {reason}")]
    VsockHandshake {
        /// The vsock Unix socket path.
        path: PathBuf,
        /// The guest port.
        port: u32,
        /// What went wrong.
        reason: String,
    },
    /// Timeouts could not be set on the stream.
    #[error("cannot set stream timeouts: {0}")]
    Timeouts(#[source] io::Error),
    /// A frame could not be sent or received.
    #[error("{op}: {source}")]
    Frame {
        /// The request.
        op: &'static str,
        /// The framing error.
        source: FrameError,
    },
    /// The agent answered with an error.
    #[error("agent refused {op}: {message}")]
    Agent {
        /// The request.
        op: &'static str,
        /// The agent's message.
        message: String,
    },
    /// The agent sent a message that does not fit the request's sequence.
    #[error("{op}: expected {expected} from the agent, got {got}")]
    Unexpected {
        /// The request.
        op: &'static str,
        /// What the protocol allows here.
        expected: &'static str,
        /// What arrived.
        got: String,
    },
    /// A shared-stream client never saw its hello reply.
    #[error("hello: no reply with nonce {nonce} in {scanned} bytes from the agent")]
    NoHello {
        /// The nonce sent.
        nonce: u64,
        /// Bytes skipped looking for it.
        scanned: usize,
    },
    /// A file arrived with a digest that does not match its data.
    #[error("get {path}: sha256 mismatch: agent sent {expected}, data hashes to {actual}")]
    Sha256Mismatch {
        /// The guest path.
        path: String,
        /// The digest the agent sent.
        expected: String,
        /// The digest of the data received.
        actual: String,
    },
    /// A file is too large for one `Put`.
    #[error("put {path}: {len} bytes exceed the {max}-byte file limit")]
    FileTooLarge {
        /// The guest path.
        path: String,
        /// The file size.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// An exec produced more output than the client keeps.
    #[error("exec {program}: output exceeds the {max}-byte limit")]
    OutputTooLarge {
        /// `argv[0]`.
        program: String,
        /// The limit.
        max: usize,
    },
    /// A per-connection client was asked for a second request.
    #[error(
        "this connection already carried a request; connect again (one request per connection)"
    )]
    Reused,
}

/// Streams that can bound how long a read or write blocks (sockets can; pipes in tests need not).
pub trait StreamTimeouts {
    /// Bound each read; `None` blocks forever.
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        let _ = timeout;
        Ok(())
    }
    /// Bound each write; `None` blocks forever.
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        let _ = timeout;
        Ok(())
    }
}

impl StreamTimeouts for UnixStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, timeout)
    }
}

impl StreamTimeouts for TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, timeout)
    }
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code when it exited normally.
    pub code: Option<i32>,
    /// Signal number when a signal killed it.
    pub signal: Option<i32>,
    /// Whether the agent killed it at its timeout.
    pub timed_out: bool,
}

/// Everything an exec produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Collected standard output.
    pub stdout: Vec<u8>,
    /// Collected standard error.
    pub stderr: Vec<u8>,
    /// Exit code when it exited normally.
    pub code: Option<i32>,
    /// Signal number when a signal killed it.
    pub signal: Option<i32>,
    /// Whether the agent killed it at its timeout.
    pub timed_out: bool,
}

impl Output {
    /// Whether the command exited with code 0 within its timeout.
    pub fn success(&self) -> bool {
        self.code == Some(0) && !self.timed_out
    }
}

/// A file read from the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    /// Contents (digest already verified).
    pub data: Vec<u8>,
    /// Permission bits.
    pub mode: u32,
}

/// A client for one agent stream.
///
/// On a per-connection transport (vsock, or any socket the agent accepts on) each request needs a
/// fresh connection; on a shared byte stream (virtio-serial) one client carries requests one after
/// another and skips stale bytes left by an abandoned request by looking for its own hello reply.
pub struct Client<S> {
    stream: S,
    shared: bool,
    used: bool,
    io_timeout: Option<Duration>,
    max_output: usize,
}

impl<S: Read + Write + StreamTimeouts> Client<S> {
    /// A client for a stream carrying one request (vsock, Unix socket).
    pub fn new(stream: S) -> Self {
        Client {
            stream,
            shared: false,
            used: false,
            io_timeout: Some(DEFAULT_IO_TIMEOUT),
            max_output: DEFAULT_MAX_OUTPUT,
        }
    }

    /// A client for a byte stream that carries requests in sequence (virtio-serial).
    pub fn new_shared(stream: S) -> Self {
        Client {
            shared: true,
            ..Client::new(stream)
        }
    }

    /// Set the timeout for the hello exchange, put, get and shutdown (`None`: wait forever).
    pub fn io_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.io_timeout = timeout;
        self
    }

    /// Set the most output bytes (stdout plus stderr) `exec` collects.
    pub fn max_output(mut self, bytes: usize) -> Self {
        self.max_output = bytes;
        self
    }

    /// The underlying stream.
    pub fn into_inner(self) -> S {
        self.stream
    }

    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.stream
            .set_read_timeout(timeout)
            .map_err(ClientError::Timeouts)
    }

    /// Exchange hellos and send `request`.
    fn start(&mut self, op: &'static str, request: &Message) -> Result<(), ClientError> {
        if self.used && !self.shared {
            return Err(ClientError::Reused);
        }
        self.used = true;
        self.set_read_timeout(self.io_timeout)?;
        self.stream
            .set_write_timeout(self.io_timeout)
            .map_err(ClientError::Timeouts)?;
        let nonce = new_nonce();
        // The lowest version that has the request: an agent older than the request's version
        // refuses it, every other request keeps working with it.
        let version = request.min_version();
        let hello = Message::Hello { version, nonce };
        write_frame(&mut self.stream, &hello).map_err(|source| ClientError::Frame {
            op: "hello",
            source,
        })?;
        if self.shared {
            self.skip_to_hello_reply(version, nonce)?;
        } else {
            match self.read("hello")? {
                Message::Hello { nonce: n, .. } if n == nonce => {}
                Message::Error { message } => {
                    return Err(ClientError::Agent {
                        op: "hello",
                        message,
                    })
                }
                other => return Err(unexpected("hello", "hello with our nonce", &other)),
            }
        }
        write_frame(&mut self.stream, request).map_err(|source| ClientError::Frame { op, source })
    }

    /// Discard bytes until the exact encoding of the agent's hello reply to `nonce`.
    fn skip_to_hello_reply(&mut self, version: u32, nonce: u64) -> Result<(), ClientError> {
        let encode = |message: &Message| {
            encode_frame(message).map_err(|source| ClientError::Frame {
                op: "hello",
                source,
            })
        };
        let expected = encode(&Message::Hello { version, nonce })?;
        // An agent that predates `version` refuses the hello with these exact bytes and goes on
        // serving the stream: recognise them, or the client would wait for a reply that never
        // comes. (Only version 1 agents exist before this client.)
        let refusal_text = format!(
            "unsupported protocol version {version}; this agent speaks {MIN_PROTOCOL_VERSION}"
        );
        let refusal = if version > MIN_PROTOCOL_VERSION {
            encode(&Message::Error {
                message: refusal_text.clone(),
            })?
        } else {
            Vec::new()
        };
        let keep = expected.len().max(refusal.len());
        let mut window: Vec<u8> = Vec::with_capacity(keep);
        let mut scanned = 0usize;
        let mut byte = [0u8; 1];
        while !window.ends_with(&expected) {
            if !refusal.is_empty() && window.ends_with(&refusal) {
                return Err(ClientError::Agent {
                    op: "hello",
                    message: refusal_text,
                });
            }
            if scanned >= MAX_RESYNC_BYTES {
                return Err(ClientError::NoHello { nonce, scanned });
            }
            match self.stream.read(&mut byte) {
                Ok(0) => return Err(ClientError::NoHello { nonce, scanned }),
                Ok(_) => {
                    scanned += 1;
                    if window.len() == keep {
                        window.remove(0);
                    }
                    window.push(byte[0]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(ClientError::NoHello { nonce, scanned })
                }
                Err(e) => {
                    return Err(ClientError::Frame {
                        op: "hello",
                        source: FrameError::Io(e),
                    })
                }
            }
        }
        Ok(())
    }

    fn read(&mut self, op: &'static str) -> Result<Message, ClientError> {
        read_frame(&mut self.stream).map_err(|source| ClientError::Frame { op, source })
    }

    /// Run a command, passing each output chunk to `on_output` as it arrives.
    pub fn exec_streaming(
        &mut self,
        request: &ExecRequest,
        mut on_output: impl FnMut(OutputStream, &[u8]),
    ) -> Result<ExitInfo, ClientError> {
        self.start("exec", &Message::Exec(request.clone()))?;
        let read_timeout = request
            .timeout_ms
            .map(|ms| Duration::from_millis(ms).saturating_add(EXEC_GRACE));
        self.set_read_timeout(read_timeout)?;
        loop {
            match self.read("exec")? {
                Message::Stdout { data } => on_output(OutputStream::Stdout, &data),
                Message::Stderr { data } => on_output(OutputStream::Stderr, &data),
                Message::Exited {
                    code,
                    signal,
                    timed_out,
                } => {
                    return Ok(ExitInfo {
                        code,
                        signal,
                        timed_out,
                    })
                }
                Message::Error { message } => {
                    return Err(ClientError::Agent {
                        op: "exec",
                        message,
                    })
                }
                other => {
                    return Err(unexpected(
                        "exec",
                        "stdout, stderr, exited or error",
                        &other,
                    ))
                }
            }
        }
    }

    /// Run a command and collect its output.
    pub fn exec(&mut self, request: &ExecRequest) -> Result<Output, ClientError> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let mut total = 0usize;
        let mut overflow = false;
        let max = self.max_output;
        let exit = self.exec_streaming(request, |which, data| {
            total = total.saturating_add(data.len());
            if total > max {
                overflow = true;
                return;
            }
            match which {
                OutputStream::Stdout => stdout.extend_from_slice(data),
                OutputStream::Stderr => stderr.extend_from_slice(data),
            }
        })?;
        if overflow {
            return Err(ClientError::OutputTooLarge {
                program: request.argv.first().cloned().unwrap_or_default(),
                max,
            });
        }
        Ok(Output {
            stdout,
            stderr,
            code: exit.code,
            signal: exit.signal,
            timed_out: exit.timed_out,
        })
    }

    /// Write `data` to `path` in the guest with permission bits `mode`.
    pub fn put(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<(), ClientError> {
        let len = data.len() as u64;
        if len > MAX_FILE_LEN {
            return Err(ClientError::FileTooLarge {
                path: path.to_owned(),
                len,
                max: MAX_FILE_LEN,
            });
        }
        let request = Message::Put(PutRequest {
            path: path.to_owned(),
            mode,
            data: data.to_vec(),
            sha256: sha256_hex(data),
        });
        self.start("put", &request)?;
        self.expect_ok("put")
    }

    /// Read `path` from the guest, refusing files over `max_size` bytes.
    pub fn get(&mut self, path: &str, max_size: u64) -> Result<RemoteFile, ClientError> {
        let request = Message::Get(GetRequest {
            path: path.to_owned(),
            max_size,
        });
        self.start("get", &request)?;
        match self.read("get")? {
            Message::FileData { data, mode, sha256 } => {
                let actual = sha256_hex(&data);
                if !actual.eq_ignore_ascii_case(&sha256) {
                    return Err(ClientError::Sha256Mismatch {
                        path: path.to_owned(),
                        expected: sha256,
                        actual,
                    });
                }
                Ok(RemoteFile { data, mode })
            }
            Message::Error { message } => Err(ClientError::Agent { op: "get", message }),
            other => Err(unexpected("get", "file_data or error", &other)),
        }
    }

    /// Ask the agent to power the guest off (or reboot it); returns once the agent agreed.
    pub fn shutdown(&mut self, reboot: bool) -> Result<(), ClientError> {
        self.start("shutdown", &Message::Shutdown { reboot })?;
        self.expect_ok("shutdown")
    }

    /// Make a guest restored from a snapshot a fresh one (see [`Message::Resume`]).
    pub fn resume(&mut self, request: &crate::ResumeRequest) -> Result<(), ClientError> {
        self.start("resume", &Message::Resume(request.clone()))?;
        self.expect_ok("resume")
    }

    fn expect_ok(&mut self, op: &'static str) -> Result<(), ClientError> {
        match self.read(op)? {
            Message::Ok => Ok(()),
            Message::Error { message } => Err(ClientError::Agent { op, message }),
            other => Err(unexpected(op, "ok or error", &other)),
        }
    }
}

impl Client<UnixStream> {
    /// Start `request` on a pseudo-terminal in the guest (protocol version 2). The connection
    /// then belongs to the returned session: input and resizes go in through [`PtySession::input`],
    /// output and the exit status come out of [`PtySession::next_event`], with no timeouts (an
    /// interactive shell may sit idle for hours).
    pub fn pty_exec(mut self, request: &PtyExecRequest) -> Result<PtySession, ClientError> {
        self.start("pty_exec", &Message::PtyExec(request.clone()))?;
        self.set_read_timeout(None)?;
        self.stream
            .set_write_timeout(None)
            .map_err(ClientError::Timeouts)?;
        Ok(PtySession {
            stream: self.stream,
        })
    }
}

/// What a pty session produced next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PtyEvent {
    /// Terminal output (the command's stdout and stderr, as a terminal interleaves them).
    Output(Vec<u8>),
    /// The command ended; the session is over.
    Exited(ExitInfo),
}

/// The reading half of a running `pty_exec`.
pub struct PtySession {
    stream: UnixStream,
}

impl PtySession {
    /// A writer for the terminal's input, usable from another thread.
    pub fn input(&self) -> Result<PtyInput, ClientError> {
        let stream = self.stream.try_clone().map_err(|e| ClientError::Frame {
            op: "pty_exec",
            source: FrameError::Io(e),
        })?;
        Ok(PtyInput { stream })
    }

    /// The next output chunk or the exit status; blocks until one arrives.
    pub fn next_event(&mut self) -> Result<PtyEvent, ClientError> {
        let op = "pty_exec";
        match read_frame(&mut self.stream).map_err(|source| ClientError::Frame { op, source })? {
            Message::Stdout { data } | Message::Stderr { data } => Ok(PtyEvent::Output(data)),
            Message::Exited {
                code,
                signal,
                timed_out,
            } => Ok(PtyEvent::Exited(ExitInfo {
                code,
                signal,
                timed_out,
            })),
            Message::Error { message } => Err(ClientError::Agent { op, message }),
            other => Err(unexpected(op, "stdout, exited or error", &other)),
        }
    }
}

/// The writing half of a running `pty_exec`.
pub struct PtyInput {
    stream: UnixStream,
}

impl PtyInput {
    /// Bytes typed at the terminal (Ctrl-C is byte 3: the guest's line discipline turns it into
    /// SIGINT for the foreground job).
    pub fn send(&mut self, data: &[u8]) -> Result<(), ClientError> {
        let message = Message::Stdin {
            data: data.to_vec(),
        };
        write_frame(&mut self.stream, &message).map_err(|source| ClientError::Frame {
            op: "pty_exec input",
            source,
        })
    }

    /// End the session from the host side: the agent hangs the terminal up and kills the command.
    pub fn hang_up(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// The terminal is now `rows` x `cols`.
    pub fn resize(&mut self, rows: u16, cols: u16) -> Result<(), ClientError> {
        write_frame(&mut self.stream, &Message::Resize { rows, cols }).map_err(|source| {
            ClientError::Frame {
                op: "pty_exec resize",
                source,
            }
        })
    }
}

fn unexpected(op: &'static str, expected: &'static str, got: &Message) -> ClientError {
    ClientError::Unexpected {
        op,
        expected,
        got: got.kind().to_owned(),
    }
}

/// A nonce unlikely to appear in stale bytes: std's per-process random keys mixed with a counter.
fn new_nonce() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    // Never 0, which the protocol reserves for "no nonce".
    hasher.finish().max(1)
}

/// Connect to a guest vsock port through a Firecracker-style Unix socket: send `CONNECT <port>\n`,
/// expect `OK <host port>\n`; the returned stream then carries the guest port's bytes.
pub fn connect_vsock_uds(
    uds_path: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, ClientError> {
    let mut stream = connect_unix(uds_path)?;
    let handshake_error = |reason: String| ClientError::VsockHandshake {
        path: uds_path.to_owned(),
        port,
        reason,
    };
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(ClientError::Timeouts)?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| handshake_error(format!("sending CONNECT: {e}")))?;
    // Byte by byte so no guest data after the reply line is consumed here.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    let started = Instant::now();
    loop {
        match stream.read(&mut byte) {
            Ok(0) => {
                return Err(handshake_error(format!(
                    "connection closed after {:?} (is the agent listening on port {port}?)",
                    String::from_utf8_lossy(&line)
                )))
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() >= 64 => {
                return Err(handshake_error(format!(
                    "reply line too long: {:?}",
                    String::from_utf8_lossy(&line)
                )))
            }
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(handshake_error(format!(
                    "reading the reply after {:?}: {e}",
                    started.elapsed()
                )))
            }
        }
    }
    let reply = String::from_utf8_lossy(&line);
    let host_port = reply.strip_prefix("OK ").map(|p| p.trim().parse::<u32>());
    match host_port {
        Some(Ok(_)) => Ok(stream),
        _ => Err(handshake_error(format!(
            "expected \"OK <port>\", got {reply:?}"
        ))),
    }
}

/// Connect to a Unix socket (a QEMU `-chardev socket` backing the agent's virtio-serial port, or a
/// socket the agent's stream is forwarded to). Use [`Client::new_shared`] for virtio-serial.
pub fn connect_unix(path: &Path) -> Result<UnixStream, ClientError> {
    UnixStream::connect(path).map_err(|source| ClientError::Connect {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::thread;

    fn serve_once(listener: UnixListener, reply: &'static [u8]) -> thread::JoinHandle<Vec<u8>> {
        thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut got = Vec::new();
            let mut byte = [0u8; 1];
            while conn.read(&mut byte).expect("read") == 1 {
                got.push(byte[0]);
                if byte[0] == b'\n' {
                    break;
                }
            }
            conn.write_all(reply).expect("write");
            got
        })
    }

    #[test]
    fn vsock_handshake_sends_connect_and_accepts_ok() {
        let dir = tempdir();
        let path = dir.join("v.sock");
        let server = serve_once(
            UnixListener::bind(&path).expect("bind"),
            b"OK 1073741824\nrest",
        );
        let mut stream = connect_vsock_uds(&path, 1024, Duration::from_secs(5)).expect("connects");
        let mut rest = [0u8; 4];
        stream.read_exact(&mut rest).expect("guest bytes follow");
        assert_eq!(&rest, b"rest");
        assert_eq!(server.join().expect("server"), b"CONNECT 1024\n");
        std::fs::remove_dir_all(dir).expect("cleanup");
    }

    #[test]
    fn vsock_handshake_failure_names_port_and_reply() {
        let dir = tempdir();
        let path = dir.join("v.sock");
        let server = serve_once(UnixListener::bind(&path).expect("bind"), b"");
        let err = connect_vsock_uds(&path, 52, Duration::from_secs(5)).expect_err("refused");
        let text = err.to_string();
        assert!(
            text.contains("CONNECT 52") && text.contains("v.sock"),
            "{text}"
        );
        server.join().expect("server");
        let err = connect_unix(&dir.join("missing.sock")).expect_err("no socket");
        assert!(err.to_string().contains("missing.sock"), "{err}");
        std::fs::remove_dir_all(dir).expect("cleanup");
    }

    #[test]
    fn shared_client_skips_stale_bytes_before_its_hello_reply() {
        let (client_end, mut agent_end) = UnixStream::pair().expect("pair");
        let mut client = Client::new_shared(client_end);
        let agent = thread::spawn(move || {
            let Message::Hello { nonce, .. } = read_frame(&mut agent_end).expect("hello") else {
                panic!("first frame is not hello");
            };
            // Stale output of an abandoned request, cut mid-frame.
            let stale = encode_frame(&Message::Stdout { data: vec![7; 100] }).expect("encodes");
            agent_end.write_all(&stale[..37]).expect("stale");
            write_frame(&mut agent_end, &Message::Hello { version: 1, nonce }).expect("reply");
            assert!(matches!(
                read_frame(&mut agent_end),
                Ok(Message::Shutdown { reboot: false })
            ));
            write_frame(&mut agent_end, &Message::Ok).expect("ok");
        });
        client.shutdown(false).expect("shutdown acknowledged");
        agent.join().expect("agent");
    }

    #[test]
    fn a_shared_client_hears_a_version_1_agent_refuse_pty_exec_at_once() {
        let (client_end, mut agent_end) = UnixStream::pair().expect("pair");
        let agent = thread::spawn(move || {
            let hello = read_frame(&mut agent_end).expect("hello");
            assert!(
                matches!(hello, Message::Hello { version: 2, .. }),
                "{hello:?}"
            );
            // What a version 1 agent answers, and then it waits for the next session.
            let message = "unsupported protocol version 2; this agent speaks 1".to_string();
            write_frame(&mut agent_end, &Message::Error { message }).expect("refusal");
            agent_end
        });
        let started = Instant::now();
        let err = match Client::new_shared(client_end).pty_exec(&PtyExecRequest::default()) {
            Err(e) => e,
            Ok(_) => panic!("a version 1 agent cannot run pty_exec"),
        };
        assert!(
            matches!(&err, ClientError::Agent { message, .. }
                if message == "unsupported protocol version 2; this agent speaks 1"),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(agent.join().expect("agent"));
    }

    #[test]
    fn per_connection_client_refuses_a_second_request() {
        let (client_end, mut agent_end) = UnixStream::pair().expect("pair");
        let agent = thread::spawn(move || {
            let Ok(Message::Hello { nonce, .. }) = read_frame(&mut agent_end) else {
                panic!("first frame is not hello");
            };
            write_frame(&mut agent_end, &Message::Hello { version: 1, nonce }).expect("reply");
            let _ = read_frame(&mut agent_end);
            write_frame(&mut agent_end, &Message::Ok).expect("ok");
        });
        let mut client = Client::new(client_end);
        client.shutdown(true).expect("first");
        assert!(matches!(client.shutdown(true), Err(ClientError::Reused)));
        agent.join().expect("agent");
    }

    fn tempdir() -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kiln-proto-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("tempdir");
        dir
    }
}
