//! Running one command on a pseudo-terminal (`pty_exec`): the command leads a new session whose
//! controlling terminal is the pty, so the guest's line discipline does what a terminal does —
//! Ctrl-C (byte 3 from the host) interrupts the foreground job, job control works, a resize
//! delivers SIGWINCH. One thread polls the client stream and the pty master: input and resizes go
//! in, output comes back as `stdout` chunks, and `exited` ends the session.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln_agent_proto::{read_frame, write_frame, FrameError, Message, PtyExecRequest};

use crate::children;

/// Largest output chunk sent in one frame.
const CHUNK_LEN: usize = 64 * 1024;

/// After the command exits, how long output may stay quiet before `exited` is sent (a background
/// job may hold the terminal open forever; it is not waited for).
const DRAIN_QUIET: Duration = Duration::from_millis(200);

/// How often the loop wakes to notice the command's exit when nothing else happens.
const TICK_MS: libc::c_int = 50;

/// Most input bytes buffered for a command that does not read its terminal; past it the agent
/// stops reading the client until the command catches up.
const MAX_PENDING_INPUT: usize = 1024 * 1024;

/// Why a pty command could not be run to completion.
#[derive(Debug, thiserror::Error)]
pub enum PtyError {
    /// `argv` was empty.
    #[error("pty_exec: argv is empty")]
    EmptyArgv,
    /// The working directory does not exist.
    #[error("pty_exec {program:?}: cwd {cwd:?} is not a directory")]
    BadCwd {
        /// `argv[0]`.
        program: String,
        /// The requested directory.
        cwd: String,
    },
    /// No pseudo-terminal could be opened (is devpts mounted on /dev/pts?).
    #[error("pty_exec {program:?}: cannot open a pseudo-terminal: {source}")]
    Open {
        /// `argv[0]`.
        program: String,
        /// The OS error.
        source: io::Error,
    },
    /// The program could not be started.
    #[error("cannot execute {program:?}: {source}")]
    Spawn {
        /// `argv[0]`.
        program: String,
        /// The OS error.
        source: io::Error,
    },
    /// The client sent something other than input or a resize while the command ran.
    #[error("pty_exec {program:?}: expected stdin or resize from the client, got {got}")]
    Unexpected {
        /// `argv[0]`.
        program: String,
        /// The message type that arrived.
        got: &'static str,
    },
    /// The client went away or the stream broke; the command was killed.
    #[error("pty_exec {program:?}: client went away: {source}")]
    Client {
        /// `argv[0]`.
        program: String,
        /// The framing error.
        source: FrameError,
    },
}

