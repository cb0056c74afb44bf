//! `kiln shell` and `kiln exec`: into a VM that `kiln run --pause-before-teardown` (or `--debug`
//! on a failure) keeps. The paused run's `paused.json` says where its guest agent is; `kiln shell`
//! opens a terminal in the guest over the agent's `pty_exec` (the local terminal in raw mode, so
//! Ctrl-C and job control act in the guest; window size changes follow), `kiln exec` runs one
//! command with its stdout, stderr and exit status passed through.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::thread;
use std::time::Duration;

use clap::Args;
use kiln_agent_proto::client::{ClientError, ExitInfo, PtyEvent, PtyInput};
use kiln_agent_proto::{ExecRequest, PtyExecRequest, MAX_FILE_LEN};
use kiln_runner::paused::{self, FindError, PausedRun};

use crate::exit;

/// How long connecting to the agent and its hello may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The guest terminal's size when the local one has none.
const DEFAULT_SIZE: (u16, u16) = (24, 80);

/// `kiln shell`.
#[derive(Debug, Args)]
pub struct ShellArgs {
    /// The paused run: its scenario id, or its bundle directory (`.<run>.partial`).
    #[arg(value_name = "SCENARIO|DIR")]
    pub target: String,
    /// The artifacts dir the run writes its bundles to.
    #[arg(long, value_name = "DIR", default_value = crate::args::DEFAULT_ARTIFACTS)]
    pub artifacts: PathBuf,
    /// A command to run on the guest terminal instead of `sh`.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// `kiln exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The paused run: its scenario id, or its bundle directory (`.<run>.partial`).
    #[arg(value_name = "SCENARIO|DIR")]
    pub target: String,
    /// The artifacts dir the run writes its bundles to.
    #[arg(long, value_name = "DIR", default_value = crate::args::DEFAULT_ARTIFACTS)]
    pub artifacts: PathBuf,
    /// Send this command's standard input to the guest command (read to end of file first).
    #[arg(short = 'i', long)]
    pub stdin: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Why `kiln shell` or `kiln exec` could not reach or drive the guest.
#[derive(Debug, thiserror::Error)]
enum ShellError {
    #[error(transparent)]
    Find(#[from] FindError),
    #[error("run {run_id} of `{scenario}`: {source}")]
    Agent {
        scenario: String,
        run_id: String,
        source: ClientError,
    },
    #[error("run {run_id} of `{scenario}`: the guest's agent predates `kiln shell` (it speaks protocol version 1); rebuild it with `kiln guest build --alias default` (or build the scenario's own guest anew)")]
    OldAgent { scenario: String, run_id: String },
    #[error("standard input holds more than the {max} bytes one exec carries")]
    StdinTooLarge { max: u64 },
    #[error("cannot read standard input: {0}")]
    Stdin(io::Error),
}

impl ShellError {
    fn agent(run: &PausedRun, source: ClientError) -> ShellError {
        if matches!(&source, ClientError::Agent { message, .. }
            if message.starts_with("unsupported protocol version 2"))
        {
            return ShellError::OldAgent {
                scenario: run.scenario.clone(),
                run_id: run.run_id.clone(),
            };
        }
        ShellError::Agent {
            scenario: run.scenario.clone(),
            run_id: run.run_id.clone(),
            source,
        }
    }

