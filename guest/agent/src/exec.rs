//! Running one command: spawn it in its own process group, feed stdin, stream stdout/stderr as
//! they arrive, enforce the timeout by killing the group, and report how it ended.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use kiln_agent_proto::{ExecRequest, FrameError, Message};

use crate::children;

/// Largest output chunk sent in one frame.
const CHUNK_LEN: usize = 64 * 1024;

/// After the command exits, how long the agent keeps reading output that is still arriving (a
/// background process may hold the pipes open forever; it is not waited for).
const DRAIN_QUIET: Duration = Duration::from_millis(200);

/// After a SIGKILL, how long the agent waits for the exit status before reporting without one.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// Why a command could not be run to completion.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// `argv` was empty.
    #[error("exec: argv is empty")]
    EmptyArgv,
    /// The working directory does not exist.
    #[error("exec {program:?}: cwd {cwd:?} is not a directory")]
    BadCwd {
        /// `argv[0]`.
        program: String,
        /// The requested directory.
        cwd: String,
    },
    /// The program could not be started.
    #[error("cannot execute {program:?}: {source}")]
    Spawn {
        /// `argv[0]`.
        program: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Output could not be sent; the command was killed.
    #[error("exec {program:?}: client went away: {source}")]
    Client {
        /// `argv[0]`.
        program: String,
        /// The framing error.
        source: FrameError,
    },
}

enum Event {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Eof,
    Exited(libc::c_int),
}

/// Run `request`, sending `Stdout`/`Stderr` chunks and the final `Exited` through `emit`.
pub fn run(
    request: &ExecRequest,
    mut emit: impl FnMut(&Message) -> Result<(), FrameError>,
) -> Result<(), ExecError> {
    let program = request.argv.first().ok_or(ExecError::EmptyArgv)?.clone();
    let mut command = Command::new(&program);
    command
        .args(&request.argv[1..])
        .envs(request.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some(cwd) = &request.cwd {
        if !Path::new(cwd).is_dir() {
            return Err(ExecError::BadCwd {
                program,
                cwd: cwd.clone(),
            });
        }
        command.current_dir(cwd);
    }

    let (tx, rx) = mpsc::channel();
    let exit_tx = tx.clone();
    let mut child = children::spawn(&mut command, move |status| {
        let _ = exit_tx.send(Event::Exited(status));
    })
    .map_err(|source| ExecError::Spawn {
        program: program.clone(),
        source,
    })?;
    // The child leads its own process group, so its pid names the group.
    let pgid = child.id() as libc::pid_t;

    if let Some(mut stdin) = child.stdin.take() {
        let data = request.stdin.clone();
        // A command that never reads stdin must not block the agent: write from a thread, which
        // ends with EPIPE when the command exits.
        thread::spawn(move || {
            let _ = stdin.write_all(&data);
        });
    }
    if let Some(stdout) = child.stdout.take() {
        spawn_reader(stdout, Event::Stdout, tx.clone());
    }
    if let Some(stderr) = child.stderr.take() {
        spawn_reader(stderr, Event::Stderr, tx.clone());
    }
    drop(tx);

    let deadline = request
        .timeout_ms
        .map(|ms| Instant::now() + Duration::from_millis(ms));
    let mut timed_out = false;
    let mut status = None;
    let mut open_streams = 2;
    let mut drain_until: Option<Instant> = None;
    let mut kill_deadline: Option<Instant> = None;

    while status.is_none() || open_streams > 0 {
        let wake = if status.is_some() {
            drain_until
        } else if timed_out {
            kill_deadline
        } else {
            deadline
        };
        let event = match wake {
            Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        let chunk = match event {
            Ok(Event::Stdout(data)) => Message::Stdout { data },
            Ok(Event::Stderr(data)) => Message::Stderr { data },
            Ok(Event::Eof) => {
                open_streams -= 1;
                continue;
            }
            Ok(Event::Exited(raw)) => {
                status = Some(raw);
                drain_until = Some(Instant::now() + DRAIN_QUIET);
                continue;
            }
            Err(RecvTimeoutError::Timeout) if status.is_none() && !timed_out => {
                timed_out = true;
                kill_group(pgid);
                kill_deadline = Some(Instant::now() + KILL_GRACE);
                continue;
            }
            // Drain time is over, the killed command never reported, or every sender is gone.
            Err(_) => break,
        };
        if status.is_some() {
            drain_until = Some(Instant::now() + DRAIN_QUIET);
        }
        if let Err(source) = emit(&chunk) {
            if status.is_none() {
                kill_group(pgid);
            }
            return Err(ExecError::Client { program, source });
        }
    }

    let (code, signal) = status.map_or((None, None), children::decode_status);
    emit(&Message::Exited {
        code,
        signal,
        timed_out,
    })
    .map_err(|source| ExecError::Client { program, source })
}

fn spawn_reader<R: Read + Send + 'static>(
    mut pipe: R,
    wrap: fn(Vec<u8>) -> Event,
    tx: mpsc::Sender<Event>,
) {
    thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK_LEN];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx.send(wrap(buf[..n].to_vec())).is_err() {
                        // The exec finished without us (drain time over); stop reading so a
                        // background writer gets EPIPE instead of filling a pipe nobody reads.
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = tx.send(Event::Eof);
    });
}

fn kill_group(pgid: libc::pid_t) {
    // SAFETY: kill(2) with a negative pid signals that process group; no memory is involved.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}