/// Run `request` on a new pty, serving input and resizes from `stream` until the command exits.
pub fn run<S: Read + Write + AsRawFd>(
    request: &PtyExecRequest,
    stream: &mut S,
) -> Result<(), PtyError> {
    let program = request.argv.first().ok_or(PtyError::EmptyArgv)?.clone();
    if let Some(cwd) = &request.cwd {
        if !Path::new(cwd).is_dir() {
            return Err(PtyError::BadCwd {
                program,
                cwd: cwd.clone(),
            });
        }
    }
    let (master, slave) = open_pty().map_err(|source| PtyError::Open {
        program: program.clone(),
        source,
    })?;
    if request.rows > 0 && request.cols > 0 {
        set_window_size(master.as_raw_fd(), request.rows, request.cols);
    }

    let (tx, rx) = mpsc::channel();
    let pid = {
        let mut command = Command::new(&program);
        command
            .args(&request.argv[1..])
            .envs(request.env.iter().map(|(k, v)| (k, v)));
        if let Some(cwd) = &request.cwd {
            command.current_dir(cwd);
        }
        let io = |f: &File| f.try_clone().map(Stdio::from);
        let spawn_error = |source| PtyError::Spawn {
            program: program.clone(),
            source,
        };
        command
            .stdin(io(&slave).map_err(spawn_error)?)
            .stdout(io(&slave).map_err(spawn_error)?)
            .stderr(io(&slave).map_err(spawn_error)?);
        // SAFETY: between fork and exec the closure only makes async-signal-safe system calls.
        unsafe {
            command.pre_exec(|| {
                // A new session whose controlling terminal is the pty (stdin, fd 0): the line
                // discipline then signals its foreground job on Ctrl-C.
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = children::spawn(&mut command, move |status| {
            let _ = tx.send(status);
        })
        .map_err(spawn_error)?;
        child.id() as libc::pid_t
        // The command, with its copies of the slave, is dropped here.
    };
    // Only the command holds the terminal now, so reading the master ends (EIO) once every
    // process on it has closed it.
    drop(slave);

    let mut relay = Relay {
        master,
        pending: Vec::new(),
        output_open: true,
    };
    match relay.serve(stream, &rx, &program) {
        Ok(status) => {
            let (code, signal) = status.map_or((None, None), children::decode_status);
            write_frame(
                stream,
                &Message::Exited {
                    code,
                    signal,
                    timed_out: false,
                },
            )
            .map_err(|source| PtyError::Client { program, source })
        }
        Err(e) => {
            // Closing the master hangs the terminal up (SIGHUP to its session); the kill makes
            // sure a command that ignores SIGHUP goes too.
            drop(relay);
            kill_group(pid);
            Err(e)
        }
    }
}

/// The pty master and what flows through it.
struct Relay {
    master: File,
    /// Input received from the client that the terminal has not taken yet.
    pending: Vec<u8>,
    /// Whether the master can still give output (false after EIO: every slave fd is closed).
    output_open: bool,
}

impl Relay {
    /// Relay until the command has exited and its output is drained; returns its raw status
    /// (`None` if the reaper never reported it).
    fn serve<S: Read + Write + AsRawFd>(
        &mut self,
        stream: &mut S,
        exits: &mpsc::Receiver<libc::c_int>,
        program: &str,
    ) -> Result<Option<libc::c_int>, PtyError> {
        let client_error = |source| PtyError::Client {
            program: program.to_owned(),
            source,
        };
        let mut status = None;
        let mut quiet_since = Instant::now();
        loop {
            if status.is_none() {
                match exits.try_recv() {
                    Ok(raw) => {
                        status = Some(raw);
                        quiet_since = Instant::now();
                    }
                    Err(mpsc::TryRecvError::Empty) => {}
                    Err(mpsc::TryRecvError::Disconnected) => return Ok(None),
                }
            }
            if status.is_some() && (!self.output_open || quiet_since.elapsed() >= DRAIN_QUIET) {
                return Ok(status);
            }

            let want_input = self.pending.len() < MAX_PENDING_INPUT;
            let mut master_events = 0;
            if self.output_open {
                master_events |= libc::POLLIN;
            }
            if !self.pending.is_empty() {
                master_events |= libc::POLLOUT;
            }
            let mut fds = [
                libc::pollfd {
                    fd: stream.as_raw_fd(),
                    events: if want_input { libc::POLLIN } else { 0 },
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.master.as_raw_fd(),
                    events: master_events,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfd structs for the duration of the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, TICK_MS) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(client_error(FrameError::Io(e)));
            }
            let master_ready = fds[1].revents;
            if master_ready & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                if let Some(chunk) = self.read_output() {
                    quiet_since = Instant::now();
                    write_frame(stream, &Message::Stdout { data: chunk }).map_err(client_error)?;
                }
            }
            if master_ready & libc::POLLOUT != 0 {
                self.write_input();
            }
            if want_input && fds[0].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                match read_frame(stream).map_err(client_error)? {
                    Message::Stdin { data } => {
                        self.pending.extend_from_slice(&data);
                        self.write_input();
                    }
                    Message::Resize { rows, cols } => {
                        set_window_size(self.master.as_raw_fd(), rows, cols)
                    }
                    other => {
                        return Err(PtyError::Unexpected {
                            program: program.to_owned(),
                            got: other.kind(),
                        })
                    }
                }
            }
        }
    }

    /// One chunk of terminal output, or `None` (nothing now, or the terminal is closed).
    fn read_output(&mut self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; CHUNK_LEN];
        match self.master.read(&mut buf) {
            Ok(0) => {
                self.output_open = false;
                None
            }
            Ok(n) => {
                buf.truncate(n);
                Some(buf)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                None
            }
            // EIO: no process has the terminal open any more.
            Err(_) => {
                self.output_open = false;
                None
            }
        }
    }

    /// Hand as much pending input to the terminal as it takes without blocking.
    fn write_input(&mut self) {
        while !self.pending.is_empty() {
            match self.master.write(&self.pending) {
                Ok(0) => return,
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // The terminal is gone (the command exited): its input goes nowhere.
                Err(_) => {
                    self.pending.clear();
                    return;
                }
            }
        }
    }
}

/// Open a pty pair: the master non-blocking (the relay polls it), the slave for the command.
fn open_pty() -> io::Result<(File, File)> {
    // SAFETY: posix_openpt returns a new fd or -1; no memory is involved.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let master = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut name = [0 as libc::c_char; 64];
    // SAFETY: plain calls on the fd we own; ptsname_r writes at most `name.len()` bytes into it.
    let rc = unsafe {
        if libc::grantpt(fd) != 0 || libc::unlockpt(fd) != 0 {
            -1
        } else {
            libc::ptsname_r(fd, name.as_mut_ptr(), name.len())
        }
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated path.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    // SAFETY: open(2) of a NUL-terminated path; returns a new fd or -1.
    let slave = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if slave < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `slave` is a fresh descriptor nobody else owns.
    let slave = File::from(unsafe { OwnedFd::from_raw_fd(slave) });
    set_nonblocking(master.as_raw_fd())?;
    Ok((File::from(master), slave))
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own, reading and then setting its status flags.
    let rc = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            flags
        } else {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK)
        }
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Resize the terminal; the kernel sends SIGWINCH to its foreground job.
fn set_window_size(master: RawFd, rows: u16, cols: u16) {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which points at `size`.
    unsafe {
        libc::ioctl(master, libc::TIOCSWINSZ, &size);
    }
}

fn kill_group(pgid: libc::pid_t) {
    // SAFETY: kill(2) with a negative pid signals that process group; no memory is involved.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

#[cfg(test)]
#[path = "pty_tests.rs"]
mod tests;
