//! One request session over any byte stream: hello exchange, one request, its answers.
//! Transports call [`serve_session`] once per connection, or [`serve_stream`] on a shared stream.

use std::io::{Read, Write};

use std::os::fd::AsRawFd;

use kiln_agent_proto::{
    read_frame, write_frame, FrameError, Message, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

use crate::files::FilePolicy;
use crate::{exec, pty};

/// What the agent needs to serve requests.
#[derive(Debug, Clone, Default)]
pub struct Agent {
    /// Where put/get may touch files.
    pub files: FilePolicy,
}

/// How a session (or a shared stream) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A request was answered (or refused with an `Error` reply).
    Served,
    /// A shared stream reached end of file (the host side disconnected).
    Closed,
    /// The client asked for a shutdown and was answered `Ok`; the caller powers off.
    Shutdown {
        /// Reboot instead of powering off.
        reboot: bool,
    },
}

/// Why a session ended without a request being answered.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// A frame could not be read or written.
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// The client speaks a protocol version this agent does not.
    #[error(
        "unsupported protocol version {got}; this agent speaks {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}"
    )]
    Version {
        /// The client's version.
        got: u32,
    },
    /// The session did not start with hello.
    #[error("expected hello first, got {got}")]
    NotHello {
        /// The message type that arrived.
        got: &'static str,
    },
}

impl SessionError {
    /// Whether the stream is still at a frame boundary, so a shared stream can go on.
    pub fn stream_in_sync(&self) -> bool {
        match self {
            SessionError::Frame(e) => e.stream_in_sync(),
            SessionError::Version { .. } | SessionError::NotHello { .. } => true,
        }
    }
}

/// Serve one session: read hello, answer it, read one request and answer it.
/// Protocol errors are answered with an `Error` message (when the stream still works) and returned.
pub fn serve_session<S: Read + Write + AsRawFd>(
    stream: &mut S,
    agent: &Agent,
) -> Result<Outcome, SessionError> {
    let (version, nonce) = match read_frame(stream) {
        Ok(Message::Hello { version, nonce })
            if (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) =>
        {
            (version, nonce)
        }
        Ok(Message::Hello { version, .. }) => {
            return Err(refuse(stream, SessionError::Version { got: version }))
        }
        Ok(other) => return Err(refuse(stream, SessionError::NotHello { got: other.kind() })),
        Err(FrameError::Closed) => return Err(FrameError::Closed.into()),
        Err(e) => return Err(refuse(stream, e.into())),
    };
    // The client's own version back: a shared-stream client looks for exactly that encoding.
    write_frame(stream, &Message::Hello { version, nonce })?;
    let request = match read_frame(stream) {
        Ok(request) => request,
        Err(FrameError::Closed) => return Err(FrameError::Closed.into()),
        Err(e) => return Err(refuse(stream, e.into())),
    };
    match request {
        Message::Exec(exec) => match exec::run(&exec, |m| write_frame(stream, m)) {
            Ok(()) => {}
            Err(exec::ExecError::Client { source, .. }) => return Err(source.into()),
            Err(e) => reply_error(stream, e.to_string())?,
        },
        Message::PtyExec(request) => match pty::run(&request, stream) {
            Ok(()) => {}
            Err(pty::PtyError::Client { source, .. }) => return Err(source.into()),
            Err(e) => reply_error(stream, e.to_string())?,
        },
        Message::Put(put) => match agent.files.put(&put) {
            Ok(()) => write_frame(stream, &Message::Ok)?,
            Err(e) => reply_error(stream, e.to_string())?,
        },
        Message::Get(get) => match agent.files.get(&get) {
            Ok(data) => write_frame(stream, &data)?,
            Err(e) => reply_error(stream, e.to_string())?,
        },
        Message::Resume(req) => match crate::resume::resume(&req) {
            Ok(()) => write_frame(stream, &Message::Ok)?,
            Err(e) => reply_error(stream, e)?,
        },
        Message::Shutdown { reboot } => {
            write_frame(stream, &Message::Ok)?;
            return Ok(Outcome::Shutdown { reboot });
        }
        other => reply_error(
            stream,
            format!(
                "expected exec, pty_exec, put, get, resume or shutdown, got {}",
                other.kind()
            ),
        )?,
    }
    Ok(Outcome::Served)
}

/// Serve sessions one after another on a shared stream (virtio-serial) until end of file, a
/// shutdown request, or a framing error that loses the frame boundary (then input is discarded
/// up to end of file, which comes when the host side disconnects).
pub fn serve_stream<S: Read + Write + AsRawFd>(stream: &mut S, agent: &Agent) -> Outcome {
    loop {
        match serve_session(stream, agent) {
            Ok(Outcome::Served) => {}
            Ok(outcome) => return outcome,
            Err(SessionError::Frame(FrameError::Closed)) => return Outcome::Closed,
            Err(e) if e.stream_in_sync() => log_session_error(&e),
            Err(e) => {
                log_session_error(&e);
                discard_to_eof(stream);
                return Outcome::Closed;
            }
        }
    }
}

/// Report a session error on the agent's stderr (the console), except a peer that just left.
pub fn log_session_error(e: &SessionError) {
    if !matches!(e, SessionError::Frame(FrameError::Closed)) {
        eprintln!("kiln-agent: session: {e}");
    }
}

fn discard_to_eof<S: Read>(stream: &mut S) {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Tell the client why the session ends (best effort: the stream may be what broke) and hand the
/// error back.
fn refuse<S: Write>(stream: &mut S, error: SessionError) -> SessionError {
    let _ = reply_error(stream, error.to_string());
    error
}

fn reply_error<S: Write>(stream: &mut S, message: String) -> Result<(), FrameError> {
    write_frame(stream, &Message::Error { message })
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