    fn exit_code(&self) -> i32 {
        match self {
            ShellError::Find(_) => exit::UNAVAILABLE,
            _ => exit::ERROR,
        }
    }
}

/// `kiln shell`: a terminal in the paused guest; exits with the guest command's status.
pub fn shell(args: ShellArgs) -> i32 {
    finish("shell", shell_inner(&args))
}

/// `kiln exec`: one command in the paused guest; exits with its status.
pub fn exec(args: ExecArgs) -> i32 {
    finish("exec", exec_inner(&args))
}

fn finish(what: &str, result: Result<ExitInfo, ShellError>) -> i32 {
    match result {
        Ok(exit) => status_code(&exit),
        Err(e) => {
            eprintln!("kiln {what}: {e}");
            e.exit_code()
        }
    }
}

/// The guest command's status as this process's: its code, or 128 + the signal that killed it.
fn status_code(exit: &ExitInfo) -> i32 {
    match (exit.code, exit.signal) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => exit::ERROR,
    }
}

fn exec_inner(args: &ExecArgs) -> Result<ExitInfo, ShellError> {
    let run = paused::find(&args.artifacts, &args.target)?;
    let mut request = ExecRequest::new(args.command.iter().cloned());
    if args.stdin {
        let mut data = Vec::new();
        io::stdin()
            .lock()
            .take(MAX_FILE_LEN + 1)
            .read_to_end(&mut data)
            .map_err(ShellError::Stdin)?;
        if data.len() as u64 > MAX_FILE_LEN {
            return Err(ShellError::StdinTooLarge { max: MAX_FILE_LEN });
        }
        request.stdin = data;
    }
    let mut client = run
        .agent
        .connect(CONNECT_TIMEOUT)
        .map_err(|e| ShellError::agent(&run, e))?
        // A command may run as long as it likes: the person who started it can Ctrl-C us.
        .io_timeout(None);
    let (mut stdout, mut stderr) = (io::stdout().lock(), io::stderr().lock());
    client
        .exec_streaming(&request, |stream, data| {
            let _ = match stream {
                kiln_agent_proto::client::OutputStream::Stdout => {
                    stdout.write_all(data).and_then(|()| stdout.flush())
                }
                kiln_agent_proto::client::OutputStream::Stderr => stderr.write_all(data),
            };
        })
        .map_err(|e| ShellError::agent(&run, e))
}

fn shell_inner(args: &ShellArgs) -> Result<ExitInfo, ShellError> {
    let run = paused::find(&args.artifacts, &args.target)?;
    let stdin_fd = io::stdin().as_raw_fd();
    let terminal = is_terminal(stdin_fd);
    // Without a terminal (or one that reports no size) the guest's gets a classic 24x80: a
    // 0x0 terminal confuses programs that lay out their output.
    let (rows, cols) = terminal
        .then(|| window_size(stdin_fd))
        .flatten()
        .unwrap_or(DEFAULT_SIZE);
    let argv = if args.command.is_empty() {
        vec!["sh".to_string()]
    } else {
        args.command.clone()
    };
    let term = std::env::var("TERM").unwrap_or_else(|_| "linux".into());
    let request = PtyExecRequest {
        argv,
        env: vec![("TERM".into(), term)],
        cwd: None,
        rows,
        cols,
    };
    let client = run
        .agent
        .connect(CONNECT_TIMEOUT)
        .map_err(|e| ShellError::agent(&run, e))?;
    let mut session = client
        .pty_exec(&request)
        .map_err(|e| ShellError::agent(&run, e))?;
    let input = session.input().map_err(|e| ShellError::agent(&run, e))?;

    // Restored when this function returns, whichever way: the guard's Drop runs on every path.
    let _raw = if terminal {
        RawMode::enter(stdin_fd)
    } else {
        None
    };
    let winch = if terminal { winch_pipe() } else { None };
    thread::spawn(move || forward_input(stdin_fd, winch, input));

    let mut stdout = io::stdout().lock();
    loop {
        match session.next_event() {
            Ok(PtyEvent::Output(data)) => {
                let _ = stdout.write_all(&data).and_then(|()| stdout.flush());
            }
            Ok(PtyEvent::Exited(exit)) => return Ok(exit),
            Err(e) => return Err(ShellError::agent(&run, e)),
        }
    }
}

/// Copy standard input to the guest terminal and window size changes to its size, until either
/// side ends. At end of input the session stays open: the guest command decides when it is done.
fn forward_input(stdin_fd: RawFd, winch: Option<RawFd>, mut input: PtyInput) {
    let mut buf = [0u8; 4096];
    let mut stdin_open = true;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: if stdin_open { stdin_fd } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: winch.unwrap_or(-1),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        if !stdin_open && winch.is_none() {
            return;
        }
        // SAFETY: `fds` is a valid array of two pollfd structs for the duration of the call.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            continue; // EINTR, from SIGWINCH itself
        }
        if fds[1].revents & libc::POLLIN != 0 {
            if let Some(fd) = winch {
                // SAFETY: reads into `buf`, at most its length.
                unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            }
            if let Some((rows, cols)) = window_size(stdin_fd) {
                if input.resize(rows, cols).is_err() {
                    return;
                }
            }
        }
        if fds[0].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            // SAFETY: reads into `buf`, at most its length, from our standard input.
            let n = unsafe { libc::read(stdin_fd, buf.as_mut_ptr().cast(), buf.len()) };
            match n {
                n if n > 0 => {
                    if input.send(&buf[..n as usize]).is_err() {
                        return;
                    }
                }
                0 => stdin_open = false,
                _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
                _ => stdin_open = false,
            }
        }
    }
}

fn is_terminal(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// The terminal's (rows, columns).
fn window_size(fd: RawFd) -> Option<(u16, u16)> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize through the pointer, which points at `size`.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut size) };
    (rc == 0 && size.ws_row > 0 && size.ws_col > 0).then_some((size.ws_row, size.ws_col))
}

/// The local terminal in raw mode (no echo, no line editing, no signals from Ctrl-C: every byte
/// goes to the guest, whose own terminal does all that); the old settings come back on drop.
struct RawMode {
    fd: RawFd,
    saved: libc::termios,
}

impl RawMode {
    fn enter(fd: RawFd) -> Option<RawMode> {
        // SAFETY: termios is plain data; tcgetattr fills it in.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes one termios through the pointer, which points at `saved`.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the termios it is given; tcsetattr reads it.
        let rc = unsafe {
            libc::cfmakeraw(&mut raw);
            libc::tcsetattr(fd, libc::TCSANOW, &raw)
        };
        (rc == 0).then_some(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: tcsetattr reads the termios saved when raw mode began.
        unsafe {
            libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved);
        }
    }
}

/// The write end of the SIGWINCH self-pipe (the handler may only make async-signal-safe calls).
static WINCH_WRITE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_winch(_: libc::c_int) {
    let fd = WINCH_WRITE.load(Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; one byte from a static.
        unsafe { libc::write(fd, b"w".as_ptr().cast(), 1) };
    }
}

/// A pipe that becomes readable on every SIGWINCH; its read end, or `None` when it cannot be set up
/// (the guest terminal then keeps its first size).
fn winch_pipe() -> Option<RawFd> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return None;
    }
    WINCH_WRITE.store(fds[1], Ordering::Relaxed);
    // SAFETY: installs a handler that only calls write(2) on the pipe.
    let handler = on_winch as extern "C" fn(libc::c_int) as libc::sighandler_t;
    if unsafe { libc::signal(libc::SIGWINCH, handler) } == libc::SIG_ERR {
        return None;
    }
    Some(fds[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_becomes_128_plus_its_number_as_a_shell_reports_it() {
        let exit = |code, signal| ExitInfo {
            code,
            signal,
            timed_out: false,
        };
        assert_eq!(status_code(&exit(Some(7), None)), 7);
        assert_eq!(status_code(&exit(None, Some(libc::SIGINT))), 130);
        assert_eq!(status_code(&exit(None, None)), exit::ERROR);
    }
}
